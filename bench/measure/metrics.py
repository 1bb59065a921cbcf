"""What a metric sees: the samples of one cell, and everything derived from them computed once and shared.

A metric is registered as ``Metric(compute, better=...)``; ``compute(context)`` returns a float, or None where the
metric does not apply (trajectory error of a stochastic solver, exact moments of a model that has none). Features
of the samples and of the reference data are extracted once per cell and shared by every metric; reference data
features and reference ODE solutions are cached across cells.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from bench.errors import BenchError
from bench.files import atomic_path
from bench.measure.features import FeatureSpace, feature_space_for
from bench.measure.reference import ReferenceCache

REFERENCE_DATA_SEED = 2**31 - 1  # the real-data draw for FID and precision/recall, distinct from any sample seed


AXES = ("quality", "fidelity", "diversity", "other")


@dataclass(frozen=True)
class Metric:
    """A metric and everything a report needs to draw it, declared once by the plugin that registers it.

    ``axis`` places it on the trilemma: "quality" (how close samples are to the truth: FID, trajectory error),
    "fidelity" (precision: how many samples look real) and "diversity" (recall: how much of the data is covered);
    the report draws quality against wall-clock, and precision against recall.
    """

    compute: Callable[["MetricContext"], float | None]
    better: str = "lower"  # or "higher"
    description: str = ""
    title: str = ""  # how figures and tables name it; default: the registered name
    log_scale: bool = False  # spans decades (errors, distances): drawn on a log axis
    axis: str = "quality"

    def __post_init__(self) -> None:
        if self.better not in ("lower", "higher"):
            raise ValueError(f"Metric.better must be 'lower' or 'higher'; got {self.better!r}")
        if self.axis not in AXES:
            raise ValueError(f"Metric.axis must be one of {', '.join(AXES)}; got {self.axis!r}")

    def info(self, name: str) -> dict[str, Any]:
        """The metadata the store keeps beside the rows (bench.sweep.store)."""
        return {"name": name, "title": self.title or name.replace("_", " "), "better": self.better,
                "log_scale": self.log_scale, "axis": self.axis, "description": self.description}


@dataclass
class MetricContext:
    model: Any
    model_id: str
    samples: Tensor
    x_T: Tensor
    labels: Tensor | None
    seed: int
    stochastic: bool
    references: ReferenceCache
    shared: "SharedCache"
    feature_space: FeatureSpace | None = None  # None: the model's own (bench.measure.features.feature_space_for)
    _memo: dict[str, Any] = field(default_factory=dict)

    def space(self) -> FeatureSpace:
        """Resolved on first use: a cell measuring only trajectory error needs no feature space."""
        if self.feature_space is None:
            self.feature_space = feature_space_for(self.model)
        return self.feature_space

    def memo(self, key: str, compute: Callable[[], Any]) -> Any:
        """A quantity computed once per cell however many metrics need it (precision and recall share one)."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def features(self) -> Tensor:
        """The samples in the model's declared feature space, float64 on the CPU."""
        return self.memo("features", lambda: self.space()(self.samples))

    @property
    def reference_key(self) -> str:
        """Names the real-data features: the data (model id and its content hash), the feature space, N, labels
        and seed. A changed dataset, extractor or N never reuses stale features or statistics."""
        return (f"{self.model_id}|{self.space().name}|{len(self.samples)}|{_digest(self.labels)}|"
                f"{REFERENCE_DATA_SEED}")

    def reference_features(self) -> Tensor:
        """Features of as many real data points as there are samples, with the same labels."""
        n = len(self.samples)

        def draw() -> Tensor:
            if not hasattr(self.model, "sample_data"):
                raise BenchError(f"model {self.model_id} provides no real data (sample_data); "
                                 "fid, precision and recall need it")
            labels = self.labels.cpu() if self.labels is not None else None
            return self.space()(self.model.sample_data(n, seed=REFERENCE_DATA_SEED, labels=labels))

        return self.shared.get("features|" + self.reference_key, draw, persist=True)

    def features_in(self, space: FeatureSpace) -> Tensor:
        """The samples in another feature space than the model's (DINOv2's for FD-DINOv2), once per cell."""
        return self.memo(f"features|{space.name}", lambda: space(self.samples))

    def reference_features_in(self, space: FeatureSpace) -> Tensor:
        """The real data of ``reference_features`` in ``space``, cached under a key that names the space."""
        n = len(self.samples)

        def draw() -> Tensor:
            labels = self.labels.cpu() if self.labels is not None else None
            return space(self.model.sample_data(n, seed=REFERENCE_DATA_SEED, labels=labels))

        if not hasattr(self.model, "sample_data"):
            raise BenchError(f"model {self.model_id} provides no real data (sample_data); a distance to the data "
                             "needs it")
        return self.shared.get("features|" + self.reference_key_in(space), draw, persist=True)

    def reference_key_in(self, space: FeatureSpace) -> str:
        """``reference_key`` for the real data in ``space``."""
        return f"{self.model_id}|{space.name}|{len(self.samples)}|{_digest(self.labels)}|{REFERENCE_DATA_SEED}"

    def reference_solution(self) -> Tensor:
        return self.references.get(self.model, self.model_id, self.x_T, self.labels)


class SharedCache:
    """Across cells: real-data features and their statistics, by a key naming the data, the feature space, N and
    the labels. With a directory, features also persist across runs as safetensors named by the key's hash.
    ``settings`` are the run's own (the suite's ``dinov2_weights_path``), for metrics to read."""

    def __init__(self, directory: str | Path | None = None, settings: dict[str, Any] | None = None) -> None:
        self.directory = Path(directory) if directory is not None else None
        self.settings = dict(settings or {})
        self._items: dict[str, Any] = {}

    def get(self, key: str, compute: Callable[[], Any], *, persist: bool = False) -> Any:
        if key in self._items:
            return self._items[key]
        path = None
        if persist and self.directory is not None:
            path = self.directory / f"features-{hashlib.sha256(key.encode()).hexdigest()[:32]}.safetensors"
        if path is not None and path.exists():
            value = load_file(path)["features"]
        else:
            value = compute()
            if path is not None:
                with atomic_path(path) as temporary:
                    save_file({"features": value.contiguous()}, temporary, metadata={"key": key})
        self._items[key] = value
        return value


def _digest(labels: Tensor | None) -> str:
    if labels is None:
        return "none"
    return hashlib.sha256(labels.cpu().to(torch.int64).numpy().tobytes()).hexdigest()[:16]


def model_id(name: str, options: dict[str, Any], model: Any) -> str:
    """Identifies a model's weights: its name, its options, and its content hash when it has one."""
    return json.dumps({"name": name, "options": options, "content": getattr(model, "content_hash", None)},
                      sort_keys=True)
