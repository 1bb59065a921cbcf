"""The report's figures, one plotly figure each, drawn from the aggregated series of one model. Which metric goes
where follows its metadata (bench.report.data.MetricInfo): every metric against counted NFE, on a log axis when it
spans decades; the headline quality metric against wall-clock with the Pareto front; fidelity against diversity
(precision against recall); and, when guidance varies, both against the guidance scale.

Every text of a figure that comes from a store or a plugin (trace names, titles, axis titles, hover text) goes
through bench.report.escape.plot_text, because plotly renders them as a small HTML dialect.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative

from bench.report.data import MetricInfo, has, pareto_front
from bench.report.escape import plot_text

PALETTE = qualitative.Plotly + qualitative.D3 + qualitative.Dark24
DASHES = ("solid", "dash", "dot", "dashdot", "longdash", "longdashdot")
SYMBOLS = ("circle", "square", "diamond", "triangle-up", "x", "star", "cross", "pentagon")
SECONDS_TITLE = "wall-clock per cell [s]"


@dataclass(frozen=True)
class Style:
    color: str
    dash: str
    symbol: str


def styles_for(agg: pd.DataFrame) -> dict[str, Style]:
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


def _error_bars(points: pd.DataFrame, column: str) -> dict | None:
    std = points.get(f"{column}_std")
    if std is None or not std.notna().any():
        return None
    return {"type": "data", "array": std.fillna(0).tolist(), "visible": True, "thickness": 1}


def _new_figure(title: str, x_title: str, y_title: str, *, log_x: bool, log_y: bool) -> go.Figure:
    fig = go.Figure()
    fig.update_layout(
        title=plot_text(title), template="plotly_white", height=420, margin={"l": 60, "r": 20, "t": 50, "b": 50},
        legend={"font": {"size": 11}},
    )
    fig.update_xaxes(title_text=plot_text(x_title), type="log" if log_x else "linear")
    fig.update_yaxes(title_text=plot_text(y_title), type="log" if log_y else "linear")
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
            x=points[x], y=points[y], mode=mode, name=plot_text(series), legendgroup=plot_text(series),
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


def _pareto_figure(agg: pd.DataFrame, styles: dict[str, Style], info: MetricInfo) -> go.Figure:
    """Quality vs wall-clock, each series as markers, plus the front of all of them as a step line."""
    fig = _new_figure(f"{info.title} vs wall-clock (Pareto front)", SECONDS_TITLE, info.title,
                      log_x=True, log_y=info.log_scale)
    _series_traces(fig, agg, styles, "seconds", info.name, mode="markers", error_bars=False)
    points = agg.dropna(subset=["seconds", info.name]).reset_index(drop=True)
    values = points[info.name] if info.ascending else -points[info.name]  # the front minimises both axes
    front = points.iloc[pareto_front(points["seconds"], values)]
    if not front.empty:
        fig.add_trace(go.Scatter(
            x=front["seconds"], y=front[info.name], mode="lines+markers", name="Pareto front", line_shape="hv",
            line={"color": "black", "width": 1.5}, marker={"color": "rgba(0,0,0,0)", "size": 13,
                                                             "line": {"color": "black", "width": 1.5}},
            text=[plot_text(f"{s} @ NFE {n:g}") for s, n in zip(front["series"], front["nfe"])],
            hovertemplate="%{text}<br>%{x:.3g} s<br>%{y:.4g}<extra>Pareto front</extra>",
        ))
    return fig


def _fidelity_diversity(agg: pd.DataFrame, styles: dict[str, Style], fidelity: MetricInfo,
                        diversity: MetricInfo) -> go.Figure:
    fig = _new_figure(f"{fidelity.title} vs {diversity.title}", diversity.title, fidelity.title, log_x=False,
                      log_y=False)
    fig.update_xaxes(range=[-0.02, 1.02])
    fig.update_yaxes(range=[-0.02, 1.02])
    return _series_traces(fig, agg, styles, diversity.name, fidelity.name, mode="markers", error_bars=False)


def _vs_guidance(done: pd.DataFrame, styles: dict[str, Style], info: MetricInfo) -> go.Figure:
    """A metric against the guidance scale, one line per solver at its largest NFE budget."""
    fig = _new_figure(f"{info.title} vs guidance (each solver at its largest NFE budget)", "guidance scale w",
                      info.title, log_x=False, log_y=info.log_scale)
    guided = done.dropna(subset=["guidance", info.name])
    for (label, schedule), cells in guided.groupby(["label", "schedule"], sort=True):
        top = cells[cells["nfe_budget"] == cells["nfe_budget"].max()]
        points = top.groupby("guidance", sort=True)[info.name].mean()
        name = label if done["schedule"].nunique() == 1 else f"{label} · {schedule}"
        style = styles.get(next(iter(top["series"])), None)
        fig.add_trace(go.Scatter(x=points.index, y=points.values, mode="lines+markers", name=plot_text(name),
                                 line={"color": style.color} if style else None,
                                 hovertemplate="w=%{x:g}<br>%{y:.4g}<extra></extra>"))
    return fig


def _fidelity_diversity_by_guidance(agg: pd.DataFrame, fidelity: MetricInfo, diversity: MetricInfo) -> go.Figure:
    """Every (solver, NFE, guidance) point, coloured by its guidance scale: the fidelity/diversity trade-off."""
    fig = _new_figure(f"{fidelity.title} vs {diversity.title}, coloured by guidance", diversity.title,
                      fidelity.title, log_x=False, log_y=False)
    fig.update_xaxes(range=[-0.02, 1.02])
    fig.update_yaxes(range=[-0.02, 1.02])
    points = agg.dropna(subset=[fidelity.name, diversity.name])
    points = points[np.isfinite(points["guidance_key"])]
    fig.add_trace(go.Scatter(
        x=points[diversity.name], y=points[fidelity.name], mode="markers", name="cells",
        marker={"color": points["guidance_key"], "colorscale": "Viridis", "showscale": True, "size": 9,
                "colorbar": {"title": "w"}},
        text=[plot_text(f"{s} @ NFE {n:g}") for s, n in zip(points["series"], points["nfe"])],
        hovertemplate="%{text}<br>x %{x:.3f}, y %{y:.3f}<extra></extra>"))
    return fig


def headline(infos: Mapping[str, MetricInfo], frame: pd.DataFrame, axis: str = "quality") -> MetricInfo | None:
    """The first metric on ``axis`` (in the store's order) that this model has values of."""
    return next((info for info in infos.values() if info.axis == axis and has(frame, info.name)), None)


def figures(agg: pd.DataFrame, done: pd.DataFrame, styles: dict[str, Style],
            infos: Mapping[str, MetricInfo]) -> list[tuple[str, go.Figure]]:
    """The model's figures as (name, figure); a figure whose metric was never computed is left out. Names hold
    metric names as they came from the store: the page slugs them into element ids."""
    present = [info for info in infos.values() if has(agg, info.name)]
    order = {"quality": 0, "diversity": 1, "fidelity": 2, "other": 3}
    result = [(f"{info.name}-vs-nfe", _vs_nfe(agg, styles, info.name, info.title, log_y=info.log_scale))
              for info in sorted(present, key=lambda info: order.get(info.axis, 3))]
    if has(agg, "seconds"):
        result.append(("seconds-vs-nfe", _vs_nfe(agg, styles, "seconds", SECONDS_TITLE, log_y=False)))
    quality, fidelity, diversity = headline(infos, agg), headline(infos, agg, "fidelity"), headline(infos, agg,
                                                                                                     "diversity")
    if quality and has(agg, "seconds"):
        result.append(("pareto", _pareto_figure(agg, styles, quality)))
    if fidelity and diversity:
        result.append(("precision-recall", _fidelity_diversity(agg, styles, fidelity, diversity)))
    if done["guidance"].dropna().nunique() > 1:
        if fidelity and diversity:
            result.append(("precision-recall-guidance", _fidelity_diversity_by_guidance(agg, fidelity, diversity)))
        if quality:
            result.append((f"{quality.name}-vs-guidance", _vs_guidance(done, styles, quality)))
    return result

