"""Heun's second-order method on the probability-flow ODE, as EDM's deterministic sampler (Karras et al. 2022,
Algorithm 1): an Euler step, then the trapezoidal correction with the slope at its end. The step to sigma = 0 is
left as plain Euler (it would divide by sigma = 0), so N steps cost 2N - 1 NFE."""

from __future__ import annotations

from torch import Tensor

from bench.core.numerics import heun_step
from bench.core.solver import Denoise, Noise, Plan, Solver
from bench.hookspecs import hookimpl


class Heun(Solver):
    order = 2

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


@hookimpl
def register_solvers(register):
    register(Heun, name="heun")
