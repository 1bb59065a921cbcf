"""Empirical order of convergence: the slope of log(trajectory error) against log(steps).

    python -m bench.tools.convergence heun deis,order=3 --model gmm2d --schedule logsnr --sigma-max 0.5 \\
        --steps 96 192 384 768

runs each solver in float64 at each step count from the same x_T and measures its error against the exact flow's
endpoint (bench.measure.reference), then prints, per solver, the step counts, the errors, the slope between each
pair of neighbouring step counts and the fitted slope, next to the order the solver declares (the global order its
implementation reaches as the steps grow) and its paper's nominal order. A solver of order p shows slopes near p
once the steps are small enough. Options follow the solver's name: ``unipc,order=3,disable_corrector=[0]``.

Where the asymptotic regime starts depends on the sigma range. Multistep methods take a first-order step first,
and its O(h^2) local error caps them at order 2; an error made at sigma_max shrinks along the flow by about
sigma_data / sigma_max, so from sigma_max = 80 (the analytic models' range) that cap hides behind the bulk steps'
error over the usual budgets, and DEIS-3 fits ~2.9. ``--sigma-max 0.5`` (gmm2d, logsnr, 96..768 steps) shows every
solver's asymptotic order to within a few hundredths.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bench.core.sampling import get_solver, load_model, sample
from bench.measure.reference import solve_reference


class SigmaRange(torch.nn.Module):
    """A model sampled over [sigma_min, sigma_max] instead of its own range: the same denoiser, other endpoints."""

    def __init__(self, model, sigma_min: float | None = None, sigma_max: float | None = None) -> None:
        super().__init__()
        self.model = model
        self.sigma_min = model.sigma_min if sigma_min is None else sigma_min
        self.sigma_max = model.sigma_max if sigma_max is None else sigma_max
        for attribute in ("shape", "sigma_data", "num_classes"):
            setattr(self, attribute, getattr(model, attribute))
        self.name = f"{getattr(model, 'name', type(model).__name__)}[{self.sigma_min:g}, {self.sigma_max:g}]"

    def forward(self, x: Tensor, sigma: Tensor, cond: Tensor | None = None) -> Tensor:
        return self.model(x, sigma, cond)


def trajectory_errors(model, reference: Tensor, solver: str, step_counts: Sequence[int], schedule: str = "karras",
                      seed: int = 0, **options: Any) -> list[float]:
    """RMS error against ``reference`` (from the x_T of ``seed``) at each step count, in float64."""
    errors = []
    for steps in step_counts:
        nfe = get_solver(solver, **options).nfe_for_steps(steps)
        out = sample(model, solver, nfe=nfe, n=len(reference), seed=seed, dtype=torch.float64, schedule=schedule,
                     warmup=False, **options)
        if out.plan.steps != steps:
            raise ValueError(f"{solver} planned {out.plan.steps} steps for NFE {nfe}, not {steps}")
        errors.append((out.x - reference).pow(2).mean().sqrt().item())
    return errors


def fitted_order(step_counts: Sequence[int], errors: Sequence[float]) -> float:
    slope, _ = np.polyfit(np.log(step_counts), np.log(errors), 1)
    return float(-slope)


def pair_slopes(step_counts: Sequence[int], errors: Sequence[float]) -> list[float]:
    """The slope between each pair of neighbouring step counts: they settle on the order in the asymptotic regime."""
    return [math.log(errors[k] / errors[k + 1]) / math.log(step_counts[k + 1] / step_counts[k])
            for k in range(len(errors) - 1)]


def reference_for(model, n: int, seed: int = 0, tolerance: float | None = None) -> Tensor:
    x_T = sample(model, "euler", nfe=1, n=n, seed=seed, dtype=torch.float64, warmup=False).x_T
    return solve_reference(model, x_T) if tolerance is None else solve_reference(model, x_T, tolerance=tolerance)


@dataclass
class Convergence:
    """One solver's measurement: declared and nominal order, and what the errors show."""

    solver: str
    options: dict[str, Any]
    declared: int
    nominal: int
    note: str
    step_counts: list[int]
    errors: list[float]

    @property
    def slopes(self) -> list[float]:
        return pair_slopes(self.step_counts, self.errors)

    @property
    def fitted(self) -> float:
        return fitted_order(self.step_counts, self.errors)

    def describe(self) -> str:
        name = self.solver + "".join(f",{key}={value}" for key, value in self.options.items())
        nominal = f", nominal {self.nominal}" if self.nominal != self.declared else ""
        note = f": {self.note}" if self.note else ""
        return "\n".join([
            f"{name}: declared order {self.declared}{nominal}{note}",
            "  steps  " + "".join(f"{steps:>10}" for steps in self.step_counts),
            "  error  " + "".join(f"{error:>10.3e}" for error in self.errors),
            "  slope  " + " " * 5 + "".join(f"{slope:>10.2f}" for slope in self.slopes)
            + f"     fitted {self.fitted:.2f}, last {self.slopes[-1]:.2f}, declared {self.declared}"])


def measure(model, reference: Tensor, solver: str, step_counts: Sequence[int], schedule: str = "karras",
            **options: Any) -> Convergence:
    instance = get_solver(solver, **options)
    errors = trajectory_errors(model, reference, solver, step_counts, schedule, **options)
    return Convergence(solver, options, instance.order, instance.nominal_order, instance.order_note,
                       list(step_counts), errors)


def parse_solver(text: str) -> tuple[str, dict[str, Any]]:
    """``name,key=value,...`` -> (name, options); a value is read as JSON or Python (3, 0.5, true, True, [0, 1]),
    or else taken as a string (method=logrho)."""
    name, *items = re.split(r",(?![^\[]*\])", text)
    options = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            try:
                options[key] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                options[key] = value
    return name, options


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("solvers", nargs="+", help="solver names, each with options: deis,order=3,method=logrho")
    parser.add_argument("--model", default="gmm2d")
    parser.add_argument("--schedule", default="karras")
    parser.add_argument("--n", type=int, default=256, help="samples")
    parser.add_argument("--steps", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--sigma-max", type=float, help="start here instead of the model's sigma_max")
    parser.add_argument("--sigma-min", type=float, help="end here instead of the model's sigma_min")
    args = parser.parse_args(argv)
    model = load_model(args.model)
    if args.sigma_max is not None or args.sigma_min is not None:
        model = SigmaRange(model, args.sigma_min, args.sigma_max)
    reference = reference_for(model, args.n, tolerance=1e-12)
    print(f"{getattr(model, 'name', args.model)}, {args.schedule} grid, {args.n} samples, float64; error: RMS against "
          "the exact flow's endpoint")
    for text in args.solvers:
        name, options = parse_solver(text)
        print(measure(model, reference, name, args.steps, args.schedule, **options).describe())


if __name__ == "__main__":
    main()
