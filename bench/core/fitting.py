"""The fit step of learned schedules and solvers: what a fitter sees, the teacher it learns from, and the noise it
may use.

A learned schedule or solver registers its fitter beside itself::

    register(ld3, name="ld3", fit=fit_ld3)          # a schedule: ld3(steps, model, *, fitted, **options)
    register(BNS, name="bns", fit=fit_bns)          # a solver: BNS(**options).use_fit(tensors) before it samples

``fit(problem) -> dict[str, Tensor]`` gets a ``FitProblem``: the model, the base solver and its plan at the NFE
budget, the grid a learned solver runs on, the learned thing's own options (its teacher settings and fit seed among
them), the fitting noise and a teacher. A learned schedule returns ``{"sigmas": grid}``; the harness checks it
(steps + 1 finite, strictly decreasing sigmas from sigma_max, the last nonzero one sigma_min, then 0) and stores it.

Fitting never sees evaluation noise. An evaluation cell of seed s draws x_T from noise stream 0 and its per-step
noise from streams 1 + step (bench.core.noise); a fit draws from streams ``FIT_STREAM + k`` of its own
``fit_seed``, a domain no sampling run reaches (a run has fewer than 2**62 steps), and the harness refuses a
fit seed that is one of the cells' seeds. Everything is counted: the teacher's denoiser calls per fitting sample and
every sample-evaluation the fit made.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from bench.core.denoiser import Denoiser
from bench.core.noise import gaussian
from bench.core.solver import Plan, Solver
from bench.errors import BenchError

FIT_STREAM = 1 << 62  # fitting noise: streams FIT_STREAM + k of the fit seed; evaluation uses streams 0 .. steps
FIT_OPTIONS = ("fit_seed", "fit_n", "teacher_steps")  # every learned thing declares these options
Fitter = Callable[["FitProblem"], dict[str, Tensor]]


def fitting_noise(fit_seed: int, n: int, shape: tuple[int, ...], sigma_max: float, *, k: int = 0,
                  dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Tensor:
    """x_T of fitting sample 0 .. n - 1: sigma_max times stream FIT_STREAM + k of ``fit_seed``."""
    indices = torch.arange(n, device=device)
    return sigma_max * gaussian(fit_seed, indices, shape, stream=FIT_STREAM + k, dtype=dtype, device=device)


@dataclass
class FitProblem:
    """What a fitter sees. ``solver`` is the base solver (for a learned solver, the solver itself, whose options
    name its base), ``plan`` its plan at the budget, ``sigmas`` the cell's grid (a learned solver runs on it; for a
    learned schedule it is None), ``options`` the learned thing's options with every default written out."""

    model: Denoiser
    solver: Solver
    plan: Plan
    options: dict[str, Any]
    sigmas: Tensor | None = None
    conditioning: str = "none"  # as the cells: "none" (unconditional) or "balanced" (sample i gets class i mod C)
    dtype: torch.dtype = torch.float32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    teacher_nfe: int = 0  # teacher denoiser calls per fitting sample
    evaluations: int = 0  # every sample-evaluation of the denoiser the fit made (teacher included)
    notes: dict[str, Any] = field(default_factory=dict)  # what the fitter wants in the manifest (losses, ...)

    @property
    def steps(self) -> int:
        return self.plan.steps

    @property
    def n(self) -> int:
        return int(self.options["fit_n"])

    def noise(self, k: int = 0, n: int | None = None) -> Tensor:
        """Fitting x_T (stream FIT_STREAM + k of the fit seed); k = 0 is the teacher's, others are free draws."""
        return fitting_noise(int(self.options["fit_seed"]), n or self.n, tuple(self.model.shape),
                             self.model.sigma_max, k=k, dtype=self.dtype, device=self.device)

    def labels(self, n: int | None = None) -> Tensor | None:
        """Class of each fitting sample, conditioned as the cells are: None, or balanced (class i mod C)."""
        if self.conditioning == "none":
            return None
        return torch.arange(n or self.n, device=self.device) % self.model.num_classes

    def denoise(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        """D(x; sigma) for the fitting samples (labels bound), counted in ``evaluations``."""
        sigma = (sigma.to(dtype=x.dtype, device=x.device).expand(len(x)) if isinstance(sigma, Tensor)
                 else torch.full((len(x),), sigma, dtype=x.dtype, device=x.device))
        self.evaluations += len(x)
        return self.model(x, sigma, self.labels(len(x)))

    def run(self, x_T: Tensor, sigmas: Tensor, solver: Solver | None = None) -> Tensor:
        """The (base) solver's samples from x_T on ``sigmas`` (differentiable in x_T where the model is)."""
        solver = solver or self.solver
        return solver.sample(self.denoise, x_T, sigmas, self.plan)

    def teacher(self, x_T: Tensor, sigmas_out: Tensor | None = None) -> tuple[Tensor, list[Tensor]]:
        """The teacher from x_T: Heun (EDM's 2nd order) on the union of a karras grid of ``teacher_steps`` steps and
        ``sigmas_out`` (within [sigma_min, sigma_max]). Returns x0 = D(x(sigma_min); sigma_min), the common endpoint,
        and the states at ``sigmas_out``. Counts its calls per sample in ``teacher_nfe``."""
        model, steps = self.model, int(self.options["teacher_steps"])
        ramp = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
        rho = 7.0
        karras = (model.sigma_max ** (1 / rho) + ramp * (model.sigma_min ** (1 / rho) - model.sigma_max ** (1 / rho))) ** rho
        wanted = [] if sigmas_out is None else [float(s) for s in sigmas_out]
        grid = sorted(set(karras.tolist()) | set(wanted), reverse=True)
        states: dict[float, Tensor] = {}
        x, calls = x_T, 0
        with torch.no_grad():
            for sigma, sigma_next in zip(grid[:-1], grid[1:]):
                if sigma in wanted:
                    states[sigma] = x
                d = (x - self.denoise(x, sigma)) / sigma
                x_euler = x + (sigma_next - sigma) * d
                d_next = (x_euler - self.denoise(x_euler, sigma_next)) / sigma_next
                x = x + (sigma_next - sigma) * (d + d_next) / 2
                calls += 2
            states[grid[-1]] = x
            x0 = self.denoise(x, grid[-1])
        self.teacher_nfe += calls + 1
        return x0, [states[s] for s in wanted]


def check_grid(sigmas: Tensor, steps: int, sigma_min: float, sigma_max: float, what: str) -> Tensor:
    """A fitted grid as a schedule must be: steps + 1 finite float64 sigmas, strictly decreasing, from sigma_max,
    the last nonzero one sigma_min (both pinned to 1e-9 relative), then 0."""
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64).detach().cpu()
    ok = (sigmas.shape == (steps + 1,) and bool(torch.isfinite(sigmas).all()) and sigmas[-1] == 0
          and bool((sigmas[1:] < sigmas[:-1]).all())
          and math.isclose(float(sigmas[0]), sigma_max, rel_tol=1e-9)
          and math.isclose(float(sigmas[-2]), sigma_min, rel_tol=1e-9))
    if not ok:
        raise BenchError(f"{what} fitted the grid {sigmas.tolist()} for {steps} steps; a learned schedule must give "
                         f"{steps + 1} finite, strictly decreasing sigmas from sigma_max = {sigma_max} to "
                         f"sigma_min = {sigma_min}, then 0")
    return sigmas


def fit(fitter: Fitter, problem: FitProblem, what: str) -> dict[str, Tensor]:
    """Run a fitter and check what it returned: named tensors, finite, detached, on the CPU."""
    tensors = fitter(problem)
    if not isinstance(tensors, dict) or not all(isinstance(k, str) and isinstance(v, Tensor)
                                               for k, v in tensors.items()):
        raise BenchError(f"{what}'s fit returned {type(tensors).__name__}; a fit returns a dict of named tensors")
    out = {}
    for name, tensor in tensors.items():
        tensor = tensor.detach().cpu().contiguous()
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise BenchError(f"{what}'s fit returned non-finite values in {name!r}")
        out[name] = tensor
    return out


def grid_from_fractions(logits: Tensor, sigma_max: float, sigma_min: float) -> Tensor:
    """A grid from sigma_max to sigma_min (then 0) whose steps in log sigma are the softmax of ``logits``: every
    grid so made is strictly decreasing with both ends pinned, whatever the logits (LD3's parametrisation)."""
    fractions = torch.softmax(logits.to(torch.float64), dim=0)
    drop = torch.cat([fractions.new_zeros(1), torch.cumsum(fractions, 0)])
    log_sigmas = math.log(sigma_max) - drop * (math.log(sigma_max) - math.log(sigma_min))
    sigmas = log_sigmas.exp()
    sigmas = torch.cat([sigmas.new_full((1,), sigma_max), sigmas[1:-1], sigmas.new_full((1,), sigma_min)])
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def fractions_of(sigmas: Tensor) -> Tensor:
    """The logits ``grid_from_fractions`` maps back to ``sigmas`` (a grid ending with 0)."""
    log_sigmas = torch.as_tensor(sigmas, dtype=torch.float64)[:-1].log()
    steps = log_sigmas[:-1] - log_sigmas[1:]
    return (steps / steps.sum()).log()
