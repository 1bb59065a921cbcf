"""Parity with diffusers: unipc, deis, pndm and ipndm against UniPCMultistepScheduler, DEISMultistepScheduler,
PNDMScheduler and IPNDMScheduler.

The UNet tests sample the same tiny random UNet (tests/peers.py) from the same x_T on the same timesteps (the
`discrete` schedule: "multistep" convention for UniPC and DEIS, DDIM's for PNDM) and compare in float32; target
<= 1e-4 relative, measured 2e-7 to 4e-7 (float32 rounding: diffusers computes its coefficients in float32).

Where diffusers ends somewhere else than D(x; sigma_last), the harness's common endpoint, the test pins
the measured difference of the final samples and compares ours with the x0 of diffusers' last model call, D at its
last point: equal to parity, which shows that the last step is the whole difference.

- UniPCMultistepScheduler with final_sigmas_type="zero" ends exactly like us: its order-1 UniP step to sigma = 0
  is x0 = D. Direct parity for bh2. For bh1 diffusers returns NaN: B(h) = -h = -inf at sigma = 0, times a zero
  correction term (0 * inf) in the last step. A diffusers bug; ours is its last x0 to parity.
- DEISMultistepScheduler has no final_sigmas_type: its last step goes to the training grid's first sigma (~0.01),
  leaving that much noise (measured 5.7e-5 relative here, small because a random UNet keeps the samples at x_T's
  scale). It lowers the order at the end only below 15 steps: we pass lower_order_final=False from 15 steps on.
- PNDMScheduler (set_alpha_to_one=False, its default) makes its last call at timestep 0 and then steps to
  "timestep -1", which is timestep 0 again: a no-op, so it returns x at sigma(0) ~ 0.01 (measured 6e-5 to 8e-5
  relative) where that call's x0 is ours. Same NFE: 51 calls for 50 steps (plms), 59 (F-PNDM).
- F-PNDM's half steps: diffusers takes the integer timestep halfway, we the midpoint in continuous VP time: 3.5e-5 at
  10 steps (8e-7 at 50); with diffusers' half-step sigmas patched in, parity.
- IPNDMScheduler is a v-diffusion (continuous time, v-prediction) scheduler with no alphas_cumprod, which the
  adapter needs, so it cannot drive a DDPM UNet: its parity runs on the analytic gmm2d model in float64, on our grid
  (trained_betas = the VP sigmas of the grid; diffusers keeps them in float32, hence ~1e-6). Its last step is a
  4th-order Adams-Bashforth step to sigma = 0, not D (0.8 % apart at 5 steps): ours is its last x0 to parity.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import (DDPMScheduler, DEISMultistepScheduler, IPNDMScheduler, PNDMScheduler,  # noqa: E402
                       UniPCMultistepScheduler)

import bench  # noqa: E402
from bench.core.sampling import get_solver, make_sigmas  # noqa: E402
from peers import CountingUNet, relative_deviation, run_diffusers, tiny_scheduler_config  # noqa: E402
from plugins.discrete import discrete_timesteps  # noqa: E402

PARITY = 1e-4  # float32, same noise, same timesteps
N = 4  # samples per parity run

# diffusers 0.42 with numpy 2 warns on every set_timesteps (np.array of a torch tensor with copy=False): not ours
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


class LastCall(CountingUNet):
    """A CountingUNet that also keeps its last input sample, timestep and output."""

    def forward(self, sample, timestep, *args, **kwargs):
        output = super().forward(sample, timestep, *args, **kwargs)
        self.last = (sample, timestep, output.sample)
        return output

    def x0(self, scheduler) -> torch.Tensor:
        """x0 of the last call, from an epsilon-predicting UNet and a VP sample: D at diffusers' last point."""
        sample, timestep, eps = self.last
        alpha_cumprod = scheduler.alphas_cumprod[int(torch.as_tensor(timestep).reshape(-1)[0])].to(torch.float64)
        return ((sample.double() - (1 - alpha_cumprod).sqrt() * eps.double()) / alpha_cumprod.sqrt()).float()


def ours(model, solver: str, steps: int, spacing: str = "linspace", convention: str = "multistep", **options):
    nfe = get_solver(solver, **options).nfe_for_steps(steps)
    return bench.sample(model, solver, nfe=nfe, n=N, seed=0, schedule="discrete", warmup=False,
                        schedule_options={"spacing": spacing, "convention": convention}, **options)


def timesteps_seen(spy: CountingUNet) -> torch.Tensor:
    """The timesteps the UNet saw since the last call (one per forward); resets the spy."""
    seen = torch.stack(spy.timesteps)[:, 0]
    spy.timesteps.clear()
    spy.calls = 0
    return seen


# ------------------------------------------------------------------------------------------------------ UniPC

def unipc_scheduler(order: int, variant: str, corrector: bool, steps: int, **options) -> UniPCMultistepScheduler:
    disable = {} if corrector else {"disable_corrector": list(range(steps))}
    return UniPCMultistepScheduler(**tiny_scheduler_config(), solver_order=order, solver_type=variant,
                                   final_sigmas_type="zero", **disable, **options)


@pytest.mark.parametrize("steps", [10, 20])
@pytest.mark.parametrize("corrector", [True, False])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_unipc_bh2_matches_diffusers(model, unet, order, corrector, steps):
    spy = CountingUNet(unet)
    out = ours(bench.from_diffusers(spy, DDPMScheduler(**tiny_scheduler_config())), "unipc", steps, order=order,
               variant="bh2", corrector=corrector)
    ours_seen = timesteps_seen(spy)
    theirs = run_diffusers(unipc_scheduler(order, "bh2", corrector, steps), spy, out.x_T, steps)
    assert relative_deviation(out.x, theirs) <= PARITY  # measured 2.5e-7 to 3.4e-7
    assert torch.equal(ours_seen, timesteps_seen(spy))  # NFE = steps on both sides, the same timesteps


@pytest.mark.parametrize("corrector", [True, False])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_unipc_bh1_diffusers_ends_in_nan_and_ours_is_its_last_x0(model, unet, order, corrector):
    steps = 10
    out = ours(model, "unipc", steps, order=order, variant="bh1", corrector=corrector)
    spy = LastCall(unet)
    scheduler = unipc_scheduler(order, "bh1", corrector, steps)
    theirs = run_diffusers(scheduler, spy, out.x_T, steps)
    assert torch.isnan(theirs).all()  # diffusers: B(h) = -h = -inf at sigma = 0, times 0
    assert relative_deviation(out.x, spy.x0(scheduler)) <= PARITY  # measured 2.4e-7 to 3.3e-7


def test_unipc_disable_corrector_has_diffusers_meaning(model, unet):
    steps, disabled = 10, [0, 1, 5]
    out = ours(model, "unipc", steps, order=3, disable_corrector=disabled)
    theirs = run_diffusers(unipc_scheduler(3, "bh2", True, steps, disable_corrector=disabled), unet, out.x_T, steps)
    assert relative_deviation(out.x, theirs) <= PARITY
    all_on = ours(model, "unipc", steps, order=3)
    assert relative_deviation(all_on.x, theirs) > 1e-3  # the option does act: measured 9.3e-3


# ------------------------------------------------------------------------------------------------------- DEIS

@pytest.mark.parametrize("steps", [10, 20])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_deis_logrho_matches_diffusers_up_to_its_last_step(model, unet, order, steps):
    # diffusers lowers the order at the end below 15 steps only
    out = ours(model, "deis", steps, order=order, method="logrho", lower_order_final=steps < 15)
    spy = LastCall(unet)
    scheduler = DEISMultistepScheduler(**tiny_scheduler_config(), solver_order=order)
    theirs = run_diffusers(scheduler, spy, out.x_T, steps)
    assert relative_deviation(out.x, spy.x0(scheduler)) <= PARITY  # measured 2.0e-7 to 4.1e-7
    assert spy.calls == out.nfe == steps
    # diffusers' last step goes to sigma(t = 0) ~ 0.01, not 0: measured 5.7e-5
    assert 2e-5 <= relative_deviation(out.x, theirs) <= 2e-4


# ------------------------------------------------------------------------------------------------------- PNDM

@pytest.mark.parametrize("steps", [10, 50])
def test_pndm_plms_matches_diffusers_skip_prk_steps(model, unet, steps):
    spy = LastCall(unet)
    out = ours(bench.from_diffusers(spy, DDPMScheduler(**tiny_scheduler_config())), "pndm", steps, "leading", "ddim",
               method="plms")
    ours_seen = timesteps_seen(spy)
    scheduler = PNDMScheduler(**tiny_scheduler_config(), skip_prk_steps=True)
    theirs = run_diffusers(scheduler, spy, out.x_T, steps)
    # the same calls at the same timesteps: the second timestep twice (the pseudo improved Euler step)
    theirs_seen = timesteps_seen(spy)
    assert out.nfe == len(ours_seen) == len(theirs_seen) == steps + 1
    assert torch.equal(ours_seen, theirs_seen)
    assert relative_deviation(out.x, spy.x0(scheduler)) <= PARITY  # measured 1.7e-7, 3.4e-7
    # diffusers' last call leads to a no-op step (timestep 0 to "timestep -1" = 0): it returns x at sigma(0)
    assert 2e-5 <= relative_deviation(out.x, theirs) <= 2e-4  # measured 7.9e-5, 6.0e-5


@pytest.mark.parametrize("steps", [10, 50])
def test_f_pndm_matches_diffusers_prk_steps_with_its_half_steps(model, unet, monkeypatch, steps):
    scheduler = PNDMScheduler(**tiny_scheduler_config(), skip_prk_steps=False)
    spy = LastCall(unet)
    out = ours(model, "pndm", steps, "leading", "ddim", method="f-pndm")
    run_diffusers(scheduler, spy, out.x_T, steps)
    assert out.nfe == spy.calls == steps + 9
    deviation = relative_deviation(out.x, spy.x0(scheduler))
    assert deviation <= PARITY  # measured 3.5e-5 (10 steps), 7.8e-7 (50): half steps in VP time, not timesteps

    # diffusers' half step is the integer timestep t - (T // steps) // 2: with those sigmas, parity
    timesteps = discrete_timesteps(steps, 1000, "leading")
    half_steps = model.sigmas_discrete[torch.from_numpy(timesteps[:-1] - 1000 // steps // 2)].tolist()
    monkeypatch.setattr("plugins.pndm.vp_midpoints", lambda sigmas: half_steps)
    patched = ours(model, "pndm", steps, "leading", "ddim", method="f-pndm")
    assert relative_deviation(patched.x, spy.x0(scheduler)) <= min(deviation, 1e-6)


# ------------------------------------------------------------------------------------------------------ iPNDM

@pytest.mark.parametrize("steps", [5, 10, 25])
def test_ipndm_matches_diffusers_ipndm_up_to_its_last_step(gmm2d, steps):
    out = bench.sample(gmm2d, "ipndm", nfe=steps, n=64, dtype=torch.float64, warmup=False, order=4)
    sigmas = make_sigmas("karras", steps, gmm2d).tolist()
    # IPNDMScheduler's state is VP (alpha, sigma_vp) = (1, sigma) / sqrt(1 + sigma^2); it reads the sigma_vp of its
    # grid from trained_betas (N + 1 values ending with 0) and takes a v-prediction
    scheduler = IPNDMScheduler(trained_betas=[sigma / math.sqrt(1 + sigma**2) for sigma in sigmas])
    scheduler.set_timesteps(steps)
    x_vp = out.x_T / math.sqrt(1 + sigmas[0] ** 2)
    for i, timestep in enumerate(scheduler.timesteps):
        alpha = 1 / math.sqrt(1 + sigmas[i] ** 2)
        x = x_vp / alpha
        denoised = gmm2d(x, torch.full((len(x),), sigmas[i], dtype=torch.float64))
        v = alpha * (x - denoised) / sigmas[i] - sigmas[i] * alpha * denoised  # v = alpha eps - sigma_vp x0
        x_vp = scheduler.step(v, timestep, x_vp).prev_sample
    assert relative_deviation(out.x, denoised) <= 2e-6  # measured 8e-7 (float32 coefficients), 2e-8 at 25 steps
    assert relative_deviation(out.x, x_vp) >= 1e-5  # its last step is Adams-Bashforth to sigma = 0, not D
