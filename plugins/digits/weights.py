"""The two checkpoints the digits plugin ships, by their names in pretrained/manifest.json, and how each becomes a
network. Every file goes through bench.adapters.checkpoints.load_checkpoint: confined to the manifest's folder,
its sha256 checked against the manifest, its tensors parsed from the very bytes that were checked, and put into the
network only when every name and shape fits. The Checkpoint that comes back with each network carries that sha256,
which the model reports as its provenance.

Both are made by one recipe, `samplerbench train digits` (train.py), named in every error that asks for a retrain.
"""

from __future__ import annotations

from pathlib import Path

from bench.adapters.checkpoints import Checkpoint, load_checkpoint, load_checkpoint_file, read_manifest

from .networks import DigitsClassifier, DigitsUNet

MODEL_NAME = "digits"  # the diffusion model's checkpoint, and the model's name in the harness
CLASSIFIER_NAME = "digits-classifier"  # the checkpoint of the feature network
RECIPE = "samplerbench train digits"


def shipped_weights() -> dict[str, str]:
    """The sha256 of every checkpoint the manifest in use lists (the model, the classifier, the students), by name:
    the identity of the weights behind a cell, which its key covers, so retrained weights recompute their cells."""
    return {name: str(entry.get("sha256")) if isinstance(entry, dict) else "?"
            for name, entry in sorted(read_manifest().items())}


def load_unet(directory: str | Path | None = None) -> tuple[DigitsUNet, Checkpoint]:
    """The diffusion model's network, from checkpoint "digits" of the manifest in ``directory`` (default:
    $SAMPLERBENCH_PRETRAINED, else the shipped pretrained/)."""
    checkpoint = load_checkpoint(MODEL_NAME, directory, made_by=RECIPE)
    return checkpoint.load_into(DigitsUNet()), checkpoint


def load_classifier(directory: str | Path | None = None) -> tuple[DigitsClassifier, Checkpoint]:
    """The feature network, from checkpoint "digits-classifier" of the manifest in ``directory`` (default as
    load_unet)."""
    checkpoint = load_checkpoint(CLASSIFIER_NAME, directory, made_by=RECIPE)
    return checkpoint.load_into(DigitsClassifier()), checkpoint


def load_classifier_file(path: str | Path) -> tuple[DigitsClassifier, Checkpoint]:
    """The feature network from a classifier file named by its path (torch-fidelity's
    ``feature_extractor_weights_path``), checked against the manifest in the same folder."""
    checkpoint = load_checkpoint_file(path, made_by=RECIPE)
    return checkpoint.load_into(DigitsClassifier()), checkpoint
