"""DPM-Solver++(3M) SDE: k-diffusion's sample_dpmpp_3m_sde (ComfyUI's dpmpp_3m_sde), a one-call-per-step solver.

In lambda = -log sigma (h = log(sigma / sigma_next)) the reverse SDE with ``eta`` times the probability-flow
ODE's noise (eta = 1: the reverse SDE of Song et al., eta = 0: the ODE) has the exactly solved linear part

    x_next = e^-H x + integral of e^(-(H - u)) D du + sigma_next sqrt(1 - e^(-2 eta h)) z,   H = (1 + eta) h,

so the D's weights are the ODE's (DPM-Solver++ 3M, Lu et al. 2022b) with h -> H, phi_k = phi_k(-H):

    x_next = e^-H x + H phi_1 D_0 + H phi_2 d1 + H phi_3 d2 + s_noise sigma_next sqrt(1 - e^(-2 eta h)) z,
    d1_0 = (D_0 - D_1) / r0,  d1_1 = (D_1 - D_2) / r1,  d1 = d1_0 + r0 / (r0 + r1) (d1_0 - d1_1),
    d2 = (d1_0 - d1_1) / (r0 + r1),

with r0 = h_prev / h, r1 = h_prev_prev / h from the grid. d2 approximates half of h^2 D'', so the second-derivative
term has half its Taylor weight, as in diffusers' and the original DPM-Solver++ 3M (plugins/dpm_solver_pp.py,
third_order="original"): with eta = 0 the method converges at order 2, not 3. While the history fills, the first step
is first order and the second takes the d1 term alone with d1 = (D_0 - D_1) / r0 (k-diffusion has no lower-order
final steps). The noise z of step i is ``noise(i)``; k-diffusion draws it from a Brownian tree by default, whose
increments over the grid's disjoint intervals are independent standard normals, as ours are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from bench.core.numerics import linear_combination, phi_functions
from bench.core.options import SolverOptions, option
from bench.core.steps import WARMUP_CAP, StepSolver, warmup_orders
from bench.hookspecs import hookimpl

NON_NEGATIVE = dict(check=lambda value: value >= 0, must="be >= 0")


def sde_3m_weights(h: float, eta: float, r: list[float]) -> tuple[float, list[float], float]:
    """The weights of x, of D_0, D_1, D_2 (as many as ``r`` has entries + 1: r = [r0, r1], [r0] or []) and of
    sigma_next z in one step of DPM-Solver++(3M) SDE (module docstring)."""
    H = (1 + eta) * h
    phi_1, phi_2, phi_3 = phi_functions(-H, 3)
    weights = [H * phi_1]  # = 1 - e^-H
    if len(r) == 1:  # + H phi_2 (D_0 - D_1) / r0
        weights = [weights[0] + H * phi_2 / r[0], -H * phi_2 / r[0]]
    elif len(r) == 2:  # + H phi_2 d1 + H phi_3 d2, written as k0 d1_0 + k1 d1_1
        r0, r1 = r
        slope, curvature = r0 / (r0 + r1), 1 / (r0 + r1)
        k0 = H * phi_2 * (1 + slope) + H * phi_3 * curvature
        k1 = -H * phi_2 * slope - H * phi_3 * curvature
        weights = [weights[0] + k0 / r0, -k0 / r0 + k1 / r1, -k1 / r1]
    return math.exp(-H), weights, math.sqrt(-math.expm1(-2 * eta * h))


class DPMPlusPlus3MSDE(StepSolver):
    """DPM-Solver++(3M) SDE (module docstring): ``eta`` (default 1) scales the SDE's noise, ``s_noise`` the draws."""

    @dataclass(frozen=True)
    class Options(SolverOptions):
        eta: float = option(1.0, **NON_NEGATIVE)
        s_noise: float = option(1.0, **NON_NEGATIVE)

    order = 2
    nominal_order = 3
    history = 3

    @property
    def order_note(self) -> str:
        if self.stochastic:
            return ("eta > 0: weak order 2, of the error in distribution, measured on a Gaussian "
                    "(bench.tools.weak_order)")
        return f"its D'' term has half its Taylor weight (as the published 3M), and {WARMUP_CAP}"

    @property
    def stochastic(self) -> bool:
        return self.config.eta > 0 and self.config.s_noise > 0

    def step_orders(self, steps: int) -> tuple[int, ...]:
        return warmup_orders(steps, 3, lower_order_final=False)

    def step(self, i: int, x: Tensor, estimates: tuple[Tensor, ...], sigmas: Tensor, orders: tuple[int, ...],
             noise: Tensor | None) -> Tensor:
        order, sigma_next = orders[i], sigmas[i + 1].item()
        h = math.log(sigmas[i].item() / sigma_next)
        r = [math.log(sigmas[i - k - 1].item() / sigmas[i - k].item()) / h for k in range(order - 1)]
        x_weight, weights, noise_weight = sde_3m_weights(h, self.config.eta, r)
        x = linear_combination(x, x_weight, estimates[::-1], weights)
        if noise is not None:
            x.add_(noise, alpha=self.config.s_noise * sigma_next * noise_weight)
        return x


@hookimpl
def register_solvers(register):
    register(DPMPlusPlus3MSDE, name="dpm++3m-sde", aliases=("dpmpp_3m_sde",))
