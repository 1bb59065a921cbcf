"""`samplerbench table`: one metric as a paper's table, mean ± the 95% t-interval over seeds, best of each column
marked in the metric's own direction."""

import csv
import io
import math

import pandas as pd
import pytest

from bench.cli import main
from bench.errors import BenchError
from bench.report.data import t_half_width
from bench.report.table import metric_table
from bench.sweep.store import read_grids
from helpers import write_suite

T_975 = {1: 12.706204736174704, 2: 4.302652729749464}  # Student t quantiles, degrees of freedom 1 and 2


def _row(label, budget, seed, **metrics):
    return {"key": f"{label}/{budget}/{seed}", "model": "gmm2d", "solver": label, "label": label,
            "schedule": "karras", "nfe_budget": budget, "guidance": math.nan, "seed": seed, "n": 64,
            "status": "done", "nfe": budget, "seconds": 0.1, **metrics}


def _results():
    rows = [_row("euler", 10, 0, fid=1.0, recall=0.5), _row("euler", 10, 1, fid=3.0, recall=0.7),
            _row("euler", 20, 0, fid=0.5, recall=0.8), _row("euler", 20, 1, fid=0.7, recall=0.8),
            _row("euler", 20, 2, fid=0.9, recall=0.9),
            _row("a|b_{x}", 10, 0, fid=1.5, recall=0.9), _row("a|b_{x}", 10, 1, fid=1.6, recall=0.95),
            _row("a|b_{x}", 20, 0, fid=0.2, recall=0.1)]  # one seed at 20: no interval
    failed = _row("euler", 30, 0, fid=math.nan, recall=math.nan)
    failed["status"] = "failed"
    frame = pd.DataFrame([*rows, failed])
    frame.attrs["metrics"] = {"fid": {"title": "FID", "better": "lower", "log_scale": True, "axis": "quality"},
                              "recall": {"title": "recall", "better": "higher", "log_scale": False,
                                         "axis": "diversity"}}
    return frame


def test_the_interval_is_students_t():
    assert t_half_width([math.sqrt(2)], [2])[0] == pytest.approx(T_975[1] * math.sqrt(2) / math.sqrt(2))
    assert t_half_width([0.2], [3])[0] == pytest.approx(T_975[2] * 0.2 / math.sqrt(3))
    assert math.isnan(t_half_width([0.0], [1])[0])


def test_markdown_marks_the_best_of_each_column_in_the_metrics_direction():
    text = metric_table(_results(), "fid", fmt="markdown")
    lines = text.splitlines()
    assert lines[0] == "### gmm2d" and "| series | NFE 10 | NFE 20 |" in lines
    # euler at 10: mean 2, std sqrt(2), two seeds; a|b_{x} wins 10 (1.55) and has one seed at 20 (0.2, the best)
    euler = next(line for line in lines if line.startswith("| euler |"))
    assert euler == f"| euler | 2 ± {T_975[1]:.2g} | 0.7 ± {T_975[2] * 0.2 / math.sqrt(3):.2g} |"
    other = next(line for line in lines if line.startswith("| a\\|b\\_{x} |"))
    assert other == f"| a\\|b\\_{{x}} | **1.55 ± {T_975[1] * 0.05 * math.sqrt(2) / math.sqrt(2):.2g}** | **0.2 (1 seed)** |"
    recall = metric_table(_results(), "recall", fmt="markdown")  # higher is better: the other winners
    assert "| euler | 0.6 ± " in recall and "| **0.8333 ± " in recall and "**0.925 ± " in recall


def test_latex_escapes_and_bolds():
    text = metric_table(_results(), "fid", fmt="latex")
    assert r"a|b\_\{x\} & \textbf{1.55 $\pm$" in text and r"\textbf{0.2 {\small (1 seed)}}" in text
    assert r"\begin{tabular}{lrr}" in text and r"95\% t-interval" in text


def test_csv_is_long_and_exact():
    rows = list(csv.DictReader(io.StringIO(metric_table(_results(), "fid", fmt="csv"))))
    assert len(rows) == 4  # the failed cell is left out
    euler_10 = next(row for row in rows if row["series"] == "euler" and row["nfe"] == "10")
    assert float(euler_10["mean"]) == 2.0 and euler_10["seeds"] == "2" and euler_10["best"] == "False"
    assert float(euler_10["ci95_half_width"]) == pytest.approx(T_975[1])
    one_seed = next(row for row in rows if row["series"] == "a|b_{x}" and row["nfe"] == "20")
    assert one_seed["ci95_half_width"] == "" and one_seed["best"] == "True"


def test_bad_requests_name_the_choices():
    with pytest.raises(BenchError, match=r"no metric 'FID' in these results \(metrics: fid, recall\)"):
        metric_table(_results(), "FID")
    with pytest.raises(BenchError, match=r"no model 'cifar' in these results \(models: gmm2d\)"):
        metric_table(_results(), "fid", model="cifar")


def test_the_command_reads_a_store(tmp_path, capsys):
    suite = write_suite(tmp_path)
    assert main(["run", str(suite), "--out", str(tmp_path), "--report", str(tmp_path / "r.html"), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["table", str(tmp_path / "tiny.sqlite"), "--metric", "trajectory_error", "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert {(row["series"], row["nfe"]) for row in rows} == {("euler", "2"), ("euler", "4"), ("heun", "3"),
                                                             ("heun", "5")}
    assert all(row["seeds"] == "2" and float(row["ci95_half_width"]) > 0 for row in rows)
    assert sum(row["best"] == "True" for row in rows) == 4  # one series per budget column: each is the best
    grids = read_grids(tmp_path / "tiny.sqlite")  # gmm2d's cells: scatter plots over the true density
    assert len(grids) == 8 and all(png.startswith(b"\x89PNG") for png in grids.values())


def test_by_guidance_the_scales_are_the_columns_not_part_of_the_series():
    rows = [{**_row(label, 10, seed, fid=fid + seed), "guidance": w, "key": f"{label}/{w}/{seed}"}
            for label, w, fid in (("euler", 0.0, 2.0), ("euler", 2.0, 1.0), ("heun", 0.0, 1.0), ("heun", 2.0, 3.0))
            for seed in (0, 1)]
    frame = pd.DataFrame(rows)
    frame.attrs["metrics"] = _results().attrs["metrics"]
    lines = metric_table(frame, "fid", by="guidance").splitlines()
    assert "| series | w 0 | w 2 |" in lines
    ci = f"{T_975[1] * math.sqrt(0.5) / math.sqrt(2):.2g}"
    assert f"| euler | 2.5 ± {ci} | **1.5 ± {ci}** |" in lines and f"| heun | **1.5 ± {ci}** | 3.5 ± {ci} |" in lines
