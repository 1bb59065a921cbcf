"""Machinery shared by the higher-order solvers: half-log-SNR, the multistep history, order schedules.

In the sigma parametrization (alpha = 1) the half-log-SNR is lambda = -log sigma, and the step size of the
exponential integrators (DPM-Solver, DPM-Solver++, UniPC, DEIS) is h = lambda_next - lambda = log(sigma / sigma_next).
Dividing a VP sample by alpha leaves lambda and every exponential-integrator update unchanged, so these solvers
written in sigma are the VP papers' solvers exactly.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from bench.core.solver import Plan, Solver


def half_log_snr(sigmas: Tensor) -> Tensor:
    """lambda = -log sigma (float64); +inf at sigma = 0."""
    return -sigmas.to(torch.float64).log()


def step_pairs(sigmas: Tensor) -> Iterator[tuple[int, float, float]]:
    """(index, sigma, sigma_next) for each step of the grid, as Python floats (no device sync in the loop)."""
    values = sigmas.tolist()
    for i, (sigma, sigma_next) in enumerate(zip(values[:-1], values[1:])):
        yield i, sigma, sigma_next


def warmup_orders(steps: int, order: int, lower_order_final: bool = True) -> list[int]:
    """The order of each step of a multistep method: it can use at most i + 1 points at step i (warm-up), and
    the last step, to sigma = 0, is first order. With ``lower_order_final`` the last steps before it also drop
    order so that no step uses more points than remain (DPM-Solver++ and UniPC do this below ~15 steps, where
    high-order steps near sigma = 0 are unstable)."""
    orders = []
    for i in range(steps):
        remaining = steps - i
        step_order = min(order, i + 1)
        if lower_order_final:
            step_order = min(step_order, remaining)
        orders.append(step_order)
    orders[-1] = 1
    return orders


def linear_combination(x: Tensor, x_weight: float, tensors: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """x_weight x + sum_k weights[k] tensors[k], as a new tensor.

    A multistep update is linear in the state and the stored denoiser outputs, with scalar coefficients; summing
    it term by term reads and writes the state once per term, where the update written out as differences and
    divided differences would take a pass (and a kernel launch) per operation. Solver steps are memory- or
    launch-bound, so this is most of their cost.
    """
    combined = x * x_weight
    for tensor, weight in zip(tensors, weights):
        combined.add_(tensor, alpha=weight)
    return combined


class History:
    """The last ``size`` values of a quantity (denoised estimates, their lambdas), newest last."""

    def __init__(self, size: int) -> None:
        self._items: deque = deque(maxlen=size)

    def push(self, item) -> None:
        self._items.append(item)

    def __getitem__(self, back: int):
        """history[-1] is the newest, history[-2] the one before."""
        return self._items[back]

    def __len__(self) -> int:
        return len(self._items)


# --- singlestep methods (DPM-Solver, DPM-Solver++ singlestep): order allocation and intermediate points ---

# The intermediate points of a singlestep step of order k, as fractions r of its step h in lambda: DPM-Solver-2 at
# the midpoint, DPM-Solver-3 at r1 = 1/3, r2 = 2/3 (Lu et al. 2022, section 3.3, the values the paper recommends).
SINGLESTEP_FRACTIONS: dict[int, tuple[float, ...]] = {1: (), 2: (0.5,), 3: (1.0 / 3.0, 2.0 / 3.0)}

INTERMEDIATES = ("lambda", "grid")


def singlestep_orders(nfe: int, order: int) -> list[int]:
    """The order of each step of singlestep DPM-Solver ("DPM-Solver-fast", Lu et al. 2022, section 3.4) that
    spends an NFE budget exactly: as many steps of ``order`` as fit, then lower orders, ending with the first-order
    step to sigma = 0 (a step of order k costs k calls).

        order 3:  nfe = 3m: [3] * (m - 1) + [2, 1];   3m + 1: [3] * m + [1];   3m + 2: [3] * m + [1, 1]
        order 2:  nfe = 2m + 1: [2] * m + [1];   2m: [2] * (m - 1) + [1, 1]
        order 1:  [1] * nfe

    The original code ends 3m + 2 with [3] * m + [2]: its last step stops at sigma_min, not at 0, and a second-order
    step to sigma = 0 has no intermediate point (lambda = inf; diffusers gave NaN there). [..., 3, 1, 1] is diffusers'
    fix (DPMSolverSinglestepScheduler with final_sigmas_type="zero"), and the better one: its first-order step to
    sigma_min is the stable "lower order final" step, where [..., 3, 2, 2, 1] puts two second-order steps near
    sigma_min, which noise-prediction DPM-Solver handles badly at few steps (gmm2d, karras, 5 calls: error 0.54
    against 9.7). Its O(h^2) local error costs an order in the limit, but next to sigma_min its constant is small:
    DPM-Solver-3 fits 2.96 over 64..512 steps ending [..., 3, 1, 1] and 2.98 ending [..., 3, 1].
    """
    if nfe < 1:
        raise ValueError(f"a singlestep plan needs an NFE budget >= 1; got {nfe}")
    if order == 3:
        m, rest = divmod(nfe, 3)
        if rest == 0:
            return [3] * (m - 1) + [2, 1]
        if rest == 1:
            return [3] * m + [1]
        return [3] * m + [1, 1]
    if order == 2:
        m, rest = divmod(nfe, 2)
        return [2] * m + [1] if rest == 1 else [2] * (m - 1) + [1, 1]
    if order == 1:
        return [1] * nfe
    raise ValueError(f"singlestep order must be 1, 2 or 3; got {order!r}")


class SinglestepInterval(NamedTuple):
    """One step of a singlestep method: from ``sigma`` to ``sigma_next`` at ``order``, its intermediate points at
    lambda + r1 h and lambda + r2 h (None where the order does not use them)."""

    order: int
    sigma: float
    sigma_next: float
    r1: float | None
    r2: float | None


def singlestep_intervals(sigmas: Tensor, orders: Sequence[int], intermediates: str = "lambda"
                         ) -> list[SinglestepInterval]:
    """The steps of a singlestep method on a grid, as Python floats (no device sync in the loop).

    ``intermediates="lambda"``: the grid has one interval per step (len(orders) + 1 points), and a step's
    intermediate points sit at the fixed fractions SINGLESTEP_FRACTIONS of it in lambda (the original DPM-Solver
    code with skip_type="logSNR").
    ``intermediates="grid"``: the grid has one interval per call (sum(orders) + 1 points); a step of order k spans
    k intervals and evaluates at the grid points inside, r_j = (lambda_{i+j} - lambda_i) / h (the original code
    with the time-uniform/quadratic skip types, and diffusers' DPMSolverSinglestepScheduler).
    """
    values = sigmas.tolist()
    if intermediates == "lambda":
        if len(values) != len(orders) + 1:
            raise ValueError(f"{len(orders)} singlestep steps need {len(orders) + 1} sigmas; got {len(values)}")
        return [SinglestepInterval(order, sigma, sigma_next, *_r1_r2(SINGLESTEP_FRACTIONS[order]))
                for order, sigma, sigma_next in zip(orders, values[:-1], values[1:])]
    if intermediates == "grid":
        if len(values) != sum(orders) + 1:
            raise ValueError(f"singlestep orders {list(orders)} on the grid need {sum(orders) + 1} sigmas; "
                             f"got {len(values)}")
        intervals, start = [], 0
        for order in orders:
            sigma, sigma_next = values[start], values[start + order]
            fractions: tuple[float, ...] = ()
            if order > 1:  # (a step to sigma = 0 is first order: it has no lambda)
                h = math.log(sigma / sigma_next)
                fractions = tuple(math.log(sigma / values[start + j]) / h for j in range(1, order))
            intervals.append(SinglestepInterval(order, sigma, sigma_next, *_r1_r2(fractions)))
            start += order
        return intervals
    raise ValueError(f"intermediates must be one of {', '.join(map(repr, INTERMEDIATES))}; got {intermediates!r}")


def _r1_r2(fractions: tuple[float, ...]) -> tuple[float | None, float | None]:
    """(r1, r2) from a step's fractions, None for those its order does not use."""
    padded = (*fractions, None, None)
    return padded[0], padded[1]


class SinglestepOrMultistep(Solver):
    """The NFE accounting of Lu et al.'s solvers (DPM-Solver, DPM-Solver++), which run ``method`` "multistep" (one
    call per step, warmup_orders) or "singlestep" (singlestep_orders; ``intermediates`` "lambda" places a step's
    inner points between grid sigmas, anything else spends one grid interval per call). Subclasses set method,
    order, lower_order_final and intermediates."""

    method: str
    order: int
    lower_order_final: bool
    intermediates: str

    def nfe_for_steps(self, steps: int) -> int:
        """Multistep and grid intermediates: one call per interval of the grid. Singlestep on a grid of one sigma
        per step: the most a plan of ``steps`` steps can spend, [order] * (steps - 1) + [1]."""
        if self.method == "singlestep" and self.intermediates == "lambda":
            return self.order * (steps - 1) + 1
        return steps

    def plan(self, nfe: int | None) -> Plan:
        if self.method == "multistep":
            plan = super().plan(nfe)
            return Plan(plan.steps, plan.nfe, tuple(warmup_orders(plan.steps, self.order, self.lower_order_final)))
        super().plan(nfe)  # the budget check
        orders = singlestep_orders(nfe, self.order)  # DPM-Solver-fast spends the budget exactly
        steps = len(orders) if self.intermediates == "lambda" else nfe
        return Plan(steps=steps, nfe=nfe, orders=tuple(orders))
