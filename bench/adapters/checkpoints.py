"""Checkpoints, loaded only when they are exactly the bytes their manifest vouches for.

A checkpoint folder (``pretrained/``, or wherever a training recipe writes) holds safetensors files and one
``manifest.json`` that says, for each checkpoint, which file it is, its sha256, and how it was made::

    {"digits": {"file": "digits.safetensors", "sha256": "...",
                "recipe": "samplerbench train digits", "arguments": ["--seed", "0", ...],
                "data_sha256": "...",                    # the training data the weights saw
                "training": {"loss": ..., "seconds": ..., "device": ...},
                "evaluation": {...}}}                    # the figures the recipe measured

Every checkpoint is loaded by one function, `load_checkpoint`, which trusts nothing it reads:

1. the manifest must be a JSON object, and the checkpoint's entry an object with a string ``file`` and a ``sha256``
   of 64 hexadecimal digits;
2. ``file`` must be a plain, printable file name (no folder part, not absolute, not '..', no NUL), and the file it
   names, after any symlink is followed, must be a regular file inside the manifest's folder: a manifest cannot
   make us read a file elsewhere on the machine;
3. the file is read once, and only if it is at most ``max_bytes`` long (``DEFAULT_MAX_BYTES``, 1 GiB, unless the
   caller passes another limit), so a hostile entry cannot make us read a huge file;
4. the sha256 of those bytes is compared with the manifest's, and the same bytes are parsed by safetensors (plain
   tensors; nothing is unpickled), so what is checked is what is loaded, and `Checkpoint.sha256` is that hash;
5. `Checkpoint.load_into` puts the tensors into a network only when their names, shapes and dtypes are exactly the
   network's.

Each failure is a BenchError that names the file, says what was wrong and what to do about it.

Where the shipped checkpoints are: the folder named by $SAMPLERBENCH_PRETRAINED, else the ``pretrained`` package's
data (``importlib.resources.files("pretrained")``), which ships with the distribution.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import os
import re
import stat
import struct
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import safetensors.torch
from torch import Tensor, nn

from bench.errors import BenchError

ENVIRONMENT_VARIABLE = "SAMPLERBENCH_PRETRAINED"
MANIFEST_NAME = "manifest.json"
# The most a checkpoint file may hold before we refuse to read it. The shipped ones are a few MB; a caller with a
# larger network passes max_bytes to load_checkpoint.
DEFAULT_MAX_BYTES = 1 << 30  # 1 GiB
MAX_MANIFEST_BYTES = 16 << 20  # a manifest is a few kB of JSON; 16 MiB leaves room for thousands of entries
SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")
SHOWN_NAMES = 5  # how many offending tensor names an error lists before "and N more"

Network = TypeVar("Network", bound=nn.Module)


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint whose bytes matched its manifest: the tensors parsed from those bytes, and their sha256."""

    name: str  # its key in the manifest
    path: Path  # the manifest's folder / the entry's file name
    sha256: str  # of the bytes that were read, checked and parsed (lower case)
    entry: dict[str, Any] = field(repr=False)  # its manifest entry (file and sha256 checked; the rest as written)
    tensors: dict[str, Tensor] = field(repr=False)

    def load_into(self, network: Network) -> Network:
        """Copy the tensors into ``network`` (returned) when they are exactly its state: the same names, shapes and
        dtypes. Otherwise a BenchError that names the missing, unexpected and mismatched tensors."""
        expected, given = network.state_dict(), self.tensors
        missing = [repr(key) for key in sorted(expected.keys() - given.keys())]
        unexpected = [_shown(key) for key in sorted(given.keys() - expected.keys())]  # names read from the file
        mismatched = [f"{key!r} (file: {_form(given[key])}, network: {_form(expected[key])})"
                      for key in sorted(expected.keys() & given.keys()) if _form(given[key]) != _form(expected[key])]
        problems = [f"{label} {_listing(names)}" for label, names in (
            ("missing tensors", missing), ("unexpected tensors", unexpected),
            ("tensors of another shape or dtype", mismatched)) if names]
        if problems:
            raise BenchError(f"checkpoint {self.name!r}: {self.path} does not fit the network "
                             f"{type(network).__name__}: {'; '.join(problems)}. It was made for another network, or "
                             f"another version of this one{_remedy(self.entry.get('recipe'))}")
        network.load_state_dict(self.tensors, strict=True)
        return network


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
    """The manifest of ``directory`` (default: pretrained_dir()) as a dict; {} when there is none yet. Raises
    BenchError when it is not a JSON object. Entries are checked when they are used (manifest_entry)."""
    manifest = _read_manifest_if_any(Path(directory or pretrained_dir()) / MANIFEST_NAME)
    return {} if manifest is None else manifest


def manifest_entry(name: str, directory: str | Path | None = None, made_by: str | None = None) -> dict[str, Any]:
    """The manifest's record of checkpoint ``name``, its ``file`` (a plain file name) and ``sha256`` (64 hexadecimal
    digits, returned in lower case) checked for form. ``made_by``, the command that makes the checkpoint, is named
    in the errors."""
    manifest_path = Path(directory or pretrained_dir()) / MANIFEST_NAME
    manifest = _read_manifest_if_any(manifest_path)
    if manifest is None:
        raise BenchError(f"no checkpoint manifest at {manifest_path}, so checkpoint {name!r} cannot be verified"
                         f"{_remedy(made_by)}")
    if name not in manifest:
        known = ", ".join(sorted(map(repr, manifest))) or "none"
        raise BenchError(f"checkpoint {name!r} is not in {manifest_path} (it lists: {known}){_remedy(made_by)}")
    entry = manifest[name]
    where = f"checkpoint {name!r} in {manifest_path}"
    if not isinstance(entry, dict):
        raise BenchError(f"{where} must be a JSON object with 'file' and 'sha256'; it is {_json_kind(entry)}"
                         f"{_RESTORE_MANIFEST}")
    for key in ("file", "sha256"):
        if not isinstance(entry.get(key), str):
            found = "missing" if key not in entry else f"{_json_kind(entry[key])}, {_shown(entry[key])}"
            raise BenchError(f"{where}: '{key}' must be a string; it is {found}{_RESTORE_MANIFEST}")
    _check_plain_file_name(entry["file"], where)
    if not SHA256_HEX.fullmatch(entry["sha256"]):
        raise BenchError(f"{where}: 'sha256' must be 64 hexadecimal digits (as sha256sum prints them); it is "
                         f"{_shown(entry['sha256'])}{_RESTORE_MANIFEST}")
    recipe = entry.get("recipe", "")
    if not isinstance(recipe, str) or not recipe.isprintable():  # it is printed in error messages
        raise BenchError(f"{where}: 'recipe' must be the command that makes the checkpoint, a printable string; "
                         f"it is {_json_kind(recipe)}, {_shown(recipe)}{_RESTORE_MANIFEST}")
    return {**entry, "sha256": entry["sha256"].lower()}


def load_checkpoint(name: str, directory: str | Path | None = None, *, made_by: str | None = None,
                    max_bytes: int = DEFAULT_MAX_BYTES) -> Checkpoint:
    """Checkpoint ``name`` of the manifest in ``directory`` (default: pretrained_dir()), verified as the module
    docstring describes: confined to the directory, at most ``max_bytes`` long, its sha256 the manifest's.

    ``made_by`` is the command that makes the checkpoint, named in the error when the manifest has no entry for it
    (an entry names its own recipe). Every problem is a BenchError.
    """
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0:
        raise BenchError(f"max_bytes must be a positive number of bytes; got {max_bytes!r}")
    directory = Path(directory or pretrained_dir())
    entry = manifest_entry(name, directory, made_by)
    remedy = _remedy(entry.get("recipe") or made_by)
    path = directory / entry["file"]
    resolved = _resolve_inside(directory, entry["file"], f"checkpoint {name!r} in {directory / MANIFEST_NAME}")
    data = _read_regular_file(resolved, max_bytes, f"checkpoint {name!r}: {path}", remedy, follow_symlinks=False,
                              limit_hint="; pass a larger max_bytes to load_checkpoint if it is meant to be this large")
    if data is None:
        raise BenchError(f"checkpoint {name!r}: {path} is missing{remedy}")
    actual = sha256_hex(data)
    if actual != entry["sha256"]:
        raise BenchError(f"checkpoint {name!r}: {path} does not match its manifest, refusing to load it "
                         f"(sha256 expected {entry['sha256']}, actual {actual}); the file was changed or corrupted"
                         f"{remedy}")
    return Checkpoint(name, path, actual, entry, _parse_safetensors(data, f"checkpoint {name!r}: {path}", remedy))


def load_checkpoint_file(path: str | Path, *, made_by: str | None = None,
                         max_bytes: int = DEFAULT_MAX_BYTES) -> Checkpoint:
    """The checkpoint in file ``path``, verified against the manifest beside it: the entry whose ``file`` is the
    path's name is loaded through load_checkpoint, so the same checks apply."""
    path = Path(path)
    manifest = read_manifest(path.parent)
    names = sorted(name for name, entry in manifest.items()
                   if isinstance(entry, dict) and entry.get("file") == path.name)
    if not names:
        raise BenchError(f"{path} is not listed in {path.parent / MANIFEST_NAME}; checkpoint files are loaded only "
                         f"after their sha256 is checked against the manifest beside them{_remedy(made_by)}")
    return load_checkpoint(names[0], path.parent, made_by=made_by, max_bytes=max_bytes)


def save_checkpoint(name: str, tensors: Mapping[str, Tensor], recipe: str, arguments: list[str], data_sha256: str,
                    training: dict[str, Any], evaluation: dict[str, Any],
                    directory: str | Path | None = None) -> dict[str, Any]:
    """Write ``<directory>/<name>.safetensors`` and record it in the manifest; returns the manifest entry.

    Both writes go to a temporary file first and are moved into place (an atomic rename on one file system), so an
    interrupted save never leaves a half-written checkpoint or manifest behind. Other entries are kept.
    """
    directory = Path(directory or pretrained_dir())
    file_name = f"{name}.safetensors"
    _check_plain_file_name(file_name, f"checkpoint name {name!r}")
    directory.mkdir(parents=True, exist_ok=True)
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
    manifest_entry(name, directory)  # an entry of the wrong form is refused, not rewritten
    manifest[name] = {**manifest[name], "evaluation": evaluation, "evaluated_by": evaluated_by}
    _write_manifest(directory, manifest)
    return manifest[name]


def tensor_sha256(*tensors: Tensor) -> str:
    """sha256 of tensors' raw bytes in order (CPU, C order): a fingerprint of a data set."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().to("cpu").contiguous().numpy().tobytes())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------- reading safely

_RESTORE_MANIFEST = ("; restore the manifest (the shipped one: git checkout pretrained/manifest.json) or rerun the "
                     "recipe that wrote it")


def _read_manifest_if_any(path: Path) -> dict[str, Any] | None:
    """The JSON object in manifest file ``path``; None when there is no such file."""
    data = _read_regular_file(path, MAX_MANIFEST_BYTES, f"checkpoint manifest {path}", _RESTORE_MANIFEST)
    if data is None:
        return None
    try:
        manifest = json.loads(data)
    except (ValueError, RecursionError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BenchError(f"checkpoint manifest {path} is not valid JSON ({error}){_RESTORE_MANIFEST}") from None
    if not isinstance(manifest, dict):
        raise BenchError(f"checkpoint manifest {path} must hold a JSON object of checkpoints by name, like "
                         f'{{"digits": {{"file": "digits.safetensors", "sha256": "..."}}}}; it holds '
                         f"{_json_kind(manifest)}{_RESTORE_MANIFEST}")
    return manifest


def _check_plain_file_name(file_name: str, where: str) -> None:
    """Refuse anything but a plain file name: no folder part, nothing absolute, not '.' or '..', no NUL."""
    if not file_name:
        problem = "is empty"
    elif "\0" in file_name:
        problem = "contains a NUL character"
    elif not file_name.isprintable():  # a newline, a control character, a lone surrogate no file system can encode
        problem = "contains characters that cannot be printed"
    elif ("/" in file_name or "\\" in file_name or os.path.isabs(file_name) or file_name in (".", "..")
          or Path(file_name).name != file_name):
        problem = "is not a plain file name"
    else:
        return
    raise BenchError(f"{where}: the file {_shown(file_name)} {problem}; a manifest names a file in its own folder "
                     f"by its plain name, like 'digits.safetensors', never a path")


def _resolve_inside(directory: Path, file_name: str, where: str) -> Path:
    """``directory / file_name`` (a plain file name) with symlinks followed, when it stays inside ``directory``."""
    try:
        root, resolved = directory.resolve(), (directory / file_name).resolve()
    except (OSError, RuntimeError) as error:  # RuntimeError: a symlink loop
        raise BenchError(f"{where}: {directory / file_name} cannot be resolved ({error})") from None
    if not resolved.is_relative_to(root):
        raise BenchError(f"{where}: {directory / file_name} is a symlink to {resolved}, outside {root}; a manifest "
                         f"may only name files inside its own folder (copy the file there instead of linking it)")
    return resolved


def _read_regular_file(path: Path, max_bytes: int, what: str, remedy: str, *, follow_symlinks: bool = True,
                       limit_hint: str = "") -> bytes | None:
    """All bytes of the regular file ``path``, or None when there is no such file; refused before reading when it
    holds more than ``max_bytes``. ``what`` names the file in errors."""
    # O_NONBLOCK: opening a FIFO must not hang (it is refused below); O_NOFOLLOW: a symlink put in place after the
    # path was resolved is not followed
    flags = os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NONBLOCK", 0)
    if not follow_symlinks:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        descriptor = os.open(path, flags)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:  # ValueError: a name the file system cannot encode
        raise BenchError(f"{what} cannot be opened ({getattr(error, 'strerror', None) or error}){remedy}") from None
    try:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode):
            raise BenchError(f"{what} is not a regular file{remedy}")
        if info.st_size > max_bytes:
            raise BenchError(f"{what} holds {info.st_size:,} bytes, more than the limit of {max_bytes:,}; refusing "
                             f"to read it{limit_hint}")
        file = os.fdopen(descriptor, "rb")  # from here on, closing the file closes the descriptor
    except BaseException:
        os.close(descriptor)
        raise
    try:
        with file:
            data = file.read(max_bytes + 1)  # + 1: a file that grew since fstat is caught too
    except OSError as error:
        raise BenchError(f"{what} cannot be read ({error.strerror or error}){remedy}") from None
    if len(data) > max_bytes:
        raise BenchError(f"{what} grew past the limit of {max_bytes:,} bytes while it was read{limit_hint}")
    return data


def _parse_safetensors(data: bytes, what: str, remedy: str) -> dict[str, Tensor]:
    try:
        return safetensors.torch.load(data)
    except Exception as error:  # safetensors' own SafetensorError, or e.g. a KeyError for a dtype torch lacks
        explanation = _header_problem(data)
        detail = f"{explanation} (safetensors: {error})" if explanation else f"safetensors: {error}"
        raise BenchError(f"{what} matches its manifest's sha256 but is not a valid safetensors file: {detail}. "
                         f"Whatever wrote the manifest vouched for a broken file{remedy}") from None


def _header_problem(data: bytes) -> str | None:
    """What is wrong with a safetensors file's header, in words, for the common cases; None when none of them.

    The format: an 8-byte little-endian header length N, N bytes of JSON mapping each tensor name to its dtype,
    shape and data_offsets [begin, end) in the data that follows the header.
    """
    if len(data) < 8:
        return f"the file holds {len(data)} bytes, too few for the 8-byte header length that starts the format"
    header_length = struct.unpack("<Q", data[:8])[0]
    if header_length > len(data) - 8:
        return (f"its header claims to be {header_length:,} bytes long, but only {len(data) - 8:,} bytes follow "
                "the length field")
    try:
        header = json.loads(data[8:8 + header_length])
    except (ValueError, RecursionError):
        return "its header is not JSON"
    if not isinstance(header, dict):
        return f"its header is {_json_kind(header)}, not a JSON object of tensors"
    data_size = len(data) - 8 - header_length
    for tensor_name, info in header.items():
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and offsets[1] > data_size):
            return (f"tensor {_shown(tensor_name)} claims bytes up to {offsets[1]:,} of the data, but the file "
                    f"holds only {data_size:,} bytes of data (truncated, or a hostile header)")
    return None


# ----------------------------------------------------------------------------------------------- messages

def _remedy(command: str | None) -> str:
    return f"; run `{command}` to remake it" if command else ""


def _shown(value: Any, limit: int = 200) -> str:
    """repr of a value read from a file, cut short: a hostile manifest must not flood the error message."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def _form(tensor: Tensor) -> str:
    return f"{list(tensor.shape)} {tensor.dtype}"


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:SHOWN_NAMES])
    return shown if len(items) <= SHOWN_NAMES else f"{shown} and {len(items) - SHOWN_NAMES} more"


def _json_kind(value: Any) -> str:
    kinds = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return kinds.get(type(value), type(value).__name__)


# ---------------------------------------------------------------------------------------------- writing

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
