"""Guidance as denoiser combinators: classifier-free (Ho and Salimans 2022) and classifier guidance
(Dhariwal and Nichol 2021).

Classifier-free: D_w(x; sigma, c) = D(x; sigma, c) + w * (D(x; sigma, c) - D(x; sigma, none)), so w = 0 is plain
conditional sampling. The conditional and unconditional evaluations go through the network in one batch, so a
guided call is one NFE and two model evaluations. A label of -1 means "no label" throughout the harness.

Classifier guidance: D_w(x; sigma, c) = D(x; sigma) + w * sigma^2 * grad_x log p(c | x; sigma), from a model that
knows its noisy-class posterior (the analytic mixtures know it exactly). By Bayes, sigma^2 grad log p(c | x) =
D(x; sigma, c) - D(x; sigma), so classifier guidance at scale 1 + w is classifier-free guidance at scale w.
"""

from __future__ import annotations

import torch
from torch import Tensor

NO_LABEL = -1


class _Guided:
    """A denoiser wrapping a conditional one: the same contract, guided by ``scale``."""

    evals_per_call = 2

    def __init__(self, model, scale: float) -> None:
        self.model = model
        self.scale = float(scale)
        for attribute in ("shape", "sigma_min", "sigma_max", "sigma_data", "num_classes"):
            setattr(self, attribute, getattr(model, attribute))


class ClassifierFreeGuidance(_Guided):

    def __call__(self, x: Tensor, sigma: Tensor, cond: Tensor | None = None) -> Tensor:
        if cond is None:
            raise ValueError("classifier-free guidance needs class labels")
        both = self.model(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([cond, torch.full_like(cond, NO_LABEL)]))
        denoised_cond, denoised_uncond = both.chunk(2)
        return denoised_cond + self.scale * (denoised_cond - denoised_uncond)


class ClassifierGuidance(_Guided):
    """Guidance by the gradient of the model's own noisy-class posterior, ``model.class_log_posterior``.

    One NFE costs one denoiser evaluation and one classifier forward and backward pass: two model evaluations.
    """

    def __init__(self, model, scale: float) -> None:
        if not hasattr(model, "class_log_posterior"):
            raise ValueError(f"classifier guidance needs a model with class_log_posterior(x, sigma, labels); "
                             f"{getattr(model, 'name', model)!r} has none (use classifier-free guidance)")
        super().__init__(model, scale)

    def __call__(self, x: Tensor, sigma: Tensor, cond: Tensor | None = None) -> Tensor:
        if cond is None:
            raise ValueError("classifier guidance needs class labels")
        # sampling runs under inference_mode; the classifier's gradient needs autograd on a fresh leaf
        with torch.inference_mode(False), torch.enable_grad():
            x_leaf = x.clone().requires_grad_(True)
            log_posterior = self.model.class_log_posterior(x_leaf, sigma.clone(), cond.clone())
            (gradient,) = torch.autograd.grad(log_posterior.sum(), x_leaf)
        sigma_squared = (sigma**2).view(-1, *[1] * (x.dim() - 1))
        return self.model(x, sigma) + self.scale * sigma_squared * gradient


GUIDANCE_KINDS = {"classifier-free": ClassifierFreeGuidance, "classifier": ClassifierGuidance}
