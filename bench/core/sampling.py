"""bench.sample: draw n samples from a model with one solver at one NFE budget."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from bench.core import memory
from bench.core.denoiser import CountingDenoiser, Denoiser
from bench.errors import BenchError, unknown_name
from bench.core.guidance import GUIDANCE_KINDS
from bench.core.noise import NoiseStream, gaussian
from bench.core.parallel import ParallelSolver
from bench.registry import PluginManager, manager
from bench.core.solver import Plan, Solver, build_solver
from bench.core.timing import Stopwatch

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Conditioning, the same default for bench.sample and suites: "none" samples unconditionally (the model's own
# D(x; sigma)); "balanced" conditions sample i on class i mod C (conditional models only).
LABEL_CHOICES = ("none", "balanced")
PRECISIONS = ("fp32", "tf32", "bf16", "fp16")


def agreement_tolerance(dtype: torch.dtype, sigma_max: float) -> float:
    """How far the same samples may lie apart when drawn in other batches, on another device or by another executor.

    x_T and the per-step noise are bit for bit the same (bench.core.noise); the samples are not, because the
    denoiser's batched arithmetic (matrix-product blocking, reduction order) rounds differently for another batch
    size or device, and the solver carries that rounding along its steps. 64 machine epsilons of the largest scale
    a trajectory passes through (sigma_max) bound it with a wide margin: the worst seen, a stochastic solver in
    float32 at sigma_max = 80, was 3.4e-5 (4 epsilons of 80).
    """
    return 64 * torch.finfo(dtype).eps * max(1.0, sigma_max)  # of the network's arithmetic; the solver's state keeps its dtype


@dataclass
class SampleOutput:
    x: Tensor  # samples [n, *shape]
    x_T: Tensor  # initial states sigma_max * eps [n, *shape]
    nfe: float  # denoiser evaluations per sample, as counted (an adaptive solver's: the mean over batches)
    model_evals: float  # network evaluations per sample (2 per NFE under classifier-free guidance)
    seconds: float  # sampling wall-clock, warm-up excluded
    plan: Plan
    sigmas: Tensor  # the grid, float64
    labels: Tensor | None  # the class of each sample, or None: unconditional
    stochastic: bool  # whether the solver drew per-step noise (its samples then follow no ODE trajectory)
    batch_size: int = 0  # the batch actually used (the largest within the memory budget, when none was given)
    peak_memory_bytes: int | None = None  # peak device memory while sampling (CUDA only)
    rounds: float = 0  # denoiser calls one after another per batch (= nfe but for parallel samplers), as counted


def load_model(name: str, device: str | torch.device = "cpu", *, plugins: PluginManager | None = None,
               **options: Any) -> Denoiser:
    """A registered model by name, on ``device``."""
    loader = (plugins or manager()).get("model", name).obj
    try:
        return loader(device=device, **options)
    except (TypeError, ValueError) as error:  # an option the loader does not take, or a value it refuses
        raise BenchError(f"model {name!r}: {error}") from None


def get_solver(name: str, plugins: PluginManager | None = None, **options: Any) -> Solver:
    registration = (plugins or manager()).get("solver", name)
    return build_solver(registration.obj, registration.name, options)


def make_sigmas(schedule: str, steps: int, model: Denoiser, plugins: PluginManager | None = None,
                fitted: dict[str, Tensor] | None = None, **options: Any) -> Tensor:
    """The schedule's grid, checked: steps + 1 decreasing float64 sigmas from sigma_max ending with 0. A learned
    schedule (registered with a ``fit``) reads its grid from ``fitted``, the tensors its fit stored."""
    registration = (plugins or manager()).get("schedule", schedule)
    fn = registration.obj
    if "fit" in registration.extras:
        if fitted is None:
            raise BenchError(f"schedule {schedule!r} is learned: fit it first (`samplerbench fit SUITE`, or a suite "
                             "run, which fits before it samples) and pass its tensors as fitted=")
        options = {**options, "fitted": fitted}
    try:
        sigmas = torch.as_tensor(fn(steps, model, **options), dtype=torch.float64).cpu()
    except (TypeError, ValueError, ArithmeticError) as error:  # options it does not take, or values it cannot use
        raise BenchError(f"schedule {schedule!r} with {options or 'no options'}: {type(error).__name__}: "
                         f"{error}") from None
    if (sigmas.shape != (steps + 1,) or sigmas[-1] != 0 or not bool((sigmas[1:] < sigmas[:-1]).all())
            or not bool(torch.isfinite(sigmas).all())):
        raise BenchError(f"schedule {schedule!r} returned {sigmas.tolist()} for {steps} steps; a schedule must give "
                         f"{steps + 1} finite, strictly decreasing sigmas ending with 0")
    return sigmas


def resolve_labels(model: Denoiser, labels: Tensor | str | None, n: int, offset: int = 0) -> Tensor | None:
    """The class of each of the samples offset .. offset + n - 1: given, balanced (class i mod C), or none."""
    if labels is None or isinstance(labels, Tensor):
        return labels
    if labels not in LABEL_CHOICES:
        raise unknown_name("labels choice", str(labels), LABEL_CHOICES)
    if labels == "none":
        return None
    if model.num_classes is None:
        raise BenchError(f"labels={labels!r} given, but model {getattr(model, 'name', model)!r} is unconditional; "
                         "drop labels")
    return (offset + torch.arange(n)) % model.num_classes


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
        raise BenchError("guidance needs labels (labels=\"balanced\" or a tensor of classes): guidance steers "
                         "towards a class")


def model_device(model: Denoiser) -> torch.device:
    if isinstance(model, torch.nn.Module):
        for tensor in (*model.parameters(), *model.buffers()):
            return tensor.device
    return torch.device("cpu")


def sample(model: Denoiser | str, solver: str | Solver, *, nfe: int | None = None, n: int, seed: int = 0,
           schedule: str = "karras", dtype: torch.dtype | str = torch.float32, guidance: float | None = None,
           labels: Tensor | str | None = "none", guidance_type: str = "classifier-free", batch_size: int | None = None,
           device: str | torch.device | None = None, offset: int = 0, precision: str = "fp32",
           cuda_graph: bool = False, schedule_options: dict[str, Any] | None = None, warmup: bool = True,
           memory_budget: int | str | None = None, plugins: PluginManager | None = None,
           fitted: dict[str, Tensor] | None = None,
           **solver_options: Any) -> SampleOutput:
    """Sample ``n`` points with ``solver`` under an NFE budget; solver options come as keywords.

    An adaptive solver (rk45) takes no budget: its options rtol/atol set its accuracy and its NFE is counted.
    ``guidance`` is the scale w of ``guidance_type`` ("classifier-free", or "classifier" for models that know
    their noisy-class posterior); see bench.core.guidance for the conventions.

    Sample i of seed s starts from the same x_T (and, for stochastic solvers, sees the same per-step noise)
    whatever n, batch_size or device: noise is a function of (seed, i) alone. ``offset`` makes this call draw
    samples offset .. offset + n - 1 (a shard of a larger cell; ``labels`` then hold the shard's n labels).

    ``labels``: "none" (the default, as in suites: unconditional), "balanced" (sample i gets class i mod C), or a
    tensor of n classes.

    The samples are checked before they are returned: a solver that returns the wrong shape or dtype, or calls the
    denoiser more often than its plan declared, raises a BenchError naming what it did and what was declared.

    ``precision`` sets the network's arithmetic ("fp32", "tf32", "bf16" or "fp16" under autocast) while the
    solver's state stays in ``dtype``. ``cuda_graph`` captures a fixed-step solver's whole loop for one batch shape
    and replays it per batch (identical samples, no launch overhead).

    Memory (bench.core.memory): ``memory_budget`` (bytes or a size such as "4GiB"; default: the environment
    variable SAMPLERBENCH_MEMORY_BUDGET, else a share of the device's available memory) bounds the samples kept
    (x and x_T of all n) and one batch's working set. A run whose kept samples alone exceed it is refused before
    any denoiser call. Without a ``batch_size``, the batch is the largest whose working set, measured on an
    untimed probe of 64 samples (which is also the warm-up, so it runs even with ``warmup=False``), fits beside
    the kept samples (n <= 64: one batch of n, no probe); on CUDA a batch that still runs out of memory is halved
    until it fits. A given ``batch_size`` is used as given.

    ``fitted``: the tensors of the fit of a learned schedule or solver (bench.core.fitting), which it samples with.
    """
    if isinstance(model, str):
        model = load_model(model, device=device or "cpu", plugins=plugins)
    device = torch.device(device) if device is not None else model_device(model)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise BenchError(f"unknown dtype {dtype!r} (known: {', '.join(DTYPES)})")
        dtype = DTYPES[dtype]
    if isinstance(solver, str):
        learned = "fit" in (plugins or manager()).get("solver", solver).extras
        solver = get_solver(solver, plugins, **solver_options)
        if learned:
            if fitted is None:
                raise BenchError(f"solver {solver.describe()} is learned: fit it first (`samplerbench fit SUITE`, or "
                                 "a suite run, which fits before it samples) and pass its tensors as fitted=")
            solver = solver.use_fit(fitted)
    elif solver_options:
        raise BenchError("solver options go to the solver's constructor when the solver is given as an instance")
    if n < 1:
        raise BenchError(f"n must be >= 1; got {n}")
    budget = memory.memory_budget(device, memory_budget)
    labelled = isinstance(labels, Tensor) or labels == "balanced"
    what = f"model {getattr(model, 'name', type(model).__name__)!r} with solver {solver.describe()}"
    kept = memory.refuse_unless_kept_fit(what, n, model.shape, dtype, budget, labelled)
    labels = resolve_labels(model, labels, n, offset)
    check_conditioning(model, guidance, labels, n)

    if solver.adaptive:
        plan = solver.plan(nfe)
        sigmas = torch.tensor([model.sigma_max, model.sigma_min, 0.0], dtype=torch.float64)
    else:
        if nfe is None:
            raise BenchError(f"solver {solver.describe()} needs an NFE budget (nfe=...)")
        plan = solver.plan(nfe)
        sigmas = make_sigmas(schedule, plan.steps, model, plugins, fitted, **(schedule_options or {}))
    if guidance_type not in GUIDANCE_KINDS:
        raise unknown_name("guidance type", guidance_type, GUIDANCE_KINDS)
    network = solver.network(model, plan, sigmas)  # the model, or a distilled solver's own student of it
    try:
        network = GUIDANCE_KINDS[guidance_type](network, guidance) if guidance else network  # w = 0: conditional
    except ValueError as error:
        raise BenchError(str(error)) from None
    if precision not in PRECISIONS:
        raise unknown_name("precision", precision, PRECISIONS)
    if cuda_graph and (device.type != "cuda" or solver.adaptive or isinstance(solver, ParallelSolver)):
        raise BenchError("cuda_graph needs a CUDA device and a fixed-step, sequential solver (a parallel sampler's "
                         f"rounds depend on its convergence); got device {device.type!r}, solver {solver.describe()}")
    run = _Run(network, solver, plan, sigmas, seed, offset, labels, dtype, device, precision, cuda_graph)
    if batch_size is not None:
        return run.sample(n, batch_size, warmup)
    if n <= memory.PROBE_SAMPLES:  # the probe would be the whole run: run it once, as asked (warm-up or not)
        return run.sample(n, n, warmup)
    batch_size = run.batch_within(n, budget, kept)
    while True:
        try:
            return run.sample(n, batch_size, warmup=False)  # the probe warmed up
        except torch.cuda.OutOfMemoryError:  # the last resort, when the measured estimate fell short
            if batch_size == 1:
                raise
            batch_size = (batch_size + 1) // 2
            torch.cuda.empty_cache()


@contextmanager
def numerics(precision: str, device: torch.device) -> Iterator[None]:
    """tf32: TensorFloat-32 tensor cores for float32 matrix products and convolutions; bf16 / fp16: the network
    under autocast. Elementwise solver arithmetic is not autocast, so the state stays in its own dtype."""
    if precision in ("bf16", "fp16"):
        with torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16):
            yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@dataclass
class _Run:
    """Everything about a sampling run but the batching: what one batch needs to be drawn."""

    network: Any
    solver: Solver
    plan: Plan
    sigmas: Tensor
    seed: int
    offset: int
    labels: Tensor | None
    dtype: torch.dtype
    device: torch.device
    precision: str
    cuda_graph: bool

    def sample(self, n: int, batch_size: int, warmup: bool) -> SampleOutput:
        graph = _GraphedBatch(self, min(batch_size, n)) if self.cuda_graph else None  # captured after a warm-up
        if warmup and graph is None:  # first-call costs (allocator, kernel selection) stay out of the timing
            self.batch(torch.arange(min(n, 8)))
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        stopwatch = Stopwatch(self.device)
        samples = initial_states = None  # all n, filled batch by batch: the kept bytes the budget counts, once
        counts = []
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            positions = torch.arange(start, stop)
            x, x_T, counted = graph(positions, stopwatch) if graph else self.batch(positions, stopwatch)
            self.check(x, x_T, counted[0], counted[2])
            if samples is None:
                samples, initial_states = x.new_empty((n, *x.shape[1:])), x_T.new_empty((n, *x_T.shape[1:]))
            samples[start:stop], initial_states[start:stop] = x, x_T
            del x, x_T  # the next batch's working set takes their place
            counts.append(counted)
        # a fixed-step solver makes the same calls for every batch; an adaptive one's vary with the batch
        nfe = sum(count[0] for count in counts) / len(counts)
        model_evals = sum(count[1] for count in counts) / len(counts)
        rounds = sum(count[2] for count in counts) / len(counts)  # a parallel sampler's vary with the batch
        nfe, model_evals, rounds = (int(value) if value.is_integer() else value for value in (nfe, model_evals, rounds))
        peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
        return SampleOutput(x=samples, x_T=initial_states, nfe=nfe, model_evals=model_evals,
                            seconds=stopwatch.seconds(), plan=self.plan, sigmas=self.sigmas, labels=self.labels,
                            stochastic=self.solver.stochastic, batch_size=batch_size, peak_memory_bytes=peak,
                            rounds=rounds)

    def batch_within(self, n: int, budget: memory.Budget, kept: int) -> int:
        """The largest batch whose working set fits in the budget beside the ``kept`` samples, measured on an
        untimed probe batch that is also the run's warm-up (bench.core.memory)."""
        probe = torch.arange(min(n, memory.PROBE_SAMPLES))
        _, peak = memory.measure_peak(lambda: self.batch(probe), self.device)
        return memory.probed_batch(n, budget, kept, peak, len(probe), f"sampling with {self.solver.describe()}")

    def check(self, x: Tensor, x_T: Tensor, nfe: int, rounds: int) -> None:
        """What the solver returned for one batch is what its contract promises, before anything uses it."""
        solver = self.solver.describe()
        if not isinstance(x, Tensor):
            raise BenchError(f"solver {solver} returned {type(x).__name__}, not a tensor of samples")
        if x.shape != x_T.shape:
            raise BenchError(f"solver {solver} returned samples of shape {list(x.shape)} for a batch of shape "
                             f"{list(x_T.shape)} ({len(x_T)} samples of {list(x_T.shape[1:])})")
        if x.dtype != self.dtype or x.device != x_T.device:
            raise BenchError(f"solver {solver} returned {x.dtype} samples on {x.device}; the run is {self.dtype} on "
                             f"{x_T.device}")
        if self.solver.adaptive:
            return
        if nfe > self.plan.eval_bound:
            raise BenchError(f"solver {solver} made {nfe} denoiser evaluations per sample, but its plan "
                             f"({self.plan.steps} steps) declared at most {self.plan.eval_bound}")
        if rounds > self.plan.round_bound:
            raise BenchError(f"solver {solver} made {rounds} denoiser calls one after another, but its plan "
                             f"({self.plan.steps} steps) declared at most {self.plan.round_bound}")

    def draw(self, indices: Tensor, cond: Tensor | None) -> tuple[Tensor, Tensor, CountingDenoiser]:
        """x_T of the samples with global ``indices``, and the solver's result from it: all device work."""
        shape = tuple(self.network.shape)
        x_T = (gaussian(self.seed, indices, shape, dtype=torch.float64, device=self.device)
               * float(self.sigmas[0])).to(self.dtype)
        denoise = CountingDenoiser(self.network, cond, batch=len(indices))
        noise = NoiseStream(self.seed, indices, shape, self.dtype, self.device) if self.solver.stochastic else None
        with numerics(self.precision, self.device):
            x = self.solver.sample(denoise, x_T, self.sigmas, self.plan, noise)
        return x, x_T, denoise

    def batch(self, positions: Tensor, stopwatch: Stopwatch | None = None
              ) -> tuple[Tensor, Tensor, tuple[int, int, int]]:
        indices = (self.offset + positions).to(self.device)
        cond = self.labels[positions].to(self.device) if self.labels is not None else None
        with torch.inference_mode():
            if stopwatch is None:
                x, x_T, denoise = self.draw(indices, cond)
            else:
                with stopwatch:
                    x, x_T, denoise = self.draw(indices, cond)
        return x, x_T, (denoise.nfe, denoise.model_evals, denoise.rounds)


class _GraphedBatch:
    """A run's whole solver loop for one batch shape, captured once as a CUDA graph and replayed per batch.

    The sample indices and labels live in static device buffers that each batch overwrites before the replay;
    a short last batch is padded with copies of its last sample and cut back afterwards. The calls a replay makes
    are the calls captured, so the counted NFE is the capture's.
    """

    def __init__(self, run: _Run, batch_size: int) -> None:
        self.run, self.batch_size = run, batch_size
        self.indices = torch.zeros(batch_size, dtype=torch.int64, device=run.device)
        self.cond = torch.zeros(batch_size, dtype=torch.int64, device=run.device) if run.labels is not None else None
        self._fill(torch.arange(batch_size))
        side = torch.cuda.Stream(run.device)  # capture needs its lazy initialisations done on a side stream first
        side.wait_stream(torch.cuda.current_stream(run.device))
        with torch.cuda.stream(side), torch.inference_mode():
            run.draw(self.indices, self.cond)
        torch.cuda.current_stream(run.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(self.graph):
            self.x, self.x_T, denoise = run.draw(self.indices, self.cond)
        self.counts = (denoise.nfe, denoise.model_evals, denoise.rounds)

    def _fill(self, positions: Tensor) -> None:
        padded = torch.cat([positions, positions[-1:].expand(self.batch_size - len(positions))])
        self.indices.copy_(self.run.offset + padded)
        if self.cond is not None:
            self.cond.copy_(self.run.labels[padded])

    def __call__(self, positions: Tensor, stopwatch: Stopwatch) -> tuple[Tensor, Tensor, tuple[int, int, int]]:
        self._fill(positions)
        with stopwatch:
            self.graph.replay()
        return self.x[: len(positions)].clone(), self.x_T[: len(positions)].clone(), self.counts


