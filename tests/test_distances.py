"""bench.measure.distances gives torch-fidelity's FID and precision/recall (its own functions are the peer)."""

import numpy as np
import pytest
import torch
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_prc import calculate_precision_recall_part

from bench.measure.distances import (density_coverage, distance_blocks, feature_statistics, frechet_distance,
                                     kth_neighbour_radii, precision_recall)


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


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("n_generated, n_real, d", [(700, 500, 8), (400, 900, 64)])
def test_density_coverage_are_prdcs(k, n_generated, n_real, d):
    prdc = pytest.importorskip("prdc")
    generated = correlated_features(n_generated, d, 7, shift=0.3)
    real = correlated_features(n_real, d, 8)
    theirs = prdc.compute_prdc(real_features=real.numpy(), fake_features=generated.numpy(), nearest_k=k)
    density, coverage = density_coverage(generated, real, k)
    # the same counts: a distance would have to tie a radius to rounding to tell sklearn's from torch's
    assert density == pytest.approx(theirs["density"], rel=1e-12)
    assert coverage == pytest.approx(theirs["coverage"], rel=1e-12)
    assert 0 < coverage < 1 and density > 0  # other mixing matrices, other laws: some real balls stay empty


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_density_coverage_in_blocks_are_one_blocks(dtype):
    # on a lattice every squared distance is exact in any block shape (lattice_points), so the counts are equal
    generated, real = lattice_points(64, 4, 7).to(dtype), lattice_points(32, 4, 17).to(dtype)
    whole = density_coverage(generated, real, 3, memory_budget="1GB")
    assert 0 < whole[1] < 1 and whole[0] > 0
    for budget in BUDGETS[:-1]:
        assert density_coverage(generated, real, 3, memory_budget=budget) == whole, budget


def test_density_coverage_by_hand():
    # real points 0, 1, 3 on a line: k = 1 radii 1, 1, 2; samples at 0.5 (in balls 0, 1), 2.5 (in ball 3 only),
    # 10 (in none): density = (2 + 1 + 0) / (1 * 3) = 1, coverage = 3 / 3 = 1; without 2.5: (2 + 0) / 2 = 1 and 2/3
    real = torch.tensor([[0.0], [1.0], [3.0]], dtype=torch.float64)
    assert density_coverage(torch.tensor([[0.5], [2.5], [10.0]], dtype=torch.float64), real, 1) == (1.0, 1.0)
    density, coverage = density_coverage(torch.tensor([[0.5], [10.0]], dtype=torch.float64), real, 1)
    assert density == pytest.approx(1.0) and coverage == pytest.approx(2 / 3)


def lattice_points(n: int, d: int, seed: int) -> torch.Tensor:
    """Points with integer coordinates in [-3, 3], n a power of two: the mean (the centre distances are taken
    about) is a multiple of 1/n, so every difference, square, product and sum behind a squared distance is exact
    in float32 and float64, whatever the order the matrix product sums in, and a distance has the same bits in
    any block. Many distances tie, exactly."""
    assert n & (n - 1) == 0
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(-3, 4, (n, d), generator=generator).to(torch.float64)


# budgets from one entry per block (1 x 1 blocks: the running k + 1 smallest is merged from one column at a time)
# through blocks of a few rows x a few columns to the whole matrix in one block
BUDGETS = ["50B", "600B", "3kB", "20kB", "300kB", "1GB"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_blocked_radii_and_coverage_on_a_lattice_are_bit_for_bit_one_blocks(dtype):
    generated, real = lattice_points(64, 4, 7).to(dtype), lattice_points(32, 4, 17).to(dtype)
    assert distance_blocks(64, 64, dtype, "50B") == (1, 1)
    assert distance_blocks(64, 64, dtype, "1GB") == (64, 64)
    one_radii = kth_neighbour_radii(real, 3, "1GB")
    one = precision_recall(generated, real, 3, memory_budget="1GB")
    assert 0 < one[0] < 1 and 0 < one[1] < 1  # neither trivially all nor none: the balls' edges are tested
    assert len(set(one_radii.tolist())) < len(one_radii) / 2  # ties, exactly
    for budget in BUDGETS[:-2]:
        rows, columns = distance_blocks(64, 64, dtype, budget)
        assert rows * columns < 32 * 64
        assert torch.equal(kth_neighbour_radii(real, 3, budget), one_radii), budget
        assert precision_recall(generated, real, 3, memory_budget=budget) == one, budget


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_blocked_precision_recall_of_continuous_features_equal_one_block(dtype):
    """Off a lattice, cdist's matrix product may round a distance differently in another block shape: the
    squared radii agree to the rounding of |x|^2 + |y|^2 - 2 x.y (a few ulps of the largest squared norm), and
    precision and recall to a point or two whose distance ties a radius to that rounding."""
    generated = correlated_features(500, 64, 5, shift=0.05).to(dtype)
    real = correlated_features(400, 64, 6).to(dtype)
    one_radii, one = kth_neighbour_radii(real, 3, "1GB"), precision_recall(generated, real, 3, memory_budget="1GB")
    rounding = 16 * torch.finfo(dtype).eps * real.square().sum(1).max().item()
    for budget in BUDGETS[3:-1]:
        blocked = kth_neighbour_radii(real, 3, budget)
        torch.testing.assert_close(blocked.square(), one_radii.square(), rtol=0, atol=rounding)
        precision, recall = precision_recall(generated, real, 3, memory_budget=budget)
        assert abs(precision - one[0]) <= 2 / 500 and abs(recall - one[1]) <= 2 / 400, budget


def test_k_nearest_neighbours_need_more_than_k_points():
    with pytest.raises(ValueError, match="more than k = 3 points; got 3"):
        kth_neighbour_radii(torch.zeros(3, 2), 3)
