"""The built-in metrics: trajectory error against the reference ODE solution; FID, KID, precision and recall in
the model's feature space (torch-fidelity's values: bench/measure/distances.py computes FID and precision/recall on the
device and is checked against torch-fidelity's functions; KID is torch-fidelity's own function); and, for models
that know their true moments, the exact Frechet distance to the data distribution."""

from __future__ import annotations

import torch
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, kid_features_to_metric

from bench.measure.distances import (Statistics, feature_statistics, frechet_distance, precision_recall,
                                     root_mean_square_difference)
from bench.hookspecs import hookimpl
from bench.measure.metrics import Metric, MetricContext

NEIGHBORHOOD = 3  # Kynkaanniemi et al. 2019


def trajectory_error(context: MetricContext) -> float | None:
    """RMSE to the exact flow's endpoint from the same x_T; meaningless for a stochastic solver."""
    if context.stochastic:
        return None
    return root_mean_square_difference(context.samples, context.reference_solution())  # in blocks of rows


def fid(context: MetricContext) -> float:
    data = context.shared.get("fid-statistics|" + context.reference_key,
                              lambda: feature_statistics(context.reference_features()))
    return frechet_distance(feature_statistics(context.features()), data)


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
    # KID's unbiased estimate can be <= 0: a linear axis
    register(Metric(kid, "lower", "Kernel distance to as many real samples (torch-fidelity's KID)", title="KID"),
             name="kid")
    register(Metric(precision, "higher", f"Kynkaanniemi et al. precision, k={NEIGHBORHOOD}", title="precision",
                    axis="fidelity"), name="precision")
    register(Metric(recall, "higher", f"Kynkaanniemi et al. recall, k={NEIGHBORHOOD}", title="recall",
                    axis="diversity"), name="recall")
    register(Metric(frechet_exact, "lower", "Frechet distance to the true data moments",
                    title="exact Fréchet distance", log_scale=True), name="frechet_exact")
