"""Schedules: decreasing grids from sigma_max to sigma_min, then 0, with each one's defining spacing."""

import contextlib
import math

import pytest
import torch

from bench.errors import BenchError
from bench.core.sampling import make_sigmas
from bench.core.numerics import vp_sigma, vp_time

SCHEDULES = ["karras", "logsnr", "time-uniform", "time-quadratic"]


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("steps", [1, 2, 7, 50])
def test_grid_shape_and_ends(gmm2d, name, steps):
    sigmas = make_sigmas(name, steps, gmm2d)
    assert sigmas.dtype == torch.float64 and sigmas.shape == (steps + 1,)
    assert sigmas[-1] == 0 and bool((sigmas[1:] < sigmas[:-1]).all())
    assert sigmas[0].item() == pytest.approx(gmm2d.sigma_max, rel=1e-12)
    if steps > 1:
        assert sigmas[-2].item() == pytest.approx(gmm2d.sigma_min, rel=1e-12)


def test_karras_is_uniform_in_sigma_to_one_over_rho(gmm2d):
    for rho in (7.0, 3.0):
        sigmas = make_sigmas("karras", 10, gmm2d, rho=rho)[:-1]
        assert torch.allclose(sigmas.pow(1 / rho).diff(), sigmas.pow(1 / rho).diff()[:1].expand(9), rtol=1e-10)
    # the EDM paper's formula, written out
    i, n, rho = 3, 10, 7.0
    expected = (80 ** (1 / rho) + i / (n - 1) * (0.002 ** (1 / rho) - 80 ** (1 / rho))) ** rho
    assert make_sigmas("karras", n, gmm2d)[i].item() == pytest.approx(expected, rel=1e-12)


def test_logsnr_is_uniform_in_log_sigma(gmm2d):
    log_sigmas = make_sigmas("logsnr", 12, gmm2d)[:-1].log()
    steps = log_sigmas.diff()
    assert torch.allclose(steps, steps[:1].expand_as(steps), rtol=1e-10)


def test_vp_time_round_trip_and_spacings(gmm2d):
    for sigma in (0.002, 0.1, 1.0, 80.0):
        assert vp_sigma(torch.tensor(vp_time(sigma), dtype=torch.float64)).item() == pytest.approx(sigma, rel=1e-10)
    # VP-SDE: alpha_bar(t) = exp(-(beta_d t^2 / 2 + beta_min t)), sigma = sqrt(1 / alpha_bar - 1)
    t = 0.37
    alpha_bar = math.exp(-(0.5 * 19.9 * t**2 + 0.1 * t))
    assert vp_sigma(torch.tensor(t, dtype=torch.float64)).item() == pytest.approx(math.sqrt(1 / alpha_bar - 1))
    times = torch.tensor([vp_time(s) for s in make_sigmas("time-uniform", 9, gmm2d)[:-1].tolist()], dtype=torch.float64)
    assert torch.allclose(times.diff(), times.diff()[:1].expand(8), rtol=1e-8)
    root_times = torch.tensor([vp_time(s) for s in make_sigmas("time-quadratic", 9, gmm2d)[:-1].tolist()], dtype=torch.float64).sqrt()
    assert torch.allclose(root_times.diff(), root_times.diff()[:1].expand(8), rtol=1e-8)


def test_bad_schedule_option_is_reported(gmm2d):
    with pytest.raises(BenchError, match="schedule 'karras'.*rhoo"):
        make_sigmas("karras", 5, gmm2d, rhoo=3)


# ---------------------------------------------------------------------------------------- more continuous schedules

SPANNING = ["exponential", "polyexponential", "kl-optimal", "flow", "normal"]  # normal: log sigma without a grid


@pytest.mark.parametrize("name", SPANNING)
@pytest.mark.parametrize("steps", [1, 2, 7, 50])
def test_more_grids_span_the_model(gmm2d, name, steps):
    sigmas = make_sigmas(name, steps, gmm2d)
    assert sigmas.dtype == torch.float64 and sigmas.shape == (steps + 1,) and sigmas[-1] == 0
    assert sigmas[0].item() == pytest.approx(gmm2d.sigma_max, rel=1e-12)
    if steps > 1:
        assert sigmas[-2].item() == pytest.approx(gmm2d.sigma_min, rel=1e-12)


@pytest.fixture(scope="module")
def k_sampling():
    from peers import k_diffusion_sampling

    return k_diffusion_sampling()


@contextlib.contextmanager
def default_dtype(dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # k-diffusion builds its ramps with the default dtype
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@pytest.mark.parametrize("steps", [1, 2, 10, 37])
def test_karras_exponential_polyexponential_are_k_diffusions(gmm2d, k_sampling, steps):
    low, high = gmm2d.sigma_min, gmm2d.sigma_max
    with default_dtype(torch.float64):
        cases = [
            ("karras", {}, k_sampling.get_sigmas_karras(steps, low, high)),
            ("karras", {"rho": 3.0}, k_sampling.get_sigmas_karras(steps, low, high, rho=3.0)),
            ("karras", {"sigma_min": 0.1}, k_sampling.get_sigmas_karras(steps, 0.1, high)),
            ("exponential", {}, k_sampling.get_sigmas_exponential(steps, low, high)),
            ("polyexponential", {}, k_sampling.get_sigmas_polyexponential(steps, low, high)),
            ("polyexponential", {"rho": 2.0}, k_sampling.get_sigmas_polyexponential(steps, low, high, rho=2.0)),
            ("polyexponential", {"rho": 0.5}, k_sampling.get_sigmas_polyexponential(steps, low, high, rho=0.5)),
        ]
    for name, options, theirs in cases:
        assert theirs.dtype == torch.float64
        torch.testing.assert_close(make_sigmas(name, steps, gmm2d, **options), theirs, rtol=1e-12, atol=0,
                                   msg=f"{name} {options}")


def test_exponential_is_logsnr_and_polyexponential_one(gmm2d):
    assert torch.equal(make_sigmas("exponential", 9, gmm2d), make_sigmas("logsnr", 9, gmm2d))
    torch.testing.assert_close(make_sigmas("polyexponential", 9, gmm2d), make_sigmas("logsnr", 9, gmm2d),
                               rtol=1e-13, atol=0)
    # rho > 1 moves steps to low noise: the middle of the grid sits lower than logsnr's
    assert make_sigmas("polyexponential", 9, gmm2d, rho=2.0)[4] < make_sigmas("logsnr", 9, gmm2d)[4]


def test_karras_sigma_min_option(gmm2d):
    sigmas = make_sigmas("karras", 8, gmm2d, sigma_min=0.5)
    assert sigmas[-2].item() == pytest.approx(0.5, rel=1e-12) and sigmas[0].item() == pytest.approx(80, rel=1e-12)
    for bad in (0.0, -1.0, 80.0, 100.0):
        with pytest.raises(BenchError, match=rf"0 < sigma_min < the model's sigma_max = 80.*sigma_min={bad}"):
            make_sigmas("karras", 8, gmm2d, sigma_min=bad)


def test_kl_optimal_is_uniform_in_arctan_sigma(gmm2d):
    sigmas = make_sigmas("kl-optimal", 10, gmm2d)[:-1]
    angles = sigmas.atan()
    assert torch.allclose(angles.diff(), angles.diff()[:1].expand(9), rtol=1e-10, atol=0)
    i, n = 4, 10  # by hand: tan((1 - i / (n - 1)) atan(80) + i / (n - 1) atan(0.002))
    expected = math.tan((1 - i / (n - 1)) * math.atan(80) + i / (n - 1) * math.atan(0.002))
    assert sigmas[i].item() == pytest.approx(expected, rel=1e-12)
    assert make_sigmas("kl-optimal", 1, gmm2d).tolist() == [pytest.approx(80, rel=1e-12), 0.0]


def test_linear_quadratic_by_hand(gmm2d):
    # N = 10, threshold 0.025: linear for i < L = 5 (s_i = 0.005 i), then s_i = a i^2 + b i + c with
    # excess = L - 0.025 N = 4.75, a = 4.75 / (5 * 25) = 0.038, b = 0.025 / 5 - 2 * 4.75 / 25 = -0.375, c = a L^2 = 0.95
    sigmas = make_sigmas("linear-quadratic", 10, gmm2d)
    noise = {2: 0.01, 4: 0.02, 5: 0.025, 7: 0.038 * 49 - 0.375 * 7 + 0.95, 9: 0.038 * 81 - 0.375 * 9 + 0.95}
    for i, fraction in noise.items():
        assert sigmas[i].item() == pytest.approx(80 * (1 - fraction), rel=1e-12), i
    assert sigmas[0] == 80 and sigmas[-1] == 0
    # the quadratic reaches 1 at i = N exactly, and joins the line with the line's slope 0.005 at i = L
    a, b, c = 0.038, -0.375, 0.95
    assert a * 100 + b * 10 + c == pytest.approx(1, rel=1e-12) and 2 * a * 5 + b == pytest.approx(0.005, abs=1e-12)
    assert make_sigmas("linear-quadratic", 1, gmm2d).tolist() == [80.0, 0.0]
    with pytest.raises(BenchError, match=r"1 <= linear_steps < steps = 10; got 10"):
        make_sigmas("linear-quadratic", 10, gmm2d, linear_steps=10)


@pytest.mark.parametrize("shift", [1.0, 3.0, 0.5])
def test_flow_is_uniform_in_unshifted_flow_time(gmm2d, shift):
    sigmas = make_sigmas("flow", 12, gmm2d, shift=shift)[:-1]
    t = sigmas / (1 + sigmas)
    unshifted = t / (shift - (shift - 1) * t)  # the inverse of t -> shift t / (1 + (shift - 1) t)
    t_max, t_min = 80 / 81, 0.002 / 1.002
    assert t[0].item() == pytest.approx(t_max, rel=1e-12)  # the shift of the first u is the model's t_max
    assert unshifted[-1].item() == pytest.approx(t_min, rel=1e-10)  # and the last u is t_min (diffusers' way)
    assert torch.allclose(unshifted.diff(), unshifted.diff()[:1].expand(11), rtol=1e-10, atol=0)
    with pytest.raises(BenchError, match=r"flow needs shift > 0; got shift=0"):
        make_sigmas("flow", 12, gmm2d, shift=0)


# ---------------------------------------------------------------------------------------------- AYS and user lists

def test_ays_tables_at_ten_steps_are_the_published_ones(gmm2d):
    # the tables as diffusers ships them (its AysSchedules, 3 decimals, the last entry made 0)
    published = {
        "sd1.5": [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.0],
        "sdxl": [14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.0],
    }
    for family, sigmas in published.items():
        assert make_sigmas("ays-table", 10, gmm2d, family=family).tolist() == sigmas
    wide = type("Wide", (), {"sigma_min": 0.002, "sigma_max": 700.0, "name": "wide"})()
    assert make_sigmas("ays-table", 10, wide, family="svd").tolist() == [700.00, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981,
                                                                     0.403, 0.173, 0.034, 0.0]


def test_ays_interpolates_log_linearly(gmm2d):
    table = [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029]
    sigmas = make_sigmas("ays-table", 20, gmm2d, family="sd1.5")  # 21 points over the table's 11: every other is a node
    for k in range(10):
        assert sigmas[2 * k].item() == pytest.approx(table[k], rel=1e-12)
        assert sigmas[2 * k + 1].item() == pytest.approx(math.sqrt(table[k] * table[k + 1]), rel=1e-12)
    assert sigmas[-1] == 0
    assert make_sigmas("ays-table", 5, gmm2d, family="sdxl")[0].item() == pytest.approx(14.615, rel=1e-12)


def test_ays_errors(gmm2d):
    with pytest.raises(BenchError, match=r"needs family = one of 'sd1.5', 'sdxl', 'svd'.*got None"):
        make_sigmas("ays-table", 10, gmm2d)
    with pytest.raises(BenchError, match=r"AYS table for 'svd' spans \[0.002, 700\], outside model 'gmm2d'"):
        make_sigmas("ays-table", 10, gmm2d, family="svd")


def test_user_sigmas(gmm2d):
    assert make_sigmas("sigmas", 3, gmm2d, sigmas=(80, 1.5, 0.002)).tolist() == [80.0, 1.5, 0.002, 0.0]
    cases = [
        (None, r"needs its list"),
        ((10.0, 1.0), r"2 sigmas given for 3 steps: the list holds one sigma per step"),
        ((10.0, 10.0, 1.0), r"decrease strictly; got sigmas\[0\] = 10.0 then sigmas\[1\] = 10.0"),
        ((10.0, 1.0, -1.0), r"positive and finite; got -1.0"),
        ((10.0, math.nan, 1.0), r"positive and finite; got nan"),
        ((math.inf, 10.0, 1.0), r"positive and finite; got inf"),
        ((100.0, 10.0, 1.0), r"spans \[1, 100\], outside model 'gmm2d''s range \[0.002, 80\]"),
        ((10.0, 1.0, 0.001), r"spans \[0.001, 10\], outside"),
        ("10, 1, 0.1", r"a list of numbers"),
    ]
    for sigmas, message in cases:
        with pytest.raises(BenchError, match=message):
            make_sigmas("sigmas", 3, gmm2d, sigmas=sigmas)


# ------------------------------------------------------------------------------- ComfyUI's schedules on a training grid

class GridModel:
    """A model with DDPM's training grid (linear betas 1e-4 .. 0.02 over 1000 steps) and nothing else."""

    name = "grid"

    def __init__(self):
        alphas_cumprod = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
        self.sigmas_discrete = ((1 - alphas_cumprod) / alphas_cumprod).sqrt()
        self.sigma_min, self.sigma_max = self.sigmas_discrete[0].item(), self.sigmas_discrete[-1].item()


@pytest.fixture(scope="module")
def grid():
    return GridModel()


def at(grid, timesteps):
    return torch.cat([grid.sigmas_discrete[torch.tensor(timesteps)], torch.zeros(1, dtype=torch.float64)])


def test_simple_is_comfyuis(grid):
    for steps in range(1, 61):
        stride = 1000 / steps  # ComfyUI: sigmas[-(1 + int(x * stride))], in floats
        expected = [999 - int(x * stride) for x in range(steps)]
        # which is not always the exact floor(x * 1000 / N): N = 38, x = 19 gives int(499.99999999999994) = 499
        assert torch.equal(make_sigmas("simple", steps, grid), at(grid, expected)), steps
    assert 999 - 19 * 1000 // 38 == 499 and make_sigmas("simple", 38, grid)[19] == grid.sigmas_discrete[500]


def test_ddim_uniform(grid):
    expected = at(grid, [901, 801, 701, 601, 501, 401, 301, 201, 101, 1])
    assert torch.equal(make_sigmas("ddim-uniform", 10, grid), expected)
    # N = 7: stride 142, ComfyUI also takes 995; the 7 lowest are kept
    assert torch.equal(make_sigmas("ddim-uniform", 7, grid), at(grid, [853, 711, 569, 427, 285, 143, 1]))
    for steps in (3, 10, 25):
        assert torch.equal(make_sigmas("ddim-uniform", steps, grid),
                           make_sigmas("discrete", steps, grid, spacing="leading", steps_offset=1))


def test_normal_and_sgm_uniform(grid):
    # normal: N times uniform in [999, 0]; at N = 4 they are grid points 999, 666, 333, 0
    torch.testing.assert_close(make_sigmas("normal", 4, grid), at(grid, [999, 666, 333, 0]), rtol=1e-12, atol=0)
    # at N = 3 the middle one is t = 499.5: log-linear between grid points, the geometric mean
    middle = make_sigmas("normal", 3, grid)[1].item()
    assert middle == pytest.approx(math.sqrt(grid.sigmas_discrete[499] * grid.sigmas_discrete[500]), rel=1e-12)
    # sgm_uniform: N + 1 times, the last dropped: 999, 666, 333 for N = 3, stopping short of sigma_min
    torch.testing.assert_close(make_sigmas("sgm-uniform", 3, grid), at(grid, [999, 666, 333]), rtol=1e-12, atol=0)
    assert make_sigmas("normal", 10, grid)[-2] == grid.sigma_min


def test_normal_and_sgm_uniform_without_a_grid_are_uniform_in_log_sigma(gmm2d):
    assert torch.equal(make_sigmas("normal", 9, gmm2d), make_sigmas("logsnr", 9, gmm2d))
    expected = torch.linspace(math.log(80), math.log(0.002), 10, dtype=torch.float64)[:9].exp()
    torch.testing.assert_close(make_sigmas("sgm-uniform", 9, gmm2d)[:-1], expected, rtol=1e-14, atol=0)


@pytest.mark.parametrize("alpha, beta", [(0.6, 0.6), (0.5, 0.7), (2.0, 2.0)])
def test_beta_timesteps_sit_at_the_beta_quantiles(grid, alpha, beta):
    from scipy.special import betainc  # the regularised incomplete beta function: the Beta(alpha, beta) CDF

    steps = 12
    sigmas = make_sigmas("beta", steps, grid, alpha=alpha, beta=beta)[:-1]
    timesteps = torch.searchsorted(grid.sigmas_discrete, sigmas)
    assert torch.equal(grid.sigmas_discrete[timesteps], sigmas)  # on the grid
    assert timesteps[0] == 999
    # t_i = round(999 q_i) with CDF(q_i) = 1 - i / N: within half a timestep of it
    for i, t in enumerate(timesteps.tolist()):
        low, high = betainc(alpha, beta, max(t - 0.5, 0) / 999), betainc(alpha, beta, min(t + 0.5, 999) / 999)
        assert low <= 1 - i / steps <= high, (i, t)


def test_beta_is_dense_at_both_ends_below_one(grid):
    timesteps = torch.searchsorted(grid.sigmas_discrete, make_sigmas("beta", 10, grid)[:-1])
    gaps = -timesteps.diff()
    assert gaps[0] < gaps[4] and gaps[-1] < gaps[4]


def test_grid_schedule_errors(grid, gmm2d):
    for name in ("simple", "ddim-uniform", "beta"):
        with pytest.raises(BenchError, match=rf"schedule '{name}' needs a model with a discrete training grid.*"
                                             r"'gmm2d' has none.*karras"):
            make_sigmas(name, 10, gmm2d)
    with pytest.raises(BenchError, match=r"puts steps 0 and 1 of 300 on the same training timestep 999"):
        make_sigmas("beta", 300, grid)
    with pytest.raises(BenchError, match=r"alpha > 0 and beta > 0"):
        make_sigmas("beta", 10, grid, alpha=0)
    with pytest.raises(BenchError, match=r"simple schedule takes 1 to 1000 steps.*got 1001"):
        make_sigmas("simple", 1001, grid)


def test_comfyui_names_are_aliases(gmm2d):
    for alias, name in [("kl_optimal", "kl-optimal"), ("linear_quadratic", "linear-quadratic"),
                        ("sgm_uniform", "sgm-uniform")]:
        assert torch.equal(make_sigmas(alias, 6, gmm2d), make_sigmas(name, 6, gmm2d))


def test_time_uniform_is_k_diffusions_vp(k_sampling):
    # get_sigmas_vp: t uniform from 1 to eps_s = 1e-3 on the VP-SDE's clock (beta_d = 19.9, beta_min = 0.1); ours
    # spans a model's range, so a model whose range is sigma(1e-3) .. sigma(1)
    def vp(t):
        return math.sqrt(math.expm1(19.9 * t**2 / 2 + 0.1 * t))

    model = type("VP", (), {"sigma_min": vp(1e-3), "sigma_max": vp(1.0), "name": "vp"})()
    with default_dtype(torch.float64):
        theirs = k_sampling.get_sigmas_vp(12)
    torch.testing.assert_close(make_sigmas("time-uniform", 12, model), theirs, rtol=1e-12, atol=0)
