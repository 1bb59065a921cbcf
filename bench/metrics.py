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
from typing import Any

import torch
from torch import Tensor

from bench.errors import BenchError
from bench.reference import ReferenceCache

REFERENCE_DATA_SEED = 2**31 - 1  # the real-data draw for FID and precision/recall, distinct from any sample seed


@dataclass(frozen=True)
class Metric:
    compute: Callable[["MetricContext"], float | None]
    better: str = "lower"  # or "higher"
    description: str = ""


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
    _memo: dict[str, Any] = field(default_factory=dict)

    def memo(self, key: str, compute: Callable[[], Any]) -> Any:
        """A quantity computed once per cell however many metrics need it (precision and recall share one)."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def features(self) -> Tensor:
        """The samples in the model's declared feature space, float64 on the CPU."""
        return self.memo("features", lambda: _extract(self.model, self.samples))

    @property
    def reference_key(self) -> str:
        """Names the real-data draw: model, N, labels and seed; a different N or dataset never shares it."""
        return f"{self.model_id}|{len(self.samples)}|{_digest(self.labels)}|{REFERENCE_DATA_SEED}"

    def reference_features(self) -> Tensor:
        """Features of as many real data points as there are samples, with the same labels."""
        n = len(self.samples)

        def draw() -> Tensor:
            if not hasattr(self.model, "sample_data"):
                raise BenchError(f"model {self.model_id} provides no real data (sample_data); "
                                 "fid, precision and recall need it")
            labels = self.labels.cpu() if self.labels is not None else None
            return _extract(self.model, self.model.sample_data(n, seed=REFERENCE_DATA_SEED, labels=labels))

        return self.shared.get("features|" + self.reference_key, draw)

    def reference_solution(self) -> Tensor:
        return self.references.get(self.model, self.model_id, self.seed, self.x_T, self.labels)


class SharedCache:
    """Across cells: real-data features by (model, N, labels), never reused for a different N or dataset."""

    def __init__(self) -> None:
        self._items: dict[str, Any] = {}

    def get(self, key: str, compute: Callable[[], Any]) -> Any:
        if key not in self._items:
            self._items[key] = compute()
        return self._items[key]


def _extract(model, x: Tensor) -> Tensor:
    if not hasattr(model, "features"):
        raise BenchError(f"model {getattr(model, 'name', model)!r} declares no feature space (a `features` method)")
    with torch.inference_mode():
        return model.features(x).to(device="cpu", dtype=torch.float64)


def _digest(labels: Tensor | None) -> str:
    if labels is None:
        return "none"
    return hashlib.sha256(labels.cpu().to(torch.int64).numpy().tobytes()).hexdigest()[:16]


def model_id(name: str, options: dict[str, Any], model: Any) -> str:
    """Identifies a model's weights: its name, its options, and its content hash when it has one."""
    return json.dumps({"name": name, "options": options, "content": getattr(model, "content_hash", None)},
                      sort_keys=True)
