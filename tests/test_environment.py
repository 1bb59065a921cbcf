"""The environment is the lock: every machine that installs the project runs the same libraries."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked_pins() -> dict[str, str]:
    text = (ROOT / "requirements.lock").read_text()
    return {canonical(name): version for name, version in re.findall(r"^([A-Za-z0-9_.\-]+)==([^\s\\]+)", text, re.M)}


def test_every_dependency_of_the_project_is_pinned_with_hashes():
    pins = locked_pins()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["test"]
    for requirement in wanted:
        name = canonical(re.match(r"[A-Za-z0-9_.\-]+", requirement).group(0))
        assert name in pins, f"{name} is not in requirements.lock: run `make lock`"
    blocks = re.split(r"\n(?=[A-Za-z0-9])", (ROOT / "requirements.lock").read_text())
    assert all("--hash=sha256:" in block for block in blocks if re.match(r"[A-Za-z0-9_.\-]+==", block))
    constraints = dict(re.findall(r"^([a-z]+)==(\S+)", (ROOT / "constraints.txt").read_text(), re.M))
    assert pins["torch"] == constraints["torch"] and pins["torchvision"] == constraints["torchvision"]


def test_the_installed_environment_is_the_lock():
    mismatched = {}
    for name, version in locked_pins().items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            installed = None
        if installed != version:
            mismatched[name] = (version, installed)
    assert not mismatched, f"installed packages differ from requirements.lock (locked, installed): {mismatched}"


def test_make_installs_exactly_the_lock():
    makefile = (ROOT / "Makefile").read_text()
    assert "--require-hashes --no-deps -r $(LOCK)" in makefile
    assert "--no-deps --no-build-isolation -e ." in makefile
