"""The report's figures, one plotly figure each, drawn from the aggregated series of one model. Which metric goes
where follows its metadata (bench.report.data.MetricInfo): every metric against counted NFE, on a log axis when it
spans decades; the headline quality metric against wall-clock with the Pareto front; fidelity against diversity
(precision against recall); when guidance varies, both against the guidance scale; and, when a parallel sampler
took part (its rounds, the model calls one after another, are fewer than its NFE), the headline quality metric
against rounds and against wall-clock, each series a line over its budgets, parallel samplers next to their
sequential bases.

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
    """The 95% t-interval over seeds (bench.report.data.aggregate); a point of one seed has none."""
    ci = points.get(f"{column}_ci")
    if ci is None or not ci.notna().any():
        return None
    return {"type": "data", "array": ci.fillna(0).tolist(), "visible": True, "thickness": 1}


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


MAX_TICKS = 12


def nfe_ticks(budgets: Sequence[float]) -> list[int]:
    """Ticks of an NFE axis at the budgets swept (a log axis of its own ticks "3 4 5 ... 10 2 3 4 5" for 30-50);
    of more than MAX_TICKS, ones evenly spaced in log NFE, the smallest and largest always among them."""
    values = sorted({int(b) for b in budgets if np.isfinite(b) and b > 0})
    if len(values) <= MAX_TICKS:
        return values
    logs = np.log(values)
    targets = np.linspace(logs[0], logs[-1], MAX_TICKS)
    return sorted({values[int(np.abs(logs - target).argmin())] for target in targets})


def _tick_nfe(fig: go.Figure, agg: pd.DataFrame) -> go.Figure:
    ticks = nfe_ticks(agg["nfe_budget"].dropna().tolist()) or nfe_ticks(agg["nfe"].dropna().round().tolist())
    if ticks:
        fig.update_xaxes(tickmode="array", tickvals=ticks, ticktext=[str(t) for t in ticks], minor={"ticks": ""})
    return fig


def _vs_nfe(agg: pd.DataFrame, styles: dict[str, Style], metric: str, y_title: str, *,
            log_y: bool) -> go.Figure:
    fig = _new_figure(f"{y_title} vs counted NFE", "counted NFE", y_title, log_x=True, log_y=log_y)
    return _tick_nfe(_series_traces(fig, agg, styles, "nfe", metric), agg)


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


def _vs_depth(agg: pd.DataFrame, styles: dict[str, Style], info: MetricInfo, x: str, x_title: str) -> go.Figure:
    fig = _new_figure(f"{info.title} vs {x_title}", x_title, info.title, log_x=True, log_y=info.log_scale)
    return _series_traces(fig, agg, styles, x, info.name)


def parallel_present(agg: pd.DataFrame) -> bool:
    """Whether some series made fewer calls one after another than evaluations: a parallel sampler's."""
    return has(agg, "rounds") and bool((agg["rounds"] < agg["nfe"] - 1e-9).any())


# per-cell costs beyond wall-clock, shown on the trilemma's hover where a store has them: a parallel sampler's
# sequential rounds, a learned sampler's fitting cost
HOVER_COSTS = {"rounds": "rounds", "fit_seconds": "fitting s", "fit_teacher_nfe": "fitting teacher NFE"}


def _trilemma(agg: pd.DataFrame, styles: dict[str, Style], quality: MetricInfo, diversity: MetricInfo) -> go.Figure:
    """The three axes at once: quality against wall-clock, diversity as each point's colour, the Pareto front of
    quality and time marked; every (series, budget) a point, its marker the series' symbol."""
    fig = _new_figure(f"{quality.title} vs wall-clock, coloured by {diversity.title}", SECONDS_TITLE, quality.title,
                      log_x=True, log_y=quality.log_scale)
    points = agg.dropna(subset=["seconds", quality.name]).reset_index(drop=True)
    low, high = (0.0, 1.0) if points[diversity.name].dropna().between(0, 1).all() else (None, None)
    costs = [column for column in HOVER_COSTS if has(points, column)]
    for position, (series, group) in enumerate(points.groupby("series", sort=True)):
        style = styles[series]
        hover = []
        for _, row in group.iterrows():  # metric names are any text, not attribute names
            parts = [f"{series} @ NFE {row['nfe']:g}", f"{quality.title} {row[quality.name]:.4g}",
                     f"{diversity.title} {row[diversity.name]:.3g}"]
            parts += [f"{HOVER_COSTS[c]} {row[c]:.4g}" for c in costs if pd.notna(row[c])]
            hover.append("<br>".join(plot_text(part) for part in parts))
        fig.add_trace(go.Scatter(
            x=group["seconds"], y=group[quality.name], mode="markers", name=plot_text(series),
            marker={"color": group[diversity.name].tolist(), "colorscale": "Viridis", "cmin": low, "cmax": high,
                    "symbol": SYMBOLS[position % len(SYMBOLS)], "size": 11,
                    "line": {"color": style.color, "width": 2}, "showscale": position == 0,
                    "colorbar": {"title": {"text": plot_text(diversity.title)}}},
            text=hover, hovertemplate="%{text}<br>%{x:.3g} s<extra></extra>"))
    values = points[quality.name] if quality.ascending else -points[quality.name]
    front = points.iloc[pareto_front(points["seconds"], values)]
    if not front.empty:
        fig.add_trace(go.Scatter(
            x=front["seconds"], y=front[quality.name], mode="lines", name="Pareto front", line_shape="hv",
            line={"color": "black", "width": 1.5, "dash": "dot"}, hoverinfo="skip"))
    fig.update_layout(legend={"x": 1.18})
    return fig


def _fidelity_diversity(agg: pd.DataFrame, styles: dict[str, Style], fidelity: MetricInfo,
                        diversity: MetricInfo) -> go.Figure:
    fig = _new_figure(f"{fidelity.title} vs {diversity.title}", diversity.title, fidelity.title, log_x=False,
                      log_y=False)
    for info, update in ((diversity, fig.update_xaxes), (fidelity, fig.update_yaxes)):
        if agg[info.name].dropna().between(0, 1).all():  # a share (not density, which can pass 1): the unit range
            update(range=[-0.02, 1.02])
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
        if diversity:  # the trilemma: its Pareto front, with diversity as the points' colour
            result.append(("trilemma", _trilemma(agg, styles, quality, diversity)))
        else:
            result.append(("pareto", _pareto_figure(agg, styles, quality)))
    if quality and parallel_present(agg):
        result.append((f"{quality.name}-vs-rounds", _vs_depth(agg, styles, quality, "rounds",
                                                               "rounds (model calls one after another)")))
        if has(agg, "seconds"):
            result.append((f"{quality.name}-vs-seconds", _vs_depth(agg, styles, quality, "seconds", SECONDS_TITLE)))
    # each fidelity metric against its diversity twin, in the store's order (precision-recall, density-coverage)
    pairs = zip((i for i in present if i.axis == "fidelity"), (i for i in present if i.axis == "diversity"))
    result += [(f"{f.name}-{d.name}", _fidelity_diversity(agg, styles, f, d)) for f, d in pairs]
    if done["guidance"].dropna().nunique() > 1:
        if fidelity and diversity:
            result.append(("precision-recall-guidance", _fidelity_diversity_by_guidance(agg, fidelity, diversity)))
        if quality:
            result.append((f"{quality.name}-vs-guidance", _vs_guidance(done, styles, quality)))
    return result

