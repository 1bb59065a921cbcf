"""The Ray executor gives the local executor's rows: same samples (per-sample seeding), same metrics."""

import pytest
import torch

pytest.importorskip("ray")

from bench.errors import BenchError
from bench.sweep.executors import shard_bounds
from bench.sweep.runner import run_suite
from bench.sweep.store import read_results
from bench.sweep.suite import load_suite
from helpers import write_suite

SUITE = """
name = "ray"
n = 40
seeds = [0]
nfe = [3, 6]
metrics = ["trajectory_error", "fid", "precision", "recall"]
[[models]]
name = "gmm2d"
[[solvers]]
name = "heun"
[[solvers]]
name = "ddim"
eta = 1.0
"""


def test_shard_bounds_cover_every_sample_once():
    assert shard_bounds(10, 3) == [(0, 3), (3, 7), (7, 10)]
    assert shard_bounds(2, 5) == [(0, 1), (1, 2)]
    for n, shards in [(1, 1), (7, 2), (100, 8)]:
        bounds = shard_bounds(n, shards)
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a < b and b == c for (a, b), (c, _) in zip(bounds, bounds[1:]))


def test_ray_rows_equal_local_rows(tmp_path):
    import ray

    suite = load_suite(write_suite(tmp_path, SUITE))
    run_suite(suite, tmp_path / "local", progress=False)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        summary = run_suite(suite, tmp_path / "ray", progress=False, executor="ray", shards=3)
    finally:
        ray.shutdown()
    assert (summary.done, summary.failed) == (len(suite.cells), 0)
    local = read_results(tmp_path / "local" / "ray.sqlite").set_index("key").sort_index()
    remote = read_results(tmp_path / "ray" / "ray.sqlite").set_index("key").sort_index()
    assert list(local.index) == list(remote.index)
    assert (local["nfe"] == remote["nfe"]).all()
    for metric in ("trajectory_error", "fid", "precision", "recall"):
        # the same samples, up to the last bit of batch-size-dependent rounding in the denoiser's matrix products
        torch.testing.assert_close(torch.tensor(remote[metric].values), torch.tensor(local[metric].values),
                                   rtol=1e-5, atol=1e-6, equal_nan=True)


def test_ray_workers_size_only_a_local_ray_instance(tmp_path, monkeypatch):
    suite = load_suite(write_suite(tmp_path, SUITE))
    with pytest.raises(BenchError, match="needs executor 'ray'"):
        run_suite(suite, tmp_path, progress=False, ray_workers=2)
    with pytest.raises(BenchError, match=">= 1"):
        run_suite(suite, tmp_path, progress=False, executor="ray", ray_workers=0)
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    with pytest.raises(BenchError, match="existing cluster .*ray://head:10001"):
        run_suite(suite, tmp_path, progress=False, executor="ray", ray_workers=2)
