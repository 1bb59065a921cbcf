"""bench.report: the self-contained HTML report of a sweep."""

from __future__ import annotations

import html
import json
import math
import os
import re

import numpy as np
import pandas as pd
import plotly.offline
import pytest

from bench import report
import bench.report.page
from bench.report import best_per_budget, pareto_front, write_report

EVIL_LABEL = "<script>alert(1)</script>"
EVIL_ERROR = "RuntimeError: <img src=x onerror=alert(2)> & boom"
BUNDLE = plotly.offline.get_plotlyjs()
BUNDLE_ID = BUNDLE[:120]  # the licence header with the version: identifies the bundle

LABELS = ["ddim(eta=0.5)", "heun", EVIL_LABEL]
BUDGETS = [5, 10, 20]


def _cell(model: str, label: str, budget: int, seed: int, **metrics: float) -> dict:
    return {
        "key": f"{model}/{label}/{budget}/{seed}", "suite": "smoke", "model": model, "solver": label.split("(")[0],
        "label": label, "schedule": "karras", "nfe_budget": budget, "guidance": math.nan, "seed": seed, "n": 256,
        "status": "done", "error": None, "nfe": budget, "model_evals": budget, "seconds": 0.01 * budget,
        "device": "cpu", **metrics,
    }


def _trajectory_error(label: str, budget: int, seed: int) -> float:
    # Crafted so that heun wins at 10 and 20 but ddim wins at 5 (on the seed mean).
    base = {"ddim(eta=0.5)": 1.0, "heun": 4.0, EVIL_LABEL: 8.0}[label] / budget
    if label == "heun" and budget > 5:
        base = 0.1 / budget
    return base * (1.0 + 0.1 * seed)


def _results() -> pd.DataFrame:
    """2 models x 3 labels x 3 budgets x 2 seeds; one failed cell; NaN / absent metrics."""
    rows = []
    for label in LABELS:
        for budget in BUDGETS:
            for seed in (0, 1):
                te = _trajectory_error(label, budget, seed)
                rows.append(_cell("gmm2d", label, budget, seed, trajectory_error=te, frechet_exact=2 * te,
                                  precision=0.9 - 0.01 * seed, recall=min(1.0, 0.05 * budget), fid=math.nan))
                rows.append(_cell("tiny-cifar", label, budget, seed, trajectory_error=te, fid=30.0 / budget + seed,
                                  precision=0.5, recall=0.02 * budget, frechet_exact=math.nan, my_score=1.5))
    failed = _cell("tiny-cifar", EVIL_LABEL, 40, 0, trajectory_error=math.nan, fid=math.nan, precision=math.nan,
                   recall=math.nan, frechet_exact=math.nan, my_score=math.nan)
    failed.update(status="failed", error=EVIL_ERROR, nfe=math.nan, seconds=math.nan)
    rows.append(failed)
    frame = pd.DataFrame(rows)
    frame.loc[frame["model"] == "gmm2d", "my_score"] = math.nan
    frame.attrs["metrics"] = METRIC_INFO  # as bench.read_results gives it, from each metric's registration
    return frame


METRIC_INFO = {
    "fid": {"title": "FID", "better": "lower", "log_scale": True, "axis": "quality"},
    "trajectory_error": {"title": "trajectory error", "better": "lower", "log_scale": True, "axis": "quality"},
    "frechet_exact": {"title": "exact Fréchet distance", "better": "lower", "log_scale": True, "axis": "quality"},
    "precision": {"title": "precision", "better": "higher", "log_scale": False, "axis": "fidelity"},
    "recall": {"title": "recall", "better": "higher", "log_scale": False, "axis": "diversity"},
}


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("rep") / "nested" / "dir" / "report.html"
    provenance = {"git sha": "abc123", "torch": "2.4.0", "device": "cpu", "suite": "<b>smoke.toml</b>",
                  "feature_space": "inception-v3 pool3"}
    path = write_report(_results(), out, title="Sweep <i>smoke</i>", provenance=provenance)
    assert path == out and out.exists()
    assert [p.name for p in out.parent.iterdir()] == ["report.html"]  # no temp file left behind
    return out.read_text(encoding="utf-8")


def _without_bundle(text: str) -> str:
    return text.replace(BUNDLE, "")


def _figures(text: str) -> dict[str, dict]:
    """Every figure of the page, by the id of the element it is drawn into, from its JSON data block."""
    blocks = re.findall(r'<script type="application/json" data-figure="([^"]+)">(.*?)</script>', text, re.DOTALL)
    return {element: json.loads(spec) for element, spec in blocks}


def _trace_names(text: str) -> set[str]:
    """Legend names of every trace in the figures' JSON."""
    return {trace["name"] for figure in _figures(text).values() for trace in figure["data"] if "name" in trace}


def test_plotly_bundle_embedded_exactly_once_in_head(page):
    assert page.count(BUNDLE_ID) == 1
    assert page.index(BUNDLE_ID) < page.index("</head>")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")


def test_no_external_references(page):
    rest = _without_bundle(page)
    assert "https://cdn" not in rest and "http://" not in rest and "https://" not in rest
    assert "<script src=" not in page
    assert all("src=" not in tag for tag in re.findall(r"<script[^>]*>", page))


def test_one_plot_div_per_expected_figure(page):
    expected = {
        0: ["trajectory_error-vs-nfe", "frechet_exact-vs-nfe", "recall-vs-nfe", "precision-vs-nfe",
            "seconds-vs-nfe", "pareto", "precision-recall"],            # gmm2d: no FID
        1: ["fid-vs-nfe", "trajectory_error-vs-nfe", "recall-vs-nfe", "precision-vs-nfe", "my_score-vs-nfe",
            "seconds-vs-nfe", "pareto", "precision-recall"],             # tiny-cifar: no exact Fréchet; a plugin's
    }                                                                    # own metric gets its figure
    ids = re.findall(r'<div id="(fig-[^"]+)" class="plotly-graph-div"', page)
    # the figure's position ends its id (slugs of two metric names may coincide)
    named = [re.sub(r"-\d+$", "", element) for element in ids]
    assert sorted(named) == sorted(f"fig-{m}-{name}" for m, names in expected.items() for name in names)
    assert len(set(ids)) == len(ids)


def test_strings_are_escaped_everywhere(page):
    assert EVIL_LABEL not in page and "<img src=x" not in page
    assert html.escape(EVIL_LABEL) in page          # tables
    assert html.escape(EVIL_ERROR) in page          # failed cell's error text
    assert "<b>smoke.toml</b>" not in page and html.escape("<b>smoke.toml</b>") in page
    assert "<i>smoke</i>" not in page and "<h1>Sweep &lt;i&gt;smoke&lt;/i&gt;</h1>" in page
    # Trace names: plotly renders them as HTML-ish text, so they are entity-escaped before JSON encoding.
    assert html.escape(EVIL_LABEL, quote=False) in _trace_names(page)
    assert EVIL_LABEL not in _trace_names(page)


def test_failed_cell_is_in_the_table_not_in_plots(page):
    assert page.count('<tr class="failed">') == 1
    assert "tiny-cifar/" + html.escape(EVIL_LABEL) + "/40/0" in page
    assert '"x":[40' not in page.replace(" ", "")   # budget 40 exists only as a failed cell


def test_sections_per_model_and_provenance(page):
    assert "<h2>Model: gmm2d</h2>" in page and "<h2>Model: tiny-cifar</h2>" in page
    assert "<td>git sha</td><td>abc123</td>" in page
    assert "N = 256 samples per cell" in page and "inception-v3 pool3" in page
    assert "<th>my_score</th>" in page  # extra float metric column shown in the table


def test_best_per_budget_picks_lowest_seed_mean():
    cells = _results()
    best = best_per_budget(cells[cells["model"] == "gmm2d"], "trajectory_error")
    assert best["nfe_budget"].tolist() == [5, 10, 20]
    assert best["label"].tolist() == ["ddim(eta=0.5)", "heun", "heun"]
    assert best["value"].iloc[0] == pytest.approx((0.2 + 0.2 * 1.1) / 2)
    assert best["seeds"].tolist() == [2, 2, 2]


def test_best_per_budget_uses_mean_not_best_seed():
    cells = pd.DataFrame([_cell("m", "a", 5, 0, trajectory_error=0.1), _cell("m", "a", 5, 1, trajectory_error=0.9),
                          _cell("m", "b", 5, 0, trajectory_error=0.4), _cell("m", "b", 5, 1, trajectory_error=0.4)])
    assert best_per_budget(cells, "trajectory_error")["label"].tolist() == ["b"]


def test_best_table_in_report(page):
    gmm = page[page.index("<h2>Model: gmm2d</h2>"):page.index("<h2>Model: tiny-cifar</h2>")]
    table = gmm[gmm.index("Best solver per NFE budget"):gmm.index("All cells")]
    winners = re.findall(r"<tr><td>(\d+)</td><td>([^<]+)</td>", table)
    assert winners == [("5", "ddim(eta=0.5)"), ("10", "heun"), ("20", "heun")]


@pytest.mark.parametrize(
    "times, errors, expected",
    [
        ([1, 2, 3], [3, 2, 1], [0, 1, 2]),                      # all trade off
        ([1, 2, 3], [1, 2, 3], [0]),                            # first dominates all
        ([3, 1, 2, 4], [1, 3, 2, 0.5], [1, 2, 0, 3]),           # unsorted input, ordered by time
        ([1, 1, 2], [2, 1, 1], [1]),                            # equal time: higher error dominated; equal error too
        ([1, 2, 2], [5, 3, 3], [0, 1]),                         # exact duplicate reported once
        ([1, np.nan, 3], [2, 0.1, 1], [0, 2]),                  # NaN ignored
        ([], [], []),
    ],
)
def test_pareto_front(times, errors, expected):
    assert pareto_front(times, errors).tolist() == expected


def test_pareto_front_matches_brute_force():
    rng = np.random.default_rng(0)
    t, e = rng.random(60), rng.random(60)
    dominated = {i for i in range(60) for j in range(60)
                 if t[j] <= t[i] and e[j] <= e[i] and (t[j] < t[i] or e[j] < e[i])}
    assert set(pareto_front(t, e).tolist()) == set(range(60)) - dominated


def _assert_no_plots_but_valid(text: str) -> None:
    assert text.count(BUNDLE_ID) == 1
    assert 'class="plotly-graph-div"' not in text and not _figures(text)
    assert "no completed cells" in text
    assert text.rstrip().endswith("</html>")


def test_empty_dataframe_writes_a_valid_report(tmp_path):
    path = write_report(pd.DataFrame(), tmp_path / "empty.html", title="empty", provenance=None)
    _assert_no_plots_but_valid(path.read_text(encoding="utf-8"))


def test_empty_dataframe_with_columns(tmp_path):
    frame = _results().iloc[0:0]
    path = write_report(frame, tmp_path / "empty.html", title="empty")
    _assert_no_plots_but_valid(path.read_text(encoding="utf-8"))


def test_all_failed_dataframe(tmp_path):
    frame = _results()
    frame["status"], frame["error"] = "failed", "OOM"
    text = write_report(frame, tmp_path / "failed.html", title="failed").read_text(encoding="utf-8")
    _assert_no_plots_but_valid(text)
    assert text.count('<tr class="failed">') == len(frame)


def test_crash_leaves_no_partial_report(tmp_path, monkeypatch):
    out = tmp_path / "report.html"
    out.write_text("old report")

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(report.page.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_report(_results().iloc[:3], out, title="t")
    assert out.read_text() == "old report"
    assert sorted(os.listdir(tmp_path)) == ["report.html"]


def test_several_schedules_get_one_line_each(tmp_path):
    rows = [_cell("m", "euler", b, 0, trajectory_error=1.0 / b) for b in BUDGETS]
    rows += [{**r, "schedule": "logsnr", "key": r["key"] + "/logsnr"} for r in rows]
    frame = pd.DataFrame(rows)
    frame.attrs["metrics"] = METRIC_INFO
    text = write_report(frame, tmp_path / "r.html", title="t").read_text(encoding="utf-8")
    assert _trace_names(text) == {"euler · karras", "euler · logsnr", "Pareto front"}


def test_the_best_per_budget_follows_the_metrics_own_direction():
    # a higher-is-better quality metric (say, class accuracy) ranks the highest mean first
    cells = pd.DataFrame([_cell("m", "a", 5, 0, accuracy=0.9), _cell("m", "b", 5, 0, accuracy=0.7)])
    cells.attrs["metrics"] = {"accuracy": {"title": "accuracy", "better": "higher", "axis": "quality"}}
    assert best_per_budget(cells, "accuracy")["label"].tolist() == ["a"]
    cells.attrs["metrics"] = {"accuracy": {"title": "accuracy", "better": "lower", "axis": "quality"}}
    assert best_per_budget(cells, "accuracy")["label"].tolist() == ["b"]


def test_titles_and_scales_come_from_the_metrics_metadata(tmp_path):
    rows = [_cell("m", "euler", b, 0, sharpness=float(b)) for b in BUDGETS]
    frame = pd.DataFrame(rows)
    frame.attrs["metrics"] = {"sharpness": {"title": "Edge <b>sharpness</b>", "better": "higher", "log_scale": True,
                                            "axis": "quality"}}
    text = write_report(frame, tmp_path / "r.html", title="t").read_text(encoding="utf-8")
    figures = _figures(text)
    assert any(element.startswith("fig-0-pareto-") for element in figures)
    layouts = [figure["layout"] for figure in figures.values()]
    assert "Edge &lt;b&gt;sharpness&lt;/b&gt; vs counted NFE" in [layout["title"]["text"] for layout in layouts]
    # axis titles are escaped like every other plotly text
    assert "Edge &lt;b&gt;sharpness&lt;/b&gt;" in [layout["yaxis"]["title"]["text"] for layout in layouts]
    assert "<b>" not in json.dumps(layouts)
    assert "higher is better" in text
