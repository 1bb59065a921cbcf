"""samplerbench: a plugin-based benchmarking harness for diffusion-model samplers.

    import bench
    model = bench.load_model("gmm2d", device="cpu")
    out = bench.sample(model, "heun", nfe=35, n=512, seed=0, schedule="karras")
    out.x, out.x_T, out.nfe, out.seconds
"""

from __future__ import annotations

__version__ = "0.1.0"

from bench.denoiser import CountingDenoiser, Denoiser
from bench.diffusers_adapter import from_diffusers
from bench.errors import BenchError
from bench.hookspecs import hookimpl
from bench.metrics import Metric
from bench.registry import manager
from bench.sampling import SampleOutput, load_model, sample
from bench.solver import Plan, Solver


def list_solvers() -> list[str]:
    return manager().names("solver")


def list_models() -> list[str]:
    return manager().names("model")


def list_schedules() -> list[str]:
    return manager().names("schedule")


def list_metrics() -> list[str]:
    return manager().names("metric")


__all__ = [
    "BenchError", "CountingDenoiser", "Denoiser", "Metric", "Plan", "SampleOutput", "Solver", "hookimpl",
    "from_diffusers", "list_metrics", "list_models", "list_schedules", "list_solvers", "load_model", "sample",
]
