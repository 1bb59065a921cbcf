"""The identity of the code behind a row: which plugins took part, from which distribution and version, and a
content hash of their source.

A row promises that its numbers came from exactly what its config and provenance say, so a cell's key covers the
code as well as the config: edit a solver (or the harness code that draws samples) and its cells are recomputed,
never served from a stale row. The hash of a registered object covers the module that defines it and the modules
of its own package or of ``bench`` that it takes names from (one level: a solver module and the shared numerics it
imports), read from disk as bytes.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import inspect
import json
import platform
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from bench.core.noise import GENERATOR
from bench.registry import PluginManager

# The modules of the harness that decide the samples of every cell, whatever the plugins.
HARNESS_MODULES = ("bench.core.sampling", "bench.core.noise", "bench.core.denoiser", "bench.core.guidance",
                   "bench.core.solver", "bench.core.steps", "bench.core.parallel")


def _module_file_bytes(module: ModuleType) -> bytes:
    try:
        path = inspect.getsourcefile(module)
    except TypeError:  # a built-in module has no source
        path = None
    if path is None:
        return f"<no source: {module.__name__}>".encode()
    with open(path, "rb") as handle:
        return handle.read()


def _related_modules(module: ModuleType) -> list[ModuleType]:
    """The module and the modules of its own top-level package or of bench that it takes names from."""
    packages = {module.__name__.split(".")[0], "bench"}
    related = {module.__name__: module}
    for value in vars(module).values():
        source = value if isinstance(value, ModuleType) else sys.modules.get(getattr(value, "__module__", None) or "")
        if isinstance(source, ModuleType) and source.__name__.split(".")[0] in packages:
            related.setdefault(source.__name__, source)
    return [related[name] for name in sorted(related)]


def module_digest(module_name: str) -> str:
    """sha256 over the source of ``module_name`` and of the project modules it imports from, by module name. Read
    from disk each time: a file edited while the process runs is seen."""
    digest = hashlib.sha256()
    for module in _related_modules(importlib.import_module(module_name)):
        digest.update(module.__name__.encode() + b"\0")
        digest.update(_module_file_bytes(module) + b"\0")
    return digest.hexdigest()


def defining_module(obj: Any) -> str:
    """The module that defines a registered object (a metric's is its compute function's)."""
    target = getattr(obj, "compute", obj)
    return getattr(target, "__module__", None) or type(target).__module__


def component_identity(plugins: PluginManager, kind: str, name: str) -> dict[str, Any]:
    """Where a registered solver, schedule, model or metric came from, and the hash of its code."""
    registration = plugins.get(kind, name)
    info = plugins.plugin(registration.plugin)
    module = defining_module(registration.obj)
    identity = {"name": registration.name, "plugin": registration.plugin, "distribution": info.distribution,
                "version": info.version, "module": module, "sha256": module_digest(module)}
    data = registration.extras.get("data")
    if data is not None:
        identity["data"] = data()  # the files it loads (bench/hookspecs.py): new weights, new key
    return identity


def harness_identity() -> dict[str, Any]:
    """The harness code every cell's samples pass through, and the noise generator that draws x_T."""
    digest = hashlib.sha256()
    for name in HARNESS_MODULES:
        digest.update(name.encode() + b"\0" + _module_file_bytes(importlib.import_module(name)) + b"\0")
    return {"samplerbench": importlib.metadata.version("samplerbench"), "noise": GENERATOR,
            "sha256": digest.hexdigest()}


def environment(device: str) -> dict[str, Any]:
    """Where a row was measured: enough to tell two machines or two code versions apart."""
    if device.startswith("cuda") and torch.cuda.is_available():
        device_name = torch.cuda.get_device_name(torch.device(device))
    else:
        device_name = platform.processor() or platform.machine()
    return {
        "device": device, "device_name": device_name, "torch": torch.__version__, "python": sys.version.split()[0],
        "platform": platform.platform(), "samplerbench": importlib.metadata.version("samplerbench"), "git_sha": git_sha(),
        "threads": torch.get_num_threads(),
    }


def git_sha() -> str | None:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() or None


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def digest_of(value: Any, length: int = 24) -> str:
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()[:length]
