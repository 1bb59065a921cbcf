"""Schedules on a model's own training timesteps: `discrete`, picked as diffusers' schedulers pick them, and
ComfyUI's `simple`, `ddim-uniform`, `normal`, `sgm-uniform` and `beta` (see the comment above simple()).

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

import math

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


def _training_grid(model, schedule: str) -> Tensor:
    """The model's sigmas_discrete, float64 on the CPU, or a BenchError naming the schedules that need none."""
    sigmas_discrete = getattr(model, "sigmas_discrete", None)
    if sigmas_discrete is None:
        from bench.registry import manager

        others = [name for name in manager().names("schedule") if name not in NEEDS_GRID]
        raise BenchError(f"schedule {schedule!r} needs a model with a discrete training grid (sigmas_discrete), and "
                         f"model {getattr(model, 'name', type(model).__name__)!r} has none; use one of the other "
                         f"schedules: {', '.join(others)}")
    return torch.as_tensor(sigmas_discrete, dtype=torch.float64).cpu()


def _at(sigmas_discrete: Tensor, timesteps: np.ndarray) -> Tensor:
    sigmas = sigmas_discrete[torch.from_numpy(np.ascontiguousarray(timesteps, dtype=np.int64))]
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def discrete(steps: int, model, spacing: str = "linspace", steps_offset: int = 0, convention: str = "ddim") -> Tensor:
    """sigmas_discrete at diffusers' timesteps for ``steps`` steps (descending), then 0: float64 on the CPU."""
    sigmas_discrete = _training_grid(model, "discrete")
    return _at(sigmas_discrete, discrete_timesteps(steps, len(sigmas_discrete), spacing, steps_offset, convention))


# ComfyUI's schedules on the training grid (comfy/samplers.py), with T training timesteps and N steps:
#
#     simple        t_i = T - 1 - floor(i (T / N)): every (T / N)-th timestep down from T - 1 (T / N in floating
#                   point, as ComfyUI: T = 1000, N = 38, i = 19 gives 499.99999999999994, so t = 500, not 499)
#     ddim_uniform  t_i = 1 + i (T // N), descending: DDIM's "uniform" skip (diffusers' leading spacing with
#                   steps_offset = 1)
#     normal        N times uniform in [T - 1, 0] (fractional), at the sigma log-linear between grid points
#     sgm_uniform   the same with N + 1 times, the last (t = 0) dropped: it stops short of sigma_min
#     beta          t_i = round((T - 1) F^-1(1 - i / N)), F the Beta(alpha, beta) CDF (Lee et al. 2024): for
#                   alpha = beta < 1, dense at both ends


def simple(steps: int, model) -> Tensor:
    """ComfyUI's simple: the training timesteps T - 1 - floor(i (T / N)), i = 0 .. N - 1, then sigma = 0."""
    sigmas_discrete = _training_grid(model, "simple")
    T = len(sigmas_discrete)
    if not 1 <= steps <= T:
        raise BenchError(f"the simple schedule takes 1 to {T} steps (the model's training timesteps); got {steps}")
    return _at(sigmas_discrete, T - 1 - np.floor(np.arange(steps) * (T / steps)).astype(np.int64))


def ddim_uniform(steps: int, model) -> Tensor:
    """ComfyUI's ddim_uniform: timesteps 1, 1 + T // N, 1 + 2 (T // N), ..., descending. ComfyUI (and LDM's
    make_ddim_timesteps) keep every such timestep below T, one more than N when N (T // N) + 1 < T (N = 7:
    1 .. 853 and 995); this schedule keeps the N asked for, the lowest, as diffusers' leading spacing does."""
    sigmas_discrete = _training_grid(model, "ddim-uniform")
    return _at(sigmas_discrete, discrete_timesteps(steps, len(sigmas_discrete), "leading", steps_offset=1))


def sigma_at_timestep(timesteps: Tensor, sigmas_discrete: Tensor) -> Tensor:
    """The sigma of fractional timesteps: log-linear between grid points (the inverse of the diffusers adapter's
    sigma_to_timestep; ComfyUI's ModelSamplingDiscrete.sigma)."""
    timesteps = timesteps.clamp(0, len(sigmas_discrete) - 1)
    low, high = timesteps.floor().long(), timesteps.ceil().long()
    weight = timesteps - low
    log_sigmas = sigmas_discrete.log()
    return ((1 - weight) * log_sigmas[low] + weight * log_sigmas[high]).exp()


def _uniform_in_timestep(steps: int, model, points: int) -> Tensor:
    """The first ``steps`` of ``points`` times uniform from the top of the model's clock to its bottom. With a
    training grid the clock is the timestep; without one it is EDM's c_noise = log(sigma) / 4 (ComfyUI's clock of
    continuous EDM models), where uniform in time is uniform in log sigma."""
    sigmas_discrete = getattr(model, "sigmas_discrete", None)
    if sigmas_discrete is None:
        log_sigmas = torch.linspace(math.log(model.sigma_max), math.log(model.sigma_min), points, dtype=torch.float64)
        sigmas = log_sigmas[:steps].exp()
    else:
        sigmas_discrete = torch.as_tensor(sigmas_discrete, dtype=torch.float64).cpu()
        timesteps = torch.linspace(len(sigmas_discrete) - 1, 0, points, dtype=torch.float64)[:steps]
        sigmas = sigma_at_timestep(timesteps, sigmas_discrete)
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def normal(steps: int, model) -> Tensor:
    """ComfyUI's normal: N times uniform from the model's first timestep to its last (sigma_max to sigma_min);
    without a training grid, uniform in log sigma (see _uniform_in_timestep)."""
    return _uniform_in_timestep(steps, model, steps)


def sgm_uniform(steps: int, model) -> Tensor:
    """ComfyUI's sgm_uniform (Stability's generative-models): N + 1 times uniform from the first timestep to the
    last, the last dropped, so the grid stops one interval short of sigma_min; without a training grid, in log
    sigma."""
    return _uniform_in_timestep(steps, model, steps + 1)


def beta(steps: int, model, alpha: float = 0.6, beta: float = 0.6) -> Tensor:
    """ComfyUI's beta schedule (Lee et al. 2024, "Improved noise schedule..."; arXiv 2407.12173): timesteps at the
    Beta(alpha, beta) quantiles 1 - i / N, rounded to the training grid. Where two steps round to one timestep
    ComfyUI drops the repeat and runs fewer steps; here that is an error, as a grid has one point per step."""
    import scipy.stats

    if not (alpha > 0 and beta > 0):
        raise ValueError(f"the beta schedule needs alpha > 0 and beta > 0; got alpha={alpha!r}, beta={beta!r}")
    sigmas_discrete = _training_grid(model, "beta")
    T = len(sigmas_discrete)
    quantiles = 1 - np.linspace(0, 1, steps, endpoint=False)
    timesteps = np.rint(scipy.stats.beta.ppf(quantiles, alpha, beta) * (T - 1)).astype(np.int64)
    repeats = np.flatnonzero(np.diff(timesteps) == 0)
    if repeats.size:
        i = int(repeats[0])
        raise BenchError(f"the beta schedule (alpha={alpha}, beta={beta}) puts steps {i} and {i + 1} of {steps} on "
                         f"the same training timestep {int(timesteps[i])}: ask for fewer steps (ComfyUI would drop "
                         "the repeat and run fewer steps than asked)")
    return _at(sigmas_discrete, timesteps)


NEEDS_GRID = ("discrete", "simple", "ddim-uniform", "beta")


@hookimpl
def register_schedules(register):
    register(discrete, name="discrete")
    register(simple, name="simple")
    register(ddim_uniform, name="ddim-uniform", aliases=("ddim_uniform",))
    register(normal, name="normal")
    register(sgm_uniform, name="sgm-uniform", aliases=("sgm_uniform",))
    register(beta, name="beta")
