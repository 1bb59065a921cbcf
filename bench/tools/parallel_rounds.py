"""Rounds as a fraction of steps: what the parallel samplers save in sequential depth, and what they lose.

    python -m bench.tools.parallel_rounds --models gmm2d gmm-image --steps 100 1000 --windows 8 16 32 64 \\
        --tolerances 0.1 0.01 0.001

For each model, base solver and step count it draws the base's sequential samples, then ParaDiGMS at each window and
tolerance and SRDS (default coarse steps, about sqrt(steps)) at each tolerance, all from the same x_T and per-step
noise, and prints one Markdown table: rounds (batched model calls one after another) as a fraction of the steps,
evaluations per sample (work) as a multiple of the steps, the RMS distance to the sequential base's samples, the
RMS distance to the exact flow's endpoint from the same x_T (bench.measure.reference; for a stochastic base the
samples follow no ODE trajectory and this is a scale, not an error), and the wall-clock ratio to the sequential
base. Bases: ``ddim``, ``ddpm`` (DDIM with eta = 1) and ``dpm-solver++`` (2M); choose with ``--bases``.

The wall-clock of a parallel sampler pays off on an accelerator that evaluates a window of steps in about the time
of one; on a few CPU cores, whose throughput the window only divides, expect ratios at or above 1.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

import torch

from bench.core.sampling import load_model, sample
from bench.measure.reference import solve_reference

BASES: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("ddim", {}),
    "ddpm": ("ddim", {"eta": 1.0}),
    "dpm-solver++": ("dpm-solver++", {"order": 2}),
}


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).square().mean().sqrt().item()


def rows_for(model, model_name: str, base: str, steps: int, windows: Sequence[int], tolerances: Sequence[float],
             n: int, seed: int, schedule: str, device: str, dtype: torch.dtype, exact: torch.Tensor
             ) -> list[dict[str, Any]]:
    """The sequential base and its parallel samplers at one step count: one row each."""
    solver, options = BASES[base]
    common = dict(nfe=steps, n=n, seed=seed, schedule=schedule, device=device, dtype=dtype)
    sequential = sample(model, solver, **common, **options)
    rows = [{"model": model_name, "base": base, "steps": steps, "sampler": "sequential", "setting": "",
             "tolerance": None, "rounds": sequential.rounds, "nfe": sequential.nfe, "to_sequential": 0.0,
             "to_exact": rms(sequential.x, exact), "seconds": sequential.seconds, "speed": 1.0}]
    runs = [("paradigms", f"window {window}", {"window": window}) for window in windows]
    runs.append(("srds", "coarse ~sqrt", {}))
    for sampler, setting, sampler_options in runs:
        for tolerance in tolerances:
            out = sample(model, sampler, **common, base=solver, base_options=options, tolerance=tolerance,
                         **sampler_options)
            rows.append({"model": model_name, "base": base, "steps": steps, "sampler": sampler, "setting": setting,
                         "tolerance": tolerance, "rounds": out.rounds, "nfe": out.nfe,
                         "to_sequential": rms(out.x, sequential.x), "to_exact": rms(out.x, exact),
                         "seconds": out.seconds, "speed": out.seconds / sequential.seconds})
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | base | steps | sampler | setting | tolerance | rounds / steps | evals / steps | "
             "RMS to sequential | RMS to exact | wall-clock / sequential |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        tolerance = "" if row["tolerance"] is None else f"{row['tolerance']:g}"
        lines.append(f"| {row['model']} | {row['base']} | {row['steps']} | {row['sampler']} | {row['setting']} | "
                     f"{tolerance} | {row['rounds'] / row['steps']:.3f} | {row['nfe'] / row['steps']:.2f} | "
                     f"{row['to_sequential']:.2e} | {row['to_exact']:.2e} | {row['speed']:.2f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["gmm2d", "gmm-image"])
    parser.add_argument("--bases", nargs="+", default=list(BASES), choices=list(BASES))
    parser.add_argument("--steps", nargs="+", type=int, default=[100, 1000])
    parser.add_argument("--windows", nargs="+", type=int, default=[8, 16, 32, 64])
    parser.add_argument("--tolerances", nargs="+", type=float, default=[0.1, 0.01, 0.001])
    parser.add_argument("--n", type=int, default=64, help="samples per run")
    parser.add_argument("--exact", nargs="*", default=["gmm2d", "gmm-image"],
                        help="models whose exact endpoints to solve for (a network's cost thousands of calls)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--schedule", default="karras")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    print(f"parallel samplers: {args.n} samples, seed {args.seed}, schedule {args.schedule}, {args.dtype}, "
          f"device {args.device}, {torch.get_num_threads()} threads")
    rows = []
    for model_name in args.models:
        model = load_model(model_name, device=args.device)
        x_T = sample(model, "euler", nfe=1, n=args.n, seed=args.seed, device=args.device, warmup=False).x_T
        if model_name in args.exact:  # unconditional samples: the reference follows D(x; sigma) without labels
            exact = solve_reference(model, x_T).to(x_T.device)
        else:
            exact = torch.full_like(x_T, float("nan"))
        for base in args.bases:
            for steps in args.steps:
                started = time.perf_counter()
                rows.extend(rows_for(model, model_name, base, steps, args.windows, args.tolerances, args.n,
                                     args.seed, args.schedule, args.device, dtype, exact))
                print(f"  {model_name} {base} {steps} steps: {time.perf_counter() - started:.0f} s", flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()
