"""The page's scripts, how a figure reaches them, and the Content-Security-Policy that admits them alone.

The page runs exactly two scripts, both fixed text: the plotly.js bundle, and DRAW, which draws every figure from
its JSON data block (``<script type="application/json">``, which browsers parse as text and never run). No data
reaches executable code, so the policy admits the two scripts by their sha256 hashes and nothing else: markup
that slipped past escaping (an inline ``<script>``, an ``onerror`` attribute, a ``javascript:`` URL) is refused
by the browser.

Plotly needs no ``eval``: the report's figures draw without one refused eval (the bundle's few ``Function`` and
``eval`` calls are a feature-detection fallback, a polyfill and map-tile worker code). It does add style rules at
run time, by creating an empty ``<style>`` element and filling its sheet through the CSSOM, which CSP does not
govern; admitting the hash of the empty text admits that element and no style text. Refused, harmlessly, and
reported on the browser's console: the bundle's ``<style>`` for map traces (maplibre CSS; the report draws no
maps) and the empty ``style`` attribute plotly sets on colour-bar fills (it sets nothing).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
from collections.abc import Iterable

import plotly.graph_objects as go
import plotly.io as pio
import plotly.offline

from bench.report.escape import html_text, raw_text, script_json

PLOT_CONFIG = {"displaylogo": False, "responsive": True}
# plotly's run-time style element starts empty; CSSOM rules added to it later are not subject to the policy
PLOTLY_RUNTIME_STYLE = ""
DRAW = raw_text(f"""
// Draw every figure: each JSON data block holds a figure, its data-figure attribute the id of the element to draw in.
document.querySelectorAll('script[type="application/json"][data-figure]').forEach(function (spec) {{
  var figure = JSON.parse(spec.textContent);
  Plotly.newPlot(spec.getAttribute("data-figure"), figure.data, figure.layout, {json.dumps(PLOT_CONFIG)});
}});
""")


@functools.cache
def plotly_bundle() -> str:
    """The plotly.js bundle, embedded once in <head> so the page opens offline."""
    return raw_text(plotly.offline.get_plotlyjs())


def script_element(text: str) -> str:
    """An inline script of the page's own; its text must also be admitted by the policy (source_hash)."""
    return f"<script>{raw_text(text)}</script>"


def figure_element(fig: go.Figure, element_id: str) -> str:
    """An empty element for DRAW to draw ``fig`` into, and the figure as a JSON data block naming it.

    ``element_id`` must come from bench.report.escape.element_id: it is written into two attributes as is.
    """
    spec = script_json(pio.to_json(fig, validate=True))
    return (f'<div id="{element_id}" class="plotly-graph-div"></div>'
            f'<script type="application/json" data-figure="{element_id}">{spec}</script>')


def source_hash(text: str) -> str:
    """The CSP source expression that admits an inline script or style whose text is exactly ``text``.

    Browsers hash the element's text as parsed, and the parser turns CR and CRLF into LF, so a text with a carriage
    return would never match its own hash.
    """
    if "\r" in text:
        raise ValueError("an inline script or style with a carriage return cannot be admitted by its hash")
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return f"'sha256-{base64.b64encode(digest).decode('ascii')}'"


def content_security_policy(scripts: Iterable[str], styles: Iterable[str]) -> str:
    """The policy of a page whose only scripts and styles are the inline ``scripts`` and ``styles`` given."""
    directives = {
        # nothing is fetched, from the network or from the disk beside the report: the page is self-contained
        "default-src": ["'none'"],
        # the page's own inline scripts alone: no 'unsafe-inline' (hence no inline handlers), no 'unsafe-eval'
        "script-src": sorted({source_hash(text) for text in scripts}),
        "style-src": sorted({source_hash(text) for text in styles}),
        # the sample grids are embedded PNGs
        "img-src": ["data:"],
        # no plugins (default-src covers it; said explicitly, as CSP checkers expect)
        "object-src": ["'none'"],
        # neither falls back to default-src: a <base> would re-root relative URLs, a <form> could post the page away
        "base-uri": ["'none'"],
        "form-action": ["'none'"],
    }
    return "; ".join(f"{name} {' '.join(sources)}" for name, sources in directives.items())


def policy_meta(policy: str) -> str:
    """The policy as a <meta> tag: it must come before every script and style of the page to cover them."""
    return f'<meta http-equiv="Content-Security-Policy" content="{html_text(policy)}">'
