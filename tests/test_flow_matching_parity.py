"""Parity with diffusers' FlowMatchEulerDiscreteScheduler: our euler on a flow-matching UNet through
bench.from_flow_matching and the `flow` schedule, against diffusers' loop on the same UNet.

The tiny random UNet of tests/peers.py stands in for a velocity-predicting network (SD3's transformer, Flux): it
takes x_t and the timestep t * 1000 and its output is read as v = eps - x0. Both sides start from pure noise:
diffusers from x_1 = eps at t = 1, we from x_T = sigma_max eps with sigma_max = 1e8 standing in for t = 1, which
the adapter hands the network as x_T / (1 + sigma_max) = eps at t = 1 in float32. Same timesteps (diffusers'
linspace from 1 to its shifted t_min, shifted again), float32 both. Target <= 1e-4 relative; measured 1.6e-7 to
2.2e-7 (float32 rounding).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler  # noqa: E402

import bench  # noqa: E402
from bench.adapters.flow_matching import FlowMatchingDenoiser  # noqa: E402
from bench.errors import BenchError  # noqa: E402
from peers import CountingUNet, relative_deviation  # noqa: E402

PARITY = 1e-4
N = 4


def run_flow_match_euler(scheduler, network, x_1: torch.Tensor, steps: int) -> torch.Tensor:
    """The SD3 / Flux pipelines' loop: set_timesteps, then per timestep the network's velocity and a step."""
    scheduler.set_timesteps(steps)
    sample = x_1
    with torch.inference_mode():
        for timestep in scheduler.timesteps:
            velocity = network(sample, timestep.expand(sample.shape[0])).sample
            sample = scheduler.step(velocity, timestep, sample).prev_sample
    return sample


@pytest.mark.parametrize("steps", [10, 28])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_matches_flow_match_euler(unet, shift, steps):
    spy = CountingUNet(unet)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    model = bench.from_flow_matching(spy, scheduler)
    assert model.t_max == 1.0 and model.flow_shift == shift
    out = bench.sample(model, "euler", nfe=steps, n=N, seed=0, schedule="flow", warmup=False)
    ours_seen = torch.stack(spy.timesteps)[:, 0]
    spy.timesteps.clear()
    x_1 = out.x_T / (1 + model.sigma_max)  # = eps in float32: diffusers' pure noise
    theirs = run_flow_match_euler(scheduler, spy, x_1, steps)
    assert relative_deviation(out.x, theirs) <= PARITY  # measured 1.6e-7 to 2.2e-7
    # the same grid in t, and the network saw the same timesteps (t * 1000)
    t = out.sigmas / (1 + out.sigmas)
    assert torch.equal(t[:-1].float(), scheduler.sigmas[:-1])
    torch.testing.assert_close(ours_seen, torch.stack(spy.timesteps)[:, 0], rtol=0, atol=1e-4)
    assert ours_seen[0] == 1000.0


def test_the_shift_matters(unet):
    # shift 3 and shift 1 are different samplers: the parity above is not an accident of a flat network
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    out = bench.sample(bench.from_flow_matching(unet, scheduler), "euler", nfe=10, n=N, seed=0, schedule="flow",
                       warmup=False, schedule_options={"shift": 1.0})
    theirs = run_flow_match_euler(scheduler, unet, out.x_T / (1 + 1e8), 10)
    assert relative_deviation(out.x, theirs) > 1e-3


def test_from_flow_matching_reads_the_scheduler(unet):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, num_train_timesteps=1000)
    model = bench.from_flow_matching(unet, scheduler)
    assert model.shape == (3, 8, 8) and model.timestep_scale == 1000.0
    assert model.t_min == pytest.approx(3 * 0.001 / (1 + 2 * 0.001), rel=1e-6)  # the shifted 1 / T
    with pytest.raises(BenchError, match=r"use_dynamic_shifting=True picks its shift per image size"):
        bench.from_flow_matching(unet, FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True))
    with pytest.raises(BenchError, match=r"DDPMScheduler is not a flow-matching scheduler"):
        bench.from_flow_matching(unet, DDPMScheduler())


def test_a_saved_flow_matching_folder_loads_through_the_diffusers_plugin(tmp_path, unet):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    unet.save_pretrained(tmp_path / "unet")
    scheduler.save_pretrained(tmp_path / "scheduler")
    model = bench.load_model("diffusers", path=str(tmp_path))
    assert isinstance(model, FlowMatchingDenoiser) and model.flow_shift == 3.0 and model.t_max == 1.0
    assert model.content_hash is not None and len(model.content_hash) == 64
    x, sigma = torch.randn(2, 3, 8, 8), torch.tensor([0.5, 20.0])
    with torch.inference_mode():
        torch.testing.assert_close(model(x, sigma), bench.from_flow_matching(unet, scheduler)(x, sigma), rtol=0,
                                   atol=0)
    with pytest.raises(BenchError, match=r"timestep_rounding='round' applies to VP models"):
        bench.load_model("diffusers", path=str(tmp_path), timestep_rounding="round")


def test_class_labels_reach_a_class_conditional_network():
    from peers import TINY_NUM_CLASSES, tiny_unet

    unet = tiny_unet(seed=1, class_conditional=True)
    model = FlowMatchingDenoiser(unet, num_classes=TINY_NUM_CLASSES)
    labels = torch.tensor([0, 3, 3, 9])
    x, sigma = torch.randn(4, 3, 8, 8), torch.tensor([0.1, 1.0, 1.0, 30.0])
    t = sigma / (1 + sigma)
    with torch.inference_mode():
        velocity = unet(x / (1 + sigma.view(-1, 1, 1, 1)), t * 1000, class_labels=labels).sample
        expected = x / (1 + sigma.view(-1, 1, 1, 1)) - t.view(-1, 1, 1, 1) * velocity
        assert relative_deviation(model(x, sigma, labels), expected) <= 1e-6
        assert relative_deviation(model(x, sigma, labels.flip(0)), expected) > 1e-3
    out = bench.sample(model, "euler", nfe=5, n=4, labels=labels, schedule="flow", warmup=False)
    assert torch.isfinite(out.x).all()
