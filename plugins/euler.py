"""Euler's method on the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma (Karras et al. 2022)."""

from __future__ import annotations

import torch
from torch import Tensor

from bench.hookspecs import hookimpl
from bench.core.solver import Denoise, Noise, Plan, Solver


class Euler(Solver):
    """First order, one NFE per step. Its last step, to sigma = 0, lands exactly on D(x; sigma_last)."""

    order = 1

    def __init__(self) -> None:
        pass

    def sample(self, denoise: Denoise, x: Tensor, sigmas: Tensor, plan: Plan, noise: Noise | None = None) -> Tensor:
        sigma_list = sigmas.tolist()
        for sigma, sigma_next in zip(sigma_list[:-1], sigma_list[1:]):
            denoised = denoise(x, sigma)
            if sigma_next == 0:
                return denoised
            # x + (sigma_next - sigma) (x - D) / sigma, which is the interpolation D + (sigma_next / sigma) (x - D):
            # one pass over the state instead of four
            x = torch.lerp(denoised, x, sigma_next / sigma)
        return x


@hookimpl
def register_solvers(register):
    register(Euler, name="euler")
