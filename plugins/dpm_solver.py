"""DPM-Solver (Lu et al. 2022, "DPM-Solver: A Fast ODE Solver for Diffusion Probabilistic Model Sampling in Around
10 Steps"): exponential integrators of the probability-flow ODE written for the noise prediction eps.

In lambda = -log sigma (alpha = 1, x = x0 + sigma eps, so sigma = e^-lambda) the ODE's exact solution from
sigma_s to sigma_t is (Lu et al. 2022, Proposition 3.1, divided by alpha_t)

    x_t = x_s - integral_{lambda_s}^{lambda_t} e^(-lambda) eps(x_lambda, lambda) dlambda :

the linear part of the ODE is solved exactly, and DPM-Solver-k Taylor-expands eps in lambda to order k - 1. With
h = lambda_t - lambda_s and the phi functions of exponential integrators (bench.core.numerics.phi_functions), the
expansion integrates to (their eq. (3.6))

    x_t = x_s - sigma_t h [phi_1(h) eps_s + phi_2(h) (h eps') + phi_3(h) (h^2 eps'') + ...],

and sigma_t h phi_1(h) = sigma_t (e^h - 1) = sigma_s - sigma_t, so DPM-Solver-1 is DDIM, i.e. Euler in sigma. Each
rule below is a small function of h, r and the phi's that returns the weights of the eps's, applied in one pass.

``method`` chooses the class (``dpm-solver`` builds any of them), with ``order`` 1 | 2 | 3 (default 3):
- "singlestep" (default), DPMSolverSinglestep: DPM-Solver-fast (section 3.4): singlestep DPM-Solver-3 steps
  spending the NFE budget exactly, with lower orders at the end (bench.core.singlestep.singlestep_orders). Each
  step of order k evaluates eps at k - 1 intermediate points: ``intermediates="lambda"`` (default) puts them at
  r1 = 1/2 (order 2) or r1 = 1/3, r2 = 2/3 (order 3) of the step in lambda, the paper's recommended values, on a
  grid of one sigma per step; ``intermediates="grid"`` takes them from a grid of one sigma per call, as the
  original code does for time-uniform skips and diffusers' DPMSolverSinglestepScheduler always does.
- "multistep", DPMSolverMultistep: multistep DPM-Solver-2/3, introduced with DPM-Solver++ (Lu et al. 2022b) for
  both predictions (the original code's "dpmsolver" form): the eps of previous steps in place of intermediate
  points, one call per step (a step rule, bench.core.steps), lower orders while the history fills and, with
  ``lower_order_final`` (default True), on the last steps. ``third_order`` sets the weight w of the
  second-derivative term h phi_3 (h^2 eps'') of order 3: the Taylor expansion gives w = 1; the original code
  (multistep_dpm_solver_third_update) and diffusers' DPMSolverMultistepScheduler use w = 1/2, which leaves an
  O(h^3) local error, so their 3M converges at order 2. ``third_order="original"`` (default) keeps their update, so
  that results compare with theirs and with the published numbers; ``third_order="taylor"`` takes the full term.
  Either way the first step is first order, and its O(h^2) local error caps multistep DPM-Solver at order 2 as the
  steps grow (from sigma_max = 80 the "taylor" 3M still fits ~3 over 64..512 steps: tests/test_dpm_solvers.py).
- "adaptive", DPMSolverAdaptive: DPM-Solver-12 (order 2) or DPM-Solver-23 (order 3), section 3.4: each step
  compares a lower- and a higher-order singlestep solution that share their calls and adapts h in lambda to
  ``rtol`` (default 0.05) / ``atol`` (default 0.0078, i.e. 1/128 of data in [-1, 1]). Its NFE is an output.

The step to sigma = 0 is first order, x0 = D(x; sigma_last), as for every solver in the harness.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from bench.core.numerics import linear_combination, phi_functions
from bench.core.options import SolverOptions, option
from bench.core.singlestep import INTERMEDIATES, SinglestepSolver
from bench.core.solver import AdaptiveSolver, Denoise, Noise, Plan, SolverFamily
from bench.core.steps import WARMUP_CAP, MultistepSolver
from bench.hookspecs import hookimpl

H_INIT, THETA = 0.05, 0.9  # adaptive: the first step in lambda, and the safety factor on the new step size
# Multistep order 3: the weight w of the Taylor term h phi_3 (h^2 eps'') (see the module docstring)
THIRD_ORDER_FORMS = {"original": 0.5, "taylor": 1.0}


def noise_prediction(denoise: Denoise, x: Tensor, sigma: float) -> Tensor:
    """eps(x, sigma) = (x - D(x; sigma)) / sigma: the noise the denoiser sees in x."""
    return (x - denoise(x, sigma)) / sigma


# ---------------------------------------------------------- the rules, as weights of eps_0, eps_1, ... (x: 1)

def first_order_weights(h: float, sigma_next: float) -> list[float]:
    """DPM-Solver-1 (section 3.3): x_t = x_s - sigma_t (e^h - 1) eps_s  (e^h - 1 = h phi_1(h)), i.e. DDIM."""
    return [-sigma_next * math.expm1(h)]


def multistep_2_weights(h: float, r: float, sigma_next: float) -> list[float]:
    """Multistep DPM-Solver-2, r = h_prev / h:  x_t = x_s - sigma_t h [phi_1 eps_0 + (phi_1 / 2) d1],
    d1 = (eps_0 - eps_1) / r ~ h eps' (the "dpmsolver" midpoint form); phi_k = phi_k(h)."""
    (phi_1,) = phi_functions(h, 1)
    c, scale = phi_1 / 2, -sigma_next * h
    return [scale * (phi_1 + c / r), scale * (-c / r)]


def multistep_3_weights(h: float, r0: float, r1: float, w: float, sigma_next: float) -> list[float]:
    """Multistep DPM-Solver-3, r0 = h_prev / h, r1 = h_prev_prev / h:

        x_t = x_s - sigma_t h [phi_1 eps_0 + phi_2 d1 + w phi_3 d2],
        d1_0 = (eps_0 - eps_1) / r0,   d1_1 = (eps_1 - eps_2) / r1,
        d1 = d1_0 + r0 / (r0 + r1) (d1_0 - d1_1) ~ h eps',   d2 = 2 (d1_0 - d1_1) / (r0 + r1) ~ h^2 eps'',

    w = 1 the Taylor term, w = 1/2 the published 3M's (module docstring); phi_k = phi_k(h)."""
    phi_1, phi_2, phi_3 = phi_functions(h, 3)
    slope, curvature = r0 / (r0 + r1), 2 / (r0 + r1)
    k0 = phi_2 * (1 + slope) + w * phi_3 * curvature  # phi_2 d1 + w phi_3 d2 = k0 d1_0 + k1 d1_1
    k1 = -phi_2 * slope - w * phi_3 * curvature
    scale = -sigma_next * h
    return [scale * (phi_1 + k0 / r0), scale * (-k0 / r0 + k1 / r1), scale * (-k1 / r1)]


def singlestep_2_weights(h: float, r1: float, sigma: float, sigma_next: float) -> tuple[list[float], list[float]]:
    """Singlestep DPM-Solver-2 (Algorithm 1): a DPM-Solver-1 step to u1 at lambda_s + r1 h, whose eps gives the
    first derivative of eps in lambda:

        u1  = x_s - sigma_s1 r1 h phi_1(r1 h) eps_s
        x_t = x_s - sigma_t h phi_1(h) [eps_s + (eps(u1) - eps_s) / (2 r1)]

    Returns the weights of [eps_s] for u1 and of [eps_s, eps(u1)] for x_t."""
    sigma_s1 = sigma * math.exp(-r1 * h)
    c = -sigma_next * h * phi_functions(h, 1)[0]
    return first_order_weights(r1 * h, sigma_s1), [c * (1 - 1 / (2 * r1)), c / (2 * r1)]


def singlestep_3_weights(h: float, r1: float, r2: float, sigma: float, sigma_next: float
                         ) -> tuple[list[float], list[float], list[float]]:
    """Singlestep DPM-Solver-3 (Algorithm 2): u1 at lambda_s + r1 h by DPM-Solver-1, u2 at lambda_s + r2 h by a
    second-order step that uses eps(u1), and x_t from eps_s and eps(u2):

        u1  = x_s - sigma_s1 r1 h phi_1(r1 h) eps_s
        u2  = x_s - sigma_s2 r2 h [phi_1(r2 h) eps_s + (r2 / r1) phi_2(r2 h) (eps(u1) - eps_s)]
        x_t = x_s - sigma_t h [phi_1(h) eps_s + (1 / r2) phi_2(h) (eps(u2) - eps_s)]

    Returns the weights of [eps_s] for u1, of [eps_s, eps(u1)] for u2 and of [eps_s, eps(u2)] for x_t."""
    sigma_s1, sigma_s2 = sigma * math.exp(-r1 * h), sigma * math.exp(-r2 * h)
    phi_1_r2, phi_2_r2 = phi_functions(r2 * h, 2)
    phi_1, phi_2 = phi_functions(h, 2)
    scale_2, scale = -sigma_s2 * r2 * h, -sigma_next * h
    c2, c = scale_2 * (r2 / r1) * phi_2_r2, scale * phi_2 / r2
    return first_order_weights(r1 * h, sigma_s1), [scale_2 * phi_1_r2 - c2, c2], [scale * phi_1 - c, c]


# ------------------------------------------------------------------------------------------- singlestep steps

def dpm_solver_1(x: Tensor, sigma: float, sigma_next: float, eps: Tensor) -> Tensor:
    """DPM-Solver-1 from x at sigma (where the noise is ``eps``) to sigma_next."""
    return linear_combination(x, 1.0, [eps], first_order_weights(math.log(sigma / sigma_next), sigma_next))


def dpm_solver_2(denoise: Denoise, x: Tensor, sigma: float, sigma_next: float, eps: Tensor,
                 r1: float = 0.5) -> tuple[Tensor, Tensor]:
    """Singlestep DPM-Solver-2 from x at sigma to sigma_next: one more call, at u1. Returns x_t and eps(u1)
    (DPM-Solver-23 reuses it)."""
    h = math.log(sigma / sigma_next)
    u1_weights, weights = singlestep_2_weights(h, r1, sigma, sigma_next)
    eps_s1 = noise_prediction(denoise, linear_combination(x, 1.0, [eps], u1_weights), sigma * math.exp(-r1 * h))
    return linear_combination(x, 1.0, [eps, eps_s1], weights), eps_s1


def dpm_solver_3(denoise: Denoise, x: Tensor, sigma: float, sigma_next: float, eps: Tensor,
                 r1: float = 1 / 3, r2: float = 2 / 3, eps_s1: Tensor | None = None) -> Tensor:
    """Singlestep DPM-Solver-3 from x at sigma to sigma_next: two more calls, at u1 and u2 (``eps_s1`` given:
    eps(u1) is reused, one call)."""
    h = math.log(sigma / sigma_next)
    u1_weights, u2_weights, weights = singlestep_3_weights(h, r1, r2, sigma, sigma_next)
    if eps_s1 is None:
        eps_s1 = noise_prediction(denoise, linear_combination(x, 1.0, [eps], u1_weights), sigma * math.exp(-r1 * h))
    u2 = linear_combination(x, 1.0, [eps, eps_s1], u2_weights)
    eps_s2 = noise_prediction(denoise, u2, sigma * math.exp(-r2 * h))
    return linear_combination(x, 1.0, [eps, eps_s2], weights)


# ---------------------------------------------------------------------------------------------------- solvers

@dataclass(frozen=True)
class _Order(SolverOptions):
    order: int = option(3, choices=(1, 2, 3))


class DPMSolverSinglestep(SinglestepSolver):
    """DPM-Solver-fast with DPM-Solver-1/2/3 steps (module docstring)."""

    @dataclass(frozen=True)
    class Options(_Order):
        method: str = option("singlestep", choices=("singlestep",))
        intermediates: str = option("lambda", choices=INTERMEDIATES)

    def sample(self, denoise: Denoise, x: Tensor, sigmas: Tensor, plan: Plan, noise: Noise | None = None) -> Tensor:
        for order, sigma, sigma_next, r1, r2 in self.intervals(sigmas, plan):
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


class DPMSolverMultistep(MultistepSolver):
    """Multistep DPM-Solver-2/3, the original code's "dpmsolver" form (module docstring)."""

    @dataclass(frozen=True)
    class Options(_Order):
        method: str = option("multistep", choices=("multistep",))
        lower_order_final: bool = True
        third_order: str = option("original", choices=tuple(THIRD_ORDER_FORMS))

        def validate(self) -> None:
            if self.third_order != "original" and self.order != 3:
                raise ValueError(f"third_order={self.third_order!r} applies to method='multistep' with order=3 only")

    prediction = "noise"

    @property
    def order_note(self) -> str:
        if self.config.order < 3:
            return ""
        if self.config.third_order == "original":
            return f"3M as published weights eps'' by 1/2 (third_order='taylor': 1), and {WARMUP_CAP}"
        return WARMUP_CAP

    def step(self, i: int, x: Tensor, eps: tuple[Tensor, ...], sigmas: Tensor, orders: tuple[int, ...],
             noise: Tensor | None) -> Tensor:
        order, sigma_next = orders[i], sigmas[i + 1].item()
        lambdas = [-math.log(sigmas[i - k].item()) for k in range(order)]  # of eps_0 (this step's), eps_1, eps_2
        h = math.log(sigmas[i].item() / sigma_next)
        r = [(lambdas[k] - lambdas[k + 1]) / h for k in range(order - 1)]  # r_k = h_(k+1) / h: earlier steps
        if order == 1:
            weights = first_order_weights(h, sigma_next)
        elif order == 2:
            weights = multistep_2_weights(h, r[0], sigma_next)
        else:
            weights = multistep_3_weights(h, r[0], r[1], THIRD_ORDER_FORMS[self.config.third_order], sigma_next)
        return linear_combination(x, 1.0, eps[::-1], weights)


class DPMSolverAdaptive(AdaptiveSolver):
    """DPM-Solver-12 / -23 (module docstring)."""

    @dataclass(frozen=True)
    class Options(_Order):
        method: str = option("adaptive", choices=("adaptive",))
        rtol: float = 0.05
        atol: float = 0.0078  # the original code's: 1/128 of data in [-1, 1]

        def validate(self) -> None:
            if self.order == 1:
                raise ValueError("method='adaptive' needs order 2 (DPM-Solver-12) or 3 (DPM-Solver-23); got order=1")
            if not (self.rtol > 0 and self.atol > 0):
                raise ValueError(f"rtol and atol must be > 0; got rtol={self.rtol!r}, atol={self.atol!r}")

    @property
    def order(self) -> int:
        return self.config.order

    def sample(self, denoise: Denoise, x: Tensor, sigmas: Tensor, plan: Plan, noise: Noise | None = None) -> Tensor:
        return self.sample_adaptive(denoise, x, sigma_max=float(sigmas[0]), sigma_min=float(sigmas[-2]))

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
            if self.config.order == 2:  # DPM-Solver-12
                x_lower = dpm_solver_1(x, sigma, sigma_next, eps)
                x_higher, _ = dpm_solver_2(denoise, x, sigma, sigma_next, eps, r1=0.5)
            else:  # DPM-Solver-23: the second-order solution's eps(u1) is the third-order one's
                x_lower, eps_s1 = dpm_solver_2(denoise, x, sigma, sigma_next, eps, r1=1 / 3)
                x_higher = dpm_solver_3(denoise, x, sigma, sigma_next, eps, 1 / 3, 2 / 3, eps_s1=eps_s1)
            alpha_next = 1 / math.sqrt(1 + sigma_next**2)
            tolerance = torch.maximum((alpha_next * x_lower).abs(), x_lower_prev.abs()).mul(self.config.rtol)
            scaled = alpha_next * (x_higher - x_lower) / tolerance.clamp(min=self.config.atol)
            error = scaled.flatten(1).pow(2).mean(dim=1).sqrt().max().item()  # the accept/reject sync
            if not math.isfinite(error):
                raise FloatingPointError(f"DPM-Solver adaptive: non-finite error estimate at sigma={sigma:.4g}")
            if error <= 1:
                x, x_lower_prev, sigma, lambda_, eps = x_higher, alpha_next * x_lower, sigma_next, lambda_next, None
            h = THETA * h * error ** (-1 / self.config.order) if error > 0 else math.inf
        return denoise(x, sigma_min)



class DPMSolver(SolverFamily):
    """DPM-Solver: ``method`` "singlestep" (default), "multistep" or "adaptive" builds the class of that name."""

    choose_by, default = "method", "singlestep"
    members = {"singlestep": DPMSolverSinglestep, "multistep": DPMSolverMultistep, "adaptive": DPMSolverAdaptive}

    @classmethod
    def inapplicable(cls, key: str, value: Any, choice: str) -> str:
        messages = {
            "third_order": f"third_order={value!r} applies to method='multistep' with order=3 only",
            "lower_order_final": f"lower_order_final applies to method='multistep' only (method={choice!r} ends with "
                                 "lower orders by construction)",
            "rtol": f"rtol/atol apply to method='adaptive' only; got method={choice!r}",
            "atol": f"rtol/atol apply to method='adaptive' only; got method={choice!r}",
        }
        return messages.get(key) or super().inapplicable(key, value, choice)


@hookimpl
def register_solvers(register):
    register(DPMSolver, name="dpm-solver")
