"""The memory budget: how much memory one cell's tensors may take, and the arithmetic that keeps them within it.

What the budget bounds, on the device that samples (and on the host for what metrics keep there):
- what a cell keeps: x and x_T of all n samples in the run's dtype (and their labels), and for its metrics the
  features of the samples and of as many real data points (float64) and the reference ODE solution (float64);
- one batch's working set while sampling: the solver's state and history and the denoiser's intermediates;
- one block's working set while measuring: a block of a distance matrix, a batch of the reference ODE solve or
  of feature extraction. A measuring stage takes at most WORKING_SHARE of the budget for its blocks, so the
  cell check (check_cell) leaves that share free beside what the cell keeps.

What it does not bound: the model's own weights and buffers (loaded before; on CUDA the free memory it starts
from already excludes them), the Python process's baseline (the interpreter and torch's libraries, about
0.5 GB of RSS), caches that outlive a cell (real-data features, reference solutions), and what plugin code
allocates outside these stages (a model's ``sample_data``, a plugin metric's own arrays).

Default: on CUDA, CUDA_SHARE of what the device can still give torch (its free memory as the driver reports it,
plus what torch's caching allocator holds unused); on the CPU, CPU_SHARE of the available RAM (MemAvailable in
/proc/meminfo, or os.sysconf's available pages, capped by a cgroup limit); FALLBACK_BYTES where neither can be
read or for another device. Overrides, strongest first: ``memory_budget=`` of bench.sample (and of the measuring
functions), the environment variable SAMPLERBENCH_MEMORY_BUDGET; both take bytes or a size with a unit ("4GiB",
"500MB"). Measuring code run by the harness takes the environment's budget or the default.

A batch's working set is measured, not guessed, on a probe batch of PROBE_SAMPLES: on CUDA by the caching
allocator's peak (torch.cuda.max_memory_allocated), elsewhere by counting the bytes of every tensor the probe
creates and the peak of those alive at once (torch has no allocator statistics for the CPU, and RSS moves with
the allocator's caching and the other threads). The per-sample figure is that peak over the probe's size, times
SAFETY: the count misses what kernels allocate inside one operation and the allocator's slack (RSS came out
9-29% above it for the analytic models), and it charges fixed costs (first-call casts) to the probe's samples.
"""

from __future__ import annotations

import math
import os
import re
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from bench.errors import BenchError

BUDGET_ENV = "SAMPLERBENCH_MEMORY_BUDGET"
CPU_SHARE = 0.5  # of the available RAM: the rest is left to the process baseline and the machine's other work
CUDA_SHARE = 0.9  # of what the device can give: a GPU is the run's alone
FALLBACK_BYTES = 4 * 2**30
SAFETY = 1.5  # on a probe's measured peak per sample (see the module docstring)
PROBE_SAMPLES = 64
WORKING_SHARE = 0.25  # of the budget, for one block of a measuring stage

T = TypeVar("T")


@dataclass(frozen=True)
class Budget:
    bytes: int
    source: str  # how it was set, for messages a user can act on

    def __str__(self) -> str:
        return f"{format_size(self.bytes)} ({self.source})"

    @property
    def working(self) -> int:
        """What one block of a measuring stage (metrics, reference solve, features) may take."""
        return int(self.bytes * WORKING_SHARE)


# ----------------------------------------------------------------------------------------------- the budget

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(value: int | str, name: str = "memory budget") -> int:
    """Bytes from an int or a string such as "4GiB", "500 MB" or "2e9"."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        match = re.fullmatch(r"\s*([+-]?\d+(?:\.\d*)?(?:[eE][+-]?\d+)?)\s*([A-Za-z]*)\s*", str(value))
        if match is None or match[2].lower() not in _UNITS:
            raise BenchError(f"{name} {value!r} is not a size: give bytes or a number with one of the units "
                             "B, kB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024), e.g. 4GiB")
        number = float(match[1]) * _UNITS[match[2].lower()]
        if not math.isfinite(number):
            raise BenchError(f"{name} {value!r} is too large to be a size")
        size = int(number)
    if size <= 0:
        raise BenchError(f"{name} must be positive (at least one byte); got {value!r}")
    return size


def format_size(size: float) -> str:
    """Decimal units, three significant digits: 61.4 GB."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{int(size)} B"


def memory_budget(device: str | torch.device, given: Budget | int | str | None = None) -> Budget:
    """The budget on ``device``: ``given``, else SAMPLERBENCH_MEMORY_BUDGET, else the default."""
    if isinstance(given, Budget):
        return given
    if given is not None:
        return Budget(parse_size(given, "memory_budget"), f"memory_budget={given!r}")
    text = os.environ.get(BUDGET_ENV, "").strip()
    if text:
        return Budget(parse_size(text, BUDGET_ENV), f"{BUDGET_ENV}={text}")
    device = torch.device(device)
    available = available_memory(device)
    if available is None:
        return Budget(FALLBACK_BYTES, f"the default for {device.type}, whose free memory cannot be read")
    share = CUDA_SHARE if device.type == "cuda" else CPU_SHARE
    return Budget(int(available * share), f"the default: {share:.0%} of the {format_size(available)} available "
                                          f"on {device}")


def available_memory(device: torch.device) -> int | None:
    """Bytes the device can still give this process, or None where that cannot be read."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type != "cpu":
        return None
    available = None
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            pass
    room = _cgroup_room()
    if room is not None:
        available = room if available is None else min(available, room)
    return available


def _cgroup_room() -> int | None:
    """A container's memory limit less its usage (v2, then v1); None without a limit. Usage counts the page
    cache, so this errs low."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_file) as limit, open(usage_file) as usage:
                return max(0, int(limit.read()) - int(usage.read()))
        except (OSError, ValueError):  # absent, or "max": no limit
            continue
    return None


# ------------------------------------------------------------------------------------------ the arithmetic

def sample_bytes(shape: Iterable[int], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def kept_sample_bytes(n: int, shape: Iterable[int], dtype: torch.dtype, labelled: bool = False) -> int:
    """What a sampling run keeps to the end: x and x_T of all n samples, and their int64 labels."""
    return n * (2 * sample_bytes(shape, dtype) + (8 if labelled else 0))


def batch_that_fits(n: int, *, budget: int, kept: int, per_sample: float) -> int:
    """The largest batch of at most n samples whose working set fits in the budget beside what is kept:

        batch = min(n, floor((budget - kept) / per_sample))

    budget: the bytes the stage may use; kept: the bytes alive through the whole stage (its results for all
    samples); per_sample: one sample's share of a batch's working set. 0 when not even one sample fits.
    """
    room = budget - kept
    if room < per_sample:
        return 0
    return n if per_sample <= 0 else min(n, int(room // per_sample))


def probed_batch(n: int, budget: Budget, kept: int, peak: int, probe: int, what: str, room: int | None = None) -> int:
    """batch_that_fits from a probe's measured peak, refusing what cannot fit even one sample at a time.
    ``room``: what the stage may use (the whole budget unless given)."""
    per_sample = SAFETY * peak / max(probe, 1)
    room = budget.bytes if room is None else room
    batch = batch_that_fits(n, budget=room, kept=kept, per_sample=per_sample)
    if batch == 0:
        raise BenchError(f"{what}: one sample's working set ({format_size(per_sample)}, measured on {probe} samples "
                         f"with a margin of {SAFETY}) does not fit in the {format_size(max(room - kept, 0))} that "
                         f"the memory budget of {budget} leaves beside the {format_size(kept)} kept; raise the "
                         f"budget ({BUDGET_ENV}, or memory_budget=) or lower n")
    return batch


def too_large(what: str, needed: int, limit: int, budget: Budget, n: int, keeps: str) -> BenchError:
    """The refusal of a cell whose kept tensors exceed ``limit``, what the budget allows them."""
    per_sample = needed / n
    allowed = (f"the memory budget of {budget}" if limit == budget.bytes else
               f"the {format_size(limit)} that the memory budget of {budget} leaves beside the metrics' blocks")
    raise_to = needed * budget.bytes / limit * 1.1  # with a tenth to spare
    raise_to = f"{math.ceil(raise_to / 1e9)}GB" if raise_to >= 1e9 else f"{math.ceil(raise_to / 1e6)}MB"
    return BenchError(f"{what} at n = {n:,} keeps {format_size(needed)} ({keeps}: {format_size(per_sample)} a "
                      f"sample), more than {allowed}; lower n below {int(limit // per_sample):,} (the batches need room "
                      "beside what is kept), or raise the "
                      f"budget: {BUDGET_ENV}={raise_to} (or memory_budget= of bench.sample)")


def refuse_unless_kept_fit(what: str, n: int, shape: Iterable[int], dtype: torch.dtype, budget: Budget,
                           labelled: bool = False) -> int:
    """Before any sampling: the bytes a run keeps (x and x_T of all n samples), or a BenchError if they exceed
    the budget."""
    kept = kept_sample_bytes(n, shape, dtype, labelled)
    if kept > budget.bytes:
        raise too_large(what, kept, budget.bytes, budget, n, f"x and x_T in {str(dtype).removeprefix('torch.')}")
    return kept


# ------------------------------------------------------------------------------------------- the cell check

# What the built-in metrics (plugins/metrics.py) keep beside the samples; a plugin metric not named here is
# counted as keeping nothing.
FEATURE_METRICS = frozenset({"fid", "kid", "precision", "recall", "frechet_exact"})  # the samples' features
DATA_METRICS = frozenset({"fid", "kid", "precision", "recall"})  # as many real points and their features
REFERENCE_METRICS = frozenset({"trajectory_error"})  # the reference ODE solution


def check_cell(what: str, n: int, shape: Iterable[int], dtype: torch.dtype, device: str | torch.device,
               metrics: Iterable[str], *, feature_dim: int | None = None, labelled: bool = False,
               budget: Budget | int | str | None = None, host_budget: Budget | int | str | None = None) -> None:
    """Refuse, before any sampling, a cell whose kept tensors exceed the budget: the samples and the reference
    solution on the sampling device, the features (float64) on the host, all on one budget on the CPU.
    ``feature_dim``: the feature space's dimension (default: as many as a sample has numbers). With metrics,
    the kept tensors may take 1 - WORKING_SHARE of the budget, leaving the rest to the metrics' blocks."""
    device, shape, metrics = torch.device(device), tuple(shape), set(metrics)
    numel, dim = math.prod(shape), feature_dim or math.prod(shape)
    samples = kept_sample_bytes(n, shape, dtype, labelled)
    reference = n * numel * 8 if metrics & REFERENCE_METRICS else 0
    features = n * dim * 8 if metrics & FEATURE_METRICS else 0
    data = n * (numel + dim) * 8 if metrics & DATA_METRICS else 0
    parts = [("x and x_T", samples), ("the reference solution", reference), ("the samples' features", features),
             ("the real data and its features", data)]
    share = 1 - WORKING_SHARE if metrics else 1.0
    sides = [(device, parts)] if device.type == "cpu" else [(device, parts[:2]), (torch.device("cpu"), parts[2:])]
    for side, side_parts in sides:
        needed = sum(size for _, size in side_parts)
        if needed == 0:
            continue
        side_budget = memory_budget(side, budget if side == device else host_budget)
        if needed > share * side_budget.bytes:
            keeps = " + ".join(f"{name} {format_size(size)}" for name, size in side_parts if size)
            raise too_large(f"{what} on {side}", needed, int(share * side_budget.bytes), side_budget, n, keeps)


# ------------------------------------------------------------------------------------------- the measuring

def measure_peak(run: Callable[[], T], device: str | torch.device) -> tuple[T, int]:
    """run()'s result and the peak bytes of the tensors it created that were alive at once (its result's
    included; tensors that existed before are not counted)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = run()
        torch.cuda.synchronize(device)
        return result, torch.cuda.max_memory_allocated(device) - start
    counter = _TensorBytes()
    with counter:
        result = run()
    return result, counter.peak


class _TensorBytes(TorchDispatchMode):
    """Counts every tensor storage that an operation creates while the mode is on, and the peak of the bytes of
    those alive at once: a storage is alive while any tensor seen on it is (weakref finalizers on each one).
    An output on an input's storage (a view, an in-place result) is no new memory."""

    def __init__(self) -> None:
        super().__init__()
        self.alive: dict[int, list[int]] = {}  # storage address -> [bytes, tensors seen on it still alive]
        self.current = 0
        self.peak = 0
        self._finalizers: list[weakref.finalize] = []

    def __exit__(self, *exc_info):
        for finalizer in self._finalizers:  # tensors that outlive the count (results, caches) forget it
            finalizer.detach()
        return super().__exit__(*exc_info)

    def _release(self, address: int) -> None:
        entry = self.alive.get(address)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                del self.alive[address]
                self.current -= entry[0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {_address(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            address = _address(tensor)
            if address is None or (address in inputs and address not in self.alive):
                continue
            entry = self.alive.get(address)
            if entry is None:
                entry = self.alive[address] = [tensor.untyped_storage().nbytes(), 0]
                self.current += entry[0]
                self.peak = max(self.peak, self.current)
            entry[1] += 1
            self._finalizers.append(weakref.finalize(tensor, self._release, address))
        return out


def _address(tensor: torch.Tensor) -> int | None:
    try:
        return tensor.untyped_storage().data_ptr() or None
    except (RuntimeError, NotImplementedError):  # sparse and other storage-less tensors
        return None
