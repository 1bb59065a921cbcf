"""BNS: a bespoke non-stationary solver (Shaul et al., ICML 2024, "Bespoke Non-Stationary Solvers for Fast
Sampling of Diffusion and Flow Models"), whose coefficients are fitted to a model at one grid and budget.

Every step of a multistep solver on a fixed grid is linear in x_T and the denoiser outputs so far: the point where
the model is called next is

    x_(i+1) = c_i x_T + sum_(j <= i) W_ij D_j,        D_j = D(x_j; sigma_j),

with c and W set by the grid (that of DPM-Solver++ 2M, UniPC, iPNDM or Euler, whatever their names for h, r and
the phi functions). BNS learns c and W themselves: (steps - 1) + steps (steps - 1) / 2 numbers, 54 at 10 steps,
fewer than 200 up to 19 steps. The fit starts from the base solver's own coefficients, read off its step rule (the
rule applied to unit vectors gives them exactly, predictor-corrector pairs included), and minimises the mean squared
distance of the last call's x0 to the teacher's by Adam on the fitting samples. The grid is the cell's schedule;
the step to 0 is the common x0 = D(x_(steps-1); sigma_min).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from bench.core.fitting import FitProblem
from bench.core.options import SolverOptions, option
from bench.core.sampling import get_solver
from bench.core.solver import Denoise, Noise, Plan, Solver
from bench.core.steps import StepSolver
from bench.errors import BenchError
from bench.hookspecs import hookimpl

BASES = ("dpm-solver++", "unipc", "ipndm", "euler")
MAX_PARAMETERS = 200
FIT_SEED = 1_000_003  # any seed outside the cells' seeds; the harness refuses one that is among them


def parameter_count(steps: int) -> int:
    return (steps - 1) + steps * (steps - 1) // 2


def base_coefficients(base: StepSolver, sigmas: Tensor, plan: Plan) -> tuple[Tensor, Tensor]:
    """c [steps - 1] and W [steps - 1, steps - 1] (lower triangular) of ``base`` on ``sigmas``: its step rule run on
    unit vectors, x_T = e_0 and D_j = e_(j+1), gives each point's coefficients as its coordinates."""
    steps = plan.steps
    basis = torch.eye(steps, dtype=torch.float64)
    state, estimates = base.initial_state(basis[:1]), ()
    x_weight, weights = torch.zeros(steps - 1, dtype=torch.float64), torch.zeros(steps - 1, steps - 1,
                                                                                 dtype=torch.float64)
    sigma_list = sigmas.tolist()
    for i in range(steps - 1):
        x = base.point(state)
        estimates = (*estimates, base.estimate(x, basis[i + 1:i + 2], sigma_list[i]))[-base.history:]
        state = base.step(i, state, estimates, sigmas, plan.orders, None)
        point = base.point(state)[0]
        x_weight[i], weights[i, :i + 1] = point[0], point[1:i + 2]
    return x_weight, weights


def bns_sample(denoise: Denoise, x_T: Tensor, sigmas: list[float], x_weight: Tensor, weights: Tensor) -> Tensor:
    """The BNS loop: each point a learned combination of x_T and every denoiser output so far."""
    x, outputs = x_T, []
    for i, sigma in enumerate(sigmas[:-1]):
        denoised = denoise(x, sigma)
        if i == len(sigmas) - 2:  # the last call, at sigma_min: the common x0
            return denoised
        outputs.append(denoised)
        x = x_T * x_weight[i]
        for j, output in enumerate(outputs):
            x = x + weights[i][j] * output
    return x


class BNS(Solver):
    """Fitted coefficients over a base solver's (module docstring). ``use_fit`` gives it its coefficients."""

    @dataclass(frozen=True)
    class Options(SolverOptions):
        base: str = option("dpm-solver++", choices=BASES)
        fit_seed: int = FIT_SEED
        fit_n: int = 100
        teacher_steps: int = 64
        iterations: int = 150
        lr: float = 2e-3

    min_steps = 2
    fitted: dict[str, Tensor] | None = None

    @property
    def order(self) -> int:
        return 1  # fitted to one grid: it has no order of convergence as steps grow

    @property
    def order_note(self) -> str:
        return "its coefficients are fitted per budget and grid: it converges at no fixed order"

    def use_fit(self, tensors: dict[str, Tensor]) -> "BNS":
        fitted = BNS(**self.config.as_dict())
        fitted.name, fitted.fitted = getattr(self, "name", "bns"), tensors
        return fitted

    def sample(self, denoise: Denoise, x: Tensor, sigmas: Tensor, plan: Plan, noise: Noise | None = None) -> Tensor:
        if self.fitted is None:
            raise BenchError("solver 'bns' has no coefficients: fit it first (`samplerbench fit SUITE`)")
        x_weight, weights = self.fitted["x_weight"], self.fitted["weights"]
        if x_weight.shape != (plan.steps - 1,):
            raise BenchError(f"solver 'bns' was fitted for {len(x_weight) + 1} steps; this plan has {plan.steps}")
        grid = sigmas.tolist()
        if grid != self.fitted["sigmas"].tolist():
            raise BenchError(f"solver 'bns' was fitted on the grid {self.fitted['sigmas'].tolist()}; got {grid}")
        return bns_sample(denoise, x, grid, x_weight.tolist(), weights.tolist())


def fit_bns(problem: FitProblem) -> dict[str, Tensor]:
    options, plan, sigmas = problem.options, problem.plan, problem.sigmas
    if parameter_count(plan.steps) > MAX_PARAMETERS:
        raise BenchError(f"solver 'bns' at {plan.steps} steps would learn {parameter_count(plan.steps)} "
                         f"coefficients; it takes at most {MAX_PARAMETERS} (budgets up to 19)")
    base = get_solver(options["base"])
    if base.plan(plan.nfe).steps != plan.steps:
        raise BenchError(f"solver 'bns': base {base.describe()} plans {base.plan(plan.nfe).steps} steps at "
                         f"nfe={plan.nfe}, bns {plan.steps}")
    x_weight, weights = base_coefficients(base, sigmas, base.plan(plan.nfe))
    x_T = problem.noise()
    target, _ = problem.teacher(x_T)
    grid = sigmas.tolist()
    dtype = x_T.dtype
    mask = torch.tril(torch.ones_like(weights)).to(dtype)
    c = x_weight.to(dtype).clone().requires_grad_(True)
    w = weights.to(dtype).clone().requires_grad_(True)
    optimiser = torch.optim.Adam([c, w], lr=options["lr"])

    def error(c_: Tensor, w_: Tensor) -> Tensor:
        return ((bns_sample(problem.denoise, x_T, grid, c_, w_ * mask) - target) ** 2).flatten(1).mean(1).mean()

    with torch.no_grad():
        start = float(error(c, w))
    best = (start, c.detach().clone(), w.detach().clone())
    for _ in range(options["iterations"]):
        optimiser.zero_grad()
        loss = error(c, w)
        if loss.item() < best[0]:
            best = (loss.item(), c.detach().clone(), w.detach().clone())
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        final = float(error(c, w))
    if final < best[0]:
        best = (final, c.detach().clone(), w.detach().clone())
    problem.notes.update({"loss_base": start, "loss": best[0], "parameters": parameter_count(plan.steps)})
    return {"x_weight": best[1].to(torch.float64), "weights": (best[2] * mask).to(torch.float64),
            "sigmas": sigmas.to(torch.float64)}


@hookimpl
def register_solvers(register):
    register(BNS, name="bns", fit=fit_bns)
