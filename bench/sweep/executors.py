"""The Ray executor: a cell's samples drawn as Ray tasks over disjoint sample ranges, measured by the driver.

Each task loads the model once per worker process and draws samples start .. stop - 1 of its cell; per-sample
seeding (bench.core.noise) makes the union of the shards exactly the cell a single process would draw. The driver
gathers a cell's shards in sample order, computes its metrics and writes its row, so many tasks finishing at once
never race on the store.

    samplerbench run suite.toml --executor ray                         # a local Ray instance on this machine
    RAY_ADDRESS=ray://head-node:10001 samplerbench run suite.toml --executor ray   # an existing cluster
"""

from __future__ import annotations

from collections.abc import Iterator

from bench.core.sampling import SampleOutput
from bench.sweep.cell import Cell, draw

_worker_models: dict = {}  # per worker process: loaded once, reused by every task it runs


def _sample_shard_task(cell: Cell, start: int, stop: int) -> SampleOutput:
    from bench.core.sampling import load_model

    key = (cell.model, cell.device)
    if key not in _worker_models:
        _worker_models[key] = load_model(cell.model.name, device=cell.device, **cell.model.kwargs)
    out = draw(cell, _worker_models[key], None, start, stop)
    out.x, out.x_T = out.x.cpu(), out.x_T.cpu()  # results travel through Ray's object store
    return out


def shard_bounds(n: int, shards: int) -> list[tuple[int, int]]:
    """Contiguous, near-equal sample ranges covering 0 .. n - 1 (never empty)."""
    shards = min(shards, n)
    edges = [round(i * n / shards) for i in range(shards + 1)]
    return list(zip(edges[:-1], edges[1:]))


def ray_shards(cells: list[Cell], shards: int, address: str | None = None, workers: int | None = None,
               max_in_flight: int = 64) -> Iterator[tuple[Cell, list[SampleOutput] | BaseException]]:
    """Yields each cell with its shards' outputs in sample order (or the error a shard raised), as cells finish.

    ``workers``: the CPUs of a local Ray instance started here, and so how many tasks run at once (each task asks
    for one CPU, and Ray gives its workers one thread each); default: every core. Not for an existing cluster,
    whose size is its own (bench.sweep.runner.run_suite checks that before anything runs).
    """
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, num_cpus=workers, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    remote = ray.remote(_sample_shard_task)
    try:
        queue = list(cells)
        waiting: dict = {}  # object ref -> (cell, shard index)
        results: dict[str, list] = {}
        while queue or waiting:
            while queue and len(waiting) < max_in_flight:
                cell = queue.pop(0)
                bounds = shard_bounds(cell.n, shards)
                results[cell.key] = [None] * len(bounds)
                num_gpus = 1 / max(1, len(bounds)) if cell.device.startswith("cuda") else 0
                for index, (start, stop) in enumerate(bounds):
                    waiting[remote.options(num_gpus=num_gpus).remote(cell, start, stop)] = (cell, index)
            ready, _ = ray.wait(list(waiting), num_returns=1)
            cell, index = waiting.pop(ready[0])
            try:
                results[cell.key][index] = ray.get(ready[0])
            except Exception as error:  # the shard's own exception, unwrapped when Ray can
                results[cell.key][index] = getattr(error, "cause", None) or error
            outputs = results[cell.key]
            if all(output is not None for output in outputs):
                del results[cell.key]
                failures = [output for output in outputs if isinstance(output, BaseException)]
                yield cell, failures[0] if failures else outputs
    finally:
        if started_here:
            ray.shutdown()
