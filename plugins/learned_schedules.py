"""Learned schedules: grids fitted to a model, a base solver and an NFE budget (bench.core.fitting).

Every grid keeps sigma_max (which fixes x_T) and sigma_min (the point of the last call) and learns the points
between; the step to 0 is the common x0 = D(x; sigma_min). A grid is fitted for one base solver at one budget and
reused only by cells of that solver, options and budget (the fit key says so).

- ``ld3`` (Tong et al., ICLR 2025, "Learning to Discretize Denoising Diffusion ODEs"): the grid is a softmax over
  its steps in log sigma, fitted by gradient descent so that the base solver from x_T' lands on the teacher's x0
  from x_T, where x_T' may move within a ball of radius ``radius * sigma_max * sqrt(dim)`` around x_T (soft teacher
  forcing: the student is asked to reach the teacher's sample from somewhere near its noise, not exactly from it).
  The base solver's coefficients are computed from sigmas as floats, so the gradient in the grid is a central
  difference (a few parameters: 2 (steps - 1) runs); x_T' follows its autograd gradient. The loss has local minima,
  so it starts from karras, logsnr and time-uniform and keeps the grid of least trajectory error to the teacher on
  the fitting samples (the starting grids themselves included: a fit never does worse there than its start).
- ``gits`` (Chen et al., ICML 2024, "On the Trajectory Regularity of ODE-based Diffusion Sampling"): dynamic
  programming over a fine teacher grid. The cost of a step from fine point i to j is the base solver's own local
  error there: its step rule from the teacher's state at i, with the denoiser outputs the teacher gives at its
  points, against the teacher's state at j. For a multistep solver the step also reads the estimate at the previous
  chosen point p, so the program runs over pairs (p, i) (its history is cut to two points); solvers whose state is
  more than x (UniPC) are costed by their first step. The k-th step's cost is weighted by coeff**k (the GITS
  authors' code sweeps coeff in 0.8..1.2: above 1 it weighs the late steps, whose errors the flow does not damp,
  more). No gradients; the teacher's calls are the whole cost.
- ``ays`` (Sabour et al., 2024, "Align Your Steps"): minimises the KLUB, the bound on the KL divergence between the
  true reverse SDE and one whose denoiser is frozen over each step, sum_i int_{sigma_(i+1)}^{sigma_i}
  E ||D(x0 + t eps; t) - D(x0 + sigma_i eps; sigma_i)||^2 / t^3 dt, by iterative refinement: each interior point in
  turn moves to the point of a fine log grid between its neighbours that minimises its two intervals' KLUB, until
  none moves. x0 are teacher samples. The KLUB does not involve the base solver: a grid is still fitted per cell key.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from bench.core.fitting import FitProblem, fractions_of, grid_from_fractions
from bench.core.sampling import make_sigmas
from bench.core.steps import StepSolver
from bench.errors import BenchError
from bench.hookspecs import hookimpl

FIT_SEED = 1_000_003  # any seed outside the cells' seeds; the harness refuses one that is among them
STARTS = ("karras", "logsnr", "time-uniform")


def ld3(steps: int, model, *, fitted: dict[str, Tensor], fit_seed: int = FIT_SEED, fit_n: int = 100,
        teacher_steps: int = 64, iterations: int = 30, radius: float = 0.05, lr: float = 0.1) -> Tensor:
    """LD3's grid for the cell's base solver and budget (module docstring)."""
    return fitted["sigmas"]


def gits(steps: int, model, *, fitted: dict[str, Tensor], fit_seed: int = FIT_SEED, fit_n: int = 100,
         teacher_steps: int = 64, fine_steps: int = 40, coeff: float = 1.0) -> Tensor:
    """GITS's grid for the cell's base solver and budget (module docstring)."""
    return fitted["sigmas"]


def ays(steps: int, model, *, fitted: dict[str, Tensor], fit_seed: int = FIT_SEED, fit_n: int = 100,
        teacher_steps: int = 64, fine_steps: int = 100, rounds: int = 20) -> Tensor:
    """Align Your Steps' grid for the budget (module docstring)."""
    return fitted["sigmas"]


def _need_steps(problem: FitProblem, name: str) -> None:
    if problem.steps < 2:
        raise BenchError(f"schedule {name!r} learns the points between sigma_max and sigma_min: it needs a plan of "
                         f"at least 2 steps; the budget gives {problem.steps}")


def _trajectory_error(x: Tensor, target: Tensor) -> Tensor:
    """Mean over samples of the squared per-sample RMSE."""
    return ((x - target) ** 2).flatten(1).mean(1).mean()


def fit_ld3(problem: FitProblem) -> dict[str, Tensor]:
    _need_steps(problem, "ld3")
    options, model = problem.options, problem.model
    x_T = problem.noise()
    target, _ = problem.teacher(x_T)
    ball = options["radius"] * model.sigma_max * math.sqrt(x_T[0].numel())

    def loss(logits: Tensor, start: Tensor) -> float:
        with torch.no_grad():
            return float(_trajectory_error(problem.run(start, grid_from_fractions(logits, model.sigma_max,
                                                                                  model.sigma_min)), target))

    candidates: dict[str, tuple[float, Tensor]] = {}
    for name in STARTS:
        start_grid = make_sigmas(name, problem.steps, model)
        logits = fractions_of(start_grid)
        candidates[name] = (loss(logits, x_T), start_grid)
        delta = torch.zeros_like(x_T)
        moment, second = torch.zeros_like(logits), torch.zeros_like(logits)
        for iteration in range(1, options["iterations"] + 1):
            # x_T': one normalised gradient step within the ball (soft teacher forcing)
            shifted = (x_T + delta).requires_grad_(True)
            grid = grid_from_fractions(logits, model.sigma_max, model.sigma_min)
            error = _trajectory_error(problem.run(shifted, grid), target)
            (gradient,) = torch.autograd.grad(error, shifted)
            with torch.no_grad():
                norms = gradient.flatten(1).norm(dim=1).clamp_min(1e-30).view(-1, *[1] * (x_T.dim() - 1))
                delta = delta - 0.5 * ball * gradient / norms
                lengths = delta.flatten(1).norm(dim=1).view_as(norms)
                delta = delta * torch.clamp(ball / lengths.clamp_min(1e-30), max=1.0)
            # the grid: Adam on the logits with a central-difference gradient
            start = x_T + delta
            step = 1e-3
            grad = torch.zeros_like(logits)
            for k in range(len(logits)):
                bump = torch.zeros_like(logits)
                bump[k] = step
                grad[k] = (loss(logits + bump, start) - loss(logits - bump, start)) / (2 * step)
            moment = 0.9 * moment + 0.1 * grad
            second = 0.999 * second + 0.001 * grad ** 2
            corrected = moment / (1 - 0.9 ** iteration), second / (1 - 0.999 ** iteration)
            logits = logits - options["lr"] * corrected[0] / (corrected[1].sqrt() + 1e-12)
        fitted_grid = grid_from_fractions(logits, model.sigma_max, model.sigma_min)
        candidates[f"ld3 from {name}"] = (loss(logits, x_T), fitted_grid)
    best = min(candidates, key=lambda name: candidates[name][0])
    problem.notes.update({"losses": {name: value for name, (value, _) in candidates.items()}, "chosen": best})
    return {"sigmas": candidates[best][1]}


def _step_rule(solver, points: list[tuple[Tensor, Tensor, float]], sigma_next: float, orders: tuple[int, ...]):
    """The base solver's step from the newest of ``points`` (x, D, sigma; oldest first) to sigma_next."""
    estimates = tuple(solver.estimate(x, denoised, sigma) for x, denoised, sigma in points)
    sigmas = torch.tensor([sigma for _, _, sigma in points] + [sigma_next, 0.0], dtype=torch.float64)
    state = solver.step(len(points) - 1, solver.initial_state(points[-1][0]), estimates, sigmas, orders, None)
    return solver.point(state)


def fit_gits(problem: FitProblem) -> dict[str, Tensor]:
    _need_steps(problem, "gits")
    solver, model, steps = problem.solver, problem.model, problem.steps
    if not isinstance(solver, StepSolver):
        raise BenchError(f"schedule 'gits' costs steps with the base solver's step rule; solver "
                         f"{solver.describe()} has none (step solvers: euler, ddim, ipndm, deis, unipc, dpm-solver++)")
    fine_steps = problem.options["fine_steps"]
    if fine_steps < steps:
        raise BenchError(f"schedule 'gits': fine_steps ({fine_steps}) must be at least the plan's steps ({steps})")
    fine = make_sigmas("karras", fine_steps + 1, model)[:-1].tolist()  # fine_steps + 1 points, sigma_max..sigma_min
    fine[0], fine[-1] = model.sigma_max, model.sigma_min  # pinned exactly (karras' ends carry rounding)
    x_T = problem.noise()
    _, states = problem.teacher(x_T, torch.tensor(fine, dtype=torch.float64))
    with torch.no_grad():
        denoised = [problem.denoise(x, sigma) for x, sigma in zip(states, fine)]
    problem.teacher_nfe += len(fine)
    points = list(zip(states, denoised, fine))
    size, last = len(fine), len(fine) - 1
    pairs = solver.history >= 2 and isinstance(solver.initial_state(x_T), Tensor)
    orders = solver.step_orders(8)[:2] + (1, 1)

    def cost(history: tuple[int, ...], j: int) -> float:
        with torch.no_grad():
            x_next = _step_rule(solver, [points[k] for k in history], fine[j], orders)
            return float((x_next - states[j]).flatten(1).norm(dim=1).mean())

    inf = math.inf
    # best[(p, i)]: least cost of reaching fine point i in the current number of transitions, the previous at p
    best: dict[tuple[int, int], float] = {(-1, j): cost((0,), j) for j in range(1, size)}
    best = {(0 if pairs else -1, j): value for (_, j), value in best.items()}
    back: list[dict[tuple[int, int], tuple[int, int]]] = []
    memo: dict[tuple[int, ...], float] = {}
    for level in range(1, steps - 1):
        weight = problem.options["coeff"] ** level
        nxt: dict[tuple[int, int], float] = {}
        parents: dict[tuple[int, int], tuple[int, int]] = {}
        for (p, i), value in best.items():
            for j in range(i + 1, size):
                history = (p, i) if pairs else (i,)
                key = (*history, j)
                if key not in memo:
                    memo[key] = cost(history, j)
                state = (i if pairs else -1, j)
                total = value + weight * memo[key]
                if total < nxt.get(state, inf):
                    nxt[state], parents[state] = total, (p, i)
        best = nxt
        back.append(parents)
    end = min((state for state in best if state[1] == last), key=best.__getitem__)
    path = [end[1]]
    state = end
    for parents in reversed(back):
        state = parents[state]
        path.append(state[1])
    path.append(0)
    chosen = [fine[k] for k in reversed(path)]
    problem.notes.update({"cost": best[end], "fine_points": size, "pairs": pairs})
    return {"sigmas": torch.tensor(chosen + [0.0], dtype=torch.float64)}


def fit_ays(problem: FitProblem) -> dict[str, Tensor]:
    _need_steps(problem, "ays")
    model, steps, options = problem.model, problem.steps, problem.options
    data, _ = problem.teacher(problem.noise(0))  # x0 ~ the model's distribution, by the teacher
    eps = problem.noise(1) / model.sigma_max
    fine = torch.logspace(math.log10(model.sigma_max), math.log10(model.sigma_min), options["fine_steps"] + 1,
                          dtype=torch.float64)  # decreasing
    log_t = fine.log()
    with torch.no_grad():
        denoised = torch.stack([problem.denoise(data + float(t) * eps, float(t)).flatten(1) for t in fine])
    # gap[u][g]: E ||D_g - D_u||^2 / t_g^2 for g >= u (t_g <= t_u): the KLUB's integrand in log t
    gap = torch.stack([((denoised - denoised[u]) ** 2).sum(-1).mean(-1) / fine.to(denoised.dtype) ** 2
                       for u in range(len(fine))]).to(torch.float64)
    widths = (log_t[:-1] - log_t[1:])  # > 0

    def klub(u: int, low: int) -> float:
        """The KLUB of the step from fine point u down to fine point low > u (trapezoid in log t)."""
        values = gap[u, u:low + 1]
        return float(((values[:-1] + values[1:]) / 2 * widths[u:low]).sum())

    start = make_sigmas("karras", steps, model)[:-1]
    index = [int((log_t - math.log(float(s))).abs().argmin()) for s in start]
    for k in range(1, len(index)):  # distinct fine points, in order, ends pinned
        index[k] = max(index[k], index[k - 1] + 1)
    index[-1] = len(fine) - 1
    for k in range(len(index) - 2, 0, -1):
        index[k] = min(index[k], index[k + 1] - 1)
    total = sum(klub(a, b) for a, b in zip(index[:-1], index[1:]))
    rounds = 0
    for rounds in range(1, options["rounds"] + 1):
        moved = False
        for k in range(1, len(index) - 1):
            lo, hi = index[k - 1], index[k + 1]
            choice = min(range(lo + 1, hi), key=lambda c: klub(lo, c) + klub(c, hi))
            if choice != index[k]:
                index[k], moved = choice, True
        if not moved:
            break
    problem.notes.update({"klub_start": total, "klub": sum(klub(a, b) for a, b in zip(index[:-1], index[1:])),
                          "rounds": rounds})
    sigmas = fine[index]
    sigmas[0], sigmas[-1] = model.sigma_max, model.sigma_min
    return {"sigmas": torch.cat([sigmas, sigmas.new_zeros(1)])}


@hookimpl
def register_schedules(register):
    register(ld3, name="ld3", fit=fit_ld3)
    register(gits, name="gits", fit=fit_gits)
    register(ays, name="ays", fit=fit_ays)
