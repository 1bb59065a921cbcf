"""The built-in metrics: trajectory error against the reference ODE solution; FID, KID, precision and recall in
the model's feature space (torch-fidelity's values: bench/measure/distances.py computes FID and precision/recall on the
device and is checked against torch-fidelity's functions; KID is torch-fidelity's own function); Naeem et al.'s
density and coverage (checked against their prdc package); and, for models that know their true moments, the exact
Frechet distance to the data distribution."""

from __future__ import annotations

import torch
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, kid_features_to_metric

from bench.measure.distances import (Statistics, density_coverage, feature_statistics, frechet_distance,
                                     precision_recall, root_mean_square_difference)
from bench.hookspecs import hookimpl
from bench.measure.dinov2 import dinov2
from bench.measure.metrics import Metric, MetricContext

NEIGHBORHOOD = 3  # Kynkaanniemi et al. 2019
DENSITY_NEIGHBORHOOD = 5  # Naeem et al. 2020


def trajectory_error(context: MetricContext) -> float | None:
    """RMSE to the exact flow's endpoint from the same x_T; meaningless for a stochastic solver."""
    if context.stochastic:
        return None
    return root_mean_square_difference(context.samples, context.reference_solution())  # in blocks of rows


def fid(context: MetricContext) -> float:
    data = context.shared.get("fid-statistics|" + context.reference_key,
                              lambda: feature_statistics(context.reference_features()))
    return frechet_distance(feature_statistics(context.features()), data)


def fd_dinov2(context: MetricContext) -> float | None:
    """Frechet distance in DINOv2's feature space (Stein et al. 2023), for 3xHxW images; None for other samples."""
    shape = tuple(context.model.shape)
    if len(shape) != 3 or shape[0] != 3:
        return None
    # the suite's dinov2_weights_path, else SAMPLERBENCH_DINOV2_WEIGHTS; loaded once per run
    space = context.shared.get("dinov2-space", lambda: dinov2(context.shared.settings.get("dinov2_weights_path")))
    data = context.shared.get("fd-dinov2-statistics|" + context.reference_key_in(space),
                              lambda: feature_statistics(context.reference_features_in(space)))
    return frechet_distance(feature_statistics(context.features_in(space)), data)


def kid(context: MetricContext) -> float:
    """torch-fidelity's KID (polynomial kernel, 100 subsets of up to 1000), with subsets no larger than N."""
    subset = min(1000, len(context.samples))
    return kid_features_to_metric(context.features().cpu(), context.reference_features().cpu(), kid_subsets=100,
                                  kid_subset_size=subset, verbose=False)[KEY_METRIC_KID_MEAN]


def _precision_recall(context: MetricContext) -> tuple[float, float]:
    return context.memo("precision-recall",
                        lambda: precision_recall(context.features(), context.reference_features(), NEIGHBORHOOD))


def precision(context: MetricContext) -> float:
    return _precision_recall(context)[0]


def recall(context: MetricContext) -> float:
    return _precision_recall(context)[1]


def _density_coverage(context: MetricContext) -> tuple[float, float]:
    """On the samples' device (the features live on the CPU): the blocked k-NN counts are its work."""
    device = context.samples.device
    return context.memo("density-coverage", lambda: density_coverage(
        context.features().to(device), context.reference_features().to(device), DENSITY_NEIGHBORHOOD))


def density(context: MetricContext) -> float:
    return _density_coverage(context)[0]


def coverage(context: MetricContext) -> float:
    return _density_coverage(context)[1]


def frechet_exact(context: MetricContext) -> float | None:
    """Frechet distance between the samples' moments and the true data distribution's (no sampling error on
    the data side). With labels, the truth is the mixture of the classes in the proportions the labels ask for."""
    model = context.model
    if not hasattr(model, "mean") or not hasattr(model, "covariance"):
        return None
    return frechet_distance(feature_statistics(context.features()), Statistics(*_true_moments(model, context.labels)))


def _true_moments(model, labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    if labels is None:
        return model.mean(), model.covariance()
    classes, counts = labels.cpu().unique(return_counts=True)
    shares = (counts / counts.sum()).tolist()
    # the law of total covariance over the classes: E[Cov | class] + Cov[E | class]
    means = [model.mean() if c < 0 else model.mean(label=c) for c in classes.tolist()]
    covariances = [model.covariance() if c < 0 else model.covariance(label=c) for c in classes.tolist()]
    mean = sum(share * m for share, m in zip(shares, means))
    second_moment = sum(share * (cov + torch.outer(m, m)) for share, m, cov in zip(shares, means, covariances))
    return mean, second_moment - torch.outer(mean, mean)


@hookimpl
def register_metrics(register):
    register(Metric(trajectory_error, "lower", "RMSE to the reference ODE solution from the same x_T",
                    title="trajectory error", log_scale=True), name="trajectory_error")
    register(Metric(fid, "lower", "Frechet distance to as many real samples, in the model's feature space",
                    title="FID", log_scale=True), name="fid")
    register(Metric(fd_dinov2, "lower", "Frechet distance to as many real samples in DINOv2 ViT features "
                    "(Stein et al. 2023); weights: the suite's dinov2_weights_path or SAMPLERBENCH_DINOV2_WEIGHTS", title="FD-DINOv2",
                    log_scale=True), name="fd_dinov2")
    # KID's unbiased estimate can be <= 0: a linear axis
    register(Metric(kid, "lower", "Kernel distance to as many real samples (torch-fidelity's KID)", title="KID"),
             name="kid")
    register(Metric(precision, "higher", f"Kynkaanniemi et al. precision, k={NEIGHBORHOOD}", title="precision",
                    axis="fidelity"), name="precision")
    register(Metric(recall, "higher", f"Kynkaanniemi et al. recall, k={NEIGHBORHOOD}", title="recall",
                    axis="diversity"), name="recall")
    # density is not bounded by 1: samples crowding a dense region of the data count several times
    register(Metric(density, "higher", f"Naeem et al. density, k={DENSITY_NEIGHBORHOOD}", title="density",
                    axis="fidelity"), name="density")
    register(Metric(coverage, "higher", f"Naeem et al. coverage, k={DENSITY_NEIGHBORHOOD}", title="coverage",
                    axis="diversity"), name="coverage")
    register(Metric(frechet_exact, "lower", "Frechet distance to the true data moments",
                    title="exact Fréchet distance", log_scale=True), name="frechet_exact")
