"""The report page: one self-contained HTML file of a sweep, with a section per model (figures, sample grids, the
best series per budget, every cell) and the provenance of every number.

The file opens offline: the plotly.js bundle is embedded once in <head>, every figure is an empty <div> and its
JSON, and one fixed script draws them all (bench.report.scripts). Metrics are not comparable across models, so each
model gets its own section.

The page runs no script but its own. Every string that reaches it from a store, a plugin or a config (model
names, labels, metric names and titles, error text, provenance, the title) is escaped for its context by
bench.report.escape: as HTML text, in attributes, slugged into ids, as plotly text, as JSON inside a script. And a
Content-Security-Policy admits only the page's own scripts, so markup that slipped past escaping would not run.
"""

from __future__ import annotations

import base64
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from bench.report.data import (MetricInfo, aggregate, best_per_budget, done, has, metric_infos, normalize,
                               with_series)
from bench.report.escape import element_id, html_text, raw_text
from bench.report.figures import figures, headline, styles_for
from bench.report.scripts import (DRAW, PLOTLY_RUNTIME_STYLE, content_security_policy, figure_element,
                                  plotly_bundle, policy_meta, script_element)


def write_report(
    results: pd.DataFrame,
    out_path: str | Path,
    *,
    title: str,
    provenance: dict[str, str] | None = None,
    sample_grids: Mapping[str, bytes] | None = None,
    notice: str | None = None,
) -> Path:
    """Write the HTML report of ``results`` (one row per cell, as bench.read_results gives them) to ``out_path``
    atomically; return the path.

    ``provenance`` (git sha, torch version, device, date, suite file, N, feature space, ...) is shown as a table.
    ``sample_grids`` optionally maps a cell key to PNG bytes of a grid of that cell's samples (image models); each
    model's section shows them as a gallery, one per solver and NFE budget. ``notice``, shown first, says what
    the reader must know before any number (a report drawn while a sweep is unfinished).
    """
    infos = metric_infos(results)
    frame = normalize(results, infos)
    page = _render_page(frame, infos, title=title, provenance=provenance or {}, sample_grids=sample_grids or {},
                        notice=notice)
    return _write_atomic(Path(out_path), page)


def _fmt(value: object) -> str:
    """Cell text: blanks for missing, 4 significant digits for floats, integers without '.0'."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "–"
    if isinstance(value, (float, np.floating)):
        return f"{value:.0f}" if float(value).is_integer() and abs(value) < 1e15 else f"{value:.4g}"
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[object]],
           row_classes: Sequence[str] | None = None) -> str:
    """A plain HTML table; every cell and header is escaped."""
    head = "".join(f"<th>{html_text(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{html_text(row_classes[i])}"' if row_classes and row_classes[i] else ""
        cells = "".join(f"<td>{html_text(_fmt(v))}</td>" for v in row)
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _best_table(cells: pd.DataFrame, infos: Mapping[str, MetricInfo]) -> str:
    info = headline(infos, done(cells))
    if info is None:
        return "<p>No quality metric was computed for this model.</p>"
    best = best_per_budget(cells, info.name, infos)
    rows = [[r.nfe_budget, r.label, r.schedule, r.value, r.nfe, r.seeds] for r in best.itertuples()]
    header = ["NFE budget", "best label", "schedule", f"{info.title} (mean, {info.better} is better)",
              "counted NFE", "seeds"]
    return _table(header, rows)


def _cells_table(cells: pd.DataFrame, infos: Mapping[str, MetricInfo]) -> str:
    """Every cell of the model, failed ones included with their error text."""
    metrics = [name for name in infos if has(cells, name)]
    columns = ["key", "label", "solver", "schedule", "nfe_budget", "tolerance", "guidance", "seed", "n", "status", "nfe",
               "model_evals", "seconds", "device", *metrics, "error"]
    ordered = cells.sort_values(["label", "schedule", "nfe_budget", "seed"], kind="stable", na_position="last")
    rows = [[_cell_value(row[c]) for c in columns[:-1]] + [_errors(row)] for _, row in ordered.iterrows()]
    classes = ["failed" if status != "done" else "" for status in ordered["status"]]
    return _table(columns, rows, classes)


def _errors(row: pd.Series) -> str | None:
    """Why the cell failed, or which of its metrics failed (a failed metric spares the others)."""
    parts = [str(row["error"])] if isinstance(row.get("error"), str) else []
    failed_metrics = _json_object(row.get("metric_errors"))
    parts += [f"metric {name!r} failed: {reason}" for name, reason in failed_metrics.items()]
    return "\n".join(parts) or None


def _json_object(text: object) -> dict:
    """A JSON object from the store, or {} for anything else (an edited store may hold any text)."""
    try:
        value = json.loads(text) if isinstance(text, str) else text
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _cell_value(value: object) -> object:
    return None if value is None or (not isinstance(value, str) and pd.isna(value)) else value


def _provenance_table(provenance: Mapping[str, str]) -> str:
    if not provenance:
        return "<p>No provenance was recorded.</p>"
    return _table(["item", "value"], [[k, v] for k, v in provenance.items()])


def _code_table(frame: pd.DataFrame) -> str:
    """Every plugin that computed a row, with its distribution, version and source hash (bench.sweep.provenance)."""
    if "code" not in frame.columns:
        return ""
    rows = set()
    for text in frame["code"].dropna():
        code = _json_object(text)  # an edited store: show what is readable, not a traceback
        harness = code.get("harness") or {}
        if isinstance(harness, dict) and harness:
            rows.add(("harness", "bench", "samplerbench", _json_text(harness.get("samplerbench")),
                      f"noise {harness.get('noise')}", str(harness.get("sha256", ""))[:16]))
        for role in ("model", "solver", "schedule", "metrics"):
            entries = code.get(role) or []
            for entry in entries if isinstance(entries, list) else [entries]:
                if isinstance(entry, dict):
                    names = (_json_text(entry.get(key)) for key in ("name", "plugin", "distribution"))
                    rows.add((role.rstrip("s"), *names, f"{entry.get('version')} ({entry.get('module')})",
                              str(entry.get("sha256", ""))[:16]))
    if not rows:
        return ""
    header = ["role", "name", "plugin", "distribution", "version (module)", "source sha256"]
    return "<h3>Code</h3>" + _table(header, sorted(rows, key=lambda row: tuple(map(str, row))))


def _json_text(value: object) -> str | None:
    """A JSON value as table text; lists and objects become strings, so that rows stay hashable and sortable."""
    return None if value is None else str(value)


def _conditioning(cells: pd.DataFrame) -> str:
    """Whether the model's samples were conditional, and on which labels: it changes every number."""
    if "labels" not in cells.columns:
        return ""
    kinds = sorted(cells["labels"].dropna().astype(str).unique())
    text = {"none": "unconditional (no labels)",
            "balanced": "conditional, balanced labels (sample i is drawn for class i mod the number of classes)"}
    described = "; ".join(text.get(kind, kind) for kind in kinds) or "not recorded"
    return f'<p class="note">Samples: {html_text(described)}.</p>'



# ----------------------------------------------------------------------------------------------------------------
# Page
# ----------------------------------------------------------------------------------------------------------------

CSS = """
img.samples { image-rendering: pixelated; width: 128px; height: auto; border: 1px solid #ddd; }
.gallery { overflow-x: auto; } .gallery th { font-weight: normal; font-size: 0.85em; text-align: left; }
body { font-family: system-ui, sans-serif; margin: 1.5em 2em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 2em; }
.figures { display: grid; grid-template-columns: repeat(auto-fill, minmax(520px, 1fr)); gap: 1em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ddd; padding: 0.2em 0.5em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } tr.failed td { background: #fdecea; }
.notice { background: #fff4d6; border: 1px solid #e0b000; padding: 0.5em 0.8em; font-weight: bold; }
td:last-child { white-space: pre-wrap; max-width: 40em; }
.note { color: #555; } img.samples { max-width: 100%; image-rendering: pixelated; }
div.plotly-graph-div { width: 100%; height: 420px; }
"""


def _notice(notice: str | None) -> str:
    return f'<p class="notice">{html_text(notice)}</p>' if notice else ""


def _summary(frame: pd.DataFrame) -> str:
    done = int((frame["status"] == "done").sum())
    failed = len(frame) - done
    text = f"{len(frame)} cells: {done} done, {failed} failed, {frame['model'].nunique()} model(s)."
    if done == 0:
        text += " There are no completed cells, so there is nothing to plot."
    return f"<p>{html_text(text)}</p>"


def _notes(frame: pd.DataFrame, provenance: Mapping[str, str]) -> str:
    """N per cell and the feature space, which qualify every FID / precision / recall number."""
    parts = []
    sample_counts = sorted({int(n) for n in frame["n"].dropna()})
    if sample_counts:
        parts.append(f"N = {', '.join(map(str, sample_counts))} samples per cell.")
    feature_space = next((provenance[k] for k in ("feature_space", "feature space") if k in provenance), None)
    if feature_space:
        parts.append(f"FID / precision / recall features: {feature_space}.")
    parts.append("Lines show the mean over seeds (error bars: std across seeds); failed cells are not plotted.")
    return f'<p class="note">{html_text(" ".join(parts))}</p>'


def _image(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img class="samples" alt="{html_text(alt)}" src="data:image/png;base64,{data}">'


def _sample_gallery(finished: pd.DataFrame, sample_grids: Mapping[str, bytes]) -> str:
    """One grid per solver (row) and NFE budget (column), from the first seed of each."""
    cells = finished[finished["key"].isin(sample_grids.keys())]
    if cells.empty:
        return ""
    cells = cells.sort_values(["seed"], kind="stable").drop_duplicates(["series", "nfe_budget", "tolerance"])
    budgets = sorted(cells["nfe_budget"].dropna().unique())
    header = "".join(f"<th>NFE {int(b)}</th>" for b in budgets)
    rows = []
    for series, row_cells in cells.groupby("series", sort=True):
        by_budget = {b: key for b, key in zip(row_cells["nfe_budget"], row_cells["key"])}
        images = "".join(
            f"<td>{_image(sample_grids[by_budget[b]], f'{series} at NFE {int(b)}') if b in by_budget else ''}</td>"
            for b in budgets)
        rows.append(f"<tr><th>{html_text(series)}</th>{images}</tr>")
    return (f'<h3>Samples</h3><div class="gallery"><table><tr><th></th>{header}</tr>{"".join(rows)}</table>'
            "</div>")


def _model_section(index: int, model: str, cells: pd.DataFrame, infos: Mapping[str, MetricInfo],
                   sample_grids: Mapping[str, bytes]) -> str:
    finished = with_series(done(cells))
    parts = [f'<section id="{element_id("model", index)}"><h2>Model: {html_text(model)}</h2>', _conditioning(cells)]
    if finished.empty:
        parts.append("<p>No completed cells for this model.</p>")
    else:
        agg = aggregate(finished, ["seconds", *infos])
        styles = styles_for(agg)
        # the position ends the id: slugs of two metric names may coincide
        divs = "".join(f"<div>{figure_element(fig, element_id('fig', index, name, position))}</div>"
                       for position, (name, fig) in enumerate(figures(agg, finished, styles, infos)))
        parts.append(f'<div class="figures">{divs}</div>')
    parts.append(_sample_gallery(finished, sample_grids))
    parts.append(f"<h3>Best solver per NFE budget</h3>{_best_table(cells, infos)}")
    parts.append(f"<h3>All cells</h3>{_cells_table(cells, infos)}</section>")
    return "".join(parts)


def _toc(models: Sequence[str]) -> str:
    if not models:
        return ""
    items = "".join(f'<li><a href="#{element_id("model", i)}">{html_text(m)}</a></li>' for i, m in enumerate(models))
    return f"<ul>{items}</ul>"


def _render_page(frame: pd.DataFrame, infos: Mapping[str, MetricInfo], *, title: str,
                 provenance: Mapping[str, str], sample_grids: Mapping[str, bytes], notice: str | None) -> str:
    models = sorted(frame["model"].unique())
    sections = "".join(
        _model_section(i, m, frame[frame["model"] == m], infos, sample_grids) for i, m in enumerate(models))
    body = (f"<h1>{html_text(title)}</h1>{_notice(notice)}{_summary(frame)}{_notes(frame, provenance)}{_toc(models)}"
            f"{sections}<h2>Provenance</h2>{_provenance_table(provenance)}{_code_table(frame)}")
    return _document(title, body)


def _document(title: str, body: str) -> str:
    """The page around ``body``: the policy first in <head>, so that it covers every script and style after it."""
    scripts, styles = (plotly_bundle(), DRAW), (CSS, PLOTLY_RUNTIME_STYLE)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"{policy_meta(content_security_policy(scripts, styles))}<title>{html_text(title)}</title>"
        f"<style>{raw_text(CSS)}</style>{script_element(plotly_bundle())}</head>\n"
        f"<body>{body}{script_element(DRAW)}</body></html>\n"
    )


def _write_atomic(path: Path, text: str) -> Path:
    """Write via a temp file in the same directory and rename, so a crash never leaves a partial report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a report is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
