"""DPM-Solver (Lu et al. 2022, "DPM-Solver: A Fast ODE Solver for Diffusion Probabilistic Model Sampling in Around
10 Steps"): exponential integrators of the probability-flow ODE written for the noise prediction eps.

In lambda = -log sigma (alpha = 1, x = x0 + sigma eps, so sigma = e^-lambda) the ODE's exact solution from
sigma_s to sigma_t is (Lu et al. 2022, Proposition 3.1, divided by alpha_t)

    x_t = x_s - integral_{lambda_s}^{lambda_t} e^(-lambda) eps(x_lambda, lambda) dlambda :

the linear part of the ODE is solved exactly, and DPM-Solver-k Taylor-expands eps in lambda to order k - 1. With
h = lambda_t - lambda_s, sigma_t (e^h - 1) = sigma_s - sigma_t, so DPM-Solver-1 is DDIM, i.e. Euler in sigma.

Options:
- ``order`` 1 | 2 | 3 (default 3) and ``method``:
  - "singlestep" (default): DPM-Solver-fast (section 3.4): singlestep DPM-Solver-3 steps spending the NFE budget
    exactly, with lower orders at the end (bench.core.multistep.singlestep_orders). Each step of order k evaluates eps
    at k - 1 intermediate points: ``intermediates="lambda"`` (default) puts them at r1 = 1/2 (order 2) or
    r1 = 1/3, r2 = 2/3 (order 3) of the step in lambda, the paper's recommended values, on a grid of one sigma
    per step; ``intermediates="grid"`` takes them from a grid of one sigma per call, as the original code does
    for time-uniform skips and diffusers' DPMSolverSinglestepScheduler always does.
  - "multistep": multistep DPM-Solver-2/3, introduced with DPM-Solver++ (Lu et al. 2022b) for both predictions
    (the original code's "dpmsolver" form): the eps of previous steps in place of intermediate points, one call
    per step, lower orders while the history fills and, with ``lower_order_final`` (default True), on the last
    steps. ``third_order`` sets the weight of the second-derivative term of order 3, see below.
  - "adaptive": DPM-Solver-12 (order 2) or DPM-Solver-23 (order 3), section 3.4: each step
    compares a lower- and a higher-order singlestep solution that share their calls and adapts h in lambda to
    ``rtol`` (default 0.05) / ``atol`` (default 0.0078, i.e. 1/128 of data in [-1, 1]). Its NFE is an output.

The multistep third-order update. With d1 ~ h eps' and d2 = 2 (d1_0 - d1_1) / (r0 + r1) ~ h^2 eps'' from the last
three eps, the Taylor expansion of the integral gives

    x_t = x_s - sigma_t [phi_1 eps_s + phi_2 d1 + phi_3 d2],   phi_1 = e^h - 1, phi_2 = phi_1 / h - 1,
                                                              phi_3 = phi_2 / h - 1/2   (phi_3 ~ h / 6).

The original code (multistep_dpm_solver_third_update) and diffusers' DPMSolverMultistepScheduler apply phi_3 to
(d1_0 - d1_1) / (r0 + r1) = d2 / 2: half the Taylor term. That leaves an O(h^3) local error, so their "3M"
converges at order 2 (tests/test_dpm_solvers.py: fitted slopes 2.05-2.26 over 64..1024 steps on both analytic
models, falling towards 2; with the full term 2.74-3.19, rising towards 3). ``third_order="original"``
(default) keeps their update, so that results compare with theirs and with the published numbers;
``third_order="taylor"`` takes the full term and is third order.

The step to sigma = 0 is first order, x0 = D(x; sigma_last), as for every solver in the harness.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from bench.errors import BenchError
from bench.hookspecs import hookimpl
from bench.core.multistep import (INTERMEDIATES, History, SinglestepInterval, SinglestepOrMultistep, singlestep_intervals,
                             step_pairs)
from bench.core.solver import Denoise, Noise, Plan

METHODS = ("singlestep", "multistep", "adaptive")
ADAPTIVE_DEFAULTS = {"rtol": 0.05, "atol": 0.0078}  # the original code's: atol = 1/128 of data in [-1, 1]
H_INIT, THETA = 0.05, 0.9  # adaptive: the first step in lambda, and the safety factor on the new step size
# Multistep order 3: the weight of the Taylor term -phi_3 h^2 eps'' (see the module docstring)
THIRD_ORDER_FORMS = {"original": 0.5, "taylor": 1.0}


def noise_prediction(denoise: Denoise, x: Tensor, sigma: float) -> Tensor:
    """eps(x, sigma) = (x - D(x; sigma)) / sigma: the noise the denoiser sees in x."""
    return (x - denoise(x, sigma)) / sigma


def dpm_solver_1(x: Tensor, sigma: float, sigma_next: float, eps: Tensor) -> Tensor:
    """DPM-Solver-1 (section 3.3): x_t = x_s - sigma_t (e^h - 1) eps_s, i.e. DDIM."""
    h = math.log(sigma / sigma_next)
    return x - sigma_next * math.expm1(h) * eps


def dpm_solver_2(denoise: Denoise, x: Tensor, sigma: float, sigma_next: float, eps: Tensor,
                 r1: float = 0.5) -> tuple[Tensor, Tensor]:
    """Singlestep DPM-Solver-2 (Algorithm 1): a DPM-Solver-1 step to lambda_s + r1 h gives u1, and eps(u1)
    the first derivative of eps in lambda. Returns x_t and eps(u1) (DPM-Solver-23 reuses it)."""
    h = math.log(sigma / sigma_next)
    sigma_s1 = sigma * math.exp(-r1 * h)
    u1 = x - sigma_s1 * math.expm1(r1 * h) * eps
    eps_s1 = noise_prediction(denoise, u1, sigma_s1)
    x_next = x - sigma_next * math.expm1(h) * eps - sigma_next / (2 * r1) * math.expm1(h) * (eps_s1 - eps)
    return x_next, eps_s1


def dpm_solver_3(denoise: Denoise, x: Tensor, sigma: float, sigma_next: float, eps: Tensor,
                 r1: float = 1 / 3, r2: float = 2 / 3, eps_s1: Tensor | None = None) -> Tensor:
    """Singlestep DPM-Solver-3 (Algorithm 2): u1 at lambda_s + r1 h by DPM-Solver-1, u2 at lambda_s + r2 h by a
    second-order step that uses eps(u1), and x_t from eps_s and eps(u2). ``eps_s1`` given: eps(u1) is reused."""
    h = math.log(sigma / sigma_next)
    sigma_s1, sigma_s2 = sigma * math.exp(-r1 * h), sigma * math.exp(-r2 * h)
    if eps_s1 is None:
        u1 = x - sigma_s1 * math.expm1(r1 * h) * eps
        eps_s1 = noise_prediction(denoise, u1, sigma_s1)
    d1 = eps_s1 - eps
    u2 = (x - sigma_s2 * math.expm1(r2 * h) * eps
          - sigma_s2 * (r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1) * d1)
    d2 = noise_prediction(denoise, u2, sigma_s2) - eps
    return x - sigma_next * math.expm1(h) * eps - sigma_next / r2 * (math.expm1(h) / h - 1) * d2


class DPMSolver(SinglestepOrMultistep):
    """DPM-Solver with the noise prediction; see the module docstring for the options."""

    def __init__(self, order: int = 3, method: str = "singlestep", lower_order_final: bool = True,
                 intermediates: str = "lambda", third_order: str = "original", rtol: float | None = None,
                 atol: float | None = None) -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}; got {method!r}")
        if order not in (1, 2, 3) or isinstance(order, bool):
            raise ValueError(f"order must be 1, 2 or 3; got {order!r}")
        if method == "adaptive" and order == 1:
            raise ValueError("method='adaptive' needs order 2 (DPM-Solver-12) or 3 (DPM-Solver-23); got order=1")
        if intermediates not in INTERMEDIATES:
            raise ValueError(f"intermediates must be one of {', '.join(map(repr, INTERMEDIATES))}; "
                             f"got {intermediates!r}")
        if intermediates != "lambda" and method != "singlestep":
            raise ValueError(f"intermediates={intermediates!r} applies to method='singlestep' only; "
                             f"got method={method!r}")
        if third_order not in THIRD_ORDER_FORMS:
            raise ValueError(f"third_order must be one of {', '.join(map(repr, THIRD_ORDER_FORMS))}; "
                             f"got {third_order!r}")
        if third_order != "original" and not (method == "multistep" and order == 3):
            raise ValueError(f"third_order={third_order!r} applies to method='multistep' with order=3 only")
        if not lower_order_final and method != "multistep":
            raise ValueError(f"lower_order_final applies to method='multistep' only (method={method!r} "
                             "ends with lower orders by construction)")
        if method == "adaptive":
            rtol = ADAPTIVE_DEFAULTS["rtol"] if rtol is None else rtol
            atol = ADAPTIVE_DEFAULTS["atol"] if atol is None else atol
            if not (rtol > 0 and atol > 0):
                raise ValueError(f"rtol and atol must be > 0; got rtol={rtol!r}, atol={atol!r}")
            rtol, atol = float(rtol), float(atol)
        elif rtol is not None or atol is not None:
            raise ValueError(f"rtol/atol apply to method='adaptive' only; got method={method!r}")
        self.order, self.method, self.lower_order_final = order, method, bool(lower_order_final)
        self.intermediates, self.third_order, self.rtol, self.atol = intermediates, third_order, rtol, atol
        self.d2_weight = THIRD_ORDER_FORMS[third_order]

    @property
    def adaptive(self) -> bool:  # type: ignore[override]
        return self.method == "adaptive"

    def plan(self, nfe: int | None = None) -> Plan:
        if self.adaptive:
            if nfe is not None:
                raise BenchError(f"solver {self.describe()} is adaptive: give it rtol/atol (a suite's "
                                 f"`tolerances`), not an NFE budget (got nfe={nfe})")
            return Plan(steps=0, nfe=0)  # the steps are chosen while it runs; the counted NFE is the answer
        return super().plan(nfe)

    def sample(self, denoise: Denoise, x: Tensor, sigmas: Tensor, plan: Plan, noise: Noise | None = None) -> Tensor:
        if self.method == "multistep":
            return self.sample_multistep(denoise, x, sigmas, plan.orders)
        if self.method == "adaptive":
            return self.sample_adaptive(denoise, x, sigma_max=float(sigmas[0]), sigma_min=float(sigmas[-2]))
        return self.sample_singlestep(denoise, x, singlestep_intervals(sigmas, plan.orders, self.intermediates))

    def sample_singlestep(self, denoise: Denoise, x: Tensor, intervals: list[SinglestepInterval]) -> Tensor:
        for order, sigma, sigma_next, r1, r2 in intervals:
            if sigma_next == 0:
                return denoise(x, sigma)
            eps = noise_prediction(denoise, x, sigma)
            if order == 1:
                x = dpm_solver_1(x, sigma, sigma_next, eps)
            elif order == 2:
                x, _ = dpm_solver_2(denoise, x, sigma, sigma_next, eps, r1)
            else:
                x = dpm_solver_3(denoise, x, sigma, sigma_next, eps, r1, r2)
        return x

    def sample_multistep(self, denoise: Denoise, x: Tensor, sigmas: Tensor, orders: tuple[int, ...]) -> Tensor:
        """Multistep DPM-Solver (the original code's multistep_dpm_solver_*_update, "dpmsolver" form): the
        derivatives of eps in lambda come from divided differences of the last eps, r_k = h_k / h."""
        history = History(3)  # (lambda, eps) of the last steps, newest last
        for (_, sigma, sigma_next), order in zip(step_pairs(sigmas), orders):
            if sigma_next == 0:
                return denoise(x, sigma)
            eps = noise_prediction(denoise, x, sigma)
            lambda_, h = -math.log(sigma), math.log(sigma / sigma_next)
            history.push((lambda_, eps))
            phi_1 = math.expm1(h)
            if order == 1:
                x = x - sigma_next * phi_1 * eps
            elif order == 2:
                lambda_1, eps_1 = history[-2]
                r0 = (lambda_ - lambda_1) / h
                d1 = (eps - eps_1) / r0
                x = x - sigma_next * phi_1 * eps - 0.5 * sigma_next * phi_1 * d1
            else:
                (lambda_2, eps_2), (lambda_1, eps_1) = history[-3], history[-2]
                r0, r1 = (lambda_ - lambda_1) / h, (lambda_1 - lambda_2) / h
                d1_0, d1_1 = (eps - eps_1) / r0, (eps_1 - eps_2) / r1
                d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)  # h eps', second-order accurate
                d2 = 2 * (d1_0 - d1_1) / (r0 + r1)  # h^2 eps''
                phi_2 = phi_1 / h - 1
                phi_3 = phi_2 / h - 0.5
                x = x - sigma_next * phi_1 * eps - sigma_next * phi_2 * d1 - self.d2_weight * sigma_next * phi_3 * d2
        return x

    def sample_adaptive(self, denoise: Denoise, x: Tensor, sigma_max: float, sigma_min: float) -> Tensor:
        """DPM-Solver-12 / -23 (Lu et al. 2022, section 3.4; the original code's dpm_solver_adaptive): from the same
        calls, a lower-order solution x_lower and a higher-order one x_higher; accept when their scaled RMS
        difference E <= 1, and set the next h = theta h E^(-1/order) either way.

        The error is measured on the VP sample alpha_t x (alpha_t = 1 / sqrt(1 + sigma_t^2)), as the original code
        does on VP models, so that rtol/atol mean what they mean there; the norm is per sample and the step is
        shared by the batch (the largest E decides). eps at the start of a step is kept across rejected tries, so
        a rejection costs order - 1 calls, not order as in the original code."""
        lambda_, lambda_end = -math.log(sigma_max), -math.log(sigma_min)
        sigma, h = sigma_max, H_INIT
        x_lower_prev = x / math.sqrt(1 + sigma_max**2)  # VP; the original's x_prev, the relative-tolerance scale
        eps = None
        while lambda_ < lambda_end:
            lambda_next = min(lambda_ + h, lambda_end)
            h = lambda_next - lambda_  # the step tried
            sigma_next = sigma_min if lambda_next == lambda_end else math.exp(-lambda_next)
            if eps is None:
                eps = noise_prediction(denoise, x, sigma)
            if self.order == 2:  # DPM-Solver-12
                x_lower = dpm_solver_1(x, sigma, sigma_next, eps)
                x_higher, _ = dpm_solver_2(denoise, x, sigma, sigma_next, eps, r1=0.5)
            else:  # DPM-Solver-23: the second-order solution's eps(u1) is the third-order one's
                x_lower, eps_s1 = dpm_solver_2(denoise, x, sigma, sigma_next, eps, r1=1 / 3)
                x_higher = dpm_solver_3(denoise, x, sigma, sigma_next, eps, 1 / 3, 2 / 3, eps_s1=eps_s1)
            alpha_next = 1 / math.sqrt(1 + sigma_next**2)
            tolerance = torch.maximum((alpha_next * x_lower).abs(), x_lower_prev.abs()).mul(self.rtol)
            scaled = alpha_next * (x_higher - x_lower) / tolerance.clamp(min=self.atol)
            error = scaled.flatten(1).pow(2).mean(dim=1).sqrt().max().item()  # the accept/reject sync
            if not math.isfinite(error):
                raise FloatingPointError(f"DPM-Solver adaptive: non-finite error estimate at sigma={sigma:.4g}")
            if error <= 1:
                x, x_lower_prev, sigma, lambda_, eps = x_higher, alpha_next * x_lower, sigma_next, lambda_next, None
            h = THETA * h * error ** (-1 / self.order) if error > 0 else math.inf
        return denoise(x, sigma_min)


@hookimpl
def register_solvers(register):
    register(DPMSolver, name="dpm-solver")
