"""Shipped weights, loaded only when they are exactly the bytes their manifest vouches for.

``pretrained/`` holds safetensors files and one ``manifest.json`` that says, for each checkpoint, which file it is,
its sha256, and how it was made::

    {"digits": {"file": "digits.safetensors", "sha256": "...",
                "recipe": "samplerbench train digits", "arguments": ["--seed", "0", ...],
                "data_sha256": "...",                    # the training data the weights saw
                "training": {"loss": ..., "seconds": ..., "device": ...},
                "evaluation": {...}}}                    # the figures the recipe measured

Weights are never unpickled: safetensors holds plain tensors and nothing executable. The file is read once, its
sha256 taken over those very bytes, and the tensors parsed from them, so what is checked is what is loaded.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
from torch import Tensor

from bench.errors import BenchError

ENVIRONMENT_VARIABLE = "SAMPLERBENCH_PRETRAINED"
MANIFEST_NAME = "manifest.json"


def pretrained_dir() -> Path:
    """Where shipped checkpoints live: $SAMPLERBENCH_PRETRAINED, else the installed ``pretrained`` package's
    data (its files ship with the distribution as package data)."""
    configured = os.environ.get(ENVIRONMENT_VARIABLE)
    if configured:
        return Path(configured)
    return Path(str(importlib.resources.files("pretrained")))


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_manifest(directory: str | Path | None = None) -> dict[str, Any]:
    """The manifest of ``directory`` (default: pretrained_dir()) as a dict; {} when there is none yet."""
    path = Path(directory or pretrained_dir()) / MANIFEST_NAME
    if not path.exists():
        return {}
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise BenchError(f"{path} is not valid JSON ({error}); restore it from git or retrain") from None
    if not isinstance(manifest, dict):
        raise BenchError(f"{path} must hold a JSON object of checkpoints by name")
    return manifest


def manifest_entry(name: str, directory: str | Path | None = None, made_by: str | None = None) -> dict[str, Any]:
    """The manifest's record of checkpoint ``name``; an error that says what to run when there is none."""
    directory = Path(directory or pretrained_dir())
    remedy = f"; run `{made_by}` to make it" if made_by else ""
    manifest_path = directory / MANIFEST_NAME
    if not manifest_path.exists():
        raise BenchError(f"no checkpoint manifest at {manifest_path}, so checkpoint {name!r} cannot be verified{remedy}")
    manifest = read_manifest(directory)
    if name not in manifest:
        known = ", ".join(sorted(manifest)) or "none"
        raise BenchError(f"checkpoint {name!r} is not in {manifest_path} (it lists: {known}){remedy}")
    return manifest[name]


def load_verified(name: str, directory: str | Path | None = None, *, made_by: str | None = None) -> dict[str, Tensor]:
    """The tensors of checkpoint ``name``, after checking the file's sha256 against the manifest.

    ``made_by`` is the command that makes the checkpoint, named in the error when the manifest has no entry for it
    (an entry names its own recipe). Raises BenchError on a missing file or entry, or on any hash mismatch.
    """
    directory = Path(directory or pretrained_dir())
    entry = manifest_entry(name, directory, made_by)
    remedy = f"; run `{entry.get('recipe') or made_by}` to remake it" if (entry.get("recipe") or made_by) else ""
    file_name = entry.get("file", "")
    # the manifest names a file beside it, never a path elsewhere on the machine
    if not file_name or Path(file_name).name != file_name:
        raise BenchError(f"checkpoint {name!r}: the manifest's file {file_name!r} must be a plain file name "
                         f"inside {directory}")
    path = directory / file_name
    if not path.is_file():
        raise BenchError(f"checkpoint {name!r}: {path} is missing{remedy}")
    data = path.read_bytes()
    expected, actual = entry.get("sha256"), sha256_hex(data)
    if actual != expected:
        raise BenchError(f"checkpoint {name!r}: {path} does not match its manifest, refusing to load it "
                         f"(sha256 expected {expected}, actual {actual}); the file was changed or corrupted"
                         f"{remedy}")
    return safetensors.torch.load(data)


def save_checkpoint(name: str, tensors: Mapping[str, Tensor], recipe: str, arguments: list[str], data_sha256: str,
                    training: dict[str, Any], evaluation: dict[str, Any],
                    directory: str | Path | None = None) -> dict[str, Any]:
    """Write ``<directory>/<name>.safetensors`` and record it in the manifest; returns the manifest entry.

    Both writes go to a temporary file first and are moved into place (an atomic rename on one file system), so an
    interrupted save never leaves a half-written checkpoint or manifest behind. Other entries are kept.
    """
    directory = Path(directory or pretrained_dir())
    directory.mkdir(parents=True, exist_ok=True)
    file_name = f"{name}.safetensors"
    # safetensors wants contiguous CPU tensors; clone so that shared storage (tied weights) is saved twice, simply
    plain = {key: value.detach().to("cpu").contiguous().clone() for key, value in tensors.items()}
    data = safetensors.torch.save(plain, metadata={"name": name, "recipe": recipe})
    _write_atomically(directory / file_name, data)
    entry = {"file": file_name, "sha256": sha256_hex(data), "recipe": recipe, "arguments": list(arguments),
             "data_sha256": data_sha256, "training": training, "evaluation": evaluation}
    manifest = read_manifest(directory)
    manifest[name] = entry
    _write_manifest(directory, manifest)
    return entry


def record_evaluation(name: str, evaluation: dict[str, Any], evaluated_by: str,
                      directory: str | Path | None = None) -> dict[str, Any]:
    """Replace the evaluation of checkpoint ``name`` in the manifest (the weights, their sha256 and their training
    record stay as they are) and say which command measured it; returns the entry."""
    directory = Path(directory or pretrained_dir())
    manifest = read_manifest(directory)
    if name not in manifest:
        raise BenchError(f"checkpoint {name!r} is not in {directory / MANIFEST_NAME}; nothing to evaluate")
    manifest[name] = {**manifest[name], "evaluation": evaluation, "evaluated_by": evaluated_by}
    _write_manifest(directory, manifest)
    return manifest[name]


def _write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    text = json.dumps(dict(sorted(manifest.items())), indent=2) + "\n"
    _write_atomically(directory / MANIFEST_NAME, text.encode())


def _write_atomically(path: Path, data: bytes) -> None:
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o644)  # mkstemp makes the file private; a checkpoint is meant to be read by all
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def tensor_sha256(*tensors: Tensor) -> str:
    """sha256 of tensors' raw bytes in order (CPU, C order): a fingerprint of a data set."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().to("cpu").contiguous().numpy().tobytes())
    return digest.hexdigest()

