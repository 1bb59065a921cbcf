"""DPM-Solver++ (Lu et al. 2022b, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
Models"): the exponential integrators of DPM-Solver written for the data prediction D = x0(x; sigma).

In lambda = -log sigma (alpha = 1, x = x0 + sigma eps) the exact solution from sigma_s to sigma_t is

    x_t = (sigma_t / sigma_s) x_s + sigma_t * integral_{lambda_s}^{lambda_t} e^lambda D(x_lambda, lambda) dlambda,

and DPM-Solver++ Taylor-expands D in lambda. With h = lambda_t - lambda_s, the first-order step is
x_t = (sigma_t / sigma_s) x_s - (e^-h - 1) D_s: DDIM again, written as a convex combination of x_s and D_s. D stays
in the data's range where a guided eps is amplified, and the update cannot overshoot it: the paper's reason why this
form stays stable under strong guidance.

Options:
- ``method="multistep"`` (default) with ``order`` 1 | 2 (default) | 3: DPM-Solver++(2M) (Algorithm 2) and 3M (the
  original code and diffusers), one call per step; the derivatives of D in lambda come from the previous steps'
  D, with lower orders while the history fills and, with ``lower_order_final`` (default True), on the last steps.
  ``solver_type`` "midpoint" (default) | "heun" chooses the form of the second-order term as diffusers does
  ("midpoint" is the paper's 2M, "heun" the original code's "taylor" form). 3M has one form up to the weight of
  its second-derivative term, ``third_order`` "original" (default) | "taylor":

      x_t = (sigma_t / sigma_s) x_s - phi_1 D_s + phi_2 d1 - w phi_3 d2,   phi_1 = e^-h - 1, phi_2 = phi_1 / h + 1,
            phi_3 = phi_2 / h - 1/2,  d1 ~ h D',  d2 = 2 (d1_0 - d1_1) / (r0 + r1) ~ h^2 D''.

  The Taylor expansion of the integral gives w = 1; the original code and diffusers use w = 1/2, which leaves an
  O(h^3) local error: their 3M converges at order 2 (tests/test_dpm_solvers.py: fitted slopes 2.05-2.26 over
  64..1024 steps on both analytic models, falling towards 2, against 2.85-3.19 with w = 1). The default keeps
  theirs, so that results compare with theirs and with published numbers.
- ``method="singlestep"``: DPM-Solver++(2S) (Algorithm 1) and its third-order version from the original code,
  allocated as DPM-Solver-fast (bench.core.multistep.singlestep_orders; the budget is spent exactly), with
  intermediate points at r1 = 1/2, or r1 = 1/3 and r2 = 2/3 in lambda (``intermediates="lambda"``) or at the
  grid points of a grid with one sigma per call (``intermediates="grid"``, as diffusers' singlestep scheduler).
- ``sde=True`` (multistep, order 1 or 2): SDE-DPM-Solver++(2M), the exponential integrator of the reverse SDE (Lu
  et al. 2022b) in its 2M form: k-diffusion's ``sample_dpmpp_2m_sde`` with eta = 1, diffusers'
  ``algorithm_type="sde-dpmsolver++"``. The linear part is solved exactly, as for the ODE:

      x_t = (sigma_t / sigma_s) e^-h x_s + 2 integral_{lambda_s}^{lambda_t} e^(-2 (lambda_t - lambda)) D dlambda
            + sigma_t sqrt(1 - e^(-2h)) z,

  so its coefficients are the ODE's with h -> 2h (sigma_t / sigma_s = e^-h), plus fresh noise z = ``noise(step)``.
  Its samples follow the data distribution, not the ODE trajectory from x_T.

The step to sigma = 0 is first order, x0 = D(x; sigma_last), as for every solver in the harness.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from bench.hookspecs import hookimpl
from bench.core.multistep import (INTERMEDIATES, History, SinglestepInterval, SinglestepOrMultistep, linear_combination,
                             singlestep_intervals, step_pairs)
from bench.core.solver import Denoise, Noise, Plan

METHODS = ("singlestep", "multistep")
SOLVER_TYPES = ("midpoint", "heun")
# 3M: the weight of the Taylor term -phi_3 h^2 D'' (see the module docstring)
THIRD_ORDER_FORMS = {"original": 0.5, "taylor": 1.0}


def dpm_solver_pp_1(x: Tensor, sigma: float, sigma_next: float, denoised: Tensor) -> Tensor:
    """DPM-Solver++ first order (DDIM): x_t = (sigma_t / sigma_s) x_s - (e^-h - 1) D_s, and since
    e^-h = sigma_t / sigma_s, the convex combination x_t = D_s + (sigma_t / sigma_s) (x_s - D_s): one lerp."""
    return torch.lerp(denoised, x, sigma_next / sigma)


def dpm_solver_pp_2s(denoise: Denoise, x: Tensor, sigma: float, sigma_next: float, denoised: Tensor,
                     r1: float = 0.5) -> Tensor:
    """DPM-Solver++(2S) (Algorithm 1): a first-order step to lambda_s + r1 h gives u, and
    D = (1 - 1/(2 r1)) D_s + 1/(2 r1) D(u) stands for D over the whole step."""
    h = math.log(sigma / sigma_next)
    sigma_s1 = sigma * math.exp(-r1 * h)
    u = torch.lerp(denoised, x, sigma_s1 / sigma)  # (sigma_s1 / sigma) x - (e^(-r1 h) - 1) D_s
    denoised_s1 = denoise(u, sigma_s1)
    # (sigma_next / sigma) x - (e^-h - 1) D_mix, D_mix = (1 - 1/(2 r1)) D_s + 1/(2 r1) D(u), as one combination
    phi_1 = math.expm1(-h)
    return linear_combination(x, sigma_next / sigma, [denoised, denoised_s1],
                              [-phi_1 * (1 - 1 / (2 * r1)), -phi_1 / (2 * r1)])


def dpm_solver_pp_3s(denoise: Denoise, x: Tensor, sigma: float, sigma_next: float, denoised: Tensor,
                     r1: float = 1 / 3, r2: float = 2 / 3) -> Tensor:
    """Singlestep DPM-Solver++ of order 3 (the original code's singlestep_dpm_solver_third_update for data
    prediction; DPM-Solver-3's scheme, Algorithm 2 of Lu et al. 2022, with D for eps): u1 at lambda_s + r1 h by
    the first-order step, u2 at lambda_s + r2 h by a second-order step that uses D(u1), then x_t from D_s, D(u2)."""
    h = math.log(sigma / sigma_next)
    sigma_s1, sigma_s2 = sigma * math.exp(-r1 * h), sigma * math.exp(-r2 * h)
    u1 = (sigma_s1 / sigma) * x - math.expm1(-r1 * h) * denoised
    d1 = denoise(u1, sigma_s1) - denoised
    u2 = ((sigma_s2 / sigma) * x - math.expm1(-r2 * h) * denoised
          + (r2 / r1) * (math.expm1(-r2 * h) / (r2 * h) + 1) * d1)
    d2 = denoise(u2, sigma_s2) - denoised
    return (sigma_next / sigma) * x - math.expm1(-h) * denoised + (1 / r2) * (math.expm1(-h) / h + 1) * d2


class DPMSolverPlusPlus(SinglestepOrMultistep):
    """DPM-Solver++ with the data prediction; see the module docstring for the options."""

    def __init__(self, order: int = 2, method: str = "multistep", lower_order_final: bool = True,
                 solver_type: str = "midpoint", third_order: str = "original", sde: bool = False,
                 intermediates: str = "lambda") -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}; got {method!r}")
        if order not in (1, 2, 3) or isinstance(order, bool):
            raise ValueError(f"order must be 1, 2 or 3; got {order!r}")
        if solver_type not in SOLVER_TYPES:
            raise ValueError(f"solver_type must be one of {', '.join(map(repr, SOLVER_TYPES))}; got {solver_type!r}")
        if intermediates not in INTERMEDIATES:
            raise ValueError(f"intermediates must be one of {', '.join(map(repr, INTERMEDIATES))}; "
                             f"got {intermediates!r}")
        if third_order not in THIRD_ORDER_FORMS:
            raise ValueError(f"third_order must be one of {', '.join(map(repr, THIRD_ORDER_FORMS))}; "
                             f"got {third_order!r}")
        if third_order != "original" and not (method == "multistep" and order == 3):
            raise ValueError(f"third_order={third_order!r} applies to method='multistep' with order=3 only")
        if method == "singlestep":
            if solver_type != "midpoint":
                raise ValueError(f"solver_type={solver_type!r} applies to method='multistep' only; singlestep "
                                 "uses the paper's 2S form")
            if not lower_order_final:
                raise ValueError("lower_order_final applies to method='multistep' only (method='singlestep' ends "
                                 "with lower orders by construction)")
            if sde:
                raise ValueError("sde=True is the multistep SDE-DPM-Solver++(2M): use method='multistep'")
        elif intermediates != "lambda":
            raise ValueError(f"intermediates={intermediates!r} applies to method='singlestep' only")
        if sde and order == 3:
            raise ValueError("sde=True supports order 1 or 2 (SDE-DPM-Solver++(2M)); got order=3")
        self.order, self.method, self.lower_order_final = order, method, bool(lower_order_final)
        self.solver_type, self.sde, self.intermediates = solver_type, bool(sde), intermediates
        self.third_order, self.d2_weight = third_order, THIRD_ORDER_FORMS[third_order]

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        return self.sde

    def sample(self, denoise: Denoise, x: Tensor, sigmas: Tensor, plan: Plan, noise: Noise | None = None) -> Tensor:
        if self.method == "singlestep":
            return self.sample_singlestep(denoise, x, singlestep_intervals(sigmas, plan.orders, self.intermediates))
        if self.sde:
            if noise is None:
                raise ValueError("DPM-Solver++ with sde=True needs a noise source")
            return self.sample_multistep_sde(denoise, x, sigmas, plan.orders, noise)
        return self.sample_multistep(denoise, x, sigmas, plan.orders)

    def sample_singlestep(self, denoise: Denoise, x: Tensor, intervals: list[SinglestepInterval]) -> Tensor:
        for order, sigma, sigma_next, r1, r2 in intervals:
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

    def sample_multistep(self, denoise: Denoise, x: Tensor, sigmas: Tensor, orders: tuple[int, ...]) -> Tensor:
        """DPM-Solver++(2M) / (3M): D's derivatives in lambda from divided differences of the last D, with
        r_k = h_k / h the previous steps relative to this one.

        The update is linear in x and the stored D's: the derivation below runs on scalars (the weight of each
        divided difference, then of each D), and the tensors are combined once (bench.core.multistep.linear_combination).
        """
        history = History(3)  # (lambda, denoised) of the last steps, newest last
        for (_, sigma, sigma_next), order in zip(step_pairs(sigmas), orders):
            denoised = denoise(x, sigma)
            if sigma_next == 0:
                return denoised
            lambda_, h = -math.log(sigma), math.log(sigma / sigma_next)
            history.push((lambda_, denoised))
            if order == 1:
                x = dpm_solver_pp_1(x, sigma, sigma_next, denoised)
                continue
            phi_1 = math.expm1(-h)  # e^-h - 1
            # the first-order step, (sigma_t / sigma_s) x_s - (e^-h - 1) D_s; higher orders add to D's weights
            x_weight, denoised_weight = sigma_next / sigma, -phi_1
            if order == 2:
                lambda_1, denoised_1 = history[-2]
                r0 = (lambda_ - lambda_1) / h
                # weight of d1 = (D_s - D_1) / r0 = h D'
                if self.solver_type == "midpoint":  # Algorithm 2: D = (1 + 1/(2r)) D_s - 1/(2r) D_prev
                    d1_weight = -0.5 * phi_1
                else:  # "heun": the exact integral of the linear Taylor term
                    d1_weight = phi_1 / h + 1
                x = linear_combination(x, x_weight, [denoised, denoised_1],
                                       [denoised_weight + d1_weight / r0, -d1_weight / r0])
            else:
                (lambda_2, denoised_2), (lambda_1, denoised_1) = history[-3], history[-2]
                r0, r1 = (lambda_ - lambda_1) / h, (lambda_1 - lambda_2) / h
                phi_2 = phi_1 / h + 1
                phi_3 = phi_2 / h - 0.5
                # d1_0 = (D_s - D_1) / r0, d1_1 = (D_1 - D_2) / r1;
                # h D' = d1_0 + r0 / (r0 + r1) (d1_0 - d1_1), second-order accurate,
                # h^2 D'' = 2 (d1_0 - d1_1) / (r0 + r1), and x += phi_2 h D' - d2_weight phi_3 h^2 D''
                slope, curvature = r0 / (r0 + r1), 2 / (r0 + r1)
                d2_term = self.d2_weight * phi_3 * curvature
                d1_0_weight = phi_2 * (1 + slope) - d2_term
                d1_1_weight = -phi_2 * slope + d2_term
                x = linear_combination(x, x_weight, [denoised, denoised_1, denoised_2],
                                       [denoised_weight + d1_0_weight / r0, -d1_0_weight / r0 + d1_1_weight / r1,
                                        -d1_1_weight / r1])
        return x

    def sample_multistep_sde(self, denoise: Denoise, x: Tensor, sigmas: Tensor, orders: tuple[int, ...],
                             noise: Noise) -> Tensor:
        """SDE-DPM-Solver++(2M): the ODE's multistep update with h -> 2h in D's coefficients and x damped by a
        further e^-h, plus fresh noise sigma_t sqrt(1 - e^(-2h)) z (k-diffusion's sample_dpmpp_2m_sde, eta = 1)."""
        history = History(2)  # (lambda, denoised)
        for (i, sigma, sigma_next), order in zip(step_pairs(sigmas), orders):
            denoised = denoise(x, sigma)
            if sigma_next == 0:
                return denoised
            lambda_, h = -math.log(sigma), math.log(sigma / sigma_next)
            history.push((lambda_, denoised))
            one_minus_e_2h = -math.expm1(-2 * h)  # 1 - e^(-2h)
            x = torch.lerp(denoised, x, (sigma_next / sigma) * math.exp(-h))  # e^(-2h) x_s + (1 - e^(-2h)) D_s
            if order == 2:
                lambda_1, denoised_1 = history[-2]
                d1 = (denoised - denoised_1) / ((lambda_ - lambda_1) / h)
                if self.solver_type == "midpoint":
                    x = x + 0.5 * one_minus_e_2h * d1
                else:
                    x = x + (one_minus_e_2h / (-2 * h) + 1) * d1
            x = x + sigma_next * math.sqrt(one_minus_e_2h) * noise(i)
        return x


@hookimpl
def register_solvers(register):
    register(DPMSolverPlusPlus, name="dpm-solver++")
