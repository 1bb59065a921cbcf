"""DDIM (Song, Meng and Ermon 2021) in the sigma parametrization.

DDIM's update x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - s_t^2) eps + s_t z, divided by sqrt(a_prev) to go from
VP to sigma = sqrt(1/a - 1), becomes

    x_next = D + sigma_down / sigma * (x - D) + sigma_up * z,
    sigma_up = eta * sigma_next * sqrt(1 - sigma_next^2 / sigma^2),   sigma_down = sqrt(sigma_next^2 - sigma_up^2):

the VP scaling cancels. With eta = 0 this is exactly Euler's step on the probability-flow ODE in sigma (Karras et
al. 2022, section 3 note the same), so deterministic DDIM and `euler` differ only by rounding; what sets DDIM apart
in practice is the schedule it is paired with (`time-uniform`, or a model's `discrete` timesteps). eta = 1 is
ancestral DDPM sampling, whose samples converge in distribution (weak order 1), not along the ODE trajectory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from bench.core.options import SolverOptions, option
from bench.core.steps import StepSolver
from bench.hookspecs import hookimpl


def ddim_sigmas(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """(sigma_down, sigma_up): the deterministic part of the step goes to sigma_down, fresh noise of scale sigma_up
    brings it back to sigma_next (sigma_down^2 + sigma_up^2 = sigma_next^2)."""
    sigma_up = min(sigma_next, eta * sigma_next * math.sqrt(1 - (sigma_next / sigma) ** 2))
    return math.sqrt(sigma_next**2 - sigma_up**2), sigma_up


class DDIM(StepSolver):
    @dataclass(frozen=True)
    class Options(SolverOptions):
        eta: float = option(0.0, check=lambda eta: eta >= 0,
                            must="be >= 0 (0: deterministic DDIM, 1: ancestral DDPM)")

    order = 1

    @property
    def stochastic(self) -> bool:
        return self.config.eta > 0

    @property
    def order_note(self) -> str:
        if self.stochastic:
            return "eta > 0: weak order 1, of the error in distribution, which trajectory slopes do not measure"
        return ""

    def step(self, i: int, x: Tensor, estimates: tuple[Tensor, ...], sigmas: Tensor, orders: tuple[int, ...],
             noise: Tensor | None) -> Tensor:
        sigma, denoised = sigmas[i].item(), estimates[-1]
        sigma_down, sigma_up = ddim_sigmas(sigma, sigmas[i + 1].item(), self.config.eta)
        x = torch.lerp(denoised, x, sigma_down / sigma)  # D + (sigma_down / sigma) (x - D), in one pass
        if sigma_up > 0:
            x.add_(noise, alpha=sigma_up)
        return x


@hookimpl
def register_solvers(register):
    register(DDIM, name="ddim")
