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

    ``sigma`` may be a Python float, a 0-d tensor or a [batch] tensor. The harness records ``nfe`` (calls) and
    ``model_evals`` (network evaluations: a classifier-free-guided call evaluates the network twice in one batch),
    never the NFE a solver claims.
    """

    def __init__(self, model: Denoiser, cond: Tensor | None = None) -> None:
        self.model = model
        self.cond = cond
        self.evals_per_call = int(getattr(model, "evals_per_call", 1))
        self.nfe = 0
        self.model_evals = 0

    def __call__(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        if isinstance(sigma, Tensor):
            sigma = sigma.to(dtype=x.dtype, device=x.device).expand(x.shape[0])
        else:  # a fill kernel: no host-to-device copy, no sync
            sigma = torch.full((x.shape[0],), sigma, dtype=x.dtype, device=x.device)
        self.nfe += 1
        self.model_evals += self.evals_per_call
        return self.model(x, sigma, self.cond)
