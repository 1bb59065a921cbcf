"""How a string from a store, a plugin or a config is written into each context of the report page.

Model names, solver labels, metric names and titles, error texts, provenance and the title all come from outside
the report: from a plugin, a suite file, or a shared .sqlite that anyone may have edited. Each context of the page
has its own rules, so each has one function here, and the page never writes a foreign string any other way:

- element content and double-quoted attribute values: ``html_text``;
- element ids and #fragments: ``element_id``, built from a slug and an index, never from the raw name;
- texts that plotly renders (trace names, titles, axis titles, hover text): ``plot_text``;
- JSON inside a ``<script>`` element: ``script_json``;
- the raw text of the page's own scripts and styles: ``raw_text``, which refuses what would end the element.
"""

from __future__ import annotations

import html
import re

SLUG_LENGTH = 48
_NOT_SLUG = re.compile(r"[^A-Za-z0-9_-]+")
# the characters a JSON text may hold (in its strings only) that matter to the HTML parser or to old JS parsers
_SCRIPT_JSON_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
_ENDS_RAW_TEXT = re.compile(r"</(script|style)|<!--", re.IGNORECASE)


def html_text(value: object) -> str:
    """Element content, ``<title>`` included, and double-quoted attribute values (alt, class, content): ``<``,
    ``>``, ``&`` and both quotes become entities, so the text can neither open a tag nor close the attribute."""
    return html.escape(str(value), quote=True)


def slug(value: object) -> str:
    """ASCII letters, digits, ``_`` and ``-`` only (runs of anything else become one ``-``), at most SLUG_LENGTH
    characters: readable in a URL fragment, inert in any context."""
    return _NOT_SLUG.sub("-", str(value)).strip("-")[:SLUG_LENGTH]


def element_id(prefix: str, *parts: object) -> str:
    """An element id from a fixed prefix and parts (indices, names): each part slugged, empty ones dropped.

    Slugs of different names can coincide (``a<b`` and ``a>b``), so callers end the parts with an index whenever
    names alone might not tell two elements apart.
    """
    return "-".join([slug(prefix), *(s for s in map(slug, parts) if s)])


def plot_text(value: object) -> str:
    """A text that plotly draws: it renders names, titles and hover text as a small HTML dialect (``<b>``,
    ``<a href>``, ``<br>``), so markup must arrive as entities, which plotly shows as the literal characters."""
    return html.escape(str(value), quote=False)


def script_json(text: str) -> str:
    """JSON text that is safe inside a ``<script>`` element.

    No ``<`` (hence no ``</script`` and no ``<!--``, which change how the HTML parser ends the element), no ``>`` or
    ``&``, and no U+2028 / U+2029 (line terminators to pre-2019 JavaScript). JSON allows these characters only
    inside strings, where the ``\\u`` escapes mean the same characters, so the value is unchanged. Plotly's
    encoder escapes most of them already; this does not depend on which engine or version encoded the text.
    """
    for character, escape in _SCRIPT_JSON_ESCAPES.items():
        text = text.replace(character, escape)
    return text


def raw_text(text: str) -> str:
    """The text of one of the page's own ``<script>`` or ``<style>`` elements, checked: it must not contain what
    would end the element early or change how the parser ends it (``</script``, ``</style``, ``<!--``)."""
    found = _ENDS_RAW_TEXT.search(text)
    if found:
        raise ValueError(f"cannot embed a script or style that contains {found.group(0)!r}")
    return text
