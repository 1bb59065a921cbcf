"""Executors: where a cell's samples are drawn. Each yields every cell with its samples (one shard, or several in
sample order) or the error that stopped it, as cells finish; the runner measures them and writes the rows, so
many workers finishing at once never race on the store. An executor asks ``claim(cell)`` right before it starts a
cell (another run sharing the store may hold it: then the cell is skipped) and stops a cell at its time limit.

- ``local_draws``: in this process, one cell after another, with the models the runner loaded.
- ``ray_draws``: each cell as Ray tasks over disjoint sample ranges. Per-sample seeding (bench.core.noise) makes
  the union of the shards exactly the cell one process would draw. A worker loads each model once and rebuilds
  the driver's plugin set (plugins registered at run time travel with the task), so it runs the very solvers the
  driver validated.

    samplerbench run suite.toml --executor ray                         # a local Ray instance on this machine
    RAY_ADDRESS=ray://head-node:10001 samplerbench run suite.toml --executor ray   # an existing cluster
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from bench.core.sampling import SampleOutput, load_model
from bench.registry import PluginManager
from bench.sweep.cell import Cell, Component, draw
from bench.sweep.timeouts import CellTimeout, time_limit


@dataclass
class Drawn:
    cell: Cell
    outputs: list[SampleOutput] | BaseException  # the shards in sample order, or what stopped the cell
    seconds: float  # spent on the cell so far: its time limit covers drawing and measuring


Claim = Callable[[Cell], bool]


def local_draws(cells: list[Cell], models: Mapping[tuple[Component, str], Any], plugins: PluginManager,
                claim: Claim, timeout: float | None) -> Iterator[Drawn]:
    for cell in cells:
        if not claim(cell):
            continue
        started = time.perf_counter()
        try:
            with time_limit(timeout):
                outputs: list[SampleOutput] | BaseException = [draw(cell, models[cell.model, cell.device], plugins)]
        except (KeyboardInterrupt, SystemExit):
            raise
        except (Exception, CellTimeout) as error:  # recorded by the runner as the cell's failure
            outputs = error
        yield Drawn(cell, outputs, time.perf_counter() - started)


_worker_state: dict[str, Any] = {}  # per Ray worker process: its plugin set and models, built once


def _draw_shard_task(cell: Cell, start: int, stop: int, run_id: str, plugin_spec) -> SampleOutput:
    if _worker_state.get("run") != run_id:  # a new sweep: the driver's plugin set may have changed
        _worker_state.update(run=run_id, plugins=PluginManager.from_spec(plugin_spec), models={})
    plugins, models = _worker_state["plugins"], _worker_state["models"]
    key = (cell.model, cell.device)
    if key not in models:
        models[key] = load_model(cell.model.name, device=cell.device, plugins=plugins, **cell.model.kwargs)
    out = draw(cell, models[key], plugins, start, stop)
    out.x, out.x_T = out.x.cpu(), out.x_T.cpu()  # results travel through Ray's object store
    return out


def shard_bounds(n: int, shards: int) -> list[tuple[int, int]]:
    """Contiguous, near-equal sample ranges covering 0 .. n - 1 (never empty)."""
    shards = min(shards, n)
    edges = [round(i * n / shards) for i in range(shards + 1)]
    return list(zip(edges[:-1], edges[1:]))


def ray_draws(cells: list[Cell], plugins: PluginManager, claim: Claim, timeout: float | None, shards: int,
              address: str | None = None, workers: int | None = None, max_in_flight: int = 64) -> Iterator[Drawn]:
    """Yields each cell with its shards' outputs in sample order (or the error a shard raised), as cells finish.
    A cell whose tasks run past ``timeout`` is cancelled and yielded with CellTimeout.

    ``workers``: the CPUs of a local Ray instance started here, and so how many tasks run at once (each task asks
    for one CPU, and Ray gives its workers one thread each); default: every core. Not for an existing cluster,
    whose size is its own (bench.sweep.runner checks that before anything runs).
    """
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, num_cpus=workers, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    remote = ray.remote(_draw_shard_task)
    try:
        spec, run_id = ray.put(plugins.spec()), uuid.uuid4().hex
        queue = list(cells)
        waiting: dict = {}  # object ref -> (cell, shard index)
        results: dict[str, list] = {}
        started: dict[str, float] = {}
        while queue or waiting:
            while queue and len(waiting) < max_in_flight:
                cell = queue.pop(0)
                if not claim(cell):
                    continue
                bounds = shard_bounds(cell.n, shards)
                results[cell.key], started[cell.key] = [None] * len(bounds), time.perf_counter()
                num_gpus = 1 / max(1, len(bounds)) if cell.device.startswith("cuda") else 0
                for index, (start, stop) in enumerate(bounds):
                    waiting[remote.options(num_gpus=num_gpus).remote(cell, start, stop, run_id, spec)] = (cell, index)
            if not waiting:
                continue
            deadline = min(started[cell.key] for cell, _ in waiting.values()) + (timeout or float("inf"))
            ready, _ = ray.wait(list(waiting), num_returns=1,
                                timeout=None if timeout is None else max(0.0, deadline - time.perf_counter()))
            if not ready:  # the oldest cell ran out of time: cancel all of its tasks
                expired = min((cell for cell, _ in waiting.values()), key=lambda cell: started[cell.key])
                for ref in [ref for ref, (cell, _) in waiting.items() if cell.key == expired.key]:
                    ray.cancel(ref, force=True)
                    del waiting[ref]
                del results[expired.key]
                yield Drawn(expired, CellTimeout(timeout), time.perf_counter() - started.pop(expired.key))
                continue
            cell, index = waiting.pop(ready[0])
            try:
                results[cell.key][index] = ray.get(ready[0])
            except Exception as error:  # the shard's own exception, unwrapped when Ray can
                results[cell.key][index] = getattr(error, "cause", None) or error
            outputs = results[cell.key]
            if all(output is not None for output in outputs):
                del results[cell.key]
                failures = [output for output in outputs if isinstance(output, BaseException)]
                yield Drawn(cell, failures[0] if failures else outputs, time.perf_counter() - started.pop(cell.key))
    finally:
        if started_here:
            ray.shutdown()
