"""Plugins: entry-point loading, run-time registration, failures and duplicates."""

import importlib.metadata
import types

import pytest

import bench
from bench import hookimpl
from bench.errors import BenchError
from bench.registry import PluginManager
from bench.core.solver import Solver

BUILTIN_MODULES = ["plugins.analytic", "plugins.schedules", "plugins.euler", "plugins.heun", "plugins.ddim",
                   "plugins.metrics"]


def test_builtins_come_from_entry_points():
    values = {ep.value for ep in importlib.metadata.entry_points(group="samplerbench")}
    assert set(BUILTIN_MODULES) <= values
    plugins = PluginManager()
    assert {"euler", "heun", "ddim"} <= set(plugins.names("solver"))
    assert {"karras", "logsnr", "time-uniform", "time-quadratic"} <= set(plugins.names("schedule"))
    assert {"gmm2d", "gmm-image"} <= set(plugins.names("model"))
    assert {"trajectory_error", "fid", "precision", "recall"} <= set(plugins.names("metric"))
    sources = {info.name: info.source for info in plugins.plugins()}
    assert sources["euler"].startswith("samplerbench ")


def test_public_listing_functions():
    assert "heun" in bench.list_solvers()
    assert "gmm2d" in bench.list_models()
    assert "karras" in bench.list_schedules()
    assert "fid" in bench.list_metrics()


class Midpoint(Solver):
    order = 2

    def __init__(self) -> None:
        pass


def make_plugin(name: str, **hooks) -> types.ModuleType:
    module = types.ModuleType(name)
    for hook_name, function in hooks.items():
        setattr(module, hook_name, hookimpl(function))
    return module


def test_run_time_registration_with_aliases():
    plugins = PluginManager(load_entry_points=False)
    plugins.register(make_plugin("midpoint_plugin", register_solvers=lambda register: register(
        Midpoint, name="midpoint", aliases=("rk2",))), name="midpoint-plugin")
    assert plugins.names("solver") == ["midpoint"]
    assert plugins.get("solver", "rk2").obj is Midpoint
    info = {p.name: p for p in plugins.plugins()}["midpoint-plugin"]
    assert info.source.startswith("registered at run time")
    assert [entry.name for entry in info.registered] == ["midpoint"]
    plugins.unregister("midpoint-plugin")
    assert plugins.names("solver") == []


def test_duplicate_names_are_an_error_naming_both_plugins():
    plugins = PluginManager(load_entry_points=False)
    plugins.register(make_plugin("a", register_solvers=lambda register: register(Midpoint, name="same")), name="first")
    plugins.register(make_plugin("b", register_solvers=lambda register: register(Midpoint, name="same")), name="second")
    with pytest.raises(BenchError, match=r"'same' is registered twice.*'first'.*'second'|'same'.*'second'.*'first'"):
        plugins.names("solver")


def test_alias_clashing_with_a_name_is_a_duplicate():
    plugins = PluginManager(load_entry_points=False)
    plugins.register(make_plugin("a", register_solvers=lambda register: register(Midpoint, name="euler2")), name="a")
    plugins.register(make_plugin("b", register_solvers=lambda register: register(
        Midpoint, name="other", aliases=("euler2",))), name="b")
    with pytest.raises(BenchError, match="euler2"):
        plugins.names("solver")


def test_hooks_take_only_the_arguments_they_need():
    def register_schedules():  # takes nothing: legal for pluggy, registers nothing
        return None

    plugins = PluginManager(load_entry_points=False)
    plugins.register(make_plugin("quiet", register_schedules=register_schedules), name="quiet")
    assert plugins.names("schedule") == []


def test_a_broken_plugin_is_reported_and_the_rest_load(monkeypatch):
    real = importlib.metadata.entry_points

    def with_broken(**kwargs):
        found = list(real(**kwargs))
        if kwargs.get("group") == "samplerbench":
            found.append(importlib.metadata.EntryPoint(
                name="broken", value="samplerbench_no_such_module_xyz", group="samplerbench"))
        return found

    monkeypatch.setattr(importlib.metadata, "entry_points", with_broken)
    plugins = PluginManager()
    assert "broken" in plugins.failed
    assert "ModuleNotFoundError" in plugins.failed["broken"]
    assert "euler" in plugins.names("solver")


def test_unknown_names_suggest_the_closest():
    plugins = PluginManager()
    with pytest.raises(BenchError, match=r"unknown solver 'eulr'; did you mean 'euler'\?"):
        plugins.get("solver", "eulr")
    with pytest.raises(BenchError, match=r"unknown model 'gmm2'; did you mean 'gmm2d'\?"):
        plugins.get("model", "gmm2")
    with pytest.raises(BenchError, match=r"unknown schedule 'karas'; did you mean 'karras'\?"):
        plugins.get("schedule", "karas")
    with pytest.raises(BenchError, match=r"unknown metric 'fdi'"):
        plugins.get("metric", "fdi")
