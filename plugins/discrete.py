"""The `discrete` schedule: a model's own training timesteps, picked as diffusers' schedulers pick them.

A model with a discrete training grid (``sigmas_discrete``: sigma of timestep t = 0 .. T-1, increasing) is sampled
on a subset of its training timesteps; the grid is their sigmas, descending, then 0. Which subset is the
``spacing`` (Lin et al. 2023, "Common diffusion noise schedules and sample steps are flawed", table 2), with N steps:

    linspace   round(linspace(0, T - 1, N)): from T - 1 down to 0; the only spacing that spans [sigma_min, sigma_max]
    leading    arange(N) * (T // N) + steps_offset: starts below T - 1 (e.g. t = 900 for N = 10, T = 1000)
    trailing   round(arange(T, 0, -T / N)) - 1: starts at T - 1, stops at T / N - 1 (e.g. t = 99)

reproduced exactly, integer for integer, from diffusers' set_timesteps (in numpy, as diffusers computes them, so
that rounding ties fall the same way). diffusers' schedulers come in two conventions, chosen by ``convention``:

    "ddim"        N timesteps as above: DDPMScheduler, DDIMScheduler, PNDMScheduler, EulerDiscreteScheduler and
                  HeunDiscreteScheduler (Euler and Heun keep linspace's fractional timesteps unrounded; we round
                  them, as this schedule is made of training timesteps: they agree whenever (T - 1) / (N - 1) is an
                  integer, e.g. N = 2, 4, 10, 28)
    "multistep"   the multistep solvers' N + 1-point grids without their last point: DPMSolverMultistepScheduler,
                  DEISMultistepScheduler and UniPCMultistepScheduler (linspace: round(linspace(0, T - 1, N + 1))
                  minus t = 0; leading: step T // (N + 1); trailing as above)

Either way the step after the last timestep goes to sigma = 0 (diffusers' final_sigmas_type="zero", and DDIM's
set_alpha_to_one=True), where every solver lands on D(x; sigma_last).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from bench.errors import BenchError
from bench.hookspecs import hookimpl

SPACINGS = ("linspace", "leading", "trailing")
CONVENTIONS = ("ddim", "multistep")


def discrete_timesteps(steps: int, num_train_timesteps: int, spacing: str = "linspace", steps_offset: int = 0,
                       convention: str = "ddim") -> np.ndarray:
    """The ``steps`` training timesteps diffusers samples on, descending (int64), as in its set_timesteps."""
    if spacing not in SPACINGS:
        raise BenchError(f"unknown spacing {spacing!r} for the discrete schedule (known: {', '.join(SPACINGS)})")
    if convention not in CONVENTIONS:
        raise BenchError(f"unknown convention {convention!r} for the discrete schedule "
                         f"(known: {', '.join(CONVENTIONS)})")
    if steps_offset and spacing != "leading":
        raise BenchError(f"steps_offset={steps_offset} applies to spacing='leading' only (diffusers ignores it for "
                         f"{spacing!r}); drop it or use spacing='leading'")
    if not 1 <= steps <= num_train_timesteps:
        raise BenchError(f"the discrete schedule takes 1 to {num_train_timesteps} steps (the model's training "
                         f"timesteps); got {steps}")
    T = num_train_timesteps
    # the multistep schedulers lay out N + 1 points and drop the last one (t = 0), which sigma = 0 replaces
    points = steps + 1 if convention == "multistep" else steps
    if spacing == "linspace":
        timesteps = np.linspace(0, T - 1, points).round()[::-1][:steps]
    elif spacing == "leading":
        step_ratio = T // points
        timesteps = (np.arange(0, points) * step_ratio).round()[::-1][:steps] + steps_offset
    else:  # trailing: the same in both conventions
        # diffusers takes the whole float arange, which for some N overshoots by one element (N = 61, T = 1000:
        # 62 timesteps, the last -1). The first N are the intended ones, and exactly diffusers' values.
        timesteps = np.round(np.arange(T, 0, -T / steps))[:steps] - 1
    timesteps = timesteps.astype(np.int64)
    if timesteps.min() < 0 or timesteps.max() > T - 1:
        raise BenchError(f"steps_offset={steps_offset} puts the timesteps {timesteps.tolist()} outside the training "
                         f"range 0..{T - 1}")
    return timesteps


def discrete(steps: int, model, spacing: str = "linspace", steps_offset: int = 0, convention: str = "ddim") -> Tensor:
    """sigmas_discrete at diffusers' timesteps for ``steps`` steps (descending), then 0: float64 on the CPU."""
    sigmas_discrete = getattr(model, "sigmas_discrete", None)
    if sigmas_discrete is None:
        from bench.registry import manager

        others = [name for name in manager().names("schedule") if name != "discrete"]
        raise BenchError(f"schedule 'discrete' needs a model with a discrete training grid (sigmas_discrete), and "
                         f"model {getattr(model, 'name', type(model).__name__)!r} has none; use one of the other "
                         f"schedules: {', '.join(others)}")
    sigmas_discrete = torch.as_tensor(sigmas_discrete, dtype=torch.float64).cpu()
    timesteps = discrete_timesteps(steps, len(sigmas_discrete), spacing, steps_offset, convention)
    sigmas = sigmas_discrete[torch.from_numpy(timesteps)]
    return torch.cat([sigmas, sigmas.new_zeros(1)])


@hookimpl
def register_schedules(register):
    register(discrete, name="discrete")
