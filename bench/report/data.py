"""The report's data: rows shaped into series (one config but for its seeds and budgets), means and 95% t-intervals
over seeds, the best series per budget, and the Pareto front. Which columns are the row's own comes from
bench.sweep.schema; what each metric is (title, direction, scale, trilemma axis) from its registration, kept in
the store beside the rows (read_results puts it in ``frame.attrs["metrics"]``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.stats

from bench.sweep.schema import NAMES

# config entries that vary along a series (its x axis and its seeds), or that do not change samples
NOT_SERIES = ("seed", "nfe", "tolerance", "metrics")
NUMERIC = ("nfe_budget", "tolerance", "guidance", "seed", "n", "nfe", "rounds", "model_evals", "seconds")


@dataclass(frozen=True)
class MetricInfo:
    name: str
    title: str
    better: str = "lower"
    log_scale: bool = False
    axis: str = "other"  # quality, fidelity, diversity or other (bench.measure.metrics.Metric)
    description: str = ""

    @property
    def ascending(self) -> bool:
        return self.better == "lower"


def metric_infos(results: pd.DataFrame) -> dict[str, MetricInfo]:
    """Every metric column of ``results`` with its metadata, in the order the store lists them; a float column
    that is not one of the row's own and has no metadata is a metric drawn with neutral defaults."""
    declared: Mapping[str, Mapping] = results.attrs.get("metrics", {})
    infos = {name: MetricInfo(name=name, **{key: value for key, value in info.items()
                                             if key in MetricInfo.__dataclass_fields__ and key != "name"})
             for name, info in declared.items() if name in results.columns}
    for column in results.columns:
        if column not in NAMES and column not in infos and pd.api.types.is_float_dtype(results[column]):
            infos[column] = MetricInfo(name=column, title=column.replace("_", " "))
    return infos


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


def best_per_budget(cells: pd.DataFrame, metric: str, infos: Mapping[str, MetricInfo] | None = None
                    ) -> pd.DataFrame:
    """For each NFE budget, the series (label, schedule, ...) with the best seed-mean ``metric``, in the metric's
    own direction (its ``better``; default lower).

    ``cells`` are the rows of one model; failed cells are ignored. Columns of the answer: nfe_budget, label,
    schedule, series, value, ci (the 95% t-interval's half width; NaN for one seed), nfe (mean counted NFE), seeds.
    """
    infos = metric_infos(cells) if infos is None else infos
    ascending = infos[metric].ascending if metric in infos else True
    agg = aggregate(with_series(done(normalize(cells, infos))), [metric])
    agg = agg.dropna(subset=[metric]).sort_values(["nfe_budget", metric, "series"], kind="stable",
                                                   ascending=[True, ascending, True])
    best = agg.groupby("nfe_budget", sort=True).head(1)
    return best.rename(columns={metric: "value", f"{metric}_ci": "ci"})[
        ["nfe_budget", "label", "schedule", "series", "value", "ci", "nfe", "seeds"]].reset_index(drop=True)


def normalize(results: pd.DataFrame, infos: Mapping[str, MetricInfo]) -> pd.DataFrame:
    """A copy with every row column present and the numeric ones and the metrics numeric (None -> NaN)."""
    frame = results.copy()
    for column in (*NAMES, *infos):
        if column not in frame.columns:
            frame[column] = np.nan
    for column in (*NUMERIC, *infos):
        frame[column] = pd.to_numeric(frame[column], errors="coerce")
    for column in ("model", "label", "schedule"):
        frame[column] = frame[column].fillna("?").astype(str)
    return frame


def done(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame["status"] == "done"]


def has(frame: pd.DataFrame, column: str) -> bool:
    return column in frame.columns and bool(frame[column].notna().any())


def with_series(rows: pd.DataFrame) -> pd.DataFrame:
    """Add the plot-line id: the label, plus schedule / guidance only when they vary within the model.

    A series is one config but for its seeds and budgets: rows whose configs differ otherwise (say, two sample
    counts left in a store by an edited suite) never share a line or a mean, and their names say how they differ.
    """
    frame = rows.copy()
    name = frame["label"]
    if frame["schedule"].nunique() > 1:
        name = name + " · " + frame["schedule"]
    if frame["guidance"].nunique(dropna=False) > 1:
        name = name + " · " + frame["guidance"].map(lambda g: "no guidance" if pd.isna(g) else f"w={g:g}")
    if "network_precision" in frame.columns and frame["network_precision"].nunique() > 1:
        name = name + " · " + frame["network_precision"].astype(str)
    frame["series"] = name
    if "config" in frame.columns and not frame.empty:
        configs = [series_config(text) for text in frame["config"]]
        identities = pd.Series([json.dumps(c, sort_keys=True, default=str) for c in configs], index=frame.index)
        for series, members in frame.groupby("series"):
            distinct = identities[members.index].unique()
            if len(distinct) > 1:
                parsed = [json.loads(identity) for identity in distinct]
                for identity, config in zip(distinct, parsed):
                    differing = {k: v for k, v in config.items() if any(other.get(k) != v for other in parsed)}
                    suffix = ", ".join(f"{k}={json.dumps(v, sort_keys=True)}" for k, v in sorted(differing.items()))
                    chosen = members.index[identities[members.index] == identity]
                    frame.loc[chosen, "series"] = f"{series} [{suffix}]"
    frame["guidance_key"] = frame["guidance"].fillna(-np.inf)  # groupby keys must not drop NaN guidance
    return frame


def series_config(text: object) -> dict:
    config = json.loads(text) if isinstance(text, str) else {}
    return {key: value for key, value in config.items() if key not in NOT_SERIES}


CONFIDENCE = 0.95


def t_half_width(std: pd.Series | np.ndarray, count: pd.Series | np.ndarray,
                 confidence: float = CONFIDENCE) -> np.ndarray:
    """Half the width of Student's t confidence interval for a mean of ``count`` seeds with sample standard
    deviation ``std``: t_{(1 + confidence) / 2, count - 1} * std / sqrt(count). NaN for fewer than 2 seeds: one
    seed says nothing about the spread, and no interval is shown."""
    std, count = np.asarray(std, dtype=float), np.asarray(count, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        quantile = scipy.stats.t.ppf((1 + confidence) / 2, np.where(count >= 2, count - 1, np.nan))
        return np.where(count >= 2, quantile * std / np.sqrt(count), np.nan)


def aggregate(finished: pd.DataFrame, value_columns: Sequence[str]) -> pd.DataFrame:
    """Mean, std and the 95% t-interval's half width (``_std``, ``_ci``) over seeds per (series, nfe_budget); x of a
    point is the mean counted NFE. Each column's interval counts the seeds that have a value of it."""
    columns = list(dict.fromkeys(value_columns))
    keys = ["series", "label", "schedule", "guidance_key", "nfe_budget", "tolerance"]
    if finished.empty:
        return pd.DataFrame(columns=[*keys, "nfe", "seeds", *columns, *(f"{c}_std" for c in columns),
                                     *(f"{c}_ci" for c in columns)])
    groups = finished.groupby(keys, sort=True, dropna=False)
    mean = groups[["nfe", *columns]].mean()
    std = groups[columns].std(ddof=1)  # NaN for a single seed
    counts = groups[columns].count()
    ci = pd.DataFrame(t_half_width(std, counts), index=std.index, columns=columns).add_suffix("_ci")
    seeds = groups.size().rename("seeds")
    return pd.concat([mean, std.add_suffix("_std"), ci, seeds], axis=1).reset_index()


