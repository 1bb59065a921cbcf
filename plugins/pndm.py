"""PNDM (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds") and iPNDM (Zhang and Chen
2023, "Fast Sampling of Diffusion Models with Exponential Integrator", the improved PNDM), in the sigma
parametrization.

PNDM splits a step into a gradient part, an estimate eps' of the noise over the step, and a transfer part, DDIM's
update with that estimate (their eq. (9)). Divided by alpha, DDIM's update is a plain Euler step in sigma on
dx/dsigma = eps, so every step here is

    x_next = x + (sigma_next - sigma) eps'

and the methods differ in eps':

- pseudo linear multistep (PLMS, eq. (13)): the fixed Adams-Bashforth combination of the last estimates at the
  grid points, e.g. eps' = (55 eps_0 - 59 eps_1 + 37 eps_2 - 9 eps_3) / 24 (eps_0 newest);
- pseudo Runge-Kutta (eq. (12)): eps' = (eps_1 + 2 eps_2 + 2 eps_3 + eps_4) / 6 from three transfers out of x,
  to the half step, again to the half step, and to the full step; 4 NFE per step. The half step is the midpoint
  in VP time t, as in the official code (whose time is DDPM's discrete timestep, t ~ timestep / 1000:
  bench.core.numerics.vp_time);
- pseudo improved Euler: eps' = (eps_0 + eps(x + (sigma_next - sigma) eps_0, sigma_next)) / 2; 2 NFE.

Methods of ``pndm``:

- ``f-pndm``: three pseudo Runge-Kutta steps, then 4-step PLMS. 3 x 4 NFE for the warm-up plus one per remaining
  step, the last (to sigma = 0) included: NFE = 12 + (steps - 3) = steps + 9 (steps >= 4). It is diffusers'
  PNDMScheduler default (``skip_prk_steps=False``), whose half step is the integer timestep halfway.
- ``s-pndm``: one pseudo improved Euler step, then 2-step PLMS: NFE = steps + 1.
- ``plms``: diffusers' PNDMScheduler with ``skip_prk_steps=True`` (crowsonkb's PLMS in latent-diffusion): one pseudo
  improved Euler step, then PLMS of order 2, 3, 4 as estimates accumulate. NFE = steps + 1, which is diffusers'
  "51 calls for 50 steps": its timesteps repeat the second one ([980, 960, 960, 940, ...]) because the first step
  is taken twice, once to get eps at the Euler-predicted point and once more from the same start with the average.
  Quirk kept: that intermediate estimate is not stored, so the PLMS history holds eps at the grid points only (as
  in PNDM's improved Euler). Quirk not kept: diffusers' last call (at timestep 0) steps to "timestep -1", which
  with ``set_alpha_to_one=False`` (its default) is timestep 0 again, so that call changes nothing and diffusers
  returns x at sigma(0) ~ 0.01, noise included; here that call is the step to sigma = 0, x0 = D(x; sigma_last),
  the harness's common endpoint, so the same 51 calls end on the denoised sample.

``ipndm``: Adams-Bashforth in sigma on dx/dsigma = eps with the fixed coefficients of PLMS and a lower-order
warm-up (order min(order, i + 1) at step i) instead of Runge-Kutta: NFE = steps, one call per step, so it is
written as a step rule (bench.core.steps). It is what diffusers' IPNDMScheduler (tests/test_multistep_parity.py)
and the EDM-family samplers (zju-pi/diff-sampler's ``ipndm``) run. PNDM's methods call the model several times in
their warm-up steps: they run their own loop.

All steps but the last (x0 = D(x; sigma_last)) follow the rules above.

Order. The Adams-Bashforth weights assume equal steps, but the transfer multiplies them by the current step in
sigma, so on a grid that is not uniform in sigma a step is exact only for eps constant over it (already AB2 with
eps linear in sigma is off by the change of step size): local error O(h^3), and PLMS, PNDM and iPNDM converge at
order 2 on karras and logsnr grids whatever their nominal order (tests/test_multistep_solvers.py). That is the
price of fixed coefficients on variable grids; the variable-step Adams-Bashforth in sigma is DEIS ``rhoab``, which
iPNDM equals on a grid uniform in sigma (karras with rho = 1), and which is capped at 2 by its first-order warm-up
step all the same. ``nominal_order`` is that of the interpolation behind the weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from bench.core.numerics import linear_combination, vp_sigma, vp_time
from bench.core.options import SolverOptions, option
from bench.core.solver import Denoise, Noise, Plan, Solver
from bench.core.steps import WARMUP_CAP, StepSolver, warmup_orders
from bench.hookspecs import hookimpl

METHODS = ("f-pndm", "s-pndm", "plms")

# Adams-Bashforth weights for equal steps, newest estimate first
ADAMS_BASHFORTH = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12),
                   4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}
FIXED_WEIGHTS_NOTE = ("Adams-Bashforth's equal-step weights on a grid not uniform in sigma (karras, logsnr) leave an "
                      "O(h^3) local error")


def pseudo_linear_multistep_weights(order: int, sigma: float, sigma_next: float) -> list[float]:
    """The transfer x_next = x + (sigma_next - sigma) eps', eps' = sum_j b_j eps_j the ``order``-step
    Adams-Bashforth combination of the newest estimates (PNDM eq. (13)): the weights (sigma_next - sigma) b_j of
    eps_0 (newest), eps_1, ..."""
    return [(sigma_next - sigma) * b for b in ADAMS_BASHFORTH[order]]


def vp_midpoints(sigmas: Tensor) -> list[float]:
    """For each step of the grid between nonzero sigmas, the sigma at its midpoint in VP time."""
    t = torch.from_numpy(vp_time(sigmas[:-1].numpy()))
    return vp_sigma(0.5 * (t[:-1] + t[1:])).tolist()


class PNDM(Solver):
    """F-PNDM, S-PNDM or diffusers' PLMS (module docstring)."""

    @dataclass(frozen=True)
    class Options(SolverOptions):
        method: str = option("f-pndm", choices=METHODS)

    order = 2
    order_note = FIXED_WEIGHTS_NOTE

    @property
    def nominal_order(self) -> int:
        return 2 if self.config.method == "s-pndm" else 4

    def warmup_steps(self, steps: int) -> int:
        """How many steps are pseudo Runge-Kutta (F-PNDM: 3) or pseudo improved Euler (1), never the last."""
        return min(3 if self.config.method == "f-pndm" else 1, steps - 1)

    def nfe_for_steps(self, steps: int) -> int:
        calls_per_warmup_step = 4 if self.config.method == "f-pndm" else 2
        return steps + (calls_per_warmup_step - 1) * self.warmup_steps(steps)

    def step_orders(self, steps: int) -> tuple[int, ...]:
        """The order of eps' at each step: the warm-up's, then the PLMS order in use; the last step is 1."""
        warmup, method = self.warmup_steps(steps), self.config.method
        return tuple((4 if method == "f-pndm" else 2) if i < warmup else (2 if method == "s-pndm" else min(4, i + 1))
                     for i in range(steps - 1)) + (1,)

    def sample(self, denoise: Denoise, x: Tensor, sigmas: Tensor, plan: Plan, noise: Noise | None = None) -> Tensor:
        warmup = self.warmup_steps(plan.steps)
        sigma_mids = vp_midpoints(sigmas) if self.config.method == "f-pndm" else None
        sigma_list = sigmas.tolist()
        eps_history: tuple[Tensor, ...] = ()  # eps at the grid points, newest last
        for i, order in enumerate(plan.orders):
            sigma, sigma_next = sigma_list[i], sigma_list[i + 1]
            denoised = denoise(x, sigma)
            if sigma_next == 0:
                return denoised
            eps = (x - denoised) / sigma
            eps_history = (*eps_history, eps)[-4:]
            if i < warmup:
                if self.config.method == "f-pndm":
                    eps_prime = self.pseudo_runge_kutta(denoise, x, eps, sigma, sigma_mids[i], sigma_next)
                else:
                    eps_prime = self.pseudo_improved_euler(denoise, x, eps, sigma, sigma_next)
                x = x + (sigma_next - sigma) * eps_prime  # the transfer: DDIM's step, eq. (9)
            else:
                weights = pseudo_linear_multistep_weights(order, sigma, sigma_next)
                x = linear_combination(x, 1.0, eps_history[::-1], weights)
        return x

    @staticmethod
    def pseudo_improved_euler(denoise: Denoise, x: Tensor, eps: Tensor, sigma: float, sigma_next: float) -> Tensor:
        """eps' of the pseudo improved Euler step: the mean of eps here and at the end of the DDIM (Euler) step."""
        x_euler = x + (sigma_next - sigma) * eps
        eps_next = (x_euler - denoise(x_euler, sigma_next)) / sigma_next
        return (eps + eps_next) / 2

    @staticmethod
    def pseudo_runge_kutta(denoise: Denoise, x: Tensor, eps_1: Tensor, sigma: float, sigma_mid: float,
                           sigma_next: float) -> Tensor:
        """eps' of PNDM eq. (12): three transfers out of x, to the half step sigma_mid and to sigma_next."""

        def eps_at(x_, sigma_):
            return (x_ - denoise(x_, sigma_)) / sigma_

        eps_2 = eps_at(x + (sigma_mid - sigma) * eps_1, sigma_mid)
        eps_3 = eps_at(x + (sigma_mid - sigma) * eps_2, sigma_mid)
        eps_4 = eps_at(x + (sigma_next - sigma) * eps_3, sigma_next)
        return (eps_1 + 2 * eps_2 + 2 * eps_3 + eps_4) / 6


class IPNDM(StepSolver):
    """iPNDM of ``order`` 1..4: fixed-coefficient Adams-Bashforth in sigma with a lower-order warm-up."""

    @dataclass(frozen=True)
    class Options(SolverOptions):
        order: int = option(4, choices=(1, 2, 3, 4))

    prediction = "noise"

    @property
    def nominal_order(self) -> int:
        return self.config.order

    @property
    def order(self) -> int:
        return min(self.config.order, 2)

    @property
    def order_note(self) -> str:
        if self.config.order <= 2:
            return ""
        return f"{FIXED_WEIGHTS_NOTE}, and {WARMUP_CAP}"

    @property
    def history(self) -> int:
        return self.config.order

    def step_orders(self, steps: int) -> tuple[int, ...]:
        return warmup_orders(steps, self.config.order, lower_order_final=False)

    def step(self, i: int, x: Tensor, eps: tuple[Tensor, ...], sigmas: Tensor, orders: tuple[int, ...],
             noise: Tensor | None) -> Tensor:
        weights = pseudo_linear_multistep_weights(orders[i], sigmas[i].item(), sigmas[i + 1].item())
        return linear_combination(x, 1.0, eps[::-1], weights)  # x + (sigma_next - sigma) sum_j b_j eps_j


@hookimpl
def register_solvers(register):
    register(PNDM, name="pndm")
    register(IPNDM, name="ipndm")
