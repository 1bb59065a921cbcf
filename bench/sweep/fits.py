"""The fit cache: each fit of a learned schedule or solver, once, as safetensors beside the results.

``results/fits/`` holds one ``<key>.safetensors`` per fit and one ``manifest.json`` that says, for each key, its
file and sha256, the config that decided it, the code that computed it, its teacher, how many fitting samples and
which fit seed it used, how long it took, on which device, and the teacher's NFE. The key is a hash of all of that
config and code: the model, the solver and its options, the schedule and its options (teacher settings and fit seed
included), the NFE budget, dtype, device and conditioning, and the source hashes of the model, solver, schedule,
harness and bench.core.fitting. Any cell whose fit has that key reuses the file; a changed base solver, option,
budget or code refits. A file whose bytes do not match the manifest's sha256 is refitted, never loaded.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import Tensor

from bench.core.fitting import FIT_OPTIONS, FitProblem, check_grid, fit
from bench.core.sampling import DTYPES, get_solver, make_sigmas
from bench.core.solver import check_options as check_solver_options
from bench.errors import BenchError
from bench.registry import PluginManager, Registration
from bench.sweep import validate as check
from bench.sweep.cell import Cell
from bench.sweep.provenance import digest_of, environment, module_digest

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Fit:
    tensors: dict[str, Tensor]
    entry: dict[str, Any]  # the manifest's entry

    def columns(self) -> dict[str, Any]:
        """The row's fitting-cost columns."""
        return {"fit_key": self.entry["key"], "fit_seconds": self.entry["seconds"],
                "fit_teacher_nfe": self.entry["teacher"]["nfe"], "fit_evaluations": self.entry["evaluations"]}


def learned(cell: Cell, plugins: PluginManager) -> tuple[str, Registration] | None:
    """("schedule" | "solver", its registration) if the cell's schedule or solver is fitted, else None."""
    if cell.tolerance is not None:
        return None
    for kind, name in (("schedule", cell.schedule.name), ("solver", cell.solver.name)):
        registration = plugins.get(kind, name)
        if "fit" in registration.extras:
            return kind, registration
    return None


def learned_options(cell: Cell, kind: str, registration: Registration) -> dict[str, Any]:
    """The learned thing's options with every default written out (what its fitter reads)."""
    if kind == "schedule":
        return {**check.defaults(registration.obj, skip=2), **cell.schedule.kwargs}
    return check_solver_options(registration.obj, registration.name, cell.solver_options)


def fit_config(cell: Cell, plugins: PluginManager) -> dict[str, Any]:
    """Everything about a cell that decides its fit (and nothing that does not: its seed, n, metrics)."""
    kind, registration = learned(cell, plugins)
    options = learned_options(cell, kind, registration)
    solver = cell.solver.config() if kind == "schedule" else {"name": cell.solver.name, "options": options}
    schedule = cell.schedule.config() if kind == "solver" else {"name": cell.schedule.name, "options": options}
    return {"learned": kind, "model": cell.model.config(), "solver": solver, "schedule": schedule,
            "nfe": cell.nfe, "dtype": cell.dtype, "device": cell.device, "labels": cell.labels,
            "guidance": cell.guidance,
            "precision": cell.precision}


def fit_code(cell: Cell) -> dict[str, Any]:
    code = json.loads(cell.code)
    return {**{part: code.get(part) for part in ("harness", "model", "solver", "schedule")},
            "fitting": module_digest("bench.core.fitting")}


def fit_key(cell: Cell, plugins: PluginManager) -> str:
    return digest_of({"fit": fit_config(cell, plugins), "code": fit_code(cell)})


class FitCache:
    """A folder of fits (module docstring)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def manifest(self) -> dict[str, Any]:
        path = self.root / MANIFEST
        if not path.exists():
            return {}
        manifest = json.loads(path.read_text())
        if not isinstance(manifest, dict):
            raise BenchError(f"{str(path)!r} must hold a JSON object (fit key -> entry); move it aside to refit")
        return manifest

    def load(self, key: str) -> Fit | None:
        """The fit of ``key`` if its file is there and its bytes match the manifest's sha256; None otherwise."""
        entry = self.manifest().get(key)
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
            return None
        path = self.root / Path(entry["file"]).name
        if not path.exists():
            return None
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
            return None
        return Fit(safetensors.torch.load(data), entry)

    def save(self, key: str, tensors: dict[str, Tensor], entry: dict[str, Any]) -> Fit:
        self.root.mkdir(parents=True, exist_ok=True)
        data = safetensors.torch.save(tensors)
        file = f"{key}.safetensors"
        _write_atomic(self.root / file, data)
        entry = {**entry, "key": key, "file": file, "sha256": hashlib.sha256(data).hexdigest()}
        with open(self.root / f".{MANIFEST}.lock", "w") as lock:  # runs sharing the folder: one writer at a time
            fcntl.flock(lock, fcntl.LOCK_EX)
            manifest = self.manifest()
            manifest[key] = entry
            _write_atomic(self.root / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True, default=str).encode())
        return Fit(safetensors.torch.load(data), entry)


def _write_atomic(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def check_fit_seed(cell: Cell, plugins: PluginManager, seeds: set[int]) -> None:
    """Refuse a fit whose seed is an evaluation seed of the cells it serves."""
    kind, registration = learned(cell, plugins)
    fit_seed = learned_options(cell, kind, registration)["fit_seed"]
    if fit_seed in seeds:
        raise BenchError(f"{kind} {registration.name!r}: fit_seed = {fit_seed} is also an evaluation seed "
                         f"(seeds {sorted(seeds)}); fitting never sees evaluation seeds: choose a fit_seed outside them")


def fit_cell(cell: Cell, model, plugins: PluginManager, cache: FitCache) -> Fit:
    """The cell's fit: from the cache when its key is there, else fitted now and stored."""
    key = fit_key(cell, plugins)
    hit = cache.load(key)
    if hit is not None:
        return hit
    check_fit_seed(cell, plugins, {cell.seed})
    kind, registration = learned(cell, plugins)
    options = learned_options(cell, kind, registration)
    missing = [name for name in FIT_OPTIONS if name not in options]
    if missing:
        raise BenchError(f"{kind} {registration.name!r} is learned but declares no option {missing[0]!r} "
                         f"(a learned schedule or solver declares {', '.join(FIT_OPTIONS)})")
    if cell.guidance is not None:
        raise BenchError(f"{kind} {registration.name!r}: fitting under guidance is not supported; drop guidance")
    solver = get_solver(cell.solver.name, plugins, **cell.solver_options)
    plan = solver.plan(cell.nfe)
    sigmas = (make_sigmas(cell.schedule.name, plan.steps, model, plugins, **cell.schedule.kwargs)
              if kind == "solver" else None)
    device = torch.device(cell.device)
    problem = FitProblem(model, solver, plan, options, sigmas, cell.labels, DTYPES[cell.dtype], device)
    what = f"{kind} {registration.name!r} for {cell.solver.describe()} at nfe={cell.nfe}"
    start = time.perf_counter()
    tensors = fit(registration.extras["fit"], problem, what)
    seconds = time.perf_counter() - start
    if kind == "schedule":
        if "sigmas" not in tensors:
            raise BenchError(f"{what}: a learned schedule's fit returns {{'sigmas': grid}}; got {sorted(tensors)}")
        tensors["sigmas"] = check_grid(tensors["sigmas"], plan.steps, model.sigma_min, model.sigma_max, what)
    env = environment(cell.device)
    entry = {"config": fit_config(cell, plugins), "code": fit_code(cell),
             "teacher": {"method": "heun", "grid": "karras(rho=7)", "steps": options["teacher_steps"],
                         "nfe": problem.teacher_nfe},
             "fitting_samples": problem.n, "fit_seed": options["fit_seed"], "seconds": seconds,
             "evaluations": problem.evaluations, "device": env["device"], "device_name": env["device_name"],
             "threads": env["threads"], "notes": problem.notes,
             "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    return cache.save(key, tensors, entry)


def seeds_of_fits(cells: list[Cell], plugins: PluginManager) -> dict[str, list[Cell]]:
    """The learned cells grouped by fit key, after refusing any fit whose seed is an evaluation seed of a cell of
    the same model (the fitting noise would then be a stream of an evaluated seed)."""
    groups: dict[str, list[Cell]] = {}
    seeds: dict[Any, set[int]] = {}
    for cell in cells:
        seeds.setdefault(cell.model, set()).add(cell.seed)
        if learned(cell, plugins) is not None:
            groups.setdefault(fit_key(cell, plugins), []).append(cell)
    for members in groups.values():
        check_fit_seed(members[0], plugins, seeds[members[0].model])
    return groups


def fit_cells(cells: list[Cell], models: dict, plugins: PluginManager, cache: FitCache,
              progress: bool = False) -> dict[str, Fit]:
    """Fit (or load) every fit the cells need, once per key, after refusing any fit seed that is one of the seeds
    of the cells it serves. Returns cell key -> its fit."""
    groups = seeds_of_fits(cells, plugins)
    fits: dict[str, Fit] = {}
    for key, members in groups.items():
        first = members[0]
        if progress:
            print(f"fit {first.schedule.describe()} / {first.solver.describe()} nfe={first.nfe} "
                  f"on {first.model.describe()}", flush=True)
        result = fit_cell(first, models[first.model, first.device], plugins, cache)
        fits.update({cell.key: result for cell in members})
    return fits
