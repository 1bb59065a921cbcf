"""A solver's options, declared once: a frozen dataclass of fields with their defaults and the values they allow.

    class DDIM(StepSolver):
        @dataclass(frozen=True)
        class Options(SolverOptions):
            eta: float = option(0.0, check=lambda eta: eta >= 0, must="be >= 0 (0: deterministic DDIM, 1: DDPM)")

The declaration is the one source of truth for the option names, their types, defaults and validation: building
the solver (``DDIM(eta=0.5)``, or ``bench.core.solver.build_solver``) goes through it, and so can a suite parser
that only wants to check a table of options (``bench.core.solver.check_options``) without building anything.
A field's annotation is its type: ``int``, ``float`` (ints are taken), ``bool``, ``str``, ``tuple[int, ...]`` (lists
are taken) and ``X | None``; checks that involve several options go in ``validate``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from functools import cache
from typing import Any


def option(default: Any, *, choices: tuple[Any, ...] | None = None, check: Callable[[Any], bool] | None = None,
           must: str = "", convert: Callable[[Any], Any] | None = None) -> Any:
    """A declared option: its ``default``; the values it may take, as ``choices`` or as a ``check`` whose
    requirement ``must`` says in words ("be >= 0"); ``convert`` normalises an accepted value (e.g. sorts a list)."""
    return dataclasses.field(default=default, metadata={"choices": choices, "check": check, "must": must,
                                                        "convert": convert})


@dataclasses.dataclass(frozen=True)
class SolverOptions:
    """Base of every solver's ``Options`` dataclass: checks each field against its declaration when built."""

    def __post_init__(self) -> None:
        hints = _type_hints(type(self))
        for field in dataclasses.fields(self):
            value = _checked(field, getattr(self, field.name), hints[field.name])
            object.__setattr__(self, field.name, value)
        self.validate()

    def validate(self) -> None:
        """Checks that involve several options: raise ValueError naming the values and what is allowed."""

    def as_dict(self) -> dict[str, Any]:
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}


def declared(options_class: type[SolverOptions]) -> dict[str, dataclasses.Field]:
    """The declared fields of an Options dataclass, by name, in declaration order."""
    return {field.name: field for field in dataclasses.fields(options_class)}


@cache
def _type_hints(options_class: type) -> dict[str, Any]:
    return typing.get_type_hints(options_class)


def describe_choices(choices: tuple[Any, ...]) -> str:
    """'1, 2 or 3' for numbers, "one of 'a', 'b'" for anything else: how an error names the allowed values."""
    if all(isinstance(choice, int) and not isinstance(choice, bool) for choice in choices) and len(choices) > 1:
        return f"{', '.join(map(str, choices[:-1]))} or {choices[-1]}"
    return f"one of {', '.join(map(repr, choices))}"


def _checked(field: dataclasses.Field, value: Any, hint: Any) -> Any:
    """``value`` as the field's type, or a ValueError that names the field, the value and what is allowed."""
    name, meta, given = field.name, field.metadata, value
    choices = meta.get("choices")
    if not _has_type(value, hint):
        allowed = describe_choices(choices) if choices else _type_name(hint)
        raise ValueError(f"{name} must be {allowed}; got {given!r}")
    value = _as_type(value, hint)
    if choices is not None and value not in choices:
        raise ValueError(f"{name} must be {describe_choices(choices)}; got {given!r}")
    if meta.get("check") is not None and value is not None and not meta["check"](value):
        raise ValueError(f"{name} must {meta['must']}; got {given!r}")
    return meta["convert"](value) if meta.get("convert") is not None else value


def _has_type(value: Any, hint: Any) -> bool:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return any(_has_type(value, arm) for arm in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if typing.get_origin(hint) is tuple:
        item = typing.get_args(hint)[0]
        return isinstance(value, (list, tuple)) and all(_has_type(element, item) for element in value)
    return isinstance(value, hint)


def _as_type(value: Any, hint: Any) -> Any:
    if value is None:
        return None
    if hint is float or (typing.get_origin(hint) in (typing.Union, types.UnionType) and float in typing.get_args(hint)):
        return float(value)
    if typing.get_origin(hint) is tuple:
        return tuple(value)
    return value


def _type_name(hint: Any) -> str:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return " or ".join(_type_name(arm) for arm in typing.get_args(hint))
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "None"}
    if typing.get_origin(hint) is tuple:
        return f"a list of {_type_name(typing.get_args(hint)[0]).removeprefix('an ').removeprefix('a ')}s"
    return names.get(hint, getattr(hint, "__name__", str(hint)))
