"""Small suites and misbehaving plugins for the runner and CLI tests."""

import textwrap
import types
from pathlib import Path

import torch

from bench import hookimpl
from bench.registry import PluginManager
from bench.core.solver import Solver

TINY_SUITE = """
name = "tiny"
device = "cpu"
n = 32
seeds = [0, 1]
nfe = [2, 4]
metrics = ["trajectory_error", "frechet_exact", "fid", "precision", "recall"]

[[models]]
name = "gmm2d"

[[solvers]]
name = "euler"

[[solvers]]
name = "heun"
nfe = [3, 5]
"""


def write_suite(directory: Path, text: str = TINY_SUITE, name: str = "tiny.toml") -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text))
    return path


class Exploding(Solver):
    """Raises on the NFE budget 13, returns NaN on 17, and works otherwise; counts its runs."""

    runs = 0

    def __init__(self) -> None:
        pass

    def sample(self, denoise, x, sigmas, plan, noise=None):
        type(self).runs += 1
        if plan.nfe == 13:
            raise RuntimeError("boom at 13")
        x = denoise(x, float(sigmas[0]))
        return x * float("nan") if plan.nfe == 17 else x


def plugins_with_test_solvers() -> PluginManager:
    module = types.ModuleType("test_solvers_plugin")

    def register_solvers(register):
        register(Exploding, name="exploding")

    module.register_solvers = hookimpl(register_solvers)
    plugins = PluginManager()
    plugins.register(module, name="test-solvers")
    return plugins




def assert_same_samples(first, second, model) -> None:
    """Two draws of the same samples (other batch sizes, devices or executors) agree to the stated tolerance; their
    initial states, a pure function of seed and sample index, agree bit for bit."""
    from bench.core.sampling import agreement_tolerance

    assert torch.equal(first.x_T, second.x_T)
    torch.testing.assert_close(first.x, second.x, rtol=0, atol=agreement_tolerance(first.x.dtype, model.sigma_max))
