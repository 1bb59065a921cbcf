"""What a solver costs outside the model: its own work per model call, next to its diffusers twin's.

With a trivial denoiser (x * 0.1), a loop's time minus the time spent in the model is the solver's own overhead;
both solvers run in the same process on the same device, so their ratio is meaningful on a shared machine. On the
CPU, where every call is synchronous, the model's share is clocked inside the very run it belongs to (a separately
timed model call is as large as the overhead itself and as noisy, and subtracting it gave negative figures); on
CUDA, where clocking a call would need a sync, it is NFE times the bare call, timed alone. On CUDA, ours can also
replay its loop as a CUDA graph. Both loops include their per-run set-up (diffusers' set_timesteps, our solvers'
coefficients); the sigma grid itself is made before ours.

    python -m bench.tools.overhead --device cuda --batch 64 1024        # the table, one line per solver pair

On CUDA the table also gives the memory floor of a step: a solver's update must at least read the state and the
denoiser's output and write the new state, three tensors of the batch, and no kernel moves bytes faster than the
device's copy bandwidth (measured here, as read + write bytes of a large device-to-device copy). Multistep solvers
also read their history, so their floor is higher than this one; the ratio to it is an upper bound on waste.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from bench.core.denoiser import CountingDenoiser
from bench.core.noise import NoiseStream
from bench.core.sampling import get_solver

SHAPE = (3, 32, 32)
STEPS = 10


@dataclass(frozen=True)
class Twin:
    """One of our solvers and the diffusers scheduler that runs the same algorithm."""

    solver: str
    options: dict[str, Any]
    scheduler: str
    scheduler_config: dict[str, Any]


VP = {"num_train_timesteps": 1000, "beta_schedule": "linear"}  # DDPM's training grid
TWINS = [
    Twin("euler", {}, "EulerDiscreteScheduler", VP),
    Twin("heun", {}, "HeunDiscreteScheduler", VP),
    Twin("ddim", {}, "DDIMScheduler", {**VP, "clip_sample": False, "set_alpha_to_one": True}),
    Twin("pndm", {"method": "plms"}, "PNDMScheduler", {**VP, "skip_prk_steps": True}),
    Twin("ipndm", {"order": 4}, "IPNDMScheduler", {"num_train_timesteps": 1000}),
    Twin("deis", {"order": 3, "method": "logrho"}, "DEISMultistepScheduler", {**VP, "solver_order": 3}),
    Twin("dpm-solver++", {"order": 2, "method": "multistep"}, "DPMSolverMultistepScheduler",
         {**VP, "solver_order": 2}),
    Twin("dpm-solver++", {"order": 3, "method": "multistep"}, "DPMSolverMultistepScheduler",
         {**VP, "solver_order": 3}),
    Twin("dpm-solver++", {"order": 2, "method": "singlestep"}, "DPMSolverSinglestepScheduler",
         {**VP, "solver_order": 2}),
    Twin("unipc", {"order": 2, "variant": "bh2"}, "UniPCMultistepScheduler", {**VP, "solver_order": 2}),
]


class Trivial:
    """A denoiser whose cost is one elementwise kernel: what is left of a loop's time is the solver's.

    ``clocked``: add each call's wall-clock to ``seconds`` (only meaningful where calls are synchronous: the CPU).
    """

    shape = SHAPE
    sigma_min, sigma_max, sigma_data, num_classes = 0.002, 80.0, 0.5, None

    def __init__(self, clocked: bool = False) -> None:
        self.clocked, self.seconds = clocked, 0.0

    def __call__(self, x: Tensor, sigma: Tensor | None, cond: Tensor | None = None) -> Tensor:
        if not self.clocked:
            return x * 0.1
        start = time.perf_counter()
        denoised = x * 0.1
        self.seconds += time.perf_counter() - start
        return denoised


@dataclass
class Loop:
    """A sampling loop ready to run: ``run()`` makes ``nfe`` calls of ``model``."""

    run: Callable[[], Any]
    nfe: int
    model: Trivial


def _best_seconds(run: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """The fastest of ``repeats`` runs: on a shared machine, other work only ever adds time, so the minimum is the
    estimate least polluted by it."""
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times[1:])


def copy_bandwidth(device: torch.device, megabytes: int = 1024, repeats: int = 20) -> float:
    """Bytes per second a device-to-device copy moves, counting what it reads and what it writes."""
    source = torch.empty(megabytes * 2**20 // 4, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    seconds = _best_seconds(lambda: target.copy_(source), device, repeats)
    return 2 * source.numel() * source.element_size() / seconds


def step_floor_seconds(batch: int, bandwidth: float, dtype: torch.dtype = torch.float32) -> float:
    """The least time a step's update can take: reading x and denoised, writing x, at ``bandwidth``."""
    state_bytes = batch * torch.Size(SHAPE).numel() * torch.empty((), dtype=dtype).element_size()
    return 3 * state_bytes / bandwidth


def model_seconds_per_call(batch: int, device: torch.device, repeats: int = 20) -> float:
    x, model, calls = torch.randn(batch, *SHAPE, device=device), Trivial(), 100
    sigma = torch.ones(batch, device=device)
    return _best_seconds(lambda: [model(x, sigma) for _ in range(calls)], device, repeats) / calls


def ours_loop(twin: Twin, batch: int, device: torch.device, cuda_graph: bool = False) -> Loop:
    """Our solver's loop over STEPS steps from a fixed x (coefficients computed inside, as for a run)."""
    from bench.core.sampling import make_sigmas

    solver = get_solver(twin.solver, **twin.options)
    plan = solver.plan(solver.nfe_for_steps(STEPS))
    model = Trivial(clocked=device.type == "cpu")
    sigmas = make_sigmas("karras", plan.steps, model)
    x = torch.randn(batch, *SHAPE, device=device) * 80.0
    noise = NoiseStream(0, torch.arange(batch, device=device), SHAPE, x.dtype, device) if solver.stochastic else None
    denoise = CountingDenoiser(model)
    run = lambda: solver.sample(denoise, x, sigmas, plan, noise)  # noqa: E731
    run()
    nfe = denoise.nfe
    if not cuda_graph:
        return Loop(run, nfe, model)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    return Loop(graph.replay, nfe, model)


def diffusers_loop(twin: Twin, batch: int, device: torch.device) -> Loop:
    """The scheduler's standard loop over STEPS steps: set_timesteps, then scale_model_input, the model, step."""
    import diffusers

    scheduler = getattr(diffusers, twin.scheduler)(**twin.scheduler_config)
    model = Trivial(clocked=device.type == "cpu")
    x_initial = torch.randn(batch, *SHAPE, device=device)
    calls = []

    def run() -> Tensor:
        scheduler.set_timesteps(STEPS, device=device)
        x = x_initial
        calls.clear()
        for t in scheduler.timesteps:
            model_output = model(scheduler.scale_model_input(x, t), None)
            calls.append(1)
            x = scheduler.step(model_output, t, x).prev_sample
        return x

    run()
    return Loop(run, len(calls), model)


def overhead_per_call(loop: Loop, model_seconds: float, device: torch.device, repeats: int = 20) -> float:
    """Seconds of the loop's own work per model call: the least over ``repeats`` runs (after a warm-up).

    CPU: each run's time minus the model time clocked within that run. CUDA: the fastest run's time per call minus
    ``model_seconds``, the bare call timed alone (model_seconds_per_call).
    """
    if not loop.model.clocked:
        return _best_seconds(loop.run, device, repeats) / loop.nfe - model_seconds
    overheads = []
    for _ in range(repeats + 1):
        loop.model.seconds = 0.0
        start = time.perf_counter()
        loop.run()
        overheads.append((time.perf_counter() - start - loop.model.seconds) / loop.nfe)
    return min(overheads[1:])


def table(device: torch.device, batches: list[int], repeats: int = 20) -> list[dict[str, Any]]:
    rows = []
    bandwidth = copy_bandwidth(device) if device.type == "cuda" else None
    for batch in batches:
        model_seconds = model_seconds_per_call(batch, device)  # subtracted on CUDA; on the CPU, for the table
        for twin in TWINS:
            row = {"solver": twin.solver, "options": twin.options, "twin": twin.scheduler, "batch": batch,
                   "device": str(device), "model_us": model_seconds * 1e6}
            row["ours_us"] = overhead_per_call(ours_loop(twin, batch, device), model_seconds, device, repeats) * 1e6
            row["diffusers_us"] = overhead_per_call(diffusers_loop(twin, batch, device), model_seconds, device,
                                                    repeats) * 1e6
            if bandwidth is not None:
                row["ours_graph_us"] = overhead_per_call(ours_loop(twin, batch, device, cuda_graph=True),
                                                         model_seconds, device, repeats) * 1e6
                row["floor_us"] = step_floor_seconds(batch, bandwidth) * 1e6
                row["copy_bandwidth_gb_per_s"] = bandwidth / 1e9
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 1024])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    rows = table(torch.device(args.device), args.batch, args.repeats)
    cuda = "floor_us" in rows[0]
    if cuda:
        print(f"copy bandwidth {rows[0]['copy_bandwidth_gb_per_s']:.0f} GB/s (read + write)")
    print(f"{'solver':<42}{'twin':<30}{'batch':>6}{'model us':>10}{'ours us':>10}{'diffusers us':>14}{'ratio':>8}"
          + (f"{'graph us':>10}{'floor us':>10}{'graph/floor':>13}" if cuda else ""))
    for row in rows:
        name = row["solver"] + (" " + ",".join(f"{k}={v}" for k, v in row["options"].items()) if row["options"] else "")
        line = (f"{name:<42}{row['twin']:<30}{row['batch']:>6}{row['model_us']:>10.1f}{row['ours_us']:>10.1f}"
                f"{row['diffusers_us']:>14.1f}"
                f"{row['ours_us'] / row['diffusers_us']:>8.2f}")
        if cuda:
            line += f"{row['ours_graph_us']:>10.1f}{row['floor_us']:>10.1f}{row['ours_graph_us'] / row['floor_us']:>13.2f}"
        print(line)


if __name__ == "__main__":
    main()
