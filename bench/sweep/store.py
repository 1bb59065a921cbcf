"""The results store: one SQLite file per suite, one row per cell, keyed by the hash of the cell's config and of
the code that computed it (bench.sweep.provenance).

Each row is written in one transaction, so an interrupted sweep leaves only whole rows; a resumed sweep skips the
done cells and retries the failed ones. A row written for a config replaces any row of the same config computed by
other code (``config_key``), so a store never holds a stale number beside a fresh one. ``read_results`` gives a
pandas DataFrame with one column per metric.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable
from contextlib import closing
from pathlib import Path
from typing import Any

import pandas as pd

from bench.errors import BenchError
from bench.sweep.schema import JSON_COLUMNS, NAMES, create_table_sql

GRIDS_SCHEMA = "CREATE TABLE IF NOT EXISTS grids (key TEXT PRIMARY KEY, png BLOB NOT NULL)"
# a cell being computed: by whom (host:pid:run), and when that run last said it is alive
CLAIMS_SCHEMA = ("CREATE TABLE IF NOT EXISTS claims (key TEXT PRIMARY KEY, claimant TEXT NOT NULL, "
                 "heartbeat REAL NOT NULL)")
HEARTBEAT_SECONDS = 5.0
STALE_AFTER_SECONDS = 60.0  # a claim not renewed for this long belongs to a run that died
METRICS_SCHEMA = ("CREATE TABLE IF NOT EXISTS metric_info (name TEXT PRIMARY KEY, title TEXT NOT NULL, "
                  "better TEXT NOT NULL, log_scale INTEGER NOT NULL, axis TEXT NOT NULL, description TEXT NOT NULL)")


class Store:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # the driver alone writes; a generous timeout rides out a reader holding the lock
        self._connection = sqlite3.connect(self.path, timeout=60)
        with self._connection:
            columns = [row[1] for row in self._connection.execute("PRAGMA table_info(cells)")]
            if columns and columns != list(NAMES):
                # a store written by an earlier samplerbench: its rows cannot say which code made them
                raise BenchError(f"{str(self.path)!r} was written by an earlier version of samplerbench (its columns "
                                 f"differ); move it aside and run again to recompute its cells")
            self._connection.execute(create_table_sql())
            self._connection.execute(GRIDS_SCHEMA)
            self._connection.execute(METRICS_SCHEMA)
            self._connection.execute(CLAIMS_SCHEMA)

    def done_keys(self) -> set[str]:
        rows = self._connection.execute("SELECT key FROM cells WHERE status = 'done'")
        return {key for (key,) in rows}

    def claim(self, key: str, claimant: str, *, redo: bool = False) -> str:
        """Take a cell for ``claimant``, so that two runs sharing this store never compute it twice. Returns
        "claimed", "done" (a done row exists and ``redo`` is false) or "busy" (a live run holds it). A claim whose
        run has died (no heartbeat for STALE_AFTER_SECONDS, or a dead process on this host) is taken over."""
        with self._transaction():
            if not redo and self._connection.execute(
                    "SELECT 1 FROM cells WHERE key = ? AND status = 'done'", (key,)).fetchone():
                return "done"
            held = self._connection.execute("SELECT claimant, heartbeat FROM claims WHERE key = ?", (key,)).fetchone()
            if held and held[0] != claimant and claim_alive(*held):
                return "busy"
            self._connection.execute("INSERT OR REPLACE INTO claims (key, claimant, heartbeat) VALUES (?, ?, ?)",
                                     (key, claimant, time.time()))
            return "claimed"

    def release_all(self, claimant: str) -> None:
        with self._transaction():
            self._connection.execute("DELETE FROM claims WHERE claimant = ?", (claimant,))

    def _transaction(self):
        """BEGIN IMMEDIATE: the check and the claim are one step for every process sharing the file."""
        connection = self._connection

        class Immediate:
            def __enter__(self):
                connection.execute("BEGIN IMMEDIATE")

            def __exit__(self, kind, error, trace):
                connection.execute("COMMIT" if kind is None else "ROLLBACK")

        return Immediate()

    def write(self, row: dict[str, Any], grid_png: bytes | None = None, claimant: str | None = None) -> None:
        """One cell's row (and its sample grid, for image models), in one transaction, which also releases the
        cell's claim; a failed cell run again replaces its old row."""
        values = dict(row)
        for column in JSON_COLUMNS:
            values[column] = json.dumps(values[column], sort_keys=True, default=str)
        missing = [column for column in NAMES if column not in values]
        if missing:
            raise ValueError(f"row lacks columns {missing}")
        with self._connection:
            stale = [key for (key,) in self._connection.execute(
                "SELECT key FROM cells WHERE config_key = ? AND key != ?", (values["config_key"], values["key"]))]
            for key in stale:
                self._connection.execute("DELETE FROM cells WHERE key = ?", (key,))
                self._connection.execute("DELETE FROM grids WHERE key = ?", (key,))
            self._connection.execute(
                f"INSERT OR REPLACE INTO cells ({', '.join(NAMES)}) VALUES ({', '.join('?' * len(NAMES))})",
                [values[column] for column in NAMES],
            )
            if grid_png is not None:
                self._connection.execute("INSERT OR REPLACE INTO grids (key, png) VALUES (?, ?)",
                                         (values["key"], grid_png))
            if claimant is not None:
                self._connection.execute("DELETE FROM claims WHERE key = ? AND claimant = ?",
                                         (values["key"], claimant))

    def describe_metrics(self, infos: Iterable[dict[str, Any]]) -> None:
        """Keep each metric's metadata (Metric.info) beside the rows, so that a report needs no plugin."""
        with self._connection:
            for info in infos:
                self._connection.execute(
                    "INSERT OR REPLACE INTO metric_info (name, title, better, log_scale, axis, description) "
                    "VALUES (:name, :title, :better, :log_scale, :axis, :description)", info)

    def close(self) -> None:
        self._connection.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Heartbeat:
    """Renews a claimant's claims every HEARTBEAT_SECONDS from a thread of its own (with its own connection), so
    that other runs see it alive while a long cell computes."""

    def __init__(self, path: Path, claimant: str, interval: float = HEARTBEAT_SECONDS) -> None:
        self.path, self.claimant, self.interval = path, claimant, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="samplerbench-heartbeat", daemon=True)

    def _run(self) -> None:
        connection = sqlite3.connect(self.path, timeout=60)
        try:
            while not self._stop.wait(self.interval):
                with connection:
                    connection.execute("UPDATE claims SET heartbeat = ? WHERE claimant = ?",
                                       (time.time(), self.claimant))
        finally:
            connection.close()

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def new_claimant() -> str:
    """host:pid:random, unique to one run."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def claim_alive(claimant: str, heartbeat: float) -> bool:
    host, _, rest = claimant.partition(":")
    pid = rest.partition(":")[0]
    if host == socket.gethostname() and pid.isdigit():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
    return time.time() - heartbeat < STALE_AFTER_SECONDS


def _existing(path: str | Path) -> sqlite3.Connection:
    """A connection to an existing store, never creating one (read-write all the same: a store left with a hot
    journal by a killed run is rolled back by its next reader)."""
    path = Path(path)
    if not path.is_file():
        raise BenchError(f"no results store at {str(path)!r}")
    return closing(sqlite3.connect(path, timeout=60))


def claims_in_progress(path: str | Path) -> dict[str, str]:
    """The cells live runs are computing now, by key: what a report drawn mid-run must say."""
    with _existing(path) as connection:
        tables = {name for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "claims" not in tables:
            return {}
        rows = connection.execute("SELECT key, claimant, heartbeat FROM claims").fetchall()
    return {key: claimant for key, claimant, heartbeat in rows if claim_alive(claimant, heartbeat)}


def read_results(path: str | Path, keys: Iterable[str] | None = None) -> pd.DataFrame:
    """All rows (or those with the given keys), with the metrics spread into one float column each (NaN where a
    metric did not apply)."""
    with _existing(path) as connection:
        frame = pd.read_sql_query("SELECT * FROM cells ORDER BY model, label, schedule, nfe_budget, seed", connection)
        tables = {name for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        infos = ({row[0]: {"title": row[1], "better": row[2], "log_scale": bool(row[3]), "axis": row[4],
                           "description": row[5]}
                  for row in connection.execute("SELECT name, title, better, log_scale, axis, description "
                                                "FROM metric_info")} if "metric_info" in tables else {})
    if keys is not None:
        frame = frame[frame["key"].isin(set(keys))].reset_index(drop=True)
    metrics = [json.loads(text) for text in frame["metrics"]]
    names = sorted({name for row in metrics for name in row})
    columns = {}
    for name in names:  # a metric named like a row column (a store edited by hand) keeps both readable
        column = name if name not in NAMES else f"{name} (metric)"
        frame[column] = [_float(row.get(name)) for row in metrics]
        columns[column] = {**infos.get(name, default_metric_info(name)), "name": column}
    frame.attrs["metrics"] = columns
    return frame


def default_metric_info(name: str) -> dict[str, Any]:
    """For a metric whose store has no metadata for it."""
    return {"title": name.replace("_", " "), "better": "lower", "log_scale": False, "axis": "other",
            "description": ""}


def _float(value: Any) -> float:
    return math.nan if value is None else float(value)


def read_grids(path: str | Path) -> dict[str, bytes]:
    """Sample grids (PNG bytes) by cell key."""
    with _existing(path) as connection:
        tables = {name for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "grids" not in tables:
            return {}
        return {key: bytes(png) for key, png in connection.execute("SELECT key, png FROM grids")}
