"""Feature spaces for FID, KID and precision/recall.

A model declares its own with a ``features(x)`` method (raw coordinates for the analytic models, a shipped
classifier registered with torch-fidelity for digits) and names it with ``feature_space_name``. A 3xHxW image
model that declares none gets torch-fidelity's Inception (2048-d pool features, the field's FID), whose weights
file is not bundled and cannot be downloaded here: the suite names it (``feature_extractor_weights_path``) or the
environment does (SAMPLERBENCH_INCEPTION_WEIGHTS).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from bench.core import memory
from bench.errors import BenchError

INCEPTION_WEIGHTS_ENV = "SAMPLERBENCH_INCEPTION_WEIGHTS"
INCEPTION = "inception-v3-compat"


@dataclass
class FeatureSpace:
    name: str  # part of every cache key of real-data features
    extract: Callable[[Tensor], Tensor]  # a batch of samples -> [batch, d] features; one sample's alone
    dim: int | None = None  # d, where known before extracting (the cell's memory check counts it)

    def __call__(self, x: Tensor, memory_budget: int | str | None = None) -> Tensor:
        """[n, d] float64 on the CPU, extracted in batches whose working set (measured on the first one) fits in
        a measuring stage's share of the memory budget on x's device (bench.core.memory)."""
        n, probe = len(x), min(len(x), memory.PROBE_SAMPLES)
        with torch.inference_mode():
            first, peak = memory.measure_peak(lambda: self.extract(x[:probe]), x.device)
            features = torch.empty((n, *first.shape[1:]), dtype=torch.float64)
            features[:probe] = first
            del first
            if n > probe:
                budget = memory.memory_budget(x.device, memory_budget)
                batch = memory.probed_batch(n - probe, budget, 0, peak, probe, f"{self.name} features",
                                            room=budget.working)
                for start in range(probe, n, batch):
                    features[start:start + batch] = self.extract(x[start:start + batch])
        return features


def feature_space_for(model, weights_path: str | None = None) -> FeatureSpace:
    if hasattr(model, "features"):
        return FeatureSpace(getattr(model, "feature_space_name", f"{getattr(model, 'name', 'model')}-features"),
                            model.features, getattr(model, "feature_dim", None))
    shape = tuple(model.shape)
    if len(shape) == 3 and shape[0] == 3:
        return inception(weights_path)
    raise BenchError(f"model {getattr(model, 'name', model)!r} with samples of shape {shape} declares no feature "
                     "space (a `features` method), and Inception needs 3xHxW images; fid, kid, precision and recall "
                     "cannot be computed for it")


def to_uint8(x: Tensor) -> Tensor:
    """Samples in [-1, 1] as the uint8 images torch-fidelity's extractors take."""
    return ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def inception(weights_path: str | None = None, batch_size: int = 64) -> FeatureSpace:
    path = weights_path or os.environ.get(INCEPTION_WEIGHTS_ENV)
    if not path:
        raise BenchError("FID, KID and precision/recall of 3xHxW images use torch-fidelity's Inception, whose weights "
                         "are not bundled and cannot be downloaded here: set `feature_extractor_weights_path` in the "
                         f"suite, or the environment variable {INCEPTION_WEIGHTS_ENV}, to the file "
                         "pt_inception-2015-12-05-6726825d.pth")
    if not Path(path).is_file():
        raise BenchError(f"Inception weights file {path!r} does not exist (feature_extractor_weights_path)")
    try:
        # torch-fidelity loads the file with weights_only=False; refuse anything but plain tensors first
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise BenchError(f"Inception weights file {path!r} is not a plain state dict of tensors: {error}") from None
    from torch_fidelity.utils import create_feature_extractor

    extractor = create_feature_extractor(INCEPTION, ["2048"], cuda=False, feature_extractor_weights_path=path,
                                         verbose=False)

    def extract(x: Tensor) -> Tensor:
        device = x.device
        extractor.to(device)
        pieces = [extractor(to_uint8(batch))[0] for batch in x.split(batch_size)]
        return torch.cat(pieces)

    return FeatureSpace(INCEPTION, extract, dim=2048)
