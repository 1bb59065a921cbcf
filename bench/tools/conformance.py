"""The checks a solver plugin must pass before its numbers mean anything: `samplerbench check SOLVER`.

    samplerbench check euler
    samplerbench check dpm-solver++,order=3 --model gmm2d

Each check prints one PASS / FAIL (or SKIP, where it does not apply) line with what it measured:

- counted NFE = plan: at every budget from the solver's minimum to 30, the denoiser calls the harness counted
  equal the plan's NFE, and the plan is within the budget (a row records the counted NFE; a solver that spends
  less than it declares is compared at the wrong budget, one that spends more is refused by every sweep);
- shape, dtype, finite: the samples have x_T's shape and the run's dtype, in float32 and float64, and are finite;
- batch-size invariance: the same samples, to the harness's agreement tolerance, whether drawn in one batch or
  several (sample i's noise depends on i alone; a solver that mixes samples in a batch breaks this);
- reuse: one instance called several times, at other budgets in between, gives bitwise the samples of a fresh
  instance (state lives in `sample`'s locals: a solver is reused across every cell of a sweep);
- empirical order: the slope of log(trajectory error) against log(steps) on the analytic model, next to the
  order the solver declares (bench.tools.convergence; deterministic, fixed-step solvers only).

The exit status is 1 when any check fails.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from bench.core.sampling import SampleOutput, agreement_tolerance, get_solver, load_model, sample
from bench.core.solver import Solver
from bench.registry import PluginManager, manager
from bench.tools.convergence import SigmaRange, fitted_order, pair_slopes, parse_solver, reference_for

MAX_BUDGET = 30
ORDER_STEPS = (96, 192, 384, 768)  # on gmm2d over [sigma_min, 0.5], logsnr: every built-in solver's asymptotic order
ORDER_SIGMA_MAX = 0.5
ORDER_SLACK = 0.3  # a measured order this far below the declared one fails


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool | None  # None: does not apply to this solver
    measured: str

    def line(self) -> str:
        verdict = {True: "PASS", False: "FAIL", None: "SKIP"}[self.passed]
        return f"{verdict}  {self.name:<22} {self.measured}"


@dataclass
class Subject:
    """The solver under test: how to build a fresh instance, and the model it runs on."""

    name: str
    options: dict[str, Any]
    model: Any
    plugins: PluginManager | None

    def fresh(self) -> Solver:
        return get_solver(self.name, self.plugins, **self.options)

    def draw(self, solver: Solver, nfe: int | None, n: int, dtype: torch.dtype = torch.float64,
             batch_size: int | None = None) -> SampleOutput:
        return sample(self.model, solver, nfe=nfe, n=n, seed=3, dtype=dtype, batch_size=batch_size, warmup=False,
                      plugins=self.plugins)


def check_nfe(subject: Subject, max_budget: int = MAX_BUDGET) -> Check:
    solver = subject.fresh()
    if solver.adaptive:
        return Check("counted NFE = plan", None, "adaptive: its NFE is an output, not a plan")
    budgets = range(solver.min_nfe, max(solver.min_nfe, max_budget) + 1)
    for budget in budgets:
        plan = solver.plan(budget)
        if plan.nfe > budget:
            return Check("counted NFE = plan", False, f"budget {budget}: the plan declares {plan.nfe} calls")
        counted = subject.draw(solver, budget, n=2).nfe
        if counted != plan.nfe:
            return Check("counted NFE = plan", False, f"budget {budget}: counted {counted} calls, the plan "
                                                      f"({plan.steps} steps) declares {plan.nfe}")
    return Check("counted NFE = plan", True, f"equal at all {len(budgets)} budgets {budgets[0]}..{budgets[-1]}")


def check_output(subject: Subject, nfe: int | None) -> Check:
    shapes = []
    for dtype in (torch.float32, torch.float64):
        x = subject.draw(subject.fresh(), nfe, n=8, dtype=dtype).x
        bad = (~torch.isfinite(x)).sum().item()
        if bad:
            return Check("shape, dtype, finite", False, f"{bad} of {x.numel()} values are not finite in {dtype}")
        shapes.append(str(dtype).removeprefix("torch."))
    return Check("shape, dtype, finite", True, f"{list(x.shape)} in {' and '.join(shapes)}, all finite")


def check_batches(subject: Subject, nfe: int | None, n: int = 12, small: int = 5) -> Check:
    whole = subject.draw(subject.fresh(), nfe, n=n, dtype=torch.float32).x
    split = subject.draw(subject.fresh(), nfe, n=n, dtype=torch.float32, batch_size=small).x
    tolerance = agreement_tolerance(torch.float32, subject.model.sigma_max)
    difference = (whole - split).abs().max().item()
    measured = f"max |x(batch {n}) - x(batches of {small})| = {difference:.2g}, tolerance {tolerance:.2g}"
    if subject.fresh().adaptive and difference > tolerance:
        # an adaptive solver may control its steps by an error norm over the whole batch (rk45 does, as
        # torchdiffeq and Song et al.): its samples then follow the batch within its own rtol/atol, by design
        return Check("batch-size invariance", None, f"adaptive, steps chosen per batch: {measured}")
    return Check("batch-size invariance", difference <= tolerance, measured)


def check_reuse(subject: Subject, nfe: int | None, other: int | None) -> Check:
    fresh = subject.draw(subject.fresh(), nfe, n=8).x
    reused = subject.fresh()
    first = subject.draw(reused, nfe, n=8).x
    subject.draw(reused, other, n=5)  # another budget and batch in between
    third = subject.draw(reused, nfe, n=8).x
    same = torch.equal(first, fresh) and torch.equal(third, fresh)
    worst = max((first - fresh).abs().max().item(), (third - fresh).abs().max().item())
    return Check("reuse", same, "3 calls of one instance, another budget between: "
                 + ("bitwise the samples of a fresh instance" if same else f"differ from a fresh one by {worst:.2g}"))


def check_order(subject: Subject, steps: Sequence[int] = ORDER_STEPS, n: int = 64) -> Check:
    solver = subject.fresh()
    if solver.stochastic or solver.adaptive:
        why = "stochastic: its samples follow no ODE trajectory" if solver.stochastic else "adaptive: no fixed steps"
        return Check("empirical order", None, why)
    model = SigmaRange(subject.model, sigma_max=ORDER_SIGMA_MAX)
    reference = reference_for(model, n, tolerance=1e-12)
    errors = []
    for count in steps:
        out = sample(model, solver, nfe=solver.nfe_for_steps(count), n=n, seed=0, dtype=torch.float64,
                     schedule="logsnr", warmup=False, plugins=subject.plugins)
        errors.append((out.x - reference).pow(2).mean().sqrt().item())
    slopes, fitted = pair_slopes(steps, errors), fitted_order(steps, errors)
    nominal = f", nominal {solver.nominal_order}" if solver.nominal_order != solver.order else ""
    measured = (f"slopes {' '.join(f'{s:.2f}' for s in slopes)} over {steps[0]}..{steps[-1]} steps, fitted "
                f"{fitted:.2f}; declared {solver.order}{nominal}")
    return Check("empirical order", slopes[-1] >= solver.order - ORDER_SLACK, measured)


def run_checks(solver: str, model: str | Any = "gmm2d", plugins: PluginManager | None = None,
               max_budget: int | None = None, order_steps: Sequence[int] | None = None, **options: Any) -> list[Check]:
    """Every check of ``solver`` (a registered name; ``options`` its options) on ``model``; a check that raises
    fails with the error as its measurement. Budgets go up to MAX_BUDGET, the order is fitted over ORDER_STEPS
    unless given."""
    max_budget = MAX_BUDGET if max_budget is None else max_budget
    order_steps = ORDER_STEPS if order_steps is None else order_steps
    model = load_model(model, plugins=plugins) if isinstance(model, str) else model
    subject = Subject(solver, options, model, plugins)
    instance = subject.fresh()  # an unknown name or option is the caller's error, not a failed check
    nfe = None if instance.adaptive else max(instance.min_nfe, 10)
    other = None if instance.adaptive else max(instance.min_nfe, 7)
    checks: list[tuple[str, Callable[[], Check]]] = [
        ("counted NFE = plan", lambda: check_nfe(subject, max_budget)),
        ("shape, dtype, finite", lambda: check_output(subject, nfe)),
        ("batch-size invariance", lambda: check_batches(subject, nfe)),
        ("reuse", lambda: check_reuse(subject, nfe, other)),
        ("empirical order", lambda: check_order(subject, order_steps)),
    ]
    results = []
    for name, run in checks:
        try:
            results.append(run())
        except Exception as error:  # the solver's error is the finding
            text = str(error).splitlines()[0] if str(error) else type(error).__name__
            results.append(Check(name, False, f"raised {type(error).__name__}: {text}"))
    return results


def plugins_for_check() -> PluginManager:
    return manager()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="samplerbench check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return command(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("solver", help="a registered solver, options after commas: deis,order=3,method=logrho")
    parser.add_argument("--model", default="gmm2d", help="an analytic model (default: gmm2d)")


def command(args: argparse.Namespace) -> int:
    name, options = parse_solver(args.solver)
    plugins = plugins_for_check()
    checks = run_checks(name, args.model, plugins, **options)  # an unknown solver or option: a BenchError
    print(f"samplerbench check {args.solver} on {args.model}")
    for check in checks:
        print(check.line())
    failed = sum(check.passed is False for check in checks)
    passed = sum(check.passed is True for check in checks)
    skipped = len(checks) - failed - passed
    print(f"{passed} passed, {failed} failed" + (f", {skipped} skipped" if skipped else ""))
    return 1 if failed else 0
