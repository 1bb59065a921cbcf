"""Suites: a TOML file that expands into cells, model x solver(+options) x schedule x NFE x guidance x seed.

    name = "quick"               # default: the file's stem
    device = "cpu"               # or "cuda"; `samplerbench run --device` overrides it
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

Parsing checks every name and option without loading a model; what needs the model (its classes, its sigma range)
the runner checks when it loads it, before anything runs, so bad input leaves no partial output.
"""

from __future__ import annotations

import inspect
import itertools
import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.core.guidance import GUIDANCE_KINDS
from bench.core.sampling import LABEL_CHOICES, PRECISIONS
from bench.core.solver import build_solver
from bench.errors import BenchError, unknown_name
from bench.registry import PluginManager, manager
from bench.sweep.cell import Cell, Component
from bench.sweep.provenance import canonical_json, component_identity, harness_identity

SUITE_KEYS = {"name", "description", "device", "dtype", "n", "batch_size", "seeds", "nfe", "schedules", "metrics",
              "guidance", "guidance_type", "labels", "models", "solvers", "feature_extractor_weights_path",
              "precision", "cuda_graph", "cell_timeout"}
SOLVER_AXIS_KEYS = {"name", "label", "nfe", "schedules", "tolerances"}
DTYPES = ("float32", "float64", "float16", "bfloat16")


@dataclass
class Suite:
    name: str
    path: Path | None
    cells: list[Cell]
    description: str = ""
    feature_extractor_weights_path: str | None = None
    cell_timeout: float | None = None  # None: bench.sweep.timeouts.DEFAULT_CELL_TIMEOUT


def load_suite(path: str | Path, device: str | None = None, plugins: PluginManager | None = None) -> Suite:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise BenchError(f"cannot read suite {str(path)!r}: {error.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:  # its message carries "(at line L, column C)"
        raise BenchError(f"{path}: invalid TOML: {error}") from None
    try:
        return parse_suite(data, default_name=path.stem, device=device, plugins=plugins, path=path)
    except BenchError as error:
        raise BenchError(f"{path}: {error}") from None


def parse_suite(data: dict[str, Any], *, default_name: str = "suite", device: str | None = None,
                plugins: PluginManager | None = None, path: Path | None = None) -> Suite:
    plugins = plugins or manager()
    unknown = sorted(set(data) - SUITE_KEYS)
    if unknown:
        raise unknown_name("suite key", unknown[0], SUITE_KEYS)
    name = _string(data.get("name", default_name), "name")
    device = device or _string(data.get("device", "cpu"), "device")
    if device.split(":")[0] not in ("cpu", "cuda"):
        raise BenchError(f"device must be 'cpu' or 'cuda'; got {device!r}")
    dtype = _string(data.get("dtype", "float32"), "dtype")
    if dtype not in DTYPES:
        raise unknown_name("dtype", dtype, DTYPES)
    n = _positive_int(data.get("n", 1024), "n")
    batch_size = _positive_int(data["batch_size"], "batch_size") if "batch_size" in data else None
    seeds = [_int(seed, "seeds") for seed in _list(data.get("seeds", [0]), "seeds")]
    default_nfe = [_positive_int(value, "nfe") for value in _list(data.get("nfe", [10]), "nfe")]
    default_schedules = [_component(entry, "schedule", plugins) for entry in _list(data.get("schedules", ["karras"]),
                                                                                  "schedules")]
    metrics = tuple(_string(metric, "metrics") for metric in _list(data.get("metrics", []), "metrics"))
    for metric in metrics:
        plugins.get("metric", metric)
    guidance_axis = data.get("guidance")
    guidances = [None] if guidance_axis is None else [float(_number(g, "guidance")) for g in _list(guidance_axis, "guidance")]
    labels = _string(data.get("labels", "none"), "labels")
    if labels not in LABEL_CHOICES:
        raise unknown_name("labels choice", labels, LABEL_CHOICES)
    guidance_type = _string(data.get("guidance_type", "classifier-free"), "guidance_type")
    if guidance_type not in GUIDANCE_KINDS:
        raise unknown_name("guidance type", guidance_type, GUIDANCE_KINDS)
    precision_axis = data.get("precision", "fp32")
    precisions = [_string(p, "precision") for p in (precision_axis if isinstance(precision_axis, list)
                                                      else [precision_axis])]
    for precision in precisions:
        if precision not in PRECISIONS:
            raise unknown_name("precision", precision, PRECISIONS)
    cuda_graph = data.get("cuda_graph", False)
    if not isinstance(cuda_graph, bool):
        raise BenchError(f"cuda_graph must be true or false; got {cuda_graph!r}")
    if cuda_graph and not device.startswith("cuda"):
        raise BenchError(f"cuda_graph = true needs device = \"cuda\"; got {device!r}")
    cell_timeout = data.get("cell_timeout")
    if cell_timeout is not None:
        cell_timeout = float(_number(cell_timeout, "cell_timeout"))
        if not 0 < cell_timeout < float("inf"):
            raise BenchError(f"cell_timeout must be a number of seconds > 0; got {data['cell_timeout']!r}")
    weights_path = data.get("feature_extractor_weights_path")
    if weights_path is not None:
        weights_path = _string(weights_path, "feature_extractor_weights_path")

    models = [_component(entry, "model", plugins) for entry in _list(data.get("models", []), "models")]
    solvers = [_table(entry, "solvers") for entry in _list(data.get("solvers", []), "solvers")]
    if not models or not solvers:
        raise BenchError("a suite needs at least one [[models]] and one [[solvers]] entry")

    if guidance_axis is not None and labels == "none":
        raise BenchError("guidance needs labels: set labels = \"balanced\" (the default, \"none\", samples "
                         "unconditionally)")
    # what needs a model (its classes, its sigma range) is checked when the runner loads it, before anything runs

    cells, labelled = [], {}
    for solver_table in solvers:
        solver_name = _string(solver_table.get("name"), "solvers.name")
        registration = plugins.get("solver", solver_name)
        options = {key: value for key, value in solver_table.items() if key not in SOLVER_AXIS_KEYS}
        solver = build_solver(registration.obj, registration.name, options)
        component = Component(registration.name, tuple(sorted(options.items())), str(solver_table.get("label", "")))
        first = labelled.setdefault(component.describe(), component)
        if (first.name, first.options) != (component.name, component.options):
            raise BenchError(f"two [[solvers]] entries are labelled {component.describe()!r}: {_spelled(first)} and "
                             f"{_spelled(component)}; a label names one config, so give each its own label")
        if solver.adaptive:
            if "nfe" in solver_table or "tolerances" not in solver_table:
                raise BenchError(f"solver {solver_name!r} is adaptive: give it `tolerances = [...]` (rtol = atol) "
                                 "instead of NFE budgets")
            budgets = [None]
            tolerances = [float(_number(t, "tolerances")) for t in _list(solver_table["tolerances"], "tolerances")]
            if any(t <= 0 for t in tolerances):
                raise BenchError(f"tolerances must be > 0; got {tolerances}")
        else:
            if "tolerances" in solver_table:
                raise BenchError(f"solver {solver_name!r} takes NFE budgets, not tolerances (only adaptive solvers "
                                 "such as rk45 do)")
            budgets = [_positive_int(v, "nfe") for v in _list(solver_table.get("nfe", default_nfe), "nfe")]
            tolerances = [None]
            for budget in budgets:
                solver.plan(budget)  # raises for a budget below the solver's minimum
        schedules = default_schedules
        if solver.adaptive:  # it picks its own grid
            schedules = [Component("adaptive")]
        elif "schedules" in solver_table:
            schedules = [_component(entry, "schedule", plugins) for entry in _list(solver_table["schedules"], "schedules")]
        for model in models:
            for schedule in schedules:
                code = canonical_json({
                    "harness": harness_identity(), "model": component_identity(plugins, "model", model.name),
                    "solver": component_identity(plugins, "solver", component.name),
                    "schedule": (component_identity(plugins, "schedule", schedule.name)
                                 if not solver.adaptive else None),
                    "metrics": [component_identity(plugins, "metric", metric) for metric in sorted(metrics)]})
                for budget, tolerance in itertools.product(budgets, tolerances):
                    for guidance, precision, seed in itertools.product(guidances, precisions, seeds):
                        cells.append(Cell(name, model, component, schedule, budget, guidance, seed, n, dtype,
                                          device, labels, metrics, batch_size, tolerance,
                                          guidance_type, precision, cuda_graph and not solver.adaptive, code))
    seen: dict[str, Cell] = {}
    for cell in cells:
        if cell.config_key in seen:
            raise BenchError(f"the cell {cell.describe()} appears twice; remove the duplicate entry or value")
        seen[cell.config_key] = cell
    return Suite(name=name, path=path, cells=cells, description=str(data.get("description", "")),
                 cell_timeout=cell_timeout,
                 feature_extractor_weights_path=weights_path)


def _spelled(component: Component) -> str:
    options = ", ".join(f"{key}={value!r}" for key, value in component.options)
    return f"{component.name}({options})"


def _component(entry: Any, kind: str, plugins: PluginManager) -> Component:
    if isinstance(entry, str):
        entry = {"name": entry}
    table = _table(entry, kind)
    name = _string(table.get("name"), f"{kind}.name")
    registration = plugins.get(kind, name)
    options = {key: value for key, value in table.items() if key not in ("name", "label")}
    allowed = _keyword_options(registration.obj, skip=2 if kind == "schedule" else 0)
    if allowed is not None:
        for key in options:
            if key not in allowed:
                raise BenchError(f"{kind} {registration.name!r} has no option {key!r} "
                                 f"(its options: {', '.join(allowed) or 'none'})")
    return Component(registration.name, tuple(sorted(options.items())), str(table.get("label", "")))


def _keyword_options(fn: Any, skip: int) -> list[str] | None:
    """The options a schedule (after its steps and model) or a model loader takes by name; None when it takes any
    (**options) or cannot be inspected, and its own call then judges them."""
    try:
        parameters = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return None
    named = [p for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return [p.name for p in named[skip:] if p.name != "device"]


def _table(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BenchError(f"each entry of {what} must be a table (name = ...); got {value!r}")
    return value


def _list(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise BenchError(f"{what} must be a list; got {value!r}")
    return value


def _string(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise BenchError(f"{what} must be a string; got {value!r}")
    return value


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BenchError(f"{what} must hold whole numbers; got {value!r}")
    return value


def _positive_int(value: Any, what: str) -> int:
    if _int(value, what) < 1:
        raise BenchError(f"{what} must be >= 1; got {value!r}")
    return value


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BenchError(f"{what} must hold numbers; got {value!r}")
    return value
