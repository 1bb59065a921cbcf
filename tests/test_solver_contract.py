"""The solver contract: declared options, solver families, the step rule that one-call-per-step solvers expose (the
sequential loop and a hand-written one, or a Picard iteration over all steps at once, give the same samples), and
plugins that depend on bench alone."""

import ast
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import bench
from bench import hookimpl
from bench.core.denoiser import CountingDenoiser
from bench.core.noise import NoiseStream, gaussian
from bench.core.options import SolverOptions, option
from bench.core.sampling import get_solver, make_sigmas
from bench.core.solver import Solver, build_solver, check_options, option_names
from bench.core.steps import StepSolver, require_step_rule
from bench.errors import BenchError
from bench.registry import PluginManager
from plugins.dpm_solver import DPMSolver, DPMSolverAdaptive, DPMSolverMultistep, DPMSolverSinglestep
from plugins.dpm_solver_pp import DPMSolverPlusPlus, DPMSolverPlusPlusMultistep, DPMSolverPlusPlusSinglestep

ROOT = Path(__file__).resolve().parent.parent

# every solver with a step rule, in its option sets (stochastic ones draw noise(i) at step i)
STEP_SOLVERS = [
    ("euler", {}), ("ddim", {}), ("ddim", {"eta": 1.0}), ("ddim", {"eta": 0.3}), ("euler-maruyama", {}),
    *[("ipndm", {"order": p}) for p in (1, 2, 3, 4)],
    *[("deis", {"order": p, "method": m}) for m in ("tab", "rhoab", "logrho") for p in (1, 2, 3)],
    ("deis", {"order": 3, "lower_order_final": False}),
    *[("unipc", {"order": p, "variant": v, "corrector": c}) for v in ("bh1", "bh2") for p in (1, 2, 3)
      for c in (True, False)],
    ("unipc", {"order": 3, "lower_order_final": False}), ("unipc", {"order": 3, "disable_corrector": [0, 2]}),
    *[("dpm-solver", {"method": "multistep", "order": p}) for p in (1, 2, 3)],
    ("dpm-solver", {"method": "multistep", "order": 3, "third_order": "taylor"}),
    *[("dpm-solver++", {"order": p}) for p in (1, 2, 3)],
    ("dpm-solver++", {"order": 2, "solver_type": "heun"}), ("dpm-solver++", {"order": 3, "third_order": "taylor"}),
    ("dpm-solver++", {"order": 3, "lower_order_final": False}),
    ("dpm-solver++", {"sde": True}), ("dpm-solver++", {"sde": True, "order": 1}),
    ("dpm-solver++", {"sde": True, "solver_type": "heun"}),
]
# several model calls per step, or a loop of their own: no step rule
NO_STEP_RULE = [("heun", {}), ("edm-stochastic", {}), ("rk45", {}), ("pndm", {"method": "plms"}), ("dpm-solver", {}),
                ("dpm-solver", {"method": "adaptive"}), ("dpm-solver++", {"method": "singlestep"})]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # the analytic models' small matrix products gain nothing from a second thread, and on a shared machine two
    # torch threads spin-wait on each other (gmm-image: 1.4 ms per call on one thread, 50 ms on two under load)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def case_id(case) -> str:
    solver, options = case
    return solver + "".join(f",{key}={value}" for key, value in options.items())


# ------------------------------------------------------------------------------------------------ step rules

def hand_loop(solver: StepSolver, model, x_T: torch.Tensor, sigmas: torch.Tensor, noise) -> torch.Tensor:
    """The sequential loop written out again from the interface alone: every point and estimate kept in lists, the
    history of step i sliced out of them, the noise of step i drawn for it."""
    plan = solver.plan(len(sigmas) - 1)
    assert plan.steps == len(sigmas) - 1
    states, estimates = [solver.initial_state(x_T)], []
    for i in range(plan.steps - 1):
        x = solver.point(states[i])
        denoised = model(x, torch.full((len(x),), sigmas[i].item(), dtype=x.dtype))
        estimates.append(solver.estimate(x, denoised, sigmas[i].item()))
        history = tuple(estimates[max(0, i + 1 - solver.history):])
        states.append(solver.step(i, states[i], history, sigmas, plan.orders, noise(i) if solver.stochastic else None))
    x = solver.point(states[-1])
    return model(x, torch.full((len(x),), sigmas[-2].item(), dtype=x.dtype))  # the last step: x0 = D


def picard(solver: StepSolver, model, x_T: torch.Tensor, sigmas: torch.Tensor, noise, sweeps: int) -> torch.Tensor:
    """Picard iteration over the whole grid, as a parallel sampler runs it on a window: guess every step's state,
    evaluate the denoiser at all their points in one batched call, recompute every state from the step rule applied
    to the guesses, repeat. Step i's state is right after i sweeps, so ``steps`` sweeps give the sequential result."""
    plan = solver.plan(len(sigmas) - 1)
    steps, n = plan.steps, len(x_T)
    noises = [noise(i) if solver.stochastic else None for i in range(steps - 1)]  # all drawn up front
    states = [solver.initial_state(x_T)] * steps
    for _ in range(sweeps):
        points = torch.cat([solver.point(state) for state in states])
        denoised = model(points, sigmas[:steps].repeat_interleave(n).to(points.dtype)).split(n)
        estimates = [solver.estimate(solver.point(states[i]), denoised[i], sigmas[i].item()) for i in range(steps)]
        states = [states[0]] + [solver.step(i, states[i], tuple(estimates[max(0, i + 1 - solver.history):i + 1]),
                                            sigmas, plan.orders, noises[i]) for i in range(steps - 1)]
    return denoised[-1]  # the last step: x0 = D at the last point


@pytest.mark.parametrize("solver_name, options", STEP_SOLVERS, ids=[case_id(case) for case in STEP_SOLVERS])
def test_sequential_samples_are_the_step_rule_applied_by_hand(gmm2d, solver_name, options):
    solver = get_solver(solver_name, **options)
    assert isinstance(solver, StepSolver) and require_step_rule(solver) is solver
    out = bench.sample(gmm2d, solver, nfe=9, n=16, seed=4, dtype=torch.float64, schedule="logsnr", warmup=False)
    noise = NoiseStream(4, torch.arange(16), gmm2d.shape, torch.float64, "cpu")
    with torch.inference_mode():
        by_hand = hand_loop(solver, gmm2d, out.x_T, out.sigmas, noise)
        parallel = picard(solver, gmm2d, out.x_T, out.sigmas, noise, sweeps=out.plan.steps)
    assert torch.equal(out.x, by_hand)
    # the batched call rounds like the sequential ones up to the matrix products' blocking
    torch.testing.assert_close(parallel, out.x, rtol=1e-12, atol=1e-12)


def test_picard_needs_as_many_sweeps_as_steps(gmm2d):
    # what the parallel samplers' stopping rule watches: the states stop changing only once the sweeps have
    # carried the start through every step
    solver = get_solver("unipc", order=3)
    out = bench.sample(gmm2d, solver, nfe=9, n=16, seed=0, dtype=torch.float64, warmup=False)
    with torch.inference_mode():
        early = picard(solver, gmm2d, out.x_T, out.sigmas, None, sweeps=out.plan.steps - 2)
    assert (early - out.x).abs().max() > 1e-6


@pytest.mark.parametrize("solver_name, options", NO_STEP_RULE, ids=[case_id(case) for case in NO_STEP_RULE])
def test_solvers_without_a_step_rule_are_refused_with_the_reason(solver_name, options):
    solver = get_solver(solver_name, **options)
    assert not isinstance(solver, StepSolver)
    with pytest.raises(BenchError, match=r"needs a solver with a step rule.*(several times per step|chooses its own)"):
        require_step_rule(solver, "ParaDiGMS")


def test_a_stochastic_step_solver_without_noise_says_so(gmm2d):
    solver = get_solver("euler-maruyama")
    sigmas = make_sigmas("karras", 4, gmm2d)
    with pytest.raises(ValueError, match="is stochastic: it needs a noise source"):
        solver.sample(CountingDenoiser(gmm2d), torch.zeros(2, 2), sigmas, solver.plan(4))


def test_step_noise_is_the_streams(gmm2d):
    # the generic loop hands step i the stream's noise(i): stream 1 + i of the sample's seed, as before
    noise = NoiseStream(7, torch.arange(3), gmm2d.shape, torch.float64, "cpu")
    assert torch.equal(noise(2), gaussian(7, torch.arange(3), gmm2d.shape, stream=3, dtype=torch.float64))


# --------------------------------------------------------------------------------------------------- options

def test_options_are_declared_once_and_checked_without_building():
    assert option_names(get_solver("ddim").__class__) == ["eta"]
    assert check_options(manager_solver("ddim"), "ddim", {"eta": 1}) == {"eta": 1.0}  # an int is a number
    assert check_options(DPMSolverPlusPlus, "dpm-solver++", {"order": 3}) == {
        "order": 3, "method": "multistep", "lower_order_final": True, "solver_type": "midpoint",
        "third_order": "original", "sde": False}
    assert check_options(DPMSolver, "dpm-solver", {"method": "adaptive"})["rtol"] == 0.05
    with pytest.raises(BenchError, match=r"solver 'ddim': eta must be a number; got 'fast'"):
        check_options(manager_solver("ddim"), "ddim", {"eta": "fast"})
    with pytest.raises(BenchError, match=r"solver 'unipc': corrector must be true or false; got 1"):
        check_options(manager_solver("unipc"), "unipc", {"corrector": 1})
    with pytest.raises(BenchError, match=r"solver 'unipc': disable_corrector must be a list of integers; got 3"):
        check_options(manager_solver("unipc"), "unipc", {"disable_corrector": 3})
    with pytest.raises(BenchError, match=r"solver 'deis' has no option 'oder' \(its options: order, method, "
                                         r"lower_order_final\)"):
        check_options(manager_solver("deis"), "deis", {"oder": 3})
    with pytest.raises(BenchError, match=r"third_order='taylor' applies to method='multistep' with order=3 only"):
        check_options(DPMSolverPlusPlus, "dpm-solver++", {"third_order": "taylor"})


def manager_solver(name: str):
    return bench.registry.manager().get("solver", name).obj


def test_families_build_the_class_their_method_names():
    assert type(get_solver("dpm-solver++")) is DPMSolverPlusPlusMultistep
    assert type(get_solver("dpm-solver++", method="singlestep")) is DPMSolverPlusPlusSinglestep
    assert type(get_solver("dpm-solver")) is DPMSolverSinglestep
    assert type(get_solver("dpm-solver", method="multistep")) is DPMSolverMultistep
    assert type(get_solver("dpm-solver", method="adaptive")) is DPMSolverAdaptive
    assert type(DPMSolverPlusPlus(method="singlestep", order=3)) is DPMSolverPlusPlusSinglestep
    # an option of another method at its default is dropped (a suite may spell defaults out), any other is refused
    singlestep = get_solver("dpm-solver", lower_order_final=True, third_order="original")
    assert singlestep.options() == {"order": 3, "method": "singlestep", "intermediates": "lambda"}
    assert option_names(DPMSolver) == ["method", "order", "intermediates", "lower_order_final", "third_order", "rtol",
                                       "atol"]
    # options() rebuilds the same solver
    solver = get_solver("dpm-solver++", order=3, solver_type="heun")
    assert get_solver("dpm-solver++", **solver.options()).options() == solver.options()


def test_order_declarations():
    # order: what the implementation reaches as the steps grow; nominal_order: its paper's; order_note: why not
    deis = get_solver("deis", order=3)
    assert (deis.order, deis.nominal_order, deis.order_note) == (
        2, 3, "the first-order warm-up step caps a multistep method at 2")
    assert get_solver("dpm-solver++", order=3).order_note.startswith("3M as published weights D'' by 1/2")
    assert (get_solver("heun").order, get_solver("heun").nominal_order, get_solver("heun").order_note) == (2, 2, "")


class Midpoint(Solver):
    """A plugin written as README's "Writing a plugin" shows it."""

    order = 2

    def __init__(self) -> None:
        ...

    def nfe_for_steps(self, steps):
        return 2 * steps - 1

    def sample(self, denoise, x, sigmas, plan, noise=None):
        sigma_list = sigmas.tolist()
        for sigma, sigma_next in zip(sigma_list[:-1], sigma_list[1:]):
            denoised = denoise(x, sigma)
            if sigma_next == 0:
                return denoised
            sigma_mid = math.sqrt(sigma * sigma_next)
            x_mid = torch.lerp(denoised, x, sigma_mid / sigma)
            x = x + (sigma_next - sigma) * (x_mid - denoise(x_mid, sigma_mid)) / sigma_mid
        return x


class Scaled(Solver):
    """A plugin of the older kind: its options are its constructor's arguments."""

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale

    def sample(self, denoise, x, sigmas, plan, noise=None):
        return denoise(x, float(sigmas[0])) * self.scale


class Declared(Solver):
    @dataclass(frozen=True)
    class Options(SolverOptions):
        scale: float = option(1.0, check=lambda scale: scale > 0, must="be > 0")

    stochastic = True  # a class attribute in place of the base's property

    def sample(self, denoise, x, sigmas, plan, noise=None):
        return denoise(x, float(sigmas[0])) * self.config.scale


def test_third_party_solvers_of_every_kind(gmm2d):
    module = type(math)("third_party")
    module.register_solvers = hookimpl(lambda register: [register(Midpoint, name="midpoint"),
                                                         register(Scaled, name="scaled"),
                                                         register(Declared, name="declared")])
    plugins = PluginManager()
    plugins.register(module, name="third-party")
    out = bench.sample(gmm2d, "midpoint", nfe=39, n=8, plugins=plugins)
    assert out.nfe == 39 and get_solver("midpoint", plugins).order == 2
    assert not get_solver("midpoint", plugins).stochastic and get_solver("midpoint", plugins).options() == {}
    scaled = get_solver("scaled", plugins, scale=2.0)
    assert scaled.options() == {"scale": 2.0} and option_names(Scaled) == ["scale"]
    with pytest.raises(BenchError, match=r"solver 'scaled' has no option 'size' \(its options: scale\)"):
        get_solver("scaled", plugins, size=2)
    declared = get_solver("declared", plugins, scale=3)
    assert declared.options() == {"scale": 3.0} and declared.stochastic
    with pytest.raises(BenchError, match=r"solver 'declared': scale must be > 0; got -1"):
        build_solver(Declared, "declared", {"scale": -1})


# ------------------------------------------------------------------------------------------------ the layout

def imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
    return modules


def test_plugins_depend_on_bench_only():
    for path in sorted((ROOT / "plugins").glob("*.py")):
        others = {module for module in imported_modules(path) if module.split(".")[0] == "plugins"}
        assert not others, f"{path.name} imports {sorted(others)}: shared code belongs in bench"


def test_solver_modules_stay_short():
    paths = [*(ROOT / "plugins").glob("*.py"), *(ROOT / "bench" / "core").glob("*.py"),
             ROOT / "bench" / "tools" / "convergence.py"]
    solver_paths = [path for path in paths if path.stem not in ("analytic", "digits")]  # not solver code
    long = {path.name: n for path in solver_paths if (n := len(path.read_text().splitlines())) > 400}
    assert not long, long


def test_a_plan_is_found_in_logarithmic_time_for_any_budget():
    from bench.core.sampling import get_solver

    heun = get_solver("heun")
    calls = []
    real = type(heun).nfe_for_steps

    def counting(self, steps):
        calls.append(steps)
        return real(self, steps)

    type(heun).nfe_for_steps = counting
    try:
        plan = heun.plan(10**12 + 1)
    finally:
        type(heun).nfe_for_steps = real
    assert (plan.steps, plan.nfe) == (5 * 10**11 + 1, 10**12 + 1) and len(calls) < 100
    for budget in range(3, 40):  # the same plans as the linear search
        steps = max(s for s in range(2, 30) if 2 * s - 1 <= budget)
        assert heun.plan(budget).steps == steps
