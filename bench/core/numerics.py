"""Numerics the solvers share: the fused linear combination of their updates, the phi functions of the exponential
integrators, Heun's step, and VP time.

In the sigma parametrization (alpha = 1, x = x0 + sigma eps) the half-log-SNR is lambda = -log sigma, and the step
of the exponential integrators (DPM-Solver, DPM-Solver++, UniPC, DEIS) is h = lambda_next - lambda =
log(sigma / sigma_next). Dividing a VP sample by alpha leaves lambda and every exponential-integrator update
unchanged, so these solvers written in sigma are the VP papers' solvers exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np
import torch
from torch import Tensor

# The VP-SDE's linear beta schedule (Song et al. 2021): the clock of VP time t, for the schedules uniform in t,
# PNDM's half steps and DEIS's tAB
BETA_MIN, BETA_MAX = 0.1, 20.0

Sigma = TypeVar("Sigma", float, np.ndarray)


def linear_combination(x: Tensor, x_weight: float, tensors: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """x_weight x + sum_k weights[k] tensors[k], as a new tensor.

    A multistep update is linear in the state and the stored denoiser outputs, with scalar coefficients; summing
    it term by term reads and writes the state once per term, where the update written out as differences and
    divided differences would take a pass (and a kernel launch) per operation. Solver steps are memory- or
    launch-bound, so this is most of their cost.
    """
    combined = x * x_weight
    for tensor, weight in zip(tensors, weights):
        combined.add_(tensor, alpha=weight)
    return combined


def phi_functions(z: float, count: int) -> list[float]:
    """[phi_1(z), ..., phi_count(z)], the phi functions of exponential integrators (Hochbruck and Ostermann 2010):
    phi_k(z) = integral_0^1 e^((1 - t) z) t^(k-1) / (k-1)! dt, so phi_1(z) = (e^z - 1) / z and
    phi_(k+1)(z) = (phi_k(z) - 1/k!) / z.

    They integrate the Taylor terms of an exponential integrator exactly: over a step h in lambda,
    integral_0^h e^(-(h - u)) u^k / k! du = h^(k+1) phi_(k+1)(-h) (data prediction; phi(+h) for noise prediction).
    """
    phis, phi, factorial = [], math.expm1(z) / z, 1
    for k in range(1, count + 1):
        phis.append(phi)
        phi = (phi - 1 / factorial) / z
        factorial *= k + 1
    return phis


def heun_step(denoise: Callable[[Tensor, float], Tensor], x: Tensor, denoised: Tensor, sigma: float,
              sigma_next: float) -> Tensor:
    """From x at sigma (where D(x; sigma) = ``denoised``) to sigma_next > 0 on dx/dsigma = (x - D) / sigma: an
    Euler step, then the trapezoidal rule with the slope at its end (EDM's Algorithm 1; 2 calls, this one given)."""
    x_euler = torch.lerp(denoised, x, sigma_next / sigma)  # x + (sigma_next - sigma) d, d = (x - D) / sigma
    denoised_next = denoise(x_euler, sigma_next)
    # The trapezoidal rule x + (sigma_next - sigma) (d + d_next) / 2, with d_next = (x_euler - D_next) / sigma_next,
    # equals x_euler + (sigma_next - sigma) / (2 sigma_next) (D - D_next): two passes over the state, not seven
    weight = (sigma_next - sigma) / (2 * sigma_next)
    return torch.add(x_euler, denoised, alpha=weight).sub_(denoised_next, alpha=weight)


def vp_sigma(t: Tensor, beta_min: float = BETA_MIN, beta_max: float = BETA_MAX) -> Tensor:
    """sigma(t) = sqrt(1 / alpha_bar(t) - 1) with log alpha_bar(t) = -(beta_d t^2 / 2 + beta_min t)."""
    return torch.expm1(0.5 * (beta_max - beta_min) * t**2 + beta_min * t).sqrt()


def vp_time(sigma: Sigma, beta_min: float = BETA_MIN, beta_max: float = BETA_MAX) -> Sigma:
    """The inverse of vp_sigma: VP time t of a sigma (a float, or a numpy array elementwise)."""
    beta_d = beta_max - beta_min
    t = (np.sqrt(beta_min**2 + 2 * beta_d * np.log1p(np.square(sigma))) - beta_min) / beta_d
    return float(t) if np.ndim(t) == 0 else t
