"""The two checkpoints the digits plugin ships, by their names in pretrained/manifest.json, and how each becomes a
network: through bench.adapters.checkpoints, which checks every file against the manifest before it is loaded.

Both are made by one recipe, `samplerbench train digits` (train.py), named in every error that asks for a retrain.
"""

from __future__ import annotations

from pathlib import Path

from bench.adapters.checkpoints import load_verified, read_manifest
from bench.errors import BenchError

from .networks import DigitsClassifier

MODEL_NAME = "digits"  # the diffusion model's checkpoint, and the model's name in the harness
CLASSIFIER_NAME = "digits-classifier"  # the checkpoint of the feature network
RECIPE = "samplerbench train digits"


def load_classifier(weights_path: str | Path | None = None) -> DigitsClassifier:
    """The feature network from a classifier checkpoint file listed in the manifest beside it (default: the
    shipped one)."""
    classifier = DigitsClassifier()
    if weights_path is None:
        classifier.load_state_dict(load_verified(CLASSIFIER_NAME, made_by=RECIPE))
        return classifier
    path = Path(weights_path)
    names = [name for name, entry in read_manifest(path.parent).items() if entry.get("file") == path.name]
    if not names:
        raise BenchError(f"{path} is not listed in {path.parent / 'manifest.json'}; feature-network weights are "
                         f"loaded only after their sha256 is checked against a manifest (make them with `{RECIPE}`)")
    classifier.load_state_dict(load_verified(names[0], path.parent, made_by=RECIPE))
    return classifier
