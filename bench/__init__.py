"""samplerbench: a plugin-based benchmarking harness for diffusion-model samplers.

    import bench
    model = bench.load_model("gmm2d", device="cpu")
    out = bench.sample(model, "heun", nfe=35, n=512, seed=0, schedule="karras")
    out.x, out.x_T, out.nfe, out.seconds

docs/architecture.md maps the package: bench/core (contracts, noise, sampling), bench/sweep (suites, runner, store),
bench/measure (metrics), bench/report, bench/adapters, bench/tools.
"""

from __future__ import annotations

import importlib.metadata

__version__ = importlib.metadata.version("samplerbench")

from bench.adapters.diffusers import from_diffusers
from bench.adapters.flow_matching import from_flow_matching
from bench.core.denoiser import CountingDenoiser, Denoiser
from bench.core.options import SolverOptions, option
from bench.core.sampling import SampleOutput, load_model, sample
from bench.core.solver import Plan, Solver
from bench.core.steps import StepSolver
from bench.errors import BenchError
from bench.hookspecs import hookimpl
from bench.measure.metrics import Metric
from bench.registry import manager
from bench.sweep.store import read_results


def list_solvers() -> list[str]:
    return manager().names("solver")


def list_models() -> list[str]:
    return manager().names("model")


def list_schedules() -> list[str]:
    return manager().names("schedule")


def list_metrics() -> list[str]:
    return manager().names("metric")


__all__ = [
    "BenchError", "CountingDenoiser", "Denoiser", "Metric", "Plan", "SampleOutput", "Solver", "SolverOptions",
    "StepSolver", "hookimpl", "from_diffusers", "from_flow_matching", "list_metrics", "list_models",
    "list_schedules", "list_solvers", "load_model", "option", "read_results", "sample",
]
