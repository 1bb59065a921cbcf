"""Errors a user can act on: what was wrong, the offending value, and the allowed ones."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class BenchError(Exception):
    """A problem in the user's input or environment; the CLI prints it without a traceback."""


def unknown_name(kind: str, name: str, allowed: Iterable[str]) -> BenchError:
    """``unknown solver 'dpmsolver'; did you mean 'dpm-solver'? (known: ...)``"""
    allowed = sorted(allowed)
    close = difflib.get_close_matches(name, allowed, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return BenchError(f"unknown {kind} {name!r}{hint} (known: {', '.join(allowed) or 'none'})")
