"""Parity with diffusers: our dpm-solver and dpm-solver++ on a diffusers UNet against DPMSolverMultistepScheduler and
DPMSolverSinglestepScheduler.

Every test samples the same tiny random UNet (tests/peers.py) from the same x_T on the same timesteps (the
`discrete` schedule, convention "multistep": both schedulers take round(linspace(0, 999, N + 1)) without t = 0) and
asserts a relative deviation <= 1e-4 in float32 (measured: 1.9e-7 to 4.8e-7, float32 rounding: diffusers computes its
coefficients in float32, we in float64). diffusers is configured for the harness's common endpoint,
x0 = D(x; sigma_last): final_sigmas_type="zero", lower_order_final=True, euler_at_final=False. What cannot match is pinned and explained:

- lower_order_final: diffusers lowers the second-to-last step only below 15 steps; bench.core.multistep.warmup_orders
  lowers it whenever asked. At >= 15 steps the tests set our lower_order_final=False, which is diffusers' order
  list there (last step first order, all others full order). (With True the one step of a lower order near
  sigma_min changes little on this UNet: 7e-7 at 20 steps, below float32 rounding; not a test.)
- algorithm_type="dpmsolver" (noise prediction) refuses final_sigmas_type="zero": diffusers ends at the training
  grid's sigma_min (t = 0) and returns x there. We take that step too, then the common last step x0 = D(x; sigma_min),
  and compare with D(diffusers' x; sigma_min), through the solver's own sample() on that grid.
- singlestep: diffusers' intermediate points are grid points (our ``intermediates="grid"``). Its order-3 step gets
  the second intermediate point u2 from its generic second-order update ("midpoint" form, weight 1/2 on the
  difference), where DPM-Solver-3 (Lu et al. 2022, Algorithm 2) and the original code use the phi form,
  (e^(r2 h) - 1) / (r2 h) - 1. Both are second-order accurate, so both steps are third order, but they differ by
  O(h^3) per step: 0.6 % to 2 % on the tiny UNet at 4 to 12 calls. Pinned, then reproduced to parity with diffusers'
  u2, which shows that it is the whole difference.
- third_order="taylor" (3M with the full second-derivative term) is not diffusers' 3M: pinned.
- sde=True: diffusers' sde-dpmsolver++ takes its per-step noise as `variance_noise`; fed ours, it matches.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler  # noqa: E402

import bench  # noqa: E402
from bench.core.denoiser import CountingDenoiser  # noqa: E402
from bench.core.singlestep import singlestep_intervals  # noqa: E402
from bench.core.noise import NoiseStream, gaussian  # noqa: E402
from bench.core.sampling import get_solver, make_sigmas  # noqa: E402
from bench.core.solver import Plan  # noqa: E402
from bench.core.steps import warmup_orders  # noqa: E402
from peers import CountingUNet, relative_deviation, run_diffusers, tiny_scheduler_config  # noqa: E402
from plugins.dpm_solver import dpm_solver_1, dpm_solver_2, noise_prediction  # noqa: E402
from plugins.dpm_solver_pp import dpm_solver_pp_1, dpm_solver_pp_2s  # noqa: E402

PARITY = 1e-4  # float32, same noise, same timesteps
N = 4  # samples per parity run
MULTISTEP = {"convention": "multistep"}  # the discrete schedule's timesteps as both DPMSolver schedulers pick them

# diffusers 0.42 with numpy 2 warns on every set_timesteps (np.array of a torch tensor with copy=False): not ours
pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword"),
              # diffusers deprecates its singlestep algorithm_type="dpmsolver" (noise prediction), which we compare
              pytest.mark.filterwarnings("ignore:`algorithm_types=dpmsolver` is deprecated:FutureWarning")]


def ours(model, solver: str, nfe: int, **options):
    return bench.sample(model, solver, nfe=nfe, n=N, seed=0, schedule="discrete", schedule_options=MULTISTEP,
                        warmup=False, **options)


def multistep_scheduler(**options) -> DPMSolverMultistepScheduler:
    return DPMSolverMultistepScheduler(**tiny_scheduler_config(), **{
        "final_sigmas_type": "zero", "lower_order_final": True, "euler_at_final": False, **options})


def singlestep_scheduler(**options) -> DPMSolverSinglestepScheduler:
    return DPMSolverSinglestepScheduler(**tiny_scheduler_config(), **{
        "final_sigmas_type": "zero", "lower_order_final": True, **options})


def step_orders(order_list: list[int]) -> list[int]:
    """diffusers' singlestep order list (one entry per call, 1 where a step starts) as our orders (one per step)."""
    orders: list[int] = []
    for entry in order_list:
        if entry == 1:
            orders.append(1)
        else:
            orders[-1] += 1
    return orders


# ----------------------------------------------------------------------------------------- DPM-Solver++ multistep

@pytest.mark.parametrize("steps", [5, 10, 14, 15, 25])
@pytest.mark.parametrize("order, solver_type", [(1, "midpoint"), (2, "midpoint"), (2, "heun"), (3, "midpoint")])
def test_dpm_solver_pp_multistep_matches_diffusers(unet, steps, order, solver_type):
    spy = CountingUNet(unet)
    model = bench.from_diffusers(spy, DDPMScheduler(**tiny_scheduler_config()))
    out = ours(model, "dpm-solver++", steps, order=order, solver_type=solver_type, lower_order_final=steps < 15)
    ours_timesteps = torch.stack(spy.timesteps)
    spy.timesteps.clear()
    theirs = run_diffusers(multistep_scheduler(solver_order=order, solver_type=solver_type), spy, out.x_T, steps)
    assert relative_deviation(out.x, theirs) <= PARITY  # measured 2.0e-7 to 4.3e-7
    assert torch.equal(ours_timesteps, torch.stack(spy.timesteps))  # the same calls at the same timesteps
    assert spy.calls == 2 * steps


def test_third_order_taylor_is_not_diffusers_3m(model, unet):
    # diffusers' 3M (and the original code's) weighs the second-derivative term by half its Taylor coefficient
    out = ours(model, "dpm-solver++", 10, order=3, third_order="taylor")
    theirs = run_diffusers(multistep_scheduler(solver_order=3), unet, out.x_T, 10)
    assert relative_deviation(out.x, theirs) > 10 * PARITY  # measured 3.2e-3


# ------------------------------------------------------------------------------ DPM-Solver (noise), multistep

def through_sigma_min(model, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x_T and the grid for comparing with diffusers' final_sigmas_type="sigma_min": its steps timesteps, then the
    training grid's sigma_min, then 0."""
    sigmas = make_sigmas("discrete", steps, model, **MULTISTEP)
    sigmas = torch.cat([sigmas[:-1], sigmas.new_tensor([model.sigma_min, 0.0])])
    x_T = (gaussian(0, torch.arange(N), model.shape, dtype=torch.float64) * sigmas[0].item()).float()
    return x_T, sigmas


def diffusers_denoised_at_sigma_min(model, scheduler, unet, x_T: torch.Tensor, steps: int) -> torch.Tensor:
    """diffusers' sample at sigma_min (VP), made our VE state, then the common last step x0 = D(x; sigma_min)."""
    x_vp = run_diffusers(scheduler, unet, x_T, steps)
    x = x_vp * math.sqrt(1 + model.sigma_min**2)  # x_vp = x / sqrt(1 + sigma^2)
    with torch.inference_mode():
        return model(x, torch.full((N,), model.sigma_min))


@pytest.mark.parametrize("steps", [10, 15, 20])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_dpm_solver_multistep_matches_diffusers(model, unet, steps, order):
    x_T, sigmas = through_sigma_min(model, steps)
    solver = get_solver("dpm-solver", method="multistep", order=order, lower_order_final=steps < 15)
    if steps >= 15:  # diffusers' steps to sigma_min at full order, then ours to 0: our own plan
        plan = solver.plan(steps + 1)
    else:  # diffusers lowers its last step (to sigma_min) to order 1 and the one before to 2; then ours to 0
        plan = Plan(steps + 1, steps + 1, tuple(warmup_orders(steps, order, lower_order_final=True)) + (1,))
    with torch.inference_mode():
        x = solver.sample(CountingDenoiser(model), x_T, sigmas, plan)
    scheduler = multistep_scheduler(solver_order=order, algorithm_type="dpmsolver", final_sigmas_type="sigma_min")
    theirs = diffusers_denoised_at_sigma_min(model, scheduler, unet, x_T, steps)
    assert relative_deviation(x, theirs) <= PARITY  # measured 2.0e-7 to 4.1e-7


def test_diffusers_refuses_dpmsolver_to_zero():
    with pytest.raises(ValueError, match="final_sigmas_type"):
        multistep_scheduler(algorithm_type="dpmsolver")


# ----------------------------------------------------------------------------------------------- singlestep

def diffusers_singlestep(model, x: torch.Tensor, sigmas: torch.Tensor, orders: list[int], algorithm: str
                         ) -> torch.Tensor:
    """Singlestep sampling as DPMSolverSinglestepScheduler (solver_type="midpoint") does it: ours, except that an
    order-3 step takes u2 from the midpoint-form second-order update from s to s2 through s1, i.e. a 2S step (or
    DPM-Solver-2 step) from s to s2 with r = r1 / r2."""
    denoise = CountingDenoiser(model)
    for order, sigma, sigma_next, r1, r2 in singlestep_intervals(sigmas, orders, "grid"):
        if sigma_next == 0:
            return denoise(x, sigma)
        h = math.log(sigma / sigma_next)
        sigma_s2 = sigma * math.exp(-(r2 or 0) * h)
        if algorithm == "dpmsolver++":
            denoised = denoise(x, sigma)
            if order == 1:
                x = dpm_solver_pp_1(x, sigma, sigma_next, denoised)
            elif order == 2:
                x = dpm_solver_pp_2s(denoise, x, sigma, sigma_next, denoised, r1)
            else:
                u2 = dpm_solver_pp_2s(denoise, x, sigma, sigma_s2, denoised, r1 / r2)
                d2 = denoise(u2, sigma_s2) - denoised
                x = dpm_solver_pp_1(x, sigma, sigma_next, denoised) + (1 / r2) * (math.expm1(-h) / h + 1) * d2
        else:
            eps = noise_prediction(denoise, x, sigma)
            if order == 1:
                x = dpm_solver_1(x, sigma, sigma_next, eps)
            elif order == 2:
                x, _ = dpm_solver_2(denoise, x, sigma, sigma_next, eps, r1)
            else:
                u2, _ = dpm_solver_2(denoise, x, sigma, sigma_s2, eps, r1 / r2)
                d2 = noise_prediction(denoise, u2, sigma_s2) - eps
                x = dpm_solver_1(x, sigma, sigma_next, eps) - sigma_next / r2 * (math.expm1(h) / h - 1) * d2
    return x


@pytest.mark.parametrize("steps", range(2, 13))
def test_dpm_solver_pp_2s_matches_diffusers(model, unet, steps):
    out = ours(model, "dpm-solver++", steps, method="singlestep", order=2, intermediates="grid")
    scheduler = singlestep_scheduler(solver_order=2)
    theirs = run_diffusers(scheduler, unet, out.x_T, steps)
    assert list(out.plan.orders) == step_orders(scheduler.order_list)  # the same allocation at every budget
    assert relative_deviation(out.x, theirs) <= PARITY  # measured 2.0e-7 to 2.8e-7


@pytest.mark.parametrize("steps", range(2, 13))
def test_dpm_solver_2_matches_diffusers(model, unet, steps):
    x_T, sigmas = through_sigma_min(model, steps)
    scheduler = singlestep_scheduler(solver_order=2, algorithm_type="dpmsolver", final_sigmas_type="sigma_min")
    theirs = diffusers_denoised_at_sigma_min(model, scheduler, unet, x_T, steps)
    orders = step_orders(scheduler.order_list) + [1]  # diffusers' steps to sigma_min, then ours to 0
    solver = get_solver("dpm-solver", order=2, intermediates="grid")
    with torch.inference_mode():
        x = solver.sample(CountingDenoiser(model), x_T, sigmas, Plan(steps + 1, steps + 1, tuple(orders)))
    assert relative_deviation(x, theirs) <= PARITY  # measured 1.9e-7 to 4.0e-7


@pytest.mark.parametrize("steps", range(3, 13))
def test_singlestep_order_3_differs_from_diffusers_by_its_u2_only(model, unet, steps):
    out = ours(model, "dpm-solver++", steps, method="singlestep", order=3, intermediates="grid")
    scheduler = singlestep_scheduler(solver_order=3)
    theirs = run_diffusers(scheduler, unet, out.x_T, steps)
    assert list(out.plan.orders) == step_orders(scheduler.order_list)  # the same allocation at every budget
    sigmas = make_sigmas("discrete", steps, model, **MULTISTEP)
    with torch.inference_mode():
        theirs_reproduced = diffusers_singlestep(model, out.x_T, sigmas, list(out.plan.orders), "dpmsolver++")
    if 3 in out.plan.orders:
        assert relative_deviation(out.x, theirs) > 10 * PARITY  # measured 1.2e-2 to 2.0e-2
    else:  # 3 calls: [2, 1]
        assert relative_deviation(out.x, theirs) <= PARITY
    assert relative_deviation(theirs_reproduced, theirs) <= PARITY  # measured 2.0e-7 to 3.2e-7


@pytest.mark.parametrize("steps", [4, 6, 9, 11])
def test_dpm_solver_3_differs_from_diffusers_by_its_u2_only(model, unet, steps):
    x_T, sigmas = through_sigma_min(model, steps)
    scheduler = singlestep_scheduler(solver_order=3, algorithm_type="dpmsolver", final_sigmas_type="sigma_min")
    theirs = diffusers_denoised_at_sigma_min(model, scheduler, unet, x_T, steps)
    orders = step_orders(scheduler.order_list) + [1]
    solver = get_solver("dpm-solver", order=3, intermediates="grid")
    with torch.inference_mode():
        x = solver.sample(CountingDenoiser(model), x_T, sigmas, Plan(steps + 1, steps + 1, tuple(orders)))
        reproduced = diffusers_singlestep(model, x_T, sigmas, orders, "dpmsolver")
    assert relative_deviation(x, theirs) > 10 * PARITY  # measured 6.0e-3 to 1.2e-2
    assert relative_deviation(reproduced, theirs) <= PARITY  # measured 2.2e-7 to 3.4e-7


# ---------------------------------------------------------------------------------------------------------- SDE

@pytest.mark.parametrize("steps", [8, 20])
@pytest.mark.parametrize("order, solver_type", [(1, "midpoint"), (2, "midpoint"), (2, "heun")])
def test_sde_dpm_solver_pp_matches_diffusers_with_our_noise(model, unet, steps, order, solver_type):
    out = ours(model, "dpm-solver++", steps, order=order, solver_type=solver_type, sde=True,
               lower_order_final=steps < 15)
    scheduler = multistep_scheduler(solver_order=order, solver_type=solver_type, algorithm_type="sde-dpmsolver++")
    # diffusers adds sigma_t sqrt(1 - e^(-2h)) z to the VP sample, we sigma_t^VE sqrt(1 - e^(-2h)) z to the VE state:
    # the same z, as sigma^VP = alpha sigma^VE. Feed it ours, step by step (the last step, to 0, draws none).
    noise = NoiseStream(0, torch.arange(N), model.shape, torch.float32, "cpu")
    step, calls = scheduler.step, iter(range(steps))

    def step_with_our_noise(model_output, timestep, sample, **options):
        return step(model_output, timestep, sample, variance_noise=noise(next(calls)), **options)

    scheduler.step = step_with_our_noise
    theirs = run_diffusers(scheduler, unet, out.x_T, steps)
    assert relative_deviation(out.x, theirs) <= PARITY  # measured 2.8e-7 to 4.8e-7
