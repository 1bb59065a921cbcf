"""Stochastic samplers of the reverse SDE: Euler-Maruyama, and EDM's stochastic sampler (churn).

Their noise comes from ``noise(step)``, seeded per sample like x_T, so a sample's path does not depend on the
batch it falls in. They converge in distribution, not along the ODE trajectory from x_T: judge them by FID,
precision/recall or the exact Frechet distance, not by trajectory error. Their ``order`` is a weak order (of the
distribution's error), which the trajectory slopes of bench.tools.convergence do not measure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from bench.core.numerics import heun_step
from bench.core.options import SolverOptions, option
from bench.core.solver import Denoise, Noise, Plan, Solver
from bench.core.steps import StepSolver
from bench.hookspecs import hookimpl


class EulerMaruyama(StepSolver):
    """Euler-Maruyama on the reverse-time VE SDE with sigma(t) = t (Song et al. 2021; Karras et al. 2022, eq. 6):

        dx = -2 sigma grad log p(x; sigma) dsigma + sqrt(2 sigma) dW,   grad log p = (D(x; sigma) - x) / sigma^2,

    so one step from sigma to sigma_next adds the drift 2 (sigma_next - sigma) (x - D) / sigma and Gaussian noise
    of variance 2 sigma (sigma - sigma_next). Weak order 1 (strong order 1/2)."""

    order = 1
    order_note = "weak order 1, of the error in distribution, which trajectory slopes do not measure"
    stochastic = True

    def step(self, i: int, x: Tensor, estimates: tuple[Tensor, ...], sigmas: Tensor, orders: tuple[int, ...],
             noise: Tensor | None) -> Tensor:
        sigma, sigma_next, denoised = sigmas[i].item(), sigmas[i + 1].item(), estimates[-1]
        x = x + 2 * (sigma_next - sigma) * (x - denoised) / sigma
        return x + math.sqrt(2 * sigma * (sigma - sigma_next)) * noise


class EDMStochastic(Solver):
    """EDM's stochastic sampler (Karras et al. 2022, Algorithm 2): at each step inside [s_tmin, s_tmax] raise the
    noise level from sigma to sigma_hat = (1 + gamma) sigma by adding fresh noise ("churn"), then take a Heun step
    from sigma_hat to sigma_next (Euler on the last step, to 0). gamma = min(s_churn / steps, sqrt(2) - 1).
    s_churn = 0 is EDM's deterministic Heun sampler; NFE = 2 steps - 1."""

    @dataclass(frozen=True)
    class Options(SolverOptions):
        s_churn: float = 40.0
        s_tmin: float = 0.05
        s_tmax: float = 50.0
        s_noise: float = 1.003

        def validate(self) -> None:
            if self.s_churn < 0 or self.s_noise < 0 or self.s_tmin > self.s_tmax:
                raise ValueError(f"need s_churn >= 0, s_noise >= 0 and s_tmin <= s_tmax; got s_churn={self.s_churn}, "
                                 f"s_noise={self.s_noise}, s_tmin={self.s_tmin}, s_tmax={self.s_tmax}")

    order = 2  # Heun's

    @property
    def order_note(self) -> str:
        if self.stochastic:
            return "s_churn > 0: the samples converge in distribution only; 2 is the order of its Heun steps"
        return ""

    @property
    def stochastic(self) -> bool:
        return self.config.s_churn > 0

    def nfe_for_steps(self, steps: int) -> int:
        return 2 * steps - 1

    def sample(self, denoise: Denoise, x: Tensor, sigmas: Tensor, plan: Plan, noise: Noise | None = None) -> Tensor:
        s_churn, s_tmin, s_tmax, s_noise = (self.config.s_churn, self.config.s_tmin, self.config.s_tmax,
                                            self.config.s_noise)
        sigma_list = sigmas.tolist()
        for step, (sigma, sigma_next) in enumerate(zip(sigma_list[:-1], sigma_list[1:])):
            gamma = min(s_churn / plan.steps, math.sqrt(2) - 1) if s_tmin <= sigma <= s_tmax else 0.0
            sigma_hat = sigma * (1 + gamma)
            if gamma > 0:
                x = x + math.sqrt(sigma_hat**2 - sigma**2) * s_noise * noise(step)
            denoised = denoise(x, sigma_hat)
            if sigma_next == 0:
                return denoised
            x = heun_step(denoise, x, denoised, sigma_hat, sigma_next)
        return x


@hookimpl
def register_solvers(register):
    register(EulerMaruyama, name="euler-maruyama", aliases=("em",))
    register(EDMStochastic, name="edm-stochastic", aliases=("edm-churn",))
