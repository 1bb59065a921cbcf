"""Sigma schedules: (steps, model) -> a decreasing float64 grid of steps + 1 sigmas whose last entry is 0.

Every schedule spans the model's [sigma_min, sigma_max], so that every solver starts from the same x_T and ends
at the same point, D(x(sigma_min); sigma_min).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from bench.core.numerics import BETA_MAX, BETA_MIN, vp_sigma, vp_time
from bench.hookspecs import hookimpl


def _append_zero(sigmas: Tensor) -> Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def karras(steps: int, model, rho: float = 7.0) -> Tensor:
    """Karras et al. (2022), eq. 5: uniform in sigma^(1/rho)."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    max_inv_rho, min_inv_rho = model.sigma_max ** (1 / rho), model.sigma_min ** (1 / rho)
    return _append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def logsnr(steps: int, model) -> Tensor:
    """Uniform in log sigma, i.e. in half-log-SNR lambda = -log sigma (DPM-Solver's 'logSNR')."""
    log_sigmas = torch.linspace(math.log(model.sigma_max), math.log(model.sigma_min), steps, dtype=torch.float64)
    return _append_zero(log_sigmas.exp())


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


@hookimpl
def register_schedules(register):
    register(karras, name="karras")
    register(logsnr, name="logsnr", aliases=("log-snr",))
    register(time_uniform, name="time-uniform")
    register(time_quadratic, name="time-quadratic")
