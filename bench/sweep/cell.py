"""A cell: one model x solver(+options) x schedule x NFE budget x guidance x seed, and the samples it draws.

A cell is pure data (what to draw and measure), built by bench.sweep.suite and run by bench.sweep.runner through an
executor; ``draw`` is the one way any executor turns a cell (or a shard of its samples) into samples.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import safetensors.torch

from bench.core.sampling import SampleOutput, sample
from bench.registry import PluginManager
from bench.sweep.provenance import digest_of


@dataclass(frozen=True)
class Component:
    """A registered plugin thing with its options, e.g. the solver ddim with eta=0.5."""

    name: str
    options: tuple[tuple[str, Any], ...] = ()
    label: str = ""

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.options)

    def describe(self) -> str:
        if self.label:
            return self.label
        inner = ", ".join(f"{key}={value}" for key, value in self.options)
        return f"{self.name}({inner})" if inner else self.name

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "options": dict(self.options)}


@dataclass(frozen=True)
class Cell:
    suite: str
    model: Component
    solver: Component
    schedule: Component
    nfe: int | None  # None for an adaptive solver, which has a tolerance instead
    guidance: float | None
    seed: int
    n: int
    dtype: str
    device: str
    labels: str  # "none" (unconditional) or "balanced"
    metrics: tuple[str, ...]
    batch_size: int | None = None
    tolerance: float | None = None  # rtol = atol of an adaptive solver
    guidance_type: str = "classifier-free"
    precision: str = "fp32"
    cuda_graph: bool = False
    code: str = "{}"  # canonical JSON: each plugin that takes part (distribution, version, source hash), the harness
    fit: tuple[str, str] | None = None  # a learned cell's fit, (safetensors path, sha256), set by the runner; the
    # fit is decided by the config and code (bench.sweep.fits), so it is not part of the key

    @property
    def solver_options(self) -> dict[str, Any]:
        if self.tolerance is None:
            return self.solver.kwargs
        return {**self.solver.kwargs, "rtol": self.tolerance, "atol": self.tolerance}

    def config(self) -> dict[str, Any]:
        """Everything that determines the cell's row; its hash is the row's key."""
        return {
            "model": self.model.config(), "solver": self.solver.config(), "schedule": self.schedule.config(),
            "nfe": self.nfe, "guidance": self.guidance, "seed": self.seed, "n": self.n, "dtype": self.dtype,
            "device": self.device, "labels": self.labels, "metrics": sorted(self.metrics),
            "batch_size": self.batch_size, "tolerance": self.tolerance,
            "guidance_type": self.guidance_type if self.guidance else None, "precision": self.precision,
            "cuda_graph": self.cuda_graph,
        }

    @property
    def config_key(self) -> str:
        """The config alone: the rows of one config measured by different code supersede each other."""
        return digest_of(self.config())

    @property
    def key(self) -> str:
        """The row's key: the config and the identity of the code that computes it (bench.sweep.provenance)."""
        return digest_of({"config": self.config(), "code": json.loads(self.code)})

    def describe(self) -> str:
        budget = f"nfe={self.nfe}" if self.tolerance is None else f"tol={self.tolerance:g}"
        return f"{self.model.describe()} {self.solver.describe()} {self.schedule.describe()} {budget} seed={self.seed}"


def draw(cell: Cell, model, plugins: PluginManager | None, start: int = 0, stop: int | None = None) -> SampleOutput:
    """Samples start .. stop - 1 of a cell (all of them by default): a shard draws exactly the samples the whole
    cell would, by per-sample seeding."""
    stop = cell.n if stop is None else stop
    return sample(model, cell.solver.name, nfe=cell.nfe, n=stop - start, offset=start, seed=cell.seed,
                  fitted=load_fit(cell.fit) if cell.fit else None, schedule=cell.schedule.name, schedule_options=cell.schedule.kwargs, dtype=cell.dtype,
                  guidance=cell.guidance, guidance_type=cell.guidance_type, labels=cell.labels,
                  batch_size=cell.batch_size, device=cell.device, precision=cell.precision,
                  cuda_graph=cell.cuda_graph, plugins=plugins, **cell.solver_options)


def load_fit(fit: tuple[str, str]) -> dict:
    """The tensors of a fit file, after checking its bytes against the sha256 the manifest gave."""
    path, sha256 = fit
    with open(path, "rb") as handle:
        data = handle.read()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError(f"fit file {path!r} does not match its manifest's sha256 {sha256}; refit it "
                         "(`samplerbench fit SUITE`)")
    return safetensors.torch.load(data)
