"""DPM-Solver and DPM-Solver++: empirical order of convergence against the exact flow, NFE, the adaptive and the SDE
variants, and the options.

Order. The slope of log(trajectory error) against log(steps), fitted over 64, 128, 256 and 512 steps in float64
against a reference solved to 1e-10 (bench.measure.reference), as tests/test_solvers.py does; the errors stay between 1e-3
and 1e-8, well above the reference's accuracy (third-order methods reach 3e-8 at 512 steps). Steps are steps of the
grid, and a singlestep step of order k spends k calls (with ``intermediates="grid"`` the grid has one point per
call, so K steps are 3K - 2 grid intervals there). gmm2d runs on both schedules; gmm-image on karras, and on logsnr
over 128..1024 steps under the `slow` mark. Below 64 steps these methods are visibly pre-asymptotic here (a
first-order step on gmm-image sends a sample to another mode at 32 steps; DPM-Solver-3 fits 2.4-2.6 over 32..128).
The last step, to sigma = 0, is x0 = D(x; sigma_min) for every solver and for the reference alike, so it does not
enter the order.

Tolerance: -0.4/+0.3 around the expected order for third-order methods, +-0.3 for the others. Measured over these
ranges: second order 1.85-2.06; singlestep third order 2.80-2.98 (DPM-Solver-3, DPM-Solver++(3S), grid or lambda
intermediate points) and multistep third order with the full Taylor term (``third_order="taylor"``) 2.74-3.19.
The third-order methods approach 3 from below on gmm-image (slopes of successive doublings 2.66, 2.82, 2.91 for
DPM-Solver++(3S)): the next term of the error is still ~20 % of the leading one at 64 steps. A lost order is off
by more than the window: the original code's and diffusers' 3M (``third_order="original"``, the default: half the
Taylor term of the second derivative, plugins/dpm_solver.py) is expected at order 2 and fits 2.05-2.26, falling
towards 2 with more steps, against 2.74-3.19 with the full term.

First-order options (DPM-Solver-1, DPM-Solver++ order 1) are DDIM, i.e. Euler in sigma: tested as identities with
euler, whose order tests/test_solvers.py checks.
"""

import math
import re

import pytest
import torch

import bench
from bench.tools.convergence import fitted_order, reference_for, trajectory_errors
from bench.errors import BenchError
from bench.core.multistep import singlestep_intervals, singlestep_orders
from bench.core.sampling import get_solver
from bench.sweep.suite import load_suite
from helpers import assert_same_samples, write_suite

STEPS = [64, 128, 256, 512]
CASES = {"gmm2d": 256, "gmm-image": 32}  # model -> samples (gmm-image is 768-dimensional)

# (solver, options, expected order on karras / logsnr grids)
ORDER_CASES = [
    ("dpm-solver", dict(order=2), 2),
    ("dpm-solver", dict(order=3), 3),
    ("dpm-solver", dict(order=3, intermediates="grid"), 3),
    ("dpm-solver", dict(order=2, method="multistep"), 2),
    ("dpm-solver", dict(order=3, method="multistep"), 2),  # third_order="original": see plugins/dpm_solver.py
    ("dpm-solver", dict(order=3, method="multistep", third_order="taylor"), 3),
    ("dpm-solver++", dict(order=2), 2),
    ("dpm-solver++", dict(order=2, solver_type="heun"), 2),
    ("dpm-solver++", dict(order=3), 2),  # third_order="original"
    ("dpm-solver++", dict(order=3, third_order="taylor"), 3),
    ("dpm-solver++", dict(order=2, method="singlestep"), 2),
    ("dpm-solver++", dict(order=3, method="singlestep"), 3),
]
FIRST_ORDER = [("dpm-solver", dict(order=1)), ("dpm-solver", dict(order=1, method="multistep")),
               ("dpm-solver++", dict(order=1)), ("dpm-solver++", dict(order=1, method="singlestep"))]
SDE_OPTIONS = [dict(sde=True), dict(sde=True, order=1), dict(sde=True, solver_type="heun")]
ALL_OPTIONS = [(solver, options) for solver, options, _ in ORDER_CASES] + FIRST_ORDER + [
    ("dpm-solver", dict(order=2, intermediates="grid")), ("dpm-solver++", dict(order=3, method="singlestep",
                                                                              intermediates="grid")),
    ("dpm-solver", dict(order=3, method="multistep", lower_order_final=False)),
    ("dpm-solver++", dict(order=3, lower_order_final=False)), ("dpm-solver++", dict(order=2, lower_order_final=False)),
    *[("dpm-solver++", options) for options in SDE_OPTIONS]]


def case_id(case) -> str:
    solver, options = case[:2]
    return solver + "".join(f",{key}={value}" for key, value in options.items())


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # the analytic models' small matrix products gain nothing from a second thread, and on a shared machine two
    # torch threads spin-wait on each other (gmm-image: 1.4 ms per call on one thread, 50 ms on two under load)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def references():
    cache = {}
    for name, n in CASES.items():
        model = bench.load_model(name)
        cache[name] = (model, reference_for(model, n))
    return cache


def check_order(references, model_name, schedule, solver, options, expected, steps=STEPS):
    model, reference = references[model_name]
    if options.get("intermediates") == "grid":  # a grid of one sigma per call: K steps [3, ..., 3, 1] need 3K - 2
        steps = [3 * k - 2 for k in steps]
    order = fitted_order(steps, trajectory_errors(model, reference, solver, steps, schedule, **options))
    low, high = (0.4, 0.3) if expected == 3 else (0.3, 0.3)
    assert expected - low <= order <= expected + high, (
        f"{case_id((solver, options))} on {model_name} ({schedule}): observed order {order:.3f}, expected {expected}")


# ------------------------------------------------------------------------------------------------------ order

@pytest.mark.parametrize("model_name, schedule", [("gmm2d", "karras"), ("gmm2d", "logsnr"), ("gmm-image", "karras")])
@pytest.mark.parametrize("solver, options, expected", ORDER_CASES, ids=[case_id(case) for case in ORDER_CASES])
def test_empirical_order(references, model_name, schedule, solver, options, expected):
    check_order(references, model_name, schedule, solver, options, expected)


@pytest.mark.slow
@pytest.mark.parametrize("solver, options, expected", ORDER_CASES, ids=[case_id(case) for case in ORDER_CASES])
def test_empirical_order_gmm_image_logsnr(references, solver, options, expected):
    check_order(references, "gmm-image", "logsnr", solver, options, expected, steps=[128, 256, 512, 1024])


@pytest.mark.parametrize("fewer_calls", [3, 4], ids=["3K-3", "3K-4"])
def test_fast_allocation_keeps_order_three_at_every_budget(references, fewer_calls):
    # trajectory_errors spends 3K - 2 calls on K steps ([3, ..., 3, 1]); 3K - 3 and 3K - 4 calls end with [.., 2, 1]
    # and [.., 3, 1, 1]. The first has an O(h^3) local error and keeps order 3; the second's first-order step to
    # sigma_min formally costs an order, but its constant is small there (bench.core.multistep.singlestep_orders)
    model, reference = references["gmm2d"]
    steps = [64, 128, 256, 512]
    errors = []
    for k in steps:
        out = bench.sample(model, "dpm-solver", nfe=3 * k - fewer_calls, n=len(reference), dtype=torch.float64,
                           schedule="logsnr", warmup=False)
        assert out.plan.steps == k
        errors.append((out.x - reference).pow(2).mean().sqrt().item())
    assert 2.6 <= fitted_order(steps, errors) <= 3.3


def test_nominal_orders_and_flags():
    assert [get_solver("dpm-solver", order=p).order for p in (1, 2, 3)] == [1, 2, 3]
    assert [get_solver("dpm-solver++", order=p, method=m).order for m in ("singlestep", "multistep")
            for p in (1, 2, 3)] == [1, 2, 3] * 2
    assert not any(get_solver(solver, **options).stochastic for solver, options in ALL_OPTIONS
                   if not options.get("sde"))
    assert all(get_solver("dpm-solver++", **options).stochastic for options in SDE_OPTIONS)
    assert not any(get_solver(solver, **options).adaptive for solver, options in ALL_OPTIONS)
    assert get_solver("dpm-solver", method="adaptive").adaptive


@pytest.mark.parametrize("solver, options", FIRST_ORDER, ids=[case_id(case) for case in FIRST_ORDER])
def test_first_order_options_are_ddim(gmm_image, solver, options):
    # DPM-Solver-1: x - sigma_t (e^h - 1) eps = x - (sigma - sigma_t) eps, Euler's step (plugins/dpm_solver.py)
    euler = bench.sample(gmm_image, "euler", nfe=12, n=8, dtype=torch.float64, warmup=False)
    out = bench.sample(gmm_image, solver, nfe=12, n=8, dtype=torch.float64, warmup=False, **options)
    torch.testing.assert_close(out.x, euler.x, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------------------- NFE

@pytest.mark.parametrize("solver, options", ALL_OPTIONS, ids=[case_id(case) for case in ALL_OPTIONS])
def test_counted_nfe_is_the_declared_nfe_for_every_budget(gmm2d, solver, options):
    instance = get_solver(solver, **options)
    for budget in range(instance.min_nfe, 31):
        out = bench.sample(gmm2d, solver, nfe=budget, n=4, warmup=False, **options)
        assert torch.isfinite(out.x).all(), f"{case_id((solver, options))}: non-finite samples at NFE {budget}"
        # every option set here meets each budget exactly: one call per step, or DPM-Solver-fast's allocation
        assert out.nfe == out.plan.nfe == budget, (budget, out.nfe, out.plan)
        if instance.method == "multistep" or options.get("intermediates") == "grid":
            assert instance.nfe_for_steps(out.plan.steps) == budget
        else:  # singlestep: K steps spend 3K - 4 .. 3K - 2 calls (order 3); nfe_for_steps is the most
            assert budget <= instance.nfe_for_steps(out.plan.steps) and sum(out.plan.orders) == budget


@pytest.mark.parametrize("solver", ["dpm-solver", "dpm-solver++"])
@pytest.mark.parametrize("schedule", ["karras", "logsnr", "time-uniform", "time-quadratic"])
@pytest.mark.parametrize("intermediates", ["lambda", "grid"])
def test_singlestep_order_three_is_finite_at_every_budget(gmm_image, solver, schedule, intermediates):
    # diffusers' singlestep order 3 gave NaN at 3n - 1 steps: its last step was second order, to sigma = 0
    for budget in range(3, 31):
        out = bench.sample(gmm_image, solver, nfe=budget, n=2, schedule=schedule, warmup=False, method="singlestep",
                           order=3, intermediates=intermediates)
        assert torch.isfinite(out.x).all(), (budget, out.plan)
        assert out.nfe == budget and out.plan.orders[-1] == 1


def test_singlestep_orders():
    assert [singlestep_orders(nfe, 3) for nfe in range(1, 12)] == [
        [1], [1, 1], [2, 1], [3, 1], [3, 1, 1], [3, 2, 1], [3, 3, 1], [3, 3, 1, 1], [3, 3, 2, 1], [3, 3, 3, 1],
        [3, 3, 3, 1, 1]]
    assert [singlestep_orders(nfe, 2) for nfe in range(1, 8)] == [
        [1], [1, 1], [2, 1], [2, 1, 1], [2, 2, 1], [2, 2, 1, 1], [2, 2, 2, 1]]
    assert singlestep_orders(5, 1) == [1] * 5
    for order in (1, 2, 3):
        for nfe in range(1, 61):
            orders = singlestep_orders(nfe, order)
            assert sum(orders) == nfe and orders[-1] == 1 and max(orders) <= order
            assert len(orders) <= nfe // order + 2  # as many full-order steps as fit
    # the plan: DPM-Solver-fast spends the budget exactly (the base class would stop at the largest 3K - 2)
    plan = get_solver("dpm-solver").plan(11)
    assert (plan.steps, plan.nfe, plan.orders) == (5, 11, (3, 3, 3, 1, 1))
    plan = get_solver("dpm-solver", intermediates="grid").plan(11)
    assert (plan.steps, plan.nfe, plan.orders) == (11, 11, (3, 3, 3, 1, 1))
    plan = get_solver("dpm-solver++", order=3).plan(6)
    assert (plan.steps, plan.nfe, plan.orders) == (6, 6, (1, 2, 3, 3, 2, 1))
    assert get_solver("dpm-solver++", order=3, lower_order_final=False).plan(6).orders == (1, 2, 3, 3, 3, 1)


def test_singlestep_intermediate_points():
    sigmas = torch.tensor([8.0, 1.0, 0.5, 0.0], dtype=torch.float64)
    # lambda: one sigma per step, fixed fractions of each step in lambda
    steps = singlestep_intervals(sigmas, [3, 2, 1], "lambda")
    assert [(s.order, s.sigma, s.sigma_next) for s in steps] == [(3, 8.0, 1.0), (2, 1.0, 0.5), (1, 0.5, 0.0)]
    assert steps[0].r1 == pytest.approx(1 / 3) and steps[0].r2 == pytest.approx(2 / 3)
    assert steps[1].r1 == 0.5 and steps[1].r2 is None and steps[2].r1 is None
    # grid: one sigma per call, the grid points inside a step are its intermediate points
    grid = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.0], dtype=torch.float64)
    steps = singlestep_intervals(grid, [3, 1, 1], "grid")
    assert [(s.order, s.sigma, s.sigma_next) for s in steps] == [(3, 8.0, 1.0), (1, 1.0, 0.5), (1, 0.5, 0.0)]
    assert steps[0].r1 == pytest.approx(1 / 3) and steps[0].r2 == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="need 6 sigmas; got 4"):
        singlestep_intervals(sigmas, [3, 1, 1], "grid")


# -------------------------------------------------------------------------------------------------- adaptive

@pytest.mark.parametrize("order", [2, 3])
def test_adaptive_error_follows_its_tolerance(references, order):
    model, reference = references["gmm2d"]
    previous_nfe, errors = 0, []
    for tolerance in (1e-2, 1e-3, 1e-4):
        out = bench.sample(model, "dpm-solver", n=len(reference), dtype="float64", method="adaptive", order=order,
                           rtol=tolerance, atol=tolerance)
        errors.append((out.x - reference).pow(2).mean().sqrt().item())
        assert out.nfe > previous_nfe and out.plan.steps == 0  # tighter tolerance, more calls: NFE is an output
        previous_nfe = out.nfe
        # the controller bounds the local error of the lower-order solution by the tolerance; the global error of
        # the higher-order one is well inside it (measured 0.02 to 0.24 of the tolerance)
        assert errors[-1] < tolerance
    assert errors[0] > errors[1] > errors[2]


def test_adaptive_takes_tolerances_not_budgets(gmm2d, tmp_path):
    with pytest.raises(BenchError, match=r"'dpm-solver'.*is adaptive: give it rtol/atol"):
        bench.sample(gmm2d, "dpm-solver", nfe=10, n=4, method="adaptive")
    out = bench.sample(gmm2d, "dpm-solver", n=4, method="adaptive")  # the original code's defaults
    assert get_solver("dpm-solver", method="adaptive").options()["rtol"] == 0.05 and out.nfe > 0
    text = """
    name = "adaptive-dpm"
    n = 8
    [[models]]
    name = "gmm2d"
    [[solvers]]
    name = "dpm-solver"
    method = "adaptive"
    tolerances = [1e-2, 1e-3]
    [[solvers]]
    name = "dpm-solver"
    nfe = [6]
    """
    suite = load_suite(write_suite(tmp_path, text))
    assert [(cell.nfe, cell.tolerance, cell.schedule.name) for cell in suite.cells] == [
        (None, 1e-2, "adaptive"), (None, 1e-3, "adaptive"), (6, None, "karras")]


# ------------------------------------------------------------------------------------------------------- SDE

@pytest.mark.parametrize("options", SDE_OPTIONS, ids=[case_id(("", options)) for options in SDE_OPTIONS])
def test_sde_noise_is_per_sample(gmm2d, options):
    whole = bench.sample(gmm2d, "dpm-solver++", nfe=10, n=12, seed=3, **options)
    split = bench.sample(gmm2d, "dpm-solver++", nfe=10, n=12, seed=3, batch_size=5, **options)
    assert_same_samples(whole, split, gmm2d)
    assert whole.stochastic
    assert not torch.equal(whole.x, bench.sample(gmm2d, "dpm-solver++", nfe=10, n=12, seed=4, **options).x)
    # and it is not the ODE's sample from the same x_T
    ode = bench.sample(gmm2d, "dpm-solver++", nfe=10, n=12, seed=3)
    assert (whole.x - ode.x).abs().max() > 1e-2


@pytest.mark.parametrize("options", [dict(sde=True), dict(sde=True, solver_type="heun")],
                         ids=["midpoint", "heun"])
def test_sde_samples_the_data_distribution(gmm2d, options):
    # with many steps SDE-DPM-Solver++(2M) samples follow the data, whatever their trajectories
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    from plugins.metrics import _true_moments

    out = bench.sample(gmm2d, "dpm-solver++", nfe=200, n=4096, seed=1, dtype=torch.float64, warmup=False, **options)
    mean, covariance = _true_moments(gmm2d, None)
    distance = fid_statistics_to_metric(fid_features_to_statistics(out.x), {"mu": mean.numpy(),
                                                                            "sigma": covariance.numpy()}, False)
    # sample-size noise of the Frechet distance at n = 4096 in 2-D is ~3e-4; a wrong noise scale shows at > 1e-2
    assert distance["frechet_inception_distance"] < 2e-3


def test_sde_without_noise_source_is_an_error(gmm2d):
    solver = get_solver("dpm-solver++", sde=True)
    sigmas = torch.tensor([80.0, 1.0, 0.0], dtype=torch.float64)
    with pytest.raises(ValueError, match="needs a noise source"):
        solver.sample(lambda x, sigma: x, torch.zeros(2, 2), sigmas, solver.plan(2))


# --------------------------------------------------------------------------------------------------- options

@pytest.mark.parametrize("solver, options, message", [
    ("dpm-solver", dict(order=4), r"order must be 1, 2 or 3; got 4"),
    ("dpm-solver", dict(method="fast"), r"method must be one of 'singlestep', 'multistep', 'adaptive'; got 'fast'"),
    ("dpm-solver", dict(method="adaptive", order=1), r"needs order 2 \(DPM-Solver-12\) or 3"),
    ("dpm-solver", dict(rtol=0.01), r"rtol/atol apply to method='adaptive' only"),
    ("dpm-solver", dict(method="adaptive", rtol=-1.0), r"rtol and atol must be > 0"),
    ("dpm-solver", dict(intermediates="midpoint"), r"intermediates must be one of 'lambda', 'grid'"),
    ("dpm-solver", dict(method="multistep", intermediates="grid"), r"applies to method='singlestep' only"),
    ("dpm-solver", dict(lower_order_final=False), r"lower_order_final applies to method='multistep' only"),
    ("dpm-solver", dict(third_order="taylor"), r"third_order='taylor' applies to method='multistep' with order=3"),
    ("dpm-solver++", dict(method="adaptive"), r"method must be one of 'singlestep', 'multistep'; got 'adaptive'"),
    ("dpm-solver++", dict(solver_type="bh2"), r"solver_type must be one of 'midpoint', 'heun'; got 'bh2'"),
    ("dpm-solver++", dict(method="singlestep", solver_type="heun"), r"applies to method='multistep' only"),
    ("dpm-solver++", dict(sde=True, order=3), r"sde=True supports order 1 or 2"),
    ("dpm-solver++", dict(sde=True, method="singlestep"), r"use method='multistep'"),
    ("dpm-solver++", dict(third_order="exact", order=3), r"third_order must be one of 'original', 'taylor'"),
    ("dpm-solver++", dict(order=True), r"order must be 1, 2 or 3; got True"),
])
def test_bad_options_say_what_is_allowed(gmm2d, solver, options, message):
    with pytest.raises(BenchError, match=rf"solver '{re.escape(solver)}': .*{message}"):
        bench.sample(gmm2d, solver, nfe=10, n=2, **options)


def test_solver_instance_is_reusable(gmm2d):
    # state lives in sample's locals: the same instance gives the same samples twice
    solver = get_solver("dpm-solver++", order=3)
    first = bench.sample(gmm2d, solver, nfe=8, n=16, warmup=False).x
    assert torch.equal(first, bench.sample(gmm2d, solver, nfe=8, n=16, warmup=False).x)
    assert math.isfinite(first.abs().max().item())
