"""The layout holds: data flows one way (no import cycle anywhere), plugins depend only on bench, modules stay
small enough to read, and the code cites nothing outside the repository."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("bench", "plugins")
MAX_LINES = 450  # "about 400": one idea per module


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))}


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """Every project module ``path`` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known else node.module
                     for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in known)
    return found


def test_no_import_cycle_anywhere():
    known = modules()
    graph = {name: imports(path, known) - {name} for name, path in known.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        stack.append(name)
        for other in sorted(graph[name]):
            if state.get(other) == 1:
                cycle = stack[stack.index(other):] + [other]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if other not in state:
                visit(other)
        stack.pop()
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_plugins_import_only_bench_and_their_own_package():
    known = modules()
    for name, path in known.items():
        if not name.startswith("plugins."):
            continue
        own = ".".join(name.split(".")[:2])  # plugins.digits.train belongs to plugins.digits
        for imported in imports(path, known):
            assert not imported.startswith("plugins.") or imported.startswith(own), \
                f"{name} imports {imported}: plugins depend only on bench"
    for name, path in known.items():
        if name.startswith("bench"):
            assert not any(imported.startswith("plugins") for imported in imports(path, known)), \
                f"{name} imports a plugin: bench finds plugins through entry points only"


def test_modules_stay_small():
    long = {name: len(path.read_text().splitlines()) for name, path in modules().items()}
    assert not {name: lines for name, lines in long.items() if lines > MAX_LINES}


def test_nothing_cites_files_outside_the_repository():
    for path in [*ROOT.glob("*.md"), *ROOT.glob("docs/*.md"), *(p for package in (*PACKAGES, "tests")
                                                                 for p in (ROOT / package).rglob("*.py"))]:
        text = path.read_text()
        for outside in ("DESIGN" + ".md", "ANCHORS" + ".md", "../" + "shared"):
            assert outside not in text, f"{path.relative_to(ROOT)} cites {outside}"


def test_the_architecture_doc_names_every_folder_of_bench():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    for folder in sorted(p.name for p in (ROOT / "bench").iterdir() if p.is_dir() and p.name != "__pycache__"):
        assert f"bench/{folder}" in doc, f"docs/architecture.md does not describe bench/{folder}"
    assert importlib.util.find_spec("bench") is not None
