"""Heun's second-order method on the probability-flow ODE, as EDM's deterministic sampler (Karras et al. 2022,
Algorithm 1): an Euler step, then the trapezoidal correction with the slope at its end. The step to sigma = 0 is
left as plain Euler (it would divide by sigma = 0), so N steps cost 2N - 1 NFE."""

from __future__ import annotations

import torch
from torch import Tensor

from bench.hookspecs import hookimpl
from bench.core.solver import Denoise, Noise, Plan, Solver


class Heun(Solver):
    order = 2

    def __init__(self) -> None:
        pass

    def nfe_for_steps(self, steps: int) -> int:
        return 2 * steps - 1

    def sample(self, denoise: Denoise, x: Tensor, sigmas: Tensor, plan: Plan, noise: Noise | None = None) -> Tensor:
        sigma_list = sigmas.tolist()
        for sigma, sigma_next in zip(sigma_list[:-1], sigma_list[1:]):
            denoised = denoise(x, sigma)
            if sigma_next == 0:
                return denoised
            x = heun_step(denoise, x, denoised, sigma, sigma_next)
        return x


def heun_step(denoise: Denoise, x: Tensor, denoised: Tensor, sigma: float, sigma_next: float) -> Tensor:
    """From x at sigma (where D(x; sigma) = ``denoised``) to sigma_next > 0: Euler, then the trapezoidal rule."""
    x_euler = torch.lerp(denoised, x, sigma_next / sigma)  # x + (sigma_next - sigma) d, d = (x - D) / sigma
    denoised_next = denoise(x_euler, sigma_next)
    # The trapezoidal rule x + (sigma_next - sigma) (d + d_next) / 2, with d_next = (x_euler - D_next) / sigma_next,
    # equals x_euler + (sigma_next - sigma) / (2 sigma_next) (D - D_next): two passes over the state, not seven
    weight = (sigma_next - sigma) / (2 * sigma_next)
    return torch.add(x_euler, denoised, alpha=weight).sub_(denoised_next, alpha=weight)


@hookimpl
def register_solvers(register):
    register(Heun, name="heun")
