"""Parity with diffusers' Karras sigmas (use_karras_sigmas=True): the two ways diffusers departs from the karras
schedule on the exact timesteps, each reproduced by an option.

- DPMSolverMultistepScheduler (and the other multistep schedulers) step on the exact Karras sigmas but feed the
  UNet round(sigma_to_t(sigma)), the nearest integer timestep; the adapter feeds the exact fractional one. On the
  tiny UNet our dpm-solver++ 2M / 3M differ from theirs by 1.4e-4 to 5.6e-4 (10 and 20 steps); with
  bench.from_diffusers(..., timestep_rounding="round") by 3.5e-7 to 5.5e-7, float32 rounding (at 25 steps:
  7.8e-4 / 7.4e-4 without, 3.7e-7 / 4.4e-7 with; not a test). UniPC's the same: 2.4e-4, then 3.2e-7.
- EulerDiscreteScheduler builds its Karras range from the sigmas of its spaced timesteps: with trailing spacing it
  ends at the last trailing timestep's sigma (t = 99 for 10 steps), not at the grid's sigma_min. karras with
  sigma_min = that sigma reproduces it: 1e-7 (1.2e-2 without).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import (DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,  # noqa: E402
                       UniPCMultistepScheduler)

import bench  # noqa: E402
from bench.errors import BenchError  # noqa: E402
from peers import CountingUNet, relative_deviation, run_diffusers, tiny_scheduler_config  # noqa: E402
from plugins.discrete import discrete_timesteps  # noqa: E402

PARITY = 1e-4
N = 4

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


def dpm_karras(order: int) -> DPMSolverMultistepScheduler:
    return DPMSolverMultistepScheduler(**tiny_scheduler_config(), solver_order=order, use_karras_sigmas=True,
                                       final_sigmas_type="zero", lower_order_final=True, euler_at_final=False)


@pytest.mark.parametrize("steps, measured", [(10, {2: 2.3e-4, 3: 1.4e-4}), (20, {2: 5.6e-4, 3: 4.3e-4})])
@pytest.mark.parametrize("order", [2, 3])
def test_dpm_solver_pp_karras_needs_diffusers_rounded_timesteps(unet, order, steps, measured):
    spy = CountingUNet(unet)
    deviations = {}
    for rounding in ("none", "round"):
        model = bench.from_diffusers(spy, DDPMScheduler(**tiny_scheduler_config()), timestep_rounding=rounding)
        # diffusers lowers the order of the last steps below 15 steps only
        out = bench.sample(model, "dpm-solver++", nfe=steps, n=N, seed=0, schedule="karras", warmup=False,
                           order=order, lower_order_final=steps < 15)
        ours_seen = torch.stack(spy.timesteps)[:, 0]
        spy.timesteps.clear()
        scheduler = dpm_karras(order)
        theirs = run_diffusers(scheduler, spy, out.x_T, steps)
        theirs_seen = torch.stack(spy.timesteps)[:, 0]
        spy.timesteps.clear()
        assert torch.allclose(out.sigmas.float(), scheduler.sigmas, rtol=1e-6, atol=0)  # the same Karras grid
        deviations[rounding] = relative_deviation(out.x, theirs)
        if rounding == "round":
            assert torch.equal(ours_seen, theirs_seen)  # integer timesteps, bit for bit
        else:
            assert not torch.equal(ours_seen, theirs_seen)
    assert measured[order] / 2 <= deviations["none"] <= measured[order] * 2
    assert deviations["round"] <= 1e-6  # measured 3.5e-7 to 5.5e-7


def test_unipc_karras_rounds_too(unet):
    # UniPCMultistepScheduler shares the rounding: 2.4e-4 apart at 10 steps with exact timesteps, 3.2e-7 rounded
    deviations = {}
    for rounding in ("none", "round"):
        model = bench.from_diffusers(unet, DDPMScheduler(**tiny_scheduler_config()), timestep_rounding=rounding)
        out = bench.sample(model, "unipc", nfe=10, n=N, seed=0, schedule="karras", warmup=False, order=2,
                           variant="bh2")
        scheduler = UniPCMultistepScheduler(**tiny_scheduler_config(), solver_order=2, use_karras_sigmas=True,
                                            final_sigmas_type="zero")
        deviations[rounding] = relative_deviation(out.x, run_diffusers(scheduler, unet, out.x_T, 10))
    assert 1.2e-4 <= deviations["none"] <= 4.8e-4 and deviations["round"] <= 1e-6


@pytest.mark.parametrize("steps", [10, 7])
def test_karras_sigma_min_is_diffusers_trailing_karras_range(model, unet, steps):
    # EulerDiscreteScheduler(use_karras_sigmas, trailing): Karras from sigma(999) to sigma(last trailing timestep)
    last_trailing = int(discrete_timesteps(steps, 1000, "trailing")[-1])  # 99 for 10 steps, 142 for 7
    scheduler = EulerDiscreteScheduler(**tiny_scheduler_config(), use_karras_sigmas=True, timestep_spacing="trailing")
    sigma_min = float(model.sigmas_discrete[last_trailing])
    out = bench.sample(model, "euler", nfe=steps, n=N, seed=0, schedule="karras", warmup=False,
                       schedule_options={"sigma_min": sigma_min})
    theirs = run_diffusers(scheduler, unet, out.x_T, steps)
    assert torch.allclose(out.sigmas.float(), scheduler.sigmas, rtol=1e-6, atol=0)
    assert relative_deviation(out.x, theirs) <= PARITY  # measured 1.0e-7, 1.1e-7
    # without the option the grid ends at the training grid's sigma_min, 0.01: 1.2e-2 and 1.6e-2 apart
    full_range = bench.sample(model, "euler", nfe=steps, n=N, seed=0, schedule="karras", warmup=False)
    assert relative_deviation(full_range.x, theirs) > 5e-3


def test_timestep_rounding_option(unet):
    model = bench.from_diffusers(unet, DDPMScheduler(**tiny_scheduler_config()), timestep_rounding="round")
    sigmas = model.sigmas_discrete[[10, 11, 500]]
    between = torch.stack([sigmas[0] ** 0.7 * sigmas[1] ** 0.3, sigmas[0] ** 0.3 * sigmas[1] ** 0.7, sigmas[2]])
    assert model.sigma_to_timestep(between).tolist() == [10.0, 11.0, 500.0]
    with pytest.raises(BenchError, match=r"timestep_rounding 'floor' is not supported \(supported: none, round\)"):
        bench.from_diffusers(unet, DDPMScheduler(**tiny_scheduler_config()), timestep_rounding="floor")
