"""The report runs no script but its own, whatever the store, the plugins or the config hold.

A store is written through bench.sweep.store.Store with hostile strings in every field that reaches the page
(metric names, titles and descriptions, labels, schedules, model names, configs, error text, code provenance,
the conditioning, the device) and read back with read_results, as `samplerbench report` does; the title and the
provenance are hostile too. The page is checked as text (no payload survives as markup, ids are slugs, JSON in
scripts holds no markup characters, the policy admits exactly the page's own scripts), then opened in headless
Chromium twice: without its Content-Security-Policy, to show that escaping alone keeps every payload inert, and
with it plus a script spliced in, to show that the policy alone refuses what escaping might miss. Both times the
figures must be drawn, so that neither check can pass by breaking the page.
"""

from __future__ import annotations

import html
import io
import json
import os
import re
import shutil
import signal
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest

from bench.cli import main
from bench.report import write_report
from bench.report.escape import plot_text, raw_text, script_json, slug
from bench.report.page import CSS
from bench.report.scripts import DRAW, PLOTLY_RUNTIME_STYLE, plotly_bundle, source_hash
from bench.sweep.schema import NAMES
from bench.sweep.store import Store, read_grids, read_results

CHROMIUM = shutil.which("chromium")
NO_CHROMIUM = "chromium is not installed: apt-get install chromium"

# Every payload does the same thing when it runs, so one look at the title tells whether any did.
RUN = "document.title='PWNED'"
SCRIPT = f"</script><script>{RUN}</script>"
ATTRIBUTE = f'x" onmouseover="{RUN}" data-x="'
IMAGE = f'<img src=x onerror="{RUN}">'
LINK = f'<a href="javascript:{RUN}">link</a>'          # plotly's text dialect has links
SVG = f'<svg onload="{RUN}">'
COMMENT = "<!--<script>"                                # changes where the HTML parser ends a script element
MARKUP = (SCRIPT, ATTRIBUTE, IMAGE, LINK, SVG, COMMENT)
SEPARATORS = "\u2028\u2029"                             # line terminators to pre-2019 JavaScript
ENTITIES = f"&lt;img src=x onerror={RUN}&gt;"           # escaped already: shown as typed, never unescaped twice
URL = f"javascript:{RUN}"

TITLE = f"sweep {SCRIPT}{IMAGE}"
MODEL = f"model {SVG}{ENTITIES}"
FAILED_MODEL = f"failed {ATTRIBUTE}"
LABELS = (f"euler {IMAGE}{LINK}", f"heun {COMMENT}{SEPARATORS}{URL}")
SCHEDULES = (f"karras {SCRIPT}", f"{COMMENT}logsnr")
QUALITY, FIDELITY, DIVERSITY, UNDECLARED = f"quality {SCRIPT}", ATTRIBUTE, IMAGE, f"undeclared {SVG}"
METRIC_INFO = [
    {"name": QUALITY, "title": f"Quality {IMAGE}", "better": f"lower {SCRIPT}", "log_scale": 1, "axis": "quality",
     "description": SCRIPT},
    {"name": FIDELITY, "title": LINK, "better": "higher", "log_scale": 0, "axis": "fidelity", "description": IMAGE},
    {"name": DIVERSITY, "title": ENTITIES, "better": "higher", "log_scale": 0, "axis": "diversity",
     "description": ATTRIBUTE},
]  # UNDECLARED has no metadata: the report falls back to its name
PLUGIN = {"name": SCRIPT, "plugin": IMAGE, "distribution": LINK, "version": URL, "module": SVG, "sha256": ATTRIBUTE}
CODE = {"harness": {"samplerbench": SCRIPT, "noise": IMAGE, "sha256": ATTRIBUTE},
        "model": PLUGIN, "solver": PLUGIN, "schedule": PLUGIN, "metrics": [PLUGIN]}
PROVENANCE = {SCRIPT: IMAGE, "feature_space": SVG, ATTRIBUTE: URL, "link": LINK, "comment": COMMENT + SEPARATORS}
ERROR = f"RuntimeError: {SCRIPT}{IMAGE}"


def _png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def _row(model: str, label: str, schedule: str, guidance: float, budget: int, note: str = "") -> dict:
    """One cell's row, as the runner writes it; ``note`` is a config entry that splits a series in two."""
    key = f"{SCRIPT}/{model}/{label}/{schedule}/{guidance}/{budget}/{note}"
    value = (1 + LABELS.index(label) + SCHEDULES.index(schedule) + guidance) / budget
    row = {name: None for name in NAMES}
    row.update(
        key=key, config_key=key, suite=SCRIPT, model=model, solver=label, label=label, schedule=schedule,
        nfe_budget=budget, guidance=guidance, labels=ATTRIBUTE, seed=0, n=16, dtype="float32",
        network_precision="fp32", device=IMAGE, status="done", nfe=float(budget), model_evals=float(budget),
        steps=budget, seconds=0.01 * budget, batch_size=16, code=CODE, environment={"host": SCRIPT},
        config={"label": label, "schedule": schedule, "guidance": guidance, "nfe": budget, "note": note},
        metrics={QUALITY: value, FIDELITY: 0.9 - value / 10, DIVERSITY: min(1.0, budget / 10), UNDECLARED: value},
        finished_at="2025-01-01T00:00:00+00:00",
    )
    return row


def _hostile_store(path: Path) -> Path:
    png = _png()
    with Store(path) as store:
        store.describe_metrics(METRIC_INFO)
        for label in LABELS:
            for schedule in SCHEDULES:
                for guidance in (0.0, 2.0):
                    for budget in (4, 8):
                        store.write(_row(MODEL, label, schedule, guidance, budget), grid_png=png)
        for budget in (4, 8):  # the same series but for one config entry: two series, named by how they differ
            store.write(_row(MODEL, LABELS[0], SCHEDULES[0], 0.0, budget, note=SCRIPT), grid_png=png)
        failed = _row(FAILED_MODEL, LABELS[1], SCHEDULES[0], 0.0, 4)
        failed.update(status="failed", error=ERROR, metrics={}, nfe=None, model_evals=None, seconds=None)
        store.write(failed)
    return path


@pytest.fixture(scope="module")
def report_path(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hostile")
    store = _hostile_store(folder / "hostile.sqlite")
    return write_report(read_results(store), folder / "report.html", title=TITLE, provenance=PROVENANCE,
                        sample_grids=read_grids(store))


@pytest.fixture(scope="module")
def page(report_path) -> str:
    return report_path.read_text(encoding="utf-8")


def _figure_ids(page: str) -> list[str]:
    return re.findall(r'<div id="([^"]*)" class="plotly-graph-div"></div>', page)


def _data_blocks(page: str) -> dict[str, str]:
    return dict(re.findall(r'<script type="application/json" data-figure="([^"]*)">(.*?)</script>', page, re.DOTALL))


def _executable_scripts(page: str) -> list[str]:
    return [text for attributes, text in re.findall(r"<script([^>]*)>(.*?)</script>", page, re.DOTALL)
            if 'type="application/json"' not in attributes]


def _policy(page: str) -> dict[str, set[str]]:
    content = re.search(r'<meta http-equiv="Content-Security-Policy" content="([^"]*)">', page).group(1)
    directives = [directive.split() for directive in html.unescape(content).split(";")]
    return {name: set(sources) for name, *sources in directives}


# ----------------------------------------------------------------------------------------------------------------
# The page as text
# ----------------------------------------------------------------------------------------------------------------

def test_no_payload_reaches_the_page_as_markup(page):
    rest = page.replace(plotly_bundle(), "")
    for payload in MARKUP:
        assert payload not in rest
    assert "PWNED'\"" not in rest and "onerror=\"" not in rest and "onmouseover=\"" not in rest
    # every script element is one of the page's own: the bundle, the figures' JSON, the drawing script
    assert rest.count("<script") == 2 + len(_figure_ids(page))


def test_hostile_strings_are_shown_as_text(page):
    assert f"<title>{html.escape(TITLE)}</title>" in page and f"<h1>{html.escape(TITLE)}</h1>" in page
    for text in (MODEL, FAILED_MODEL, ERROR, f"Samples: {ATTRIBUTE}.", f"FID / precision / recall features: {SVG}.",
                 *PROVENANCE, *PROVENANCE.values(), LINK, URL):
        assert html.escape(text) in page, text
    assert f"<th>{html.escape(QUALITY)}</th>" in page and f"<th>{html.escape(UNDECLARED)}</th>" in page
    assert html.escape(f"Quality {IMAGE} (mean, lower {SCRIPT} is better)") in page  # best table's header
    assert page.count('<img class="samples" alt="') == len(re.findall(r"<img", page.replace(plotly_bundle(), "")))


def test_element_ids_are_slugs(page):
    rest = page.replace(plotly_bundle(), "")
    ids = re.findall(r'\sid="([^"]*)"', rest)
    fragments = re.findall(r'href="#([^"]*)"', rest)
    assert ids and fragments and set(fragments) <= set(ids)
    assert all(re.fullmatch(r"[A-Za-z0-9_-]+", name) for name in ids + fragments)
    assert len(set(ids)) == len(ids)
    assert any(slug(QUALITY) in name for name in _figure_ids(page))  # readable, though from a hostile name


def test_json_inside_scripts_holds_no_markup_characters(page):
    blocks = _data_blocks(page)
    assert blocks and set(blocks) == set(_figure_ids(page))
    for spec in blocks.values():
        assert not set(spec) & set("<>&" + SEPARATORS)
    names = {trace.get("name") for spec in blocks.values() for trace in json.loads(spec)["data"]}
    series = f"{LABELS[1]} · {SCHEDULES[1]} · w=2"
    assert plot_text(series) in names and series not in names  # plotly's text, escaped before JSON
    titles = {json.loads(spec)["layout"]["title"]["text"] for spec in blocks.values()}
    assert plot_text(f"Quality {IMAGE} vs counted NFE") in titles


def test_script_json_keeps_the_value_and_drops_the_markup_characters():
    value = {"name": f"{SCRIPT}{COMMENT}{SEPARATORS}&amp;", "x": [1, 2]}
    text = script_json(json.dumps(value, ensure_ascii=False))
    assert json.loads(text) == value
    assert not set(text) & set("<>&" + SEPARATORS)


def test_raw_text_refuses_what_would_end_an_element():
    for text in ("a</script>b", "a</STYLE>b", "<!-- x"):
        with pytest.raises(ValueError):
            raw_text(text)
    assert raw_text(DRAW) == DRAW


def test_the_policy_admits_exactly_the_pages_own_scripts_and_styles(page):
    policy = _policy(page)
    scripts = _executable_scripts(page)
    assert scripts == [plotly_bundle(), DRAW]
    assert policy["script-src"] == {source_hash(text) for text in scripts}
    styles = re.findall(r"<style>(.*?)</style>", page, re.DOTALL)
    assert styles == [CSS]
    assert policy["style-src"] == {source_hash(CSS), source_hash(PLOTLY_RUNTIME_STYLE)}
    assert policy["default-src"] == policy["object-src"] == policy["base-uri"] == policy["form-action"] == {"'none'"}
    assert policy["img-src"] == {"data:"}
    assert not [source for sources in policy.values() for source in sources if "unsafe" in source]
    # a <meta> policy covers only what comes after it
    assert page.index('http-equiv="Content-Security-Policy"') < min(page.index("<style>"), page.index("<script"))


def test_the_command_escapes_a_hostile_store_name(tmp_path):
    # `samplerbench report` titles the page after the store's file name
    store = _hostile_store(tmp_path / f"{IMAGE}.sqlite")
    out = tmp_path / "report.html"
    assert main(["report", str(store), "-o", str(out)]) == 0
    page = out.read_text(encoding="utf-8")
    assert f"<title>{html.escape(f'samplerbench: {IMAGE}')}</title>" in page and IMAGE not in page


# ----------------------------------------------------------------------------------------------------------------
# The page in a browser
# ----------------------------------------------------------------------------------------------------------------

CONTROL_SCRIPT = "<script>document.body.setAttribute('data-control-script', 'ran')</script>"
CONTROL_HANDLER = """<img src="x" onerror="document.body.setAttribute('data-control-handler', 'ran')">"""


class Dom(HTMLParser):
    """The elements of a serialized DOM with their attributes, the text under each, and the title."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.texts: list[tuple[str, str]] = []  # (the element the text follows, the text)
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, {name: value or "" for name, value in attrs}))

    def handle_data(self, data: str) -> None:
        if self.elements:
            self.texts.append((self.elements[-1][0], data))

    @property
    def title(self) -> str:
        return next(text for tag, text in self.texts if tag == "title")

    def attribute(self, tag: str, name: str) -> str | None:
        return next((attrs.get(name) for element, attrs in self.elements if element == tag), None)

    def with_class(self, name: str) -> list[dict[str, str]]:
        return [attrs for _, attrs in self.elements if name in attrs.get("class", "").split()]


def _open_in_chromium(pages: list[Path], folder: Path) -> list[tuple[Dom, str]]:
    """Each page's DOM after its scripts ran, and the browser's log (console messages, refused scripts); the
    browsers run side by side. The virtual-time budget lets plotly finish without waiting in real time."""
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-breakpad",
             "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000"]
    browsers = []
    for index, page in enumerate(pages):
        profile = folder / f"profile-{index}"
        browsers.append(subprocess.Popen(
            [CHROMIUM, *flags, f"--user-data-dir={profile}", "--dump-dom", page.as_uri()],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True))
    results = []
    for browser in browsers:
        try:
            dom, log = browser.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(browser.pid, signal.SIGKILL)  # its renderer and helpers too
            browser.communicate()
            raise
        assert browser.returncode == 0, log[-3000:]
        results.append((Dom(dom.replace(plotly_bundle(), "")), log))
    return results


def _payload_traces(dom: Dom) -> list[str]:
    """What a hostile string that ran, or that became markup, leaves in the DOM, one sentence each."""
    traces = [] if dom.title == TITLE else [f"the title became {dom.title!r}"]
    for tag, attrs in dom.elements:
        for name, value in attrs.items():
            if name.startswith("on"):
                traces.append(f"<{tag}> has an {name} handler")
            if re.sub(r"\s", "", value).lower().startswith("javascript:"):
                traces.append(f"<{tag}> has a javascript: {name}")
        if tag in ("iframe", "object", "embed", "base", "form", "frame"):
            traces.append(f"the page has a <{tag}>")
        if tag == "img" and not attrs.get("src", "").startswith("data:image/png;base64,"):
            traces.append(f"the page has an image from {attrs.get('src')!r}")
    return traces


def _assert_figures_drawn(dom: Dom, page: str, log: str) -> None:
    expected = set(_figure_ids(page))
    drawn = {attrs.get("id") for attrs in dom.with_class("js-plotly-plot")}
    assert expected and drawn == expected, log[-3000:]
    assert len(dom.with_class("main-svg")) >= len(expected)


@pytest.fixture(scope="module")
def browsed(report_path, page, tmp_path_factory) -> dict[str, tuple[Dom, str]]:
    """The report opened without its policy (plus a control script that must run) and with it (plus markup that
    escaping would have let through, which must not run)."""
    if CHROMIUM is None:
        pytest.skip(NO_CHROMIUM)
    folder = tmp_path_factory.mktemp("chromium")
    without_policy, injected = folder / "without-policy.html", folder / "injected.html"
    stripped, removed = re.subn(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", page)
    assert removed == 1, "the page has no Content-Security-Policy"
    without_policy.write_text(stripped.replace("</body>", f"{CONTROL_SCRIPT}</body>"), encoding="utf-8")
    injected.write_text(page.replace("</body>", f"{CONTROL_SCRIPT}{CONTROL_HANDLER}</body>"), encoding="utf-8")
    started = time.monotonic()
    doms = _open_in_chromium([without_policy, injected], folder)
    print(f"chromium: {time.monotonic() - started:.1f} s for both pages")
    return dict(zip(("escaping", "policy"), doms))


def test_escaping_alone_keeps_every_payload_inert(browsed, page):
    dom, log = browsed["escaping"]
    # scripts do run in this browser: the payloads had their chance
    assert dom.attribute("body", "data-control-script") == "ran", log[-3000:]
    assert _payload_traces(dom) == []
    _assert_figures_drawn(dom, page, log)
    # the hostile names are drawn as the literal text, neither dropped nor escaped twice
    drawn = [text for tag, text in dom.texts if tag in ("text", "tspan")]
    assert any(LABELS[0] in text for text in drawn) and any(ENTITIES in text for text in drawn)


def test_the_policy_alone_refuses_scripts_not_the_pages_own(browsed, page):
    dom, log = browsed["policy"]
    assert dom.attribute("body", "data-control-script") is None, log[-3000:]
    assert dom.attribute("body", "data-control-handler") is None, log[-3000:]
    assert dom.title == TITLE
    _assert_figures_drawn(dom, page, log)  # while admitting plotly and the drawing script
