"""Distances between two sets of features, on whatever device the features live: Frechet distance (FID) and
Kynkaanniemi et al.'s improved precision and recall.

They give torch-fidelity's values (tests/test_distances.py checks both against its functions) at a fraction of its
cost: torch-fidelity takes the k-th nearest neighbour on the CPU (`kthvalue` after moving each distance block off
the GPU) and the trace of sqrt(S1 S2) from a general eigensolver; here the k-NN radii are a `topk` on the device,
and the trace from a Cholesky factor and one symmetric eigenvalue problem in float64 (torch-fidelity: a general
eigensolver on S1 S2, 9x slower at d = 2048 on two CPU cores). Precision and recall can differ from
torch-fidelity's only where a distance ties a k-NN radius to rounding (squared distances from one matrix product
here, cdist's there).

Memory: precision and recall cost n^2 distances, so they are computed in blocks of rows x columns whose distance
matrix fits in a measuring stage's share of the memory budget (bench.core.memory): the k-NN radii keep a running
k + 1 smallest per row across column blocks, the coverage tests a running "inside some ball" per row. A k-th
smallest or an "any" does not depend on the order the columns come in, and each squared distance is
|a - c|^2 + |b - c|^2 - 2 (a - c).(b - c) about one centre c per set (its mean, the same for every block), so a
block changes a distance only through the summation order of the matrix product: not at all where the products
and sums are exact (tests/test_distances.py: integer points, bit for bit at any block size), by a few ulps of the
largest squared norm otherwise. Balls are compared squared (|a - b|^2 <= r^2), with no square root to round. The
statistics and the RMS difference are sums over row blocks.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from bench.core import memory

MAX_BLOCK_ROWS = 4096  # rows of a distance block: larger blocks are no faster
MIN_BLOCK_ROWS = 64  # fewer rows per block would starve the matrix product; columns are split first


class Statistics(NamedTuple):
    mean: Tensor  # [d], float64
    covariance: Tensor  # [d, d], float64, unbiased (n - 1), as numpy.cov and torch-fidelity


def feature_statistics(features: Tensor, memory_budget: int | str | None = None) -> Statistics:
    """Mean and covariance, summed over blocks of rows: each block is cast to float64 and centred alone."""
    n, d = features.shape
    budget = memory.memory_budget(features.device, memory_budget)
    rows = max(1, budget.working // (2 * d * 8))  # a block in float64, and centred
    mean = sum(block.to(torch.float64).sum(0) for block in features.split(rows)) / n
    covariance = torch.zeros(d, d, dtype=torch.float64, device=features.device)
    for block in features.split(rows):
        centred = block.to(torch.float64) - mean
        covariance.addmm_(centred.T, centred)
    return Statistics(mean, covariance / (n - 1))


def frechet_distance(first: Statistics, second: Statistics) -> float:
    """||mu1 - mu2||^2 + tr S1 + tr S2 - 2 tr sqrt(S1 S2).

    S1 S2 is similar to a symmetric matrix, so its eigenvalues come from a symmetric eigensolver (values only):
    with S1 = L L^T (Cholesky), L^T S2 L = L^-1 (S1 S2) L. A covariance of rank below d (fewer samples than
    dimensions, or constant features) has no Cholesky factor; then R = sqrt(S1) from its eigendecomposition gives
    the symmetric R S2 R instead, at about three times the cost.
    """
    device = first.mean.device
    second = Statistics(second.mean.to(device, torch.float64), second.covariance.to(device, torch.float64))
    factor, info = torch.linalg.cholesky_ex(first.covariance)
    if info.item() != 0:
        eigenvalues, eigenvectors = torch.linalg.eigh(first.covariance)
        # factor^T S2 factor is R S2 R turned by the orthogonal eigenvectors: the same eigenvalues
        factor = eigenvectors * eigenvalues.clamp_min(0).sqrt()
    product_eigenvalues = torch.linalg.eigvalsh(factor.T @ second.covariance @ factor)
    trace_sqrt = product_eigenvalues.clamp_min(0).sqrt().sum()
    difference = first.mean - second.mean
    distance = difference @ difference + first.covariance.trace() + second.covariance.trace() - 2 * trace_sqrt
    return distance.item()


def distance_blocks(rows: int, columns: int, dtype: torch.dtype,
                    memory_budget: int | str | None = None, device: torch.device | str = "cpu") -> tuple[int, int]:
    """Rows and columns of a distance block that fits in a measuring stage's share of the budget. A block entry
    costs the distance (itemsize), a comparison's byte, and as much again for cdist's and topk's temporaries.
    Whole rows while MIN_BLOCK_ROWS of them fit; past that the columns are split too."""
    entries = max(1, memory.memory_budget(device, memory_budget).working // (2 * dtype.itemsize + 1))
    block_columns = columns if entries // columns >= MIN_BLOCK_ROWS else max(1, entries // MIN_BLOCK_ROWS)
    block_rows = min(rows, MAX_BLOCK_ROWS, max(1, entries // block_columns))
    return block_rows, block_columns


def squared_distances(rows: Tensor, columns: Tensor, centre: Tensor) -> Tensor:
    """|a - b|^2 for every row a and column b, as |a - c|^2 + |b - c|^2 - 2 (a - c).(b - c): one matrix product.
    Centring on c (the mean of the set, fixed for all blocks) keeps the cancellation small for data far from 0."""
    rows, columns = rows - centre, columns - centre
    squared = rows.square().sum(1, keepdim=True) + columns.square().sum(1)  # the block's one matrix
    return squared.addmm_(rows, columns.T, alpha=-2).clamp_min_(0)


def kth_neighbour_radii(features: Tensor, k: int, memory_budget: int | str | None = None) -> Tensor:
    """Distance from each point to its k-th nearest other point (the k + 1-th smallest, counting itself)."""
    return _squared_radii(features, k, memory_budget).sqrt()


def _squared_radii(features: Tensor, k: int, memory_budget: int | str | None) -> Tensor:
    n = len(features)
    if n <= k:
        raise ValueError(f"k-th nearest neighbours need more than k = {k} points; got {n}")
    rows, columns = distance_blocks(n, n, features.dtype, memory_budget, features.device)
    centre = features.mean(0)
    radii = torch.empty(n, dtype=features.dtype, device=features.device)
    for start in range(0, n, rows):
        block = features[start:start + rows]
        nearest = features.new_empty(len(block), 0)  # the k + 1 smallest distances per row among columns seen
        for column in range(0, n, columns):
            part = features[column:column + columns]  # the block of distances lives only inside this line:
            smallest = squared_distances(block, part, centre).topk(min(k + 1, len(part)), dim=1, largest=False).values
            candidates = torch.cat([nearest, smallest], dim=1)
            nearest = candidates.topk(min(k + 1, candidates.shape[1]), dim=1, largest=False).values
        radii[start:start + rows] = nearest[:, k]
    return radii


def coverage(queries: Tensor, centres: Tensor, radii: Tensor, memory_budget: int | str | None = None) -> float:
    """The fraction of queries inside at least one centre's ball (radii: the balls' radii)."""
    return _coverage(queries, centres, radii.square(), memory_budget)


def _coverage(queries: Tensor, centres: Tensor, squared_radii: Tensor, memory_budget: int | str | None) -> float:
    rows, columns = distance_blocks(len(queries), len(centres), queries.dtype, memory_budget, queries.device)
    centre = centres.mean(0)  # the centre the radii were measured about: the same squared distances
    covered = torch.zeros((), dtype=torch.int64, device=queries.device)
    for start in range(0, len(queries), rows):
        block = queries[start:start + rows]
        inside = torch.zeros(len(block), dtype=torch.bool, device=queries.device)
        for column in range(0, len(centres), columns):
            inside |= (squared_distances(block, centres[column:column + columns], centre)
                       <= squared_radii[column:column + columns]).any(1)
        covered += inside.sum()
    return covered.item() / len(queries)


def precision_recall(generated: Tensor, real: Tensor, k: int = 3,
                     memory_budget: int | str | None = None) -> tuple[float, float]:
    """Precision: generated points inside the real manifold (the union of real k-NN balls); recall: real points
    inside the generated manifold (Kynkaanniemi et al. 2019). In blocks within the memory budget."""
    real = real.to(generated.device, generated.dtype)
    precision = _coverage(generated, real, _squared_radii(real, k, memory_budget), memory_budget)
    recall = _coverage(real, generated, _squared_radii(generated, k, memory_budget), memory_budget)
    return precision, recall


def density_coverage(generated: Tensor, real: Tensor, k: int = 5,
                     memory_budget: int | str | None = None) -> tuple[float, float]:
    """Naeem et al. (2020)'s density and coverage, in blocks of the distance matrix within the memory budget.

    With r_i the distance from real point X_i to its k-th nearest other real point, and M generated points Y_j:

        density  = 1 / (k M) * sum_j #{i : |Y_j - X_i| < r_i}     (how many real balls hold a sample, on average)
        coverage = 1 / N     * #{i : some |Y_j - X_i| < r_i}       (the share of real balls that hold a sample)

    Unlike precision and recall, only the real points' radii are used, so outliers among the samples cannot inflate
    either. The balls are open, as in the authors' prdc package (tests/test_distances.py checks both against it).
    Squared distances about the real set's mean, as the radii were measured (squared_distances), so a block of any
    shape compares the same numbers; each block adds its counts to the density's sum and ORs its hits into the
    coverage mask.
    """
    real = real.to(generated.device, generated.dtype)
    squared_radii = _squared_radii(real, k, memory_budget)
    rows, columns = distance_blocks(len(generated), len(real), generated.dtype, memory_budget, generated.device)
    centre = real.mean(0)
    hits = torch.zeros((), dtype=torch.int64, device=generated.device)
    covered = torch.zeros(len(real), dtype=torch.bool, device=generated.device)
    for start in range(0, len(generated), rows):
        block = generated[start:start + rows]
        for column in range(0, len(real), columns):
            inside = (squared_distances(block, real[column:column + columns], centre)
                      < squared_radii[column:column + columns])  # sample j in real ball i
            hits += inside.sum()
            covered[column:column + columns] |= inside.any(0)
    return hits.item() / (k * len(generated)), covered.sum().item() / len(real)


def root_mean_square_difference(first: Tensor, second: Tensor, memory_budget: int | str | None = None) -> float:
    """sqrt(mean((first - second)^2)) over all elements, in float64, summed over blocks of rows."""
    numel = first[:1].numel()
    rows = max(1, memory.memory_budget(first.device, memory_budget).working // (3 * max(numel, 1) * 8))
    total = torch.zeros((), dtype=torch.float64, device=first.device)
    for start in range(0, len(first), rows):
        difference = first[start:start + rows].to(torch.float64) - second[start:start + rows].to(first.device,
                                                                                               torch.float64)
        total += difference.square().sum()
    return (total / first.numel()).sqrt().item()
