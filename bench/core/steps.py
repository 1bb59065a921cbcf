"""Solvers that make one model call per step, written as a step rule, and the one loop that runs them.

A step rule is a pure function from the state at grid point i to the state at grid point i + 1:

    state_next = solver.step(i, state, estimates, sigmas, orders, noise)

- ``estimates``: what the model said at the last points, newest last: D(point(state_j); sigma_j) for the steps
  j = ..., i - 1, i, or eps_j = (x_j - D_j) / sigma_j for solvers that work with the noise prediction
  (``solver.estimate``); at most ``solver.history`` of them, fewer while the history fills;
- ``sigmas``: the grid, float64 on the CPU (weights are computed from it: no device sync); ``orders``: plan.orders;
- ``noise``: this step's N(0, I) draw, ``noise(i)``, for a stochastic solver; None otherwise.

The denoiser is evaluated at ``solver.point(state)``: the state is x itself for every solver but UniPC, whose state
also carries the point its last predictor step started from. The last step, to sigma = 0, has no rule: it is
x0 = D(point(state); sigma_last) for every solver. The sequential loop, run_steps, is each such solver's
``sample``, and reads:

    state, estimates = solver.initial_state(x_T), ()
    for i in range(plan.steps):
        x = solver.point(state)
        denoised = denoise(x, sigmas[i])
        if i == plan.steps - 1:
            return denoised
        estimates = (*estimates, solver.estimate(x, denoised, sigmas[i]))[-solver.history:]
        state = solver.step(i, state, estimates, sigmas, plan.orders, noise(i) if solver.stochastic else None)

A parallel sampler (Picard iteration, Parareal) guesses the states of many steps, evaluates the denoiser at all their
points in one batched call, and applies the same rule to each step: what it computes is what this loop computes.
Solvers that call the model several times per step (Heun, singlestep and adaptive methods) are not StepSolvers.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor

from bench.core.solver import Denoise, Noise, Plan, Solver
from bench.errors import BenchError

State = Any  # x (a Tensor) for every StepSolver but UniPC (UniPCState)

# Why most multistep methods converge at order 2 whatever their nominal order: their first step has one estimate
# to go on, so it is first order, and its O(h^2) local error stays in the result. The flow shrinks an error made at
# sigma_max by about sigma_data / sigma_max, so from sigma_max = 80 the nominal order shows over the usual budgets.
WARMUP_CAP = "the first-order warm-up step caps a multistep method at 2"


class StepSolver(Solver):
    """A solver of one model call per step, defined by its step rule (module docstring). Subclasses write
    ``step`` and, where they differ from the defaults: ``prediction`` ("noise": the history holds eps),
    ``history`` (how many estimates a step reads), ``step_orders``, ``initial_state`` and ``point``."""

    prediction: ClassVar[str] = "data"  # what a step reads of each model call: "data", D; "noise", eps

    @property
    def history(self) -> int:
        """The most estimates a step reads (the newest is this step's)."""
        return 1

    def step_orders(self, steps: int) -> tuple[int, ...]:
        """The order of each step; the last, to sigma = 0, is 1."""
        return (1,) * steps

    def initial_state(self, x: Tensor) -> State:
        return x

    def point(self, state: State) -> Tensor:
        """Where the denoiser is evaluated in ``state``."""
        return state

    def estimate(self, x: Tensor, denoised: Tensor, sigma: float) -> Tensor:
        """What the step rule reads of a model call at (x, sigma): D, or the noise eps = (x - D) / sigma."""
        return denoised if self.prediction == "data" else (x - denoised) / sigma

    def step(self, i: int, state: State, estimates: tuple[Tensor, ...], sigmas: Tensor, orders: tuple[int, ...],
             noise: Tensor | None) -> State:
        """The state at sigmas[i + 1] > 0 from the state at sigmas[i] (module docstring)."""
        raise NotImplementedError

    def sample(self, denoise: Denoise, x: Tensor, sigmas: Tensor, plan: Plan, noise: Noise | None = None) -> Tensor:
        return run_steps(self, denoise, x, sigmas, plan, noise)


def run_steps(solver: StepSolver, denoise: Denoise, x: Tensor, sigmas: Tensor, plan: Plan,
              noise: Noise | None = None) -> Tensor:
    """The sequential sampling loop of a step solver: x0 from x at sigmas[0] (module docstring)."""
    if solver.stochastic and noise is None:
        raise ValueError(f"solver {solver.describe()} is stochastic: it needs a noise source (noise(step) -> "
                         "N(0, I) shaped like x)")
    sigma_list = sigmas.tolist()
    state, estimates = solver.initial_state(x), ()
    for i in range(plan.steps):
        x = solver.point(state)
        denoised = denoise(x, sigma_list[i])
        if i == plan.steps - 1:  # to sigma = 0
            return denoised
        estimates = (*estimates, solver.estimate(x, denoised, sigma_list[i]))[-solver.history:]
        state = solver.step(i, state, estimates, sigmas, plan.orders, noise(i) if solver.stochastic else None)
    return solver.point(state)


def require_step_rule(solver: Solver, user: str = "a parallel sampler") -> StepSolver:
    """``solver`` if it has a step rule; a BenchError saying why not otherwise."""
    if isinstance(solver, StepSolver):
        return solver
    why = ("chooses its own steps" if solver.adaptive
           else "calls the model several times per step, or runs a loop of its own")
    raise BenchError(f"{user} needs a solver with a step rule (one model call per step); solver {solver.describe()} "
                     f"{why}. Step solvers: euler, ddim, euler-maruyama, ipndm, deis, unipc, and dpm-solver / "
                     "dpm-solver++ with method='multistep'")


def warmup_orders(steps: int, order: int, lower_order_final: bool = True) -> tuple[int, ...]:
    """The order of each step of a multistep method: it can use at most i + 1 points at step i (warm-up), and
    the last step, to sigma = 0, is first order. With ``lower_order_final`` the last steps before it also drop
    order so that no step uses more points than remain (DPM-Solver++ and UniPC do this below ~15 steps, where
    high-order steps near sigma = 0 are unstable)."""
    orders = []
    for i in range(steps):
        step_order = min(order, i + 1)
        if lower_order_final:
            step_order = min(step_order, steps - i)
        orders.append(step_order)
    orders[-1] = 1
    return tuple(orders)
