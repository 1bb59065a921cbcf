"""Crash safety, measured: kill -9 a sweep at random moments, resume it, and compare with an uninterrupted run.

    python -m bench.tools.crash_trials --trials 20

runs a 60-cell suite (euler, heun, ddim x 10 NFE budgets on gmm2d and gmm-image) once without interruption, then,
for each trial, starts it afresh in its own folder and sends SIGKILL to the whole process group at a random point
of its progress: once k rows are stored (k drawn uniformly from 0 to 60), after a further delay drawn uniformly
over one cell's mean duration, so that kills land in sampling, metrics, reference caches, SQLite writes with a hot
journal and, past the last row, the report. Drawing the point by progress rather than by time keeps the kills
spread over the whole run on a machine whose load changes. It checks the store as the kill left it (SQLite's
integrity check; rows present), then runs the suite again to completion and counts, against the uninterrupted run:

- lost: cells of the suite without a done row after the resume;
- duplicated: cells stored more than once (one key, one row is what a primary key promises; this also counts two
  rows of one config computed by two runs);
- corrupted: stores whose integrity check fails, after the kill or after the resume;
- different: done rows whose metrics are not bit-identical to the uninterrupted run's (same machine, same batch
  size, same library versions: the arithmetic repeats exactly);
- leftovers: temporary files left in the output folder after the resume.

Every count should be 0. The figures depend on nothing but this machine's speed (the kill moments scale with it).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

SUITE = """\
name = "crash"
device = "cpu"
n = 256
seeds = [0]
nfe = [4, 6, 8, 10, 12, 16, 20, 25, 30, 40]
schedules = ["karras"]
metrics = ["trajectory_error", "frechet_exact", "precision", "recall"]

[[models]]
name = "gmm2d"

[[models]]
name = "gmm-image"

[[solvers]]
name = "euler"

[[solvers]]
name = "heun"

[[solvers]]
name = "ddim"
"""
CELLS = 60


@dataclass
class Tally:
    lost: int = 0
    duplicated: int = 0
    corrupted: int = 0
    different: int = 0
    leftovers: int = 0
    rows_at_kill: list[int] = field(default_factory=list)


def run_suite(folder: Path, suite: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "bench.cli", "run", str(suite), "--out", str(folder),
               "--report", str(folder / "crash.html"), "--quiet"]
    # a process group of its own: the kill takes the run and anything it started
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def store_rows(path: Path) -> tuple[bool, dict[str, str], int]:
    """(integrity ok, metrics JSON by done key, rows beyond one per config) of a store; a missing store is empty."""
    if not path.exists():
        return True, {}, 0
    with sqlite3.connect(path) as connection:
        ok = connection.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        tables = {name for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "cells" not in tables:
            return ok, {}, 0
        rows = connection.execute("SELECT key, config_key, status, metrics FROM cells").fetchall()
    extra = len(rows) - len({config_key for _, config_key, _, _ in rows})
    return ok, {key: metrics for key, _, status, metrics in rows if status == "done"}, extra


def done_rows(path: Path) -> int:
    """Rows stored so far, read without taking part in the run's writes (a read-only connection, no waiting)."""
    try:
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=0)) as connection:
            return connection.execute("SELECT count(*) FROM cells WHERE status = 'done'").fetchone()[0]
    except sqlite3.Error:  # no store or no table yet, or a writer holds the lock: try again
        return -1


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    args = parser.parse_args(argv)
    moments = random.Random(args.seed)
    tally = Tally()
    with tempfile.TemporaryDirectory(prefix="crash-trials-") as root:
        root = Path(root)
        suite = root / "crash.toml"
        suite.write_text(SUITE)
        started = time.perf_counter()
        reference_run = run_suite(root / "reference", suite)
        _, errors = reference_run.communicate()
        duration = time.perf_counter() - started
        if reference_run.returncode != 0:
            sys.exit(f"the uninterrupted run failed:\n{errors.decode()}")
        _, reference, _ = store_rows(root / "reference" / "crash.sqlite")
        if len(reference) != CELLS:
            sys.exit(f"the uninterrupted run stored {len(reference)} done cells, not {CELLS}")
        print(f"uninterrupted run: {CELLS} cells in {duration:.1f} s")
        for trial in range(args.trials):
            folder = root / f"trial-{trial}"
            rows_before_kill, delay = moments.randint(0, CELLS), moments.uniform(0, duration / CELLS)
            process = run_suite(folder, suite)
            started = time.perf_counter()
            while process.poll() is None and done_rows(folder / "crash.sqlite") < rows_before_kill:
                time.sleep(0.05)
            time.sleep(delay)
            moment = time.perf_counter() - started
            killed = process.poll() is None
            if killed:
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            ok_after_kill, done_at_kill, _ = store_rows(folder / "crash.sqlite")
            rows = len(done_at_kill)
            tally.rows_at_kill.append(rows)
            resumed = run_suite(folder, suite)
            _, errors = resumed.communicate()
            if resumed.returncode != 0:
                print(f"trial {trial}: the resumed run failed: {errors.decode()[-2000:]}")
            ok_after_resume, done, extra = store_rows(folder / "crash.sqlite")
            lost = len(set(reference) - set(done))
            different = sum(done[key] != reference[key] for key in set(done) & set(reference))
            leftovers = [path.name for path in folder.rglob("*") if ".tmp" in path.name]
            tally.lost += lost
            tally.duplicated += extra
            tally.corrupted += (not ok_after_kill) + (not ok_after_resume)
            tally.different += different
            tally.leftovers += len(leftovers)
            print(f"trial {trial:2d}: killed after row {rows_before_kill:2d} + {delay:4.2f} s, at {moment:5.1f} s"
                  f"{'' if killed else ' (had ended)'} with {rows:2d} rows; "
                  f"after resume: lost {lost}, different {different}, integrity "
                  f"{'ok' if ok_after_kill and ok_after_resume else 'FAILED'}, leftovers {leftovers or 0}")
    print(json.dumps({"trials": args.trials, "cells": CELLS, "lost": tally.lost, "duplicated": tally.duplicated,
                      "corrupted": tally.corrupted, "different": tally.different, "leftovers": tally.leftovers,
                      "rows_at_kill": tally.rows_at_kill}))


if __name__ == "__main__":
    main()
