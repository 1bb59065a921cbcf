"""Parallel samplers: a base solver's steps, computed in fewer and wider model calls.

A step solver (bench.core.steps) is a step rule, state_next = base.step(i, state, estimates, sigmas, orders, noise),
and its sequential loop makes one model call per step, one after another. A parallel sampler guesses the states of
many steps, evaluates the denoiser at all their points in one batched call (a round), applies the same rule to each
step, and repeats until the guesses stop changing; what it converges to is the sequential loop's result.

- ParaDiGMS (Shih et al. 2023, plugins/paradigms.py): Picard iteration over a sliding window of steps.
- SRDS (Selvam, Merchant and Ermon 2024, plugins/srds.py): Parareal; a coarse solve, fine solves of its intervals
  in parallel, a predictor-corrector update, pipelined.

What they share lives here: the base solver and its budget, the per-step noise (drawn once, up front, from the
per-sample streams, so a stochastic base gives its own sequential samples as the tolerance goes to 0), the batched
call, and the convergence measure. A guess of state i + 1 has converged when its squared change per dimension,
for the worst sample of the batch, is at most tolerance^2 times the DDPM noise variance of step i,

    sigma_next^2 (1 - sigma_next^2 / sigma^2)       (the variance ancestral sampling adds, in x = x0 + sigma eps),

for ODE bases too, as diffusers' parallel DDIM scheduler does: a change well below the noise one step would add
cannot be seen in the samples.

Counting: the budget is the base's sequential budget (``Plan.nfe``); a round of w steps of each sample is one call
(one round) and w evaluations per sample (bench.core.denoiser.CountingDenoiser), and the plan declares the most of
each the sampler may spend (``Plan.max_evals``, ``Plan.max_rounds``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from bench.core.solver import Denoise, Noise, Plan, Solver, build_solver
from bench.core.steps import State, StepSolver, require_step_rule
from bench.errors import BenchError

STOCHASTIC_TOLERANCE = 0.1  # ParaDiGMS' default: a tenth of a step's noise
ODE_TOLERANCE = 1e-3  # an ODE base's samples are compared along trajectories, where 0.1 of the noise shows


def ddpm_variance(sigma: float, sigma_next: float) -> float:
    """The variance ancestral (DDPM) sampling adds on the step from sigma to sigma_next, in x = x0 + sigma eps."""
    return sigma_next**2 * (1 - sigma_next**2 / sigma**2)


class ParallelSolver(Solver):
    """Base of the parallel samplers: a ``base`` step solver built with ``base_options``; its budget, plan, orders
    and stochasticity are the sampler's. Subclasses declare ``Options`` (with ``base``, ``base_options`` and
    ``tolerance`` among them), write ``sample`` and ``bounds``: the most evaluations per sample and rounds that a
    plan of so many steps may take."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        from bench.registry import manager  # the registry at build time, as bench.sample builds solvers

        registration = manager().get("solver", self.config.base)
        base = build_solver(registration.obj, registration.name, dict(self.config.base_options or {}))
        self.base: StepSolver = require_step_rule(base, f"{type(self).__name__} (base={self.config.base!r})")

    @property
    def order(self) -> int:
        return self.base.order

    @property
    def nominal_order(self) -> int:
        return self.base.nominal_order

    @property
    def order_note(self) -> str:
        return self.base.order_note

    @property
    def stochastic(self) -> bool:
        return self.base.stochastic

    @property
    def min_nfe(self) -> int:
        return self.base.min_nfe

    @property
    def tolerance(self) -> float:
        """The tolerance given, or the default for the base: 0.1 of the noise for SDEs, 1e-3 for ODEs."""
        if self.config.tolerance is not None:
            return self.config.tolerance
        return STOCHASTIC_TOLERANCE if self.base.stochastic else ODE_TOLERANCE

    def nfe_for_steps(self, steps: int) -> int:
        return self.base.nfe_for_steps(steps)

    def plan(self, nfe: int) -> Plan:
        """The base's plan for the budget, with the sampler's bounds on evaluations and rounds."""
        plan = self.base.plan(nfe)
        max_evals, max_rounds = self.bounds(plan.steps)
        return replace(plan, max_evals=max_evals, max_rounds=max_rounds)

    def bounds(self, steps: int) -> tuple[int, int]:
        """(evaluations per sample, rounds): the most a plan of ``steps`` steps may take."""
        raise NotImplementedError

    def step_noises(self, steps: int, noise: Noise | None) -> list[Tensor | None]:
        """The noise of every step of the base, drawn once, up front (None for an ODE base)."""
        if not self.base.stochastic:
            return [None] * steps
        if noise is None:
            raise ValueError(f"solver {self.describe()} has a stochastic base: it needs a noise source "
                             "(noise(step) -> N(0, I) shaped like x)")
        return [noise(i) for i in range(steps)]

    def thresholds(self, sigmas: list[float], device: torch.device) -> Tensor:
        """tolerance^2 times each step's DDPM variance, on the device: the squared change per dimension under which
        the state a step produces has converged (module docstring)."""
        variances = [ddpm_variance(sigma, sigma_next) for sigma, sigma_next in zip(sigmas[:-2], sigmas[1:-1])]
        return torch.tensor(variances, dtype=torch.float64).mul_(self.tolerance**2).to(device)


def evaluate(denoise: Denoise, points: list[Tensor], sigmas: Tensor) -> list[Tensor]:
    """D at every point (each a batch of samples, all of one shape) and its sigma (``sigmas``: one per point, on the
    device), in one call: the points go step-major, as bench.core.denoiser.CountingDenoiser expects."""
    if len(points) == 1:
        return [denoise(points[0], sigmas[0])]
    batch = len(points[0])
    denoised = denoise(torch.cat(points), sigmas.repeat_interleave(batch))
    return list(denoised.split(batch))


def squared_change(new: Tensor, old: Tensor) -> Tensor:
    """The mean squared change per dimension of each sample, in float64: [batch]."""
    return (new - old).double().square().flatten(1).mean(dim=1)


def leading_converged(changes: list[Tensor], thresholds: Tensor) -> int:
    """How many of the first states have converged: ``changes`` of consecutive states ([batch] each), their
    thresholds. The batch shares one answer, its worst sample's; this is a round's one host sync."""
    if not changes:
        return 0
    converged = torch.stack(changes).amax(dim=1) <= thresholds
    return int(converged.long().cumprod(0).sum())


def fieldwise(fn: Callable[..., Tensor], *states: State) -> State:
    """``fn`` on states: on the tensors themselves, or field by field for a state that is a tuple of tensors
    (UniPC's)."""
    if isinstance(states[0], Tensor):
        return fn(*states)
    return type(states[0])(*(fn(*fields) for fields in zip(*states)))


def cumulative(start: State, increments: list[State]) -> list[State]:
    """start + increments[0], start + increments[0] + increments[1], ...: the cumulative sums, field by field."""
    if isinstance(start, Tensor):
        return list(torch.stack(increments).cumsum(0).add_(start).unbind(0))
    per_field = [cumulative(field, [increment[f] for increment in increments]) for f, field in enumerate(start)]
    return [type(start)(*fields) for fields in zip(*per_field)]


def check_tensor_state(solver: StepSolver, user: str) -> None:
    """A BenchError unless the solver's state is x alone (a sampler that moves states between solvers needs it)."""
    if type(solver).initial_state is not StepSolver.initial_state or type(solver).point is not StepSolver.point:
        raise BenchError(f"{user} needs a base whose state is x alone; solver {solver.describe()} carries more "
                         "(its state is a tuple). Use paradigms with it, or another base")
