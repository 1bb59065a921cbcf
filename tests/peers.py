"""The parity harness: a tiny diffusers UNet, and diffusers' own sampling loop run from our initial state.

A parity test samples the same tiny randomly initialised UNet twice, from the same x_T and on the same timesteps:
once with our solver (through bench.from_diffusers and the `discrete` schedule) and once with the diffusers
scheduler it reimplements, then checks ``relative_deviation(ours, theirs)``. A random UNet is a fine peer: parity
is about the integrator and the parametrization, not about the quality of the samples. Mind one thing: a random
UNet does not denoise. Its eps estimate has RMS ~0.4 and is unrelated to the noise, so D(x; sigma) stays close to
x and the final samples keep much of x_T's scale (RMS ~60 from sigma_max = 157). A deviation is relative to that
scale: something that acts on x0 alone (clipping it to [-1, 1]) shows up far larger than with a trained model, and
something small at the end of sampling (stopping at sigma_0 = 0.01 instead of 0) far smaller.

    unet = tiny_unet()
    model = bench.from_diffusers(unet, DDIMScheduler(**tiny_scheduler_config()))
    with one_thread():
        ours = bench.sample(model, "ddim", nfe=10, n=4, schedule="discrete", warmup=False,
                            schedule_options={"spacing": "leading"})
        scheduler = DDIMScheduler(**tiny_scheduler_config(), timestep_spacing="leading", clip_sample=False)
        theirs = run_diffusers(scheduler, unet, ours.x_T, steps=10, eta=0.0)
    assert relative_deviation(ours.x, theirs) <= 1e-4

The `discrete` schedule (plugins/discrete.py) picks diffusers' timesteps: spacing="linspace" | "leading" |
"trailing" as the scheduler's timestep_spacing, steps_offset for leading, and convention="multistep" for
DPMSolverMultistep, DEIS and UniPC, which lay out their timesteps differently from DDIM, PNDM, Euler and Heun.
tests/test_diffusers_parity.py shows the configurations that match and the diffusers quirks that do not.

Where the two start. Our x_T is a variance-exploding state, x_T = sigma_start * eps, with sigma_start the sigma of
the first timestep (sigmas[0] of the schedule). diffusers' schedulers come in two kinds:

- VP schedulers (DDPM, DDIM, PNDM, DPMSolver*, DEIS, UniPC) keep the variance-preserving sample
  x_vp = sqrt(alpha_cumprod) x0 + sqrt(1 - alpha_cumprod) eps, which is our state divided by sqrt(1 + sigma^2)
  (since alpha_cumprod = 1 / (1 + sigma^2)). Their init_noise_sigma is 1, and their last step lands on x0 (when the
  final alpha_cumprod is 1) in data space, where ours lands too.
- sigma-space schedulers (EulerDiscrete, HeunDiscrete and the other k-diffusion ports) keep our VE state itself and
  divide it by sqrt(1 + sigma^2) in scale_model_input, just before the UNet. Their init_noise_sigma is sigma_max
  (or sqrt(sigma_max^2 + 1) with timestep_spacing="leading", a diffusers quirk that only matters to pipelines
  drawing x_T as randn * init_noise_sigma: we hand them our x_T as it is).

``run_diffusers`` tells them apart by init_noise_sigma (1 for VP, > 1 for sigma space) and converts accordingly.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

# 3x8x8, 165k parameters: a forward at batch 4 takes ~20 ms on CPU, so a 10-step parity run takes a fraction
# of a second.
TINY_UNET_CONFIG: dict[str, Any] = dict(
    sample_size=8,
    in_channels=3,
    out_channels=3,
    block_out_channels=(16, 32),
    layers_per_block=1,
    norm_num_groups=8,
    down_block_types=("DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D"),
)
TINY_NUM_CLASSES = 10


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one CPU thread inside the block. The tiny UNet's layers are too small to gain from threads, and
    on a shared machine two torch threads spin-wait on each other: 20 ms per forward on one thread, 300 ms and
    more on two under load. Parity test modules use it as an autouse fixture."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def tiny_unet(seed: int = 0, class_conditional: bool = False, **overrides: Any):
    """A small randomly initialised diffusers UNet2DModel (3x8x8), the same for the same seed.

    ``class_conditional`` adds a class embedding with TINY_NUM_CLASSES classes (``num_class_embeds``), as
    UNet2DModel does for class-conditional DDPMs. ``overrides`` replace entries of TINY_UNET_CONFIG.
    """
    from diffusers import UNet2DModel

    config = dict(TINY_UNET_CONFIG, **overrides)
    if class_conditional:
        config["num_class_embeds"] = TINY_NUM_CLASSES
    # parameter init draws from the global RNG: fork it, so building a UNet leaves the caller's stream alone
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DModel(**config)
    return unet.eval().requires_grad_(False)


def tiny_scheduler_config(**overrides: Any) -> dict[str, Any]:
    """DDPM's training schedule (Ho et al. 2020): linear betas 1e-4..0.02 over 1000 steps, epsilon prediction.

    Pass it to any diffusers scheduler: ``DDIMScheduler(**tiny_scheduler_config(), timestep_spacing="trailing")``;
    ``overrides`` replace its entries (``prediction_type="v_prediction"``, ``beta_schedule="scaled_linear"``...).
    """
    config = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                  prediction_type="epsilon")
    config.update(overrides)
    return config


class CountingUNet(torch.nn.Module):
    """A UNet that counts its forward calls (``calls``) and records the timestep of each (``timesteps``, as float64
    tensors [batch]). Wrap the UNet on both sides of a parity test to compare NFE and the timesteps the network saw:

        spy = CountingUNet(unet)
        bench.sample(bench.from_diffusers(spy, scheduler), ...);  run_diffusers(scheduler, spy, ...)
    """

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet
        self.config = unet.config
        self.calls = 0
        self.timesteps: list[Tensor] = []

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def forward(self, sample: Tensor, timestep: Tensor | float, *args: Any, **kwargs: Any):
        self.calls += 1
        self.timesteps.append(torch.as_tensor(timestep, dtype=torch.float64).expand(sample.shape[0]).clone())
        return self.unet(sample, timestep, *args, **kwargs)


def is_sigma_space(scheduler) -> bool:
    """Whether a diffusers scheduler integrates our VE state (Euler, Heun...) rather than the VP sample (DDIM...)."""
    return float(scheduler.init_noise_sigma) > 1.0


def run_diffusers(scheduler, unet, x_T_ve: Tensor, steps: int, generator: torch.Generator | None = None,
                  class_labels: Tensor | None = None, timesteps: list[int] | None = None,
                  **step_options: Any) -> Tensor:
    """diffusers' standard sampling loop, started from our VE initial state ``x_T_ve``; returns the final sample.

    The loop is the one every diffusers pipeline runs: set_timesteps, then per timestep scale_model_input,
    unet(...).sample, scheduler.step(...).prev_sample. ``x_T_ve`` must be sigma_start * eps for the first of the
    scheduler's timesteps (what bench.sample returns as ``x_T`` with the matching schedule). ``step_options`` go to
    ``scheduler.step`` (``eta=0.0`` for DDIM); ``generator`` too, when the scheduler draws noise. ``timesteps``
    replaces the scheduler's own choice, for the schedulers whose set_timesteps takes custom timesteps (Euler,
    Heun, DPMSolverMultistep...); ``steps`` is then ignored.
    """
    if timesteps is not None:
        scheduler.set_timesteps(timesteps=list(timesteps))
    else:
        scheduler.set_timesteps(steps)
    if is_sigma_space(scheduler):
        sample = x_T_ve
    else:
        # x_vp = sqrt(alpha_cumprod) x_ve: our state divided by sqrt(1 + sigma^2) at the first timestep
        first_timestep = int(scheduler.timesteps[0])
        alpha_cumprod = scheduler.alphas_cumprod[first_timestep].to(torch.float64)
        sample = (x_T_ve.to(torch.float64) * alpha_cumprod.sqrt()).to(x_T_ve.dtype)
    if generator is not None and "generator" in inspect.signature(scheduler.step).parameters:
        step_options["generator"] = generator
    unet_options = {} if class_labels is None else {"class_labels": class_labels}
    with torch.inference_mode():
        for timestep in scheduler.timesteps:
            model_input = scheduler.scale_model_input(sample, timestep)
            model_output = unet(model_input, timestep, **unet_options).sample
            sample = scheduler.step(model_output, timestep, sample, **step_options).prev_sample
    return sample


def relative_deviation(ours: Tensor, theirs: Tensor) -> float:
    """||ours - theirs|| / ||theirs|| over the whole batch (Frobenius norms, computed in float64)."""
    ours, theirs = ours.to(torch.float64), theirs.to(torch.float64)
    return float((ours - theirs).norm() / theirs.norm())


def k_diffusion_sampling():
    """k-diffusion's sampling module (k_diffusion/sampling.py, release 0.1.1.post1), the peer of our k-diffusion-style
    samplers, or a pytest skip when the peers are not downloaded.

    `make` downloads the wheel, pinned by its hash in requirements-peers.txt, into .venv/peers/; it is never
    installed, because the package's __init__ imports CLIP, wandb and the rest of a training stack that sampling.py
    does not use. We stand in an empty package object for `k_diffusion` whose __path__ is the folder inside the wheel,
    so that `k_diffusion.sampling` and the `utils` it imports load straight from the zip (torchsde, its one
    dependency beyond ours, is in the lock's test extra).
    """
    import importlib
    import sys
    import types
    from pathlib import Path

    import pytest

    if "k_diffusion.sampling" in sys.modules:
        return sys.modules["k_diffusion.sampling"]
    wheels = sorted((Path(sys.prefix) / "peers").glob("k_diffusion-*.whl"))
    if not wheels:
        pytest.skip(f"k-diffusion's wheel is not in {Path(sys.prefix) / 'peers'}: run `make test` (it downloads the "
                    "peers of requirements-peers.txt)")
    package = types.ModuleType("k_diffusion")
    package.__path__ = [f"{wheels[-1]}/k_diffusion"]
    sys.modules["k_diffusion"] = package
    return importlib.import_module("k_diffusion.sampling")
