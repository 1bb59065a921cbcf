"""What a solver is: a map from an NFE budget to a plan, and an integrator from x_T down to sigma = 0."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from bench.errors import BenchError

Denoise = Callable[[Tensor, float], Tensor]  # bench.core.denoiser.CountingDenoiser: x, sigma -> x0
Noise = Callable[[int], Tensor]  # bench.core.noise.NoiseStream: step -> fresh N(0, I) shaped like x


@dataclass(frozen=True)
class Plan:
    """How a solver spends its budget: ``steps`` intervals of the sigma grid (steps + 1 points, the last 0),
    ``nfe`` denoiser calls, and the order of each step for solvers that vary it."""

    steps: int
    nfe: int
    orders: tuple[int, ...] = ()


class Solver:
    """Base of the fixed-step solvers.

    A subclass sets ``order`` (nominal order of convergence), ``stochastic``, and ``nfe_for_steps``; ``plan`` then
    finds the largest plan within a budget. ``sample`` integrates from ``x`` at ``sigmas[0]`` to ``sigmas[-1] = 0``
    (``sigmas`` is a float64 tensor on the CPU: coefficients are computed from it before the loop, so the loop
    never syncs with the device). The step to sigma = 0 is first order, x0 = D(x; sigma_last), for every solver.
    State lives in ``sample``'s locals: an instance is safe to reuse.
    """

    order: ClassVar[int] = 1
    stochastic: ClassVar[bool] = False
    adaptive: ClassVar[bool] = False
    min_steps: ClassVar[int] = 1

    def nfe_for_steps(self, steps: int) -> int:
        return steps

    @property
    def min_nfe(self) -> int:
        return self.nfe_for_steps(self.min_steps)

    def plan(self, nfe: int) -> Plan:
        """The plan with the most steps whose NFE is within ``nfe``."""
        if nfe < self.min_nfe:
            raise BenchError(f"solver {self.describe()} needs an NFE budget of at least {self.min_nfe}; got {nfe}")
        steps = self.min_steps
        while self.nfe_for_steps(steps + 1) <= nfe:
            steps += 1
        return Plan(steps=steps, nfe=self.nfe_for_steps(steps))

    def sample(self, denoise: Denoise, x: Tensor, sigmas: Tensor, plan: Plan, noise: Noise | None = None) -> Tensor:
        raise NotImplementedError

    def describe(self) -> str:
        options = ", ".join(f"{key}={value!r}" for key, value in self.options().items())
        return f"{getattr(self, 'name', type(self).__name__)!r}" + (f" ({options})" if options else "")

    def options(self) -> dict[str, Any]:
        """The constructor options of this instance, for the store and messages."""
        return {name: getattr(self, name) for name in option_names(type(self)) if hasattr(self, name)}


class AdaptiveSolver(Solver):
    """A solver that chooses its own steps to meet a tolerance: it is swept over ``rtol``/``atol`` instead of an
    NFE budget, and its NFE is an output. It integrates from ``sigmas[0]`` (sigma_max) to ``sigmas[1]``
    (sigma_min) and then takes the common first-order final step, x0 = D(x; sigma_min)."""

    adaptive = True

    def __init__(self, rtol: float = 1e-3, atol: float = 1e-3) -> None:
        if not (rtol > 0 and atol > 0):
            raise ValueError(f"rtol and atol must be > 0; got rtol={rtol!r}, atol={atol!r}")
        self.rtol, self.atol = float(rtol), float(atol)

    def plan(self, nfe: int | None = None) -> Plan:
        if nfe is not None:
            raise BenchError(f"solver {self.describe()} is adaptive: give it rtol/atol (a suite's `tolerances`), "
                             f"not an NFE budget (got nfe={nfe})")
        return Plan(steps=0, nfe=0)  # steps 0: chosen while it runs; the counted NFE is the answer


def option_names(cls: type) -> list[str]:
    params = inspect.signature(cls.__init__).parameters.values()
    return [p.name for p in params if p.name != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]


def build_solver(cls: type, name: str, options: dict[str, Any]) -> Solver:
    """``cls(**options)``, with an actionable error for an option the solver does not take."""
    allowed = option_names(cls)
    for key in options:
        if key not in allowed:
            raise BenchError(f"solver {name!r} has no option {key!r} (its options: {', '.join(allowed) or 'none'})")
    try:
        solver = cls(**options)
    except (TypeError, ValueError) as error:
        raise BenchError(f"solver {name!r}: {error}") from None
    solver.name = name
    return solver
