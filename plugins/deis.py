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
  beta_max 20: plugins.schedules.vp_time). Why that t: it is the time DEIS is formulated and evaluated in, the
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
The last step, to sigma = 0, is x0 = D(x; sigma_last) (DESIGN.md). NFE = steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np
from torch import Tensor

from bench.hookspecs import hookimpl
from bench.core.multistep import History, linear_combination, step_pairs, warmup_orders
from bench.core.solver import Denoise, Noise, Plan, Solver
from plugins.schedules import BETA_MAX, BETA_MIN

METHODS = ("tab", "rhoab", "logrho")


def vp_time(rho: np.ndarray) -> np.ndarray:
    """The VP-SDE time t of sigma = rho (linear beta schedule; plugins.schedules.vp_time, vectorized)."""
    beta_d = BETA_MAX - BETA_MIN
    return (np.sqrt(BETA_MIN**2 + 2 * beta_d * np.log1p(rho**2)) - BETA_MIN) / beta_d


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


class DEIS(Solver):
    """Multistep DEIS of ``order`` 1..3 with polynomial fits in ``method``'s time variable (module docstring)."""

    stochastic = False

    def __init__(self, order: int = 2, method: str = "tab", lower_order_final: bool = True) -> None:
        if order not in (1, 2, 3):
            raise ValueError(f"DEIS order must be 1, 2 or 3; got {order!r}")
        if method not in METHODS:
            raise ValueError(f"DEIS method must be one of {', '.join(map(repr, METHODS))}; got {method!r}")
        self.order = order
        self.method = method
        self.lower_order_final = bool(lower_order_final)

    def step_orders(self, steps: int) -> list[int]:
        return warmup_orders(steps, self.order, self.lower_order_final)

    def plan(self, nfe: int) -> Plan:
        plan = super().plan(nfe)
        return replace(plan, orders=tuple(self.step_orders(plan.steps)))

    def sample(self, denoise: Denoise, x: Tensor, sigmas: Tensor, plan: Plan, noise: Noise | None = None) -> Tensor:
        orders = self.step_orders(len(sigmas) - 1)
        tau = TIME_VARIABLES[self.method]
        history = History(self.order)  # (rho, eps) of the last steps, newest last
        for i, sigma, sigma_next in step_pairs(sigmas):
            denoised = denoise(x, sigma)
            if sigma_next == 0:
                return denoised
            eps = (x - denoised) / sigma  # dx/drho
            history.push((sigma, eps))
            points = [history[-1 - j] for j in range(orders[i])]  # newest first
            C = deis_coefficients(sigma, sigma_next, [rho for rho, _ in points], tau)
            x = linear_combination(x, 1.0, [eps_j for _, eps_j in points], C)  # x + sum_j C_j eps_j
        return x


@hookimpl
def register_solvers(register):
    register(DEIS, name="deis")
