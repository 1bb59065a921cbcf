"""Lu et al.'s singlestep methods (DPM-Solver, DPM-Solver++ singlestep): how a budget is split into steps of
orders 1 to 3, and where each step evaluates the model inside its interval."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

from torch import Tensor

from bench.core.solver import Plan, Solver

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
    against 9.7). Its O(h^2) local error caps those budgets at order 2, but next to sigma_min its constant, D's change
    in lambda, is small: DPM-Solver-3 fits 2.96 over 64..512 steps ending [..., 3, 1, 1] and 2.98 ending [..., 3, 1]
    from sigma_max = 80 to sigma_min = 0.002; over sigma in [0.5, 2] the cap shows (2.01 against 3.02).
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


class SinglestepSolver(Solver):
    """The NFE accounting of Lu et al.'s singlestep solvers (DPM-Solver, DPM-Solver++ singlestep): DPM-Solver-fast
    spends a budget exactly (singlestep_orders), on a grid of one sigma per step (``intermediates="lambda"``,
    inner points between grid sigmas) or of one sigma per call (anything else). Subclasses declare the options
    ``order`` and ``intermediates``."""

    @property
    def order(self) -> int:
        return self.config.order

    @property
    def order_note(self) -> str:
        if self.config.order == 3:
            return ("budgets of 3K + 2 calls end [..., 3, 1, 1] (diffusers' allocation): their first-order step to "
                    "sigma_min caps those at 2")
        return ""

    def nfe_for_steps(self, steps: int) -> int:
        """Grid intermediates: one call per interval of the grid. Lambda intermediates: the most a plan of
        ``steps`` steps can spend, [order] * (steps - 1) + [1]."""
        if self.config.intermediates == "lambda":
            return self.config.order * (steps - 1) + 1
        return steps

    def plan(self, nfe: int) -> Plan:
        super().plan(nfe)  # the budget check
        orders = singlestep_orders(nfe, self.config.order)  # DPM-Solver-fast spends the budget exactly
        steps = len(orders) if self.config.intermediates == "lambda" else nfe
        return Plan(steps=steps, nfe=nfe, orders=tuple(orders))

    def intervals(self, sigmas: Tensor, plan: Plan) -> list[SinglestepInterval]:
        return singlestep_intervals(sigmas, plan.orders, self.config.intermediates)
