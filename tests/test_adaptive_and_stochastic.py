"""rk45 (adaptive: tolerance in, NFE out) and the stochastic samplers (judged in distribution)."""

import pytest
import torch
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

import bench
from bench.tools.convergence import reference_for
from bench.errors import BenchError
from bench.sweep.runner import run_suite
from bench.sweep.store import read_results
from bench.sweep.suite import load_suite
from helpers import assert_same_samples, write_suite
from plugins.metrics import _true_moments


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # the analytic models' small matrix products gain nothing from a second thread, and on a shared machine two
    # torch threads spin-wait on each other (gmm-image: 1.4 ms per call on one thread, 50 ms on two under load)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_rk45_error_follows_its_tolerance(gmm2d):
    reference = reference_for(gmm2d, 64)
    previous_nfe = 0
    for tolerance in (1e-3, 1e-5, 1e-7):
        out = bench.sample(gmm2d, "rk45", n=64, dtype="float64", rtol=tolerance, atol=tolerance)
        error = (out.x - reference).pow(2).mean().sqrt().item()
        # dopri5's local error control keeps the global error within a small multiple of the tolerance
        assert error < 20 * tolerance, (tolerance, error)
        assert out.nfe > previous_nfe  # tighter tolerance, more calls: NFE is an output
        previous_nfe = out.nfe
    assert out.plan.steps == 0


def test_rk45_takes_tolerances_not_budgets(gmm2d):
    with pytest.raises(BenchError, match=r"'rk45'.*is adaptive: give it rtol/atol"):
        bench.sample(gmm2d, "rk45", nfe=10, n=4)
    with pytest.raises(BenchError, match=r"rtol and atol must be > 0"):
        bench.sample(gmm2d, "rk45", n=4, rtol=0.0)
    with pytest.raises(BenchError, match=r"'euler' needs an NFE budget"):
        bench.sample(gmm2d, "euler", n=4)


def test_a_suite_sweeps_rk45_over_tolerances(tmp_path):
    text = """
    name = "adaptive"
    n = 16
    nfe = [4]
    metrics = ["trajectory_error"]
    [[models]]
    name = "gmm2d"
    [[solvers]]
    name = "rk45"
    tolerances = [1e-2, 1e-4]
    [[solvers]]
    name = "euler"
    """
    suite = load_suite(write_suite(tmp_path, text))
    assert [(cell.nfe, cell.tolerance, cell.schedule.name) for cell in suite.cells if cell.solver.name == "rk45"] \
        == [(None, 1e-2, "adaptive"), (None, 1e-4, "adaptive")]
    run_suite(suite, tmp_path, progress=False)
    frame = read_results(tmp_path / "adaptive.sqlite").set_index("tolerance")
    rk45 = frame[frame["solver"] == "rk45"]
    assert (rk45["status"] == "done").all()
    assert rk45.loc[1e-4, "nfe"] > rk45.loc[1e-2, "nfe"]
    assert rk45.loc[1e-4, "trajectory_error"] < rk45.loc[1e-2, "trajectory_error"]
    with pytest.raises(BenchError, match="adaptive: give it `tolerances"):
        load_suite(write_suite(tmp_path, text.replace("tolerances = [1e-2, 1e-4]", "nfe = [5]")))
    with pytest.raises(BenchError, match="takes NFE budgets, not tolerances"):
        load_suite(write_suite(tmp_path, text.replace('name = "euler"', 'name = "euler"\n    tolerances = [1e-3]')))


def frechet_to_truth(model, samples) -> float:
    mean, covariance = _true_moments(model, None)
    truth = {"mu": mean.numpy(), "sigma": covariance.numpy()}
    return fid_statistics_to_metric(fid_features_to_statistics(samples.double()), truth, False)[
        "frechet_inception_distance"]


@pytest.mark.parametrize("solver, nfe, options", [("euler-maruyama", 400, {}), ("edm-stochastic", 79, {}),
                                                  ("ddim", 200, {"eta": 1.0})])
def test_stochastic_samplers_sample_the_data(gmm2d, solver, nfe, options):
    out = bench.sample(gmm2d, solver, nfe=nfe, n=4096, seed=2, dtype="float64", **options)
    # 2-D Frechet distance between n = 4096 samples and the truth: ~3e-4 of sampling noise; a drift or noise
    # variance off by a few percent shows at > 1e-2
    assert frechet_to_truth(gmm2d, out.x) < 3e-3
    assert out.stochastic


@pytest.mark.parametrize("solver, options", [("euler-maruyama", {}), ("edm-stochastic", {"s_churn": 10.0})])
def test_stochastic_noise_is_per_sample(gmm2d, solver, options):
    whole = bench.sample(gmm2d, solver, nfe=9, n=10, seed=5, **options)
    split = bench.sample(gmm2d, solver, nfe=9, n=10, seed=5, batch_size=3, **options)
    assert_same_samples(whole, split, gmm2d)
    assert not torch.equal(whole.x, bench.sample(gmm2d, solver, nfe=9, n=10, seed=6, **options).x)


def test_edm_without_churn_is_heun(gmm_image):
    edm = bench.sample(gmm_image, "edm-stochastic", nfe=19, n=8, dtype="float64", s_churn=0.0)
    heun = bench.sample(gmm_image, "heun", nfe=19, n=8, dtype="float64")
    assert not edm.stochastic
    torch.testing.assert_close(edm.x, heun.x, rtol=0, atol=0)
    assert edm.nfe == heun.nfe == 19
