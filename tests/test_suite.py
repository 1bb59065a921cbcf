"""Suites: expansion into cells, stable keys, and bad input caught before anything runs."""

import pytest

from bench.errors import BenchError
from bench.sweep.runner import run_suite
from bench.sweep.suite import load_suite
from helpers import TINY_SUITE, write_suite


def test_expansion_into_cells(tmp_path):
    suite = load_suite(write_suite(tmp_path))
    assert suite.name == "tiny"
    # euler: 2 budgets x 2 seeds, heun: its own 2 budgets x 2 seeds
    assert len(suite.cells) == 8
    assert {(c.solver.name, c.nfe) for c in suite.cells} == {("euler", 2), ("euler", 4), ("heun", 3), ("heun", 5)}
    assert len({cell.key for cell in suite.cells}) == 8


def test_keys_are_stable_and_depend_on_the_config(tmp_path):
    first = [cell.key for cell in load_suite(write_suite(tmp_path)).cells]
    again = [cell.key for cell in load_suite(write_suite(tmp_path)).cells]
    assert first == again
    changed = load_suite(write_suite(tmp_path, TINY_SUITE.replace("n = 32", "n = 33")))
    assert not set(first) & {cell.key for cell in changed.cells}


def test_solver_options_and_labels(tmp_path):
    text = TINY_SUITE + '\n[[solvers]]\nname = "ddim"\neta = 0.5\nlabel = "ddim half"\nschedules = ["time-uniform", {name = "karras", rho = 3}]\n'
    suite = load_suite(write_suite(tmp_path, text))
    ddim = [cell for cell in suite.cells if cell.solver.name == "ddim"]
    assert {cell.solver.describe() for cell in ddim} == {"ddim half"}
    assert {cell.schedule.describe() for cell in ddim} == {"time-uniform", "karras(rho=3)"}
    assert ddim[0].solver.kwargs == {"eta": 0.5}


def test_the_packaged_quick_suite_is_valid():
    from bench.cli import default_suite

    suite = load_suite(default_suite())
    assert suite.name == "quick"
    assert {cell.solver.name for cell in suite.cells} == {"euler", "heun", "ddim"}
    assert {cell.model.name for cell in suite.cells} == {"gmm2d", "gmm-image"}
    assert min(cell.nfe for cell in suite.cells) == 4 and max(cell.nfe for cell in suite.cells) == 50


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace('name = "euler"', 'name = "eulr"'), r"unknown solver 'eulr'; did you mean 'euler'\?"),
    (lambda t: t.replace('name = "gmm2d"', 'name = "gmm2"'), r"unknown model 'gmm2'; did you mean 'gmm2d'\?"),
    (lambda t: t.replace('"fid",', '"fdi",'), r"unknown metric 'fdi'; did you mean 'fid'\?"),
    (lambda t: t.replace('nfe = [2, 4]', 'nfe = [2, 4]\nschedules = ["karas"]'), r"did you mean 'karras'\?"),
    (lambda t: t.replace('nfe = [3, 5]', 'nfe = [0, 5]'), r"nfe must be >= 1; got 0"),
    (lambda t: t.replace('name = "heun"', 'name = "ddim"\netta = 1'), r"solver 'ddim' has no option 'etta'"),
    (lambda t: t.replace('n = 32', 'n = "many"'), r"n must hold whole numbers"),
    (lambda t: t.replace('n = 32', 'samples = 32'), r"unknown suite key 'samples'"),
    (lambda t: 'guidance = [1.0]\nlabels = "none"\n' + t, r"guidance needs labels: set labels = \"balanced\""),
    (lambda t: 'guidance = [1.0]\nguidance_type = "clf"\n' + t, r"unknown guidance type 'clf'"),
    (lambda t: 'labels = "all"\n' + t, r"unknown labels choice 'all'"),
    (lambda t: t.replace('nfe = [2, 4]', 'nfe = [2, 4]\nschedules = [{name = "karras", rhoo = 2}]'), r"rhoo"),
])
def test_bad_input_names_the_file_and_the_problem(tmp_path, edit, message):
    path = write_suite(tmp_path, edit(TINY_SUITE))
    with pytest.raises(BenchError, match=message) as error:
        load_suite(path)
    assert str(path) in str(error.value)


def test_budget_below_a_solvers_minimum(tmp_path):
    from bench.registry import PluginManager
    from bench.core.solver import Solver
    from bench import hookimpl
    import types

    class TwoCalls(Solver):
        min_steps = 2

        def __init__(self):
            pass

    module = types.ModuleType("two")
    module.register_solvers = hookimpl(lambda register: register(TwoCalls, name="two-calls"))
    plugins = PluginManager()
    plugins.register(module, name="two")
    path = write_suite(tmp_path, TINY_SUITE + '[[solvers]]\nname = "two-calls"\nnfe = [1]\n')
    with pytest.raises(BenchError, match=r"'two-calls' needs an NFE budget of at least 2; got 1"):
        load_suite(path, plugins=plugins)


def test_guidance_on_an_unconditional_model_in_a_suite(tmp_path):
    from bench.registry import PluginManager
    from bench import hookimpl
    import types

    class Plain:
        shape = (2,)
        sigma_min, sigma_max, sigma_data, num_classes = 0.002, 80.0, 1.0, None

        def __call__(self, x, sigma, cond=None):
            return x * 0

    module = types.ModuleType("plain")
    module.register_models = hookimpl(lambda register: register(lambda device="cpu": Plain(), name="plain"))
    plugins = PluginManager()
    plugins.register(module, name="plain")
    text = 'guidance = [1.0]\nlabels = "balanced"\n' + TINY_SUITE.replace('name = "gmm2d"', 'name = "plain"')
    suite = load_suite(write_suite(tmp_path, text), plugins=plugins)  # parsing loads no model
    # the runner loads it and refuses the suite before anything is written
    with pytest.raises(BenchError, match=r"tiny.toml: guidance is given, but model 'plain' is unconditional"):
        run_suite(suite, tmp_path / "out", plugins=plugins, progress=False)
    assert not (tmp_path / "out").exists()


def test_malformed_toml_names_file_and_line(tmp_path):
    path = write_suite(tmp_path, 'name = "x"\nn = 32\nnfe = [1, 2\nseeds = [0]\n')
    with pytest.raises(BenchError, match=r"tiny.toml: invalid TOML: .*line 4"):
        load_suite(path)


def test_missing_file():
    with pytest.raises(BenchError, match="cannot read suite 'nowhere.toml'"):
        load_suite("nowhere.toml")


def test_labels_default_to_unconditional_and_balanced_is_asked_for(tmp_path):
    suite = load_suite(write_suite(tmp_path))
    assert {cell.labels for cell in suite.cells} == {"none"}  # gmm2d has 8 classes, but the default is none
    balanced = load_suite(write_suite(tmp_path, 'labels = "balanced"\n' + TINY_SUITE))
    assert {cell.labels for cell in balanced.cells} == {"balanced"}
    with pytest.raises(BenchError, match="unknown labels choice 'auto'"):
        load_suite(write_suite(tmp_path, 'labels = "auto"\n' + TINY_SUITE))
    with pytest.raises(BenchError, match='guidance needs labels: set labels = "balanced"'):
        load_suite(write_suite(tmp_path, 'guidance = [1.0]\n' + TINY_SUITE))


def test_guidance_axis_and_type(tmp_path):
    text = 'guidance = [0.0, 2.0]\nguidance_type = "classifier"\nlabels = "balanced"\n' + TINY_SUITE
    suite = load_suite(write_suite(tmp_path, text))
    assert sorted({cell.guidance for cell in suite.cells}) == [0.0, 2.0]
    assert {cell.guidance_type for cell in suite.cells} == {"classifier"}
    assert len(suite.cells) == 16


def test_precision_axis_and_cuda_graph_need_cuda(tmp_path):
    suite = load_suite(write_suite(tmp_path, 'precision = ["fp32", "bf16"]\n' + TINY_SUITE))
    assert sorted({cell.precision for cell in suite.cells}) == ["bf16", "fp32"] and len(suite.cells) == 16
    with pytest.raises(BenchError, match=r"unknown precision 'fp64'"):
        load_suite(write_suite(tmp_path, 'precision = "fp64"\n' + TINY_SUITE))
    with pytest.raises(BenchError, match=r"cuda_graph = true needs device = \"cuda\""):
        load_suite(write_suite(tmp_path, 'cuda_graph = true\n' + TINY_SUITE))


def test_the_gpu_suite_is_valid_on_a_cuda_machine():
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "suites" / "gpu.toml"
    suite = load_suite(path)
    assert {cell.device for cell in suite.cells} == {"cuda"} and {cell.n for cell in suite.cells} == {50000}
