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
p_i <= steps - i. The last step, to sigma = 0, is x0 = D(x; sigma_last) (DESIGN.md): it is exactly diffusers' first-
order UniP step to sigma = 0 (``final_sigmas_type="zero"``), and it uses the estimate at the *predicted* last point,
so a corrector there could not change the result: the official code skips it (``use_corrector = False`` when
``step == steps``) and so do we; diffusers computes it and then discards it. NFE = steps.

Defaults follow diffusers (order 2, ``bh2``); the official code defaults to ``bh1`` (ANCHORS.md), which diffusers
recommends for unconditional sampling below 10 steps. diffusers' ``bh1`` with ``final_sigmas_type="zero"`` returns
NaN: its last step multiplies B(h) = -h = -inf by a zero correction (tests/test_multistep_parity.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
from torch import Tensor

from bench.hookspecs import hookimpl
from bench.core.multistep import History, linear_combination, step_pairs, warmup_orders
from bench.core.solver import Denoise, Noise, Plan, Solver

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
    phi = math.expm1(hh) / hh  # phi_1(hh)
    g, factorial = [], 1
    for k in range(1, order + 1):
        phi = (phi - 1 / factorial) / hh  # phi_(k+1)(hh)
        g.append(hh * phi * factorial)  # hh phi_(k+1)(hh) k!
        factorial *= k + 1
    R = np.array([[rm**k for rm in r] for k in range(order)])
    return B, np.linalg.solve(R, np.array(g) / B).tolist()


class UniPC(Solver):
    """UniPC-p (``corrector=True``) or UniP-p (``corrector=False``), p = ``order`` in 1..3.

    ``disable_corrector`` lists steps whose predicted result is not corrected, with diffusers' meaning (step i's
    corrector is the one applied at sigma_(i+1)); the original code leaves the first steps uncorrected under strong
    guidance this way.
    """

    stochastic = False

    def __init__(self, order: int = 2, variant: str = "bh2", corrector: bool = True, lower_order_final: bool = True,
                 disable_corrector: Sequence[int] = ()) -> None:
        if order not in (1, 2, 3):
            raise ValueError(f"UniPC order must be 1, 2 or 3; got {order!r}")
        if variant not in VARIANTS:
            raise ValueError(f"UniPC variant must be one of {', '.join(map(repr, VARIANTS))}; got {variant!r}")
        if any(not isinstance(step, int) or step < 0 for step in disable_corrector):
            raise ValueError(f"disable_corrector must list step indices >= 0; got {list(disable_corrector)!r}")
        self.order_option = order
        self.variant = variant
        self.corrector = bool(corrector)
        self.lower_order_final = bool(lower_order_final)
        self.disable_corrector = tuple(sorted(set(disable_corrector)))

    @property
    def order(self) -> int:  # type: ignore[override]
        """The nominal order: p for UniP-p, p + 1 for UniPC-p (Zhao et al.'s convergence results).

        Strictly, two steps cap UniPC-3 at 3 as h -> 0: the first (UniPC-1, local error O(h^3)) and, under
        ``lower_order_final``, the step to sigma_last (UniP-2, its corrector skipped). Their error constants are tiny
        (an error made near sigma_max shrinks by ~sigma_data / sigma_max along the flow, and D barely moves in
        lambda near sigma_min), so UniPC-3 shows order 4 down to errors of 1e-9 (tests/test_multistep_solvers.py).
        """
        return self.order_option + 1 if self.corrector else self.order_option

    def options(self) -> dict:
        return {"order": self.order_option, "variant": self.variant, "corrector": self.corrector,
                "lower_order_final": self.lower_order_final, "disable_corrector": self.disable_corrector}

    def step_orders(self, steps: int) -> list[int]:
        return warmup_orders(steps, self.order_option, self.lower_order_final)

    def plan(self, nfe: int) -> Plan:
        plan = super().plan(nfe)
        return replace(plan, orders=tuple(self.step_orders(plan.steps)))

    def sample(self, denoise: Denoise, x: Tensor, sigmas: Tensor, plan: Plan, noise: Noise | None = None) -> Tensor:
        orders = self.step_orders(len(sigmas) - 1)
        history = History(self.order_option)  # (lambda, denoised) of the last steps, newest last
        x_start = None  # the (corrected) point the last predictor step started from
        for i, sigma, sigma_next in step_pairs(sigmas):
            denoised = denoise(x, sigma)  # at the predicted point
            if sigma_next == 0:
                return denoised  # x0 = D(x; sigma_last); a corrector here could not change it
            lambda_ = -math.log(sigma)
            if i > 0 and self.corrector and i - 1 not in self.disable_corrector:
                # UniC: redo the last step, from where it started, with this estimate as one more point (r = 1)
                x = self.update(x_start, history, lambda_, orders[i - 1], denoised)
            history.push((lambda_, denoised))
            x_start = x
            x = self.update(x, history, -math.log(sigma_next), orders[i])  # UniP
        return x

    def update(self, x: Tensor, history: History, lambda_next: float, order: int,
               denoised_next: Tensor | None = None) -> Tensor:
        """One UniP-``order`` step from the newest point of ``history`` to lambda_next, or, given the estimate
        ``denoised_next`` at the predicted point, the UniC-``order`` step that replaces it."""
        lambda_, denoised = history[-1]
        h = lambda_next - lambda_
        # the divided differences of the estimates: order - 1 past ones for UniP, plus the new one for UniC
        points = [history[-1 - m] for m in range(1, order)]
        if denoised_next is not None:
            points.append((lambda_next, denoised_next))
        r = [(lambda_m - lambda_) / h for lambda_m, _ in points]
        B, a = unipc_coefficients(h, r, self.variant)
        # the DDIM step e^-h x - (e^-h - 1) D, minus sum_m (B a_m / r_m) (D_m - D), as one linear combination
        weights = [B * a_m / r_m for a_m, r_m in zip(a, r)]
        return linear_combination(x, math.exp(-h), [denoised, *(denoised_m for _, denoised_m in points)],
                                  [-math.expm1(-h) + sum(weights), *(-weight for weight in weights)])


@hookimpl
def register_solvers(register):
    register(UniPC, name="unipc")
