"""The reference solution of the probability-flow ODE, against which trajectory errors are measured.

The ODE dx/dsigma = (x - D(x; sigma)) / sigma is solved in u = log sigma, where it reads dx/du = x - D(x; e^u) and
is smooth over the whole range, by torchdiffeq's adaptive Dormand-Prince 5(4) in float64 with rtol = atol = 1e-10.
Adaptive steps matter: the flow changes fast only where samples choose their mode, and a fixed-step RK4 needs
~20x more calls for the same accuracy (tests/test_reference.py checks the two agree). It ends like every solver:
x0 = D(x(sigma_min); sigma_min).
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch
import torchdiffeq
from torch import Tensor

from bench.core import memory
from bench.core.denoiser import CountingDenoiser
from bench.files import atomic_path

REFERENCE_TOLERANCE = 1e-10
# samples drawn in float32 cannot resolve trajectory errors below ~1e-6: a 1e-8 reference is exact for them at a
# quarter of the calls (dopri5's calls grow like tolerance^(-1/5))
LOW_PRECISION_REFERENCE_TOLERANCE = 1e-8
HASH_BLOCK_BYTES = 2**26  # x_T is hashed for the cache key in pieces of this size, never copied whole to the host


def solve_reference(model, x_T: Tensor, cond: Tensor | None = None, *, sigma_max: float | None = None,
                    sigma_min: float | None = None, tolerance: float = REFERENCE_TOLERANCE,
                    memory_budget: int | str | None = None) -> Tensor:
    """x0 reached from x_T (at sigma_max) along the exact flow, in float64, solved in batches of samples.

    Each sample's ODE is independent of the others', so the samples are solved in batches whose working set
    (dopri5's stages and the denoiser's intermediates, measured on the first batch) fits in a measuring stage's
    share of the memory budget (bench.core.memory). dopri5 picks its steps per batch (its error norm is the RMS
    over the batch), so another batching takes other steps but keeps the accuracy: every batch is solved to
    rtol = atol = ``tolerance``, and batched and unbatched references agree to within 100 x tolerance, the
    bound both meet against a converged fixed-step RK4 (tests/test_reference.py).
    """
    sigma_max = model.sigma_max if sigma_max is None else sigma_max
    sigma_min = model.sigma_min if sigma_min is None else sigma_min
    budget = memory.memory_budget(x_T.device, memory_budget)

    def solve(start: int, stop: int) -> Tensor:
        return _solve(model, x_T[start:stop], None if cond is None else cond[start:stop], sigma_max, sigma_min,
                      tolerance)

    n, probe = len(x_T), min(len(x_T), memory.PROBE_SAMPLES)
    with torch.inference_mode():
        solution = torch.empty(x_T.shape, dtype=torch.float64, device=x_T.device)  # counted as kept by the cell
        first, peak = memory.measure_peak(lambda: solve(0, probe), x_T.device)
        solution[:probe] = first
        if n > probe:
            batch = memory.probed_batch(n - probe, budget, 0, peak, probe, "the reference ODE solve",
                                        room=budget.working)
            for start in range(probe, n, batch):
                solution[start:start + batch] = solve(start, min(start + batch, n))
    return solution


def _solve(model, x_T: Tensor, cond: Tensor | None, sigma_max: float, sigma_min: float, tolerance: float) -> Tensor:
    """One batch: dopri5 in u = log sigma from sigma_max to sigma_min, then x0 = D(x(sigma_min); sigma_min)."""
    denoise = CountingDenoiser(model, cond)
    x_T = x_T.to(torch.float64)

    def velocity(u: Tensor, x: Tensor) -> Tensor:
        return x - denoise(x, u.exp())

    log_sigmas = torch.tensor([math.log(sigma_max), math.log(sigma_min)], dtype=torch.float64, device=x_T.device)
    x_sigma_min = torchdiffeq.odeint(velocity, x_T, log_sigmas, method="dopri5", rtol=tolerance, atol=tolerance)[-1]
    return denoise(x_sigma_min, sigma_min)


class ReferenceCache:
    """Reference solutions kept in memory and, given a directory, on disk as safetensors, keyed by the model, the
    initial states themselves (their bytes: a changed noise generator or sample range never reuses a stale
    solution), the labels, the sigma range and the tolerance."""

    def __init__(self, directory: str | Path | None = None) -> None:
        self.directory = Path(directory) if directory is not None else None
        self._memory: dict[str, Tensor] = {}

    @staticmethod
    def key(model_id: str, x_T: Tensor, labels: Tensor | None, sigma_max: float, sigma_min: float,
            tolerance: float = REFERENCE_TOLERANCE) -> str:
        digest = hashlib.sha256(f"{model_id}|{x_T.dtype}|{list(x_T.shape)}|{sigma_max!r}|{sigma_min!r}|"
                                f"{tolerance!r}|".encode())
        rows = max(1, HASH_BLOCK_BYTES // max(1, x_T[:1].numel() * x_T.element_size()))
        for block in x_T.detach().split(rows):  # the same bytes, in order, as one piece: the same key
            digest.update(block.cpu().contiguous().view(torch.uint8).numpy())
        if labels is not None:
            digest.update(labels.cpu().to(torch.int64).numpy().tobytes())
        return digest.hexdigest()[:32]

    def get(self, model, model_id: str, x_T: Tensor, labels: Tensor | None) -> Tensor:
        tolerance = REFERENCE_TOLERANCE if x_T.dtype == torch.float64 else LOW_PRECISION_REFERENCE_TOLERANCE
        key = self.key(model_id, x_T, labels, model.sigma_max, model.sigma_min, tolerance)
        if key in self._memory:
            return self._memory[key]
        path = self.directory / f"reference-{key}.safetensors" if self.directory else None
        if path is not None and path.exists():
            from safetensors.torch import load_file

            reference = load_file(path)["x0"].to(x_T.device)
        else:
            cond = labels.to(x_T.device) if labels is not None else None
            reference = solve_reference(model, x_T, cond, tolerance=tolerance)
            if path is not None:
                from safetensors.torch import save_file

                with atomic_path(path) as temporary:
                    save_file({"x0": reference.cpu().contiguous()}, temporary)
        self._memory[key] = reference
        return reference
