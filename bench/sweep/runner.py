"""Running a suite: load its models, draw each pending cell's samples through an executor, measure them, and write
the cell's row; done cells are skipped on a re-run.

    suite (cells) -> prepare (models, checked against the suite) -> executor (samples) -> measure (metrics)
        -> bench.sweep.schema.row -> store

The runner alone loads models: parsing a suite checks names and options, and what needs a model (its classes,
its sigma range) is checked here, before the store is opened, so bad input still leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import io
import math
import os
import sys
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from bench.core.memory import check_cell, memory_budget
from bench.core.sampling import DTYPES, SampleOutput, get_solver, load_model, make_sigmas, model_device
from bench.errors import BenchError, unknown_name
from bench.measure.features import FeatureSpace, feature_space_for, to_uint8
from bench.measure.metrics import MetricContext, SharedCache, model_id
from bench.measure.reference import ReferenceCache
from bench.registry import PluginManager, manager
from bench.sweep import schema
from bench.sweep.cell import Cell, Component
from bench.files import remove_stale_temporaries
from bench.sweep.executors import local_draws, ray_draws
from bench.sweep.fits import FitCache, fit_cells, seeds_of_fits
from bench.sweep.provenance import environment
from bench.sweep.store import Heartbeat, Store, new_claimant
from bench.sweep.suite import Suite
from bench.sweep.timeouts import DEFAULT_CELL_TIMEOUT, CellTimeout, time_limit

EXECUTORS = ("local", "ray")


@dataclass
class RunSummary:
    store: Path
    done: int
    failed: int
    skipped: int  # done before (by an earlier run, or by another run meanwhile)
    busy: int = 0  # being computed by another live run sharing the store


@dataclass
class Prepared:
    """What the cells of a suite need that the suite file cannot say: the models, loaded once, their feature
    spaces (None: a metric that needs one fails its cell with the reason), and the cells refused because what
    they would keep exceeds the memory budget (cell key -> the reason; recorded as failed, never drawn)."""

    models: dict[tuple[Component, str], Any]
    feature_spaces: dict[Component, FeatureSpace | None]
    refused: dict[str, str] = field(default_factory=dict)


def prepare(suite: Suite, plugins: PluginManager) -> Prepared:
    """Load each model of the suite on each device it runs on, and check the cells against it: conditioning and
    guidance against its classes, every schedule's options against its sigma range."""
    for name in dict.fromkeys(name for cell in suite.cells for name in cell.metrics):
        if name in schema.NAMES:
            plugin = plugins.get("metric", name).plugin
            raise BenchError(f"metric {name!r} (plugin {plugin!r}) is named like a column of the result row; the "
                             f"plugin must rename it (row columns: {', '.join(schema.NAMES)})")
    models: dict[tuple[Component, str], Any] = {}
    feature_spaces: dict[Component, FeatureSpace | None] = {}
    checked: set[tuple] = set()
    for cell in suite.cells:
        if (cell.model, cell.device) not in models:
            model = load_model(cell.model.name, device=cell.device, plugins=plugins, **cell.model.kwargs)
            models[cell.model, cell.device] = model
            try:
                feature_spaces.setdefault(cell.model, feature_space_for(model, suite.feature_extractor_weights_path))
            except BenchError:
                feature_spaces.setdefault(cell.model, None)
        steps = (None if cell.tolerance is not None
                 else get_solver(cell.solver.name, plugins, **cell.solver_options).plan(cell.nfe).steps)
        what = (cell.model, cell.schedule, steps, cell.guidance_type if cell.guidance is not None else None,
                cell.labels, cell.device)
        if what not in checked:
            checked.add(what)
            _check_against_model(cell, steps, models[cell.model, cell.device], plugins)
    refused = {}
    memory_budget("cpu")  # a malformed SAMPLERBENCH_MEMORY_BUDGET stops the suite here, not cell by cell
    for cell in suite.cells:  # the memory budget (bench.core.memory), before anything is drawn
        model, space = models[cell.model, cell.device], feature_spaces[cell.model]
        try:
            check_cell(f"cell {cell.describe()}", cell.n, model.shape, DTYPES[cell.dtype], cell.device, cell.metrics,
                       feature_dim=space.dim if space is not None else None, labelled=cell.labels != "none")
        except BenchError as error:
            refused[cell.key] = _failure(error)
    return Prepared(models, feature_spaces, refused)


def _check_against_model(cell: Cell, steps: int | None, model, plugins: PluginManager) -> None:
    name = cell.model.describe()
    conditional = model.num_classes is not None
    if cell.guidance is not None and not conditional:
        raise BenchError(f"guidance is given, but model {name!r} is unconditional; remove guidance or the model")
    if cell.labels != "none" and not conditional:
        raise BenchError(f"labels = {cell.labels!r} given, but model {name!r} is unconditional")
    if cell.guidance is not None and cell.guidance_type == "classifier" and not hasattr(model, "class_log_posterior"):
        raise BenchError(f"guidance_type = \"classifier\" needs a model that knows its noisy-class posterior; "
                         f"{name!r} does not (use \"classifier-free\")")
    if steps is not None and "fit" not in plugins.get("schedule", cell.schedule.name).extras:
        # an adaptive solver picks its own grid; a learned one's fit checks its grid (bench.core.fitting.check_grid)
        try:
            make_sigmas(cell.schedule.name, steps, model, plugins, **cell.schedule.kwargs)
        except BenchError as error:
            raise BenchError(f"solver {cell.solver.describe()!r}, model {name!r}: {error}") from None


def measure(cell: Cell, model, shards: list[SampleOutput], references: ReferenceCache, shared: SharedCache,
            plugins: PluginManager, feature_space: FeatureSpace | None = None) -> dict[str, Any]:
    """The row's measured part from a cell's samples (one shard, or several in sample order). Raises on failure."""
    if len(shards) == 1:  # no copy: at 10^7 samples x and x_T are what the memory budget counts
        x, x_T, labels = shards[0].x, shards[0].x_T, shards[0].labels
    else:
        x = torch.cat([shard.x.to(shards[0].x.device) for shard in shards])
        x_T = torch.cat([shard.x_T.to(x.device) for shard in shards])
        labels = torch.cat([shard.labels for shard in shards]) if shards[0].labels is not None else None
    if len(x) != cell.n:
        raise BenchError(f"the cell drew {len(x)} samples; it asked for {cell.n}")
    if not torch.isfinite(x).all().item():
        bad = (~torch.isfinite(x.flatten(1))).any(dim=1).sum().item()
        raise FloatingPointError(f"{bad} of {cell.n} samples are not finite")
    context = MetricContext(model=model, model_id=model_id(cell.model.name, cell.model.kwargs, model),
                            samples=x, x_T=x_T, labels=labels, seed=cell.seed, stochastic=shards[0].stochastic,
                            references=references, shared=shared, feature_space=feature_space)
    metrics, metric_errors = {}, {}
    for name in cell.metrics:  # a metric that fails is recorded as failed; the others are still measured
        try:
            metrics[name] = metric_value(name, plugins.get("metric", name).obj.compute(context))
        except (KeyboardInterrupt, SystemExit, CellTimeout):
            raise
        except Exception as error:
            metrics[name], metric_errors[name] = None, _failure(error)
    sizes = [len(shard.x) for shard in shards]
    nfe = sum(shard.nfe * size for shard, size in zip(shards, sizes)) / cell.n  # per sample; adaptive NFE varies
    model_evals = sum(shard.model_evals * size for shard, size in zip(shards, sizes)) / cell.n
    rounds = sum(shard.rounds * size for shard, size in zip(shards, sizes)) / cell.n  # each batch's, on average
    peaks = [shard.peak_memory_bytes for shard in shards if shard.peak_memory_bytes is not None]
    return {"nfe": nfe, "rounds": rounds, "model_evals": model_evals, "steps": shards[0].plan.steps,
            "seconds": sum(shard.seconds for shard in shards), "metrics": metrics, "metric_errors": metric_errors,
            "batch_size": min(shard.batch_size for shard in shards), "peak_memory_bytes": max(peaks) if peaks else None,
            "grid_png": sample_grid_png(x) if x.dim() == 4 else scatter_png(x, model)}


def metric_value(name: str, value: Any) -> float | None:
    """What a metric returned, as the row keeps it: a float, or None where it does not apply (or is not finite)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not (
            isinstance(value, torch.Tensor) and value.numel() == 1):
        raise BenchError(f"metric {name!r} returned {type(value).__name__} ({value!r:.60}); a metric returns a float, "
                         "or None where it does not apply")
    value = float(value)
    return value if math.isfinite(value) else None


def sample_grid_png(x: torch.Tensor, count: int = 64) -> bytes:
    """The first samples of a cell as one PNG grid; samples live in [-1, 1]."""
    from PIL import Image
    from torchvision.utils import make_grid

    images = to_uint8(x[:count].cpu())
    grid = make_grid(images, nrow=int(len(images) ** 0.5 + 0.999), padding=1, pad_value=255)
    buffer = io.BytesIO()
    Image.fromarray(grid.permute(1, 2, 0).squeeze(-1).numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


def scatter_png(x: torch.Tensor, model, count: int = 1000,
                pixels: int = 240) -> bytes | None:
    """For a 2-D model that knows its density (``log_density``): the first samples of a cell as red dots over the
    true density at sigma_min (white to blue), so a missed or smeared mode shows at a glance. The window is the
    data's (every cell of a model on the same axes); samples beyond it are pinned to its edge. None otherwise."""
    if x.dim() != 2 or x.shape[1] != 2 or not hasattr(model, "log_density") or not hasattr(model, "sample_data"):
        return None
    from PIL import Image

    points = x[:count].detach().to("cpu", torch.float64)
    extent = model.sample_data(4096, seed=0).to(torch.float64).abs().quantile(0.999).item() * 1.3
    axis = torch.linspace(-extent, extent, pixels, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(axis, axis.flip(0), indexing="xy"), dim=-1).reshape(-1, 2)  # y up
    with torch.inference_mode():
        log_p = model.log_density(grid.to(model_device(model)), float(model.sigma_min)).to("cpu", torch.float64)
    shade = (log_p - log_p.max()).exp().sqrt().reshape(pixels, pixels)  # sqrt: the tails stay visible
    white, blue = torch.tensor([255.0, 255.0, 255.0]), torch.tensor([40.0, 90.0, 200.0])
    image = (white + shade[..., None] * (blue - white)).round().to(torch.uint8)

    def to_pixel(value: torch.Tensor) -> torch.Tensor:  # -extent .. extent -> 0 .. pixels - 2 (a dot is 2 wide)
        return ((value + extent) / (2 * extent) * (pixels - 1)).round().long().clamp(0, pixels - 2)

    columns, rows = to_pixel(points[:, 0].nan_to_num(0.0)), to_pixel(-points[:, 1].nan_to_num(0.0))  # y up
    for dr in (0, 1):  # 2 x 2 pixel dots
        for dc in (0, 1):
            image[rows + dr, columns + dc] = torch.tensor([220, 30, 30], dtype=torch.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image.numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


def matches(cell: Cell, patterns: Sequence[str]) -> bool:
    """Whether a --rerun glob names this cell: by its solver label, solver name or model, or a key prefix."""
    names = (cell.solver.describe(), cell.solver.name, cell.model.describe(), cell.model.name)
    return any(cell.key.startswith(pattern) or any(fnmatch.fnmatchcase(name, pattern) for name in names)
               for pattern in patterns)


def _check_executor(executor: str, shards: int, ray_address: str | None, ray_workers: int | None) -> None:
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


def _failure(error: BaseException) -> str:
    message = f"{type(error).__name__}: {error}"
    if not isinstance(error, (BenchError, FloatingPointError, CellTimeout)):
        message += "\n" + "".join(traceback.format_tb(error.__traceback__)[-3:])
    return message


def store_path(suite: Suite, out_dir: str | Path) -> Path:
    return Path(out_dir) / f"{suite.name}.sqlite"


def run_suite(suite: Suite, out_dir: str | Path = "results", *, plugins: PluginManager | None = None,
              progress: bool = True, executor: str = "local", shards: int = 1,
              ray_address: str | None = None, ray_workers: int | None = None,
              rerun: Sequence[str] = (), cell_timeout: float | None = None) -> RunSummary:
    """Run every cell not yet done; the driver writes each row, in one transaction, as its cell finishes.

    A cell is done when the store holds a done row under its key, which covers its config and the code that computes
    it: edited code is recomputed. ``rerun`` globs (see ``matches``) recompute the cells they name anyway.

    Runs sharing a store share its work: a cell is claimed just before it starts, so two runs (or two drivers)
    never compute it twice, and a claim whose run died is taken over. A cell past its time limit (``cell_timeout``,
    else the suite's, else DEFAULT_CELL_TIMEOUT) is stopped and recorded as failed, and the sweep goes on. On
    KeyboardInterrupt the cell in flight is not recorded, its claim is released, and the interrupt propagates.

    ``executor="ray"`` runs each cell as ``shards`` Ray tasks over disjoint sample ranges (bench.sweep.executors); the
    samples, and so the rows, are the local executor's up to rounding, since every sample's noise depends on its
    index alone. ``ray_workers`` sizes a local Ray instance (tasks at once); ``ray_address`` names an existing
    cluster instead.
    """
    plugins = plugins or manager()
    _check_executor(executor, shards, ray_address, ray_workers)
    timeout = cell_timeout if cell_timeout is not None else (suite.cell_timeout or DEFAULT_CELL_TIMEOUT)
    if not timeout > 0:
        raise BenchError(f"cell_timeout must be > 0 seconds; got {timeout!r}")
    try:
        prepared = prepare(suite, plugins)  # before the store exists: bad input writes nothing
        seeds_of_fits(suite.cells, plugins)
    except BenchError as error:
        raise BenchError(f"{suite.path}: {error}" if suite.path else str(error)) from None
    out_dir = Path(out_dir)
    path = store_path(suite, out_dir)
    remove_stale_temporaries(out_dir / "cache")
    references = ReferenceCache(out_dir / "cache")
    shared = SharedCache(out_dir / "cache", settings={"dinov2_weights_path": suite.dinov2_weights_path})
    environments: dict[str, dict[str, Any]] = {}
    claimant = new_claimant()
    done = failed = skipped = 0
    busy: list[Cell] = []

    with Store(path) as store, Heartbeat(path, claimant):
        store.describe_metrics(plugins.get("metric", name).obj.info(name)
                               for name in dict.fromkeys(name for cell in suite.cells for name in cell.metrics))
        finished = store.done_keys()
        pending = [cell for cell in suite.cells if cell.key not in finished or matches(cell, rerun)]
        skipped = len(suite.cells) - len(pending)
        # learned schedules and solvers: each fit once (or from results/fits), before any cell that uses it
        # (not for cells over the memory budget, which are refused below)
        fits = fit_cells([cell for cell in pending if cell.key not in prepared.refused], prepared.models, plugins, FitCache(out_dir / "fits"), progress=progress)
        pending = [dataclasses.replace(cell, fit=(str(out_dir / "fits" / fits[cell.key].entry["file"]),
                                                  fits[cell.key].entry["sha256"])) if cell.key in fits else cell
                   for cell in pending]
        bar = tqdm(total=len(pending), desc=suite.name, unit="cell", disable=not progress, file=sys.stderr)

        def claim(cell: Cell) -> bool:
            nonlocal skipped
            outcome = store.claim(cell.key, claimant, redo=matches(cell, rerun))
            if outcome == "busy":
                busy.append(cell)
            skipped += outcome == "done"  # done by another run since this one started
            return outcome == "claimed"

        try:
            for cell in [cell for cell in pending if cell.key in prepared.refused]:  # over the memory budget
                if claim(cell):
                    store.write(schema.row(cell, environments.setdefault(cell.device, environment(cell.device)),
                                           error=prepared.refused[cell.key]), claimant=claimant)
                    failed += 1
                    bar.update()
            pending = [cell for cell in pending if cell.key not in prepared.refused]
            if executor == "local":
                draws = local_draws(pending, prepared.models, plugins, claim, timeout)
            else:
                draws = ray_draws(pending, plugins, claim, timeout, shards, address=ray_address, workers=ray_workers)
            for drawn in draws:
                cell = drawn.cell
                bar.set_postfix_str(cell.describe(), refresh=False)
                grid_png = None
                try:
                    if isinstance(drawn.outputs, BaseException):
                        raise drawn.outputs
                    with time_limit(max(timeout - drawn.seconds, 1e-3), limit=timeout):
                        measured = measure(cell, prepared.models[cell.model, cell.device], drawn.outputs,
                                           references, shared, plugins, prepared.feature_spaces[cell.model])
                    grid_png = measured.pop("grid_png")
                    row = schema.row(cell, environments.setdefault(cell.device, environment(cell.device)), measured,
                                     fit=fits[cell.key].columns() if cell.key in fits else None)
                    done += 1
                except (KeyboardInterrupt, SystemExit):
                    raise
                except (Exception, CellTimeout) as error:  # a broken cell is recorded, and the sweep goes on
                    row = schema.row(cell, environments.setdefault(cell.device, environment(cell.device)),
                                     error=_failure(error))
                    failed += 1
                store.write(row, grid_png=grid_png, claimant=claimant)
                bar.update()
        except BaseException:
            store.release_all(claimant)  # the cell in flight is not recorded: another run may take it at once
            raise
        finally:
            bar.close()
    return RunSummary(store=path, done=done, failed=failed, skipped=skipped, busy=len(busy))


def fit_suite(suite: Suite, out_dir: str | Path = "results", *, plugins: PluginManager | None = None,
              progress: bool = True) -> dict[str, Any]:
    """Fit every learned schedule and solver the suite's cells use, once per fit key, into ``out_dir/fits``
    (what ``run_suite`` does before it samples). Returns fit key -> its manifest entry."""
    plugins = plugins or manager()
    try:
        prepared = prepare(suite, plugins)
        seeds_of_fits(suite.cells, plugins)
    except BenchError as error:
        raise BenchError(f"{suite.path}: {error}" if suite.path else str(error)) from None
    fits = fit_cells(suite.cells, prepared.models, plugins, FitCache(Path(out_dir) / "fits"), progress=progress)
    return {fit.entry["key"]: fit.entry for fit in fits.values()}
