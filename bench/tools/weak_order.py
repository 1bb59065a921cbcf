"""Weak order of convergence: how fast a sampler's output distribution approaches its target, measured exactly.

    python -m bench.tools.weak_order euler-ancestral dpm++sde dpm++3m-sde,eta=0.5 --steps 32 64 128 256

A stochastic sampler converges in distribution, not along the ODE trajectory from x_T, so trajectory slopes
(bench.tools.convergence) say nothing about it, and sampled distances (FID, or the Frechet distance of a few thousand
samples) bottom out at their own sampling noise long before a rate shows. On Gaussian data both problems go away:

- For data N(mu, S) the denoiser is affine, D(x; sigma) = mu + S (S + sigma^2 I)^-1 (x - mu), and so is every
  sampler's output as a function of its Gaussian inputs, the eps of x_T and each per-step draw z_k:
  x_out = m + M w with w = (eps, z_0, z_1, ...) ~ N(0, I). Running the sampler once on 1 + d (1 + K) inputs (zero,
  and each unit vector of each input) reads off m and the columns of M: the output law is exactly N(m, M M^T).
- The target is what every solver aims at, the law of x0 = D(x; sigma_min) for x ~ p_sigma_min (the last step of
  every solver is x0 = D(x; sigma_last)): N(mu, S (S + sigma_min^2 I)^-1 S). x_T is drawn from the exact
  p_sigma_max = N(mu, S + sigma_max^2 I), not from N(0, sigma_max^2 I), so nothing but the solver's error is left.
- The distance is the 2-Wasserstein distance between the two Gaussians: the square root of their Frechet distance
  (bench.measure.distances). A sampler of weak order p shows W2 ~ C h^p: slope p of log W2 against log steps.

The Gaussian (``gaussian_data``) is 2-D, anisotropic (variances 1 and 0.01 along axes turned by 30 degrees) and off
the origin, with the analytic models' sigma range [0.002, 80]. An ODE solver's W2 falls at least as fast as its
trajectory error, so deterministic solvers can be checked here too.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from bench.core.sampling import get_solver, make_sigmas
from bench.core.solver import Solver
from bench.measure.distances import Statistics, frechet_distance
from bench.tools.convergence import fitted_order, pair_slopes, parse_solver


class GaussianData(nn.Module):
    """Data N(mu, S) with its exact denoiser; a Denoiser (x, sigma [batch]) -> D, float64."""

    sigma_min = 0.002
    sigma_max = 80.0

    def __init__(self, mean: Tensor, covariance: Tensor) -> None:
        super().__init__()
        self.register_buffer("mu", mean.to(torch.float64))
        self.register_buffer("S", covariance.to(torch.float64))
        eigenvalues, eigenvectors = torch.linalg.eigh(self.S)
        self.register_buffer("eigenvalues", eigenvalues)
        self.register_buffer("eigenvectors", eigenvectors)
        self.shape = (len(mean),)
        self.sigma_data = math.sqrt(covariance.trace().item() / len(mean))
        self.num_classes = 0
        self.name = "gaussian"

    def forward(self, x: Tensor, sigma: Tensor, cond: Tensor | None = None) -> Tensor:
        # S (S + sigma^2 I)^-1 = Q diag(lambda / (lambda + sigma^2)) Q^T, S = Q diag(lambda) Q^T
        shrink = self.eigenvalues / (self.eigenvalues + sigma.to(torch.float64)[:, None] ** 2)
        return self.mu + ((x - self.mu) @ self.eigenvectors * shrink) @ self.eigenvectors.T

    def noisy_covariance(self, sigma: float) -> Tensor:
        return self.S + sigma**2 * torch.eye(len(self.mu), dtype=torch.float64)

    def target(self) -> Statistics:
        """The law of D(x; sigma_min) for x ~ p_sigma_min."""
        return Statistics(self.mu, self.S @ torch.linalg.solve(self.noisy_covariance(self.sigma_min), self.S))


def gaussian_data() -> GaussianData:
    angle = math.pi / 6
    rotation = torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]],
                            dtype=torch.float64)
    covariance = rotation @ torch.diag(torch.tensor([1.0, 0.01], dtype=torch.float64)) @ rotation.T
    return GaussianData(torch.tensor([0.5, -0.25], dtype=torch.float64), covariance)


def output_law(model: GaussianData, solver: Solver, steps: int, schedule: str = "karras") -> Statistics:
    """The exact law N(m, M M^T) of ``solver``'s output on ``model`` with ``steps`` steps (module docstring)."""
    plan = solver.plan(solver.nfe_for_steps(steps))
    if plan.steps != steps:
        raise ValueError(f"{solver.describe()} planned {plan.steps} steps for NFE {plan.nfe}, not {steps}")
    sigmas = make_sigmas(schedule, steps, model)
    d = len(model.mu)

    def denoise(x: Tensor, sigma: float) -> Tensor:
        return model(x, torch.full((len(x),), sigma, dtype=torch.float64))

    draws: list[int] = []  # which noise(k) the solver asks for: probed once with zero noise
    if solver.stochastic:
        solver.sample(denoise, torch.zeros(1, d, dtype=torch.float64), sigmas, plan,
                      lambda k: draws.append(k) or torch.zeros(1, d, dtype=torch.float64))
    draws = sorted(set(draws))
    inputs = 1 + len(draws)  # eps of x_T, then each draw
    batch = 1 + d * inputs
    units = torch.zeros(batch, inputs, d, dtype=torch.float64)  # row 1 + input * d + j: unit j of that input
    units.view(batch, -1)[1:] = torch.eye(inputs * d, dtype=torch.float64)
    x_T = model.mu + units[:, 0] @ torch.linalg.cholesky(model.noisy_covariance(sigmas[0].item())).T
    position = {k: 1 + index for index, k in enumerate(draws)}
    out = solver.sample(denoise, x_T, sigmas, plan, lambda k: units[:, position[k]].clone())
    mean, columns = out[0], (out[1:] - out[0]).T  # [d], [d, d * inputs]
    return Statistics(mean, columns @ columns.T)


def wasserstein(law: Statistics, target: Statistics) -> float:
    """W2 between two Gaussians: the square root of their Frechet distance (clipped at 0 against rounding)."""
    return math.sqrt(max(frechet_distance(law, target), 0.0))


def weak_errors(model: GaussianData, solver: str, step_counts: Sequence[int], schedule: str = "karras",
                **options: Any) -> list[float]:
    instance, target = get_solver(solver, **options), model.target()
    return [wasserstein(output_law(model, instance, steps, schedule), target) for steps in step_counts]


def describe(solver: str, options: dict[str, Any], step_counts: Sequence[int], errors: Sequence[float]) -> str:
    instance = get_solver(solver, **options)
    name = solver + "".join(f",{key}={value}" for key, value in options.items())
    kind = "stochastic" if instance.stochastic else "deterministic"
    return "\n".join([
        f"{name} ({kind}): declared order {instance.order}"
        + (f": {instance.order_note}" if instance.order_note else ""),
        "  steps  " + "".join(f"{steps:>10}" for steps in step_counts),
        "  W2     " + "".join(f"{error:>10.3e}" for error in errors),
        "  slope  " + " " * 5 + "".join(f"{slope:>10.2f}" for slope in pair_slopes(step_counts, errors))
        + f"     fitted {fitted_order(step_counts, errors):.2f}"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("solvers", nargs="+", help="solver names, each with options: dpm++sde,eta=0.5")
    parser.add_argument("--schedule", default="karras")
    parser.add_argument("--steps", type=int, nargs="+", default=[32, 64, 128, 256])
    args = parser.parse_args(argv)
    model = gaussian_data()
    print(f"2-D Gaussian, {args.schedule} grid over [{model.sigma_min}, {model.sigma_max}], float64; error: exact W2 "
          "between the output's law and the target's")
    for text in args.solvers:
        name, options = parse_solver(text)
        print(describe(name, options, args.steps, weak_errors(model, name, args.steps, args.schedule, **options)))


if __name__ == "__main__":
    main()
