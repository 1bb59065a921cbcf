"""The feature space of the digits model: the classifier (networks.py) as a torch-fidelity feature extractor, and
the class_accuracy metric that reads samples with it.

The classifier is trained by the project on the 1,500 training images, with random shifts of up to one pixel. Its
penultimate layer (64 numbers after SiLU) is the feature space of fid, kid, precision and recall for digits. It is
registered with torch-fidelity as the feature extractor "samplerbench-digits", and `DigitsDenoiser.features`
computes features through an instance that torch-fidelity's own `create_feature_extractor` builds, so the numbers
come from torch-fidelity's code path: `torch_fidelity.calculate_metrics(feature_extractor="samplerbench-digits")`
and the harness's fid agree.

The extractor takes torch-fidelity's uint8 images and maps them back to the data's grey levels (data.from_uint8), so
real images reach the classifier as exactly the values it was trained on.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch_fidelity
from torch import Tensor
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.helpers import vassert
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import create_feature_extractor

from bench.core.guidance import NO_LABEL
from bench.measure.metrics import MetricContext

from .data import IMAGE_SHAPE, from_uint8
from .networks import DigitsClassifier
from .weights import load_classifier, load_classifier_file

FEATURE_EXTRACTOR_NAME = "samplerbench-digits"  # its name in torch-fidelity's registry


class DigitsFeatureExtractor(FeatureExtractorBase):
    """The digits classifier as a torch-fidelity feature extractor: uint8 images [B, 1 or 3, 8, 8] in, features
    "64" (the penultimate layer, the default for fid / kid / prc) and "logits" out, float32.

    ``feature_extractor_weights_path``: a classifier safetensors file listed in the manifest beside it, loaded
    through weights.py with every check; default: the shipped pretrained/digits-classifier.safetensors.
    ``classifier``: a DigitsClassifier in memory instead (load_digits_model gives the one it loaded; the training
    recipe evaluates with one before saving it). Three-channel input (what torch-fidelity's image datasets
    produce) is read as grey, the mean of its channels.
    """

    def __init__(self, name: str, features_list: list[str], feature_extractor_weights_path: str | None = None,
                 feature_extractor_internal_dtype: str | None = None, classifier: DigitsClassifier | None = None,
                 **kwargs) -> None:
        super().__init__(name, features_list)
        vassert(feature_extractor_internal_dtype in ("float32", "float64", None),
                "Only 32 and 64 bit floats are supported for internal dtype of this feature extractor")
        self.internal_dtype = torch.float64 if feature_extractor_internal_dtype == "float64" else torch.float32
        if classifier is None:
            path = feature_extractor_weights_path
            classifier, _ = load_classifier() if path is None else load_classifier_file(path)
        self.classifier = classifier  # given: a network fresh from training, before it is saved
        self.to(self.internal_dtype)
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        vassert(torch.is_tensor(x) and x.dtype == torch.uint8, "Expecting image as torch.Tensor with dtype=torch.uint8")
        vassert(x.dim() == 4 and x.shape[1] in (1, 3) and tuple(x.shape[2:]) == IMAGE_SHAPE[1:],
                f"Input is not Bx1x8x8 (or Bx3x8x8): {tuple(x.shape)}")
        if x.shape[1] == 3:
            x = x.to(torch.float32).mean(dim=1, keepdim=True).round().to(torch.uint8)
        features = self.classifier.features(from_uint8(x, self.internal_dtype))
        computed = {"64": features, "logits": self.classifier.head(features)}
        return tuple(computed[name].to(torch.float32) for name in self.features_list)

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return "64", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return {"isc": "logits", "fid": "64", "kid": "64", "prc": "64"}[metric]

    @staticmethod
    def can_be_compiled() -> bool:
        return False  # a handful of small convolutions: compiling costs more than it saves

    @staticmethod
    def get_dummy_input_for_compile() -> Tensor:
        return torch.zeros(1, *IMAGE_SHAPE, dtype=torch.uint8)


if FEATURE_EXTRACTOR_NAME not in FEATURE_EXTRACTORS_REGISTRY:  # the registry refuses a second registration
    torch_fidelity.register_feature_extractor(FEATURE_EXTRACTOR_NAME, DigitsFeatureExtractor)


def create_digits_feature_extractor(weights_path: str | Path | None = None, device: str | torch.device = "cpu",
                                    classifier: DigitsClassifier | None = None) -> DigitsFeatureExtractor:
    """The registered extractor, built by torch-fidelity's own factory (as `calculate_metrics` builds it), from
    verified weights on disk (``weights_path``, default the shipped ones) or from a ``classifier`` in memory."""
    extra = {} if classifier is None else {"classifier": classifier}
    extractor = create_feature_extractor(FEATURE_EXTRACTOR_NAME, ["64", "logits"], cuda=False, verbose=False,
                                         feature_extractor_weights_path=None if weights_path is None
                                         else str(weights_path), **extra)
    return extractor.to(device)


# ------------------------------------------------------------------------------------------------ the metric

def class_accuracy(context: MetricContext) -> float | None:
    """The share of samples the feature network classifies as the label they were drawn for; None when the cell
    has no labels or the model no classifier. Samples drawn with label -1 ("no label") are left out."""
    if context.labels is None or not hasattr(context.model, "classify"):
        return None
    labels = context.labels.cpu()
    asked = labels != NO_LABEL
    if not bool(asked.any()):
        return None
    predicted = context.memo("classify", lambda: context.model.classify(context.samples)).argmax(1).cpu()
    return (predicted[asked] == labels[asked]).double().mean().item()

