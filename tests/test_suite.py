"""Suites: expansion into cells, stable keys, and bad input caught before anything runs."""

from pathlib import Path

import pytest
import torch

from bench.errors import BenchError
from bench.sweep.cell import Component
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


GPU_SUITE = Path(__file__).resolve().parents[1] / "bench" / "suites" / "gpu.toml"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_gpu_suite_is_valid_on_a_cuda_machine():
    suite = load_suite(GPU_SUITE)
    assert {cell.device for cell in suite.cells} == {"cuda"} and {cell.n for cell in suite.cells} == {50000}


def test_the_gpu_suite_is_valid_but_for_the_device_without_cuda(monkeypatch):
    if not torch.cuda.is_available():
        with pytest.raises(BenchError, match=r"gpu.toml: device = 'cuda', but this machine has no CUDA device"):
            load_suite(GPU_SUITE)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    suite = load_suite(GPU_SUITE)  # everything but the device checks out
    assert {cell.device for cell in suite.cells} == {"cuda"} and {cell.n for cell in suite.cells} == {50000}


def test_every_packaged_suite_is_within_the_default_limits(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for path in sorted(GPU_SUITE.parent.glob("*.toml")):  # parsing loads no model
        assert load_suite(path).cells, path


# ------------------------------------------------------------------------------------- names become file names


@pytest.mark.parametrize("name", ["", "/tmp/x/pwned", "../../e", "a/b", r"a\\b", ".", "..", ".hidden", "-x", "x y",
                                  "\u00e9", "n" * 65, "rtl\u202eexe"])
def test_a_suite_name_is_a_plain_file_stem(tmp_path, name):
    with pytest.raises(BenchError, match=r"tiny.toml: name = .* is not a plain file name: a suite name holds letters, "
                                         r"digits, '\.', '_' and '-', starting with a letter or digit"):
        load_suite(write_suite(tmp_path, TINY_SUITE.replace('name = "tiny"', f'name = "{name}"')))


def test_the_default_name_is_the_file_stem_when_that_is_a_plain_one(tmp_path):
    text = TINY_SUITE.replace('name = "tiny"\n', "")
    assert load_suite(write_suite(tmp_path, text, name="my-suite_2.v1.toml")).name == "my-suite_2.v1"
    with pytest.raises(BenchError, match=r"the suite has no `name`, and its file name 'my suite' cannot be one .*"
                                         r"add e.g. name = \"my-suite\""):
        load_suite(write_suite(tmp_path, text, name="my suite.toml"))


# ---------------------------------------------------------------------------------------- encodings and shape


def test_encodings_other_than_utf8_are_named(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_bytes(TINY_SUITE.encode("utf-16"))
    with pytest.raises(BenchError, match=r"tiny.toml: the file holds UTF-16 or UTF-32 text; a suite is UTF-8 text"):
        load_suite(path)
    path.write_bytes(('description = "caf\u00e9"\n' + TINY_SUITE).encode("latin-1"))
    with pytest.raises(BenchError, match=r"tiny.toml: not UTF-8 text: byte 0xe9 on line 1 .*save it as UTF-8"):
        load_suite(path)
    path.write_bytes(b"\xef\xbb\xbf" + TINY_SUITE.encode())  # a UTF-8 byte-order mark is fine
    assert load_suite(path).name == "tiny"


def test_deep_nesting_and_big_files_are_refused(tmp_path):
    with pytest.raises(BenchError, match=r"tiny.toml: arrays or tables nested too deeply to read"):
        load_suite(write_suite(tmp_path, "x = " + "[" * 1000 + "]" * 1000 + "\n" + TINY_SUITE))
    with pytest.raises(BenchError, match=r"tiny.toml: a.a.a.a.a.a.a.a: tables and arrays nested more than 8 levels"):
        load_suite(write_suite(tmp_path, "a" + ".a" * 1000 + " = 1\n" + TINY_SUITE))
    with pytest.raises(BenchError, match=r"tiny.toml: the file is over 1 MiB"):
        load_suite(write_suite(tmp_path, TINY_SUITE + "#" * (1 << 20)))
    directory = tmp_path / "a.toml"
    directory.mkdir()
    with pytest.raises(BenchError, match=r"cannot read suite .*a.toml': not a regular file"):
        load_suite(directory)


@pytest.mark.parametrize("edit, message", [
    ('guidance = [nan]', r"guidance\[1\]: numbers must be finite; got nan"),
    ('guidance = [1e30]', r"guidance must lie within -1 \.\. 100; got 1e\+30"),
    ('guidance = [' + "1" * 400 + ']', r"guidance\[1\]: an integer of 1,326 bits does not fit in 64 bits"),
    ('n = 9223372036854775808', r"n: 9223372036854775808 does not fit in 64 bits"),
    ('seeds = [0, -1]', r"seeds must be >= 0; got -1"),
    ('description = "a\\u0000b"', r"description: 'a\\x00b' holds a control character \(U\+0000\)"),
    ('description = 1979-05-27', r"description: 1979-05-27 is a TOML date or time"),
    ('dtype = "float32\\u200b"', r"dtype = 'float32\\u200b' holds the unprintable character U\+200B"),
    ('feature_extractor_weights_path = "nowhere.pth"', r"feature_extractor_weights_path: no file 'nowhere.pth'"),
])
def test_values_are_finite_in_range_and_printable(tmp_path, edit, message):
    text = edit + "\nlabels = \"balanced\"\n" + TINY_SUITE.replace("n = 32\n", "").replace("seeds = [0, 1]\n", "")
    if not edit.startswith("n ="):
        text = "n = 32\n" + text
    if not edit.startswith("seeds"):
        text = "seeds = [0]\n" + text
    with pytest.raises(BenchError, match=message):
        load_suite(write_suite(tmp_path, text))


# ---------------------------------------------------------------------------------------- axes and repeats


@pytest.mark.parametrize("edit, message", [
    (("seeds = [0, 1]", "seeds = []"), r"seeds is empty: a sweep over no values has no cells"),
    (("nfe = [2, 4]", "nfe = []"), r"nfe is empty"),
    (("nfe = [3, 5]", "nfe = [3, 5]\nschedules = []"), r"solvers\[2\].schedules is empty"),
    (("nfe = [2, 4]", "nfe = [4, 4, 4]"), r"nfe holds 4 twice; each value is one set of cells"),
    (("seeds = [0, 1]", "seeds = [0, 1, 0]"), r"seeds holds 0 twice"),
    (("nfe = [2, 4]", 'nfe = [2, 4]\nschedules = ["karras", {name = "karras", rho = 7}]'),
     r"schedules holds karras and karras\(rho=7\), which run the same cells \(.*an option left out takes its "
     r"default\)"),
    (("[[solvers]]\nname = \"euler\"", "[[solvers]]\nname = \"euler\"\n[[solvers]]\nname = \"euler\""),
     r"the cell gmm2d euler karras nfe=2 seed=0 appears twice"),
    (("[[models]]\nname = \"gmm2d\"", "[[models]]\nname = \"gmm2d\"\n[[models]]\nname = \"gmm2d\""),
     r"models holds gmm2d twice"),
])
def test_axes_are_not_empty_and_hold_no_repeats(tmp_path, edit, message):
    assert edit[0] in TINY_SUITE
    with pytest.raises(BenchError, match=message):
        load_suite(write_suite(tmp_path, TINY_SUITE.replace(*edit, 1)))


# ------------------------------------------------------------------------------------------ options, all levels


@pytest.mark.parametrize("solver_lines, message", [
    ('name = "heun"\nschedules = [{name = "karras", rho = nan}]', r"solvers\[2\].schedules\[1\].rho: numbers must be finite"),
    ('name = "heun"\nschedules = [{name = "karras", rho = "x"}]',
     r"solvers\[2\].schedules\[1\].rho: schedule 'karras' takes a number for 'rho'; got 'x'"),
    ('name = "heun"\nschedules = [{name = "karras", sigma_min = 1.0, sigma_max = 0.1}]',
     r"solvers\[2\].schedules\[1\]: schedule 'karras' has no option 'sigma_min' \(its options: rho\)"),
    ('name = "deis"\norder = 2.0', r"solvers\[2\]: solver 'deis': order must be 1, 2 or 3; got 2.0"),
    ('name = "dpm-solver++"\nsde = "yes"', r"solvers\[2\]: solver 'dpm-solver\+\+': sde must be .*; got 'yes'"),
    ('name = "edm-stochastic"\ns_churn = inf', r"solvers\[2\].s_churn: numbers must be finite; got inf"),
    ('name = "ddim"\neta = {a = 1}', r"solvers\[2\].eta: an option is a number, a string, a boolean or an array"),
    ('name = "rk45"\ntolerances = [1e-3]\nrtol = 1e-2', r"'rk45' sets rtol = atol from `tolerances`"),
    ('name = "rk45"\ntolerances = [1e-3]\nschedules = ["karras"]', r"'rk45' is adaptive: .* `schedules` does not apply"),
    ('name = "rk45"\ntolerances = [0.0]', r"solvers\[2\].tolerances must lie within 1e-12 \.\. 1; got 0"),
    ('name = "heun"\nlabel = "a\\u202eb"', r"solvers\[2\].label = 'a\\u202eb' holds the unprintable character"),
])
def test_options_are_checked_at_every_level(tmp_path, solver_lines, message):
    text = TINY_SUITE.replace('name = "heun"\nnfe = [3, 5]', solver_lines)
    with pytest.raises(BenchError, match=message):
        load_suite(write_suite(tmp_path, text))


def test_model_options_have_their_declared_types(tmp_path):
    text = TINY_SUITE.replace('name = "gmm2d"', 'name = "gmm-image"\nseed = 1.5')
    with pytest.raises(BenchError, match=r"models\[1\].seed: model 'gmm-image' takes a whole number for 'seed'"):
        load_suite(write_suite(tmp_path, text))
    text = TINY_SUITE.replace('name = "gmm2d"', 'name = "gmm2d"\ndevice = "cuda"')
    with pytest.raises(BenchError, match=r"model 'gmm2d' has no option 'device' .*its device is the suite's"):
        load_suite(write_suite(tmp_path, text))


def test_array_options_reach_the_solver_as_tuples(tmp_path):
    text = TINY_SUITE.replace('name = "heun"\nnfe = [3, 5]', 'name = "unipc"\norder = 2\ndisable_corrector = [0, 1]')
    suite = load_suite(write_suite(tmp_path, text))
    unipc = {cell.solver for cell in suite.cells if cell.solver.name == "unipc"}
    assert unipc == {Component("unipc", (("disable_corrector", (0, 1)), ("order", 2)))}
    hash(suite.cells[-1])  # components stay hashable


# ------------------------------------------------------------------------------------------------- devices


def test_devices_must_exist_on_this_machine(tmp_path, monkeypatch):
    def suite_on(device):
        return write_suite(tmp_path, TINY_SUITE.replace('device = "cpu"', f'device = "{device}"'))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BenchError, match=r"device = 'cuda', but this machine has no CUDA device .*`--device cpu`"):
        load_suite(suite_on("cuda"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(BenchError, match=r"device = 'cuda:99', but this machine has 2 CUDA device\(s\): cuda:0, cuda:1"):
        load_suite(suite_on("cuda:99"))
    assert {cell.device for cell in load_suite(suite_on("cuda:1")).cells} == {"cuda:1"}
    for bad in ["cpu:abc", "gpu", "cuda:", "CPU"]:
        with pytest.raises(BenchError, match=rf"device must be 'cpu', 'cuda' or 'cuda:N' .*got '{bad}'"):
            load_suite(suite_on(bad))
    with pytest.raises(BenchError, match=r"--device must be 'cpu', 'cuda' or 'cuda:N'"):
        load_suite(suite_on("cpu"), device="tpu")


# -------------------------------------------------------------------------------------------------- limits


def test_limits_bound_cells_samples_and_budgets_and_say_how_to_raise_them(tmp_path):
    def seeds(count):
        return TINY_SUITE.replace("seeds = [0, 1]", f"seeds = {list(range(count))}")  # 4 budgets x seeds cells

    with pytest.raises(BenchError, match=r"the number of cells \(4 solver settings \(budgets or tolerances x "
                                         r"schedules\) x 2,600 seeds\) is 10,400, above the limit of 10,000"):
        load_suite(write_suite(tmp_path, seeds(2600)))
    many_seeds = seeds(1300)
    with pytest.raises(BenchError, match=r"is 5,200, above the limit of 5,000; if that is what you meant, raise it "
                                         r"with `\[limits\] cells = 5200` in the suite or `--max-cells 5200`"):
        load_suite(write_suite(tmp_path, many_seeds + "[limits]\ncells = 5000\n"))
    assert len(load_suite(write_suite(tmp_path, many_seeds + "[limits]\ncells = 5200\n")).cells) == 5200
    assert len(load_suite(write_suite(tmp_path, many_seeds + "[limits]\ncells = 5000\n"), limits={"cells": 6000}).cells) == 5200
    with pytest.raises(BenchError, match=r"an NFE budget in nfe is 10,001, above the limit of 10,000; .*"
                                         r"`\[limits\] nfe = 10001` .* `--max-nfe 10001`"):
        load_suite(write_suite(tmp_path, TINY_SUITE.replace("nfe = [2, 4]", "nfe = [2, 10001]")))
    with pytest.raises(BenchError, match=r"n \(samples per cell\) is 10,000,001, above the limit of 10,000,000"):
        load_suite(write_suite(tmp_path, TINY_SUITE.replace("n = 32", "n = 10000001")))
    with pytest.raises(BenchError, match=r"the number of samples \(8 cells x n = 32\) is 256, above the limit of 100; "
                                         r".*`--max-samples 256`"):
        load_suite(write_suite(tmp_path, TINY_SUITE), limits={"samples": 100})
    with pytest.raises(BenchError, match=r"limits: unknown limit 'cell' \(limits: cells, samples_per_cell, samples, nfe\)"):
        load_suite(write_suite(tmp_path, TINY_SUITE + "[limits]\ncell = 5\n"))
