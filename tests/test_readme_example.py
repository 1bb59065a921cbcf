"""The README's plugin example is real code: it registers, runs through the harness and reaches the order it
declares (and its theta = 0 variant, Euler's)."""

import math
import re
import types
from pathlib import Path

import pytest
import torch

import bench
from bench.registry import PluginManager
from bench.tools.convergence import SigmaRange, fitted_order
from bench.measure.reference import solve_reference

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.fixture(scope="module")
def plugins() -> PluginManager:
    text = README.read_text()
    block = re.search(r"```python\n(# my_solvers\.py.*?)```", text, re.S)
    assert block, "README: the plugin example (a python block starting '# my_solvers.py') is gone"
    module = types.ModuleType("my_solvers")
    exec(compile(block.group(1), "README.md:my_solvers", "exec"), module.__dict__)
    manager = PluginManager()
    manager.register(module, name="my_solvers")
    return manager


def test_the_example_registers_with_its_options(plugins, gmm2d):
    out = bench.sample(gmm2d, "ab2", nfe=12, n=16, plugins=plugins, theta=0.5)
    assert out.nfe == 12 and torch.isfinite(out.x).all()
    with pytest.raises(bench.BenchError, match=r"theta must be in \[0, 1\]"):
        bench.sample(gmm2d, "ab2", nfe=12, n=16, plugins=plugins, theta=2.0)


@pytest.mark.parametrize("theta, order", [(1.0, 2), (0.0, 1)])
def test_the_example_reaches_its_order(plugins, gmm2d, theta, order):
    # a short sigma range puts 48..192 steps in the asymptotic regime (bench/tools/convergence.py says why)
    model = SigmaRange(gmm2d, sigma_max=0.5)
    x_T = bench.sample(model, "euler", nfe=1, n=64, dtype=torch.float64, warmup=False).x_T
    reference = solve_reference(model, x_T)
    steps = [48, 96, 192]
    errors = []
    for nfe in steps:
        out = bench.sample(model, "ab2", nfe=nfe, n=64, dtype=torch.float64, schedule="logsnr", warmup=False,
                           plugins=plugins, theta=theta)
        errors.append((out.x - reference).pow(2).mean().sqrt().item())
    assert math.isclose(fitted_order(steps, errors), order, abs_tol=0.25), errors
