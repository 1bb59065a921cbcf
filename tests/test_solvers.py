"""Solvers: their empirical order of convergence against the exact flow, and the NFE they spend.

The order is the slope of log(trajectory error) against log(steps), fitted over four step counts doubling from
32 (gmm2d) or 64 (gmm-image) in float64 against a reference solved to 1e-10 (bench.measure.reference). On gmm-image a
32-step Euler run still sends one sample of 32 to another mode (per-sample error 0.5 against 0.004 for the rest):
that is the pre-asymptotic regime, not the order, so the fit starts at 64 there. Tolerance: +-0.1 around the nominal order for first order solvers
and -0.1/+0.25 for Heun. At these step sizes the next term of the error expansion, O(h^(p+1)), is a few percent of
the leading one, which shifts the fitted slope by a few hundredths (measured: Euler 1.00-1.03, Heun 2.00-2.10);
an implementation that lost its order (a wrong coefficient, a correction at the wrong sigma) is off by >= 0.5.
"""

import math

import pytest
import torch

import bench
from bench.tools.convergence import fitted_order, reference_for, trajectory_errors
from bench.core.sampling import get_solver
from helpers import assert_same_samples

CASES = {  # model -> (samples, step counts); gmm-image is 768-dimensional: fewer samples make the same statistic
    "gmm2d": (256, [32, 64, 128, 256]),
    "gmm-image": (32, [64, 128, 256, 512]),
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # the analytic models' small matrix products gain nothing from a second thread, and on a shared machine two
    # torch threads spin-wait on each other (gmm-image: 1.4 ms per call on one thread, 50 ms on two under load)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def references():
    cache = {}
    for name, (n, _) in CASES.items():
        model = bench.load_model(name)
        cache[name] = (model, reference_for(model, n))
    return cache


@pytest.mark.parametrize("model_name", list(CASES))
@pytest.mark.parametrize("schedule", ["karras", "logsnr"])
@pytest.mark.parametrize("solver, nominal, low, high", [("euler", 1, 0.9, 1.1), ("ddim", 1, 0.9, 1.1),
                                                        ("heun", 2, 1.9, 2.25)])
def test_empirical_order(references, model_name, schedule, solver, nominal, low, high):
    model, reference = references[model_name]
    assert get_solver(solver).order == nominal
    step_counts = CASES[model_name][1]
    order = fitted_order(step_counts, trajectory_errors(model, reference, solver, step_counts, schedule))
    assert low <= order <= high, f"{solver} on {model_name} ({schedule}): observed order {order:.3f}"


def test_deterministic_ddim_is_euler(gmm_image):
    # DDIM's update in sigma, D + sigma_next / sigma (x - D), is Euler's step rewritten (plugins/ddim.py)
    euler = bench.sample(gmm_image, "euler", nfe=12, n=16, dtype=torch.float64, schedule="time-uniform")
    ddim = bench.sample(gmm_image, "ddim", nfe=12, n=16, dtype=torch.float64, schedule="time-uniform")
    torch.testing.assert_close(ddim.x, euler.x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("solver, options", [("euler", {}), ("heun", {}), ("ddim", {}), ("ddim", {"eta": 1.0})])
def test_counted_nfe_is_the_declared_nfe_for_every_budget(gmm2d, solver, options):
    instance = get_solver(solver, **options)
    for budget in range(instance.min_nfe, 31):
        out = bench.sample(gmm2d, solver, nfe=budget, n=4, warmup=False, **options)
        assert out.nfe == out.plan.nfe == instance.nfe_for_steps(out.plan.steps) <= budget
        assert instance.nfe_for_steps(out.plan.steps + 1) > budget  # the largest plan within budget
        assert torch.isfinite(out.x).all()


def test_heun_spends_two_calls_per_step_but_one_on_the_last():
    heun = get_solver("heun")
    assert [heun.plan(nfe).steps for nfe in (1, 2, 3, 4, 5, 35)] == [1, 1, 2, 2, 3, 18]
    assert heun.plan(35).nfe == 35  # EDM's 18 steps


def test_ancestral_ddim_samples_the_data_distribution(gmm2d):
    # eta = 1 is ancestral DDPM: with many steps its samples follow the data, whatever their trajectories
    from plugins.metrics import _true_moments
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    out = bench.sample(gmm2d, "ddim", nfe=200, n=4096, seed=1, schedule="time-uniform", eta=1.0,
                       dtype=torch.float64)
    mean, covariance = _true_moments(gmm2d, None)
    distance = fid_statistics_to_metric(fid_features_to_statistics(out.x), {"mu": mean.numpy(),
                                                                            "sigma": covariance.numpy()}, False)
    # sample-size noise of the Frechet distance at n = 4096 in 2-D is ~3e-4; a wrong variance shows at >1e-2
    assert distance["frechet_inception_distance"] < 2e-3


def test_stochastic_noise_is_per_sample(gmm2d):
    whole = bench.sample(gmm2d, "ddim", nfe=10, n=12, seed=3, eta=1.0)
    split = bench.sample(gmm2d, "ddim", nfe=10, n=12, seed=3, eta=1.0, batch_size=5)
    assert_same_samples(whole, split, gmm2d)
    assert not torch.equal(whole.x, bench.sample(gmm2d, "ddim", nfe=10, n=12, seed=4, eta=1.0).x)


def test_the_last_step_lands_on_the_denoiser(gmm2d):
    # every solver ends with x0 = D(x; sigma_min): one step from x_T is exactly D(x_T; sigma_max)
    out = bench.sample(gmm2d, "euler", nfe=1, n=8, dtype=torch.float64)
    expected = gmm2d(out.x_T, torch.full((8,), gmm2d.sigma_max, dtype=torch.float64))
    assert torch.equal(out.x, expected)
    assert math.isclose(out.sigmas[0].item(), gmm2d.sigma_max)


def test_convergence_tool_reads_solver_options():
    from bench.tools.convergence import parse_solver

    assert parse_solver("unipc,order=3,corrector=True,disable_corrector=[0,1],variant=bh1,lower_order_final=false") \
        == ("unipc", {"order": 3, "corrector": True, "disable_corrector": [0, 1], "variant": "bh1",
                      "lower_order_final": False})
