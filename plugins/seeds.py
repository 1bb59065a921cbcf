"""SEEDS (Gonzalez et al., NeurIPS 2023, "SEEDS: Exponential SDE Solvers for Fast High-Quality Sampling from
Diffusion Models"; ComfyUI's seeds_2 and seeds_3): singlestep exponential solvers of the reverse SDE, data
prediction, with the noise of each stage drawn as exact stochastic integrals.

In lambda = -log sigma, with ``eta`` times the ODE's noise (eta = 1: the reverse SDE) the linear part from lambda_s
over H = (1 + eta) h is solved exactly, as in DPM-Solver++(2M) SDE, and the D's are DPM-Solver++'s singlestep stages
with h -> H (Lu et al. 2022b; plugins/dpm_solver_pp.py, phi_k = phi_k(-H)):

    SEEDS-2:  u   = e^(-r1 H) x + (1 - e^(-r1 H)) D                                           at lambda + r1 h
              x'  = e^(-H) x + (1 - e^(-H)) [(1 - 1/(2 r1)) D + 1/(2 r1) D(u)]
    SEEDS-3:  u1  = e^(-r1 H) x + (1 - e^(-r1 H)) D                                           at lambda + r1 h
              u2  = e^(-r2 H) x + (1 - e^(-r2 H)) D + (r2 / r1) r2 H phi_2(-r2 H) (D(u1) - D) at lambda + r2 h
              x'  = e^(-H) x + (1 - e^(-H)) D + (1 / r2) H phi_2(-H) (D(u2) - D)

each stage at lambda_c plus its noise sigma_c sum_k sqrt(e^(-2 eta (lambda_c - b_k)) - e^(-2 eta (lambda_c - a_k))) z_k
over the sub-intervals [a_k, b_k] of [lambda, lambda_c] the stages cut: the exact law of the Brownian integral, one
standard normal z_k = ``noise(stages i + k)`` per sub-interval of step i, shared by the later stages. ComfyUI reuses
the first sub-interval's coefficient for the later ones, which is the same for its defaults, r1 = 1/2 and
r1, r2 = 1/3, 2/3 (equal sub-intervals). ``stages`` 2 or 3 cost 2N - 1 or 3N - 2 calls for N steps (the last step
is x0 = D(x; sigma_last)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from bench.core.numerics import linear_combination, phi_functions
from bench.core.options import SolverOptions, option
from bench.core.solver import Denoise, Fixed, Noise, Plan, Solver, preset
from bench.hookspecs import hookimpl

UNIT = dict(check=lambda r: 0 < r < 1, must="be in (0, 1) (None: equal sub-intervals)")


def stage_noise_weights(eta: float, cuts: list[float], end: float) -> list[float]:
    """The weight of each sub-interval's z_k, [cuts[k], cuts[k + 1]] (lambdas; the last runs to ``end``), in the
    noise of a stage at lambda = ``end``, before its factor sigma_end."""
    bounds = [*cuts, end]
    return [math.sqrt(math.exp(-2 * eta * (end - b)) - math.exp(-2 * eta * (end - a)))
            for a, b in zip(bounds[:-1], bounds[1:])]


class SEEDS(Solver):
    """SEEDS-2 or SEEDS-3 (module docstring)."""

    @dataclass(frozen=True)
    class Options(SolverOptions):
        stages: int = option(2, choices=(2, 3))
        eta: float = option(1.0, check=lambda value: value >= 0, must="be >= 0")
        s_noise: float = option(1.0, check=lambda value: value >= 0, must="be >= 0")
        r1: float | None = option(None, **UNIT)
        r2: float | None = option(None, **UNIT)

        def validate(self) -> None:
            r1, r2 = self.fractions()
            if self.stages == 2 and self.r2 is not None:
                raise ValueError(f"r2 applies to stages=3 only; got r2={self.r2!r} with stages=2")
            if self.stages == 3 and not r1 < r2:
                raise ValueError(f"need r1 < r2; got r1={r1!r}, r2={r2!r}")

        def fractions(self) -> tuple[float, float]:
            if self.stages == 2:
                return (0.5 if self.r1 is None else self.r1), 1.0
            return (1 / 3 if self.r1 is None else self.r1), (2 / 3 if self.r2 is None else self.r2)

    @property
    def order(self) -> int:
        return 2 if self.stochastic else self.config.stages

    @property
    def nominal_order(self) -> int:
        return self.config.stages

    @property
    def order_note(self) -> str:
        if self.stochastic:
            return "eta > 0: weak order, of the error in distribution, measured on a Gaussian (bench.tools.weak_order)"
        return ""

    @property
    def stochastic(self) -> bool:
        return self.config.eta > 0 and self.config.s_noise > 0

    def nfe_for_steps(self, steps: int) -> int:
        return self.config.stages * (steps - 1) + 1

    def sample(self, denoise: Denoise, x: Tensor, sigmas: Tensor, plan: Plan, noise: Noise | None = None) -> Tensor:
        if self.stochastic and noise is None:
            raise ValueError(f"solver {self.describe()} is stochastic: it needs a noise source (noise(step) -> "
                             "N(0, I) shaped like x)")
        sigma_list = sigmas.tolist()
        for i in range(plan.steps):
            denoised = denoise(x, sigma_list[i])
            if sigma_list[i + 1] == 0:
                return denoised
            x = self.step(denoise, i, x, denoised, sigma_list[i], sigma_list[i + 1], noise)
        return x

    def step(self, denoise: Denoise, i: int, x: Tensor, denoised: Tensor, sigma: float, sigma_next: float,
             noise: Noise | None) -> Tensor:
        config, stages = self.config, self.config.stages
        r1, r2 = config.fractions()
        lam, h = -math.log(sigma), math.log(sigma / sigma_next)
        H = (1 + config.eta) * h
        cuts = [lam, lam + r1 * h] if stages == 2 else [lam, lam + r1 * h, lam + r2 * h]
        draws = [noise(stages * i + k) for k in range(stages)] if self.stochastic else []

        def with_noise(value: Tensor, stage: int, end: float) -> Tensor:
            """``value`` plus the noise of a stage at lambda = ``end``, over the first ``stage`` sub-intervals."""
            if not draws:
                return value
            weights = stage_noise_weights(config.eta, cuts[:stage], end)
            return linear_combination(value, 1.0, draws[:stage], [config.s_noise * math.exp(-end) * w for w in weights])

        u1 = with_noise(linear_combination(x, math.exp(-r1 * H), [denoised], [-math.expm1(-r1 * H)]), 1, cuts[1])
        denoised_1 = denoise(u1, math.exp(-cuts[1]))
        if stages == 2:
            d = 1 / (2 * r1)
            x = linear_combination(x, math.exp(-H), [denoised, denoised_1],
                                   [-math.expm1(-H) * (1 - d), -math.expm1(-H) * d])
            return with_noise(x, 2, lam + h)
        (phi_2_r2,) = phi_functions(-r2 * H, 2)[1:]
        c2 = (r2 / r1) * r2 * H * phi_2_r2
        u2 = linear_combination(x, math.exp(-r2 * H), [denoised, denoised_1], [-math.expm1(-r2 * H) - c2, c2])
        denoised_2 = denoise(with_noise(u2, 2, cuts[2]), math.exp(-cuts[2]))
        c3 = H * phi_functions(-H, 2)[1] / r2
        x = linear_combination(x, math.exp(-H), [denoised, denoised_2], [-math.expm1(-H) - c3, c3])
        return with_noise(x, 3, lam + h)


SEEDS2 = preset(SEEDS, "SEEDS2", """SEEDS-2: ComfyUI's seeds_2.""", stages=Fixed(2))
SEEDS3 = preset(SEEDS, "SEEDS3", """SEEDS-3: ComfyUI's seeds_3.""", stages=Fixed(3))


@hookimpl
def register_solvers(register):
    register(SEEDS2, name="seeds-2", aliases=("seeds_2",))
    register(SEEDS3, name="seeds-3", aliases=("seeds_3",))
