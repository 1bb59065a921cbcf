"""Euler's method on the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma (Karras et al. 2022)."""

from __future__ import annotations

import torch
from torch import Tensor

from bench.core.steps import StepSolver
from bench.hookspecs import hookimpl


class Euler(StepSolver):
    """First order, one NFE per step. Its last step, to sigma = 0, lands exactly on D(x; sigma_last)."""

    order = 1

    def step(self, i: int, x: Tensor, estimates: tuple[Tensor, ...], sigmas: Tensor, orders: tuple[int, ...],
             noise: Tensor | None) -> Tensor:
        sigma, sigma_next, denoised = sigmas[i].item(), sigmas[i + 1].item(), estimates[-1]
        # x + (sigma_next - sigma) (x - D) / sigma, which is the interpolation D + (sigma_next / sigma) (x - D):
        # one pass over the state instead of four
        return torch.lerp(denoised, x, sigma_next / sigma)


@hookimpl
def register_solvers(register):
    register(Euler, name="euler")
