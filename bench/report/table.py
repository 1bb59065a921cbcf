"""Tables for papers: one metric, a row per series, a column per NFE budget (or guidance scale), each cell the mean
over seeds +- the 95% Student t confidence interval's half width, the best of each column marked.

    samplerbench table results/zoo.sqlite --metric fid --by nfe --format markdown|latex|csv

The best of a column is the best mean in the metric's own direction (its registration's ``better``); a series
measured with one seed has no interval and says so. Markdown and LaTeX mark the best in bold; CSV is long (one
line per series and column, with mean, half width, seeds and a ``best`` flag), for a spreadsheet or a plot.
Cells without a value of the column (an adaptive solver has no NFE budget) and failed cells are left out.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Mapping

import numpy as np
import pandas as pd

from bench.errors import BenchError
from bench.report.data import CONFIDENCE, MetricInfo, done, metric_infos, normalize, t_half_width, with_series

BY = {"nfe": ("nfe_budget", "NFE"), "guidance": ("guidance", "w")}
FORMATS = ("markdown", "latex", "csv")


def metric_table(results: pd.DataFrame, metric: str, *, by: str = "nfe", fmt: str = "markdown",
                 model: str | None = None) -> str:
    """The table of ``metric`` for every model of ``results`` (or ``model`` alone), one after the other."""
    infos = metric_infos(results)
    if metric not in infos:
        raise BenchError(f"no metric {metric!r} in these results (metrics: {', '.join(infos) or 'none'})")
    if by not in BY:
        raise BenchError(f"--by must be one of {', '.join(BY)}; got {by!r}")
    if fmt not in FORMATS:
        raise BenchError(f"--format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    frame = normalize(results, infos)
    models = sorted(frame["model"].unique())
    if model is not None:
        if model not in models:
            raise BenchError(f"no model {model!r} in these results (models: {', '.join(models) or 'none'})")
        models = [model]
    grids = {name: _grid(frame[frame["model"] == name], infos[metric], BY[by][0]) for name in models}
    if fmt == "csv":
        return _csv(grids, infos[metric], by)
    render = _markdown if fmt == "markdown" else _latex
    return "\n".join(render(name, grid, infos[metric], BY[by][1]) for name, grid in grids.items()
                     if not grid.empty)


def _grid(cells: pd.DataFrame, info: MetricInfo, column: str) -> pd.DataFrame:
    """One line per (series, column value): mean, ci, seeds, and whether it is the best mean of its column."""
    finished = done(cells).dropna(subset=[column, info.name])
    if column == "guidance":  # the guidance scale is the table's columns, not part of a series' name
        named = with_series(finished.drop(columns="config").assign(guidance=np.nan))
        named["guidance"] = finished["guidance"]
    else:
        named = with_series(finished)
    if named.empty:
        return pd.DataFrame(columns=["series", "column", "mean", "std", "seeds", "ci", "best"])
    agg = (named.groupby(["series", column], sort=True)[info.name].agg(["mean", "std", "count"]).reset_index()
           .rename(columns={column: "column", "count": "seeds"}))
    agg["ci"] = t_half_width(agg["std"], agg["seeds"])
    best = agg.groupby("column")["mean"].transform("min" if info.ascending else "max")
    agg["best"] = agg["mean"] == best
    return agg


def _cell(mean: float, ci: float) -> str:
    if pd.isna(mean):
        return ""
    text = f"{mean:.4g}"
    return f"{text} (1 seed)" if pd.isna(ci) else f"{text} ± {ci:.2g}"


def _number(value: float) -> str:
    return f"{value:g}"


def _caption(info: MetricInfo) -> str:
    arrow = "lower" if info.ascending else "higher"
    return (f"{info.title}: mean ± {CONFIDENCE:.0%} t-interval over seeds ({arrow} is better; best of each column "
            "in bold)")


def _markdown(model: str, grid: pd.DataFrame, info: MetricInfo, unit: str) -> str:
    columns = sorted(grid["column"].unique())
    lines = [f"### {_md(model)}", "", _md(_caption(info)), "",
             "| series | " + " | ".join(f"{unit} {_number(c)}" for c in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for series, points in grid.groupby("series", sort=True):
        by_column = {row.column: row for row in points.itertuples()}
        cells = []
        for column in columns:
            row = by_column.get(column)
            text = _cell(row.mean, row.ci) if row is not None else ""
            cells.append(f"**{text}**" if row is not None and row.best else text)
        lines.append(f"| {_md(series)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _md(text: str) -> str:
    """Markdown table text: pipes and the characters that start emphasis or markup are escaped."""
    return re.sub(r"([\\|*_`<>\[\]])", r"\\\1", str(text))


LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                 "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def _tex(text: str) -> str:
    return "".join(LATEX_ESCAPES.get(character, character) for character in str(text))


def _latex(model: str, grid: pd.DataFrame, info: MetricInfo, unit: str) -> str:
    columns = sorted(grid["column"].unique())
    lines = [r"\begin{table}", r"\centering",
             rf"\caption{{{_tex(model)}. {_tex(_caption(info))}}}",
             r"\begin{tabular}{l" + "r" * len(columns) + "}", r"\toprule",
             "series & " + " & ".join(f"{_tex(unit)} {_number(c)}" for c in columns) + r" \\", r"\midrule"]
    for series, points in grid.groupby("series", sort=True):
        by_column = {row.column: row for row in points.itertuples()}
        cells = []
        for column in columns:
            row = by_column.get(column)
            if row is None or pd.isna(row.mean):
                cells.append("")
                continue
            text = f"{row.mean:.4g}" + (r" {\small (1 seed)}" if pd.isna(row.ci) else rf" $\pm$ {row.ci:.2g}")
            cells.append(rf"\textbf{{{text}}}" if row.best else text)
        lines.append(f"{_tex(series)} & " + " & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def _csv(grids: Mapping[str, pd.DataFrame], info: MetricInfo, by: str) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["model", "series", by, "metric", "mean", f"ci{round(CONFIDENCE * 100)}_half_width", "seeds",
                     "best"])
    for model, grid in grids.items():
        for row in grid.itertuples():
            writer.writerow([model, row.series, _number(row.column), info.name, repr(float(row.mean)),
                             "" if pd.isna(row.ci) else repr(float(row.ci)), row.seeds, bool(row.best)])
    return buffer.getvalue()
