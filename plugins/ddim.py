"""DDIM (Song, Meng and Ermon 2021) in the sigma parametrization.

DDIM's update x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - s_t^2) eps + s_t z, divided by sqrt(a_prev) to go from
VP to sigma = sqrt(1/a - 1), becomes

    x_next = D + sigma_down / sigma * (x - D) + sigma_up * z,
    sigma_up = eta * sigma_next * sqrt(1 - sigma_next^2 / sigma^2),   sigma_down = sqrt(sigma_next^2 - sigma_up^2):

the VP scaling cancels. With eta = 0 this is exactly Euler's step on the probability-flow ODE in sigma (Karras et
al. 2022, section 3 note the same), so deterministic DDIM and `euler` differ only by rounding; what sets DDIM apart
in practice is the schedule it is paired with (`time-uniform`, or a model's `discrete` timesteps). eta = 1 is
ancestral DDPM sampling.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from bench.hookspecs import hookimpl
from bench.core.solver import Denoise, Noise, Plan, Solver


class DDIM(Solver):
    order = 1

    def __init__(self, eta: float = 0.0) -> None:
        if not eta >= 0:
            raise ValueError(f"eta must be >= 0 (0: deterministic DDIM, 1: ancestral DDPM); got {eta!r}")
        self.eta = float(eta)

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        return self.eta > 0

    def sample(self, denoise: Denoise, x: Tensor, sigmas: Tensor, plan: Plan, noise: Noise | None = None) -> Tensor:
        if self.stochastic and noise is None:
            raise ValueError("DDIM with eta > 0 needs a noise source")
        sigma_list = sigmas.tolist()
        for step, (sigma, sigma_next) in enumerate(zip(sigma_list[:-1], sigma_list[1:])):
            denoised = denoise(x, sigma)
            sigma_up = min(sigma_next, self.eta * sigma_next * math.sqrt(1 - (sigma_next / sigma) ** 2))
            sigma_down = math.sqrt(sigma_next**2 - sigma_up**2)
            x = torch.lerp(denoised, x, sigma_down / sigma)  # D + (sigma_down / sigma) (x - D), in one pass
            if sigma_up > 0:
                x.add_(noise(step), alpha=sigma_up)
        return x


@hookimpl
def register_solvers(register):
    register(DDIM, name="ddim")
