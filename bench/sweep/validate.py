"""What a suite file may hold: the checks that make every malformed suite one clear error before anything runs.

A suite is read in three passes, each of which stops at the first problem with a BenchError naming the key, the
offending value and what is allowed (bench.sweep.suite prefixes the file):

1. ``read_suite_file``: a regular file of at most ``MAX_FILE_BYTES``, UTF-8 text (a UTF-8 byte-order mark is
   allowed; UTF-16, Latin-1 and binary files are refused with a hint), valid TOML.
2. ``check_tree``: the parsed document as a whole. Tables and arrays nest at most ``MAX_DEPTH`` levels; integers
   fit in 64 bits; floats are finite (no nan, no inf: write a large finite number instead); strings hold at most
   ``MAX_STRING`` characters and no control characters but tab and newline; keys are printable and at most
   ``MAX_NAME`` characters; no dates or times.
3. The typed accessors below, which ``bench.sweep.suite.parse_suite`` calls key by key: names are printable and
   short, axes are non-empty lists without duplicates, numbers lie in their ranges, devices exist on this
   machine, and plugin options have the types their functions declare.

Keys in messages are written as paths, ``solvers[2].schedules[1].rho``, with entries counted from 1.

Sizes are bounded by ``Limits`` (cells per suite, samples per cell and in all, the largest NFE budget): each can be
raised in the suite's ``[limits]`` table or on the command line, and the error says how.
"""

from __future__ import annotations

import inspect
import json
import math
import re
import tomllib
import types
import typing
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from bench.errors import BenchError

MAX_FILE_BYTES = 1 << 20  # a suite file: 1 MiB holds far more cells than the cell limit allows
MAX_DEPTH = 8  # tables and arrays: the deepest real use is solvers -> entry -> schedules -> entry -> option array
MAX_STRING = 4096  # characters in any string (descriptions, paths)
MAX_NAME = 64  # characters in a key, a suite name or a plugin name
MAX_LABEL = 128  # characters in a label
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # what SQLite, JSON readers and torch take as an integer
GUIDANCE_RANGE = (-1.0, 100.0)  # w: -1 unconditional, 0 plain conditional, beyond 100 a typo
TOLERANCE_RANGE = (1e-12, 1.0)  # rtol = atol of an adaptive solver: below 1e-12 is beyond float64
SAFE_STEM = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # a suite name: its store and report file names
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # control characters but tab and newline
_SCALARS = (bool, int, float, str)


@dataclass(frozen=True)
class Limits:
    """How big a suite may be; each is raised in the suite (``[limits]`` with these keys) or on the command line
    (``LIMIT_FLAGS``). They catch typos (a seed list pasted twice, NFE 10**8) before hours of compute."""

    cells: int = 10_000
    samples_per_cell: int = 10_000_000  # n
    samples: int = 100_000_000  # n x cells
    nfe: int = 10_000  # the largest NFE budget: Solver.plan walks the budget step by step

    def override(self, table: Any, key: str = "limits") -> Limits:
        """These limits with a suite's ``[limits]`` table, or the command line's values, put in."""
        table = as_table(table, key)
        allowed = [field.name for field in fields(self)]
        for name, value in table.items():
            if name not in allowed:
                raise BenchError(f"{key}: unknown limit {name!r} (limits: {', '.join(allowed)})")
            integer(value, f"{key}.{name}", low=1)
        return replace(self, **table)


LIMIT_FLAGS = {"cells": "--max-cells", "samples_per_cell": "--max-samples-per-cell", "samples": "--max-samples",
               "nfe": "--max-nfe"}


def over_limit(what: str, value: int, limits: Limits, limit: str) -> BenchError:
    """``what`` is ``value``, above a limit: the error says how to raise it."""
    allowed = asdict(limits)[limit]
    return BenchError(f"{what} is {value:,}, above the limit of {allowed:,}; if that is what you meant, raise it with "
                      f"`[limits] {limit} = {value}` in the suite or `{LIMIT_FLAGS[limit]} {value}` on the command "
                      f"line")


# ------------------------------------------------------------------------------------------- the file and the tree


def read_suite_file(path: Path) -> dict[str, Any]:
    """The TOML document of a suite file, checked as a whole (``check_tree``). Errors name the file."""
    try:
        if not path.is_file():
            problem = "no such file" if not path.exists() else "not a regular file"
            raise BenchError(f"cannot read suite {str(path)!r}: {problem}")
        with path.open("rb") as file:
            raw = file.read(MAX_FILE_BYTES + 1)
    except OSError as error:
        raise BenchError(f"cannot read suite {str(path)!r}: {error.strerror}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise BenchError(f"{path}: the file is over {MAX_FILE_BYTES >> 20} MiB; a suite is a short text file")
    text = _decode(raw, path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:  # its message carries "(at line L, column C)"
        raise BenchError(f"{path}: invalid TOML: {error}") from None
    except ValueError:  # Python refuses to read a decimal integer of over 4,300 digits
        raise BenchError(f"{path}: a number too long to read; integers in a suite fit in 64 bits") from None
    except RecursionError:
        raise BenchError(f"{path}: arrays or tables nested too deeply to read; a suite nests them at most "
                         f"{MAX_DEPTH} levels") from None
    try:
        check_tree(data)
    except BenchError as error:
        raise BenchError(f"{path}: {error}") from None
    return data


def _decode(raw: bytes, path: Path) -> str:
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in raw:
        bom = raw.startswith((b"\xff\xfe", b"\xfe\xff"))
        kind = "UTF-16 or UTF-32 text" if bom else "NUL bytes (binary, or UTF-16 text)"
        raise BenchError(f"{path}: the file holds {kind}; a suite is UTF-8 text: save it as UTF-8")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise BenchError(f"{path}: not UTF-8 text: byte 0x{raw[error.start]:02x} on line {line} is not UTF-8 (a "
                         "Latin-1 or binary file?); a suite is UTF-8 text: save it as UTF-8") from None


def check_tree(data: dict[str, Any]) -> None:
    """Every value of a parsed suite, whatever its key: depth, integer range, finiteness, strings, no dates."""
    queue: deque[tuple[tuple[str | int, ...], Any]] = deque([((), data)])
    while queue:  # breadth first, iteratively: problems are found in reading order, at any depth
        path, value = queue.popleft()
        if isinstance(value, (dict, list)):
            if len(path) >= MAX_DEPTH:
                raise BenchError(f"{key_path(path)}: tables and arrays nested more than {MAX_DEPTH} levels deep; a "
                                 "suite needs far fewer")
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for name, item in items:
                if isinstance(name, str) and (len(name) > MAX_NAME or not name.isprintable()):
                    raise BenchError(f"key {shown(name)} {'in ' + key_path(path) if path else 'at the top'} is not "
                                     f"a short printable name (at most {MAX_NAME} characters)")
                queue.append(((*path, name), item))
        elif isinstance(value, bool):
            pass
        elif isinstance(value, int):
            if not INT64_MIN <= value <= INT64_MAX:
                raise BenchError(f"{key_path(path)}: {shown(value)} does not fit in 64 bits (integers in a suite lie "
                                 f"within {INT64_MIN:,} .. {INT64_MAX:,})")
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise BenchError(f"{key_path(path)}: numbers must be finite; got {value} (nan and inf reach the "
                                 "results store as no number at all; write a large finite number instead)")
        elif isinstance(value, str):
            if len(value) > MAX_STRING:
                raise BenchError(f"{key_path(path)}: a string of {len(value):,} characters; at most {MAX_STRING:,}")
            if _CONTROL.search(value):
                raise BenchError(f"{key_path(path)}: {shown(value)} holds a control character "
                                 f"(U+{ord(_CONTROL.search(value).group()):04X}); only tab and newline are allowed")
        else:  # TOML dates and times
            raise BenchError(f"{key_path(path)}: {value} is a TOML date or time; a suite holds numbers, strings, "
                             "booleans, arrays and tables")


def key_path(path: Iterable[str | int]) -> str:
    """("solvers", 1, "nfe") -> "solvers[2].nfe": entries counted from 1."""
    text = ""
    for part in path:
        text += f"[{part + 1}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def shown(value: Any, width: int = 60) -> str:
    """A value's repr for a one-line message, cut to ``width`` characters."""
    if isinstance(value, int) and value.bit_length() > 3 * 64:  # Python writes no more than 4,300 digits
        return f"an integer of {value.bit_length():,} bits"
    text = repr(value)
    size = f"{len(value):,} characters" if isinstance(value, str) else f"{len(text):,} characters written out"
    return text if len(text) <= width else f"{text[:width - 5]}...{text[-2:]} ({size})"


# ----------------------------------------------------------------------------------------- one key at a time


def as_table(value: Any, key: str, hint: str = "") -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BenchError(f"{key} must be a table{hint}; got {shown(value)}")
    return value


def as_list(value: Any, key: str) -> list[Any]:
    if not isinstance(value, list):
        raise BenchError(f"{key} must be a list; got {shown(value)}")
    return value


def axis(value: Any, key: str) -> list[Any]:
    """An axis of the sweep: a non-empty list without repeats (each value would be one more copy of the cells)."""
    values = as_list(value, key)
    if not values:
        raise BenchError(f"{key} is empty: a sweep over no values has no cells; give at least one value or remove "
                         "the key for its default")
    return values


def no_repeats(values: list[Any], key: str, as_key: Any = repr, spell: Any = shown) -> None:
    """No value twice (``as_key`` says when two are the same; ``spell`` writes one for the message)."""
    seen: dict[Any, Any] = {}
    for value in values:
        same = as_key(value)
        if same not in seen:
            seen[same] = value
            continue
        first = seen[same]
        if spell(first) == spell(value):
            raise BenchError(f"{key} holds {spell(value)} twice; each value is one set of cells, so give it once")
        raise BenchError(f"{key} holds {spell(first)} and {spell(value)}, which run the same cells (numbers "
                         "compare by value; an option left out takes its default); give it once")


def comparable(value: Any) -> str:
    """A config as text in which 7 and 7.0 are the same: two entries that differ only so run the same cells."""
    def floats(item: Any) -> Any:
        if isinstance(item, dict):
            return {name: floats(inner) for name, inner in item.items()}
        if isinstance(item, (list, tuple)):
            return [floats(inner) for inner in item]
        return float(item) if isinstance(item, int) and not isinstance(item, bool) else item

    return json.dumps(floats(value), sort_keys=True, default=str)


def string(value: Any, key: str, *, width: int = MAX_STRING) -> str:
    if not isinstance(value, str):
        raise BenchError(f"{key} must be a string; got {shown(value)}")
    if len(value) > width:
        raise BenchError(f"{key} is {len(value):,} characters long; at most {width}")
    return value


def name(value: Any, key: str, *, width: int = MAX_NAME) -> str:
    """A name or a choice: a short printable string (no control, format or separator characters but space)."""
    text = string(value, key, width=width)
    if not text.isprintable():
        bad = next(character for character in text if not character.isprintable())
        raise BenchError(f"{key} = {shown(text)} holds the unprintable character U+{ord(bad):04X}")
    return text


def integer(value: Any, key: str, *, low: int = INT64_MIN, high: int = INT64_MAX) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BenchError(f"{key} must hold whole numbers; got {shown(value)}")
    if value < low:
        raise BenchError(f"{key} must be >= {low}; got {value}")
    if value > high:
        raise BenchError(f"{key} must be <= {high:,}; got {value:,}")
    return value


def number(value: Any, key: str, *, low: float = -math.inf, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BenchError(f"{key} must hold numbers; got {shown(value)}")
    value = float(value)  # fits: check_tree bounds integers to 64 bits
    if not (math.isfinite(value) and low <= value <= high):
        raise BenchError(f"{key} must lie within {low:g} .. {high:g}; got {value:g}")
    return value


def boolean(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise BenchError(f"{key} must be true or false; got {shown(value)}")
    return value


def suite_name(value: Any, file_stem: str | None) -> str:
    """The suite's name, which names its store (``<out>/<name>.sqlite``) and report (``reports/<name>.html``), so it
    must be a plain file stem: never a path, hidden, empty or odd."""
    rule = (f"letters, digits, '.', '_' and '-', starting with a letter or digit, at most {MAX_NAME} characters, "
            "since it names the results file")
    if value is None and file_stem is not None:
        if SAFE_STEM.fullmatch(file_stem) and len(file_stem) <= MAX_NAME:
            return file_stem
        suggestion = re.sub(r"[^A-Za-z0-9._-]+", "-", file_stem).strip("-._")[:MAX_NAME] or "suite"
        raise BenchError(f"the suite has no `name`, and its file name {shown(file_stem)} cannot be one (a suite name "
                         f"holds {rule}); add e.g. name = \"{suggestion}\"")
    text = string(value, "name")
    if not (SAFE_STEM.fullmatch(text) and len(text) <= MAX_NAME):
        raise BenchError(f"name = {shown(text)} is not a plain file name: a suite name holds {rule}")
    return text


def device(value: Any, key: str) -> str:
    """'cpu', 'cuda' or 'cuda:N', on a machine that has it."""
    text = name(value, key)
    if text != "cpu" and not re.fullmatch(r"cuda(:[0-9]{1,4})?", text):
        raise BenchError(f"{key} must be 'cpu', 'cuda' or 'cuda:N' (N a device number); got {shown(text)}")
    if text.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise BenchError(f"{key} = {text!r}, but this machine has no CUDA device (torch.cuda.is_available() is "
                             "False); run it on a CUDA machine, or use device \"cpu\" (`--device cpu`)")
        count = torch.cuda.device_count()
        if ":" in text and int(text.split(":")[1]) >= count:
            raise BenchError(f"{key} = {text!r}, but this machine has {count} CUDA device(s): "
                             f"{', '.join(f'cuda:{i}' for i in range(count))}")
    return text


# --------------------------------------------------------------------------------------------- plugin options


def option_value(value: Any, key: str) -> Any:
    """An option is a number, a string, a boolean, or an array of those (given to the plugin as a tuple, so that
    components stay hashable)."""
    if isinstance(value, list):
        for item in value:
            if not isinstance(item, _SCALARS):
                raise BenchError(f"{key}: an option's array holds numbers, strings or booleans; got {shown(item)}")
            if isinstance(item, str):
                name(item, key, width=MAX_STRING)
        return tuple(value)
    if not isinstance(value, _SCALARS):
        raise BenchError(f"{key}: an option is a number, a string, a boolean or an array of them; got {shown(value)}")
    if isinstance(value, str):  # printable: options are spelled out in labels and messages
        name(value, key, width=MAX_STRING)
    return value


def check_options(fn: Any, options: Mapping[str, Any], *, what: str, key: str, skip: int = 0,
                  ignore: Iterable[str] = ("device",)) -> None:
    """Each option is a parameter of ``fn`` (after its first ``skip``; ``ignore`` are set by the harness) with the
    type its annotation or default declares. A function that takes ``**options``, or cannot be inspected, judges
    its options itself."""
    parameters = _parameters(fn)
    if parameters is None or any(p.kind is p.VAR_KEYWORD for p in parameters):
        return
    named = [p for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)][skip:]
    declared = {p.name: p for p in named if p.name not in ignore}
    for option, value in options.items():
        if option not in declared:
            hint = "; its device is the suite's `device`" if option in ignore else ""
            raise BenchError(f"{key}: {what} has no option {option!r} (its options: {', '.join(declared) or 'none'})"
                             f"{hint}")
        accepted = _accepted_types(declared[option])
        if accepted and not _is_a(value, accepted):
            kinds = " or ".join(_KIND_NAMES[kind] for kind in accepted)
            raise BenchError(f"{key}.{option}: {what} takes {kinds} for {option!r}; got {shown(value)}")


def defaults(fn: Any, skip: int = 0) -> dict[str, Any]:
    """The options ``fn`` takes by name, after its first ``skip``, with their defaults: an option given at its
    default is the same config as the option left out."""
    named = [p for p in _parameters(fn) or () if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)][skip:]
    return {p.name: p.default for p in named if p.default is not p.empty}


_KIND_NAMES = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}


def _parameters(fn: Any) -> list[inspect.Parameter] | None:
    try:  # annotations resolved where the plugin's module can resolve them
        return list(inspect.signature(fn, eval_str=True).parameters.values())
    except Exception:  # e.g. an annotation naming something imported only for type checkers: use the defaults
        pass
    try:
        return list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None


def _accepted_types(parameter: inspect.Parameter) -> tuple[type, ...] | None:
    """bool, int, float or str as the annotation (resolved) or else the default says; None: not declared, or a
    type a suite value cannot be checked against here (arrays, Any, ...)."""
    annotation = parameter.annotation
    if annotation is parameter.empty or isinstance(annotation, str):
        default = parameter.default
        return (type(default),) if type(default) in _SCALARS else None
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    accepted = []
    for kind in typing.get_args(annotation) if union else (annotation,):
        if kind in _SCALARS:
            accepted.append(kind)
        elif kind is type(None) or (typing.get_origin(kind) is None and isinstance(kind, type)
                                    and issubclass(kind, Path)):
            continue  # no TOML value is None; a path is given as a string
        else:
            return None
    return tuple(accepted) or None


def _is_a(value: Any, accepted: tuple[type, ...]) -> bool:
    if isinstance(value, bool):
        return bool in accepted
    if isinstance(value, int):
        return int in accepted or float in accepted
    return isinstance(value, accepted) and not isinstance(value, bool)
