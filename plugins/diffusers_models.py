"""The "diffusers" model: a diffusers UNet and its scheduler saved in a local folder, in the sigma parametrization.

    model = bench.load_model("diffusers", path="checkpoints/ddpm-cifar10")

The folder holds unet/ and scheduler/ (as ``unet.save_pretrained(DIR / "unet")`` and
``scheduler.save_pretrained(DIR / "scheduler")`` write them; a diffusers pipeline folder has this layout), or
config.json and scheduler_config.json side by side. Weights load from safetensors, from disk only: never a
download. diffusers itself is imported only when a model is loaded, so this plugin registers without it; loading
then says how to install it. See bench/adapters/diffusers.py for the conversion; a folder whose scheduler is a
flow-matching one (FlowMatchEulerDiscreteScheduler) loads through bench/adapters/flow_matching.py.
"""

from __future__ import annotations

from pathlib import Path

import torch

from bench.adapters.diffusers import load_diffusers
from bench.errors import BenchError
from bench.hookspecs import hookimpl


def load_diffusers_model(device: str | torch.device = "cpu", path: str | Path | None = None,
                         sigma_data: float = 0.5, timestep_rounding: str = "none") -> torch.nn.Module:
    if path is None:
        raise BenchError("model 'diffusers' needs the folder of a saved diffusers model: "
                         "bench.load_model('diffusers', path=DIR), or in a suite: "
                         "[[models]] with name = \"diffusers\" and path = \"DIR\"")
    return load_diffusers(path, device=device, sigma_data=sigma_data, name="diffusers",
                          timestep_rounding=timestep_rounding)


@hookimpl
def register_models(register):
    register(load_diffusers_model, name="diffusers")
