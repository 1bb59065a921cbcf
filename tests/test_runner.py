"""The runner and the store: one row per cell, resumable, failures recorded and the sweep going on."""

import json
import pytest

from bench.sweep.runner import run_suite
from bench.sweep.store import read_results
from bench.sweep.suite import load_suite
from helpers import TINY_SUITE, Exploding, plugins_with_test_solvers, write_suite


def test_a_sweep_writes_one_row_per_cell(tmp_path):
    suite = load_suite(write_suite(tmp_path))
    summary = run_suite(suite, tmp_path / "results", progress=False)
    assert (summary.done, summary.failed, summary.skipped) == (8, 0, 0)
    frame = read_results(tmp_path / "results" / "tiny.sqlite")
    assert len(frame) == 8 and set(frame["key"]) == {cell.key for cell in suite.cells}
    assert (frame["status"] == "done").all()
    heun = frame[frame["solver"] == "heun"]
    assert sorted(set(heun["nfe"])) == [3, 5] and (heun["nfe"] == heun["nfe_budget"]).all()
    for metric in ("trajectory_error", "frechet_exact", "fid", "precision", "recall"):
        assert frame[metric].notna().all(), metric
    assert (frame["seconds"] > 0).all()
    environment = json.loads(frame["environment"].iloc[0])
    assert {"device", "torch", "git_sha", "python"} <= set(environment)
    config = json.loads(frame["config"].iloc[0])
    assert config["model"]["name"] == "gmm2d" and config["n"] == 32
    # more steps, less error: the metrics measure what they claim
    euler = frame[frame["solver"] == "euler"].groupby("nfe")["trajectory_error"].mean()
    assert euler[4] < euler[2]


def test_a_second_run_skips_done_cells(tmp_path):
    suite = load_suite(write_suite(tmp_path))
    run_suite(suite, tmp_path, progress=False)
    again = run_suite(load_suite(write_suite(tmp_path)), tmp_path, progress=False)
    assert (again.done, again.failed, again.skipped) == (0, 0, 8)
    assert len(read_results(tmp_path / "tiny.sqlite")) == 8


def test_resume_after_interruption_completes_the_rest(tmp_path, monkeypatch):
    plugins = plugins_with_test_solvers()
    suite = load_suite(write_suite(tmp_path), plugins=plugins)
    import bench.sweep.runner

    real = bench.sweep.runner.measure
    calls = []

    def interrupt_on_fifth(cell, *args, **kwargs):
        calls.append(cell.key)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(cell, *args, **kwargs)

    monkeypatch.setattr(bench.sweep.runner, "measure", interrupt_on_fifth)
    with pytest.raises(KeyboardInterrupt):
        run_suite(suite, tmp_path, plugins=plugins, progress=False)
    assert len(read_results(tmp_path / "tiny.sqlite")) == 4
    calls.clear()
    monkeypatch.setattr(bench.sweep.runner, "measure", real)
    summary = run_suite(suite, tmp_path, plugins=plugins, progress=False)
    assert (summary.done, summary.skipped) == (4, 4)
    frame = read_results(tmp_path / "tiny.sqlite")
    assert len(frame) == 8 and frame["key"].is_unique


def test_failed_cells_are_recorded_and_the_sweep_goes_on(tmp_path):
    plugins = plugins_with_test_solvers()
    text = TINY_SUITE + '\n[[solvers]]\nname = "exploding"\nnfe = [13, 17, 19]\n'
    suite = load_suite(write_suite(tmp_path, text), plugins=plugins)
    Exploding.runs = 0
    summary = run_suite(suite, tmp_path, plugins=plugins, progress=False)
    assert summary.failed == 4 and summary.done == 8 + 2  # 13 and 17 fail for both seeds; 19 works
    frame = read_results(tmp_path / "tiny.sqlite").set_index("nfe_budget")
    exploding = frame[frame["solver"] == "exploding"]
    assert (exploding.loc[13, "status"] == "failed").all()
    assert exploding.loc[13, "error"].str.contains("RuntimeError: boom at 13").all()
    assert exploding.loc[17, "error"].str.contains("FloatingPointError: 32 of 32 samples are not finite").all()
    assert (exploding.loc[19, "status"] == "done").all()
    # failed cells are retried on the next run, done ones are not
    runs_before = Exploding.runs
    again = run_suite(suite, tmp_path, plugins=plugins, progress=False)
    assert (again.skipped, again.failed) == (10, 4)
    assert Exploding.runs - runs_before == 2 * 1 + 2 * 2  # raising in the warm-up; NaN after warm-up and run
    assert len(read_results(tmp_path / "tiny.sqlite")) == 14


@pytest.mark.slow  # seconds to a minute on a loaded 2-core machine: `make bench` runs it
def test_image_models_store_a_sample_grid_per_cell_and_the_report_shows_them(tmp_path):
    from bench.cli import main
    from bench.sweep.store import read_grids

    text = TINY_SUITE.replace('name = "gmm2d"', 'name = "gmm-image"').replace("seeds = [0, 1]", "seeds = [0]")
    text = 'guidance = [0.0, 2.0]\nlabels = "balanced"\n' + text
    path = write_suite(tmp_path, text)
    report = tmp_path / "tiny.html"
    assert main(["run", str(path), "--out", str(tmp_path), "--report", str(report), "--quiet"]) == 0
    grids = read_grids(tmp_path / "tiny.sqlite")
    frame = read_results(tmp_path / "tiny.sqlite")
    assert set(grids) == set(frame["key"])
    assert all(png.startswith(b"\x89PNG") for png in grids.values())
    page = report.read_text()
    assert page.count('<img class="samples"') == len(grids)  # 2 solvers x 2 budgets x 2 guidance scales
    assert "fig-0-fid-vs-guidance" in page and "fig-0-precision-recall-guidance" in page
