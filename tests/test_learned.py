"""Learned schedules and solvers: the fit contract (fit once, reuse, refit on change, never on evaluation seeds),
the fit cache's safetensors + manifest with its sha256, and what the built-in fits promise (pinned, strictly
decreasing, finite grids; LD3 and GITS no worse than where they start on held-out seeds; BNS starting exactly at
its base solver)."""

import json
import sys

import pytest
import torch

import bench
from bench import hookimpl
from bench.core.fitting import FIT_STREAM, FitProblem, check_grid, fitting_noise
from bench.core.noise import X_T_STREAM, gaussian
from bench.core.sampling import get_solver, make_sigmas
from bench.errors import BenchError
from bench.registry import PluginManager
from bench.sweep.cell import load_fit
from bench.sweep.fits import FitCache, fit_cells, fit_key
from bench.sweep.runner import prepare, run_suite
from bench.sweep.suite import parse_suite

FITS: list[dict] = []  # the options of every fit the counting schedule made


def counted(steps, model, *, fitted, fit_seed: int = 99, fit_n: int = 8, teacher_steps: int = 4,
            spread: float = 1.0):
    """A learned schedule for the tests: a logsnr grid, counted."""
    return fitted["sigmas"]


def fit_counted(problem: FitProblem) -> dict:
    FITS.append(dict(problem.options, solver=problem.solver.describe(), steps=problem.steps))
    problem.teacher(problem.noise())  # a teacher run, so that its NFE is counted
    return {"sigmas": make_sigmas("logsnr", problem.steps, problem.model)}


@hookimpl
def register_schedules(register):
    register(counted, name="counted", fit=fit_counted)


@pytest.fixture
def plugins():
    manager = PluginManager()
    manager.register(sys.modules[__name__], name="learned-test")
    FITS.clear()
    return manager


def suite(plugins, solvers, seeds=(0, 1), nfe=(3,), schedule="counted", n=16):
    return parse_suite({"name": "learned-test", "device": "cpu", "n": n, "seeds": list(seeds), "nfe": list(nfe),
                        "metrics": ["trajectory_error"], "models": [{"name": "gmm2d"}],
                        "schedules": [schedule] if isinstance(schedule, str) else [schedule],
                        "solvers": solvers}, plugins=plugins)


def test_a_fit_is_made_once_and_reused_by_every_cell_and_run_with_its_key(plugins, tmp_path):
    first = suite(plugins, [{"name": "euler"}])
    summary = run_suite(first, tmp_path, plugins=plugins, progress=False)
    assert summary.done == 2 and len(FITS) == 1  # two seeds, one fit
    rows = bench.read_results(summary.store)
    assert rows["fit_key"].nunique() == 1 and (rows["fit_teacher_nfe"] == 2 * 4 + 1).all()
    assert (rows["fit_seconds"] >= 0).all() and (rows["fit_evaluations"] > 0).all()
    run_suite(first, tmp_path, plugins=plugins, progress=False, rerun=["*"])
    assert len(FITS) == 1  # recomputed cells, but the fit comes from results/fits
    from bench.cli import main

    assert main(["report", str(summary.store), "-o", str(tmp_path / "report.html")]) == 0
    page = (tmp_path / "report.html").read_text()
    assert "Fitting cost of learned schedules and solvers" in page and rows["fit_key"][0] in page
    # a changed base solver, solver option, budget or fit option: each its own fit
    for changed in (suite(plugins, [{"name": "dpm-solver++"}]), suite(plugins, [{"name": "ipndm", "order": 2}]),
                    suite(plugins, [{"name": "ipndm", "order": 3}]), suite(plugins, [{"name": "euler"}], nfe=(4,)),
                    suite(plugins, [{"name": "euler"}], schedule={"name": "counted", "spread": 2.0})):
        before = len(FITS)
        run_suite(changed, tmp_path, plugins=plugins, progress=False)
        assert len(FITS) == before + 1
    assert [fit["solver"].split(" ")[0] for fit in FITS[1:4]] == ["'dpm-solver++'", "'ipndm'", "'ipndm'"]
    assert FITS[2]["solver"] == "'ipndm' (order=2)" and FITS[3]["solver"] == "'ipndm' (order=3)"
    assert FITS[4]["steps"] == 4 and FITS[5]["spread"] == 2.0
    manifest = json.loads((tmp_path / "fits" / "manifest.json").read_text())
    assert len(manifest) == 6


def test_a_fit_key_covers_the_code_of_its_schedule(plugins, monkeypatch):
    cell = suite(plugins, [{"name": "euler"}]).cells[0]
    import bench.sweep.fits as fits

    key = fit_key(cell, plugins)
    monkeypatch.setattr(fits, "module_digest", lambda name: "edited")  # bench.core.fitting as another source
    assert fit_key(cell, plugins) != key


def test_fitting_refuses_an_evaluation_seed_before_anything_is_written(plugins, tmp_path):
    clash = suite(plugins, [{"name": "euler"}], seeds=(0, 99))  # counted's fit_seed is 99
    with pytest.raises(BenchError, match=r"fit_seed = 99 is also an evaluation seed \(seeds \[0, 99\]\)"):
        run_suite(clash, tmp_path, plugins=plugins, progress=False)
    assert not (tmp_path / "learned-test.sqlite").exists() and not (tmp_path / "fits").exists() and not FITS


def test_fitting_noise_is_a_stream_no_evaluation_draw_uses():
    model = bench.load_model("gmm2d")
    fit = fitting_noise(0, 64, model.shape, model.sigma_max)
    evaluation = model.sigma_max * gaussian(0, torch.arange(64), model.shape, stream=X_T_STREAM)
    assert fit.shape == evaluation.shape and not torch.isclose(fit, evaluation).any()
    # evaluation streams are 0 (x_T) and 1 + step (per-step noise): below FIT_STREAM for any plan
    assert FIT_STREAM > 2**61 and fitting_noise(0, 4, model.shape, 1.0).equal(
        gaussian(0, torch.arange(4), model.shape, stream=FIT_STREAM))


def test_the_fit_cache_round_trips_safetensors_and_checks_the_sha256(tmp_path):
    cache = FitCache(tmp_path)
    tensors = {"sigmas": torch.tensor([80.0, 1.0, 0.002, 0.0], dtype=torch.float64), "w": torch.arange(6.0)}
    saved = cache.save("abc", tensors, {"seconds": 1.5, "teacher": {"nfe": 9}, "evaluations": 90})
    loaded = FitCache(tmp_path).load("abc")
    assert all(loaded.tensors[name].equal(tensors[name]) for name in tensors)
    assert loaded.entry == saved.entry and loaded.columns()["fit_teacher_nfe"] == 9
    assert load_fit((str(tmp_path / "abc.safetensors"), saved.entry["sha256"]))["w"].equal(tensors["w"])
    data = bytearray((tmp_path / "abc.safetensors").read_bytes())
    data[-1] ^= 1  # one flipped bit: the cache refits rather than load it, and a cell refuses it
    (tmp_path / "abc.safetensors").write_bytes(bytes(data))
    assert cache.load("abc") is None
    with pytest.raises(ValueError, match="does not match its manifest's sha256"):
        load_fit((str(tmp_path / "abc.safetensors"), saved.entry["sha256"]))


def test_a_grid_must_be_pinned_strictly_decreasing_and_finite():
    good = torch.tensor([80.0, 3.0, 0.002, 0.0], dtype=torch.float64)
    assert check_grid(good, 3, 0.002, 80.0, "t").equal(good)
    for bad in ([70.0, 3.0, 0.002, 0.0], [80.0, 3.0, 0.003, 0.0], [80.0, 0.002, 0.002, 0.0],
                [80.0, float("nan"), 0.002, 0.0], [80.0, 90.0, 0.002, 0.0]):
        with pytest.raises(BenchError, match="strictly decreasing sigmas from sigma_max"):
            check_grid(torch.tensor(bad, dtype=torch.float64), 3, 0.002, 80.0, "t")


def _problem(model, solver_name, nfe, **options):
    solver = get_solver(solver_name)
    return FitProblem(model, solver, solver.plan(nfe), dict(fit_seed=7, fit_n=48, teacher_steps=32, **options))


def _held_out_error(model, solver_name, nfe, sigmas, reference, x_T):
    solver = get_solver(solver_name)
    x = solver.sample(lambda x, sigma: model(x, torch.full((len(x),), sigma), None), x_T, sigmas, solver.plan(nfe))
    return (x - reference).pow(2).mean().sqrt().item()


@pytest.fixture(scope="module")
def held_out():
    """gmm2d, 256 evaluation samples of seed 0 (stream 0) and their exact-flow endpoints."""
    model = bench.load_model("gmm2d")
    reference = bench.sample(model, "heun", nfe=199, n=256, seed=0, schedule="karras")
    return model, reference.x_T, reference.x


def test_ld3_and_gits_beat_or_match_their_start_on_held_out_seeds(held_out):
    import plugins.learned_schedules as learned

    model, x_T, reference = held_out
    nfe = 4
    problem = _problem(model, "dpm-solver++", nfe, iterations=8, radius=0.05, lr=0.1)
    ld3 = check_grid(learned.fit_ld3(problem)["sigmas"], 4, model.sigma_min, model.sigma_max, "ld3")
    start = problem.notes["chosen"].removeprefix("ld3 from ")  # the hand grid it was fitted from
    error = _held_out_error(model, "dpm-solver++", nfe, ld3, reference, x_T)
    assert error <= _held_out_error(model, "dpm-solver++", nfe, make_sigmas(start, 4, model), reference, x_T)
    problem = _problem(model, "dpm-solver++", nfe, fine_steps=24, coeff=1.0)
    gits = check_grid(learned.fit_gits(problem)["sigmas"], 4, model.sigma_min, model.sigma_max, "gits")
    assert set(gits[1:-2].tolist()) <= set(make_sigmas("karras", 25, model)[1:-2].tolist())  # of its fine grid
    error = _held_out_error(model, "dpm-solver++", nfe, gits, reference, x_T)
    assert error <= _held_out_error(model, "dpm-solver++", nfe, make_sigmas("karras", 4, model), reference, x_T)


@pytest.mark.parametrize("solver_name", ["dpm-solver++", "unipc", "ipndm", "euler"])
def test_every_learned_grid_is_pinned_strictly_decreasing_and_finite(held_out, solver_name):
    import plugins.learned_schedules as learned

    model = held_out[0]
    for fit, options in ((learned.fit_ld3, dict(iterations=2, radius=0.05, lr=0.1)),
                         (learned.fit_gits, dict(fine_steps=12, coeff=1.0)),
                         (learned.fit_ays, dict(fine_steps=30, rounds=5))):
        sigmas = fit(_problem(model, solver_name, 5, **options))["sigmas"]
        assert sigmas[0] == model.sigma_max and sigmas[-2] == model.sigma_min and sigmas[-1] == 0
        assert bool((sigmas[1:] < sigmas[:-1]).all()) and bool(torch.isfinite(sigmas).all()) and len(sigmas) == 6


@pytest.mark.parametrize("base", ["dpm-solver++", "unipc", "ipndm", "euler"])
def test_bns_starts_exactly_at_its_base_solver(held_out, base):
    from plugins.bns import base_coefficients, bns_sample, parameter_count

    model, x_T, _ = held_out
    solver = get_solver(base)
    plan = solver.plan(6)
    sigmas = make_sigmas("logsnr", plan.steps, model)
    x_weight, weights = base_coefficients(solver, sigmas, plan)
    denoise = lambda x, sigma: model(x, torch.full((len(x),), sigma, dtype=x.dtype), None)  # noqa: E731
    x64 = x_T.to(torch.float64)
    ours = bns_sample(denoise, x64, sigmas.tolist(), x_weight.tolist(), weights.tolist())
    theirs = solver.sample(denoise, x64, sigmas, plan)
    assert torch.allclose(ours, theirs, rtol=1e-9, atol=1e-9)
    assert parameter_count(plan.steps) == 20 and parameter_count(19) < 200 < parameter_count(20)


def test_bns_fits_through_the_contract_and_beats_its_base_on_the_fitting_samples(plugins, tmp_path):
    cells = suite(plugins, [{"name": "bns", "iterations": 30, "fit_n": 32}], seeds=(0,), schedule="logsnr",
                  nfe=(4,)).cells
    prepared = prepare(suite(plugins, [{"name": "bns", "iterations": 30, "fit_n": 32}], seeds=(0,),
                             schedule="logsnr", nfe=(4,)), plugins)
    fit = fit_cells(cells, prepared.models, plugins, FitCache(tmp_path))[cells[0].key]
    assert fit.entry["notes"]["loss"] < fit.entry["notes"]["loss_base"]
    assert fit.tensors["x_weight"].shape == (3,) and fit.tensors["weights"].shape == (3, 3)
    with pytest.raises(BenchError, match="solver 'bns'.* is learned: fit it first"):
        bench.sample("gmm2d", "bns", nfe=4, n=4, schedule="logsnr")
    out = bench.sample("gmm2d", "bns", nfe=4, n=4, schedule="logsnr", fitted=fit.tensors, iterations=30, fit_n=32)
    assert out.nfe == 4 and torch.isfinite(out.x).all()


def test_samplerbench_fit_fits_a_suite_alone_and_run_reuses_it(tmp_path, capsys):
    from bench.cli import main

    (tmp_path / "s.toml").write_text(
        'name = "s"\ndevice = "cpu"\nn = 8\nseeds = [0]\nnfe = [3]\nmetrics = ["trajectory_error"]\n'
        'schedules = [{ name = "gits", fit_n = 8, teacher_steps = 4, fine_steps = 6 }]\n'
        '[[models]]\nname = "gmm2d"\n[[solvers]]\nname = "euler"\n')
    assert main(["fit", str(tmp_path / "s.toml"), "--out", str(tmp_path), "--quiet"]) == 0
    assert "1 fits in" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "fits" / "manifest.json").read_text())
    (entry,) = manifest.values()
    # Heun over karras(4 steps) and the 7 fine points (ends shared: 9 intervals), the last call, D at the fine points
    assert entry["fitting_samples"] == 8 and entry["teacher"]["nfe"] == 2 * 9 + 1 + 7 and entry["device"] == "cpu"
    stamp = (tmp_path / "fits" / entry["file"]).stat().st_mtime_ns
    assert main(["run", str(tmp_path / "s.toml"), "--out", str(tmp_path), "--report", str(tmp_path / "r.html"),
                 "--quiet"]) == 0
    assert (tmp_path / "fits" / entry["file"]).stat().st_mtime_ns == stamp  # not refitted
    assert bench.read_results(tmp_path / "s.sqlite")["fit_key"].tolist() == [entry["key"]]
