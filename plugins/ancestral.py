"""k-diffusion's two-call samplers: DPM-2 and its ancestral form, DPM++(2S) ancestral, and DPM++ SDE.

Each step from sigma to sigma_next calls the model at sigma and once more inside the step (the step to sigma = 0
makes one call, x0 = D(x; sigma_last)), so N steps cost 2N - 1 NFE, as Heun's. The ancestral forms split sigma_next
into a deterministic step down to sigma_down and fresh noise of scale sigma_up (bench.core.numerics.ancestral_step):

    x_next = ODE step from (x, sigma) to sigma_down + s_noise sigma_up z,   sigma_down^2 + sigma_up^2 = sigma_next^2.

``eta`` scales sigma_up (0: the deterministic solver, 1: DDPM's posterior variance), ``s_noise`` the noise itself.
The noise z of step i is ``noise(i)``, seeded per sample like x_T; DPM++ SDE makes its two draws a step from
``noise(2i)`` and ``noise(2i + 1)``, correlated as the increments of one Brownian path that k-diffusion's default
Brownian tree draws (DPMPlusPlusSDE). Each is k-diffusion's sampler exactly when handed these draws
(tests/test_k_diffusion_parity.py).

With noise they converge in distribution, not along the ODE trajectory from x_T: their ``order`` is then the
weak order measured on a Gaussian by bench.tools.weak_order (the exact 2-Wasserstein distance to the target), 2 for
each (1 for DPM++ SDE with independent draws), where euler-ancestral (DDIM with eta = 1) shows 1: an ancestral step
adds the exact DDPM posterior's noise around a deterministic step, whose order then sets the rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from bench.core.numerics import ancestral_step
from bench.core.options import SolverOptions, option
from bench.core.solver import Denoise, Noise, Plan, Solver, preset
from bench.hookspecs import hookimpl

NON_NEGATIVE = dict(check=lambda value: value >= 0, must="be >= 0")
WEAK_ORDER_NOTE = "eta > 0: weak order 2, of the error in distribution, measured on a Gaussian (bench.tools.weak_order)"


class TwoCallSolver(Solver):
    """The loop of the two-call samplers: D at sigma, then ``step`` (which may call the model once more), with
    x0 = D(x; sigma_last) as the last step. Options ``eta`` and ``s_noise`` as in the module docstring."""

    @dataclass(frozen=True)
    class Options(SolverOptions):
        eta: float = option(1.0, **NON_NEGATIVE)
        s_noise: float = option(1.0, **NON_NEGATIVE)

    order = 2

    @property
    def stochastic(self) -> bool:
        return self.config.eta > 0 and self.config.s_noise > 0

    def nfe_for_steps(self, steps: int) -> int:
        return 2 * steps - 1

    def sample(self, denoise: Denoise, x: Tensor, sigmas: Tensor, plan: Plan, noise: Noise | None = None) -> Tensor:
        if self.stochastic and noise is None:
            raise ValueError(f"solver {self.describe()} is stochastic: it needs a noise source (noise(step) -> "
                             "N(0, I) shaped like x)")
        sigma_list = sigmas.tolist()
        for i in range(plan.steps):
            sigma, sigma_next = sigma_list[i], sigma_list[i + 1]
            denoised = denoise(x, sigma)
            if sigma_next == 0:
                return denoised
            x = self.step(denoise, i, x, denoised, sigma, sigma_next, noise if self.stochastic else None)
        return x

    def step(self, denoise: Denoise, i: int, x: Tensor, denoised: Tensor, sigma: float, sigma_next: float,
             noise: Noise | None) -> Tensor:
        raise NotImplementedError

    def add_noise(self, x: Tensor, sigma_up: float, noise: Noise | None, draw: int) -> Tensor:
        """x + s_noise sigma_up z, z = noise(draw); x itself when deterministic."""
        if noise is None or sigma_up == 0:
            return x
        return x.add_(noise(draw), alpha=self.config.s_noise * sigma_up)


class DPM2(TwoCallSolver):
    """k-diffusion's DPM-2 ("inspired by DPM-Solver-2 and Karras et al.'s Algorithm 2"): the midpoint method in
    sigma, with the midpoint at the geometric mean sigma_mid = sqrt(sigma sigma_down):

        x_mid = x + (sigma_mid - sigma) d,        d = (x - D(x; sigma)) / sigma
        x     = x + (sigma_down - sigma) d_mid,   d_mid = (x_mid - D(x_mid; sigma_mid)) / sigma_mid

    then the ancestral noise. ``eta`` = 0 (the default of `dpm-2`) is k-diffusion's sample_dpm_2 without churn,
    eta = 1 (`dpm-2-ancestral`) its sample_dpm_2_ancestral."""

    @dataclass(frozen=True)
    class Options(TwoCallSolver.Options):
        eta: float = option(0.0, **NON_NEGATIVE)

    @property
    def order_note(self) -> str:
        return WEAK_ORDER_NOTE if self.stochastic else ""

    def step(self, denoise: Denoise, i: int, x: Tensor, denoised: Tensor, sigma: float, sigma_next: float,
             noise: Noise | None) -> Tensor:
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, self.config.eta)
        if sigma_down == 0:  # all of sigma_next is fresh noise: Euler to 0 is D itself
            x = denoised.clone()
        else:
            sigma_mid = math.sqrt(sigma * sigma_down)
            x_mid = torch.lerp(denoised, x, sigma_mid / sigma)  # x + (sigma_mid - sigma) d
            d_mid = (x_mid - denoise(x_mid, sigma_mid)) / sigma_mid
            x = x + (sigma_down - sigma) * d_mid
        return self.add_noise(x, sigma_up, noise, i)


class DPMPlusPlus2SAncestral(TwoCallSolver):
    """DPM-Solver++(2S) with r = 1/2 (Lu et al. 2022b, Algorithm 1) down to sigma_down, then the ancestral noise
    (k-diffusion's sample_dpmpp_2s_ancestral). In lambda = -log sigma with h = log(sigma / sigma_down), the
    intermediate point sits at sigma_s = sqrt(sigma sigma_down), and with r = 1/2 the final update reads D there only:

        u      = (sigma_s / sigma) x + (1 - sigma_s / sigma) D(x; sigma)
        x_down = (sigma_down / sigma) x + (1 - sigma_down / sigma) D(u; sigma_s)

    eta = 0 is the deterministic DPM-Solver++(2S) on the harness's grid."""

    @property
    def order_note(self) -> str:
        return WEAK_ORDER_NOTE if self.stochastic else ""

    def step(self, denoise: Denoise, i: int, x: Tensor, denoised: Tensor, sigma: float, sigma_next: float,
             noise: Noise | None) -> Tensor:
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, self.config.eta)
        if sigma_down == 0:
            x = denoised.clone()
        else:
            sigma_s = math.sqrt(sigma * sigma_down)
            u = torch.lerp(denoised, x, sigma_s / sigma)
            x = torch.lerp(denoise(u, sigma_s), x, sigma_down / sigma)
        return self.add_noise(x, sigma_up, noise, i)


class DPMPlusPlusSDE(TwoCallSolver):
    """k-diffusion's DPM++ SDE (sample_dpmpp_sde): DPM-Solver++(2S) with both of its stages taken as ancestral
    steps. With h = log(sigma / sigma_next) and the intermediate level sigma_s = sigma e^(-r h):

        u      = ancestral step from (x, sigma) to sigma_s with D(x; sigma)             (noise(2i))
        D_r    = (1 - 1/(2r)) D(x; sigma) + 1/(2r) D(u; sigma_s)
        x_next = ancestral step from (x, sigma) to sigma_next with D_r                   (noise(2i + 1))

    where an ancestral step with D from sigma to sigma' is D + (sigma_down / sigma) (x - D) + s_noise sigma_up z for
    (sigma_down, sigma_up) = ancestral_step(sigma, sigma', eta). ``r`` (default 1/2) places the intermediate level.

    The two draws are the normalised increments of one Brownian path in sigma over [sigma_s, sigma] and over
    [sigma_next, sigma], as k-diffusion's default Brownian tree draws them: z_1 = noise(2i) and
    z_2 = sqrt(a) z_1 + sqrt(1 - a) noise(2i + 1), a = (sigma - sigma_s) / (sigma - sigma_next), their correlation.
    ``brownian=False`` draws them independently (k-diffusion with a torch.randn noise sampler): measured on a
    Gaussian (bench.tools.weak_order) that costs the method its weak order 2, which falls to 1."""

    @dataclass(frozen=True)
    class Options(TwoCallSolver.Options):
        r: float = option(0.5, check=lambda r: 0 < r < 1, must="be in (0, 1)")
        brownian: bool = True

    @property
    def order(self) -> int:
        return 1 if self.stochastic and not self.config.brownian else 2

    @property
    def order_note(self) -> str:
        if self.stochastic:
            return ("eta > 0: weak order 2 with the Brownian draws, 1 without, of the error in distribution, measured "
                    "on a Gaussian (bench.tools.weak_order)")
        return ""

    def step(self, denoise: Denoise, i: int, x: Tensor, denoised: Tensor, sigma: float, sigma_next: float,
             noise: Noise | None) -> Tensor:
        eta, r = self.config.eta, self.config.r
        sigma_s = sigma * math.exp(-r * math.log(sigma / sigma_next))
        sigma_down, sigma_up = ancestral_step(sigma, sigma_s, eta)
        z_1, z_2 = self.draws(i, sigma, sigma_s, sigma_next, noise)
        u = torch.lerp(denoised, x, sigma_down / sigma)
        if z_1 is not None:
            u.add_(z_1, alpha=self.config.s_noise * sigma_up)
        denoised_r = torch.lerp(denoised, denoise(u, sigma_s), 1 / (2 * r))  # (1 - 1/(2r)) D + 1/(2r) D(u)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = torch.lerp(denoised_r, x, sigma_down / sigma)
        return x if z_2 is None else x.add_(z_2, alpha=self.config.s_noise * sigma_up)

    def draws(self, i: int, sigma: float, sigma_s: float, sigma_next: float, noise: Noise | None
              ) -> tuple[Tensor | None, Tensor | None]:
        """z_1 and z_2 of step i (class docstring); None, None when deterministic."""
        if noise is None:
            return None, None
        z_1 = noise(2 * i)
        if not self.config.brownian:
            return z_1, noise(2 * i + 1)
        a = (sigma - sigma_s) / (sigma - sigma_next)
        return z_1, torch.add(noise(2 * i + 1) * math.sqrt(1 - a), z_1, alpha=math.sqrt(a))


DPM2Ancestral = preset(DPM2, "DPM2Ancestral", """DPM-2 with eta = 1: k-diffusion's sample_dpm_2_ancestral.""",
                       eta=1.0)


@hookimpl
def register_solvers(register):
    register(DPM2, name="dpm-2", aliases=("dpm_2", "dpm2"))
    register(DPM2Ancestral, name="dpm-2-ancestral", aliases=("dpm_2_ancestral", "dpm2-a"))
    register(DPMPlusPlus2SAncestral, name="dpm++2s-ancestral", aliases=("dpmpp_2s_ancestral", "dpm++2s-a"))
    register(DPMPlusPlusSDE, name="dpm++sde", aliases=("dpmpp_sde",))
