"""What the per-sample noise costs: ``bench.core.noise.gaussian`` against ``torch.randn`` of the same shape and dtype
(the floor: one generator, no per-sample guarantee) and EDM's per-sample loop (a ``torch.Generator`` per sample,
seeded per sample, ``randn`` per sample, stacked: the usual way to get per-sample reproducibility).

    python -m bench.tools.noise_cost [--batch 64 1024] [--shape 3 32 32] [--repeats 41] [--device cpu]
                                     [--threads N] [--cpu-time]

Each repeat runs the three contenders back to back, in rotating order, so that load from other processes hits
them alike; the table gives the median over repeats (CUDA events on a GPU, perf_counter on the CPU). On the CPU
torch.randn and the generator loop run on one thread while gaussian's elementwise ops use torch's intra-op
threads; on a machine shared with other work, where a thread can wait a whole time slice for a busy core,
``--threads 1`` compares like with like, and ``--cpu-time`` (the thread's CPU time, with one thread) is not
stretched by time slices given to other processes, which stretch a long call more than a short one.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from bench.core.noise import GENERATOR, gaussian
from bench.core.timing import Stopwatch


def edm_loop(seed: int, indices: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype,
             device: torch.device) -> torch.Tensor:
    """EDM's StackedRandomGenerator: one generator per sample, seeded with the sample's seed."""
    generators = [torch.Generator(device).manual_seed(seed + index) for index in range(len(indices))]
    return torch.stack([torch.randn(shape, generator=generator, dtype=dtype, device=device)
                        for generator in generators])


def seconds(call: Callable[[], object], device: torch.device, cpu_time: bool) -> float:
    if cpu_time:
        start = time.thread_time()
        call()
        return time.thread_time() - start
    watch = Stopwatch(device)
    with watch:
        call()
    return watch.seconds()


def median_seconds(contenders: dict[str, Callable[[], object]], repeats: int, device: torch.device,
                   cpu_time: bool) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for name in names:  # warm-up: allocator, lazy initialisation
        contenders[name]()
    for repeat in range(repeats):
        for name in names[repeat % len(names):] + names[:repeat % len(names)]:
            times[name].append(seconds(contenders[name], device, cpu_time))
    return {name: statistics.median(samples) for name, samples in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 1024])
    parser.add_argument("--shape", type=int, nargs="+", default=[3, 32, 32])
    parser.add_argument("--repeats", type=int, default=41)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument("--cpu-time", action="store_true", help="thread CPU time instead of wall time (one thread)")
    args = parser.parse_args(argv)
    if args.cpu_time and args.threads not in (None, 1):
        parser.error("--cpu-time measures one thread: use it with --threads 1")
    if args.threads or args.cpu_time:
        torch.set_num_threads(args.threads or 1)
    device, shape = torch.device(args.device), tuple(args.shape)
    print(f"{GENERATOR} on {device}, {torch.get_num_threads()} threads, shape {shape}, median "
          f"{'CPU' if args.cpu_time else 'wall'} time of {args.repeats} interleaved repeats")
    print(f"{'batch':>6} {'dtype':>8} {'ours ms':>9} {'randn ms':>9} {'EDM ms':>9} {'ours/randn':>11} {'ours/EDM':>9}")
    for batch in args.batch:
        indices = torch.arange(batch, device=device)
        for dtype in (torch.float32, torch.float64):
            medians = median_seconds({
                "ours": lambda: gaussian(0, indices, shape, dtype=dtype, device=device),
                "randn": lambda: torch.randn(batch, *shape, dtype=dtype, device=device),
                "edm": lambda: edm_loop(0, indices, shape, dtype, device),
            }, args.repeats, device, args.cpu_time)
            ours, randn, edm = (medians[name] * 1e3 for name in ("ours", "randn", "edm"))
            print(f"{batch:>6} {str(dtype).removeprefix('torch.'):>8} {ours:>9.3f} {randn:>9.3f} {edm:>9.3f} "
                  f"{ours / randn:>11.2f} {ours / edm:>9.2f}")


if __name__ == "__main__":
    main()
