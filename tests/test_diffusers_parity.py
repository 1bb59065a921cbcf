"""Parity with diffusers: our euler / heun / ddim on a diffusers UNet against diffusers' own schedulers, and the
adapter that makes a diffusers model a Denoiser (bench/adapters/diffusers.py).

Every parity test samples the same tiny random UNet (tests/peers.py) from the same x_T on the same timesteps and
asserts a relative deviation <= 1e-4 in float32 (measured: 1e-7 to 3e-7, 1.6e-6 with "sample" prediction: float32
rounding, as diffusers computes its coefficients in float32 and we in float64). Where a diffusers configuration does
something our solvers do not (clip x0, step to a timestep other than the next one, round timesteps differently),
the test pins the measured difference and then reproduces diffusers' result from our model to parity, which shows
that the quirk is the whole difference.
"""

from __future__ import annotations

import math
import socket
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import (DDIMScheduler, DDPMScheduler, DEISMultistepScheduler, DPMSolverMultistepScheduler,  # noqa: E402
                       EulerDiscreteScheduler, HeunDiscreteScheduler, UNet2DConditionModel,
                       UniPCMultistepScheduler)

import bench  # noqa: E402
from bench.adapters.diffusers import DiffusersDenoiser, load_diffusers  # noqa: E402
from bench.errors import BenchError  # noqa: E402
from bench.core.sampling import make_sigmas  # noqa: E402
from peers import (TINY_NUM_CLASSES, CountingUNet, relative_deviation, run_diffusers, tiny_scheduler_config,  # noqa: E402
                   tiny_unet)
from plugins.discrete import discrete_timesteps  # noqa: E402

PARITY = 1e-4  # float32, same noise, same timesteps
N = 4  # samples per parity run


def within_a_factor_of_two(deviation: float, measured: float) -> bool:
    """A quirk's deviation is of the measured size: the exact value moves with x_T and the UNet's random weights
    (a float32 network on random inputs), so the test pins its order and then reproduces it to parity."""
    return measured / 2 <= deviation <= measured * 2
# diffusers 0.42 with numpy 2 warns on every set_timesteps (np.array of a torch tensor with copy=False): not ours
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


def ours(model, solver: str, steps: int, spacing: str = "linspace", **options):
    """bench.sample on the discrete schedule with ``steps`` steps (heun: 2 * steps - 1 NFE)."""
    nfe = 2 * steps - 1 if solver == "heun" else steps
    return bench.sample(model, solver, nfe=nfe, n=N, seed=0, schedule="discrete", warmup=False,
                        schedule_options={"spacing": spacing, **options})


# ------------------------------------------------------------------------------------------------------- DDIM

def ddim_scheduler(**options) -> DDIMScheduler:
    return DDIMScheduler(**tiny_scheduler_config(**{"clip_sample": False, "set_alpha_to_one": True, **options}))


@pytest.mark.parametrize("spacing, steps", [("leading", 10), ("leading", 7), ("trailing", 10), ("trailing", 25)])
def test_ddim_matches_diffusers(model, unet, spacing, steps):
    spy = CountingUNet(unet)
    out = ours(bench.from_diffusers(spy, ddim_scheduler()), "ddim", steps, spacing)
    ours_timesteps = torch.stack(spy.timesteps)[:, 0]
    spy.timesteps.clear()
    theirs = run_diffusers(ddim_scheduler(timestep_spacing=spacing), spy, out.x_T, steps, eta=0.0)
    assert relative_deviation(out.x, theirs) <= PARITY  # measured 2.2e-7
    # the network sees diffusers' integer timesteps bit for bit: the adapter's sigma -> timestep is exact on the grid
    assert torch.equal(ours_timesteps, torch.stack(spy.timesteps)[:, 0])


def ddim_with_diffusers_steps(model, x_T, timesteps, step_size: int, final_alpha_cumprod: float):
    """DDIM as DDIMScheduler.step runs it, written in our parametrization with our denoiser.

    diffusers evaluates the network at timestep t but steps to prev = t - T // N, whatever the next timestep t' of
    its list is; the next step then reads the VP sample it produced, sqrt(a_prev)-scaled, as if it were at t'. In
    VE terms: an exact DDIM step from sigma_t to sigma_prev, then the relabelling x <- x sqrt(1 + sigma_t'^2) /
    sqrt(1 + sigma_prev^2). After the last timestep prev < 0 and diffusers steps to final_alpha_cumprod (1 with
    set_alpha_to_one: sigma = 0). Returns the VP sample, as diffusers does.
    """
    sigmas_discrete = model.sigmas_discrete
    final_sigma = math.sqrt((1 - final_alpha_cumprod) / final_alpha_cumprod)
    x, sigma_reached = x_T, float(sigmas_discrete[timesteps[0]])
    for t in timesteps:
        sigma = float(sigmas_discrete[t])
        x = x * math.sqrt((1 + sigma**2) / (1 + sigma_reached**2))  # read as being at t
        denoised = model(x, torch.full((len(x),), sigma))
        prev = t - step_size
        sigma_reached = float(sigmas_discrete[prev]) if prev >= 0 else final_sigma
        x = denoised + sigma_reached / sigma * (x - denoised)
    return x / math.sqrt(1 + sigma_reached**2)


@pytest.mark.parametrize("spacing, steps, measured", [
    # trailing with T / N not an integer: timesteps 999, 856, 713, ... 142, but each step goes to t - 142, so the
    # next step starts one timestep off (857 read as 856); the last goes to t = 0, not to sigma = 0 (142 - 142 = 0
    # is a valid index), and diffusers returns the still-noisy VP sample at t = 0
    ("trailing", 7, 0.0265),
    # linspace: timesteps 999, 888, ... 111, 0 but steps of T // N = 100: 999 -> 899 read as 888, and so on
    ("linspace", 10, 0.572),
    ("linspace", 7, 0.901),
])
def test_ddim_steps_to_t_minus_T_over_N_whatever_the_spacing(model, unet, spacing, steps, measured):
    # DDIMScheduler.step takes prev_timestep = t - T // N, which is the next timestep only for spacing="leading"
    # (and for "trailing" when N divides T). Our ddim steps to the next timestep of the grid, always.
    out = ours(model, "ddim", steps, spacing)
    scheduler = ddim_scheduler(timestep_spacing=spacing)
    theirs = run_diffusers(scheduler, unet, out.x_T, steps, eta=0.0)
    assert within_a_factor_of_two(relative_deviation(out.x, theirs), measured)
    quirk = ddim_with_diffusers_steps(model, out.x_T, scheduler.timesteps.tolist(), 1000 // steps, 1.0)
    assert relative_deviation(quirk, theirs) <= PARITY


def test_ddim_without_alpha_one_stops_at_timestep_zero(model, unet):
    # set_alpha_to_one=False: the step after the last timestep goes to alphas_cumprod[0] (sigma_0 = 0.01) instead
    # of 1 (sigma = 0). With leading spacing the last timestep is t = 0 itself, so that step goes nowhere and the
    # last network call is wasted: diffusers returns the VP sample at t = 0, sqrt(a_0) (x0 + sigma_0 eps), where we
    # return x0 = D(x; sigma_0). With a_0 = 1 - 1e-4 the difference is small, 7.8e-5, just under the parity
    # tolerance: this test pins it, and reproduces it to 1e-6 (parity measures 2e-7) to show it is the whole story.
    out = ours(model, "ddim", 10, "leading")
    scheduler = ddim_scheduler(timestep_spacing="leading", set_alpha_to_one=False)
    theirs = run_diffusers(scheduler, unet, out.x_T, 10, eta=0.0)
    assert within_a_factor_of_two(relative_deviation(out.x, theirs), 7.8e-5)
    quirk = ddim_with_diffusers_steps(model, out.x_T, scheduler.timesteps.tolist(), 100,
                                      float(scheduler.alphas_cumprod[0]))
    assert relative_deviation(quirk, theirs) <= 1e-6


class ClippedDenoiser:
    """D clamped to [-1, 1]: DDIMScheduler's clip_sample, as a denoiser."""

    def __init__(self, model) -> None:
        self.model = model
        for attribute in ("shape", "sigma_min", "sigma_max", "sigma_data", "num_classes", "sigmas_discrete"):
            setattr(self, attribute, getattr(model, attribute))

    def __call__(self, x, sigma, cond=None):
        return self.model(x, sigma, cond).clamp(-1, 1)


def test_ddim_clip_sample_is_not_ddim(model, unet):
    # DDIMScheduler's default clip_sample=True clamps the predicted x0 to [-1, 1] at every step (a DDPM legacy for
    # pixel models) but keeps the unclipped eps for the direction term: that is no longer the probability-flow ODE,
    # and our ddim never clips (a solver benchmark compares integrators, not post-processing). A random UNet does
    # not denoise (D(x; sigma) ~ x: our samples keep x_T's RMS, ~60), so clipping changes everything: diffusers'
    # samples lie in [-1, 1] (RMS 0.6) and the measured deviation is ~100x their norm.
    out = ours(model, "ddim", 10, "leading")
    clipped = DDIMScheduler(**tiny_scheduler_config(), timestep_spacing="leading")
    assert clipped.config.clip_sample  # diffusers' default
    theirs = run_diffusers(clipped, unet, out.x_T, 10, eta=0.0)
    assert within_a_factor_of_two(relative_deviation(out.x, theirs), 108)
    assert theirs.abs().max() <= 1  # the last step returns the clipped x0
    # with use_clipped_model_output=True eps is re-derived from the clipped x0, (x - clip(D)) / sigma: that is
    # exactly our ddim on the denoiser clip(D)
    theirs = run_diffusers(DDIMScheduler(**tiny_scheduler_config(), timestep_spacing="leading"), unet, out.x_T, 10,
                           eta=0.0, use_clipped_model_output=True)
    clipped_ours = bench.sample(ClippedDenoiser(model), "ddim", nfe=10, n=N, schedule="discrete", warmup=False,
                                schedule_options={"spacing": "leading"})
    assert relative_deviation(clipped_ours.x, theirs) <= PARITY


def test_ddim_sample_prediction(unet):
    model = bench.from_diffusers(unet, DDPMScheduler(**tiny_scheduler_config(prediction_type="sample")))
    out = ours(model, "ddim", 10, "leading")
    theirs = run_diffusers(ddim_scheduler(timestep_spacing="leading", prediction_type="sample"), unet, out.x_T, 10,
                           eta=0.0)
    assert relative_deviation(out.x, theirs) <= PARITY


# ------------------------------------------------------------------------------------------------------ Euler

@pytest.mark.parametrize("spacing, steps", [("trailing", 10), ("trailing", 7), ("leading", 10), ("linspace", 10),
                                            ("linspace", 4)])
def test_euler_matches_diffusers(model, unet, spacing, steps):
    out = ours(model, "euler", steps, spacing)
    # final_sigmas_type="zero" (the default): the last step goes to sigma = 0, as ours
    scheduler = EulerDiscreteScheduler(**tiny_scheduler_config(), timestep_spacing=spacing, final_sigmas_type="zero")
    theirs = run_diffusers(scheduler, unet, out.x_T, steps)
    assert relative_deviation(out.x, theirs) <= PARITY  # measured 1.3e-7 to 1.5e-7
    assert torch.allclose(out.sigmas.float(), scheduler.sigmas, rtol=1e-6, atol=0)


def test_euler_linspace_keeps_fractional_timesteps(model, unet):
    # EulerDiscreteScheduler's linspace does not round: N = 7 gives 999, 832.5, 666, 499.5, ... with sigma
    # interpolated linearly in sigma between grid points; the discrete schedule rounds (training timesteps, as
    # DDIM does): 999, 832, 666, 500, ... They agree whenever (T - 1) / (N - 1) is an integer (N = 4, 10 above).
    out = ours(model, "euler", 7, "linspace")
    scheduler = EulerDiscreteScheduler(**tiny_scheduler_config(), timestep_spacing="linspace")
    theirs = run_diffusers(scheduler, unet, out.x_T, 7)
    assert within_a_factor_of_two(relative_deviation(out.x, theirs), 2.8e-4)
    assert scheduler.timesteps[1] == 832.5
    # the timesteps are the whole difference: given ours, diffusers agrees
    timesteps = discrete_timesteps(7, 1000, "linspace").tolist()
    theirs = run_diffusers(scheduler, unet, out.x_T, 7, timesteps=timesteps)
    assert relative_deviation(out.x, theirs) <= PARITY


def test_euler_karras_matches_diffusers_karras_sigmas(model, unet):
    # use_karras_sigmas=True spans [sigma_min, sigma_max] of the training grid, as our karras schedule does; the
    # grids agree up to diffusers' float32 rounding (3.8e-6 absolute at sigma = 157), and diffusers' timesteps for
    # off-grid sigmas are k-diffusion's sigma_to_t, as the adapter's
    spy = CountingUNet(unet)
    spied = bench.from_diffusers(spy, DDPMScheduler(**tiny_scheduler_config()))
    out = bench.sample(spied, "euler", nfe=10, n=N, schedule="karras", warmup=False)
    ours_timesteps = torch.stack(spy.timesteps)[:, 0]
    spy.timesteps.clear()
    scheduler = EulerDiscreteScheduler(**tiny_scheduler_config(), use_karras_sigmas=True)
    theirs = run_diffusers(scheduler, spy, out.x_T, 10)
    assert relative_deviation(out.x, theirs) <= PARITY  # measured 1.2e-7
    assert torch.allclose(out.sigmas.float(), scheduler.sigmas, rtol=1e-6, atol=0)
    assert torch.allclose(ours_timesteps, torch.stack(spy.timesteps)[:, 0], rtol=0, atol=1e-4)  # measured 7.6e-6


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_euler_other_predictions(unet, prediction_type):
    model = bench.from_diffusers(unet, DDPMScheduler(**tiny_scheduler_config(prediction_type=prediction_type)))
    out = ours(model, "euler", 10, "trailing")
    scheduler = EulerDiscreteScheduler(**tiny_scheduler_config(prediction_type=prediction_type),
                                       timestep_spacing="trailing")
    assert relative_deviation(out.x, run_diffusers(scheduler, unet, out.x_T, 10)) <= PARITY


def test_euler_class_conditional():
    unet = tiny_unet(seed=1, class_conditional=True)
    model = bench.from_diffusers(unet, DDPMScheduler(**tiny_scheduler_config()))
    labels = torch.tensor([0, 3, 3, 9])
    out = bench.sample(model, "euler", nfe=10, n=N, schedule="discrete", labels=labels, warmup=False,
                       schedule_options={"spacing": "trailing"})
    scheduler = EulerDiscreteScheduler(**tiny_scheduler_config(), timestep_spacing="trailing")
    theirs = run_diffusers(scheduler, unet, out.x_T, 10, class_labels=labels)
    assert relative_deviation(out.x, theirs) <= PARITY
    other = run_diffusers(scheduler, unet, out.x_T, 10, class_labels=labels.flip(0))
    assert relative_deviation(out.x, other) > 1e-3  # the labels do reach the network


# ------------------------------------------------------------------------------------------------------- Heun

@pytest.mark.parametrize("spacing, steps", [("trailing", 10), ("trailing", 7), ("linspace", 10)])
def test_heun_matches_diffusers(unet, spacing, steps):
    spy = CountingUNet(unet)
    out = ours(bench.from_diffusers(spy, DDPMScheduler(**tiny_scheduler_config())), "heun", steps, spacing)
    assert spy.calls == out.nfe == 2 * steps - 1
    spy.calls = 0
    scheduler = HeunDiscreteScheduler(**tiny_scheduler_config(), timestep_spacing=spacing)
    theirs = run_diffusers(scheduler, spy, out.x_T, steps)
    assert relative_deviation(out.x, theirs) <= PARITY  # measured 1.0e-7
    # diffusers' Heun interleaves the timesteps, t0, t1, t1, t2, t2, ..., t_N-1, t_N-1: 2N - 1 entries, one UNet
    # call each. Its last entry is a plain Euler step to sigma = 0 (no correction at sigma = 0, where the slope is
    # undefined), as ours: the same 2N - 1 NFE for N steps, so no NFE difference to pin.
    assert spy.calls == len(scheduler.timesteps) == 2 * steps - 1


def test_heun_linspace_keeps_fractional_timesteps(model, unet):
    # as for Euler: HeunDiscreteScheduler's linspace keeps fractional timesteps (N = 7: 832.5, 499.5, 166.5)
    out = ours(model, "heun", 7, "linspace")
    scheduler = HeunDiscreteScheduler(**tiny_scheduler_config(), timestep_spacing="linspace")
    theirs = run_diffusers(scheduler, unet, out.x_T, 7)
    assert within_a_factor_of_two(relative_deviation(out.x, theirs), 6.9e-4)
    theirs = run_diffusers(scheduler, unet, out.x_T, 7, timesteps=discrete_timesteps(7, 1000, "linspace").tolist())
    assert relative_deviation(out.x, theirs) <= PARITY


# ------------------------------------------------------------------------------------------ the discrete schedule

STEP_COUNTS = list(range(3, 51))


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_discrete_timesteps_are_ddims(spacing):
    scheduler = DDIMScheduler(**tiny_scheduler_config(), timestep_spacing=spacing)
    for steps in STEP_COUNTS:
        scheduler.set_timesteps(steps)
        assert discrete_timesteps(steps, 1000, spacing).tolist() == scheduler.timesteps.tolist(), steps


def test_discrete_timesteps_leading_with_offset():
    # Stable Diffusion's scheduler config: leading spacing, steps_offset=1
    scheduler = DDIMScheduler(**tiny_scheduler_config(), timestep_spacing="leading", steps_offset=1)
    for steps in STEP_COUNTS:
        scheduler.set_timesteps(steps)
        assert discrete_timesteps(steps, 1000, "leading", steps_offset=1).tolist() == scheduler.timesteps.tolist()


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_discrete_timesteps_are_eulers_and_heuns(spacing):
    # linspace differs (fractional timesteps): test_euler_linspace_keeps_fractional_timesteps
    euler = EulerDiscreteScheduler(**tiny_scheduler_config(), timestep_spacing=spacing)
    heun = HeunDiscreteScheduler(**tiny_scheduler_config(), timestep_spacing=spacing)
    for steps in STEP_COUNTS:
        euler.set_timesteps(steps)
        heun.set_timesteps(steps)
        expected = discrete_timesteps(steps, 1000, spacing).tolist()
        assert euler.timesteps.tolist() == expected
        assert heun.timesteps[::2].tolist() == expected  # heun repeats each timestep after the first


@pytest.mark.parametrize("scheduler_class", [DPMSolverMultistepScheduler, DEISMultistepScheduler,
                                             UniPCMultistepScheduler])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_discrete_timesteps_multistep_convention(scheduler_class, spacing):
    scheduler = scheduler_class(**tiny_scheduler_config(), timestep_spacing=spacing)
    for steps in STEP_COUNTS:
        scheduler.set_timesteps(steps)
        assert discrete_timesteps(steps, 1000, spacing, convention="multistep").tolist() == \
            scheduler.timesteps.tolist(), steps


def test_discrete_schedule_is_the_grid_at_those_timesteps(model):
    for spacing in ("linspace", "leading", "trailing"):
        for steps in (3, 10, 50):
            sigmas = make_sigmas("discrete", steps, model, spacing=spacing)
            timesteps = torch.from_numpy(discrete_timesteps(steps, 1000, spacing))
            assert torch.equal(sigmas[:-1], model.sigmas_discrete[timesteps]) and sigmas[-1] == 0
    linspace = make_sigmas("discrete", 10, model)  # the default spacing spans the whole training grid
    assert linspace[0] == model.sigma_max and linspace[-2] == model.sigma_min


def test_discrete_trailing_has_steps_timesteps_where_diffusers_has_one_more():
    # diffusers bug: trailing spacing builds np.arange(T, 0, -T / N), whose float length overshoots for some N
    # (T = 1000: N = 61, 103, 121, ...), giving N + 1 timesteps, the last -1 (DDIM then reads alphas_cumprod[-1],
    # the noisiest entry). The discrete schedule keeps the N intended ones, which are diffusers' first N.
    scheduler = DDIMScheduler(**tiny_scheduler_config(), timestep_spacing="trailing")
    scheduler.set_timesteps(61)
    assert len(scheduler.timesteps) == 62 and scheduler.timesteps[-1] == -1
    ours_timesteps = discrete_timesteps(61, 1000, "trailing")
    assert len(ours_timesteps) == 61 and ours_timesteps.tolist() == scheduler.timesteps[:61].tolist()


def test_discrete_schedule_errors(model, gmm2d):
    with pytest.raises(BenchError, match=r"model 'gmm2d' has none.*karras.*logsnr"):
        make_sigmas("discrete", 10, gmm2d)
    with pytest.raises(BenchError, match=r"unknown spacing 'uniform'.*linspace, leading, trailing"):
        make_sigmas("discrete", 10, model, spacing="uniform")
    with pytest.raises(BenchError, match=r"1 to 1000 steps.*got 1001"):
        make_sigmas("discrete", 1001, model)
    with pytest.raises(BenchError, match=r"steps_offset=1 applies to spacing='leading' only"):
        make_sigmas("discrete", 10, model, spacing="trailing", steps_offset=1)
    with pytest.raises(BenchError, match=r"unknown convention 'dpm'"):
        make_sigmas("discrete", 10, model, convention="dpm")


# ------------------------------------------------------------------------------------------------ the adapter

def test_adapter_attributes(model):
    assert model.shape == (3, 8, 8) and model.num_classes is None and model.sigma_data == 0.5
    alphas_cumprod = DDPMScheduler(**tiny_scheduler_config()).alphas_cumprod.double()
    expected = ((1 - alphas_cumprod) / alphas_cumprod).sqrt()
    assert model.sigmas_discrete.dtype == torch.float64 and torch.equal(model.sigmas_discrete, expected)
    assert model.sigma_min == expected[0].item() and model.sigma_max == expected[-1].item()
    assert isinstance(model, bench.Denoiser)


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_adapter_uses_the_schedulers_alphas_cumprod(unet, beta_schedule):
    scheduler = DDIMScheduler(**tiny_scheduler_config(beta_schedule=beta_schedule, beta_start=0.00085,
                                                      beta_end=0.012))
    model = bench.from_diffusers(unet, scheduler)
    alphas_cumprod = scheduler.alphas_cumprod.double()
    assert torch.equal(model.sigmas_discrete, ((1 - alphas_cumprod) / alphas_cumprod).sqrt())


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_prediction_to_x0_against_the_vp_formulas(unet, prediction_type):
    model = bench.from_diffusers(unet, DDPMScheduler(**tiny_scheduler_config(prediction_type=prediction_type)))
    alphas_cumprod = DDPMScheduler(**tiny_scheduler_config()).alphas_cumprod.double()
    timesteps = torch.tensor([0, 250, 640, 999])
    alpha_cumprod = alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    sigma = model.sigmas_discrete[timesteps]
    x0, eps = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.randn(4, 3, 8, 8, dtype=torch.float64)
    x_vp = alpha_cumprod.sqrt() * x0 + (1 - alpha_cumprod).sqrt() * eps  # the training forward process
    x = x_vp / alpha_cumprod.sqrt()  # its VE state: x0 + sigma * eps
    output = unet(x_vp.float(), timesteps).sample.double()
    if prediction_type == "epsilon":  # the network predicts eps: x0 = (x_vp - sqrt(1 - a) eps) / sqrt(a)
        expected = (x_vp - (1 - alpha_cumprod).sqrt() * output) / alpha_cumprod.sqrt()
    elif prediction_type == "v_prediction":  # v = sqrt(a) eps - sqrt(1 - a) x0: x0 = sqrt(a) x_vp - sqrt(1 - a) v
        expected = alpha_cumprod.sqrt() * x_vp - (1 - alpha_cumprod).sqrt() * output
    else:
        expected = output
    with torch.inference_mode():
        denoised = model(x, sigma)
    assert relative_deviation(denoised, expected) <= 1e-6


def test_sigma_to_timestep_is_exact_on_the_grid_and_log_linear_between(model):
    grid = model.sigmas_discrete
    for dtype in (torch.float32, torch.float64):
        assert torch.equal(model.sigma_to_timestep(grid.to(dtype)), torch.arange(1000, dtype=dtype))
    # between t and t + 1, linear in log sigma: the geometric mean of two grid points is t + 1/2
    t = torch.tensor([0, 17, 500, 998])
    between = (grid[t] * grid[t + 1]).sqrt()
    torch.testing.assert_close(model.sigma_to_timestep(between), t.double() + 0.5, rtol=0, atol=1e-9)
    quarter = grid[t] ** 0.75 * grid[t + 1] ** 0.25
    torch.testing.assert_close(model.sigma_to_timestep(quarter), t.double() + 0.25, rtol=0, atol=1e-9)
    # outside the grid: clamped to the training range
    outside = torch.tensor([0.0, 1e-3, 1e3], dtype=torch.float64)
    assert model.sigma_to_timestep(outside).tolist() == [0.0, 0.0, 999.0]
    # the same map as diffusers' (k-diffusion's) _sigma_to_t
    sigmas = torch.exp(torch.empty(64, dtype=torch.float64).uniform_(math.log(grid[0]), math.log(grid[-1])))
    scheduler = EulerDiscreteScheduler(**tiny_scheduler_config())
    log_sigmas = np.log(((1 - scheduler.alphas_cumprod) / scheduler.alphas_cumprod).sqrt().numpy())
    expected = scheduler._sigma_to_t(sigmas.numpy(), log_sigmas)
    np.testing.assert_allclose(model.sigma_to_timestep(sigmas).numpy(), expected, rtol=0, atol=1e-3)


def test_class_conditional_unet_takes_labels():
    unet = tiny_unet(seed=1, class_conditional=True)
    model = bench.from_diffusers(unet, DDPMScheduler(**tiny_scheduler_config()))
    assert model.num_classes == TINY_NUM_CLASSES
    x, sigma = torch.randn(4, 3, 8, 8), model.sigmas_discrete[[10, 200, 200, 999]].float()
    labels = torch.tensor([0, 1, 2, 9])
    with torch.inference_mode():
        expected = x - sigma.view(-1, 1, 1, 1) * unet(x / (1 + sigma**2).sqrt().view(-1, 1, 1, 1),
                                                     torch.tensor([10, 200, 200, 999]), class_labels=labels).sample
        assert relative_deviation(model(x, sigma, labels), expected) <= 1e-5  # float32 rounding: ~1e-6
        assert not torch.allclose(model(x, sigma, labels), model(x, sigma, labels.flip(0)))
        with pytest.raises(ValueError, match=r"class label 10 is out of range.*\[0, 10\)"):
            model(x, sigma, torch.tensor([0, 1, 2, 10]))
        with pytest.raises(ValueError, match="class-conditional"):
            model(x, sigma)


def test_learned_variance_unet_uses_the_mean_half():
    unet = tiny_unet(out_channels=6)
    model = bench.from_diffusers(unet, DDPMScheduler(**tiny_scheduler_config()))
    x, sigma = torch.randn(2, 3, 8, 8), model.sigmas_discrete[[100, 900]].float()
    with torch.inference_mode():
        eps = unet(x / (1 + sigma**2).sqrt().view(-1, 1, 1, 1), torch.tensor([100, 900])).sample[:, :3]
        expected = x - sigma.view(-1, 1, 1, 1) * eps
        assert relative_deviation(model(x, sigma), expected) <= 1e-5  # float32 rounding: ~1e-6


def test_text_conditional_unet_takes_encoder_hidden_states():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
            norm_num_groups=8, cross_attention_dim=16, attention_head_dim=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    model = bench.from_diffusers(unet, DDPMScheduler(**tiny_scheduler_config()))
    assert model.num_classes is None and model.cross_attention
    x, sigma, text = torch.randn(2, 3, 8, 8), model.sigmas_discrete[[5, 700]].float(), torch.randn(2, 4, 16)
    with torch.inference_mode():
        eps = unet(x / (1 + sigma**2).sqrt().view(-1, 1, 1, 1), torch.tensor([5, 700]), text).sample
        expected = x - sigma.view(-1, 1, 1, 1) * eps
        assert relative_deviation(model(x, sigma, text), expected) <= 1e-5  # float32 rounding: ~1e-6
        with pytest.raises(ValueError, match="encoder_hidden_states"):
            model(x, sigma)


def test_unsupported_scheduler_and_prediction_type(unet):
    with pytest.raises(BenchError, match=r"prediction_type 'flow'.*epsilon, v_prediction, sample"):
        DiffusersDenoiser(unet, DDPMScheduler().alphas_cumprod, "flow")

    class FlowScheduler:  # flow-matching schedulers have no alphas_cumprod
        config = {}

    with pytest.raises(BenchError, match="FlowScheduler has no alphas_cumprod"):
        bench.from_diffusers(unet, FlowScheduler())


def _no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access while loading a local diffusers model")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # and should anything still ask the hub, it answers from the cache


@pytest.mark.parametrize("layout", ["pipeline", "flat"])
def test_saved_folder_loads_through_the_model_plugin(tmp_path, monkeypatch, unet, layout):
    scheduler = DDIMScheduler(**tiny_scheduler_config(prediction_type="v_prediction"))
    unet_dir, scheduler_dir = (tmp_path / "unet", tmp_path / "scheduler") if layout == "pipeline" else (tmp_path,) * 2
    unet.save_pretrained(unet_dir)
    scheduler.save_pretrained(scheduler_dir)
    _no_network(monkeypatch)
    model = bench.load_model("diffusers", path=str(tmp_path))
    assert isinstance(model, DiffusersDenoiser) and model.prediction_type == "v_prediction"
    x, sigma = torch.randn(2, 3, 8, 8), torch.tensor([0.5, 20.0])
    with torch.inference_mode():
        torch.testing.assert_close(model(x, sigma), bench.from_diffusers(unet, scheduler)(x, sigma), rtol=0, atol=0)
    assert model.content_hash is not None and len(model.content_hash) == 64


def test_model_plugin_errors(tmp_path):
    with pytest.raises(BenchError, match=r"model 'diffusers' needs the folder.*path=DIR"):
        bench.load_model("diffusers")
    with pytest.raises(BenchError, match="does not exist"):
        bench.load_model("diffusers", path=str(tmp_path / "missing"))
    with pytest.raises(BenchError, match=r"is not a diffusers model folder: expected unet/config.json"):
        bench.load_model("diffusers", path=str(tmp_path))


def test_missing_diffusers_says_how_to_install(monkeypatch, unet, tmp_path):
    scheduler = DDPMScheduler()
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` now raises ImportError
    with pytest.raises(BenchError, match=r"pip install samplerbench\[diffusers\]"):
        bench.from_diffusers(unet, scheduler)
    with pytest.raises(BenchError, match=r"pip install samplerbench\[diffusers\]"):
        load_diffusers(tmp_path)
