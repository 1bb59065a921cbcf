"""ER-SDE-Solver (Cui et al. 2023, "Elucidating the Solution Space of Extended Reverse-Time SDE for Diffusion
Models"; ComfyUI's er_sde): exact solutions of the linear part of a family of reverse SDEs, one per noise scaler.

In sigma (VE, alpha = 1) the extended reverse-time SDE with noise scaler f has the solution from sigma_s to sigma_t

    x_t = r x_s + f(sigma_t) integral_{sigma_t}^{sigma_s} f'(l) / f(l)^2 x0(l) dl + sqrt(sigma_t^2 - r^2 sigma_s^2) z,

r = f(sigma_t) / f(sigma_s). f(l) = l is the probability-flow ODE (no noise: r = sigma_t / sigma_s), f(l) = l^2 the
reverse-time SDE of Song et al., and ER-SDE-5, the paper's choice and ComfyUI's default, f(l) = l (e^(l^0.3) + 10).
Expanding x0 = D in sigma around sigma_s and integrating by parts gives the k-stage solvers (dt = sigma_t - sigma_s):

    x_t = r x_s + (1 - r) D_s                                     stage 1
          + (dt + f(sigma_t) S_1) D'                              stage 2, S_1 = integral 1 / f(l) dl
          + (dt^2 / 2 + f(sigma_t) S_2) D''                       stage 3, S_2 = integral (l - sigma_s) / f(l) dl
          + s_noise sqrt(sigma_t^2 - r^2 sigma_s^2) z,

with integrals over [sigma_t, sigma_s], and D' and D'' divided differences in sigma of the last D's: D' = (D_s -
D_prev) / (sigma_s - sigma_prev), D'' = (D'_s - D'_prev) / ((sigma_s - sigma_prev_prev) / 2). ``max_stage`` (1-3,
default 3) caps the stages; fewer while the history fills. ComfyUI takes S_1 and S_2 as left Riemann sums over 200
points, whose O(h^2 / 400) error in the stage-2 weight caps its order at 1 (with a small constant); here they are
Gauss-Legendre sums in log l, exact to rounding for these smooth integrands. The step to sigma = 0 is x0 = D.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from torch import Tensor

from bench.core.numerics import linear_combination
from bench.core.options import SolverOptions, option
from bench.core.steps import WARMUP_CAP, StepSolver, warmup_orders
from bench.hookspecs import hookimpl

NOISE_SCALERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "er-sde": lambda l: l * (np.exp(l**0.3) + 10.0),  # ER-SDE-5
    "sde": lambda l: l**2,  # the reverse-time SDE
    "ode": lambda l: l,  # the probability-flow ODE
}
NODES, NODE_WEIGHTS = np.polynomial.legendre.leggauss(16)


def stage_integrals(f: Callable[[np.ndarray], np.ndarray], sigma: float, sigma_next: float) -> tuple[float, float]:
    """S_1 = integral 1 / f(l) dl and S_2 = integral (l - sigma) / f(l) dl over [sigma_next, sigma], in u = log l
    (dl = l du) by 16-point Gauss-Legendre."""
    low, high = math.log(sigma_next), math.log(sigma)
    l = np.exp((high - low) / 2 * NODES + (high + low) / 2)
    weights = (high - low) / 2 * NODE_WEIGHTS * l / f(l)
    return float(weights.sum()), float(np.dot(weights, l - sigma))


def er_sde_weights(f: Callable[[np.ndarray], np.ndarray], sigmas: list[float], stage: int
                   ) -> tuple[float, list[float], float]:
    """The weights of x, of D_s, D_prev, D_prev_prev (``stage`` of them) and of z in one step from sigmas[-2]
    (sigma_s) to sigmas[-1] (sigma_t); ``sigmas`` holds the points of the D's, oldest first, then sigma_t."""
    sigma, sigma_next = sigmas[-2], sigmas[-1]
    f_next, f_now = float(f(np.float64(sigma_next))), float(f(np.float64(sigma)))
    r = f_next / f_now
    dt = sigma_next - sigma
    weights = [1 - r]
    if stage >= 2:
        integral_1, integral_2 = stage_integrals(f, sigma, sigma_next)
        c1 = dt + f_next * integral_1
        gap = sigma - sigmas[-3]  # D' = (D_s - D_prev) / gap
        weights = [weights[0] + c1 / gap, -c1 / gap]
        if stage >= 3:
            c2 = dt**2 / 2 + f_next * integral_2
            gap_prev = sigmas[-3] - sigmas[-4]  # D'_prev = (D_prev - D_prev_prev) / gap_prev
            scale = c2 / ((sigma - sigmas[-4]) / 2)  # D'' = (D' - D'_prev) / ((sigma_s - sigma_prev_prev) / 2)
            weights = [weights[0] + scale / gap, weights[1] - scale / gap - scale / gap_prev, scale / gap_prev]
    return r, weights, math.sqrt(max(sigma_next**2 - r**2 * sigma**2, 0.0))


class ERSDE(StepSolver):
    """ER-SDE-Solver (module docstring)."""

    @dataclass(frozen=True)
    class Options(SolverOptions):
        noise_scaler: str = option("er-sde", choices=tuple(NOISE_SCALERS))
        max_stage: int = option(3, choices=(1, 2, 3))
        s_noise: float = option(1.0, check=lambda value: value >= 0, must="be >= 0")

    @property
    def order(self) -> int:
        return min(self.config.max_stage, 2)

    @property
    def nominal_order(self) -> int:
        return self.config.max_stage

    @property
    def order_note(self) -> str:
        cap = f": {WARMUP_CAP}" if self.config.max_stage == 3 else ""
        if self.stochastic:
            return f"weak order, of the error in distribution, measured on a Gaussian (bench.tools.weak_order){cap}"
        return cap.removeprefix(": ")

    @property
    def stochastic(self) -> bool:
        return self.config.noise_scaler != "ode" and self.config.s_noise > 0

    @property
    def history(self) -> int:
        return self.config.max_stage

    def step_orders(self, steps: int) -> tuple[int, ...]:
        return warmup_orders(steps, self.config.max_stage, lower_order_final=False)

    def step(self, i: int, x: Tensor, estimates: tuple[Tensor, ...], sigmas: Tensor, orders: tuple[int, ...],
             noise: Tensor | None) -> Tensor:
        stage = orders[i]
        points = sigmas[i - stage + 1:i + 2].tolist()  # the D's points, oldest first, then sigma_t
        x_weight, weights, noise_weight = er_sde_weights(NOISE_SCALERS[self.config.noise_scaler], points, stage)
        x = linear_combination(x, x_weight, estimates[::-1], weights)
        if noise is not None:
            x.add_(noise, alpha=self.config.s_noise * noise_weight)
        return x


@hookimpl
def register_solvers(register):
    register(ERSDE, name="er-sde", aliases=("er_sde",))
