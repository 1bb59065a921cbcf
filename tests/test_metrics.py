"""The metrics: torch-fidelity's own numbers, exact moments, and features shared within and across cells."""

import pytest
import torch
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_prc import calculate_precision_recall_part

import bench
from bench.measure.metrics import REFERENCE_DATA_SEED, MetricContext, SharedCache
from bench.measure.reference import ReferenceCache
from bench.registry import manager
from plugins.metrics import _true_moments


def context_for(model, samples, labels=None, stochastic=False, shared=None, x_T=None):
    return MetricContext(model=model, model_id=model.name, samples=samples, x_T=x_T if x_T is not None else samples,
                         labels=labels, seed=0, stochastic=stochastic, references=ReferenceCache(),
                         shared=shared or SharedCache())


def metric(name):
    return manager().get("metric", name).obj.compute


def test_fid_precision_recall_are_torch_fidelitys(gmm2d):
    samples = bench.sample(gmm2d, "euler", nfe=6, n=300).x
    context = context_for(gmm2d, samples)
    real = gmm2d.sample_data(300, seed=REFERENCE_DATA_SEED).to(torch.float64)
    expected_fid = fid_statistics_to_metric(fid_features_to_statistics(samples.double()),
                                            fid_features_to_statistics(real), False)["frechet_inception_distance"]
    expected_precision, expected_recall = calculate_precision_recall_part(samples.double(), real, 3)
    assert metric("fid")(context) == pytest.approx(expected_fid, rel=1e-9)
    # torch-fidelity averages the 0/1 hits in float32; ours in float64
    assert metric("precision")(context) == pytest.approx(expected_precision, abs=1e-6)
    assert metric("recall")(context) == pytest.approx(expected_recall, abs=1e-6)
    assert metric("kid")(context) < 0.05


@pytest.mark.slow  # seconds to a minute on a loaded 2-core machine: `make bench` runs it
def test_real_data_scores_as_real(gmm2d):
    real = gmm2d.sample_data(2000, seed=5).float()
    context = context_for(gmm2d, real)
    assert metric("fid")(context) < 0.01
    assert metric("frechet_exact")(context) < 0.01
    assert abs(metric("kid")(context)) < 1e-3
    assert metric("precision")(context) > 0.9 and metric("recall")(context) > 0.9
    collapsed = context_for(gmm2d, real[:, :] * 0 + real[:1])  # every sample the same point: no diversity
    assert metric("recall")(collapsed) < 0.1


def test_features_are_extracted_once_per_cell_and_real_data_once_per_n(gmm2d, monkeypatch):
    shared = SharedCache()
    calls = []
    real_features = type(gmm2d).features

    def counting(self, x):
        calls.append(len(x))
        return real_features(self, x)

    monkeypatch.setattr(type(gmm2d), "features", counting)
    for seed in (0, 1):
        samples = bench.sample(gmm2d, "euler", nfe=4, n=100, seed=seed).x
        context = context_for(gmm2d, samples, shared=shared)
        for name in ("fid", "precision", "recall", "frechet_exact"):
            metric(name)(context)
    # cell 1 samples, real data (once), cell 2 samples: each in batches, the first of them the memory probe's
    assert calls == [64, 36] * 3
    context = context_for(gmm2d, bench.sample(gmm2d, "euler", nfe=4, n=50).x, shared=shared)
    metric("fid")(context)
    assert calls[-2:] == [50, 50]  # another N is another real-data draw, never a stale one


def test_exact_moments_of_a_label_mixture(gmm2d):
    # equal class weights: balanced labels give the unconditional moments back
    mean, covariance = _true_moments(gmm2d, torch.arange(800) % 8)
    torch.testing.assert_close(mean, gmm2d.mean(), atol=1e-12, rtol=0)
    torch.testing.assert_close(covariance, gmm2d.covariance(), atol=1e-12, rtol=0)
    mean, covariance = _true_moments(gmm2d, torch.tensor([3, 3]))
    torch.testing.assert_close(mean, gmm2d.mean(label=3))
    torch.testing.assert_close(covariance, gmm2d.covariance(label=3))


def test_trajectory_error(gmm2d):
    out = bench.sample(gmm2d, "heun", nfe=19, n=64, dtype="float64")
    context = context_for(gmm2d, out.x, x_T=out.x_T)
    error = metric("trajectory_error")(context)
    finer = bench.sample(gmm2d, "heun", nfe=79, n=64, dtype="float64")
    assert 0 < metric("trajectory_error")(context_for(gmm2d, finer.x, x_T=finer.x_T)) < error / 8  # order 2
    assert metric("trajectory_error")(context_for(gmm2d, out.x, x_T=out.x_T, stochastic=True)) is None


def test_density_coverage_are_prdcs_on_a_cell(gmm2d):
    prdc = pytest.importorskip("prdc")
    samples = bench.sample(gmm2d, "euler", nfe=4, n=400).x  # a coarse solver: not every real ball is reached
    context = context_for(gmm2d, samples)
    real = gmm2d.sample_data(400, seed=REFERENCE_DATA_SEED).to(torch.float64)
    theirs = prdc.compute_prdc(real_features=real.numpy(), fake_features=samples.double().numpy(), nearest_k=5)
    assert metric("density")(context) == pytest.approx(theirs["density"], rel=1e-12)
    assert metric("coverage")(context) == pytest.approx(theirs["coverage"], rel=1e-12)
    real_context = context_for(gmm2d, gmm2d.sample_data(2000, seed=5).float())
    assert metric("coverage")(real_context) > 0.9 and 0.8 < metric("density")(real_context) < 1.2
