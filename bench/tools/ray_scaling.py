"""Local vs Ray: the same rows, and how throughput grows with Ray workers, in one run.

A small suite (gmm-image, three solvers, two budgets, 4,000 samples a cell; FID, precision and recall) runs three
ways into three stores: the local executor, then a local Ray instance with 1 and with 2 workers
(cells sharded over the workers). Rows are compared metric by metric; throughput is samples drawn and measured per
second of the sweep. Ray's start-up is timed apart (it is paid once per run, not per cell), and so are the workers'
first model loads, which fall in the sweep. Metrics are computed by the driver
as shards come back; trajectory error is left out because its reference ODE solution is too (one dopri5 solve
per cell, which no number of workers shortens).

    python -m bench.tools.ray_scaling                      # 1 and 2 workers
    python -m bench.tools.ray_scaling --workers 1 2 4 8    # on a bigger machine
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from bench.sweep.runner import run_suite
from bench.sweep.store import read_results
from bench.sweep.suite import load_suite

SUITE = """
name = "scaling"
n = {n}
seeds = [0]
nfe = [10, 20]
labels = "none"
metrics = ["fid", "precision", "recall"]
[[models]]
name = "gmm-image"
[[solvers]]
name = "heun"
[[solvers]]
name = "dpm-solver++"
method = "multistep"
order = 2
[[solvers]]
name = "ddim"
eta = 1.0
"""
METRICS = ("fid", "precision", "recall")


def run(suite_path: Path, out: Path, executor: str, shards: int = 1) -> tuple[float, object]:
    suite = load_suite(suite_path)
    start = time.perf_counter()
    run_suite(suite, out, progress=False, executor=executor, shards=shards)
    seconds = time.perf_counter() - start
    return seconds, read_results(out / f"{suite.name}.sqlite").set_index("key").sort_index()


def main(argv: list[str] | None = None) -> None:
    import ray  # imported here: the rest of the harness runs without it

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--n", type=int, default=4000, help="samples per cell (default 4000)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as directory:
        directory = Path(directory)
        suite_path = directory / "scaling.toml"
        suite_path.write_text(SUITE.format(n=args.n))
        local_seconds, local = run(suite_path, directory / "local", "local")
        samples = args.n * len(local)
        print(f"{len(local)} cells of {args.n} samples; torch threads in this process: {torch.get_num_threads()}")
        print(f"{'executor':<18}{'start-up s':>11}{'sweep s':>9}{'samples/s':>11}{'vs 1 worker':>13}"
              f"{'max |difference| of metrics':>30}")
        print(f"{'local':<18}{'':>11}{local_seconds:>9.1f}{samples / local_seconds:>11.0f}{'':>13}{'':>30}")
        first = None
        for workers in args.workers:
            start = time.perf_counter()
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, configure_logging=False)
            startup = time.perf_counter() - start
            try:
                seconds, rows = run(suite_path, directory / f"ray{workers}", "ray", shards=workers)
            finally:
                ray.shutdown()
            if list(rows.index) != list(local.index) or not (rows["nfe"] == local["nfe"]).all():
                raise AssertionError(f"Ray with {workers} workers ran other cells than the local executor")
            difference = max(float((rows[m] - local[m]).abs().max()) for m in METRICS)
            first = first or seconds
            print(f"{f'ray, {workers} worker' + ('s' if workers > 1 else ''):<18}{startup:>11.1f}{seconds:>9.1f}"
                  f"{samples / seconds:>11.0f}{first / seconds:>12.2f}x{difference:>30.2e}")


if __name__ == "__main__":
    main()
