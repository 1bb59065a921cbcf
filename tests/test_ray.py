"""The Ray executor gives the local executor's rows: same samples (per-sample seeding), same metrics."""

import pytest
import torch

pytest.importorskip("ray")

import types

from bench import Solver, hookimpl
from bench.errors import BenchError
from bench.registry import PluginManager
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


def driver_plugins() -> PluginManager:
    """The installed plugins plus a solver registered at run time, which only the driver process knows."""
    module = types.ModuleType("driver_only_solvers")

    class HalfEuler(Solver):
        def __init__(self) -> None:
            pass

        def sample(self, denoise, x, sigmas, plan, noise=None):
            values = sigmas.tolist()
            for sigma, sigma_next in zip(values[:-1], values[1:]):
                denoised = denoise(x, sigma)
                x = denoised if sigma_next == 0 else torch.lerp(denoised, x, sigma_next / sigma)
            return x

    module.register_solvers = hookimpl(lambda register: register(HalfEuler, name="driver-only-euler"))
    plugins = PluginManager()
    plugins.register(module, name="driver-only")
    return plugins


@pytest.mark.slow  # seconds to a minute on a loaded 2-core machine: `make bench` runs it
def test_ray_rows_equal_local_rows(tmp_path):
    import ray

    plugins = driver_plugins()
    suite = load_suite(write_suite(tmp_path, SUITE + '[[solvers]]\nname = "driver-only-euler"\n'), plugins=plugins)
    run_suite(suite, tmp_path / "local", plugins=plugins, progress=False)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:  # the workers run the driver's plugin set, including the solver registered at run time
        summary = run_suite(suite, tmp_path / "ray", plugins=plugins, progress=False, executor="ray", shards=3)
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
