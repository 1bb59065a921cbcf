"""UniPC, DEIS, PNDM and iPNDM: empirical order of convergence against the exact flow, NFE, and their algebra.

Order. The slope of log(trajectory error) against log(steps), fitted over 64, 128, 256 and 512 steps in float64
against a reference solved to 1e-10 (bench.measure.reference), as tests/test_solvers.py does; errors stay between 1e-3 and
1e-8, well above the reference's accuracy. Below 64 steps the higher-order methods are visibly pre-asymptotic here
(DEIS-3 fits 2.5 over 16..128; first-order steps on gmm-image send a sample to another mode at 32 steps).
gmm2d runs on both schedules; gmm-image on karras by default and on logsnr, where the asymptotic regime starts
later (UniPC-2 fits 2.7 over 64..512), with 128..1024 steps under the `slow` mark.

Tolerance: nominal +-0.3. Measured over these ranges: UniPC-p p + 1 (-0.15..+0.05; UniPC-3 3.85-4.05), UniP-p p
(-0.15..+0.19), DEIS-p p (-0.26..-0.05: these variable-step multistep methods approach their order from below, the
next term of the error still ~10 % of the leading one at 64 steps). A lost order is off by more: UniPC-3 without
its corrector fits 2.85-3.19 against 3.85-4.13 with it.

Fixed-coefficient methods. PNDM (f-pndm, s-pndm, plms) and iPNDM weight the estimates with Adams-Bashforth's
equal-step coefficients and multiply by the current step in sigma, so on karras and logsnr grids (not uniform in
sigma) each step is exact only for eps constant over it: they converge at order 2 whatever their nominal order
(plugins/pndm.py). Expected there: 2, -0.3 / +0.5, since their O(h^3) term fades slowly: measured 1.81-2.31, and
iPNDM-3 2.06-2.46 (its local slopes fall from 2.6 to 2.2 between 128 and 1024 steps on gmm-image / logsnr); a
method that kept its nominal order would fit 3 or 4. On a grid uniform in sigma iPNDM-p is exactly rhoAB-DEIS-p,
the variable-step method, which reaches order p on karras: tested as an identity.
"""

import math

import numpy as np
import pytest
import torch

import bench
from bench.tools.convergence import fitted_order, reference_for, trajectory_errors
from bench.core.denoiser import CountingDenoiser
from bench.errors import BenchError
from bench.core.sampling import get_solver, make_sigmas
from bench.core.solver import Plan
from plugins.deis import METHODS as DEIS_METHODS
from plugins.deis import TIME_VARIABLES, deis_coefficients
from plugins.pndm import METHODS as PNDM_METHODS
from plugins.unipc import VARIANTS

STEPS = [64, 128, 256, 512]
CASES = {"gmm2d": 256, "gmm-image": 32}  # model -> samples (gmm-image is 768-dimensional)
LOW, HIGH = 0.3, 0.3

FIXED_HIGH = 0.5  # fixed-coefficient methods: see the module docstring

# (solver, options, expected order on karras / logsnr grids, tolerance above it); first-order options are tested as
# identities below
ORDER_CASES = [
    *[("unipc", dict(order=p, variant=variant, corrector=corrector), p + corrector, HIGH)
      for variant in VARIANTS for p in (1, 2, 3) for corrector in (True, False) if (p, corrector) != (1, False)],
    *[("deis", dict(order=p, method=method), p, HIGH) for method in DEIS_METHODS for p in (2, 3)],
    *[("pndm", dict(method=method), 2, FIXED_HIGH) for method in PNDM_METHODS],
    *[("ipndm", dict(order=p), 2, FIXED_HIGH) for p in (2, 3, 4)],
]
FIRST_ORDER = [("unipc", dict(order=1, corrector=False)), *[("deis", dict(order=1, method=m)) for m in DEIS_METHODS],
               ("ipndm", dict(order=1))]
ALL_OPTIONS = [(solver, options) for solver, options, _, _ in ORDER_CASES] + FIRST_ORDER + [
    ("unipc", dict(order=3, lower_order_final=False)), ("unipc", dict(order=2, disable_corrector=[0, 1])),
    ("deis", dict(order=3, lower_order_final=False))]


def case_id(case) -> str:
    solver, options = case[:2]
    return solver + "".join(f",{key}={value}" for key, value in options.items())


@pytest.fixture(scope="module")
def references():
    cache = {}
    for name, n in CASES.items():
        model = bench.load_model(name)
        cache[name] = (model, reference_for(model, n))
    return cache


def check_order(references, model_name, schedule, solver, options, expected, high, steps=STEPS):
    model, reference = references[model_name]
    order = fitted_order(steps, trajectory_errors(model, reference, solver, steps, schedule, **options))
    assert expected - LOW <= order <= expected + high, (
        f"{case_id((solver, options))} on {model_name} ({schedule}): observed order {order:.3f}, expected {expected}")


@pytest.mark.parametrize("model_name, schedule", [("gmm2d", "karras"), ("gmm2d", "logsnr"), ("gmm-image", "karras")])
@pytest.mark.parametrize("solver, options, expected, high", ORDER_CASES, ids=[case_id(case) for case in ORDER_CASES])
def test_empirical_order(references, model_name, schedule, solver, options, expected, high):
    check_order(references, model_name, schedule, solver, options, expected, high)


@pytest.mark.slow
@pytest.mark.parametrize("solver, options, expected, high", ORDER_CASES, ids=[case_id(case) for case in ORDER_CASES])
def test_empirical_order_gmm_image_logsnr(references, solver, options, expected, high):
    check_order(references, "gmm-image", "logsnr", solver, options, expected, high, steps=[128, 256, 512, 1024])


def test_nominal_orders():
    assert [get_solver("unipc", order=p).order for p in (1, 2, 3)] == [2, 3, 4]  # UniC adds one
    assert [get_solver("unipc", order=p, corrector=False).order for p in (1, 2, 3)] == [1, 2, 3]
    assert [get_solver("deis", order=p, method=m).order for m in DEIS_METHODS for p in (1, 2, 3)] == [1, 2, 3] * 3
    assert [get_solver("pndm", method=m).order for m in ("f-pndm", "s-pndm", "plms")] == [4, 2, 4]
    assert [get_solver("ipndm", order=p).order for p in (1, 2, 3, 4)] == [1, 2, 3, 4]
    assert not any(get_solver(solver, **options).stochastic for solver, options in ALL_OPTIONS)


@pytest.mark.parametrize("solver, options", FIRST_ORDER, ids=[case_id(case) for case in FIRST_ORDER])
def test_first_order_options_are_ddim(gmm_image, solver, options):
    # every first-order step here is DDIM, i.e. Euler in sigma (plugins/ddim.py), whose order test_solvers checks
    euler = bench.sample(gmm_image, "euler", nfe=12, n=8, dtype=torch.float64, warmup=False)
    out = bench.sample(gmm_image, solver, nfe=12, n=8, dtype=torch.float64, warmup=False, **options)
    torch.testing.assert_close(out.x, euler.x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_ipndm_is_rhoab_deis_on_a_grid_uniform_in_sigma(gmm2d, order):
    # equal steps make the variable-step Adams-Bashforth coefficients (DEIS rhoab) the fixed ones (iPNDM, PLMS)
    def run(solver, schedule_options, **options):
        return bench.sample(gmm2d, solver, nfe=40, n=64, dtype=torch.float64, schedule_options=schedule_options,
                            warmup=False, **options).x

    uniform = {"rho": 1.0}  # karras with rho = 1: uniform in sigma
    ipndm = run("ipndm", uniform, order=order)
    deis = run("deis", uniform, order=order, method="rhoab", lower_order_final=False)
    torch.testing.assert_close(ipndm, deis, rtol=1e-10, atol=1e-10)
    if order > 1:  # on karras' rho = 7 grid they differ: that difference is iPNDM's order-2 limit there
        assert (run("ipndm", {}, order=order) - run("deis", {}, order=order, method="rhoab",
                                                   lower_order_final=False)).abs().max() > 1e-4


@pytest.mark.parametrize("solver, options", ALL_OPTIONS, ids=[case_id(case) for case in ALL_OPTIONS])
def test_counted_nfe_is_the_declared_nfe_for_every_budget(gmm2d, solver, options):
    instance = get_solver(solver, **options)
    for budget in range(instance.min_nfe, 31):
        out = bench.sample(gmm2d, solver, nfe=budget, n=4, warmup=False, **options)
        assert out.nfe == out.plan.nfe == instance.nfe_for_steps(out.plan.steps) <= budget
        assert instance.nfe_for_steps(out.plan.steps + 1) > budget  # the largest plan within budget
        assert len(out.plan.orders) == out.plan.steps and out.plan.orders[-1] == 1
        assert torch.isfinite(out.x).all(), f"{case_id((solver, options))} at NFE {budget}"


def test_pndm_nfe():
    f_pndm, s_pndm, plms = (get_solver("pndm", method=method) for method in ("f-pndm", "s-pndm", "plms"))
    # F-PNDM: three pseudo Runge-Kutta steps of 4 NFE, then 1 NFE per step, the last (x0 = D) included
    assert [f_pndm.nfe_for_steps(steps) for steps in (1, 2, 3, 4, 5, 50)] == [1, 5, 9, 13, 14, 59]
    # diffusers' PLMS: 51 calls for 50 steps (one pseudo improved Euler step of 2 NFE)
    assert [plms.nfe_for_steps(steps) for steps in (1, 2, 3, 50)] == [1, 3, 4, 51]
    assert [s_pndm.nfe_for_steps(steps) for steps in (1, 2, 50)] == [1, 3, 51]
    assert f_pndm.plan(59) == Plan(steps=50, nfe=59, orders=(4,) * 49 + (1,))
    assert [f_pndm.plan(nfe).steps for nfe in (1, 4, 5, 12, 13, 14)] == [1, 1, 2, 3, 4, 5]
    assert plms.plan(51).steps == 50 and plms.plan(2).steps == 1
    assert plms.plan(8).orders == (2, 2, 3, 4, 4, 4, 1)
    assert [get_solver("ipndm").nfe_for_steps(steps) for steps in (1, 10)] == [1, 10]


def test_step_orders():
    # UniPC: warm-up, and lower order at the end (always, as in UniPC and diffusers' UniPC)
    assert get_solver("unipc", order=3).plan(8).orders == (1, 2, 3, 3, 3, 3, 2, 1)
    assert get_solver("unipc", order=3, lower_order_final=False).plan(8).orders == (1, 2, 3, 3, 3, 3, 3, 1)
    assert get_solver("deis", order=3).plan(5).orders == (1, 2, 3, 2, 1)
    assert get_solver("ipndm", order=4).plan(7).orders == (1, 2, 3, 4, 4, 4, 1)


@pytest.mark.parametrize("solver, options, message", [
    ("unipc", dict(order=4), "order must be 1, 2 or 3; got 4"),
    ("unipc", dict(variant="bh3"), "'bh1', 'bh2'; got 'bh3'"),
    ("unipc", dict(disable_corrector=[-1]), "got [-1]"),
    ("deis", dict(order=0), "order must be 1, 2 or 3; got 0"),
    ("deis", dict(method="tAB"), "'tab', 'rhoab', 'logrho'; got 'tAB'"),
    ("pndm", dict(method="pndm"), "'f-pndm', 's-pndm', 'plms'; got 'pndm'"),
    ("ipndm", dict(order=5), "order must be 1, 2, 3 or 4; got 5"),
])
def test_bad_options_name_the_value_and_the_allowed_ones(solver, options, message):
    with pytest.raises(BenchError) as error:
        get_solver(solver, **options)
    assert message in str(error.value)


def test_options_round_trip():
    solver = get_solver("unipc", order=3, variant="bh1", disable_corrector=[2, 0])
    assert solver.options() == {"order": 3, "variant": "bh1", "corrector": True, "lower_order_final": True,
                                "disable_corrector": (0, 2)}
    assert get_solver("deis", method="logrho").options() == {"order": 2, "method": "logrho",
                                                              "lower_order_final": True}


# ------------------------------------------------------------------------------------------------------ algebra

@pytest.mark.parametrize("method", DEIS_METHODS)
@pytest.mark.parametrize("rho, rho_next, points", [(80.0, 40.0, [80.0, 120.0, 200.0]), (0.01, 0.002, [0.01, 0.03]),
                                                   (2.5, 0.002, [2.5, 80.0, 160.0]), (1.0, 0.8, [1.0, 1.3, 1.7])])
def test_deis_coefficients_are_the_integrals_of_the_lagrange_basis(method, rho, rho_next, points):
    from scipy.integrate import quad

    tau = TIME_VARIABLES[method]
    taus = tau(np.array(points))

    def basis(j):
        return lambda r: math.prod((tau(np.array(r)) - taus[k]) / (taus[j] - taus[k])
                                   for k in range(len(points)) if k != j)

    expected = [-quad(basis(j), rho_next, rho, epsabs=0, epsrel=1e-13, limit=200)[0] for j in range(len(points))]
    np.testing.assert_allclose(deis_coefficients(rho, rho_next, points, tau), expected, rtol=1e-12)
    assert deis_coefficients(rho, rho_next, points[:1], tau) == pytest.approx([rho_next - rho], rel=1e-14)


def test_deis_logrho_coefficients_are_diffusers_closed_form():
    # DEISMultistepScheduler's ind_fn: antiderivatives of the log-rho Lagrange basis, second and third order
    def ind_fn2(t, b, c):
        return t * (-np.log(c) + np.log(t) - 1) / (np.log(b) - np.log(c))

    def ind_fn3(t, b, c, d):
        numerator = t * (np.log(c) * (np.log(d) - np.log(t) + 1) - np.log(d) * np.log(t) + np.log(d)
                         + np.log(t) ** 2 - 2 * np.log(t) + 2)
        return numerator / ((np.log(b) - np.log(c)) * (np.log(b) - np.log(d)))

    t, s0, s1, s2 = 0.3, 0.5, 0.9, 1.6
    expected2 = [ind_fn2(t, s0, s1) - ind_fn2(s0, s0, s1), ind_fn2(t, s1, s0) - ind_fn2(s0, s1, s0)]
    expected3 = [ind_fn3(t, s0, s1, s2) - ind_fn3(s0, s0, s1, s2), ind_fn3(t, s1, s2, s0) - ind_fn3(s0, s1, s2, s0),
                 ind_fn3(t, s2, s0, s1) - ind_fn3(s0, s2, s0, s1)]
    np.testing.assert_allclose(deis_coefficients(s0, t, [s0, s1], np.log), expected2, rtol=1e-13)
    np.testing.assert_allclose(deis_coefficients(s0, t, [s0, s1, s2], np.log), expected3, rtol=1e-13)


def test_unipc_does_not_evaluate_the_corrected_point(gmm2d):
    # the corrector reuses the estimate at the predicted point: the model never sees a corrected point, and the
    # result is D at the last predicted point (the sigma values it is called with are the grid's, once each)
    seen = []

    def denoise(x, sigma):
        seen.append(sigma)
        return gmm2d(x, torch.full((x.shape[0],), sigma, dtype=x.dtype))

    sigmas = make_sigmas("karras", 6, gmm2d)
    x = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 80
    solver = get_solver("unipc", order=3)
    solver.sample(denoise, x, sigmas, solver.plan(6))
    assert seen == sigmas[:-1].tolist()
    corrected = solver.sample(CountingDenoiser(gmm2d), x, sigmas, solver.plan(6))
    predicted_only = get_solver("unipc", order=3, corrector=False).sample(CountingDenoiser(gmm2d), x, sigmas,
                                                                           solver.plan(6))
    assert (corrected - predicted_only).abs().max() > 1e-3  # the corrector does act
