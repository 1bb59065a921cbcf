"""Distances between two sets of features, on whatever device the features live: Frechet distance (FID) and
Kynkaanniemi et al.'s improved precision and recall.

They give torch-fidelity's values (tests/test_distances.py checks both against its functions) at a fraction of its
cost: torch-fidelity takes the k-th nearest neighbour on the CPU (`kthvalue` after moving each distance block off
the GPU) and the trace of sqrt(S1 S2) from a general eigensolver; here the k-NN radii are a `topk` on the device,
and the trace comes from two symmetric eigendecompositions in float64. Precision and recall can differ from
torch-fidelity's only where a distance ties a k-NN radius to rounding (a different summation order inside cdist).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class Statistics(NamedTuple):
    mean: Tensor  # [d], float64
    covariance: Tensor  # [d, d], float64, unbiased (n - 1), as numpy.cov and torch-fidelity


def feature_statistics(features: Tensor) -> Statistics:
    features = features.to(torch.float64)
    mean = features.mean(0)
    centred = features - mean
    return Statistics(mean, centred.T @ centred / (len(features) - 1))


def frechet_distance(first: Statistics, second: Statistics) -> float:
    """||mu1 - mu2||^2 + tr S1 + tr S2 - 2 tr sqrt(S1 S2), with tr sqrt(S1 S2) = sum sqrt(eig(R S2 R)) for
    R = sqrt(S1): R S2 R is symmetric and similar to S1 S2, so a symmetric eigensolver suffices."""
    device = first.mean.device
    second = Statistics(second.mean.to(device, torch.float64), second.covariance.to(device, torch.float64))
    eigenvalues, eigenvectors = torch.linalg.eigh(first.covariance)
    root = (eigenvectors * eigenvalues.clamp_min(0).sqrt()) @ eigenvectors.T
    product_eigenvalues = torch.linalg.eigvalsh(root @ second.covariance @ root)
    trace_sqrt = product_eigenvalues.clamp_min(0).sqrt().sum()
    difference = first.mean - second.mean
    distance = difference @ difference + first.covariance.trace() + second.covariance.trace() - 2 * trace_sqrt
    return distance.item()


def kth_neighbour_radii(features: Tensor, k: int, chunk: int = 4096) -> Tensor:
    """Distance from each point to its k-th nearest other point (the k + 1-th smallest, counting itself)."""
    radii = [torch.cdist(rows, features).topk(k + 1, dim=1, largest=False).values[:, -1]
             for rows in features.split(chunk)]
    return torch.cat(radii)


def coverage(queries: Tensor, centres: Tensor, radii: Tensor, chunk: int = 4096) -> float:
    """The fraction of queries inside at least one centre's ball."""
    inside = [(torch.cdist(rows, centres) <= radii).any(dim=1) for rows in queries.split(chunk)]
    return torch.cat(inside).to(torch.float64).mean().item()


def precision_recall(generated: Tensor, real: Tensor, k: int = 3) -> tuple[float, float]:
    """Precision: generated points inside the real manifold (the union of real k-NN balls); recall: real points
    inside the generated manifold (Kynkaanniemi et al. 2019)."""
    real = real.to(generated.device, generated.dtype)
    precision = coverage(generated, real, kth_neighbour_radii(real, k))
    recall = coverage(real, generated, kth_neighbour_radii(generated, k))
    return precision, recall
