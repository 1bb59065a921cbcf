"""The one language every solver speaks: the EDM / variance-exploding sigma parametrization.

A sample at noise level sigma is x = x0 + sigma * eps, and a denoiser returns D(x; sigma), its estimate of x0.
Models trained in another parametrization (VP, epsilon or v prediction) are wrapped into this one; solvers
never see VP.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class Denoiser(Protocol):
    shape: tuple[int, ...]  # one sample's shape, e.g. (2,) or (3, 16, 16)
    sigma_min: float
    sigma_max: float
    sigma_data: float
    num_classes: int | None  # None: unconditional

    def __call__(self, x: Tensor, sigma: Tensor, cond: Tensor | None = None) -> Tensor:
        """D(x; sigma), the estimate of x0. ``sigma`` has shape [batch]; ``cond`` holds class labels [batch]."""
        ...


class CountingDenoiser:
    """What a solver calls: ``denoise(x, sigma) -> x0`` with the labels bound, and every call counted.

    ``sigma`` may be a Python float, a 0-d tensor or a [rows] tensor. The harness records, never the NFE a solver
    claims, ``nfe``: evaluations per sample; ``rounds``: calls, one after another; and ``model_evals``: network
    evaluations per sample (a classifier-free-guided call evaluates the network twice in one batch).

    A sequential solver passes its batch of ``batch`` samples, one evaluation each: a call is one round and one
    NFE. A parallel sampler passes the points of several steps of every sample in one call, stacked step-major
    (rows ``s * batch + j``: step s of sample j): one round, and as many NFE per sample as the call holds steps.
    The labels are repeated for each step.
    """

    def __init__(self, model: Denoiser, cond: Tensor | None = None, batch: int | None = None) -> None:
        self.model = model
        self.cond = cond
        self.batch = batch if batch is not None else (len(cond) if cond is not None else None)
        self.evals_per_call = int(getattr(model, "evals_per_call", 1))
        self.nfe = 0
        self.rounds = 0
        self.model_evals = 0

    def __call__(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        rows = x.shape[0]
        evaluations = 1 if self.batch is None else rows // self.batch
        if self.batch is not None and (rows % self.batch or not evaluations):
            raise ValueError(f"a call holds whole steps of the batch of {self.batch} samples; got {rows} rows")
        if isinstance(sigma, Tensor):
            sigma = sigma.to(dtype=x.dtype, device=x.device).expand(rows)
        else:  # a fill kernel: no host-to-device copy, no sync
            sigma = torch.full((rows,), sigma, dtype=x.dtype, device=x.device)
        cond = self.cond if self.cond is None or evaluations == 1 else self.cond.repeat(evaluations)
        self.nfe += evaluations
        self.rounds += 1
        self.model_evals += evaluations * self.evals_per_call
        return self.model(x, sigma, cond)
