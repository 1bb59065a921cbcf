"""bench.measure.distances gives torch-fidelity's FID and precision/recall (its own functions are the peer)."""

import numpy as np
import pytest
import torch
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_prc import calculate_precision_recall_part

from bench.measure.distances import (distance_blocks, feature_statistics, frechet_distance, kth_neighbour_radii,
                                     precision_recall)


def correlated_features(n: int, d: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(d, d, generator=generator) / d**0.5
    return (torch.randn(n, d, generator=generator) @ mixing + shift).to(torch.float64)


@pytest.mark.parametrize("d", [2, 64, 512])
def test_frechet_distance_is_torch_fidelitys(d):
    first, second = correlated_features(3000, d, 0), correlated_features(2500, d, 1, shift=0.1)
    theirs = fid_statistics_to_metric(fid_features_to_statistics(first), fid_features_to_statistics(second),
                                      False)["frechet_inception_distance"]
    ours = frechet_distance(feature_statistics(first), feature_statistics(second))
    assert ours == pytest.approx(theirs, rel=1e-8, abs=1e-10)


@pytest.mark.parametrize("first_rank_deficient", [True, False])
def test_frechet_distance_of_a_rank_deficient_covariance_is_torch_fidelitys(first_rank_deficient):
    """Fewer samples than dimensions: the covariance has no Cholesky factor, so the eigendecomposition path runs."""
    few, many = correlated_features(40, 64, 5), correlated_features(500, 64, 6, shift=0.2)
    first, second = (few, many) if first_rank_deficient else (many, few)
    theirs = fid_statistics_to_metric(fid_features_to_statistics(first), fid_features_to_statistics(second),
                                      False)["frechet_inception_distance"]
    ours = frechet_distance(feature_statistics(first), feature_statistics(second))
    assert ours == pytest.approx(theirs, rel=1e-7)


def test_statistics_are_numpys():
    features = correlated_features(500, 16, 3)
    statistics = feature_statistics(features)
    np.testing.assert_allclose(statistics.covariance.numpy(), np.cov(features.numpy(), rowvar=False), rtol=1e-12)
    np.testing.assert_allclose(statistics.mean.numpy(), features.numpy().mean(0), rtol=1e-12)


def test_frechet_distance_of_identical_statistics_is_zero():
    statistics = feature_statistics(correlated_features(1000, 32, 4))
    assert abs(frechet_distance(statistics, statistics)) < 1e-9


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_precision_recall_are_torch_fidelitys(dtype):
    generated = correlated_features(1500, 64, 5, shift=0.05).to(dtype)
    real = correlated_features(1200, 64, 6).to(dtype)
    theirs = calculate_precision_recall_part(generated, real, 3)
    ours = precision_recall(generated, real, 3)
    # equal up to floating-point ties at a k-NN radius (at most a handful of points in 1e4)
    assert ours == pytest.approx(theirs, abs=1e-4)


def test_kth_neighbour_radius_by_hand():
    points = torch.tensor([[0.0], [1.0], [3.0], [7.0]], dtype=torch.float64)
    # k = 1: the nearest other point; k = 2: the second nearest
    assert kth_neighbour_radii(points, 1).tolist() == [1.0, 1.0, 2.0, 4.0]
    assert kth_neighbour_radii(points, 2).tolist() == [3.0, 2.0, 3.0, 6.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_precision_recall_in_many_blocks_equal_one_block(dtype):
    """A budget of 200 kB: blocks of ~64 rows x ~45 columns, hundreds of them, so the running k-NN radii and the
    running coverage are merged across column blocks; 1 GB: one block, the whole distance matrix."""
    generated = correlated_features(1500, 64, 5, shift=0.05).to(dtype)
    real = correlated_features(1200, 64, 6).to(dtype)
    rows, columns = distance_blocks(1500, 1500, dtype, "200kB")
    assert rows <= 100 and columns <= 100
    assert distance_blocks(1500, 1500, dtype, "1GB") == (1500, 1500)
    blocked_radii, radii = kth_neighbour_radii(real, 3, "200kB"), kth_neighbour_radii(real, 3, "1GB")
    torch.testing.assert_close(blocked_radii, radii, rtol=1e-12, atol=0)
    assert precision_recall(generated, real, 3, memory_budget="200kB") == precision_recall(generated, real, 3,
                                                                                          memory_budget="1GB")


def test_k_nearest_neighbours_need_more_than_k_points():
    with pytest.raises(ValueError, match="more than k = 3 points; got 3"):
        kth_neighbour_radii(torch.zeros(3, 2), 3)
