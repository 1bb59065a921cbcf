"""Schedules: decreasing grids from sigma_max to sigma_min, then 0, with each one's defining spacing."""

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
