"""Classifier-free guidance as a denoiser combinator (Ho and Salimans 2022).

D_w(x; sigma, c) = D(x; sigma, c) + w * (D(x; sigma, c) - D(x; sigma, none)): w = 0 is plain conditional sampling.
The conditional and unconditional evaluations go through the network in one batch, so a guided call is one NFE
and two model evaluations. A label of -1 means "no label" (the unconditional model) throughout the harness.
"""

from __future__ import annotations

import torch
from torch import Tensor

NO_LABEL = -1


class ClassifierFreeGuidance:
    evals_per_call = 2

    def __init__(self, model, scale: float) -> None:
        self.model = model
        self.scale = float(scale)
        for attribute in ("shape", "sigma_min", "sigma_max", "sigma_data", "num_classes"):
            setattr(self, attribute, getattr(model, attribute))

    def __call__(self, x: Tensor, sigma: Tensor, cond: Tensor | None = None) -> Tensor:
        if cond is None:
            raise ValueError("classifier-free guidance needs class labels")
        both = self.model(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([cond, torch.full_like(cond, NO_LABEL)]))
        denoised_cond, denoised_uncond = both.chunk(2)
        return denoised_cond + self.scale * (denoised_cond - denoised_uncond)
