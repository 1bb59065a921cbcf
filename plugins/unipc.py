"""UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion Models"),
data-prediction form (diffusers' ``predict_x0=True``), in the sigma parametrization.

With lambda = -log sigma and h = lambda_next - lambda, every step starts from the first-order exponential-integrator
(DDIM) step and adds a B(h)-weighted combination of divided differences of past denoised estimates D_m:

    x_next = (sigma_next / sigma) x + (1 - e^-h) D_0 - B(h) sum_m a_m (D_m - D_0) / r_m,
    r_m = (lambda_m - lambda_0) / h,

Zhao et al.'s update (section 3) in its data-prediction form, where h becomes hh = -h. The weights solve the order
conditions R a = g / B(h), R[k][m] = r_m^k, g_k = hh phi_(k+1)(hh) k!, with phi_1(z) = (e^z - 1) / z and
phi_(k+1)(z) = (phi_k(z) - 1/k!) / z. Any B(h) = O(h) gives the same order; the paper's two: ``bh1``, B(h) = hh,
and ``bh2``, B(h) = e^hh - 1.

- UniP-p, the predictor, uses the p - 1 previous estimates: order p.
- UniC-p, the corrector, adds the estimate at the predicted point x_next to the same interpolation and recomputes
  x_next: order p + 1. That estimate is the one the next predictor step needs anyway, so the corrector costs no
  extra NFE: the model sees only predicted points, and the corrected point carries on.

Steps and order: step i runs UniP-p_i and the corrector of step i - 1 runs with that step's order, p_i = min(order,
i + 1) (warm-up), and with ``lower_order_final`` (UniPC's default, unlike DPM-Solver's only-below-15-steps) also
p_i <= steps - i. The last step, to sigma = 0, is x0 = D(x; sigma_last), the harness's common endpoint: it is
exactly diffusers' first-order UniP step to sigma = 0 (``final_sigmas_type="zero"``), and it uses the estimate at the
*predicted* last point, so a corrector there could not change the result: the official code skips it
(``use_corrector = False`` when ``step == steps``) and so do we; diffusers computes it and then discards it.
NFE = steps, one call per step: a step rule (bench.core.steps) whose state is the predicted point, where the model
is evaluated, and the corrected point the last predictor step started from (UniPCState).

Global order. A few steps are of lower order than the rest, and each caps the global order at its local order: the
first step (UniPC-1, local error O(h^3); uncorrected, UniP-1, O(h^2)), any step in ``disable_corrector``, and the
step to sigma_last, which is never corrected (UniP-2 under ``lower_order_final``: O(h^3)). So UniPC-3 converges at
order 3, not 4, and UniP-3 at 2. These steps' error constants are small (an error made near sigma_max shrinks by
~sigma_data / sigma_max along the flow, and D barely moves in lambda near sigma_min), so from sigma_max = 80
UniPC-3 still fits ~3.9 over 64..512 steps; on the range 0.5..2 it shows 3 (tests/test_multistep_solvers.py).

Defaults follow diffusers (order 2, ``bh2``); the official code defaults to ``bh1``, which diffusers
recommends for unconditional sampling below 10 steps. diffusers' ``bh1`` with ``final_sigmas_type="zero"`` returns
NaN: its last step multiplies B(h) = -h = -inf by a zero correction (tests/test_multistep_parity.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from torch import Tensor

from bench.core.numerics import linear_combination, phi_functions
from bench.core.options import SolverOptions, option
from bench.core.steps import StepSolver, warmup_orders
from bench.hookspecs import hookimpl

VARIANTS = ("bh1", "bh2")


def unipc_coefficients(h: float, r: Sequence[float], variant: str) -> tuple[float, list[float]]:
    """B(h) and the weights a_m of the divided differences (D_m - D_0) / r_m, m = 1..len(r), that make the step
    exact for polynomials of degree len(r) in lambda (the order conditions of Zhao et al. 2023, section 3)."""
    hh = -h
    B = hh if variant == "bh1" else math.expm1(hh)
    order = len(r)
    if order == 0:
        return B, []
    if order == 1:
        # UniP-2 and UniC-1: the 1x1 system gives a_1 = 1/2 + O(h); the official code and diffusers use 1/2 itself,
        # which keeps the order
        return B, [0.5]
    phis = phi_functions(hh, order + 1)
    g = [hh * phis[k] * math.factorial(k) for k in range(1, order + 1)]  # hh phi_(k+1)(hh) k!
    R = np.array([[rm**k for rm in r] for k in range(order)])
    return B, np.linalg.solve(R, np.array(g) / B).tolist()


def unipc_weights(h: float, r: Sequence[float], variant: str) -> tuple[float, list[float]]:
    """The update x_next = e^-h x + (1 - e^-h) D_0 - B(h) sum_m a_m (D_m - D_0) / r_m as weights: that of x, and
    those of D_0, D_1, ... (D_0 the newest estimate, at the step's start; D_m at r_m h from it in lambda)."""
    B, a = unipc_coefficients(h, r, variant)
    weights = [B * a_m / r_m for a_m, r_m in zip(a, r)]
    return math.exp(-h), [-math.expm1(-h) + sum(weights), *(-weight for weight in weights)]


class UniPCState(NamedTuple):
    """UniPC's state at grid point i: ``x``, the predicted point, where the model is evaluated; ``x_prev``, the
    corrected point at grid point i - 1, where the predictor step to x started (the corrector redoes that step)."""

    x: Tensor
    x_prev: Tensor


class UniPC(StepSolver):
    """UniPC-p (``corrector=True``) or UniP-p (``corrector=False``), p = ``order`` in 1..3.

    ``disable_corrector`` lists steps whose predicted result is not corrected, with diffusers' meaning (step i's
    corrector is the one applied at sigma_(i+1)); the original code leaves the first steps uncorrected under strong
    guidance this way.
    """

    @dataclass(frozen=True)
    class Options(SolverOptions):
        order: int = option(2, choices=(1, 2, 3))
        variant: str = option("bh2", choices=VARIANTS)
        corrector: bool = True
        lower_order_final: bool = True
        disable_corrector: tuple[int, ...] = option((), check=lambda steps: all(step >= 0 for step in steps),
                                                    must="list step indices >= 0",
                                                    convert=lambda steps: tuple(sorted(set(steps))))

    @property
    def nominal_order(self) -> int:
        """p for UniP-p, p + 1 for UniPC-p (Zhao et al.'s convergence results)."""
        return self.config.order + self.config.corrector

    @property
    def order(self) -> int:
        return min(cap for cap, _ in self._caps())

    @property
    def order_note(self) -> str:
        return "; ".join(why for cap, why in self._caps() if cap == self.order and cap < self.nominal_order)

    def _caps(self) -> list[tuple[int, str]]:
        """The global orders the steps allow, with why: a step of local error O(h^(q+1)) caps it at q + 1."""
        p, config = self.config.order, self.config
        corrected = config.corrector and 0 not in config.disable_corrector
        caps = [(self.nominal_order, "its order"),
                (3 if corrected else 2, f"its first step ({'UniPC-1' if corrected else 'UniP-1'}) caps it at "
                                        f"{3 if corrected else 2}")]
        last = min(p, 2) if config.lower_order_final else p
        caps.append((last + 1, f"its uncorrected step to sigma_min (UniP-{last}) caps it at {last + 1}"))
        for k in config.disable_corrector if config.corrector else ():
            q = min(p, k + 1)  # the order of step k's predictor
            if k > 0:
                caps.append((q + 1, f"step {k}, left uncorrected (UniP-{q}), caps it at {q + 1}"))
        return caps

    @property
    def history(self) -> int:
        return self.config.order + self.config.corrector  # the corrector adds the estimate at the predicted point

    def step_orders(self, steps: int) -> tuple[int, ...]:
        return warmup_orders(steps, self.config.order, self.config.lower_order_final)

    def initial_state(self, x: Tensor) -> UniPCState:
        return UniPCState(x, x)

    def point(self, state: UniPCState) -> Tensor:
        return state.x

    def step(self, i: int, state: UniPCState, denoised: tuple[Tensor, ...], sigmas: Tensor,
             orders: tuple[int, ...], noise: Tensor | None) -> UniPCState:
        lambdas = [-math.log(sigmas[j].item()) for j in range(i + 1 - len(denoised), i + 2)]  # of each D, then next
        x = state.x
        if i > 0 and self.config.corrector and i - 1 not in self.config.disable_corrector:
            # UniC: redo the last step, from where it started, with the estimate at the predicted point as one more
            # point (r = 1)
            x = self.update(state.x_prev, denoised[:-1], lambdas[:-2], lambdas[-2], orders[i - 1], denoised[-1])
        return UniPCState(self.update(x, denoised, lambdas[:-1], lambdas[-1], orders[i]), x)  # UniP

    def update(self, x: Tensor, denoised: Sequence[Tensor], lambdas: Sequence[float], lambda_next: float, order: int,
               denoised_next: Tensor | None = None) -> Tensor:
        """One UniP-``order`` step from the newest of ``denoised`` (at lambdas[-1]) to lambda_next, or, given the
        estimate ``denoised_next`` at the predicted point, the UniC-``order`` step that replaces it."""
        h = lambda_next - lambdas[-1]
        # the estimates of the divided differences: order - 1 past ones for UniP, plus the new one for UniC
        points = [(lambdas[-1 - m], denoised[-1 - m]) for m in range(1, order)]
        if denoised_next is not None:
            points.append((lambda_next, denoised_next))
        x_weight, weights = unipc_weights(h, [(lambda_m - lambdas[-1]) / h for lambda_m, _ in points],
                                          self.config.variant)
        return linear_combination(x, x_weight, [denoised[-1], *(denoised_m for _, denoised_m in points)], weights)


@hookimpl
def register_solvers(register):
    register(UniPC, name="unipc")
