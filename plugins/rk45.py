"""RK45: adaptive Dormand-Prince 5(4) on the probability-flow ODE, as Song et al. (2021) sampled their score SDEs.

Song et al. integrate the VP ODE in t with scipy's RK45 at rtol = atol = 1e-5; here torchdiffeq's dopri5 (the
same Butcher tableau and error controller, on the device) integrates dx/du = x - D(x; e^u) in u = log sigma from
sigma_max to sigma_min, where the flow is smooth at both ends, and the final step x0 = D(x; sigma_min) is the
common one. rtol/atol are swept in place of NFE; every stage is a counted call, rejected steps included. The error
norm is the RMS over the whole batch (torchdiffeq's default, and Song et al.'s on the flattened batch), so the
steps, and thus the NFE, depend on which samples share a batch.
"""

from __future__ import annotations

import math

import torch
import torchdiffeq
from torch import Tensor

from bench.core.solver import AdaptiveSolver, Denoise, Noise, Plan
from bench.hookspecs import hookimpl


class RK45(AdaptiveSolver):
    order = 5  # Dormand-Prince's; as an adaptive solver, its error follows rtol/atol

    def sample(self, denoise: Denoise, x: Tensor, sigmas: Tensor, plan: Plan, noise: Noise | None = None) -> Tensor:
        sigma_max, sigma_min = sigmas[0].item(), sigmas[1].item()

        def velocity(log_sigma: Tensor, x: Tensor) -> Tensor:
            return x - denoise(x, log_sigma.exp())

        log_sigmas = torch.tensor([math.log(sigma_max), math.log(sigma_min)], dtype=x.dtype, device=x.device)
        x_sigma_min = torchdiffeq.odeint(velocity, x, log_sigmas, method="dopri5",
                                         rtol=self.config.rtol, atol=self.config.atol)[-1]
        return denoise(x_sigma_min, sigma_min)


@hookimpl
def register_solvers(register):
    register(RK45, name="rk45", aliases=("dopri5",))
