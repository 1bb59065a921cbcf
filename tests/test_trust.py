"""What a row promises: its key covers the code that computed it, what a solver returns is checked before it is
stored, one label names one config, and bench.sample and suites condition alike."""

from __future__ import annotations

import importlib
import sys
import textwrap
import types

import pytest
import torch

import bench
from bench import hookimpl
from bench.errors import BenchError
from bench.registry import PluginManager
from bench.report import write_report
from bench.sweep.runner import run_suite
from bench.core.solver import Solver
from bench.sweep.store import read_results
from bench.sweep.suite import load_suite
from helpers import write_suite

ONE_SOLVER_SUITE = """
name = "trust"
n = 16
seeds = [0]
nfe = [4]
metrics = ["trajectory_error"]

[[models]]
name = "gmm2d"

[[solvers]]
name = "{solver}"
"""


def plugins_with(**solvers: type) -> PluginManager:
    module = types.ModuleType("trust_plugin")

    def register_solvers(register):
        for name, cls in solvers.items():
            register(cls, name=name.replace("_", "-"))

    module.register_solvers = hookimpl(register_solvers)
    plugins = PluginManager()
    plugins.register(module, name="trust-plugin")
    return plugins


def euler_then(transform):
    class Misbehaving(Solver):
        def __init__(self) -> None:
            pass

        def sample(self, denoise, x, sigmas, plan, noise=None):
            values = sigmas.tolist()
            for sigma, sigma_next in zip(values[:-1], values[1:]):
                denoised = denoise(x, sigma)
                x = denoised if sigma_next == 0 else torch.lerp(denoised, x, sigma_next / sigma)
            return transform(x, denoise, values)

    return Misbehaving


MISBEHAVIOURS = {
    "one-sample-short": (euler_then(lambda x, denoise, sigmas: x[:-1]), r"shape \[15, 2\] for a batch of shape \[16, 2\]"),
    "extra-axis": (euler_then(lambda x, denoise, sigmas: x.unsqueeze(1)), r"shape \[16, 1, 2\]"),
    "one-coordinate": (euler_then(lambda x, denoise, sigmas: x[..., :1]), r"shape \[16, 1\]"),
    "wrong-dtype": (euler_then(lambda x, denoise, sigmas: x.double()), r"torch.float64 samples .* the run is torch.float32"),
    "extra-calls": (euler_then(lambda x, denoise, sigmas: denoise(denoise(denoise(x, sigmas[-2]), sigmas[-2]), sigmas[-2])),
                    r"made 7 denoiser evaluations per sample, but its plan \(4 steps\) declared at most 4"),
}


@pytest.mark.parametrize("name", sorted(MISBEHAVIOURS))
def test_what_a_solver_returns_is_checked_before_it_is_stored(tmp_path, name):
    cls, reason = MISBEHAVIOURS[name]
    plugins = plugins_with(**{name: cls})
    suite = load_suite(write_suite(tmp_path, ONE_SOLVER_SUITE.format(solver=name)), plugins=plugins)
    summary = run_suite(suite, tmp_path, plugins=plugins, progress=False)
    assert (summary.done, summary.failed) == (0, 1)
    row = read_results(summary.store).iloc[0]
    assert row["status"] == "failed" and row["metrics"] == "{}"  # nothing measured on the wrong samples
    import re

    assert re.search(reason, row["error"]), row["error"]
    with pytest.raises(BenchError, match=reason):
        bench.sample("gmm2d", name, nfe=4, n=16, plugins=plugins)


PLUGIN_SOURCE = '''
import torch
from bench import Solver, hookimpl


class Edited(Solver):
    def __init__(self) -> None:
        pass

    def sample(self, denoise, x, sigmas, plan, noise=None):
        values = sigmas.tolist()
        for sigma, sigma_next in zip(values[:-1], values[1:]):
            denoised = denoise(x, sigma)
            x = denoised if sigma_next == 0 else torch.lerp(denoised, x, sigma_next / sigma) * SCALE
        return x


SCALE = {scale}


@hookimpl
def register_solvers(register):
    register(Edited, name="edited")
'''


def load_plugin_module(directory, scale: float) -> PluginManager:
    (directory / "edited_solver.py").write_text(textwrap.dedent(PLUGIN_SOURCE.format(scale=scale)))
    sys.modules.pop("edited_solver", None)
    importlib.invalidate_caches()
    module = importlib.import_module("edited_solver")
    plugins = PluginManager()
    plugins.register(module, name="edited-plugin")
    return plugins


def test_edited_solver_code_is_recomputed_never_served_stale(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    suite_path = write_suite(tmp_path, ONE_SOLVER_SUITE.format(solver="edited"))
    plugins = load_plugin_module(tmp_path, 1.0)
    first = run_suite(load_suite(suite_path, plugins=plugins), tmp_path / "out", plugins=plugins, progress=False)
    again = run_suite(load_suite(suite_path, plugins=plugins), tmp_path / "out", plugins=plugins, progress=False)
    assert (first.done, again.done, again.skipped) == (1, 0, 1)
    before = read_results(first.store).iloc[0]

    plugins = load_plugin_module(tmp_path, 1.5)  # the same config, other code
    edited = run_suite(load_suite(suite_path, plugins=plugins), tmp_path / "out", plugins=plugins, progress=False)
    assert (edited.done, edited.skipped) == (1, 0)
    rows = read_results(edited.store)
    assert len(rows) == 1  # the stale row was replaced, not kept beside the fresh one
    after = rows.iloc[0]
    assert after["key"] != before["key"] and after["config_key"] == before["config_key"]
    assert after["trajectory_error"] != before["trajectory_error"]
    code = __import__("json").loads(after["code"])
    assert code["solver"]["module"] == "edited_solver" and code["solver"]["plugin"] == "edited-plugin"
    sys.modules.pop("edited_solver", None)


def test_the_key_covers_each_plugins_distribution_version(tmp_path):
    plugins = PluginManager()
    suite_path = write_suite(tmp_path, ONE_SOLVER_SUITE.format(solver="euler"))
    key = load_suite(suite_path, plugins=plugins).cells[0].key
    solver_plugin = plugins.get("solver", "euler").plugin
    distribution, version = plugins._distributions[solver_plugin]
    plugins._distributions[solver_plugin] = (distribution, version + ".post1")
    plugins._registries = None
    assert load_suite(suite_path, plugins=plugins).cells[0].key != key


def test_the_key_covers_the_weights_a_plugin_loads(tmp_path, monkeypatch):
    # digits registers data=shipped_weights: a manifest naming other weights (a retrain) gives the cells other keys
    import json
    import shutil

    from bench.adapters.checkpoints import pretrained_dir

    suite_path = write_suite(tmp_path, 'n = 8\nnfe = [4]\nmetrics = ["class_accuracy"]\n[[models]]\nname = "digits"\n'
                                       '[[solvers]]\nname = "euler"\n')
    key = load_suite(suite_path).cells[0].key
    retrained = tmp_path / "pretrained"
    shutil.copytree(pretrained_dir(), retrained)
    manifest = json.loads((retrained / "manifest.json").read_text())
    manifest["digits"]["sha256"] = "0" * 64
    (retrained / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setenv("SAMPLERBENCH_PRETRAINED", str(retrained))
    cell = load_suite(suite_path).cells[0]
    assert cell.key != key and json.loads(cell.code)["model"]["data"]["digits"] == "0" * 64


def test_rerun_recomputes_the_cells_it_names(tmp_path):
    text = ONE_SOLVER_SUITE.format(solver="euler") + '\n[[solvers]]\nname = "heun"\nnfe = [5]\n'
    suite = load_suite(write_suite(tmp_path, text))
    run_suite(suite, tmp_path, progress=False)
    before = read_results(tmp_path / "trust.sqlite").set_index("solver")["finished_at"]
    summary = run_suite(suite, tmp_path, progress=False, rerun=["heu*"])
    assert (summary.done, summary.skipped) == (1, 1)
    everything = run_suite(suite, tmp_path, progress=False, rerun=["*"])
    assert everything.done == 2
    assert len(read_results(tmp_path / "trust.sqlite")) == 2 and set(before.index) == {"euler", "heun"}


def test_one_label_names_one_config(tmp_path):
    text = ONE_SOLVER_SUITE.format(solver="euler").replace('name = "euler"', 'name = "euler"\nlabel = "mine"')
    text += '\n[[solvers]]\nname = "heun"\nlabel = "mine"\nnfe = [5]\n'
    with pytest.raises(BenchError, match=r"two \[\[solvers\]\] entries are labelled 'mine': euler\(\) and heun\(\)"):
        load_suite(write_suite(tmp_path, text))
    # the same solver twice, for more budgets, is one config and one label
    text = ONE_SOLVER_SUITE.format(solver="euler") + '\n[[solvers]]\nname = "euler"\nnfe = [8]\n'
    assert len(load_suite(write_suite(tmp_path, text)).cells) == 2


def test_the_report_never_averages_distinct_configs(tmp_path):
    # rows of two sample counts left in one store (an edited suite) stay two series
    suite_path = write_suite(tmp_path, ONE_SOLVER_SUITE.format(solver="euler"))
    run_suite(load_suite(suite_path), tmp_path, progress=False)
    run_suite(load_suite(write_suite(tmp_path, ONE_SOLVER_SUITE.format(solver="euler").replace("n = 16", "n = 32"))),
              tmp_path, progress=False)
    frame = read_results(tmp_path / "trust.sqlite")
    assert len(frame) == 2
    page = write_report(frame, tmp_path / "r.html", title="t").read_text()
    assert 'euler [n=16]' in page and 'euler [n=32]' in page


def test_bench_sample_and_suites_share_one_conditioning_default(tmp_path):
    suite = load_suite(write_suite(tmp_path, ONE_SOLVER_SUITE.format(solver="euler")))
    summary = run_suite(suite, tmp_path, progress=False)
    row = read_results(summary.store).iloc[0]
    direct = bench.sample("gmm2d", "euler", nfe=4, n=16, seed=0)
    assert direct.labels is None and row["labels"] == "none"
    reference = bench.measure.reference.solve_reference(bench.load_model("gmm2d"), direct.x_T.double(), None,
                                                tolerance=1e-8)
    error = (direct.x.double() - reference).pow(2).mean().sqrt().item()
    assert error == pytest.approx(row["trajectory_error"], rel=1e-6)
    balanced = bench.sample("gmm2d", "euler", nfe=4, n=16, seed=0, labels="balanced", offset=3)
    assert torch.equal(balanced.labels, (3 + torch.arange(16)) % 8)
    page = write_report(read_results(summary.store), tmp_path / "r.html", title="t").read_text()
    assert "Samples: unconditional (no labels)." in page


def test_the_report_lists_every_plugin_with_its_version_and_hash(tmp_path):
    summary = run_suite(load_suite(write_suite(tmp_path, ONE_SOLVER_SUITE.format(solver="euler"))), tmp_path,
                        progress=False)
    page = write_report(read_results(summary.store), tmp_path / "r.html", title="t").read_text()
    code = __import__("json").loads(read_results(summary.store).iloc[0]["code"])
    for role in ("model", "solver", "schedule"):
        assert code[role]["sha256"][:16] in page and code[role]["distribution"] == "samplerbench"
    assert code["metrics"][0]["name"] == "trajectory_error" and code["harness"]["noise"] in page
