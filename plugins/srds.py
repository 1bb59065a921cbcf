"""SRDS, the Self-Refining Diffusion Sampler (Selvam, Merchant and Ermon 2024): Parareal over the base's steps.

The base's steps 0 .. L - 1 (L = steps - 1: all but the step to sigma = 0) are cut into M intervals at the
boundaries b_0 = 0 < b_1 < ... < b_M = L (M = ``coarse_steps``, about sqrt(L)). Two solvers map the state at b_n to
the state at b_(n+1):

- the fine solve F: the base's own steps b_n .. b_(n+1) - 1, one model call each;
- the coarse solve G: one DDIM step from sigma(b_n) to sigma(b_(n+1)), x_next = D + sigma_next / sigma (x - D).

Iteration 0 is the coarse solve, U^0_(n+1) = G(U^0_n). Iteration k + 1 corrects it with the fine solves of
iteration k, all intervals at once (Parareal's predictor-corrector):

    U^(k+1)_(n+1) = G(U^(k+1)_n) + F(U^k_n) - G(U^k_n).

U^k_n is exact for n <= k, so M iterations give the base's sequential result; the iteration stops earlier when an
iteration changes no boundary state by more than the tolerance: bench.core.parallel's measure, with the coarse
step's noise variance, sigma(b_n)^2 (1 - sigma(b_n)^2 / sigma(b_(n-1))^2), at boundary n (the coarse step is the
unit Parareal updates, as a step is ParaDiGMS').

Pipelined, as the paper runs it: a fine solve starts as soon as its initial state is known, and the coarse step of
iteration k + 1 from boundary n runs as soon as U^(k+1)_n and F(U^k_n) are known, so the fine solves of several
iterations run side by side. Every round gathers the next model call of every running solve into one batched call;
the coarse step from U_n shares its model call with the first step of the fine solve from U_n (both evaluate D at
U_n, sigma(b_n)). A multistep base continues, at the start of interval n, from the estimates that the fine solve of
interval n - 1 one iteration earlier ended with (exact once that solve is); iteration 0 warms up again in each
interval. A stochastic base's noise is drawn once, up front: the fine solves are then deterministic maps, and the
iteration converges to the base's samples from that noise.

Counting: iteration k < K runs the fine solves of intervals k .. M - 1 (L - b_k evaluations per sample), the last
iteration K only its coarse steps (M - K), and the step to sigma = 0 is one more call; the rounds follow the
pipeline's recurrence (``pipeline_rounds``), and are ``steps`` for K = M, no more than the sequential loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from bench.core.options import SolverOptions, option
from bench.core.parallel import ParallelSolver, check_tensor_state, evaluate, squared_change
from bench.core.solver import Denoise, Noise, Plan
from bench.hookspecs import hookimpl


def boundaries(transitions: int, intervals: int) -> list[int]:
    """b_0 = 0 < ... < b_M = transitions, as even as integers allow."""
    return [round(n * transitions / intervals) for n in range(intervals + 1)]


def pipeline_rounds(bounds: list[int], iterations: int) -> int:
    """The calls the pipelined iteration makes, one after another, when it runs ``iterations`` iterations: t(k, n),
    the rounds done when U^k_n is known, follows t(0, n + 1) = t(0, n) + 1 (a coarse step each), t(k, k) =
    t(k - 1, k - 1) + s_(k-1) (the fine solve that makes it exact), t(k, n + 1) = max(t(k, n) + 1, t(k - 1, n) + s_n)
    (its coarse step, and the fine solve it corrects with), s_n = b_(n+1) - b_n; one more for the step to sigma = 0."""
    intervals = len(bounds) - 1
    known = [[0] * (intervals + 1) for _ in range(iterations + 1)]
    for n in range(intervals):
        known[0][n + 1] = known[0][n] + 1
    for k in range(1, iterations + 1):
        known[k][k] = known[k - 1][k - 1] + bounds[k] - bounds[k - 1]
        for n in range(k, intervals):
            known[k][n + 1] = max(known[k][n] + 1, known[k - 1][n] + bounds[n + 1] - bounds[n])
    return known[iterations][intervals] + 1


@dataclass
class _Solve:
    """A running solve from boundary n of iteration k: the fine one (its state and history as it goes), or the
    coarse step alone (the last iteration needs no fine solves)."""

    k: int
    n: int
    state: Tensor
    step: int
    history: tuple[Tensor, ...] = ()
    coarse_only: bool = False
    done: bool = field(default=False)


class SRDS(ParallelSolver):
    @dataclass(frozen=True)
    class Options(SolverOptions):
        base: str = "ddim"
        base_options: dict | None = None
        coarse_steps: int | None = option(None, check=lambda steps: steps >= 1,
                                          must="be >= 1 (None: about the square root of the base's steps)")
        tolerance: float | None = option(None, check=lambda tolerance: tolerance >= 0,
                                         must="be >= 0 (None: 0.1 for a stochastic base, 1e-3 for an ODE base)")
        max_iterations: int | None = option(None, check=lambda iterations: iterations >= 1,
                                            must="be >= 1 (None: coarse_steps, after which it is exact)")

    def __init__(self, **options) -> None:
        super().__init__(**options)
        check_tensor_state(self.base, f"SRDS (base={self.config.base!r})")

    def schedule(self, steps: int) -> tuple[list[int], int]:
        """(the boundaries, the iterations at most) for a plan of ``steps`` steps."""
        transitions = steps - 1
        intervals = max(1, min(self.config.coarse_steps or round(math.sqrt(transitions)), transitions))
        return boundaries(transitions, intervals), min(self.config.max_iterations or intervals, intervals)

    def bounds(self, steps: int) -> tuple[int, int]:
        if steps == 1:
            return 1, 1
        bounds, iterations = self.schedule(steps)
        intervals, transitions = len(bounds) - 1, steps - 1
        evals = sum(transitions - bounds[k] for k in range(iterations)) + intervals - iterations + 1
        return evals, pipeline_rounds(bounds, iterations)

    def sample(self, denoise: Denoise, x: Tensor, sigmas: Tensor, plan: Plan, noise: Noise | None = None) -> Tensor:
        base, steps = self.base, plan.steps
        sigma = sigmas.tolist()
        sigma_device = sigmas.to(device=x.device, dtype=x.dtype)
        if steps == 1:
            return evaluate(denoise, [x], sigma_device[:1])[0]
        noises = self.step_noises(steps - 1, noise)
        bounds, iterations = self.schedule(steps)
        thresholds = self.thresholds([sigma[bound] for bound in bounds] + [0.0], x.device)  # of boundaries 1 .. M

        boundary: dict[tuple[int, int], Tensor] = {(0, 0): x}  # U^k_n
        coarse: dict[tuple[int, int], Tensor] = {}  # G(U^k_n)
        fine: dict[tuple[int, int], tuple[Tensor, tuple[Tensor, ...]]] = {}  # F(U^k_n), with its last estimates
        solves = [_Solve(0, 0, x, 0)]
        while True:
            points = [solve.state for solve in solves]
            denoised = evaluate(denoise, points, torch.stack([sigma_device[solve.step] for solve in solves]))
            for solve, denoised_i in zip(solves, denoised):
                self.advance(solve, denoised_i, sigma, sigmas, plan, noises, bounds, coarse, fine)
            solves = [solve for solve in solves if not solve.done]
            final = self.correct(boundary, coarse, fine, solves, bounds, iterations, thresholds)
            if final is not None:  # the step to sigma = 0
                return evaluate(denoise, [final], sigma_device[steps - 1:steps])[0]

    def advance(self, solve: _Solve, denoised: Tensor, sigma: list[float], sigmas: Tensor, plan: Plan,
                noises: list[Tensor | None], bounds: list[int], coarse: dict, fine: dict) -> None:
        """A solve after its model call: the coarse step from its boundary (with its first call), its next fine
        step, and its result at the end of its interval."""
        base, i, x = self.base, solve.step, solve.state
        start, end = bounds[solve.n], bounds[solve.n + 1]
        if i == start:
            coarse[solve.k, solve.n] = torch.lerp(denoised, x, sigma[end] / sigma[start])  # DDIM, start to end
            if solve.coarse_only:
                solve.done = True
                return
        solve.history = (*solve.history, base.estimate(x, denoised, sigma[i]))[-base.history:]
        orders = plan.orders
        if orders and orders[i] > len(solve.history):  # iteration 0 warms up again at each boundary
            orders = (*orders[:i], len(solve.history), *orders[i + 1:])
        solve.state = base.step(i, x, solve.history, sigmas, orders, noises[i])
        solve.step += 1
        if solve.step == end:
            fine[solve.k, solve.n] = solve.state, solve.history
            solve.done = True

    def correct(self, boundary: dict, coarse: dict, fine: dict, solves: list[_Solve], bounds: list[int],
                iterations: int, thresholds: Tensor) -> Tensor | None:
        """Every boundary state whose inputs are known, each starting its solve; the state at the last boundary
        once an iteration has converged or is the last (None while the iteration goes on)."""
        intervals = len(bounds) - 1
        for k in range(iterations + 1):
            while True:
                n = max((n for kk, n in boundary if kk == k), default=None)
                if n is None:  # U^k_k = F(U^(k-1)_(k-1)): exact
                    if (k - 1, k - 1) not in fine:
                        break
                    n, state = k, fine[k - 1, k - 1][0]
                elif n == intervals:
                    break
                elif k == 0 and (0, n) in coarse:
                    n, state = n + 1, coarse[0, n]
                elif k > 0 and (k, n) in coarse and (k - 1, n) in fine:
                    n, state = n + 1, coarse[k, n] + fine[k - 1, n][0] - coarse[k - 1, n]
                else:
                    break
                boundary[k, n] = state
                if n < intervals:
                    history = fine[k - 1, n - 1][1] if k > 0 else ()
                    solves.append(_Solve(k, n, state, bounds[n], history, coarse_only=k == iterations))
                    continue
                if k == iterations or (k > 0 and self.converged(boundary, k, bounds, thresholds)):
                    return state
        return None

    @staticmethod
    def converged(boundary: dict, k: int, bounds: list[int], thresholds: Tensor) -> bool:
        """Whether iteration k moved no boundary state k .. M by more than its tolerance (one host sync);
        ``thresholds`` are those of boundaries 1 .. M."""
        changes = torch.stack([squared_change(boundary[k, n], boundary[k - 1, n]).amax()
                               for n in range(k, len(bounds))])
        return bool((changes <= thresholds[k - 1:]).all())


@hookimpl
def register_solvers(register):
    register(SRDS, name="srds")
