"""Learned schedules and coefficients against hand-designed ones: the table.

    python -m bench.tools.learned                                   # gmm2d and gmm-image, 4 solvers, papers' sizes
    python -m bench.tools.learned --models digits --solvers dpm-solver++ --nfe 4 6 10 --fit-n 32 --iterations 5
    python -m bench.tools.learned --table results/learned.sqlite    # the table of a store already run

builds a suite from bench/suites/learned.toml with the given models, base solvers (each with karras, logsnr,
time-uniform, ld3, gits and ays) and budgets, and a bns over each base on the karras grid, at the fit sizes given
(default: the papers', 100 fitting samples and a 64-step Heun teacher), runs it like `samplerbench run` (every fit
once, into OUT/fits, on a fit seed no cell uses) and prints, per model and base solver, the metric at each budget
for every schedule, each learned one's ratio to karras, bns's ratio to its base, and what the fits cost.
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from importlib import resources
from pathlib import Path

import pandas as pd

from bench.sweep.runner import run_suite
from bench.sweep.store import read_results
from bench.sweep.suite import parse_suite

HAND = ("karras", "logsnr", "time-uniform")
LEARNED = ("ld3", "gits", "ays")


def suite_document(models: list[str], solvers: list[str], nfe: list[int], n: int, fit_n: int, teacher_steps: int,
                   iterations: int, bns_iterations: int, name: str) -> dict:
    with open(Path(str(resources.files("bench") / "suites" / "learned.toml")), "rb") as handle:
        document = tomllib.load(handle)
    fit = {"fit_n": fit_n, "teacher_steps": teacher_steps}
    document.update(name=name, n=n, nfe=nfe, models=[{"name": model} for model in models], schedules=[
        *HAND, {"name": "ld3", **fit, "iterations": iterations}, {"name": "gits", **fit, "fine_steps": 40},
        {"name": "ays", **fit, "fine_steps": 100}])
    document["solvers"] = [{"name": solver} for solver in solvers] + [
        {"name": "bns", "base": solver, **fit, "iterations": bns_iterations, "schedules": ["karras"],
         "label": f"bns({solver})"} for solver in solvers]
    return document


def table(store: Path, metric: str) -> str:
    rows = read_results(store)
    rows = rows[rows["status"] == "done"]
    rows = rows.assign(schedule=rows["schedule"].str.split("(").str[0])  # ld3(fit_n=100, ...) -> ld3
    bases = [json.loads(config)["solver"]["options"].get("base", "dpm-solver++") if solver == "bns" else None
             for solver, config in zip(rows["solver"], rows["config"])]
    rows = rows.assign(label=[f"bns({base})" if base else label for base, label in zip(bases, rows["label"])])
    lines = []
    for model, of_model in rows.groupby("model", sort=False):
        lines.append(f"\n## {model}: {metric} (lower is better), mean over seeds\n")
        bases = [label for label in of_model["label"].unique() if not label.startswith("bns")]
        for base in bases:
            cells = of_model[of_model["label"] == base]
            grid = cells.pivot_table(index="nfe_budget", columns="schedule", values=metric, aggfunc="mean")
            columns = [c for c in (*HAND, *LEARNED) if c in grid.columns]
            learned_bns = of_model[of_model["label"] == f"bns({base})"]
            header = ["NFE", *columns, *(f"{c}/karras" for c in LEARNED if c in columns)]
            if len(learned_bns):
                header += ["bns", "bns/base"]
            lines.append(f"\n{base}\n\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
            for nfe, values in grid.iterrows():
                cells_out = [f"{values[c]:.4g}" for c in columns]
                cells_out += [f"{values[c] / values['karras']:.2f}" for c in LEARNED if c in columns]
                if len(learned_bns):
                    bns = learned_bns[learned_bns["nfe_budget"] == nfe][metric].mean()
                    cells_out += [f"{bns:.4g}", f"{bns / values['karras']:.2f}"]
                lines.append(f"| {nfe} | " + " | ".join(cells_out) + " |")
        fitted = of_model.dropna(subset=["fit_key"]).drop_duplicates("fit_key")
        fitted = fitted.assign(kind=[label if label.startswith("bns") else schedule
                                     for label, schedule in zip(fitted["label"], fitted["schedule"])])
        cost = fitted.groupby("kind").agg(fits=("fit_key", "count"), seconds_mean=("fit_seconds", "mean"),
                                          seconds_max=("fit_seconds", "max"),
                                          teacher_nfe=("fit_teacher_nfe", "mean"),
                                          evaluations=("fit_evaluations", "mean"))
        lines.append(f"\nfitting cost on {model} (per fit):\n\n| fit | fits | seconds (mean) | seconds (max) | "
                     "teacher NFE | evaluations |\n|---|---|---|---|---|---|")
        lines += [f"| {kind} | {c.fits:.0f} | {c.seconds_mean:.2f} | {c.seconds_max:.2f} | {c.teacher_nfe:.0f} | "
                  f"{c.evaluations:.0f} |" for kind, c in cost.iterrows()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tools.learned", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", type=Path, help="print the table of this store and stop")
    parser.add_argument("--models", nargs="+", default=["gmm2d", "gmm-image"])
    parser.add_argument("--solvers", nargs="+", default=["dpm-solver++", "unipc", "ipndm", "euler"])
    parser.add_argument("--nfe", nargs="+", type=int, default=[3, 4, 5, 6, 8, 10])
    parser.add_argument("--n", type=int, default=1024, help="evaluation samples per cell")
    parser.add_argument("--fit-n", type=int, default=100, help="fitting samples (LD3: ~100)")
    parser.add_argument("--teacher-steps", type=int, default=64, help="Heun steps of the teacher")
    parser.add_argument("--iterations", type=int, default=30, help="LD3's iterations per start")
    parser.add_argument("--bns-iterations", type=int, default=150)
    parser.add_argument("--metric", default="trajectory_error")
    parser.add_argument("--name", default="learned-full", help="the suite's name: its store is OUT/NAME.sqlite")
    parser.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args(argv)
    if args.table is None:
        document = suite_document(args.models, args.solvers, args.nfe, args.n, args.fit_n, args.teacher_steps,
                                  args.iterations, args.bns_iterations, args.name)
        summary = run_suite(parse_suite(document), args.out, progress=sys.stderr.isatty())
        print(f"{summary.done} cells done, {summary.failed} failed, {summary.skipped} already done", file=sys.stderr)
        args.table = summary.store
    pd.set_option("display.width", 200)
    print(table(args.table, args.metric))
    return 0


if __name__ == "__main__":
    sys.exit(main())
