"""One self-contained HTML report of a sweep: plots, tables and provenance, per model.

The file opens offline: the plotly.js bundle is embedded once in <head> and every figure is a bare <div> plus an
inline script that draws into it. Metrics are not comparable across models, so each model gets its own section.

Every string that reaches the page from a config or a plugin (model names, labels, error text, provenance, the
title) is HTML-escaped, in tables and in plots alike: plotly renders trace names and titles as a small HTML
dialect, so an unescaped ``<a href=...>`` in a solver label would become live markup.
"""

from __future__ import annotations

import base64
import html
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
import plotly.offline
from plotly.colors import qualitative

# Columns every results frame has; any other float column is a plugin's own metric (plotted against NFE on a
# linear axis, and listed in the cells table).
FIXED_COLUMNS = (
    "key", "config_key", "suite", "model", "solver", "label", "schedule", "nfe_budget", "tolerance", "guidance",
    "labels", "seed", "n", "status", "error", "nfe", "model_evals", "seconds", "device", "steps", "batch_size",
    "peak_memory_bytes", "network_precision",
)
# config entries that vary along a series (its x axis and its seeds), or that do not change samples
NOT_SERIES = ("seed", "nfe", "tolerance", "metrics")
KNOWN_METRICS = ("trajectory_error", "fid", "frechet_exact", "kid", "precision", "recall")
# Quality metrics (lower is better) that get a "vs NFE" plot. KID's unbiased estimate can be <= 0: linear y.
QUALITY_PLOTS = (("fid", "FID", True), ("trajectory_error", "trajectory error", True),
                 ("frechet_exact", "exact Fréchet distance", True), ("kid", "KID", False))
METRIC_TITLES = {"trajectory_error": "trajectory error", "fid": "FID", "frechet_exact": "exact Fréchet",
                 "kid": "KID", "precision": "precision", "recall": "recall"}

PALETTE = qualitative.Plotly + qualitative.D3 + qualitative.Dark24
DASHES = ("solid", "dash", "dot", "dashdot", "longdash", "longdashdot")
SYMBOLS = ("circle", "square", "diamond", "triangle-up", "x", "star", "cross", "pentagon")
PLOT_CONFIG = {"displaylogo": False, "responsive": True}


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------

def write_report(
    results: pd.DataFrame,
    out_path: str | Path,
    *,
    title: str,
    provenance: dict[str, str] | None = None,
    sample_grids: Mapping[str, bytes] | None = None,
) -> Path:
    """Write the HTML report of ``results`` (one row per cell) to ``out_path`` atomically; return the path.

    ``provenance`` (git sha, torch version, device, date, suite file, N, feature space, ...) is shown as a table.
    ``sample_grids`` optionally maps a cell key to PNG bytes of a grid of that cell's samples (image models); each
    model's section shows them as a gallery, one per solver and NFE budget.
    """
    frame = _normalize(results)
    page = _render_page(frame, title=title, provenance=provenance or {}, sample_grids=sample_grids or {})
    return _write_atomic(Path(out_path), page)


def pareto_front(times: Sequence[float], errors: Sequence[float]) -> np.ndarray:
    """Indices of the points no other point beats in both time and error, ordered by increasing time.

    A point is dominated when another is at least as fast and at least as accurate, and strictly better in one.
    NaN points never take part. Exact duplicates are reported once (the first in input order).
    """
    t = np.asarray(times, dtype=float)
    e = np.asarray(errors, dtype=float)
    valid = np.flatnonzero(np.isfinite(t) & np.isfinite(e))
    # Sort by time, then error: sweeping left to right, a point is on the front iff it beats every faster one.
    order = valid[np.lexsort((e[valid], t[valid]))]
    front, best = [], np.inf
    for i in order:
        if e[i] < best:
            front.append(i)
            best = e[i]
    return np.asarray(front, dtype=int)


def best_per_budget(cells: pd.DataFrame, metric: str) -> pd.DataFrame:
    """For each NFE budget, the series (label, schedule, ...) with the lowest seed-mean ``metric``.

    ``cells`` are the rows of one model; failed cells are ignored. Columns of the answer: nfe_budget, label,
    schedule, series, value, nfe (mean counted NFE), seeds.
    """
    agg = _aggregate(_with_series(_done(_normalize(cells))), [metric])
    agg = agg.dropna(subset=[metric]).sort_values(["nfe_budget", metric, "series"], kind="stable")
    best = agg.groupby("nfe_budget", sort=True).head(1)
    return best.rename(columns={metric: "value"})[
        ["nfe_budget", "label", "schedule", "series", "value", "nfe", "seeds"]].reset_index(drop=True)


# ----------------------------------------------------------------------------------------------------------------
# Data preparation
# ----------------------------------------------------------------------------------------------------------------

def _normalize(results: pd.DataFrame) -> pd.DataFrame:
    """A copy with every fixed and known-metric column present and metrics numeric (None -> NaN)."""
    frame = results.copy()
    for column in FIXED_COLUMNS + KNOWN_METRICS:
        if column not in frame.columns:
            frame[column] = np.nan
    numeric = ["nfe_budget", "tolerance", "guidance", "seed", "n", "nfe", "model_evals", "seconds", *KNOWN_METRICS]
    for column in numeric:
        frame[column] = pd.to_numeric(frame[column], errors="coerce")
    for column in ("model", "label", "schedule"):
        frame[column] = frame[column].fillna("?").astype(str)
    return frame


def _extra_metrics(frame: pd.DataFrame) -> list[str]:
    """Float columns that are neither fixed nor known metrics: plugins' own metrics."""
    known = set(FIXED_COLUMNS) | set(KNOWN_METRICS)
    return [c for c in frame.columns if c not in known and pd.api.types.is_float_dtype(frame[c])]


def _done(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame["status"] == "done"]


def _has(frame: pd.DataFrame, column: str) -> bool:
    return column in frame.columns and bool(frame[column].notna().any())


def _with_series(done: pd.DataFrame) -> pd.DataFrame:
    """Add the plot-line id: the label, plus schedule / guidance only when they vary within the model.

    A series is one config but for its seeds and budgets: rows whose configs differ otherwise (say, two sample
    counts left in a store by an edited suite) never share a line or a mean, and their names say how they differ.
    """
    done = done.copy()
    name = done["label"]
    if done["schedule"].nunique() > 1:
        name = name + " · " + done["schedule"]
    if done["guidance"].nunique(dropna=False) > 1:
        name = name + " · " + done["guidance"].map(lambda g: "no guidance" if pd.isna(g) else f"w={g:g}")
    if "network_precision" in done.columns and done["network_precision"].nunique() > 1:
        name = name + " · " + done["network_precision"].astype(str)
    done["series"] = name
    if "config" in done.columns and not done.empty:
        configs = [_series_config(text) for text in done["config"]]
        identities = pd.Series([json.dumps(c, sort_keys=True, default=str) for c in configs], index=done.index)
        for series, rows in done.groupby("series"):
            distinct = identities[rows.index].unique()
            if len(distinct) > 1:
                parsed = [json.loads(identity) for identity in distinct]
                for identity, config in zip(distinct, parsed):
                    differing = {k: v for k, v in config.items() if any(other.get(k) != v for other in parsed)}
                    suffix = ", ".join(f"{k}={json.dumps(v, sort_keys=True)}" for k, v in sorted(differing.items()))
                    done.loc[rows.index[identities[rows.index] == identity], "series"] = f"{series} [{suffix}]"
    done["guidance_key"] = done["guidance"].fillna(-np.inf)  # groupby keys must not drop NaN guidance
    return done


def _series_config(text: object) -> dict:
    config = json.loads(text) if isinstance(text, str) else {}
    return {key: value for key, value in config.items() if key not in NOT_SERIES}


def _aggregate(done: pd.DataFrame, value_columns: Sequence[str]) -> pd.DataFrame:
    """Mean and std over seeds per (series, nfe_budget); x of a point is the mean counted NFE."""
    columns = list(dict.fromkeys(value_columns))
    keys = ["series", "label", "schedule", "guidance_key", "nfe_budget", "tolerance"]
    if done.empty:
        return pd.DataFrame(columns=[*keys, "nfe", "seeds", *columns, *(f"{c}_std" for c in columns)])
    groups = done.groupby(keys, sort=True, dropna=False)
    mean = groups[["nfe", *columns]].mean()
    std = groups[columns].std(ddof=1).add_suffix("_std")  # NaN for a single seed: no error bar
    seeds = groups.size().rename("seeds")
    return pd.concat([mean, std, seeds], axis=1).reset_index()


# ----------------------------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Style:
    color: str
    dash: str
    symbol: str


def _styles(agg: pd.DataFrame) -> dict[str, Style]:
    """Colour per label (stable across a model's figures), dash per schedule, marker per guidance."""
    labels = sorted(agg["label"].unique())
    schedules = sorted(agg["schedule"].unique())
    guidances = sorted(agg["guidance_key"].unique())
    styles = {}
    for row in agg.drop_duplicates("series").itertuples():
        styles[row.series] = Style(
            color=PALETTE[labels.index(row.label) % len(PALETTE)],
            dash=DASHES[schedules.index(row.schedule) % len(DASHES)],
            symbol=SYMBOLS[guidances.index(row.guidance_key) % len(SYMBOLS)],
        )
    return styles


def _plot_text(text: str) -> str:
    """Plotly renders names and titles as pseudo-HTML; escaping shows markup as literal text instead."""
    return html.escape(str(text), quote=False)


def _error_bars(points: pd.DataFrame, column: str) -> dict | None:
    std = points.get(f"{column}_std")
    if std is None or not std.notna().any():
        return None
    return {"type": "data", "array": std.fillna(0).tolist(), "visible": True, "thickness": 1}


def _new_figure(title: str, x_title: str, y_title: str, *, log_x: bool, log_y: bool) -> go.Figure:
    fig = go.Figure()
    fig.update_layout(
        title=_plot_text(title), template="plotly_white", height=420, margin={"l": 60, "r": 20, "t": 50, "b": 50},
        legend={"font": {"size": 11}},
    )
    fig.update_xaxes(title_text=x_title, type="log" if log_x else "linear")
    fig.update_yaxes(title_text=y_title, type="log" if log_y else "linear")
    return fig


def _series_traces(fig: go.Figure, agg: pd.DataFrame, styles: dict[str, Style], x: str, y: str,
                   *, mode: str = "lines+markers", error_bars: bool = True) -> go.Figure:
    """One trace per series, points sorted by x, NaN points dropped."""
    for series, points in agg.groupby("series", sort=True):
        points = points.dropna(subset=[x, y]).sort_values(x)
        if points.empty:
            continue
        style = styles[series]
        fig.add_trace(go.Scatter(
            x=points[x], y=points[y], mode=mode, name=_plot_text(series), legendgroup=_plot_text(series),
            line={"color": style.color, "dash": style.dash},
            marker={"color": style.color, "symbol": style.symbol, "size": 7},
            error_y=_error_bars(points, y) if error_bars else None,
            text=[f"NFE {v:g}" for v in points["nfe"]], hovertemplate="%{text}<br>x=%{x:.4g}<br>y=%{y:.4g}",
        ))
    return fig


def _vs_nfe(agg: pd.DataFrame, styles: dict[str, Style], metric: str, y_title: str, *,
            log_y: bool) -> go.Figure:
    fig = _new_figure(f"{y_title} vs counted NFE", "counted NFE", y_title, log_x=True, log_y=log_y)
    return _series_traces(fig, agg, styles, "nfe", metric)


def _pareto_figure(agg: pd.DataFrame, styles: dict[str, Style], metric: str) -> go.Figure:
    """Quality vs wall-clock, each series as markers, plus the front of all of them as a step line."""
    y_title = METRIC_TITLES[metric]
    fig = _new_figure(f"{y_title} vs wall-clock (Pareto front)", "wall-clock per cell [s]", y_title,
                      log_x=True, log_y=True)
    _series_traces(fig, agg, styles, "seconds", metric, mode="markers", error_bars=False)
    points = agg.dropna(subset=["seconds", metric]).reset_index(drop=True)
    front = points.iloc[pareto_front(points["seconds"], points[metric])]
    if not front.empty:
        fig.add_trace(go.Scatter(
            x=front["seconds"], y=front[metric], mode="lines+markers", name="Pareto front", line_shape="hv",
            line={"color": "black", "width": 1.5}, marker={"color": "rgba(0,0,0,0)", "size": 13,
                                                             "line": {"color": "black", "width": 1.5}},
            text=[_plot_text(f"{s} @ NFE {n:g}") for s, n in zip(front["series"], front["nfe"])],
            hovertemplate="%{text}<br>%{x:.3g} s<br>%{y:.4g}<extra>Pareto front</extra>",
        ))
    return fig


def _precision_recall(agg: pd.DataFrame, styles: dict[str, Style]) -> go.Figure:
    fig = _new_figure("precision vs recall", "recall", "precision", log_x=False, log_y=False)
    fig.update_xaxes(range=[-0.02, 1.02])
    fig.update_yaxes(range=[-0.02, 1.02])
    return _series_traces(fig, agg, styles, "recall", "precision", mode="markers", error_bars=False)


def _guidance_varies(done: pd.DataFrame) -> bool:
    return done["guidance"].dropna().nunique() > 1


def _fid_vs_guidance(done: pd.DataFrame, styles: dict[str, Style]) -> go.Figure:
    """FID against the guidance scale, one line per solver at its largest NFE budget."""
    fig = _new_figure("FID vs guidance (each solver at its largest NFE budget)", "guidance scale w", "FID",
                      log_x=False, log_y=True)
    guided = done.dropna(subset=["guidance", "fid"])
    for (label, schedule), cells in guided.groupby(["label", "schedule"], sort=True):
        top = cells[cells["nfe_budget"] == cells["nfe_budget"].max()]
        points = top.groupby("guidance", sort=True)["fid"].mean()
        name = label if done["schedule"].nunique() == 1 else f"{label} · {schedule}"
        style = styles.get(next(iter(top["series"])), None)
        fig.add_trace(go.Scatter(x=points.index, y=points.values, mode="lines+markers", name=_plot_text(name),
                                 line={"color": style.color} if style else None,
                                 hovertemplate="w=%{x:g}<br>FID %{y:.4g}<extra></extra>"))
    return fig


def _precision_recall_by_guidance(agg: pd.DataFrame) -> go.Figure:
    """Every (solver, NFE, guidance) point, coloured by its guidance scale: the fidelity/diversity trade-off."""
    fig = _new_figure("precision vs recall, coloured by guidance", "recall", "precision", log_x=False, log_y=False)
    fig.update_xaxes(range=[-0.02, 1.02])
    fig.update_yaxes(range=[-0.02, 1.02])
    points = agg.dropna(subset=["precision", "recall"])
    points = points[np.isfinite(points["guidance_key"])]
    fig.add_trace(go.Scatter(
        x=points["recall"], y=points["precision"], mode="markers", name="cells",
        marker={"color": points["guidance_key"], "colorscale": "Viridis", "showscale": True, "size": 9,
                "colorbar": {"title": "w"}},
        text=[_plot_text(f"{s} @ NFE {n:g}") for s, n in zip(points["series"], points["nfe"])],
        hovertemplate="%{text}<br>recall %{x:.3f}, precision %{y:.3f}<extra></extra>"))
    return fig


def _figures(agg: pd.DataFrame, styles: dict[str, Style],
             extra_metrics: Sequence[str] = ()) -> list[tuple[str, go.Figure]]:
    """The model's figures as (id suffix, figure); a figure whose metric was never computed is left out."""
    figures = [(f"{metric}-vs-nfe", _vs_nfe(agg, styles, metric, title, log_y=log_y))
               for metric, title, log_y in QUALITY_PLOTS if _has(agg, metric)]
    figures += [(f"{metric}-vs-nfe", _vs_nfe(agg, styles, metric, metric.replace("_", " "), log_y=False))
                for metric in ("recall", "precision", *extra_metrics) if _has(agg, metric)]
    if _has(agg, "seconds"):
        figures.append(("seconds-vs-nfe", _vs_nfe(agg, styles, "seconds", "wall-clock per cell [s]", log_y=False)))
    pareto_metric = next((m for m in ("fid", "trajectory_error") if _has(agg, m)), None)
    if pareto_metric and _has(agg, "seconds"):
        figures.append(("pareto", _pareto_figure(agg, styles, pareto_metric)))
    if _has(agg, "precision") and _has(agg, "recall"):
        figures.append(("precision-recall", _precision_recall(agg, styles)))
    return figures


def _figure_html(fig: go.Figure, div_id: str) -> str:
    # Fixed div ids keep the report reproducible (plotly would otherwise pick random ones).
    return pio.to_html(fig, full_html=False, include_plotlyjs=False, div_id=div_id, config=PLOT_CONFIG)


# ----------------------------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------------------------

def _fmt(value: object) -> str:
    """Cell text: blanks for missing, 4 significant digits for floats, integers without '.0'."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "–"
    if isinstance(value, (float, np.floating)):
        return f"{value:.0f}" if float(value).is_integer() and abs(value) < 1e15 else f"{value:.4g}"
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[object]],
           row_classes: Sequence[str] | None = None) -> str:
    """A plain HTML table; every cell and header is escaped."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{html.escape(row_classes[i])}"' if row_classes and row_classes[i] else ""
        cells = "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row)
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _best_table(cells: pd.DataFrame) -> str:
    metric = next((m for m in ("trajectory_error", "fid") if _has(_done(cells), m)), None)
    if metric is None:
        return "<p>No quality metric (trajectory error or FID) was computed for this model.</p>"
    best = best_per_budget(cells, metric)
    rows = [[r.nfe_budget, r.label, r.schedule, r.value, r.nfe, r.seeds] for r in best.itertuples()]
    header = ["NFE budget", "best label", "schedule", f"{METRIC_TITLES[metric]} (mean)", "counted NFE", "seeds"]
    return _table(header, rows)


def _cells_table(cells: pd.DataFrame) -> str:
    """Every cell of the model, failed ones included with their error text."""
    metrics = [m for m in KNOWN_METRICS if _has(cells, m)] + [m for m in _extra_metrics(cells) if _has(cells, m)]
    columns = ["key", "label", "solver", "schedule", "nfe_budget", "tolerance", "guidance", "seed", "n", "status", "nfe",
               "model_evals", "seconds", "device", *metrics, "error"]
    ordered = cells.sort_values(["label", "schedule", "nfe_budget", "seed"], kind="stable", na_position="last")
    rows = [[_cell_value(row[c]) for c in columns] for _, row in ordered.iterrows()]
    classes = ["failed" if status != "done" else "" for status in ordered["status"]]
    return _table(columns, rows, classes)


def _cell_value(value: object) -> object:
    return None if value is None or (not isinstance(value, str) and pd.isna(value)) else value


def _provenance_table(provenance: Mapping[str, str]) -> str:
    if not provenance:
        return "<p>No provenance was recorded.</p>"
    return _table(["item", "value"], [[k, v] for k, v in provenance.items()])


def _code_table(frame: pd.DataFrame) -> str:
    """Every plugin that computed a row, with its distribution, version and source hash (bench.sweep.provenance)."""
    if "code" not in frame.columns:
        return ""
    rows = set()
    for text in frame["code"].dropna():
        code = json.loads(text) if isinstance(text, str) else text
        harness = code.get("harness") or {}
        if harness:
            rows.add(("harness", "bench", "samplerbench", harness.get("samplerbench"),
                      f"noise {harness.get('noise')}", str(harness.get("sha256", ""))[:16]))
        for role in ("model", "solver", "schedule", "metrics"):
            entries = code.get(role) or []
            for entry in entries if isinstance(entries, list) else [entries]:
                rows.add((role.rstrip("s"), entry.get("name"), entry.get("plugin"), entry.get("distribution"),
                          f"{entry.get('version')} ({entry.get('module')})", str(entry.get("sha256", ""))[:16]))
    if not rows:
        return ""
    header = ["role", "name", "plugin", "distribution", "version (module)", "source sha256"]
    return "<h3>Code</h3>" + _table(header, sorted(rows, key=lambda row: tuple(map(str, row))))


def _conditioning(cells: pd.DataFrame) -> str:
    """Whether the model's samples were conditional, and on which labels: it changes every number."""
    if "labels" not in cells.columns:
        return ""
    kinds = sorted(cells["labels"].dropna().astype(str).unique())
    text = {"none": "unconditional (no labels)",
            "balanced": "conditional, balanced labels (sample i is drawn for class i mod the number of classes)"}
    described = "; ".join(text.get(kind, kind) for kind in kinds) or "not recorded"
    return f'<p class="note">Samples: {html.escape(described)}.</p>'



# ----------------------------------------------------------------------------------------------------------------
# Page
# ----------------------------------------------------------------------------------------------------------------

CSS = """
img.samples { image-rendering: pixelated; width: 128px; height: auto; border: 1px solid #ddd; }
.gallery { overflow-x: auto; } .gallery th { font-weight: normal; font-size: 0.85em; text-align: left; }
body { font-family: system-ui, sans-serif; margin: 1.5em 2em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 2em; }
.figures { display: grid; grid-template-columns: repeat(auto-fill, minmax(520px, 1fr)); gap: 1em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ddd; padding: 0.2em 0.5em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } tr.failed td { background: #fdecea; }
td:last-child { white-space: pre-wrap; max-width: 40em; }
.note { color: #555; } img.samples { max-width: 100%; image-rendering: pixelated; }
"""


def _summary(frame: pd.DataFrame) -> str:
    done = int((frame["status"] == "done").sum())
    failed = len(frame) - done
    text = f"{len(frame)} cells: {done} done, {failed} failed, {frame['model'].nunique()} model(s)."
    if done == 0:
        text += " There are no completed cells, so there is nothing to plot."
    return f"<p>{html.escape(text)}</p>"


def _notes(frame: pd.DataFrame, provenance: Mapping[str, str]) -> str:
    """N per cell and the feature space, which qualify every FID / precision / recall number."""
    parts = []
    sample_counts = sorted({int(n) for n in frame["n"].dropna()})
    if sample_counts:
        parts.append(f"N = {', '.join(map(str, sample_counts))} samples per cell.")
    feature_space = next((provenance[k] for k in ("feature_space", "feature space") if k in provenance), None)
    if feature_space:
        parts.append(f"FID / precision / recall features: {feature_space}.")
    parts.append("Lines show the mean over seeds (error bars: std across seeds); failed cells are not plotted.")
    return f'<p class="note">{html.escape(" ".join(parts))}</p>'


def _image(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img class="samples" alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _sample_gallery(done: pd.DataFrame, sample_grids: Mapping[str, bytes]) -> str:
    """One grid per solver (row) and NFE budget (column), from the first seed of each."""
    cells = done[done["key"].isin(sample_grids.keys())]
    if cells.empty:
        return ""
    cells = cells.sort_values(["seed"], kind="stable").drop_duplicates(["series", "nfe_budget", "tolerance"])
    budgets = sorted(cells["nfe_budget"].dropna().unique())
    header = "".join(f"<th>NFE {int(b)}</th>" for b in budgets)
    rows = []
    for series, row_cells in cells.groupby("series", sort=True):
        by_budget = {b: key for b, key in zip(row_cells["nfe_budget"], row_cells["key"])}
        images = "".join(
            f"<td>{_image(sample_grids[by_budget[b]], f'{series} at NFE {int(b)}') if b in by_budget else ''}</td>"
            for b in budgets)
        rows.append(f"<tr><th>{html.escape(series)}</th>{images}</tr>")
    return (f'<h3>Samples</h3><div class="gallery"><table><tr><th></th>{header}</tr>{"".join(rows)}</table>'
            "</div>")


def _model_section(index: int, model: str, cells: pd.DataFrame, sample_grids: Mapping[str, bytes]) -> str:
    done = _with_series(_done(cells))
    parts = [f'<section id="model-{index}"><h2>Model: {html.escape(model)}</h2>', _conditioning(cells)]
    if done.empty:
        parts.append("<p>No completed cells for this model.</p>")
    else:
        extra_metrics = _extra_metrics(_done(cells))  # before _with_series adds its own float column
        agg = _aggregate(done, ["seconds", *KNOWN_METRICS, *extra_metrics])
        styles = _styles(agg)
        figures = _figures(agg, styles, extra_metrics)
        if _guidance_varies(done) and _has(agg, "precision") and _has(agg, "recall"):
            figures.append(("precision-recall-guidance", _precision_recall_by_guidance(agg)))
        if _guidance_varies(done) and _has(agg, "fid"):
            figures.append(("fid-vs-guidance", _fid_vs_guidance(done, styles)))
        divs = "".join(f"<div>{_figure_html(fig, f'fig-{index}-{name}')}</div>" for name, fig in figures)
        parts.append(f'<div class="figures">{divs}</div>')
    parts.append(_sample_gallery(done, sample_grids))
    parts.append(f"<h3>Best solver per NFE budget</h3>{_best_table(cells)}")
    parts.append(f"<h3>All cells</h3>{_cells_table(cells)}</section>")
    return "".join(parts)


def _toc(models: Sequence[str]) -> str:
    if not models:
        return ""
    items = "".join(f'<li><a href="#model-{i}">{html.escape(m)}</a></li>' for i, m in enumerate(models))
    return f"<ul>{items}</ul>"


def _plotly_script() -> str:
    # "</script" inside the bundle would end the tag early; the bundle has none today, but make sure.
    bundle = plotly.offline.get_plotlyjs().replace("</script", "<\\/script")
    return f'<script type="text/javascript">{bundle}</script>'


def _render_page(frame: pd.DataFrame, *, title: str, provenance: Mapping[str, str],
                 sample_grids: Mapping[str, bytes]) -> str:
    models = sorted(frame["model"].unique())
    sections = "".join(
        _model_section(i, m, frame[frame["model"] == m], sample_grids) for i, m in enumerate(models))
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>{CSS}</style>{_plotly_script()}</head>\n<body>"
        f"<h1>{html.escape(title)}</h1>{_summary(frame)}{_notes(frame, provenance)}{_toc(models)}"
        f"{sections}<h2>Provenance</h2>{_provenance_table(provenance)}{_code_table(frame)}</body></html>\n"
    )


def _write_atomic(path: Path, text: str) -> Path:
    """Write via a temp file in the same directory and rename, so a crash never leaves a partial report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a report is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
