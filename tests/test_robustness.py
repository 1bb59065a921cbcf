"""Faulty plugins, hung cells, interrupts, leftovers and concurrent runs: a clear error, nothing lost, nothing done
twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import types

import pytest
import torch

from bench import Metric, Solver, hookimpl
from bench.cli import main
from bench.errors import BenchError
from bench.files import remove_stale_temporaries, temporary_beside
from bench.registry import PluginManager
from bench.sweep.runner import run_suite
from bench.sweep.store import Store, claims_in_progress, read_results
from bench.sweep.suite import load_suite
from helpers import write_suite

SUITE = """
name = "robust"
n = 16
seeds = [0]
nfe = [3]
metrics = {metrics}

[[models]]
name = "gmm2d"

[[solvers]]
name = "{solver}"
"""


def plugin_manager(**hooks) -> PluginManager:
    module = types.ModuleType("robustness_plugin")
    for name, function in hooks.items():
        setattr(module, name, hookimpl(function))
    plugins = PluginManager()
    plugins.register(module, name="robustness-plugin")
    return plugins


class Sleeper(Solver):
    """Hangs (sleeps for an hour) on its first call; later budgets are plain Euler."""

    def __init__(self) -> None:
        pass

    def sample(self, denoise, x, sigmas, plan, noise=None):
        if plan.nfe == 3:
            time.sleep(3600)
        values = sigmas.tolist()
        for sigma, sigma_next in zip(values[:-1], values[1:]):
            denoised = denoise(x, sigma)
            x = denoised if sigma_next == 0 else torch.lerp(denoised, x, sigma_next / sigma)
        return x


def test_a_hung_cell_is_stopped_recorded_and_the_sweep_goes_on(tmp_path):
    plugins = plugin_manager(register_solvers=lambda register: register(Sleeper, name="sleeper"))
    text = "cell_timeout = 3\n" + SUITE.format(metrics='["frechet_exact"]', solver="sleeper").replace(
        "nfe = [3]", "nfe = [3, 4]")
    started = time.monotonic()
    summary = run_suite(load_suite(write_suite(tmp_path, text), plugins=plugins), tmp_path, plugins=plugins,
                        progress=False)
    assert time.monotonic() - started < 60
    rows = read_results(summary.store).set_index("nfe_budget")
    assert (summary.done, summary.failed) == (1, 1)
    assert rows.loc[3, "status"] == "failed" and "time limit of 3 s" in rows.loc[3, "error"]
    assert rows.loc[4, "status"] == "done"
    # the command line's limit wins over the suite's
    again = run_suite(load_suite(write_suite(tmp_path, text), plugins=plugins), tmp_path, plugins=plugins,
                      progress=False, cell_timeout=0.5)
    assert "time limit of 0.5 s" in read_results(again.store).set_index("nfe_budget").loc[3, "error"]


def test_a_metric_that_raises_fails_alone_and_a_bad_return_names_the_metric(tmp_path):
    def register_metrics(register):
        register(Metric(lambda context: 1 / 0), name="broken")
        register(Metric(lambda context: "seven"), name="wordy")

    plugins = plugin_manager(register_metrics=register_metrics)
    text = SUITE.format(metrics='["broken", "trajectory_error", "wordy"]', solver="euler")
    summary = run_suite(load_suite(write_suite(tmp_path, text), plugins=plugins), tmp_path, plugins=plugins,
                        progress=False)
    row = read_results(summary.store).iloc[0]
    assert row["status"] == "done" and row["trajectory_error"] > 0
    errors = json.loads(row["metric_errors"])
    assert set(errors) == {"broken", "wordy"} and "ZeroDivisionError" in errors["broken"]
    assert "metric 'wordy' returned str ('seven')" in errors["wordy"]


def test_a_metric_named_like_a_row_column_is_refused_before_anything_runs(tmp_path):
    plugins = plugin_manager(register_metrics=lambda register: register(Metric(lambda c: 1.0), name="n"))
    suite = load_suite(write_suite(tmp_path, SUITE.format(metrics='["n"]', solver="euler")), plugins=plugins)
    with pytest.raises(BenchError, match="metric 'n' .* is named like a column of the result row"):
        run_suite(suite, tmp_path / "out", plugins=plugins, progress=False)
    assert not (tmp_path / "out").exists()
    # a store edited by hand to hold such a metric stays readable
    with Store(tmp_path / "edited.sqlite"):
        pass
    summary = run_suite(load_suite(write_suite(tmp_path, SUITE.format(metrics='["trajectory_error"]',
                                                                      solver="euler"))), tmp_path, progress=False)
    import sqlite3

    with sqlite3.connect(summary.store) as connection:
        connection.execute("UPDATE cells SET metrics = '{\"n\": 3.0}'")
    frame = read_results(summary.store)
    assert frame["n (metric)"].iloc[0] == 3.0 and frame["n"].iloc[0] == 16


def test_a_register_hook_that_raises_sets_its_plugin_aside(tmp_path, capsys):
    def register_solvers(register):
        register(Sleeper, name="half-registered")
        raise RuntimeError("plugin bug")

    plugins = plugin_manager(register_solvers=register_solvers)
    assert "euler" in plugins.names("solver") and "half-registered" not in plugins.names("solver")
    assert "register_solvers raised RuntimeError: plugin bug" in plugins.failed["robustness-plugin"]
    with pytest.raises(BenchError, match=r"unknown solver 'half-registered'.*may belong to a plugin that failed "
                                         r"to load: 'robustness-plugin'"):
        plugins.get("solver", "half-registered")


def test_leftover_temporaries_of_dead_runs_are_removed(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    live = temporary_beside(cache / "features-x.safetensors")  # this process: a live run's file in progress
    live.write_bytes(b"x")
    dead = cache / live.name.replace(f".{os.getpid()}.", ".999999999.")  # no such process
    dead.write_bytes(b"x")
    keep = cache / "reference-y.safetensors"
    keep.write_bytes(b"x")
    assert remove_stale_temporaries(cache) == [dead]
    assert live.exists() and keep.exists() and not dead.exists()


def test_claims_share_the_work_and_a_dead_claimant_is_taken_over(tmp_path):
    with Store(tmp_path / "s.sqlite") as store:
        assert store.claim("cell-a", "host-x:1:aaaa") == "claimed"
        assert store.claim("cell-a", "host-x:1:bbbb") == "busy"  # another live run holds it
        assert store.claim("cell-a", "host-x:1:aaaa") == "claimed"  # its own claim
        store._connection.execute("UPDATE claims SET heartbeat = heartbeat - 3600")
        store._connection.commit()
        assert store.claim("cell-a", "host-x:1:bbbb") == "claimed"  # the first run stopped its heartbeat
    import socket

    with Store(tmp_path / "t.sqlite") as store:
        assert store.claim("cell-b", f"{socket.gethostname()}:999999999:cccc") == "claimed"
        assert store.claim("cell-b", "other:1:dddd") == "claimed"  # a dead process on this host holds nothing
    assert claims_in_progress(tmp_path / "t.sqlite") == {"cell-b": "other:1:dddd"}


RUN_SCRIPT = """
import signal, sys, time
# as a terminal gives it: a test process before us may have left SIGINT ignored (Ray does), and children inherit that
signal.signal(signal.SIGINT, signal.default_int_handler)
from pathlib import Path
import bench.core.sampling as sampling
real = sampling.sample
calls = []
def slow(*args, **kwargs):
    calls.append(1)
    (Path({markers!r}) / f"sampling-{{len(calls)}}").touch()  # the test knows which cell is in flight
    time.sleep({delay})
    return real(*args, **kwargs)
sampling.sample = slow
import bench.sweep.cell
bench.sweep.cell.sample = slow
from bench.cli import main
sys.exit(main(sys.argv[1:]))
"""


def launch(tmp_path, suite_path, report: str, delay: float) -> subprocess.Popen:
    """A samplerbench run whose every cell sleeps ``delay`` seconds before sampling, after touching
    tmp_path / "markers-REPORT" / "sampling-K" for its K-th cell."""
    markers = tmp_path / f"markers-{report}"
    markers.mkdir()
    script = tmp_path / f"run_slowly_{report}.py"
    script.write_text(textwrap.dedent(RUN_SCRIPT.format(delay=delay, markers=str(markers))))
    return subprocess.Popen([sys.executable, str(script), "run", str(suite_path), "--out", str(tmp_path / "out"),
                             "--report", str(tmp_path / report), "--quiet"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.slow  # seconds to a minute on a loaded 2-core machine: `make bench` runs it
def test_two_concurrent_runs_never_compute_a_cell_twice(tmp_path):
    text = SUITE.format(metrics='["frechet_exact"]', solver="euler").replace("nfe = [3]", "nfe = [2, 3, 4, 5, 6, 7]")
    suite_path = write_suite(tmp_path, text)
    first = launch(tmp_path, suite_path, "a.html", delay=0.4)
    time.sleep(1.0)  # the first run is under way when the second starts
    second = launch(tmp_path, suite_path, "b.html", delay=0.4)
    outputs = [process.communicate(timeout=300) for process in (first, second)]
    assert [process.returncode for process in (first, second)] == [0, 0], outputs
    done = [int(out.split(" cells done")[0].split()[-1]) for out, _ in outputs]
    rows = read_results(tmp_path / "out" / "robust.sqlite")
    assert len(rows) == 6 and rows["key"].is_unique and (rows["status"] == "done").all()
    assert sum(done) == 6 and min(done) >= 1, outputs  # the work was shared, none of it done twice


def test_ctrl_c_stops_cleanly_writes_the_report_and_exits_130(tmp_path):
    text = SUITE.format(metrics='["frechet_exact"]', solver="euler").replace("nfe = [3]", "nfe = [2, 3, 4, 5, 6]")
    process = launch(tmp_path, write_suite(tmp_path, text), "r.html", delay=3.0)
    second_cell = tmp_path / "markers-r.html" / "sampling-2"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not second_cell.exists():
        time.sleep(0.05)  # the first cell is stored (cells run one after another) and the second one is in flight
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, (out, err)
    assert "Traceback" not in err and "interrupted: the cell in flight was not recorded" in err
    rows = read_results(tmp_path / "out" / "robust.sqlite")
    assert 1 <= len(rows) < 5 and (rows["status"] == "done").all()
    page = (tmp_path / "r.html").read_text()
    assert "This report is unfinished" in page and "the run was interrupted" in page
    assert claims_in_progress(tmp_path / "out" / "robust.sqlite") == {}
