"""Empirical order of convergence: the slope of log(trajectory error) against log(steps).

    python -m bench.tools.convergence heun --model gmm2d --schedule karras --steps 32 64 128 256

runs the solver in float64 at each step count from the same x_T and fits the slope against the exact flow's
endpoint (bench.measure.reference). A solver of order p shows a slope near p once the steps are small enough.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bench.measure.reference import solve_reference
from bench.core.sampling import get_solver, load_model, sample


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


def reference_for(model, n: int, seed: int = 0) -> Tensor:
    x_T = sample(model, "euler", nfe=1, n=n, seed=seed, dtype=torch.float64, warmup=False).x_T
    return solve_reference(model, x_T)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("solvers", nargs="+")
    parser.add_argument("--model", default="gmm2d")
    parser.add_argument("--schedule", default="karras")
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--steps", type=int, nargs="+", default=[32, 64, 128, 256])
    args = parser.parse_args(argv)
    model = load_model(args.model)
    reference = reference_for(model, args.n)
    for solver in args.solvers:
        name, *option_texts = solver.split(",")
        options = {key: float(value) for key, value in (text.split("=") for text in option_texts)}
        errors = trajectory_errors(model, reference, name, args.steps, args.schedule, **options)
        print(f"{solver:<24} order {fitted_order(args.steps, errors):5.2f}   errors "
              + " ".join(f"{error:.3e}" for error in errors))


if __name__ == "__main__":
    main()
