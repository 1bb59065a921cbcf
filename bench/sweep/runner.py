"""Running a suite: each cell samples, measures, and writes its row; done cells are skipped on a re-run."""

from __future__ import annotations

import datetime
import fnmatch
import json
import math
import os
import platform
import subprocess
import sys
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from bench.errors import BenchError, unknown_name
from bench.measure.features import FeatureSpace, feature_space_for
from bench.measure.metrics import MetricContext, SharedCache, model_id
from bench.measure.reference import ReferenceCache
from bench.registry import PluginManager, manager
from bench.core.sampling import SampleOutput, load_model, sample
from bench.sweep.provenance import environment
from bench.sweep.store import Store
from bench.sweep.cell import Cell, draw
from bench.sweep.suite import Suite


EXECUTORS = ("local", "ray")


@dataclass
class RunSummary:
    store: Path
    done: int
    failed: int
    skipped: int


def measure(cell: Cell, model, shards: list[SampleOutput], references: ReferenceCache, shared: SharedCache,
            plugins: PluginManager, feature_space: FeatureSpace | None = None) -> dict[str, Any]:
    """The row's measured part from a cell's samples (one shard, or several in sample order). Raises on failure."""
    x = torch.cat([shard.x.to(shards[0].x.device) for shard in shards])
    x_T = torch.cat([shard.x_T.to(x.device) for shard in shards])
    labels = torch.cat([shard.labels for shard in shards]) if shards[0].labels is not None else None
    if len(x) != cell.n:
        raise BenchError(f"the cell drew {len(x)} samples; it asked for {cell.n}")
    if not torch.isfinite(x).all().item():
        bad = (~torch.isfinite(x.flatten(1))).any(dim=1).sum().item()
        raise FloatingPointError(f"{bad} of {cell.n} samples are not finite")
    context = MetricContext(model=model, model_id=model_id(cell.model.name, cell.model.kwargs, model),
                            samples=x, x_T=x_T, labels=labels, seed=cell.seed,
                            stochastic=shards[0].stochastic, references=references, shared=shared,
                            feature_space=feature_space)
    metrics = {}
    for name in cell.metrics:
        value = plugins.get("metric", name).obj.compute(context)
        metrics[name] = None if value is None or not math.isfinite(value) else float(value)
    sizes = [len(shard.x) for shard in shards]
    nfe = sum(shard.nfe * size for shard, size in zip(shards, sizes)) / cell.n  # per sample; adaptive NFE varies
    model_evals = sum(shard.model_evals * size for shard, size in zip(shards, sizes)) / cell.n
    peaks = [shard.peak_memory_bytes for shard in shards if shard.peak_memory_bytes is not None]
    return {"nfe": nfe, "model_evals": model_evals, "steps": shards[0].plan.steps,
            "seconds": sum(shard.seconds for shard in shards), "metrics": metrics,
            "batch_size": min(shard.batch_size for shard in shards), "peak_memory_bytes": max(peaks) if peaks else None,
            "grid_png": sample_grid_png(x) if x.dim() == 4 else None}


def run_cell(cell: Cell, model, references: ReferenceCache, shared: SharedCache, plugins: PluginManager,
             feature_space: FeatureSpace | None = None) -> dict[str, Any]:
    """Sample and measure one cell in this process; the row's measured part. Raises on failure."""
    return measure(cell, model, [draw(cell, model, plugins)], references, shared, plugins, feature_space)


def sample_grid_png(x: torch.Tensor, count: int = 64) -> bytes:
    """The first samples of a cell as one PNG grid; samples live in [-1, 1]."""
    import io

    from PIL import Image
    from torchvision.utils import make_grid

    from bench.measure.features import to_uint8

    images = to_uint8(x[:count].cpu())
    grid = make_grid(images, nrow=int(len(images) ** 0.5 + 0.999), padding=1, pad_value=255)
    buffer = io.BytesIO()
    Image.fromarray(grid.permute(1, 2, 0).squeeze(-1).numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


def _feature_space_or_none(model, weights_path: str | None) -> FeatureSpace | None:
    """The model's feature space, or None to let a metric that needs one fail its cell with the reason."""
    try:
        return feature_space_for(model, weights_path)
    except BenchError:
        return None


def matches(cell: Cell, patterns: Sequence[str]) -> bool:
    """Whether a --rerun glob names this cell: by its solver label, solver name or model, or a key prefix."""
    names = (cell.solver.describe(), cell.solver.name, cell.model.describe(), cell.model.name)
    return any(cell.key.startswith(pattern) or any(fnmatch.fnmatchcase(name, pattern) for name in names)
               for pattern in patterns)


def run_suite(suite: Suite, out_dir: str | Path = "results", *, plugins: PluginManager | None = None,
              progress: bool = True, executor: str = "local", shards: int = 1,
              ray_address: str | None = None, ray_workers: int | None = None,
              rerun: Sequence[str] = ()) -> RunSummary:
    """Run every cell not yet done; the driver writes each row, in one transaction, as its cell finishes.

    A cell is done when the store holds a done row under its key, which covers its config and the code that computes
    it: edited code is recomputed. ``rerun`` globs (see ``matches``) recompute the cells they name anyway.

    ``executor="ray"`` runs each cell as ``shards`` Ray tasks over disjoint sample ranges (bench.sweep.executors); the
    samples, and so the rows, are the local executor's, since every sample's noise depends on its index alone.
    ``ray_workers`` sizes a local Ray instance (tasks at once); ``ray_address`` names an existing cluster instead.
    """
    plugins = plugins or manager()
    if executor not in EXECUTORS:
        raise unknown_name("executor", executor, EXECUTORS)
    if shards < 1:
        raise BenchError(f"shards must be >= 1; got {shards}")
    if ray_workers is not None:
        if executor != "ray" or ray_workers < 1:
            raise BenchError(f"ray_workers (got {ray_workers}) must be >= 1 and needs executor 'ray' "
                             f"(got {executor!r})")
        import ray

        cluster = ray_address or os.environ.get("RAY_ADDRESS") or ("already initialised" if ray.is_initialized()
                                                                   else None)
        if cluster:
            raise BenchError(f"ray_workers ({ray_workers}) sets the size of a local Ray instance; the existing "
                             f"cluster ({cluster}) has its own size")
    out_dir = Path(out_dir)
    store_path = out_dir / f"{suite.name}.sqlite"
    references = ReferenceCache(out_dir / "cache")
    shared = SharedCache(out_dir / "cache")
    models: dict[tuple[Any, str], Any] = {}
    feature_spaces: dict[Any, FeatureSpace | None] = {}
    environments: dict[str, dict[str, Any]] = {}

    def model_for(cell: Cell):
        if (cell.model, cell.device) not in models:
            loaded = suite.models.get(cell.model) if cell.device == "cpu" else None
            models[cell.model, cell.device] = loaded or load_model(cell.model.name, device=cell.device,
                                                                  plugins=plugins, **cell.model.kwargs)
            feature_spaces[cell.model] = _feature_space_or_none(models[cell.model, cell.device],
                                                                suite.feature_extractor_weights_path)
        return models[cell.model, cell.device]

    def local_outcomes(cells: list[Cell]):
        for cell in cells:
            yield cell, lambda cell=cell: run_cell(cell, model_for(cell), references, shared, plugins,
                                                   feature_spaces[cell.model])

    def ray_outcomes(cells: list[Cell]):
        from bench.sweep.executors import ray_shards

        for cell, shard_outputs in ray_shards(cells, shards, address=ray_address, workers=ray_workers):
            def produce(cell=cell, shard_outputs=shard_outputs):
                if isinstance(shard_outputs, BaseException):
                    raise shard_outputs
                return measure(cell, model_for(cell), shard_outputs, references, shared, plugins,
                               feature_spaces[cell.model])
            yield cell, produce

    done = failed = 0
    with Store(store_path) as store:
        finished = store.done_keys()
        pending = [cell for cell in suite.cells if cell.key not in finished or matches(cell, rerun)]
        outcomes = local_outcomes(pending) if executor == "local" else ray_outcomes(pending)
        bar = tqdm(outcomes, total=len(pending), desc=suite.name, unit="cell", disable=not progress,
                   file=sys.stderr)
        for cell, produce in bar:
            budget = f"nfe={cell.nfe}" if cell.tolerance is None else f"tol={cell.tolerance:g}"
            bar.set_postfix_str(f"{cell.model.name} {cell.solver.describe()} {budget}", refresh=False)
            row = {"key": cell.key, "config_key": cell.config_key, "suite": cell.suite, "model": cell.model.describe(),
                   "solver": cell.solver.name, "label": cell.solver.describe(), "schedule": cell.schedule.describe(),
                   "nfe_budget": cell.nfe, "tolerance": cell.tolerance, "guidance": cell.guidance,
                   "labels": cell.labels, "seed": cell.seed, "n": cell.n, "dtype": cell.dtype,
                   "network_precision": cell.precision, "device": cell.device, "config": cell.config(),
                   "code": json.loads(cell.code),
                   "environment": environments.setdefault(cell.device, environment(cell.device))}
            try:
                row.update(produce(), status="done", error=None)
                done += 1
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as error:  # a broken cell is recorded, and the sweep goes on
                message = f"{type(error).__name__}: {error}"
                if not isinstance(error, (BenchError, FloatingPointError)):
                    message += "\n" + "".join(traceback.format_tb(error.__traceback__)[-3:])
                row.update(status="failed", error=message, nfe=None, model_evals=None, steps=None, seconds=None,
                           metrics={}, batch_size=None, peak_memory_bytes=None)
                failed += 1
            row["finished_at"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            store.write(row, grid_png=row.pop("grid_png", None))
    return RunSummary(store=store_path, done=done, failed=failed, skipped=len(suite.cells) - len(pending))
