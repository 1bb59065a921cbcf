"""What a solver is: a map from an NFE budget to a plan, an integrator from x_T down to sigma = 0, and its options."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from bench.core.options import SolverOptions, declared, describe_choices
from bench.errors import BenchError

Denoise = Callable[[Tensor, float], Tensor]  # bench.core.denoiser.CountingDenoiser: x, sigma -> x0
Noise = Callable[[int], Tensor]  # bench.core.noise.NoiseStream: step -> fresh N(0, I) shaped like x


@dataclass(frozen=True)
class Plan:
    """How a solver spends its budget: ``steps`` intervals of the sigma grid (steps + 1 points, the last 0),
    ``nfe`` denoiser calls, and the order of each step for solvers that vary it (the loop reads them from here)."""

    steps: int
    nfe: int
    orders: tuple[int, ...] = ()


@dataclass(frozen=True)
class NoOptions(SolverOptions):
    """A solver without options."""


class Solver:
    """Base of the fixed-step solvers.

    A subclass declares its options as an ``Options`` dataclass (bench.core.options), its ``order``, whether it is
    ``stochastic``, and ``nfe_for_steps``; ``plan`` then finds the largest plan within a budget. ``sample``
    integrates from ``x`` at ``sigmas[0]`` to ``sigmas[-1] = 0`` (``sigmas`` is a float64 tensor on the CPU:
    coefficients are computed from it, so the loop never syncs with the device). The step to sigma = 0 is first
    order, x0 = D(x; sigma_last), for every solver. State lives in ``sample``'s locals: an instance is safe to reuse.

    ``order`` is the global order of convergence the implementation reaches as the steps grow (measured by
    bench.tools.convergence on the analytic models), ``nominal_order`` the one its paper states, and ``order_note``
    says in one line why they differ (or, for a stochastic solver, what its order measures). A fixed value is a
    class attribute; one that depends on the options is a property.
    """

    Options: ClassVar[type[SolverOptions]] = NoOptions
    min_steps: ClassVar[int] = 1

    def __init__(self, **options: Any) -> None:
        unknown = [key for key in options if key not in declared(self.Options)]
        if unknown:
            raise ValueError(f"{type(self).__name__} has no option {unknown[0]!r} "
                             f"(its options: {', '.join(declared(self.Options)) or 'none'})")
        self.config = self.Options(**options)

    @property
    def order(self) -> int:
        return 1

    @property
    def nominal_order(self) -> int:
        return self.order

    @property
    def order_note(self) -> str:
        """Why ``order`` differs from ``nominal_order`` (or what it means), in one line; empty when nothing to say."""
        return ""

    @property
    def stochastic(self) -> bool:
        """Whether it draws per-step noise (``noise(step)``): its samples then follow no ODE trajectory."""
        return False

    @property
    def adaptive(self) -> bool:
        """Whether it chooses its own steps (swept over rtol/atol instead of NFE budgets)."""
        return False

    def nfe_for_steps(self, steps: int) -> int:
        return steps

    @property
    def min_nfe(self) -> int:
        return self.nfe_for_steps(self.min_steps)

    def plan(self, nfe: int) -> Plan:
        """The plan with the most steps whose NFE is within ``nfe``."""
        if nfe < self.min_nfe:
            raise BenchError(f"solver {self.describe()} needs an NFE budget of at least {self.min_nfe}; got {nfe}")
        # nfe_for_steps grows with steps: double past the budget, then bisect (logarithmic in any budget)
        fits, beyond = self.min_steps, self.min_steps + 1
        while self.nfe_for_steps(beyond) <= nfe:
            fits, beyond = beyond, 2 * beyond
        while beyond - fits > 1:
            middle = (fits + beyond) // 2
            fits, beyond = (middle, beyond) if self.nfe_for_steps(middle) <= nfe else (fits, middle)
        return Plan(steps=fits, nfe=self.nfe_for_steps(fits), orders=self.step_orders(fits))

    def step_orders(self, steps: int) -> tuple[int, ...]:
        """The order of each step of a plan of ``steps`` steps, for solvers that vary it (computed once, by plan)."""
        return ()

    def sample(self, denoise: Denoise, x: Tensor, sigmas: Tensor, plan: Plan, noise: Noise | None = None) -> Tensor:
        raise NotImplementedError

    def describe(self) -> str:
        options = ", ".join(f"{key}={value!r}" for key, value in self.options().items())
        return f"{getattr(self, 'name', type(self).__name__)!r}" + (f" ({options})" if options else "")

    def options(self) -> dict[str, Any]:
        """The options of this instance, for the store and messages."""
        if _declares_options(type(self)):
            return self.config.as_dict()
        return {name: getattr(self, name) for name in _constructor_options(type(self)) if hasattr(self, name)}


class AdaptiveSolver(Solver):
    """A solver that chooses its own steps to meet a tolerance: it is swept over ``rtol``/``atol`` instead of an
    NFE budget, and its NFE is an output. It integrates from ``sigmas[0]`` (sigma_max) to ``sigmas[1]``
    (sigma_min) and then takes the common first-order final step, x0 = D(x; sigma_min)."""

    @dataclass(frozen=True)
    class Options(SolverOptions):
        rtol: float = 1e-3
        atol: float = 1e-3

        def validate(self) -> None:
            if not (self.rtol > 0 and self.atol > 0):
                raise ValueError(f"rtol and atol must be > 0; got rtol={self.rtol!r}, atol={self.atol!r}")

    @property
    def adaptive(self) -> bool:
        return True

    def plan(self, nfe: int | None = None) -> Plan:
        if nfe is not None:
            raise BenchError(f"solver {self.describe()} is adaptive: give it rtol/atol (a suite's `tolerances`), "
                             f"not an NFE budget (got nfe={nfe})")
        return Plan(steps=0, nfe=0)  # steps 0: chosen while it runs; the counted NFE is the answer


class SolverFamily:
    """One registered name for several solver classes, chosen by the value of one option: ``dpm-solver++`` with
    method="multistep" builds DPM-Solver++'s multistep class, with method="singlestep" its singlestep class.

    Calling the family builds the member: ``DPMSolverPlusPlus(method="singlestep", order=3)``. An option that only
    other members declare is dropped when given at its default (a suite may spell out defaults) and refused
    otherwise, with the message ``inapplicable`` writes.
    """

    choose_by: ClassVar[str]
    default: ClassVar[str]
    members: ClassVar[dict[str, type[Solver]]]

    def __new__(cls, **options: Any) -> Solver:  # type: ignore[misc]
        member = cls.member(options)
        return member(**{key: value for key, value in options.items() if key in declared(member.Options)})

    @classmethod
    def member(cls, options: dict[str, Any]) -> type[Solver]:
        """The class ``options`` choose; a ValueError for an option that belongs to another member."""
        choice = options.get(cls.choose_by, cls.default)
        if choice not in cls.members:
            raise ValueError(f"{cls.choose_by} must be {describe_choices(tuple(cls.members))}; got {choice!r}")
        member = cls.members[choice]
        for key, value in options.items():
            if key in declared(member.Options):
                continue
            owners = [other for other in cls.members.values() if key in declared(other.Options)]
            if owners and any(value != declared(other.Options)[key].default for other in owners):
                raise ValueError(cls.inapplicable(key, value, choice))
        return member

    @classmethod
    def inapplicable(cls, key: str, value: Any, choice: str) -> str:
        owners = [name for name, member in cls.members.items() if key in declared(member.Options)]
        return (f"{key}={value!r} applies to {' or '.join(f'{cls.choose_by}={name!r}' for name in owners)} only; "
                f"got {cls.choose_by}={choice!r}")

    @classmethod
    def option_names(cls) -> list[str]:
        names: dict[str, None] = {cls.choose_by: None}
        for member in cls.members.values():
            names.update(dict.fromkeys(declared(member.Options)))
        return list(names)


def option_names(cls: type) -> list[str]:
    """The options a registered solver takes: its declared Options fields (a family: all its members')."""
    if isinstance(cls, type) and issubclass(cls, SolverFamily):
        return cls.option_names()
    if _declares_options(cls):
        return list(declared(cls.Options))
    return _constructor_options(cls)


def check_options(cls: type, name: str, options: dict[str, Any]) -> dict[str, Any]:
    """Validate a table of options against a registered solver's declaration without building the solver: names,
    types, allowed values and the checks between options. Returns them with every default filled in."""
    _check_names(cls, name, options)
    target = cls.member(options) if issubclass(cls, SolverFamily) else cls
    if not _declares_options(target):
        return dict(options)  # a plugin that takes its options in its own constructor: only building tells
    own = {key: value for key, value in options.items() if key in declared(target.Options)}
    try:
        return target.Options(**own).as_dict()
    except (TypeError, ValueError) as error:
        raise BenchError(f"solver {name!r}: {error}") from None


def build_solver(cls: type, name: str, options: dict[str, Any]) -> Solver:
    """``cls(**options)``, with an actionable error for an option the solver does not take or a value it refuses."""
    _check_names(cls, name, options)
    try:
        solver = cls(**options)
    except (TypeError, ValueError) as error:
        raise BenchError(f"solver {name!r}: {error}") from None
    solver.name = name
    return solver


def _check_names(cls: type, name: str, options: dict[str, Any]) -> None:
    allowed = option_names(cls)
    for key in options:
        if key not in allowed:
            raise BenchError(f"solver {name!r} has no option {key!r} (its options: {', '.join(allowed) or 'none'})")


def _declares_options(cls: type) -> bool:
    """Built with the declared Options: the class does not take its options in a constructor of its own (a plugin
    written before options were declared, whose ``__init__`` arguments are its options)."""
    return "Options" in _defined_along(cls) or "__init__" not in _defined_along(cls)


def _defined_along(cls: type) -> set[str]:
    """Names defined by ``cls`` and its bases below Solver."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if klass in (Solver, object):
            break
        names.update(vars(klass))
    return names


def _constructor_options(cls: type) -> list[str]:
    params = inspect.signature(cls.__init__).parameters.values()
    return [p.name for p in params if p.name != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]

