"""Suites: a TOML file that expands into cells, model x solver(+options) x schedule x NFE x guidance x seed.

    name = "quick"               # default: the file's stem; letters, digits, '.', '_', '-' (it names the files)
    device = "cpu"               # or "cuda", "cuda:N"; `samplerbench run --device` overrides it
    dtype = "float32"
    n = 1024                     # samples per cell
    seeds = [0]
    nfe = [4, 6, 8, 10, 20, 50]
    schedules = ["karras", { name = "karras", rho = 3 }]
    metrics = ["trajectory_error", "fid", "precision", "recall"]
    guidance = [0.0, 2.0]        # conditional models only; omit for none
    guidance_type = "classifier-free"   # or "classifier" (models that know their noisy-class posterior)
    labels = "none"              # the default: unconditional samples; "balanced": sample i gets class i mod C
                                 # (conditional models only; guidance needs it)
    feature_extractor_weights_path = "..."   # Inception weights, for 3xHxW models without a feature space
    precision = ["fp32", "bf16"]  # the network's arithmetic: fp32, tf32, bf16, fp16 (a list is an axis)
    cuda_graph = true            # capture fixed-step solvers' loops as CUDA graphs (cuda only)
    cell_timeout = 600           # seconds a cell may take before it is stopped and recorded as failed
                                 # (default 3600; `samplerbench run --cell-timeout` overrides)

    [limits]                     # raise the size limits (bench.sweep.validate.Limits), e.g. for a big sweep;
    cells = 20000                # also `samplerbench run --max-cells N` (--max-samples-per-cell, --max-samples,
                                 # --max-nfe); defaults: 10,000 cells, n <= 10**7, 10**8 samples, NFE <= 10,000

    [[models]]
    name = "gmm2d"

    [[solvers]]
    name = "ddim"
    eta = 0.5                    # any other key is a solver option
    label = "ddim-0.5"           # optional: how the report names it (one label, one config)
    nfe = [10, 20]               # optional: this solver's own budgets (likewise `schedules`)

    [[solvers]]
    name = "rk45"                # adaptive solvers sweep tolerances (rtol = atol) instead of NFE budgets
    tolerances = [1e-2, 1e-3, 1e-4]

Parsing checks every name and option without loading a model (bench.sweep.validate: encodings, types, finiteness,
ranges, sizes, devices, empty axes, repeats, options at every level); what needs the model (its classes, its sigma
range) the runner checks when it loads it, before anything runs, so bad input leaves no partial output.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.core.guidance import GUIDANCE_KINDS
from bench.core.sampling import DTYPES, LABEL_CHOICES, PRECISIONS
from bench.core.solver import build_solver
from bench.core.solver import check_options as check_solver_options
from bench.errors import BenchError, unknown_name
from bench.registry import PluginManager, Registration, manager
from bench.sweep import validate as check
from bench.sweep.cell import Cell, Component
from bench.sweep.provenance import canonical_json, component_identity, harness_identity
from bench.sweep.validate import Limits

SUITE_KEYS = {"name", "description", "device", "dtype", "n", "batch_size", "seeds", "nfe", "schedules", "metrics",
              "guidance", "guidance_type", "labels", "models", "solvers", "feature_extractor_weights_path",
              "precision", "cuda_graph", "limits", "cell_timeout"}
SOLVER_AXIS_KEYS = {"name", "label", "nfe", "schedules", "tolerances"}


@dataclass
class Suite:
    name: str
    path: Path | None
    cells: list[Cell]
    description: str = ""
    feature_extractor_weights_path: str | None = None
    cell_timeout: float | None = None  # seconds; None: bench.sweep.timeouts.DEFAULT_CELL_TIMEOUT


def load_suite(path: str | Path, device: str | None = None, plugins: PluginManager | None = None,
               limits: Mapping[str, int] | None = None) -> Suite:
    """The suite in a TOML file, every problem a BenchError naming the file. ``device`` overrides the suite's;
    ``limits`` (e.g. {"cells": 20000}, from the command line) override its ``[limits]``."""
    path = Path(path)
    data = check.read_suite_file(path)
    try:
        return parse_suite(data, default_name=path.stem, device=device, plugins=plugins, path=path, limits=limits)
    except BenchError as error:
        raise BenchError(f"{path}: {error}") from None


@dataclass
class _SolverEntry:
    """One [[solvers]] entry: the solver and what it sweeps."""

    component: Component
    adaptive: bool
    budgets: list[int | None]
    tolerances: list[float | None]
    schedules: list[Component]

    @property
    def settings(self) -> int:
        return len(self.budgets) * len(self.tolerances) * len(self.schedules)


def parse_suite(data: dict[str, Any], *, default_name: str | None = "suite", device: str | None = None,
                plugins: PluginManager | None = None, path: Path | None = None,
                limits: Mapping[str, int] | None = None) -> Suite:
    """The cells of a parsed suite document, each problem a BenchError naming the key (``load_suite`` adds the file).
    ``default_name`` is the file's stem, ``device`` and ``limits`` the command line's overrides."""
    plugins = plugins or manager()
    check.check_tree(data)
    unknown = sorted(set(data) - SUITE_KEYS)
    if unknown:
        raise unknown_name("suite key", unknown[0], SUITE_KEYS)
    bounds = Limits().override(data.get("limits", {}))
    if limits:
        bounds = bounds.override(dict(limits), key="the command line's limits")
    name = check.suite_name(data.get("name"), default_name)
    device = check.device(device, "--device") if device is not None else check.device(data.get("device", "cpu"),
                                                                                        "device")
    dtype = _choice(data.get("dtype", "float32"), "dtype", DTYPES)
    n = check.integer(data.get("n", 1024), "n", low=1)
    if n > bounds.samples_per_cell:
        raise check.over_limit("n (samples per cell)", n, bounds, "samples_per_cell")
    batch_size = (check.integer(data["batch_size"], "batch_size", low=1, high=bounds.samples_per_cell)
                  if "batch_size" in data else None)
    seeds = [check.integer(seed, "seeds", low=0) for seed in check.axis(data.get("seeds", [0]), "seeds")]
    check.no_repeats(seeds, "seeds")
    default_nfe = _budgets(data.get("nfe", [10]), "nfe", bounds)
    default_schedules = _components(check.axis(data.get("schedules", ["karras"]), "schedules"), "schedules",
                                    "schedule", plugins)
    metrics = _metrics(data.get("metrics", []), plugins)
    guidances = _guidances(data.get("guidance"))
    labels = _choice(data.get("labels", "none"), "labels", LABEL_CHOICES, kind="labels choice")
    guidance_type = _choice(data.get("guidance_type", "classifier-free"), "guidance_type", GUIDANCE_KINDS,
                            kind="guidance type")
    precisions = _precisions(data.get("precision", "fp32"))
    cuda_graph = check.boolean(data.get("cuda_graph", False), "cuda_graph")
    if cuda_graph and not device.startswith("cuda"):
        raise BenchError(f"cuda_graph = true needs device = \"cuda\"; got {device!r}")
    weights_path = _weights_path(data.get("feature_extractor_weights_path"))
    cell_timeout = (check.number(data["cell_timeout"], "cell_timeout", low=1e-3, high=30 * 24 * 3600.0)
                    if "cell_timeout" in data else None)
    description = check.string(data.get("description", ""), "description")

    models = _components(check.as_list(data.get("models", []), "models"), "models", "model", plugins)
    solver_tables = check.as_list(data.get("solvers", []), "solvers")
    if not models or not solver_tables:
        raise BenchError("a suite needs at least one [[models]] and one [[solvers]] entry")
    if guidances != [None] and labels == "none":
        raise BenchError("guidance needs labels: set labels = \"balanced\" (the default, \"none\", samples "
                         "unconditionally)")
    # what needs a model (its classes, its sigma range) is checked when the runner loads it, before anything runs
    entries = _solver_entries(solver_tables, default_nfe, default_schedules, bounds, plugins)
    _check_size(bounds, n, {"models": len(models), "solver settings (budgets or tolerances x schedules)":
                            sum(entry.settings for entry in entries), "guidance scales": len(guidances),
                            "precisions": len(precisions), "seeds": len(seeds)})

    cells = []
    for entry in entries:
        for model in models:
            for schedule in entry.schedules:
                code = canonical_json({
                    "harness": harness_identity(), "model": component_identity(plugins, "model", model.name),
                    "solver": component_identity(plugins, "solver", entry.component.name),
                    "schedule": (component_identity(plugins, "schedule", schedule.name)
                                 if not entry.adaptive else None),
                    "metrics": [component_identity(plugins, "metric", metric) for metric in sorted(metrics)]})
                for budget, tolerance in itertools.product(entry.budgets, entry.tolerances):
                    for guidance, precision, seed in itertools.product(guidances, precisions, seeds):
                        cells.append(Cell(name, model, entry.component, schedule, budget, guidance, seed, n, dtype,
                                          device, labels, metrics, batch_size, tolerance,
                                          guidance_type, precision, cuda_graph and not entry.adaptive, code))
    _no_cell_twice(cells, plugins)
    return Suite(name=name, path=path, cells=cells, description=description,
                 feature_extractor_weights_path=weights_path, cell_timeout=cell_timeout)


def _metrics(value: Any, plugins: PluginManager) -> tuple[str, ...]:
    metrics = tuple(check.name(metric, f"metrics[{index + 1}]")
                    for index, metric in enumerate(check.as_list(value, "metrics")))
    for metric in metrics:
        _registered(plugins, "metric", metric, "metrics")
    check.no_repeats(list(metrics), "metrics")
    return metrics


def _guidances(value: Any) -> list[float | None]:
    """The guidance axis; [None] (no guidance) when the suite has none."""
    if value is None:
        return [None]
    low, high = check.GUIDANCE_RANGE
    guidances = [check.number(g, "guidance", low=low, high=high) for g in check.axis(value, "guidance")]
    check.no_repeats(guidances, "guidance")
    return guidances


def _precisions(value: Any) -> list[str]:
    """One precision, or a list of them (an axis)."""
    if not isinstance(value, list):
        return [_choice(value, "precision", PRECISIONS)]
    precisions = [_choice(p, f"precision[{index + 1}]", PRECISIONS, kind="precision")
                  for index, p in enumerate(check.axis(value, "precision"))]
    check.no_repeats(precisions, "precision")
    return precisions


def _weights_path(value: Any) -> str | None:
    if value is None:
        return None
    path = check.string(value, "feature_extractor_weights_path")
    if not Path(path).is_file():
        raise BenchError(f"feature_extractor_weights_path: no file {check.shown(path)} (a relative path is read from "
                         "the directory samplerbench runs in)")
    return path


def _solver_entries(tables: list[Any], default_nfe: list[int], default_schedules: list[Component], bounds: Limits,
                    plugins: PluginManager) -> list[_SolverEntry]:
    entries, labelled = [], {}
    for index, table in enumerate(tables):
        entry = _solver_entry(table, f"solvers[{index + 1}]", default_nfe, default_schedules, bounds, plugins)
        component = entry.component
        first = labelled.setdefault(component.describe(), component)
        if (first.name, first.options) != (component.name, component.options):
            raise BenchError(f"two [[solvers]] entries are labelled {component.describe()!r}: {_spelled(first)} and "
                             f"{_spelled(component)}; a label names one config, so give each its own label")
        entries.append(entry)
    return entries


def _check_size(bounds: Limits, n: int, factors: dict[str, int]) -> None:
    """The cells (the product of the axes) and the samples within the limits, before a single cell is built."""
    count = math.prod(factors.values())
    spelled = " x ".join(f"{value:,} {what}" for what, value in factors.items() if value > 1) or "one of each"
    if count > bounds.cells:
        raise check.over_limit(f"the number of cells ({spelled})", count, bounds, "cells")
    if count * n > bounds.samples:
        raise check.over_limit(f"the number of samples ({count:,} cells x n = {n:,})", count * n, bounds, "samples")


def _no_cell_twice(cells: list[Cell], plugins: PluginManager) -> None:
    seen: set[str] = set()
    for cell in cells:
        config = check.comparable(_spelled_out(cell.config(), plugins))
        if config in seen:
            raise BenchError(f"the cell {cell.describe()} appears twice; remove the duplicate entry or value")
        seen.add(config)


def _solver_entry(table: Any, key: str, default_nfe: list[int], default_schedules: list[Component], bounds: Limits,
                  plugins: PluginManager) -> _SolverEntry:
    table = check.as_table(table, key, " (name = ...)")
    registration = _registered(plugins, "solver", _name_of(table, key), key)
    solver_name = registration.name
    options = {option: check.option_value(value, f"{key}.{option}") for option, value in table.items()
               if option not in SOLVER_AXIS_KEYS}
    _within(key, check_solver_options, registration.obj, solver_name, options)  # the solver's declared options
    solver = _within(key, build_solver, registration.obj, solver_name, options)
    label = check.name(table.get("label", ""), f"{key}.label", width=check.MAX_LABEL)
    component = Component(solver_name, tuple(sorted(options.items())), label)
    if solver.adaptive:  # it picks its own steps: swept over tolerances, on no schedule
        if "nfe" in table or "tolerances" not in table:
            raise BenchError(f"{key}: solver {solver_name!r} is adaptive: give it `tolerances = [...]` (rtol = atol) "
                             "instead of NFE budgets")
        if "schedules" in table:
            raise BenchError(f"{key}: solver {solver_name!r} is adaptive: it picks its own steps, so `schedules` "
                             "does not apply; remove it")
        if {"rtol", "atol"} & set(options):
            raise BenchError(f"{key}: solver {solver_name!r} sets rtol = atol from `tolerances`; remove its "
                             "rtol/atol options")
        low, high = check.TOLERANCE_RANGE
        tolerances = [check.number(t, f"{key}.tolerances", low=low, high=high)
                      for t in check.axis(table["tolerances"], f"{key}.tolerances")]
        check.no_repeats(tolerances, f"{key}.tolerances")
        return _SolverEntry(component, True, [None], tolerances, [Component("adaptive")])
    if "tolerances" in table:
        raise BenchError(f"{key}: solver {solver_name!r} takes NFE budgets, not tolerances (only adaptive solvers "
                         "such as rk45 do)")
    budgets = _budgets(table["nfe"], f"{key}.nfe", bounds) if "nfe" in table else default_nfe
    for budget in budgets:
        _within(key, solver.plan, budget)  # raises for a budget below the solver's minimum
    schedules = (_components(check.axis(table["schedules"], f"{key}.schedules"), f"{key}.schedules", "schedule",
                             plugins) if "schedules" in table else default_schedules)
    return _SolverEntry(component, False, budgets, [None], schedules)


def _budgets(value: Any, key: str, bounds: Limits) -> list[int]:
    budgets = [check.integer(budget, key, low=1) for budget in check.axis(value, key)]
    check.no_repeats(budgets, key)
    for budget in budgets:
        if budget > bounds.nfe:
            raise check.over_limit(f"an NFE budget in {key}", budget, bounds, "nfe")
    return budgets


def _components(entries: list[Any], key: str, kind: str, plugins: PluginManager) -> list[Component]:
    components = [_component(entry, f"{key}[{index + 1}]", kind, plugins) for index, entry in enumerate(entries)]
    check.no_repeats(components, key, spell=lambda component: component.describe(),
                     as_key=lambda component: check.comparable(_spelled_out({kind: component.config()}, plugins)))
    return components


def _component(entry: Any, key: str, kind: str, plugins: PluginManager) -> Component:
    table = check.as_table({"name": entry} if isinstance(entry, str) else entry, key, " (name = ...)")
    registration = _registered(plugins, kind, _name_of(table, key), key)
    options = {option: check.option_value(value, f"{key}.{option}") for option, value in table.items()
               if option not in ("name", "label")}
    # schedules take (steps, model, **options); a model loader's device is the suite's
    check.check_options(registration.obj, options, what=f"{kind} {registration.name!r}", key=key,
                        skip=2 if kind == "schedule" else 0)
    label = check.name(table.get("label", ""), f"{key}.label", width=check.MAX_LABEL)
    return Component(registration.name, tuple(sorted(options.items())), label)


def _spelled_out(config: dict[str, Any], plugins: PluginManager) -> dict[str, Any]:
    """A cell's config (or part of one) with every option its plugins left at their defaults written out: karras and
    karras(rho=7) are the same schedule, ddim and ddim(eta=0) the same solver."""
    config = dict(config)
    for kind in ("model", "solver", "schedule"):
        part = config.get(kind)
        if part is not None:
            config[kind] = {**part, "options": {**_defaults(plugins, kind, part["name"]), **part["options"]}}
    return config


@functools.lru_cache(maxsize=1024)
def _defaults(plugins: PluginManager, kind: str, name: str) -> dict[str, Any]:
    if name not in plugins.names(kind):  # the adaptive solvers' stand-in schedule
        return {}
    registration = plugins.get(kind, name)
    if kind == "solver":
        return check_solver_options(registration.obj, registration.name, {})
    return check.defaults(registration.obj, skip=2 if kind == "schedule" else 0)


def _name_of(table: dict[str, Any], key: str) -> str:
    if "name" not in table:
        raise BenchError(f"{key} has no name (name = \"...\")")
    return check.name(table["name"], f"{key}.name")


def _registered(plugins: PluginManager, kind: str, name: str, key: str) -> Registration:
    return _within(key, plugins.get, kind, name)


def _choice(value: Any, key: str, choices: Any, kind: str | None = None) -> str:
    text = check.name(value, key)
    if text not in choices:
        raise unknown_name(kind or key, text, choices)
    return text


def _within(key: str, fn: Any, *args: Any) -> Any:
    """``fn(*args)``, its BenchError prefixed with the key it concerns."""
    try:
        return fn(*args)
    except BenchError as error:
        raise BenchError(f"{key}: {error}") from None


def _spelled(component: Component) -> str:
    options = ", ".join(f"{key}={value!r}" for key, value in component.options)
    return f"{component.name}({options})"
