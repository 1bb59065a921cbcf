"""Sigma schedules: (steps, model) -> a decreasing float64 grid of steps + 1 sigmas whose last entry is 0.

The continuous schedules span the model's [sigma_min, sigma_max], so that every solver starts from the same x_T and
ends at the same point, D(x(sigma_min); sigma_min); where a schedule is defined otherwise (linear-quadratic stops
short of sigma_min, flow with a shift > 1 too; an AYS table or a user's list has its own ends) its docstring says
so. The schedules picked from a model's training timesteps (``discrete``, ComfyUI's simple, ddim_uniform, beta,
and normal and sgm_uniform, which fall back to log sigma without one) live in plugins/discrete.py.

    karras            uniform in sigma^(1/rho) (Karras et al. 2022); ``sigma_min`` moves its low end
    logsnr            uniform in log sigma: DPM-Solver's logSNR, k-diffusion's and ComfyUI's ``exponential``
    polyexponential   log sigma a power ``rho`` of a uniform ramp (k-diffusion)
    time-uniform      uniform in VP time t; time-quadratic: uniform in sqrt(t)
    kl-optimal        uniform in arctan(sigma) (Sabour et al. 2024)
    linear-quadratic  Mochi's: linear then quadratic in sigma / sigma_max (ComfyUI's linear_quadratic)
    flow              uniform in flow-matching time t = sigma / (1 + sigma), then shifted (SD3, diffusers'
                      FlowMatchEulerDiscreteScheduler)
    ays-table         Align Your Steps' published tables (Sabour et al. 2024), by model ``family``
    sigmas            a list given by the user, one sigma per step
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from bench.adapters.flow_matching import flow_time, shift_time, sigma_of_flow_time
from bench.core.numerics import BETA_MAX, BETA_MIN, vp_sigma, vp_time
from bench.hookspecs import hookimpl

# Tolerance of range checks: a sigma given with a few digits (an AYS table, a user's list) may overshoot the
# model's end by its rounding, 14.615 for Stable Diffusion's 14.6146.
RANGE_RTOL = 1e-3


def _append_zero(sigmas: Tensor) -> Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def _model_name(model) -> str:
    return repr(getattr(model, "name", type(model).__name__))


def karras(steps: int, model, rho: float = 7.0, sigma_min: float | None = None) -> Tensor:
    """Karras et al. (2022), eq. 5: uniform in sigma^(1/rho), from sigma_max to ``sigma_min`` (the model's unless
    given: diffusers' use_karras_sigmas with trailing spacing ends at the last trailing timestep's sigma)."""
    sigma_min = model.sigma_min if sigma_min is None else float(sigma_min)
    if not 0 < sigma_min < model.sigma_max:
        raise ValueError(f"karras needs 0 < sigma_min < the model's sigma_max = {model.sigma_max:.6g}; "
                         f"got sigma_min={sigma_min!r}")
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    max_inv_rho, min_inv_rho = model.sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return _append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def logsnr(steps: int, model) -> Tensor:
    """Uniform in log sigma, i.e. in half-log-SNR lambda = -log sigma (DPM-Solver's 'logSNR'; k-diffusion's
    get_sigmas_exponential)."""
    log_sigmas = torch.linspace(math.log(model.sigma_max), math.log(model.sigma_min), steps, dtype=torch.float64)
    return _append_zero(log_sigmas.exp())


def polyexponential(steps: int, model, rho: float = 1.0) -> Tensor:
    """k-diffusion's get_sigmas_polyexponential: log sigma = log sigma_min + ramp^rho (log sigma_max - log sigma_min),
    ramp from 1 to 0. rho = 1 is logsnr; rho > 1 puts more steps at low noise."""
    if not rho > 0:
        raise ValueError(f"polyexponential needs rho > 0; got rho={rho!r}")
    ramp = torch.linspace(1, 0, steps, dtype=torch.float64) ** rho
    log_min, log_max = math.log(model.sigma_min), math.log(model.sigma_max)
    return _append_zero((ramp * (log_max - log_min) + log_min).exp())


def _vp_time_grid(steps: int, model, power: float, beta_min: float, beta_max: float) -> Tensor:
    if not 0 <= beta_min < beta_max:
        raise ValueError(f"a VP schedule needs 0 <= beta_min < beta_max; got beta_min={beta_min!r}, "
                         f"beta_max={beta_max!r}")
    t_max = vp_time(model.sigma_max, beta_min, beta_max)
    t_min = vp_time(model.sigma_min, beta_min, beta_max)
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    t = (t_max ** (1 / power) + ramp * (t_min ** (1 / power) - t_max ** (1 / power))) ** power
    sigmas = vp_sigma(t, beta_min, beta_max)
    # pin the ends: the round trip through t must not move the common endpoint
    sigmas[-1] = model.sigma_min
    sigmas[0] = model.sigma_max
    return _append_zero(sigmas)


def time_uniform(steps: int, model, beta_min: float = BETA_MIN, beta_max: float = BETA_MAX) -> Tensor:
    """Uniform in VP time t (DDIM's and DPM-Solver's 'time_uniform')."""
    return _vp_time_grid(steps, model, 1.0, beta_min, beta_max)


def time_quadratic(steps: int, model, beta_min: float = BETA_MIN, beta_max: float = BETA_MAX) -> Tensor:
    """Uniform in sqrt(t) (DDIM's and DPM-Solver's 'time_quadratic'): denser near the data."""
    return _vp_time_grid(steps, model, 2.0, beta_min, beta_max)


def kl_optimal(steps: int, model) -> Tensor:
    """Uniform in arctan(sigma) from sigma_max to sigma_min: the schedule that Align Your Steps (Sabour et al. 2024)
    derives as KL-optimal when the data are a standard Gaussian; ComfyUI's kl_optimal (from A1111's PR 15608)."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    angles = (1 - ramp) * math.atan(model.sigma_max) + ramp * math.atan(model.sigma_min)
    return _append_zero(angles.tan())


def linear_quadratic(steps: int, model, threshold_noise: float = 0.025, linear_steps: int | None = None) -> Tensor:
    """Mochi's schedule (Genmo 2024; ComfyUI's linear_quadratic), as a fraction of sigma_max.

    With N steps and L = ``linear_steps`` (N // 2 unless given), the noise fraction s_i = 1 - sigma_i / sigma_max
    rises linearly from 0 to ``threshold_noise`` over the first L steps, then along the quadratic through
    (L, threshold_noise) with the same slope there that reaches 1 at i = N: sigma_N = 0. Mochi defines it on
    flow-matching time; ComfyUI applies it to any model as sigma_max * (1 - s_i), and so does this schedule (in
    VE sigma). It does not end at sigma_min: its last nonzero sigma is sigma_max * (1 - s_(N-1)).
    """
    if steps == 1:
        return torch.tensor([model.sigma_max, 0.0], dtype=torch.float64)
    linear_steps = steps // 2 if linear_steps is None else int(linear_steps)
    if not 1 <= linear_steps < steps:
        raise ValueError(f"linear-quadratic needs 1 <= linear_steps < steps = {steps}; got {linear_steps}")
    if not 0 < threshold_noise < 1:
        raise ValueError(f"linear-quadratic needs 0 < threshold_noise < 1; got {threshold_noise!r}")
    quadratic_steps = steps - linear_steps
    i = torch.arange(steps + 1, dtype=torch.float64)
    linear = i * threshold_noise / linear_steps
    # s(i) = a i^2 + b i + c on [L, N] with s(L) = threshold, s'(L) = threshold / L, s(N) = 1
    excess = linear_steps - threshold_noise * steps
    a = excess / (linear_steps * quadratic_steps**2)
    b = threshold_noise / linear_steps - 2 * excess / quadratic_steps**2
    c = a * linear_steps**2
    quadratic = a * i**2 + b * i + c
    noise_fraction = torch.where(i < linear_steps, linear, quadratic)
    noise_fraction[-1] = 1.0
    return model.sigma_max * (1 - noise_fraction)


def flow(steps: int, model, shift: float | None = None) -> Tensor:
    """Flow-matching time t = sigma / (1 + sigma) at u shifted, t = shift u / (1 + (shift - 1) u) (Esser et al.
    2024, SD3), for u uniform from the u whose shift is the model's t_max down to its t_min: diffusers'
    FlowMatchEulerDiscreteScheduler, whose t_max = 1 is its own shift.

    ``shift``: the model's own (``flow_shift``, set by bench.adapters.flow_matching from its scheduler) unless
    given; 1 otherwise. A shift > 1 spends more steps at high noise and, as in diffusers, ends above sigma_min (at
    the shift of t_min). t = 1 (pure noise) is the model's sigma_max.
    """
    if shift is None:
        shift = float(getattr(model, "flow_shift", 1.0))
    if not shift > 0:
        raise ValueError(f"flow needs shift > 0; got shift={shift!r}")
    # a flow-matching model (bench.adapters.flow_matching) knows its t range exactly; t_max = 1 has no finite sigma
    t_max = getattr(model, "t_max", None) or flow_time(model.sigma_max)
    t_min = getattr(model, "t_min", None) or flow_time(model.sigma_min)
    u_max = t_max / (shift - (shift - 1) * t_max)  # the inverse shift: u_max = 1 when t_max = 1
    t = shift_time(np.linspace(u_max, t_min, steps), shift)
    sigmas = torch.as_tensor(sigma_of_flow_time(t, model.sigma_max), dtype=torch.float64)
    sigmas[0] = model.sigma_max  # t_max, up to the rounding of the round trip
    return _append_zero(sigmas)


def _check_in_range(sigmas: Sequence[float], model, what: str) -> None:
    high, low = max(sigmas), min(sigmas)
    if high > model.sigma_max * (1 + RANGE_RTOL) or low < model.sigma_min * (1 - RANGE_RTOL):
        raise ValueError(f"{what} spans [{low:.6g}, {high:.6g}], outside model {_model_name(model)}'s range "
                         f"[{model.sigma_min:.6g}, {model.sigma_max:.6g}]")


def user_sigmas(steps: int, model, sigmas: Sequence[float] | None = None) -> Tensor:
    """The user's own grid: ``sigmas``, one per step (strictly decreasing, positive, finite, within the model's
    range), then 0."""
    if sigmas is None:
        raise ValueError("schedule 'sigmas' needs its list: sigmas = [s_0, s_1, ...], one sigma per step, "
                         "decreasing, 0 excluded")
    if isinstance(sigmas, (str, bytes)) or not isinstance(sigmas, Sequence):
        raise ValueError(f"sigmas must be a list of numbers; got {sigmas!r}")
    values = [float(sigma) for sigma in sigmas]
    if len(values) != steps:
        raise ValueError(f"{len(values)} sigmas given for {steps} steps: the list holds one sigma per step (its "
                         "last step goes to 0, which is not in the list); a suite sweeping NFE budgets needs one "
                         "list per step count")
    bad = [sigma for sigma in values if not (math.isfinite(sigma) and sigma > 0)]
    if bad:
        raise ValueError(f"sigmas must be positive and finite; got {bad[0]!r} in {values}")
    for i in range(steps - 1):
        if not values[i + 1] < values[i]:
            raise ValueError(f"sigmas must decrease strictly; got sigmas[{i}] = {values[i]!r} then "
                             f"sigmas[{i + 1}] = {values[i + 1]!r}")
    _check_in_range(values, model, f"the list of sigmas {values}")
    return _append_zero(torch.tensor(values, dtype=torch.float64))


# Align Your Steps (Sabour, Fidler and Kreis 2024), the 10-step schedules the authors published for the models they
# optimised them on: https://research.nvidia.com/labs/toronto-ai/AlignYourSteps/howto.html (11 sigmas each: the
# tenth step ends at the model's sigma_min, which sampling replaces with 0, as diffusers' AysSchedules and ComfyUI's
# AlignYourStepsScheduler do).
AYS_SIGMAS: dict[str, tuple[float, ...]] = {
    "sd1.5": (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029),
    "sdxl": (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029),
    "svd": (700.00, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403, 0.173, 0.034, 0.002),
}


def loglinear_interp(sigmas: Sequence[float], points: int) -> np.ndarray:
    """``points`` sigmas from a decreasing table, linear in log sigma against a uniform ramp over each: the AYS
    authors' way to other step counts (their loglinear_interp)."""
    ramp_table, ramp = np.linspace(0, 1, len(sigmas)), np.linspace(0, 1, points)
    log_sigmas = np.log(np.asarray(sigmas, dtype=np.float64)[::-1])  # np.interp needs increasing x and y by x
    return np.exp(np.interp(ramp, ramp_table, log_sigmas))[::-1].copy()


def ays(steps: int, model, family: str | None = None) -> Tensor:
    """Align Your Steps' published schedule for ``family`` ("sd1.5", "sdxl", "svd"): its table at 10 steps, and at
    other counts the table interpolated log-linearly to steps + 1 points; the last, the family's sigma_min, becomes
    0. The table must lie within the model's range: it was optimised for that family's noise levels."""
    if family not in AYS_SIGMAS:
        raise ValueError(f"schedule 'ays-table' needs family = one of {', '.join(map(repr, AYS_SIGMAS))} (the models its "
                         f"tables were published for); got {family!r}")
    table = AYS_SIGMAS[family]
    _check_in_range(table, model, f"the AYS table for {family!r}")
    sigmas = np.asarray(table, dtype=np.float64) if steps + 1 == len(table) else loglinear_interp(table, steps + 1)
    sigmas[-1] = 0.0
    return torch.from_numpy(sigmas)


@hookimpl
def register_schedules(register):
    register(karras, name="karras")
    register(logsnr, name="logsnr", aliases=("log-snr", "exponential"))
    register(polyexponential, name="polyexponential")
    register(time_uniform, name="time-uniform")
    register(time_quadratic, name="time-quadratic")
    register(kl_optimal, name="kl-optimal", aliases=("kl_optimal",))
    register(linear_quadratic, name="linear-quadratic", aliases=("linear_quadratic",))
    register(flow, name="flow")
    register(ays, name="ays-table", aliases=("align-your-steps",))  # `ays` is the fitted one (learned)
    register(user_sigmas, name="sigmas")
