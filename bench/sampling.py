"""bench.sample: draw n samples from a model with one solver at one NFE budget."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from bench.denoiser import CountingDenoiser, Denoiser
from bench.errors import BenchError, unknown_name
from bench.guidance import GUIDANCE_KINDS
from bench.noise import NoiseStream, gaussian
from bench.registry import PluginManager, manager
from bench.solver import Plan, Solver, build_solver
from bench.timing import Stopwatch

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class SampleOutput:
    x: Tensor  # samples [n, *shape]
    x_T: Tensor  # initial states sigma_max * eps [n, *shape]
    nfe: float  # denoiser calls per sample, as counted (an adaptive solver's: the mean over batches)
    model_evals: float  # network evaluations per sample (2 per NFE under classifier-free guidance)
    seconds: float  # sampling wall-clock, warm-up excluded
    plan: Plan
    sigmas: Tensor  # the grid, float64
    labels: Tensor | None
    stochastic: bool  # whether the solver drew per-step noise (its samples then follow no ODE trajectory)


def load_model(name: str, device: str | torch.device = "cpu", *, plugins: PluginManager | None = None,
               **options: Any) -> Denoiser:
    """A registered model by name, on ``device``."""
    loader = (plugins or manager()).get("model", name).obj
    try:
        return loader(device=device, **options)
    except TypeError as error:
        raise BenchError(f"model {name!r}: {error}") from None


def get_solver(name: str, plugins: PluginManager | None = None, **options: Any) -> Solver:
    registration = (plugins or manager()).get("solver", name)
    return build_solver(registration.obj, registration.name, options)


def make_sigmas(schedule: str, steps: int, model: Denoiser, plugins: PluginManager | None = None,
                **options: Any) -> Tensor:
    """The schedule's grid, checked: steps + 1 decreasing float64 sigmas from sigma_max ending with 0."""
    fn = (plugins or manager()).get("schedule", schedule).obj
    try:
        sigmas = torch.as_tensor(fn(steps, model, **options), dtype=torch.float64).cpu()
    except TypeError as error:
        raise BenchError(f"schedule {schedule!r}: {error}") from None
    if sigmas.shape != (steps + 1,) or sigmas[-1] != 0 or not bool((sigmas[1:] < sigmas[:-1]).all()):
        raise BenchError(f"schedule {schedule!r} returned {sigmas.tolist()} for {steps} steps; a schedule must give "
                         f"{steps + 1} strictly decreasing sigmas ending with 0")
    return sigmas


def check_conditioning(model: Denoiser, guidance: float | None, labels: Tensor | None, n: int) -> None:
    if model.num_classes is None:
        if guidance is not None:
            raise BenchError(f"guidance={guidance} given, but model {getattr(model, 'name', model)!r} is "
                             "unconditional (num_classes is None); drop guidance")
        if labels is not None:
            raise BenchError(f"labels given, but model {getattr(model, 'name', model)!r} is unconditional; "
                             "drop labels")
        return
    if labels is not None:
        if labels.shape != (n,):
            raise BenchError(f"labels must have shape [{n}] (one per sample); got {list(labels.shape)}")
        bad = labels[(labels < 0) | (labels >= model.num_classes)]
        if len(bad):
            raise BenchError(f"label {int(bad[0])} is out of range: model has classes 0..{model.num_classes - 1}")
    if guidance is not None and labels is None:
        raise BenchError("guidance needs labels: classifier-free guidance steers towards a class")


def model_device(model: Denoiser) -> torch.device:
    if isinstance(model, torch.nn.Module):
        for tensor in (*model.parameters(), *model.buffers()):
            return tensor.device
    return torch.device("cpu")


def sample(model: Denoiser | str, solver: str | Solver, *, nfe: int | None = None, n: int, seed: int = 0,
           schedule: str = "karras", dtype: torch.dtype | str = torch.float32, guidance: float | None = None,
           labels: Tensor | None = None, guidance_type: str = "classifier-free", batch_size: int | None = None,
           device: str | torch.device | None = None, offset: int = 0,
           schedule_options: dict[str, Any] | None = None, warmup: bool = True,
           plugins: PluginManager | None = None, **solver_options: Any) -> SampleOutput:
    """Sample ``n`` points with ``solver`` under an NFE budget; solver options come as keywords.

    An adaptive solver (rk45) takes no budget: its options rtol/atol set its accuracy and its NFE is counted.
    ``guidance`` is the scale w of ``guidance_type`` ("classifier-free", or "classifier" for models that know
    their noisy-class posterior); see bench.guidance for the conventions.

    Sample i of seed s starts from the same x_T (and, for stochastic solvers, sees the same per-step noise)
    whatever n, batch_size or device: noise is a function of (seed, i) alone. ``offset`` makes this call draw
    samples offset .. offset + n - 1 (a shard of a larger cell; ``labels`` then hold the shard's n labels).
    """
    if isinstance(model, str):
        model = load_model(model, device=device or "cpu", plugins=plugins)
    device = torch.device(device) if device is not None else model_device(model)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise BenchError(f"unknown dtype {dtype!r} (known: {', '.join(DTYPES)})")
        dtype = DTYPES[dtype]
    if isinstance(solver, str):
        solver = get_solver(solver, plugins, **solver_options)
    elif solver_options:
        raise BenchError("solver options go to the solver's constructor when the solver is given as an instance")
    if n < 1:
        raise BenchError(f"n must be >= 1; got {n}")
    check_conditioning(model, guidance, labels, n)

    if solver.adaptive:
        plan = solver.plan(nfe)
        sigmas = torch.tensor([model.sigma_max, model.sigma_min, 0.0], dtype=torch.float64)
    else:
        if nfe is None:
            raise BenchError(f"solver {solver.describe()} needs an NFE budget (nfe=...)")
        plan = solver.plan(nfe)
        sigmas = make_sigmas(schedule, plan.steps, model, plugins, **(schedule_options or {}))
    if guidance_type not in GUIDANCE_KINDS:
        raise unknown_name("guidance type", guidance_type, GUIDANCE_KINDS)
    try:
        network = GUIDANCE_KINDS[guidance_type](model, guidance) if guidance else model  # w = 0: plain conditional
    except ValueError as error:
        raise BenchError(str(error)) from None
    batch_size = batch_size or n
    if warmup:  # first-call costs (allocator, kernel selection) stay out of the timing
        positions = torch.arange(min(n, 8))
        _run_batch(network, solver, plan, sigmas, seed, offset + positions, _take(labels, positions), dtype, device)

    stopwatch = Stopwatch(device)
    samples, initial_states, counts = [], [], []
    for start in range(0, n, batch_size):
        positions = torch.arange(start, min(start + batch_size, n))
        x, x_T, counted = _run_batch(network, solver, plan, sigmas, seed, offset + positions, _take(labels, positions),
                                     dtype, device, stopwatch)
        samples.append(x)
        initial_states.append(x_T)
        counts.append(counted)
    # a fixed-step solver makes the same calls for every batch; an adaptive one's vary with the batch
    nfe_counted = sum(count.nfe for count in counts) / len(counts)
    evals_counted = sum(count.model_evals for count in counts) / len(counts)
    if nfe_counted.is_integer():
        nfe_counted, evals_counted = int(nfe_counted), int(evals_counted)
    return SampleOutput(x=torch.cat(samples), x_T=torch.cat(initial_states), nfe=nfe_counted,
                        model_evals=evals_counted, seconds=stopwatch.seconds(),
                        plan=plan, sigmas=sigmas, labels=labels,
                        stochastic=solver.stochastic)


def _take(labels: Tensor | None, positions: Tensor) -> Tensor | None:
    return labels[positions] if labels is not None else None


def _run_batch(network, solver: Solver, plan: Plan, sigmas: Tensor, seed: int, indices: Tensor,
               labels: Tensor | None, dtype: torch.dtype, device: torch.device,
               stopwatch: Stopwatch | None = None) -> tuple[Tensor, Tensor, CountingDenoiser]:
    """One batch: the samples with global ``indices`` (their noise) and ``labels`` (their classes)."""
    shape = tuple(network.shape)
    x_T = (gaussian(seed, indices, shape, dtype=torch.float64, device=device) * float(sigmas[0])).to(dtype)
    cond = labels.to(device) if labels is not None else None
    denoise = CountingDenoiser(network, cond)
    noise = NoiseStream(seed, indices, shape, dtype, device) if solver.stochastic else None
    with torch.inference_mode():
        if stopwatch is None:
            x = solver.sample(denoise, x_T, sigmas, plan, noise)
        else:
            with stopwatch:
                x = solver.sample(denoise, x_T, sigmas, plan, noise)
    return x, x_T, denoise
