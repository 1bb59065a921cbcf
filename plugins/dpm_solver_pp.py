"""DPM-Solver++ (Lu et al. 2022b, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
Models"): the exponential integrators of DPM-Solver written for the data prediction D = x0(x; sigma).

In lambda = -log sigma (alpha = 1, x = x0 + sigma eps) the exact solution from sigma_s to sigma_t is

    x_t = (sigma_t / sigma_s) x_s + sigma_t * integral_{lambda_s}^{lambda_t} e^lambda D(x_lambda, lambda) dlambda,

and DPM-Solver++ Taylor-expands D in lambda. With h = lambda_t - lambda_s and the phi functions of exponential
integrators (bench.core.numerics.phi_functions), the expansion integrates to

    x_t = e^-h x_s + h phi_1(-h) D_s + h phi_2(-h) (h D') + h phi_3(-h) (h^2 D'') + ...,

whose first term is DDIM: x_t = D_s + (sigma_t / sigma_s) (x_s - D_s), a convex combination of x_s and D_s. D stays
in the data's range where a guided eps is amplified, and the update cannot overshoot it: the paper's reason why this
form stays stable under strong guidance. Each rule below is a small function of h, r and the phi's that returns
the weights of x and of the D's, applied in one pass (bench.core.numerics.linear_combination).

``method`` chooses the class (``dpm-solver++`` builds either):
- "multistep" (default), DPMSolverPlusPlusMultistep, with ``order`` 1 | 2 (default) | 3: DPM-Solver++(2M)
  (Algorithm 2) and 3M (the original code and diffusers), one call per step: a step rule (bench.core.steps). The
  derivatives of D in lambda come from the previous steps' D, with lower orders while the history fills and, with
  ``lower_order_final`` (default True), on the last steps. ``solver_type`` "midpoint" (default) | "heun" chooses the
  form of the second-order term as diffusers does ("midpoint" is the paper's 2M, "heun" the Taylor term, the
  original code's "taylor"). ``third_order`` "original" (default) | "taylor" sets the weight w of 3M's
  second-derivative term, h phi_3 (h^2 D''): the Taylor expansion gives w = 1; the original code and diffusers use
  w = 1/2, which leaves an O(h^3) local error in every step, so their 3M converges at order 2 (with w = 1 it fits
  ~3 over the usual budgets: tests/test_dpm_solvers.py). The default keeps theirs, so that results compare with
  theirs and with published numbers.
  Either way 3M's first step is first order (one D to go on): as the steps grow its O(h^2) local error caps every
  multistep DPM-Solver++ at order 2, though from sigma_max = 80 the flow shrinks it enough that 3M-taylor shows
  ~3 over 64..512 steps.
- "singlestep", DPMSolverPlusPlusSinglestep: DPM-Solver++(2S) (Algorithm 1) and its third-order version from the
  original code, allocated as DPM-Solver-fast (bench.core.singlestep.singlestep_orders; the budget is spent exactly),
  with intermediate points at r1 = 1/2, or r1 = 1/3 and r2 = 2/3 in lambda (``intermediates="lambda"``) or at the
  grid points of a grid with one sigma per call (``intermediates="grid"``, as diffusers' singlestep scheduler).
- ``sde=True`` (multistep, order 1 or 2): SDE-DPM-Solver++(2M), the exponential integrator of the reverse SDE (Lu
  et al. 2022b) in its 2M form: k-diffusion's ``sample_dpmpp_2m_sde`` with eta = 1, diffusers'
  ``algorithm_type="sde-dpmsolver++"``. The linear part is solved exactly, as for the ODE:

      x_t = (sigma_t / sigma_s) e^-h x_s + 2 integral_{lambda_s}^{lambda_t} e^(-2 (lambda_t - lambda)) D dlambda
            + sigma_t sqrt(1 - e^(-2h)) z,

  so its weights are the ODE's with h -> 2h (sigma_t / sigma_s = e^-h), plus fresh noise z = ``noise(step)``.
  Its samples follow the data distribution, not the ODE trajectory from x_T.

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
from bench.core.solver import Denoise, Fixed, Noise, Plan, SolverFamily, preset
from bench.core.steps import WARMUP_CAP, MultistepSolver
from bench.hookspecs import hookimpl

SOLVER_TYPES = ("midpoint", "heun")
# 3M: the weight w of the Taylor term h phi_3 (h^2 D'') (see the module docstring)
THIRD_ORDER_FORMS = {"original": 0.5, "taylor": 1.0}
STOCHASTIC_NOTE = ("stochastic: the published order, of the error in distribution, which trajectory slopes do not "
                   "measure")


# ------------------------------------------------------------------ the rules, as weights of x and D_0, D_1, D_2

def first_order_weights(h: float) -> tuple[float, list[float]]:
    """DPM-Solver++ first order, DDIM: x_t = e^-h x_s + (1 - e^-h) D_0  (1 - e^-h = h phi_1(-h))."""
    return math.exp(-h), [-math.expm1(-h)]


def multistep_2m_weights(h: float, r: float, solver_type: str) -> tuple[float, list[float]]:
    """DPM-Solver++(2M), r = h_prev / h:  x_t = e^-h x_s + h phi_1 D_0 + c d1,  d1 = (D_0 - D_1) / r ~ h D',
    with c = h phi_1 / 2 ("midpoint", Algorithm 2: D_0 + (D_0 - D_1) / (2r) stands for D over the step) or
    c = h phi_2 ("heun": the Taylor term); phi_k = phi_k(-h)."""
    phi_1, phi_2 = phi_functions(-h, 2)
    c = h * phi_1 / 2 if solver_type == "midpoint" else h * phi_2
    return math.exp(-h), [h * phi_1 + c / r, -c / r]


def multistep_3m_weights(h: float, r0: float, r1: float, w: float) -> tuple[float, list[float]]:
    """DPM-Solver++(3M), r0 = h_prev / h, r1 = h_prev_prev / h:

        x_t = e^-h x_s + h phi_1 D_0 + h phi_2 d1 + w h phi_3 d2,
        d1_0 = (D_0 - D_1) / r0,   d1_1 = (D_1 - D_2) / r1,
        d1 = d1_0 + r0 / (r0 + r1) (d1_0 - d1_1) ~ h D',   d2 = 2 (d1_0 - d1_1) / (r0 + r1) ~ h^2 D'',

    w = 1 the Taylor term, w = 1/2 the published 3M's (module docstring); phi_k = phi_k(-h)."""
    phi_1, phi_2, phi_3 = phi_functions(-h, 3)
    slope, curvature = r0 / (r0 + r1), 2 / (r0 + r1)
    # h phi_2 d1 + w h phi_3 d2 = k0 d1_0 + k1 d1_1
    k0 = h * phi_2 * (1 + slope) + w * h * phi_3 * curvature
    k1 = -h * phi_2 * slope - w * h * phi_3 * curvature
    return math.exp(-h), [h * phi_1 + k0 / r0, -k0 / r0 + k1 / r1, -k1 / r1]


def sde_2m_weights(h: float, r: float | None, solver_type: str) -> tuple[float, list[float], float]:
    """SDE-DPM-Solver++(2M): the ODE's rule with h -> 2h in the D's weights, x damped to e^-2h, plus fresh noise:

        x_t = e^-2h x_s + 2h phi_1 D_0 + c d1 + sqrt(1 - e^-2h) sigma_t z,   d1 = (D_0 - D_1) / r,

    c = h phi_1 ("midpoint") or 2h phi_2 ("heun"), phi_k = phi_k(-2h); ``r`` None: first order. Returns the weights
    of x, of D_0 (and D_1), and of sigma_t z."""
    phi_1, phi_2 = phi_functions(-2 * h, 2)
    noise_weight = math.sqrt(-math.expm1(-2 * h))
    if r is None:
        return math.exp(-2 * h), [2 * h * phi_1], noise_weight
    c = h * phi_1 if solver_type == "midpoint" else 2 * h * phi_2
    return math.exp(-2 * h), [2 * h * phi_1 + c / r, -c / r], noise_weight


def singlestep_2s_weights(h: float, r1: float) -> tuple[tuple[float, list[float]], tuple[float, list[float]]]:
    """DPM-Solver++(2S) (Algorithm 1): a first-order step to u at lambda_s + r1 h, then D over the step taken as
    (1 - 1/(2 r1)) D_s + 1/(2 r1) D(u):

        u   = e^(-r1 h) x_s + (1 - e^(-r1 h)) D_s
        x_t = e^-h x_s + (1 - e^-h) [(1 - 1/(2 r1)) D_s + 1/(2 r1) D(u)]

    Returns the weights of (x, [D_s]) for u and of (x, [D_s, D(u)]) for x_t."""
    one_minus_e = -math.expm1(-h)
    return first_order_weights(r1 * h), (math.exp(-h), [one_minus_e * (1 - 1 / (2 * r1)), one_minus_e / (2 * r1)])


def singlestep_3s_weights(h: float, r1: float, r2: float
                          ) -> tuple[tuple[float, list[float]], tuple[float, list[float]], tuple[float, list[float]]]:
    """Singlestep DPM-Solver++ of order 3 (the original code's third-order singlestep update: DPM-Solver-3's scheme,
    Algorithm 2 of Lu et al. 2022, with D for eps), phi_k(z) written phi_k:

        u1  = e^(-r1 h) x_s + r1 h phi_1(-r1 h) D_s
        u2  = e^(-r2 h) x_s + r2 h phi_1(-r2 h) D_s + (r2 / r1) r2 h phi_2(-r2 h) (D(u1) - D_s)
        x_t = e^-h x_s + h phi_1(-h) D_s + (1 / r2) h phi_2(-h) (D(u2) - D_s)

    Returns the weights of (x, [D_s]) for u1, of (x, [D_s, D(u1)]) for u2 and of (x, [D_s, D(u2)]) for x_t."""
    phi_1, phi_2 = phi_functions(-h, 2)
    phi_1_r2, phi_2_r2 = phi_functions(-r2 * h, 2)
    c2 = (r2 / r1) * r2 * h * phi_2_r2
    c = h * phi_2 / r2
    return (first_order_weights(r1 * h), (math.exp(-r2 * h), [r2 * h * phi_1_r2 - c2, c2]),
            (math.exp(-h), [h * phi_1 - c, c]))


# ------------------------------------------------------------------------------------------- singlestep steps

def dpm_solver_pp_1(x: Tensor, sigma: float, sigma_next: float, denoised: Tensor) -> Tensor:
    """The first-order step as the convex combination x_t = D_s + (sigma_t / sigma_s) (x_s - D_s): one lerp."""
    return torch.lerp(denoised, x, sigma_next / sigma)


def dpm_solver_pp_2s(denoise: Denoise, x: Tensor, sigma: float, sigma_next: float, denoised: Tensor,
                     r1: float = 0.5) -> Tensor:
    """DPM-Solver++(2S) from x at sigma (where D = ``denoised``) to sigma_next: one more call, at u."""
    h = math.log(sigma / sigma_next)
    (u_x, u_d), (x_weight, weights) = singlestep_2s_weights(h, r1)
    u = linear_combination(x, u_x, [denoised], u_d)
    return linear_combination(x, x_weight, [denoised, denoise(u, sigma * math.exp(-r1 * h))], weights)


def dpm_solver_pp_3s(denoise: Denoise, x: Tensor, sigma: float, sigma_next: float, denoised: Tensor,
                     r1: float = 1 / 3, r2: float = 2 / 3) -> Tensor:
    """Singlestep DPM-Solver++ of order 3 from x at sigma to sigma_next: two more calls, at u1 and u2."""
    h = math.log(sigma / sigma_next)
    (u1_x, u1_d), (u2_x, u2_d), (x_weight, weights) = singlestep_3s_weights(h, r1, r2)
    u1 = linear_combination(x, u1_x, [denoised], u1_d)
    u2 = linear_combination(x, u2_x, [denoised, denoise(u1, sigma * math.exp(-r1 * h))], u2_d)
    return linear_combination(x, x_weight, [denoised, denoise(u2, sigma * math.exp(-r2 * h))], weights)


# ---------------------------------------------------------------------------------------------------- solvers

class DPMSolverPlusPlusMultistep(MultistepSolver):
    """DPM-Solver++(2M), 3M and SDE-DPM-Solver++(2M) (module docstring)."""

    @dataclass(frozen=True)
    class Options(SolverOptions):
        order: int = option(2, choices=(1, 2, 3))
        method: str = option("multistep", choices=("multistep",))
        lower_order_final: bool = True
        solver_type: str = option("midpoint", choices=SOLVER_TYPES)
        third_order: str = option("original", choices=tuple(THIRD_ORDER_FORMS))
        sde: bool = False

        def validate(self) -> None:
            if self.third_order != "original" and self.order != 3:
                raise ValueError(f"third_order={self.third_order!r} applies to method='multistep' with order=3 only")
            if self.sde and self.order == 3:
                raise ValueError("sde=True supports order 1 or 2 (SDE-DPM-Solver++(2M)); got order=3")

    @property
    def order_note(self) -> str:
        if self.config.sde:
            return STOCHASTIC_NOTE
        if self.config.order < 3:
            return ""
        if self.config.third_order == "original":
            return f"3M as published weights D'' by 1/2 (third_order='taylor': 1), and {WARMUP_CAP}"
        return WARMUP_CAP

    @property
    def stochastic(self) -> bool:
        return self.config.sde

    def step(self, i: int, x: Tensor, denoised: tuple[Tensor, ...], sigmas: Tensor, orders: tuple[int, ...],
             noise: Tensor | None) -> Tensor:
        order, config = orders[i], self.config
        lambdas = [-math.log(sigmas[i - k].item()) for k in range(order)]  # of D_0 (this step's), D_1, D_2
        h = math.log(sigmas[i].item() / sigmas[i + 1].item())
        r = [(lambdas[k] - lambdas[k + 1]) / h for k in range(order - 1)]  # r_k = h_(k+1) / h: earlier steps
        newest_first = denoised[::-1]
        if config.sde:
            x_weight, weights, noise_weight = sde_2m_weights(h, r[0] if r else None, config.solver_type)
            return linear_combination(x, x_weight, newest_first, weights).add_(
                noise, alpha=sigmas[i + 1].item() * noise_weight)
        if order == 1:
            x_weight, weights = first_order_weights(h)
        elif order == 2:
            x_weight, weights = multistep_2m_weights(h, r[0], config.solver_type)
        else:
            x_weight, weights = multistep_3m_weights(h, r[0], r[1], THIRD_ORDER_FORMS[config.third_order])
        return linear_combination(x, x_weight, newest_first, weights)


class DPMSolverPlusPlusSinglestep(SinglestepSolver):
    """DPM-Solver++(2S) and its third-order version, allocated as DPM-Solver-fast (module docstring)."""

    @dataclass(frozen=True)
    class Options(SolverOptions):
        order: int = option(2, choices=(1, 2, 3))
        method: str = option("singlestep", choices=("singlestep",))
        intermediates: str = option("lambda", choices=INTERMEDIATES)

    def sample(self, denoise: Denoise, x: Tensor, sigmas: Tensor, plan: Plan, noise: Noise | None = None) -> Tensor:
        for order, sigma, sigma_next, r1, r2 in self.intervals(sigmas, plan):
            denoised = denoise(x, sigma)
            if sigma_next == 0:
                return denoised
            if order == 1:
                x = dpm_solver_pp_1(x, sigma, sigma_next, denoised)
            elif order == 2:
                x = dpm_solver_pp_2s(denoise, x, sigma, sigma_next, denoised, r1)
            else:
                x = dpm_solver_pp_3s(denoise, x, sigma, sigma_next, denoised, r1, r2)
        return x


class DPMSolverPlusPlus(SolverFamily):
    """DPM-Solver++: ``method`` "multistep" (default) or "singlestep" builds the class of that name."""

    choose_by, default = "method", "multistep"
    members = {"singlestep": DPMSolverPlusPlusSinglestep, "multistep": DPMSolverPlusPlusMultistep}

    @classmethod
    def inapplicable(cls, key: str, value: Any, choice: str) -> str:
        messages = {
            "solver_type": f"solver_type={value!r} applies to method='multistep' only; singlestep uses the paper's "
                           "2S form",
            "lower_order_final": "lower_order_final applies to method='multistep' only (method='singlestep' ends with "
                                 "lower orders by construction)",
            "sde": "sde=True is the multistep SDE-DPM-Solver++(2M): use method='multistep'",
            "third_order": f"third_order={value!r} applies to method='multistep' with order=3 only",
        }
        return messages.get(key) or super().inapplicable(key, value, choice)


# the same solvers under the names k-diffusion and ComfyUI give them (tests/test_k_diffusion_parity.py)
DPMSolverPlusPlus2M = preset(DPMSolverPlusPlusMultistep, "DPMSolverPlusPlus2M", """DPM-Solver++(2M): k-diffusion's
sample_dpmpp_2m, ComfyUI's dpmpp_2m.""", order=Fixed(2), sde=Fixed(False))
DPMSolverPlusPlus2MSDE = preset(DPMSolverPlusPlusMultistep, "DPMSolverPlusPlus2MSDE", """SDE-DPM-Solver++(2M):
k-diffusion's sample_dpmpp_2m_sde with eta = 1, ComfyUI's dpmpp_2m_sde; solver_type "midpoint" | "heun" as there.""",
                                order=Fixed(2), sde=Fixed(True))
ResMultistep = preset(DPMSolverPlusPlusMultistep, "ResMultistep", """ComfyUI's res_multistep, the second-order
multistep refined exponential solver of Zhang et al. 2023 (RES): with D_1 at c = -h_prev / h of the step, its weights
b1 = phi_1 - phi_2 / c and b2 = phi_2 / c of D_0 and D_1 are DPM-Solver++(2M)'s in the Taylor ("heun") form.""",
                      order=Fixed(2), solver_type=Fixed("heun"), sde=Fixed(False))


@hookimpl
def register_solvers(register):
    register(DPMSolverPlusPlus, name="dpm-solver++")
    register(DPMSolverPlusPlus2M, name="dpm++2m", aliases=("dpmpp_2m",))
    register(DPMSolverPlusPlus2MSDE, name="dpm++2m-sde", aliases=("dpmpp_2m_sde",))
    register(ResMultistep, name="res-multistep", aliases=("res_multistep",))
