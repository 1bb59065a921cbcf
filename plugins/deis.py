"""DEIS (Zhang and Chen 2023, "Fast Sampling of Diffusion Models with Exponential Integrator"), the multistep
exponential integrators, in the sigma parametrization.

Dividing a VP sample by alpha turns the probability-flow ODE into dx/drho = eps(x, rho) with rho = sigma / alpha, our
sigma (the paper's rho variable; here x = x0 + sigma eps already), so the exact step is

    x_next = x + integral_sigma^sigma_next eps(x(rho), rho) d rho.

DEIS replaces eps by the polynomial through the last q estimates eps_j (j = 0 newest) in some time variable tau,
and integrates its Lagrange basis exactly:

    x_next = x + sum_j C_j eps_j,    C_j = integral_sigma^sigma_next l_j(tau(rho)) d rho,
    l_j(tau) = prod_(k != j) (tau - tau_k) / (tau_j - tau_k).

In VP variables this is DEIS's update x_next = Psi x + sum_j C_j eps_j, its C_j = alpha_next times ours.

The methods differ only in the variable tau the polynomial is fitted in:

- ``tab`` (tAB-DEIS): tau = t, the VP-SDE time of Song et al. (2021) with the linear beta schedule (beta_min 0.1,
  beta_max 20: bench.core.numerics.vp_time). Why that t: it is the time DEIS is formulated and evaluated in, the
  continuous limit of DDPM's linear schedule (t ~ timestep / 1000, so for DDPM-family models it is their own
  clock), and the variable in which `time-uniform` grids are uniform, so tAB on `time-uniform` is the paper's
  setting. For models not trained in VP (the analytic ones, EDM) it is just the clock the fit uses, a fixed
  one-to-one function of sigma; the order does not depend on it, the error constant does.
- ``rhoab`` (rhoAB-DEIS): tau = rho = sigma: a variable-step Adams-Bashforth method on dx/dsigma = eps.
- ``logrho``: tau = log rho, diffusers' DEISMultistepScheduler (``solver_type="logrho"``), whose closed-form
  coefficients (its ``ind_fn``) are these integrals.

The weights are computed to rounding error by Gauss-Legendre quadrature in u = log rho (the integrand
l_j(tau(e^u)) e^u is analytic in a strip of half-width pi/2 around the real axis for all three taus, so 64 nodes are
exact in double precision even for steps of h ~ 10 in lambda, as on three-step grids).

Order q_i = min(order, i + 1) (warm-up), with ``lower_order_final`` also q_i <= steps - i (diffusers does this only
below 15 steps: pass ``lower_order_final=False`` to match it at 15 steps and more). Order 1 of every method is DDIM.
The last step, to sigma = 0, is x0 = D(x; sigma_last), the harness's common endpoint. NFE = steps, one call per step:
a step rule (bench.core.steps).

Global order. The warm-up's first step is first order, and its O(h^2) local error stays in the result: DEIS-3
converges at order 2 as the steps grow. The error made there shrinks along the flow by about sigma_data /
sigma_max, so from sigma_max = 80 DEIS-3 still fits ~2.8-2.9 over 64..512 steps; from sigma_max = 2 it shows 2.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from torch import Tensor

from bench.core.numerics import linear_combination, vp_time
from bench.core.options import SolverOptions, option
from bench.core.steps import WARMUP_CAP, StepSolver, warmup_orders
from bench.hookspecs import hookimpl

METHODS = ("tab", "rhoab", "logrho")

# tau(rho): the variable each method fits its polynomial in
TIME_VARIABLES: dict[str, Callable[[np.ndarray], np.ndarray]] = {"tab": vp_time, "rhoab": lambda rho: rho,
                                                                  "logrho": np.log}

_NODES, _WEIGHTS = np.polynomial.legendre.leggauss(64)


def deis_coefficients(rho: float, rho_next: float, rho_points: Sequence[float],
                      tau: Callable[[np.ndarray], np.ndarray]) -> list[float]:
    """C_j = integral_rho^rho_next l_j(tau(r)) dr for the Lagrange basis l_j through tau(rho_points)
    (DEIS's multistep coefficients), by Gauss-Legendre quadrature in u = log r."""
    u0, u1 = math.log(rho), math.log(rho_next)
    u = 0.5 * (u0 + u1) + 0.5 * (u1 - u0) * _NODES
    weights = 0.5 * (u1 - u0) * _WEIGHTS * np.exp(u)  # dr = e^u du
    tau_nodes, tau_points = tau(np.exp(u)), tau(np.asarray(rho_points, dtype=np.float64))
    coefficients = []
    for j, tau_j in enumerate(tau_points):
        basis = np.ones_like(u)
        for k, tau_k in enumerate(tau_points):
            if k != j:
                basis *= (tau_nodes - tau_k) / (tau_j - tau_k)
        coefficients.append(float(weights @ basis))
    return coefficients


class DEIS(StepSolver):
    """Multistep DEIS of ``order`` 1..3 with polynomial fits in ``method``'s time variable (module docstring)."""

    @dataclass(frozen=True)
    class Options(SolverOptions):
        order: int = option(2, choices=(1, 2, 3))
        method: str = option("tab", choices=METHODS)
        lower_order_final: bool = True

    prediction = "noise"  # dx/drho = eps

    @property
    def nominal_order(self) -> int:
        return self.config.order

    @property
    def order(self) -> int:
        return min(self.config.order, 2)

    @property
    def order_note(self) -> str:
        return WARMUP_CAP if self.config.order > 2 else ""

    @property
    def history(self) -> int:
        return self.config.order

    def step_orders(self, steps: int) -> tuple[int, ...]:
        return warmup_orders(steps, self.config.order, self.config.lower_order_final)

    def step(self, i: int, x: Tensor, eps: tuple[Tensor, ...], sigmas: Tensor, orders: tuple[int, ...],
             noise: Tensor | None) -> Tensor:
        rho_points = [sigmas[i - j].item() for j in range(orders[i])]  # newest first
        C = deis_coefficients(rho_points[0], sigmas[i + 1].item(), rho_points, TIME_VARIABLES[self.config.method])
        return linear_combination(x, 1.0, eps[::-1], C)  # x + sum_j C_j eps_j


@hookimpl
def register_solvers(register):
    register(DEIS, name="deis")
