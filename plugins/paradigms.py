"""ParaDiGMS (Shih, Belkhale, Ermon, Sadigh and Anari 2023): Picard iteration over a sliding window of steps.

The sequential loop computes x_(i+1) = step_i(x_i) one step after another. Written as a sum of increments,

    x_(i+1) = x_start + sum_(start <= j <= i) (step_j(x_j) - x_j),

it holds for every i of a window at once, and Picard iteration turns it into an update of all the window's states
from the guesses of the previous round: one batched call evaluates the denoiser at the window's w points, the base's
step rule gives each step's increment, and their cumulative sum gives w new states. A state is exact one round
after the states before it are, so w rounds reproduce the sequential loop; the iteration stops much earlier when
the guesses stop changing. The window slides past the first step whose new state has not converged (its change
per dimension, for the worst sample, above tolerance^2 times the step's noise variance; bench.core.parallel): the
states before it are kept, it starts the next window, and the states beyond the window are guessed to be the last
new one.

A multistep base reads the estimates of its last steps: those of the window come from the round's one call, those
before it from the round that evaluated them last. A stochastic base's noise is drawn once for every step, up front,
so the sampler converges to the base's own samples from the same noise.

Rounds and work: at most ``max_rounds`` calls (default: the base's steps, which is what the sequential loop makes),
the last of them the step to sigma = 0, D at the last state; round r evaluates at most min(window, steps - r)
points of each sample.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from bench.core.options import SolverOptions, option
from bench.core.parallel import (ParallelSolver, cumulative, evaluate, fieldwise, leading_converged,
                                 squared_change)
from bench.core.solver import Denoise, Noise, Plan
from bench.hookspecs import hookimpl


class ParaDiGMS(ParallelSolver):
    @dataclass(frozen=True)
    class Options(SolverOptions):
        base: str = "ddim"
        base_options: dict | None = None
        window: int = option(16, check=lambda window: window >= 1, must="be >= 1")
        tolerance: float | None = option(None, check=lambda tolerance: tolerance >= 0,
                                         must="be >= 0 (None: 0.1 for a stochastic base, 1e-3 for an ODE base)")
        max_rounds: int | None = option(None, check=lambda rounds: rounds >= 1,
                                        must="be >= 1 (None: as many as the base's steps)")

    def bounds(self, steps: int) -> tuple[int, int]:
        rounds = min(self.config.max_rounds or steps, steps)
        return sum(min(self.config.window, steps - r) for r in range(rounds)), rounds

    def sample(self, denoise: Denoise, x: Tensor, sigmas: Tensor, plan: Plan, noise: Noise | None = None) -> Tensor:
        base, steps, window = self.base, plan.steps, self.config.window
        sigma = sigmas.tolist()
        sigma_device = sigmas.to(device=x.device, dtype=x.dtype)  # the grid on the device: slices need no copies
        noises = self.step_noises(steps - 1, noise)
        thresholds = self.thresholds(sigma, x.device)  # of the state each step produces
        _, max_rounds = self.bounds(steps)

        states = [base.initial_state(x)] * steps  # guesses of the state at each point; the first is x_T
        estimates: list[Tensor | None] = [None] * steps
        start, rounds = 0, 0  # the window's first state, which is exact
        while True:
            if rounds == max_rounds - 1:  # the last call allowed: the step to sigma = 0 from the current guess
                return evaluate(denoise, [base.point(states[-1])], sigma_device[-2:-1])[0]
            end = min(start + window, steps)  # the window's points: start .. end - 1
            denoised = evaluate(denoise, [base.point(state) for state in states[start:end]], sigma_device[start:end])
            rounds += 1
            for i, denoised_i in zip(range(start, end), denoised):
                estimates[i] = base.estimate(base.point(states[i]), denoised_i, sigma[i])
            last = min(end, steps - 1)  # the steps start .. last - 1 give the states start + 1 .. last
            if last == start:  # the window is the last point alone: x0 = D there, from its exact state
                return denoised[-1]
            increments = []  # step_i(x_i) - x_i for each step of the window, from the guesses and this round's D
            for i in range(start, last):
                history = tuple(estimates[max(0, i + 1 - base.history):i + 1])
                state_next = base.step(i, states[i], history, sigmas, plan.orders, noises[i])
                increments.append(fieldwise(Tensor.sub, state_next, states[i]))
            new = cumulative(states[start], increments)  # x_(i+1) = x_start + sum of the increments up to i
            changes = [squared_change(base.point(state), base.point(old))
                       for state, old in zip(new, states[start + 1:last + 1])]
            converged = leading_converged(changes, thresholds[start:last])
            states[start + 1:last + 1] = new
            states[last + 1:] = [new[-1]] * (steps - 1 - last)
            if converged == len(new) and end == steps:  # every state has converged, and D at the last is known
                return denoised[-1]
            start = min(start + converged + 1, last)  # the first unconverged state came from converged ones


@hookimpl
def register_solvers(register):
    register(ParaDiGMS, name="paradigms")
