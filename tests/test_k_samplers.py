"""The samplers users know from k-diffusion and ComfyUI (plugins/ancestral.py, plugins/multistep_sde.py,
plugins/lms.py, plugins/er_sde.py, plugins/sa_solver.py, plugins/seeds.py, the presets of plugins/ddim.py and
plugins/dpm_solver_pp.py): their orders, their identities with the solvers they are presets of, and their samples.
Parity with k-diffusion itself: tests/test_k_diffusion_parity.py.

Orders, each as declared:
- deterministic: the slope of log(trajectory error) against log(steps) on gmm2d over sigma in [0.002, 0.5], logsnr
  grid, 96..384 steps (bench.tools.convergence; tests/test_multistep_solvers.py explains the regime). Measured over
  96..768: dpm-2 1.97, dpm++2s-ancestral and dpm++sde with eta = 0 1.97, lms-2/3/4 1.96/2.04/2.05 (the warm-up caps
  3 and 4 at 2), res-multistep 1.97, dpm++3m-sde with eta = 0 2.03, gradient-estimation 0.90 (last slope 0.96),
  er-sde with the ODE's scaler 2.02 (max_stage 2: 1.97), sa-solver with eta = 0 3.09 (its corrector lifts the
  first step: the cap is 3; predictor only: 2.03), seeds-2 / seeds-3 with eta = 0 1.97 / 2.95.
- stochastic: the slope of the exact W2 distance between the output's law and the target's, on a Gaussian
  (bench.tools.weak_order). Measured over 32..512 steps, karras: euler-ancestral 0.96, dpm-2-ancestral 2.04,
  dpm++2s-ancestral 1.96, dpm++sde 2.16 (eta = 0.5: 2.00; independent draws: 0.83), dpm++2m-sde heun 2.12,
  dpm++3m-sde 1.92 (eta = 0.5: 1.85, slopes rising to 1.97), er-sde 2.14 (max_stage 2: 2.10, 1: 0.99; the
  reverse-time SDE's scaler f = l^2: 1.75, slopes rising to 1.97), sa-solver 1.66 (slopes rising to 1.98; predictor
  2 and corrector 2: 3.32), seeds-2 1.96 (eta = 0.5: 1.98), seeds-3 1.65 (slopes rising to 1.91), euler-maruyama
  1.04 (for reference).
"""

import math
import re

import pytest
import torch

import bench
from bench.core.sampling import get_solver
from bench.errors import BenchError
from bench.measure.distances import Statistics, feature_statistics, frechet_distance
from bench.tools.convergence import SigmaRange, fitted_order, reference_for, trajectory_errors
from bench.tools.weak_order import gaussian_data, output_law, weak_errors
from helpers import assert_same_samples
from plugins.lms import lagrange_integrals
from plugins.metrics import _true_moments

DETERMINISTIC = [("dpm-2", {}, 2), ("dpm++2s-ancestral", {"eta": 0.0}, 2), ("dpm++sde", {"eta": 0.0}, 2),
                 ("lms", {"order": 2}, 2), ("lms", {}, 2), ("res-multistep", {}, 2), ("dpm++3m-sde", {"eta": 0.0}, 2),
                 ("gradient-estimation", {}, 1), ("er-sde", {"noise_scaler": "ode"}, 2),
                 ("er-sde", {"noise_scaler": "ode", "max_stage": 2}, 2), ("sa-solver", {"eta": 0.0}, 3),
                 ("sa-solver", {"eta": 0.0, "corrector_order": 0}, 2), ("seeds-2", {"eta": 0.0}, 2),
                 ("seeds-3", {"eta": 0.0}, 3)]
STOCHASTIC = [("euler-ancestral", {}, 1), ("dpm-2-ancestral", {}, 2), ("dpm++2s-ancestral", {}, 2),
              ("dpm++sde", {}, 2), ("dpm++sde", {"eta": 0.5}, 2), ("dpm++sde", {"brownian": False}, 1),
              ("dpm++2m-sde", {}, 2), ("dpm++2m-sde", {"solver_type": "heun"}, 2), ("dpm++3m-sde", {}, 2),
              ("er-sde", {}, 2), ("er-sde", {"max_stage": 1}, 1), ("er-sde", {"noise_scaler": "sde"}, 2),
              ("sa-solver", {}, 2), ("seeds-2", {}, 2), ("seeds-3", {}, 2)]
TWO_CALLS = ["dpm-2", "dpm-2-ancestral", "dpm++2s-ancestral", "dpm++sde", "seeds-2"]


ONE_THREAD = True  # conftest.py: torch on one thread for this module


def case_id(case) -> str:
    solver, options = case[:2]
    return solver + "".join(f",{key}={value}" for key, value in options.items())


@pytest.fixture(scope="module")
def asymptotic():
    model = SigmaRange(bench.load_model("gmm2d"), 0.002, 0.5)
    return model, reference_for(model, 128, tolerance=1e-12)


@pytest.mark.parametrize("solver, options, order", DETERMINISTIC, ids=[case_id(case) for case in DETERMINISTIC])
def test_deterministic_order(asymptotic, solver, options, order):
    instance = get_solver(solver, **options)
    assert instance.order == order and not instance.stochastic
    model, reference = asymptotic
    steps = [96, 192, 384]
    slope = fitted_order(steps, trajectory_errors(model, reference, solver, steps, "logsnr", **options))
    assert abs(slope - order) <= 0.15, f"{case_id((solver, options))}: fitted {slope:.3f}, order {order}"


@pytest.mark.parametrize("solver, options, order", [
    pytest.param(*case, marks=pytest.mark.slow) if case[0] == "seeds-3" else case for case in STOCHASTIC],
    ids=[case_id(case) for case in STOCHASTIC])  # seeds-3: 7 s
def test_weak_order(solver, options, order):
    instance = get_solver(solver, **options)
    assert instance.order == order and instance.stochastic
    # er-sde with f = l^2, sa-solver and seeds-3 are pre-asymptotic below 128 steps (slopes from 32 to 512: 1.67,
    # 1.53, 1.89, 1.97; 1.12, 1.55, 1.91, 1.98; 1.21, 1.62, 1.81, 1.91)
    late = options.get("noise_scaler") == "sde" or solver in ("sa-solver", "seeds-3")
    steps = [128, 256, 512] if late else [64, 128, 256]
    slope = fitted_order(steps, weak_errors(gaussian_data(), solver, steps, **options))
    assert abs(slope - order) <= 0.25, f"{case_id((solver, options))}: fitted weak order {slope:.3f}, order {order}"


def test_the_weak_order_tool_computes_the_output_law():
    # the law read off the affine map is the law of the samples: 20,000 draws through the sampler itself agree
    model, solver, n = gaussian_data(), get_solver("dpm++sde"), 20_000
    exact = output_law(model, solver, 6)
    sigmas = bench.core.sampling.make_sigmas("karras", 6, model)
    generator = torch.Generator().manual_seed(0)
    x_T = model.mu + torch.randn(n, 2, dtype=torch.float64, generator=generator) @ torch.linalg.cholesky(
        model.noisy_covariance(sigmas[0].item())).T
    draws = {}
    samples = solver.sample(lambda x, sigma: model(x, torch.full((n,), sigma, dtype=torch.float64)), x_T, sigmas,
                            solver.plan(11), lambda k: draws.setdefault(k, torch.randn(n, 2, dtype=torch.float64,
                                                                                        generator=generator)))
    empirical = feature_statistics(samples)
    assert len(draws) == 10  # two a step, none on the last
    # sampling noise of the moments at n = 20,000: ~1e-2 of the scale; a missing or doubled draw is off by far more
    torch.testing.assert_close(empirical.mean, exact.mean, rtol=0, atol=0.02)
    torch.testing.assert_close(empirical.covariance, exact.covariance, rtol=0.05, atol=0.005)
    # and a fine run reaches the target
    assert frechet_distance(output_law(model, solver, 400), model.target()) < 1e-6


@pytest.mark.parametrize("solver, options", [case[:2] for case in STOCHASTIC if case[0] != "dpm++2m-sde"],
                         ids=[case_id(case) for case in STOCHASTIC if case[0] != "dpm++2m-sde"])
def test_stochastic_samplers_sample_gmm2d(gmm2d, solver, options):
    # the nonlinear model, sampled: 2-D Frechet distance between n = 4096 samples and the true moments, whose
    # sampling noise is ~3e-4; a wrong noise scale or drift shows at > 1e-2
    instance = get_solver(solver, **options)
    out = bench.sample(gmm2d, solver, nfe=instance.nfe_for_steps(100), n=4096, seed=2, dtype=torch.float64,
                       warmup=False, **options)
    mean, covariance = _true_moments(gmm2d, None)
    assert frechet_distance(feature_statistics(out.x), Statistics(mean, covariance)) < 3e-3
    assert out.stochastic


@pytest.mark.parametrize("solver", ["euler-ancestral", "dpm-2-ancestral", "dpm++2s-ancestral", "dpm++sde",
                                    "dpm++3m-sde", "er-sde", "sa-solver", "seeds-2", "seeds-3"])
def test_noise_is_per_sample(gmm2d, solver):
    whole = bench.sample(gmm2d, solver, nfe=9, n=10, seed=5)
    split = bench.sample(gmm2d, solver, nfe=9, n=10, seed=5, batch_size=3)
    assert_same_samples(whole, split, gmm2d)
    assert not torch.equal(whole.x, bench.sample(gmm2d, solver, nfe=9, n=10, seed=6).x)


@pytest.mark.parametrize("solver", TWO_CALLS)
def test_two_call_samplers_spend_their_budget(gmm2d, solver):
    instance = get_solver(solver)
    for budget in range(1, 24):
        out = bench.sample(gmm2d, solver, nfe=budget, n=4, warmup=False)
        assert out.nfe == out.plan.nfe == 2 * out.plan.steps - 1 <= budget < instance.nfe_for_steps(out.plan.steps + 1)


# ------------------------------------------------------------------------------- the presets are their solvers

@pytest.mark.parametrize("preset, options, solver, solver_options", [
    ("euler-ancestral", {}, "ddim", {"eta": 1.0}),
    ("euler-ancestral", {"eta": 0.0}, "euler", {}),
    ("dpm++2m", {}, "dpm-solver++", {}),
    ("dpm++2m-sde", {"solver_type": "heun"}, "dpm-solver++", {"sde": True, "solver_type": "heun"}),
    ("res-multistep", {}, "dpm-solver++", {"solver_type": "heun"}),
    ("dpm-2-ancestral", {"eta": 0.0}, "dpm-2", {}),
    ("gradient-estimation", {"gamma": 1.0}, "euler", {}),
    ("er-sde", {"noise_scaler": "sde", "max_stage": 1}, "euler-ancestral", {}),  # f = l^2: DDPM's variance
    ("er-sde", {"noise_scaler": "ode", "max_stage": 1}, "euler", {}),
])
def test_presets_are_the_solvers_they_name(gmm_image, preset, options, solver, solver_options):
    ours = bench.sample(gmm_image, preset, nfe=11, n=8, seed=1, dtype=torch.float64, **options)
    theirs = bench.sample(gmm_image, solver, nfe=11, n=8, seed=1, dtype=torch.float64, **solver_options)
    torch.testing.assert_close(ours.x, theirs.x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("solver, options, message", [
    ("dpm++2m-sde", {"sde": False}, r"sde must be one of True; got False"),
    ("res-multistep", {"solver_type": "midpoint"}, r"solver_type must be one of 'heun'; got 'midpoint'"),
    ("dpm++2m", {"order": 3}, r"order must be one of 2; got 3"),
    ("euler-ancestral", {"eta": -1.0}, r"eta must be >= 0"),
    ("dpm++sde", {"r": 1.0}, r"r must be in \(0, 1\); got 1.0"),
    ("lms", {"order": 7}, r"order must be 1, 2, 3, 4, 5 or 6; got 7"),
    ("dpm++3m-sde", {"s_noise": -0.5}, r"s_noise must be >= 0"),
    ("gradient-estimation", {"gamma": 0.0}, r"gamma must be > 0"),
])
def test_bad_options_say_what_is_allowed(gmm2d, solver, options, message):
    with pytest.raises(BenchError, match=rf"solver {re.escape(repr(solver))}: {message}"):
        bench.sample(gmm2d, solver, nfe=10, n=2, **options)


def test_aliases_are_the_names_users_know():
    for alias, name in [("euler_ancestral", "euler-ancestral"), ("dpm_2", "dpm-2"), ("dpm_2_ancestral",
                        "dpm-2-ancestral"), ("dpmpp_2s_ancestral", "dpm++2s-ancestral"), ("dpmpp_sde", "dpm++sde"),
                        ("dpmpp_2m", "dpm++2m"), ("dpmpp_2m_sde", "dpm++2m-sde"), ("dpmpp_3m_sde", "dpm++3m-sde"),
                        ("res_multistep", "res-multistep"), ("gradient_estimation", "gradient-estimation"),
                        ("er_sde", "er-sde"), ("sa_solver", "sa-solver"), ("seeds_2", "seeds-2"),
                        ("seeds_3", "seeds-3")]:
        assert get_solver(alias).name == name


# ------------------------------------------------------------------------------------------- update rules

def test_gradient_estimation_is_comfyuis_loop(gmm_image):
    # ComfyUI's sample_gradient_estimation written out, with the harness's last step x0 = D(x; sigma_last)
    out = bench.sample(gmm_image, "gradient-estimation", nfe=9, n=6, seed=0, dtype=torch.float64)
    x, sigmas, old_d = out.x_T.clone(), out.sigmas, None
    for i in range(len(sigmas) - 1):
        denoised = gmm_image(x, torch.full((6,), sigmas[i].item(), dtype=torch.float64))
        if sigmas[i + 1] == 0:
            x = denoised
            break
        d = (x - denoised) / sigmas[i]
        dt = sigmas[i + 1] - sigmas[i]
        x = x + d * dt if old_d is None else x + (2.0 * d + (1 - 2.0) * old_d) * dt
        old_d = d
    torch.testing.assert_close(out.x, x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("points", [[1.0], [2.0, 3.5], [0.3, 0.9, 2.0], [10.0, 14.0, 20.0, 29.0]])
def test_lms_weights_integrate_the_lagrange_basis(points):
    # the weights integrate every polynomial of degree < len(points) exactly: sum_j c_j p(s_j) = integral of p
    start, end = points[0], points[0] * 0.6
    weights = lagrange_integrals(points, start, end)
    for degree in range(len(points)):
        exact = (end ** (degree + 1) - start ** (degree + 1)) / (degree + 1)
        assert math.isclose(sum(w * s**degree for w, s in zip(weights, points)), exact, rel_tol=1e-12, abs_tol=1e-12)


@pytest.mark.parametrize("max_stage", [1, 2, 3])
def test_er_sde_is_comfyuis_loop(gmm_image, max_stage):
    # ComfyUI's sample_er_sde in VE (alpha = 1) written out, its integrals by scipy's adaptive quadrature in place of
    # its 200-point Riemann sums, and the harness's last step x0 = D(x; sigma_last)
    from scipy.integrate import quad

    def scaler(l):
        return l * (math.exp(l**0.3) + 10.0)

    out = bench.sample(gmm_image, "er-sde", nfe=9, n=6, seed=0, dtype=torch.float64, max_stage=max_stage)
    noise = bench.core.noise.NoiseStream(0, torch.arange(6), gmm_image.shape, torch.float64, "cpu")
    x, sigmas, old_denoised, old_denoised_d = out.x_T.clone(), out.sigmas.tolist(), None, None
    for i in range(len(sigmas) - 1):
        denoised = gmm_image(x, torch.full((6,), sigmas[i], dtype=torch.float64))
        if sigmas[i + 1] == 0:
            x = denoised
            break
        stage, s, t = min(max_stage, i + 1), sigmas[i], sigmas[i + 1]
        r = scaler(t) / scaler(s)
        x = r * x + (1 - r) * denoised
        if stage >= 2:
            dt = t - s
            integral = quad(lambda l: 1 / scaler(l), t, s, epsabs=0, epsrel=1e-13)[0]
            denoised_d = (denoised - old_denoised) / (s - sigmas[i - 1])
            x = x + (dt + integral * scaler(t)) * denoised_d
            if stage >= 3:
                integral_u = quad(lambda l: (l - s) / scaler(l), t, s, epsabs=0, epsrel=1e-13)[0]
                denoised_u = (denoised_d - old_denoised_d) / ((s - sigmas[i - 2]) / 2)
                x = x + (dt**2 / 2 + integral_u * scaler(t)) * denoised_u
            old_denoised_d = denoised_d
        x = x + noise(i) * math.sqrt(t**2 - s**2 * r**2)
        old_denoised = denoised
    torch.testing.assert_close(out.x, x, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("options", [{}, {"eta": 0.0}, {"predictor_order": 2, "corrector_order": 1},
                                     {"tau_sigma_min": 0.5, "tau_sigma_max": 20.0}])
def test_sa_solver_is_comfyuis_loop(gmm_image, options):
    # ComfyUI's sample_sa_solver (predictor-corrector, no pece) in VE written out, its Adams weights by scipy's
    # adaptive quadrature of the exponentially weighted Lagrange basis in place of its closed forms
    from scipy.integrate import quad

    def adams(points, start, end, tau):
        rate = 1 + tau**2

        def basis(j, l):
            return math.prod((l - other) / (points[j] - other) for k, other in enumerate(points) if k != j)

        return [quad(lambda l: rate * math.exp(-rate * (end - l)) * basis(j, l), start, end, epsabs=0,
                     epsrel=1e-13)[0] for j in range(len(points))]

    solver = get_solver("sa-solver", **options)
    config = solver.config
    out = bench.sample(gmm_image, solver, nfe=10, n=6, seed=0, dtype=torch.float64)
    noise = bench.core.noise.NoiseStream(0, torch.arange(6), gmm_image.shape, torch.float64, "cpu")
    sigmas = out.sigmas.tolist()
    lambdas = [-math.log(s) if s > 0 else math.inf for s in sigmas]
    high = config.tau_sigma_max or math.inf
    tau_of = [config.eta if config.tau_sigma_min <= s <= high else 0.0 for s in sigmas]
    x_pred, x, history, h, tau, noise_term = out.x_T.clone(), None, [], 0.0, 0.0, None
    for i in range(len(sigmas) - 1):
        denoised = gmm_image(x_pred, torch.full((6,), sigmas[i], dtype=torch.float64))
        history = (history + [denoised])[-max(config.predictor_order, config.corrector_order):]
        if sigmas[i + 1] == 0:
            x_pred = denoised
            break
        corrector = 0 if i == 0 else min(config.corrector_order, len(history), len(sigmas) - 1 - i)
        if corrector:
            b = adams(lambdas[i - corrector + 1:i + 1], lambdas[i - 1], lambdas[i], tau)
            x = sigmas[i] / sigmas[i - 1] * math.exp(-tau**2 * h) * x + sum(
                w * d for w, d in zip(b, history[-corrector:]))
            if noise_term is not None:
                x = x + noise_term
        else:
            x = x_pred
        predictor = min(config.predictor_order, len(history), len(sigmas) - 2 - i)
        tau = tau_of[i + 1]
        b = adams(lambdas[i - predictor + 1:i + 1], lambdas[i], lambdas[i + 1], tau)
        h = lambdas[i + 1] - lambdas[i]
        x_pred = sigmas[i + 1] / sigmas[i] * math.exp(-tau**2 * h) * x + sum(
            w * d for w, d in zip(b, history[-predictor:]))
        noise_term = None
        if tau > 0:
            noise_term = noise(i) * sigmas[i + 1] * math.sqrt(-math.expm1(-2 * tau**2 * h))
            x_pred = x_pred + noise_term
    torch.testing.assert_close(out.x, x_pred, rtol=1e-10, atol=1e-10)


def test_seeds_3_spends_three_calls_a_step(gmm2d):
    for budget in range(1, 24):
        out = bench.sample(gmm2d, "seeds-3", nfe=budget, n=4, warmup=False)
        assert out.nfe == out.plan.nfe == 3 * out.plan.steps - 2 <= budget < 3 * out.plan.steps + 1


@pytest.mark.parametrize("solver, options", [("seeds-2", {}), ("seeds-2", {"eta": 0.5, "s_noise": 0.8}),
                                             ("seeds-3", {}), ("seeds-3", {"eta": 0.0})])
def test_seeds_is_comfyuis_loop(gmm_image, solver, options):
    # ComfyUI's sample_seeds_2 and sample_seeds_3 written out (its defaults r = 1/2 and r_1, r_2 = 1/3, 2/3), handed
    # our draws in the order it asks for them
    out = bench.sample(gmm_image, solver, nfe=13, n=6, seed=0, dtype=torch.float64, **options)
    noise = bench.core.noise.NoiseStream(0, torch.arange(6), gmm_image.shape, torch.float64, "cpu")
    eta, s_noise = options.get("eta", 1.0), options.get("s_noise", 1.0)
    x, sigmas, draw = out.x_T.clone(), out.sigmas.tolist(), iter(range(10**6))

    def model(x, sigma):
        return gmm_image(x, torch.full((6,), sigma, dtype=torch.float64))

    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = denoised
            break
        h = math.log(sigmas[i] / sigmas[i + 1])
        h_eta = h * (eta + 1)
        if solver == "seeds-2":
            r = 0.5
            sigma_s = sigmas[i] * math.exp(-r * h)
            coeff_1, coeff_2 = math.expm1(-r * h_eta), math.expm1(-h_eta)
            noise_1, noise_2 = noise(next(draw)), noise(next(draw))
            noise_coeff_1 = math.sqrt(-math.expm1(-2 * r * h * eta))
            noise_coeff_2 = math.sqrt(math.expm1(-2 * r * h * eta) - math.expm1(-2 * h * eta))
            x_2 = (coeff_1 + 1) * x - coeff_1 * denoised + sigma_s * noise_coeff_1 * noise_1 * s_noise
            denoised_d = (1 - 1 / (2 * r)) * denoised + 1 / (2 * r) * model(x_2, sigma_s)
            x = ((coeff_2 + 1) * x - coeff_2 * denoised_d
                 + sigmas[i + 1] * (noise_coeff_2 * noise_1 + noise_coeff_1 * noise_2) * s_noise)
        else:
            r_1, r_2 = 1 / 3, 2 / 3
            sigma_1, sigma_2 = sigmas[i] * math.exp(-r_1 * h), sigmas[i] * math.exp(-r_2 * h)
            coeff_1, coeff_2, coeff_3 = math.expm1(-r_1 * h_eta), math.expm1(-r_2 * h_eta), math.expm1(-h_eta)
            noises = [noise(next(draw)) for _ in range(3)] if eta > 0 else [0.0] * 3
            noise_coeff_1 = math.sqrt(-math.expm1(-2 * r_1 * h * eta))
            noise_coeff_2 = math.sqrt(math.expm1(-2 * r_1 * h * eta) - math.expm1(-2 * r_2 * h * eta))
            noise_coeff_3 = math.sqrt(math.expm1(-2 * r_2 * h * eta) - math.expm1(-2 * h * eta))
            x_2 = (coeff_1 + 1) * x - coeff_1 * denoised + sigma_1 * noise_coeff_1 * noises[0] * s_noise
            denoised_2 = model(x_2, sigma_1)
            x_3 = ((coeff_2 + 1) * x - coeff_2 * denoised
                   + (r_2 / r_1) * (coeff_2 / (r_2 * h_eta) + 1) * (denoised_2 - denoised)
                   + sigma_2 * (noise_coeff_2 * noises[0] + noise_coeff_1 * noises[1]) * s_noise)
            denoised_3 = model(x_3, sigma_2)
            x = ((coeff_3 + 1) * x - coeff_3 * denoised + (1 / r_2) * (coeff_3 / h_eta + 1) * (denoised_3 - denoised)
                 + sigmas[i + 1] * (noise_coeff_3 * noises[0] + noise_coeff_2 * noises[1] + noise_coeff_1 * noises[2])
                 * s_noise)
    torch.testing.assert_close(out.x, x, rtol=1e-10, atol=1e-10)


def test_a_preset_names_only_options_its_solver_has():
    from bench.core.solver import Fixed, preset
    from plugins.ddim import DDIM

    with pytest.raises(ValueError, match=r"DDIM has no option 'etta' \(its options: eta\)"):
        preset(DDIM, "Typo", "a typo", etta=1.0)
    pinned = preset(DDIM, "Pinned", "eta pinned", eta=Fixed(0.5))
    assert pinned().config.eta == 0.5 and pinned.__doc__ == "eta pinned"
    with pytest.raises(ValueError, match=r"eta must be one of 0.5; got 1.0"):
        pinned(eta=1.0)


def test_res_multistep_is_comfyuis_loop(gmm_image):
    # ComfyUI's res_multistep with eta = 0 written out: phi functions of -h, c2 = (t_prev - t_old) / h with the
    # previous D at t_old, b1 = phi_1 - phi_2 / c2 and b2 = phi_2 / c2
    out = bench.sample(gmm_image, "res_multistep", nfe=11, n=6, seed=0, dtype=torch.float64)
    x, sigmas, old_denoised = out.x_T.clone(), out.sigmas.tolist(), None
    for i in range(len(sigmas) - 1):
        denoised = gmm_image(x, torch.full((6,), sigmas[i], dtype=torch.float64))
        if sigmas[i + 1] == 0 or old_denoised is None:
            x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])  # Euler
        else:
            t, t_old, t_next, t_prev = (-math.log(s) for s in (sigmas[i], sigmas[i], sigmas[i + 1], sigmas[i - 1]))
            h = t_next - t
            c2 = (t_prev - t_old) / h
            phi_1 = math.expm1(-h) / -h
            phi_2 = (phi_1 - 1) / -h
            b1, b2 = phi_1 - phi_2 / c2, phi_2 / c2
            x = math.exp(-h) * x + h * (b1 * denoised + b2 * old_denoised)
        old_denoised = denoised
    torch.testing.assert_close(out.x, x, rtol=1e-12, atol=1e-12)


def test_weak_order_tool_prints_each_solver(capsys):
    from bench.tools.weak_order import main

    main(["euler-ancestral", "dpm++sde,eta=0.5", "--steps", "16", "32"])
    printed = capsys.readouterr().out
    assert "euler-ancestral (stochastic): declared order 1" in printed
    assert "dpm++sde,eta=0.5 (stochastic): declared order 2" in printed and printed.count("fitted") == 2
