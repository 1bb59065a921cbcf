"""The one definition of a result row: its columns, their SQL types and meaning, and how a cell's outcome becomes
a row. The store creates its table from ``COLUMNS``, ``read_results`` reads them back, and the report knows which
columns are the row's own and which are metrics from here, so a column is declared once.

Metrics are not columns of the table: a row holds them as one JSON object, and ``read_results`` spreads them into
one float column each. Their metadata (title, better, scale, axis) comes from each metric's registration and is
stored beside the rows (bench.sweep.store), so a report needs no plugin to draw them.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the schema itself imports nothing of the harness
    from bench.sweep.cell import Cell


@dataclass(frozen=True)
class Column:
    name: str
    sql: str
    meaning: str


COLUMNS: tuple[Column, ...] = (
    Column("key", "TEXT PRIMARY KEY", "hash of the config and of the code that computed the row"),
    Column("config_key", "TEXT NOT NULL", "hash of the config alone: rows of one config supersede each other"),
    Column("suite", "TEXT NOT NULL", "the suite's name"),
    Column("model", "TEXT NOT NULL", "the model, with its options"),
    Column("solver", "TEXT NOT NULL", "the solver's registered name"),
    Column("label", "TEXT NOT NULL", "the solver as the report names it: one label, one config"),
    Column("schedule", "TEXT NOT NULL", "the sigma schedule, with its options"),
    Column("nfe_budget", "INTEGER", "the NFE budget (none for an adaptive solver)"),
    Column("tolerance", "REAL", "rtol = atol of an adaptive solver"),
    Column("guidance", "REAL", "the guidance scale w (none: no guidance)"),
    Column("labels", "TEXT NOT NULL", "conditioning: 'none' (unconditional) or 'balanced'"),
    Column("seed", "INTEGER NOT NULL", "the seed of the initial noise and of every per-step draw"),
    Column("n", "INTEGER NOT NULL", "samples in the cell"),
    Column("dtype", "TEXT NOT NULL", "the solver state's dtype"),
    Column("network_precision", "TEXT NOT NULL", "the network's arithmetic: fp32, tf32, bf16 or fp16"),
    Column("device", "TEXT NOT NULL", "where the cell ran"),
    Column("status", "TEXT NOT NULL CHECK (status IN ('done', 'failed'))", "done, or failed with the reason"),
    Column("error", "TEXT", "why the cell failed"),
    Column("nfe", "REAL", "denoiser evaluations per sample, as counted (a parallel sampler's work)"),
    Column("rounds", "REAL", "denoiser calls one after another per batch, as counted: the sequential depth that "
                             "sets latency (= nfe for a sequential solver)"),
    Column("model_evals", "REAL", "network evaluations per sample (2 per NFE under classifier-free guidance)"),
    Column("steps", "INTEGER", "steps of the solver's plan"),
    Column("seconds", "REAL", "sampling wall-clock of the cell, warm-up excluded"),
    Column("batch_size", "INTEGER", "the batch actually used"),
    Column("peak_memory_bytes", "INTEGER", "peak device memory while sampling (CUDA only)"),
    Column("fit_key", "TEXT", "a learned schedule's or solver's fit (results/fits/manifest.json), none if not learned"),
    Column("fit_seconds", "REAL", "wall-clock of that fit, once for every cell that shares it"),
    Column("fit_teacher_nfe", "REAL", "teacher denoiser calls per fitting sample in that fit"),
    Column("fit_evaluations", "REAL", "denoiser evaluations (calls x samples) of that fit, teacher included"),
    Column("metrics", "TEXT NOT NULL", "JSON: metric name -> value (null where it does not apply or failed)"),
    Column("metric_errors", "TEXT NOT NULL", "JSON: metric name -> why it failed (a failed metric spares the rest)"),
    Column("config", "TEXT NOT NULL", "JSON: the cell's config"),
    Column("code", "TEXT NOT NULL", "JSON: each plugin that took part, with distribution, version, source hash"),
    Column("environment", "TEXT NOT NULL", "JSON: device, torch, python, platform, git sha, threads"),
    Column("finished_at", "TEXT NOT NULL", "UTC time the row was written"),
)
NAMES = tuple(column.name for column in COLUMNS)
JSON_COLUMNS = ("metrics", "metric_errors", "config", "code", "environment")
MEASURED = ("nfe", "rounds", "model_evals", "steps", "seconds", "batch_size", "peak_memory_bytes")
FIT_COLUMNS = ("fit_key", "fit_seconds", "fit_teacher_nfe", "fit_evaluations")


def create_table_sql(table: str = "cells") -> str:
    columns = ",\n    ".join(f"{column.name} {column.sql}" for column in COLUMNS)
    return f"CREATE TABLE IF NOT EXISTS {table} (\n    {columns}\n)"


def row(cell: "Cell", environment: dict[str, Any], measured: dict[str, Any] | None = None,
        error: str | None = None, fit: dict[str, Any] | None = None) -> dict[str, Any]:
    """The row of a cell: done with its measured values, or failed with the reason (``error``); ``fit``: the
    fitting-cost columns of a learned cell (bench.sweep.fits.Fit.columns)."""
    if (measured is None) == (error is None):
        raise ValueError("a row is either measured or failed")
    values = {
        "key": cell.key, "config_key": cell.config_key, "suite": cell.suite, "model": cell.model.describe(),
        "solver": cell.solver.name, "label": cell.solver.describe(), "schedule": cell.schedule.describe(),
        "nfe_budget": cell.nfe, "tolerance": cell.tolerance, "guidance": cell.guidance, "labels": cell.labels,
        "seed": cell.seed, "n": cell.n, "dtype": cell.dtype, "network_precision": cell.precision,
        "device": cell.device, "config": cell.config(), "code": json.loads(cell.code), "environment": environment,
        "status": "done" if error is None else "failed", "error": error, "metrics": {}, "metric_errors": {},
        **{name: None for name in MEASURED}, **{name: (fit or {}).get(name) for name in FIT_COLUMNS},
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if measured is not None:
        values.update({name: measured[name] for name in (*MEASURED, "metrics", "metric_errors")})
    return values
