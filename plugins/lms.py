"""Multistep methods in sigma on the probability-flow ODE dx/dsigma = d(x, sigma) = (x - D(x; sigma)) / sigma:
k-diffusion's linear multistep (LMS) and the gradient-estimation sampler of Permenter and Yuan (2023). One model
call per step each: step rules (bench.core.steps) that read the slopes d_i = eps_i of the last steps.

LMS (k-diffusion's sample_lms, ComfyUI's lms) is the variable-step Adams-Bashforth method in sigma: through the
last p slopes d_i, d_(i-1), ..., d_(i-p+1), at sigma_i, sigma_(i-1), ..., it fits the interpolating polynomial and
integrates it over the step,

    x_(i+1) = x_i + sum_j c_j d_(i-j),    c_j = integral_{sigma_i}^{sigma_(i+1)} l_j(s) ds,

l_j the Lagrange basis polynomial of sigma_(i-j) on those points. ``order`` p (default 4, as k-diffusion's), lower
while the history fills. k-diffusion integrates l_j by adaptive quadrature; here Gauss-Legendre with p nodes, exact
for a polynomial of degree p - 1. As every multistep method its first step is Euler's, which caps it at order 2.

Gradient estimation (Permenter and Yuan 2023, "Interpreting and Improving Diffusion Models from an Optimization
Perspective"; ComfyUI's gradient_estimation): an Euler step in sigma with the slope d_bar = gamma d_i + (1 - gamma)
d_(i-1), gamma = ``gamma`` (default 2, the paper's), after a first plain Euler step. The paper reads the denoiser
as an approximate projection onto the data manifold and d_bar as a better estimate of its gradient; as an ODE
solver it is first order (d_bar - d_i is O(h), weighted by the whole step, where the trapezoidal rule would weigh
it by half). ComfyUI integrates the last step to sigma = 0 with d_bar too; here, as for every solver in the
harness, the last step is x0 = D(x; sigma_last).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import Tensor

from bench.core.numerics import linear_combination
from bench.core.options import SolverOptions, option
from bench.core.steps import MultistepSolver, StepSolver
from bench.hookspecs import hookimpl

LMS_ORDERS = (1, 2, 3, 4, 5, 6)


def lagrange_integrals(points: list[float], start: float, end: float) -> list[float]:
    """c_j = integral_start^end l_j(s) ds for the Lagrange basis l_j of ``points`` (l_j(points[k]) = [j == k]):
    Gauss-Legendre with len(points) nodes, exact for their degree len(points) - 1."""
    nodes, node_weights = np.polynomial.legendre.leggauss(len(points))
    s = (end - start) / 2 * nodes + (end + start) / 2
    integrals = []
    for j, point in enumerate(points):
        basis = np.ones_like(s)
        for k, other in enumerate(points):
            if k != j:
                basis *= (s - other) / (point - other)
        integrals.append(float((end - start) / 2 * np.dot(node_weights, basis)))
    return integrals


class LinearMultistep(MultistepSolver):
    """k-diffusion's LMS (module docstring)."""

    @dataclass(frozen=True)
    class Options(SolverOptions):
        order: int = option(4, choices=LMS_ORDERS)

    prediction = "noise"  # the slope d = (x - D) / sigma is eps

    def step(self, i: int, x: Tensor, estimates: tuple[Tensor, ...], sigmas: Tensor, orders: tuple[int, ...],
             noise: Tensor | None) -> Tensor:
        order = orders[i]
        points = [sigmas[i - j].item() for j in range(order)]  # sigma_i, sigma_(i-1), ...: newest first
        weights = lagrange_integrals(points, sigmas[i].item(), sigmas[i + 1].item())
        return linear_combination(x, 1.0, estimates[::-1], weights)


class GradientEstimation(StepSolver):
    """Permenter and Yuan's gradient-estimation sampler (module docstring)."""

    @dataclass(frozen=True)
    class Options(SolverOptions):
        gamma: float = option(2.0, check=lambda gamma: gamma > 0, must="be > 0 (1: Euler, 2: the paper's)")

    order = 1
    prediction = "noise"
    history = 2

    def step(self, i: int, x: Tensor, estimates: tuple[Tensor, ...], sigmas: Tensor, orders: tuple[int, ...],
             noise: Tensor | None) -> Tensor:
        dt = sigmas[i + 1].item() - sigmas[i].item()
        if i == 0:
            return x + dt * estimates[-1]
        gamma = self.config.gamma
        # x + dt (gamma d_i + (1 - gamma) d_(i-1))
        return linear_combination(x, 1.0, [estimates[-1], estimates[-2]], [dt * gamma, dt * (1 - gamma)])


@hookimpl
def register_solvers(register):
    register(LinearMultistep, name="lms", aliases=("k-lms",))
    register(GradientEstimation, name="gradient-estimation", aliases=("gradient_estimation",))
