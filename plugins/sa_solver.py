"""SA-Solver (Xue et al., NeurIPS 2023, "SA-Solver: Stochastic Adams Solver for Fast Sampling of Diffusion Models";
ComfyUI's sa_solver): a stochastic Adams predictor-corrector in lambda = -log sigma, one model call per step.

With tau the amount of noise (tau = 0: the probability-flow ODE, tau = 1: the reverse SDE), the exact solution of
the SDE's linear part from lambda_s to lambda_t = lambda_s + h is, in sigma (VE, alpha = 1),

    x_t = (sigma_t / sigma_s) e^(-tau^2 h) x_s
          + integral_{lambda_s}^{lambda_t} (1 + tau^2) e^(-(1 + tau^2)(lambda_t - l)) D(l) dl
          + sigma_t sqrt(1 - e^(-2 tau^2 h)) z.

A stochastic Adams method replaces D by its Lagrange interpolant through the last model outputs in lambda, so each
D_j gets the weight b_j = the integral above with D replaced by the j-th Lagrange basis polynomial (computed here by
Gauss-Legendre, exact to rounding for a polynomial times an exponential; the paper and ComfyUI take closed forms).

- Predictor (stochastic Adams-Bashforth, ``predictor_order`` points, default 3): from the corrected x_i through
  D_i, D_(i-1), ... to x_pred at sigma_(i+1), with fresh noise z_i = ``noise(i)``; the model is called at x_pred.
- Corrector (stochastic Adams-Moulton, ``corrector_order`` points, default 4): once D(x_pred) is known it redoes the
  step from x_i with D_(i+1) among the points and the same noise z_i, giving the corrected x_(i+1). The model is not
  called again at the corrected point (ComfyUI's default, not its "pece" variant).

Orders drop while the history fills and on the last steps, as ComfyUI's (the predictor to sigma_last is first order);
the first point is not corrected, the last step is x0 = D(x_pred; sigma_last) with no correction, as there.
tau = ``eta`` (default 1) for sigma in [``tau_sigma_min``, ``tau_sigma_max``] (default: all) and 0 elsewhere;
ComfyUI's default interval is the model's 20-80% of training timesteps, a notion the continuous models here lack, so
the default is every sigma, the paper's plain SA-Solver with tau = 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from torch import Tensor

from bench.core.numerics import linear_combination
from bench.core.options import SolverOptions, option
from bench.core.steps import StepSolver
from bench.hookspecs import hookimpl

NODES, NODE_WEIGHTS = np.polynomial.legendre.leggauss(16)


def adams_weights(points: list[float], start: float, end: float, tau: float) -> list[float]:
    """b_j = integral_start^end (1 + tau^2) e^(-(1 + tau^2)(end - l)) L_j(l) dl for the Lagrange basis L_j of
    ``points`` (lambdas), by 16-point Gauss-Legendre."""
    rate = 1 + tau**2
    l = (end - start) / 2 * NODES + (end + start) / 2
    weights = (end - start) / 2 * NODE_WEIGHTS * rate * np.exp(-rate * (end - l))
    integrals = []
    for j, point in enumerate(points):
        basis = np.ones_like(l)
        for k, other in enumerate(points):
            if k != j:
                basis *= (l - other) / (point - other)
        integrals.append(float(np.dot(weights, basis)))
    return integrals


class SAState(NamedTuple):
    """At grid point i: ``x_pred``, the predicted point, where the model is evaluated; ``x_prev``, the corrected
    point at i - 1 the predictor started from; ``noise_term``, the noise the predictor added (the corrector reuses
    it). The last two are None at the first point."""

    x_pred: Tensor
    x_prev: Tensor | None
    noise_term: Tensor | None


class SASolver(StepSolver):
    """SA-Solver (module docstring)."""

    @dataclass(frozen=True)
    class Options(SolverOptions):
        predictor_order: int = option(3, choices=(1, 2, 3, 4))
        corrector_order: int = option(4, choices=(0, 1, 2, 3, 4))
        eta: float = option(1.0, check=lambda value: value >= 0, must="be >= 0")
        s_noise: float = option(1.0, check=lambda value: value >= 0, must="be >= 0")
        tau_sigma_min: float = option(0.0, check=lambda value: value >= 0, must="be >= 0")
        tau_sigma_max: float | None = option(None, check=lambda value: value > 0, must="be > 0 (None: no bound)")

    @property
    def order(self) -> int:
        if self.stochastic:
            return 2  # weak order, measured (order_note)
        return self.ode_order

    @property
    def ode_order(self) -> int:
        # the first step is first order; corrected with two points its local error is O(h^3) (as UniPC's)
        return min(self.nominal_order, 3 if self.config.corrector_order >= 2 else 2)

    @property
    def nominal_order(self) -> int:
        return max(self.config.predictor_order, self.config.corrector_order)

    @property
    def order_note(self) -> str:
        if self.stochastic:
            return ("weak order 2 (with the default orders), of the error in distribution, measured on a Gaussian "
                    f"(bench.tools.weak_order); with eta = 0 the order is {self.ode_order}")
        if self.order < self.nominal_order:
            return (f"the first step, first order{', corrected with two points,' if self.order == 3 else ''} caps "
                    f"it at {self.order}")
        return ""

    @property
    def stochastic(self) -> bool:
        config = self.config
        return config.eta > 0 and config.s_noise > 0 and config.tau_sigma_min <= (config.tau_sigma_max or math.inf)

    @property
    def history(self) -> int:
        return max(self.config.predictor_order, self.config.corrector_order, 1)

    def tau(self, sigma: float) -> float:
        config = self.config
        return config.eta if config.tau_sigma_min <= sigma <= (config.tau_sigma_max or math.inf) else 0.0

    def initial_state(self, x: Tensor) -> SAState:
        return SAState(x, None, None)

    def point(self, state: SAState) -> Tensor:
        return state.x_pred

    def adams_step(self, x: Tensor, estimates: tuple[Tensor, ...], lambdas: list[float], start: float, end: float,
                   tau: float) -> Tensor:
        """(sigma_end / sigma_start) e^(-tau^2 h) x + sum_j b_j D_j, ``estimates`` newest last at ``lambdas``."""
        h = end - start
        weights = adams_weights(lambdas, start, end, tau)
        return linear_combination(x, math.exp(-h - tau**2 * h), estimates, weights)

    def step(self, i: int, state: SAState, estimates: tuple[Tensor, ...], sigmas: Tensor, orders: tuple[int, ...],
             noise: Tensor | None) -> SAState:
        config, steps = self.config, len(sigmas) - 1
        lambdas = [-math.log(sigma) for sigma in sigmas[max(0, i - self.history):i + 2].tolist()]
        lambda_of = {i - k: lambdas[-2 - k] for k in range(len(lambdas) - 1)}  # grid index -> lambda (i + 1 last)
        lambda_of[i + 1] = lambdas[-1]
        x = state.x_pred
        if state.x_prev is not None:  # correct the step from i - 1 to i with D_i among the points
            order = min(config.corrector_order, len(estimates), steps - i)
            if order > 0:
                points = [lambda_of[i - order + 1 + k] for k in range(order)]
                x = self.adams_step(state.x_prev, estimates[-order:], points, lambda_of[i - 1], lambda_of[i],
                                    self.tau(sigmas[i].item()))
                if state.noise_term is not None:
                    x = x.add_(state.noise_term)
        order = min(config.predictor_order, len(estimates), steps - 1 - i)
        order = max(order, 1)
        points = [lambda_of[i - order + 1 + k] for k in range(order)]
        tau, sigma_next = self.tau(sigmas[i + 1].item()), sigmas[i + 1].item()
        x_pred = self.adams_step(x, estimates[-order:], points, lambda_of[i], lambda_of[i + 1], tau)
        noise_term = None
        if noise is not None and tau > 0:
            h = lambda_of[i + 1] - lambda_of[i]
            noise_term = noise * (config.s_noise * sigma_next * math.sqrt(-math.expm1(-2 * tau**2 * h)))
            x_pred = x_pred.add_(noise_term)
        return SAState(x_pred, x, noise_term)


@hookimpl
def register_solvers(register):
    register(SASolver, name="sa-solver", aliases=("sa_solver",))
