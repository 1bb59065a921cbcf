"""Parity with k-diffusion (release 0.1.1.post1, its sampling.py read from the pinned wheel: tests/peers.py).

Every sampler k-diffusion ships that the harness has runs twice on gmm2d in float64, on the same sigma grid, from
the same x_T and with the same noise: once through bench.sample, once through k-diffusion's sample_* function, to
which we hand a ``noise_sampler`` that returns our per-step draws in the order its loop asks for them. The two must
agree to 1e-6 relative (measured: 2e-16 to 2e-15, float64 rounding; `pytest -s` prints each case's figure).

Two conventions differ and are bridged, not hidden:
- the last step. Ours is always x0 = D(x; sigma_last). k-diffusion's samplers take a first-order step to sigma = 0,
  which is the same D, except LMS, which integrates its interpolating polynomial down to 0; LMS is therefore run by
  k-diffusion on the grid without its final 0, and D(x; sigma_last) applied to its result.
- DPM++ SDE's two draws of a step are increments of one Brownian path (k-diffusion's default Brownian tree); we
  draw them from our streams and hand k-diffusion the same correlated pair (plugins/ancestral.py).
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch

import bench
from bench.core.noise import NoiseStream
from peers import k_diffusion_sampling, relative_deviation

N, SEED = 64, 3
TOLERANCE = 1e-6

# (our name, our options, k-diffusion's sampler, its options, NFE): every sampler k-diffusion ships that we have
CASES = [
    ("euler", {}, "euler", {}, 12),
    ("heun", {}, "heun", {}, 23),
    ("euler-ancestral", {}, "euler_ancestral", {}, 12),
    ("euler-ancestral", {"eta": 0.6}, "euler_ancestral", {"eta": 0.6}, 12),
    ("ddim", {"eta": 1.0}, "euler_ancestral", {}, 12),
    ("dpm-2", {}, "dpm_2", {}, 23),
    ("dpm-2-ancestral", {}, "dpm_2_ancestral", {}, 23),
    ("dpm-2-ancestral", {"eta": 0.7, "s_noise": 1.1}, "dpm_2_ancestral", {"eta": 0.7, "s_noise": 1.1}, 23),
    ("dpm++2s-ancestral", {}, "dpmpp_2s_ancestral", {}, 23),
    ("dpm++2s-ancestral", {"eta": 0.5}, "dpmpp_2s_ancestral", {"eta": 0.5}, 23),
    ("dpm++2s-ancestral", {"eta": 0.0}, "dpmpp_2s_ancestral", {"eta": 0.0}, 23),
    ("dpm++sde", {}, "dpmpp_sde", {}, 23),
    ("dpm++sde", {"eta": 0.5, "s_noise": 0.9, "r": 0.3}, "dpmpp_sde", {"eta": 0.5, "s_noise": 0.9, "r": 0.3}, 23),
    ("dpm++sde", {"eta": 0.0}, "dpmpp_sde", {"eta": 0.0}, 23),
    ("dpm++2m", {}, "dpmpp_2m", {}, 12),
    ("dpm-solver++", {}, "dpmpp_2m", {}, 12),
    ("dpm++2m-sde", {}, "dpmpp_2m_sde", {}, 12),
    ("dpm++2m-sde", {"solver_type": "heun"}, "dpmpp_2m_sde", {"solver_type": "heun"}, 12),
    ("dpm-solver++", {"sde": True}, "dpmpp_2m_sde", {}, 12),
    ("dpm++3m-sde", {}, "dpmpp_3m_sde", {}, 12),
    ("dpm++3m-sde", {"eta": 0.4, "s_noise": 0.8}, "dpmpp_3m_sde", {"eta": 0.4, "s_noise": 0.8}, 12),
    ("dpm++3m-sde", {"eta": 0.0}, "dpmpp_3m_sde", {"eta": 0.0}, 12),
    *[("lms", {"order": p}, "lms", {"order": p}, 15) for p in (1, 2, 3, 4, 5)],
]


def case_id(case) -> str:
    ours, options, theirs, their_options, nfe = case
    return ours + "".join(f",{key}={value}" for key, value in options.items()) + f"-vs-{theirs}"


@pytest.fixture(scope="module")
def k_diffusion():
    return k_diffusion_sampling()


def their_noise(ours: str, options: dict, noise: NoiseStream, sigmas: torch.Tensor):
    """k-diffusion's noise_sampler(sigma, sigma_next) handing out our draws in the order its loop asks for them."""
    calls = iter(range(10**9))
    if ours != "dpm++sde":
        return lambda sigma, sigma_next: noise(next(calls))
    # DPM++ SDE: two calls a step, (sigma, sigma_s) then (sigma, sigma_next): our Brownian pair (plugins/ancestral.py)
    pending: list[torch.Tensor] = []

    def sampler(sigma, sigma_boundary):
        k = next(calls)
        if k % 2 == 0:
            pending[:] = [noise(k)]
            return pending[0]
        i = k // 2
        sigma, sigma_next = sigmas[i].item(), sigmas[i + 1].item()
        sigma_s = sigma * math.exp(-options.get("r", 0.5) * math.log(sigma / sigma_next))
        a = (sigma - sigma_s) / (sigma - sigma_next)
        return math.sqrt(a) * pending[0] + math.sqrt(1 - a) * noise(k)

    return sampler


@pytest.mark.parametrize("case", CASES, ids=[case_id(case) for case in CASES])
def test_samples_are_k_diffusions(gmm2d, k_diffusion, case):
    ours, options, theirs, their_options, nfe = case
    out = bench.sample(gmm2d, ours, nfe=nfe, n=N, seed=SEED, dtype=torch.float64, warmup=False, **options)
    noise = NoiseStream(SEED, torch.arange(N), gmm2d.shape, torch.float64, "cpu")
    sampler = getattr(k_diffusion, f"sample_{theirs}")
    if "noise_sampler" in inspect.signature(sampler).parameters:
        their_options = {**their_options, "noise_sampler": their_noise(ours, options, noise, out.sigmas)}

    def model(x, sigma, **_):
        return gmm2d(x, sigma)

    if theirs == "lms":  # k-diffusion's LMS integrates to 0: stop it at sigma_last, then x0 = D(x; sigma_last)
        x_last = sampler(model, out.x_T.clone(), out.sigmas[:-1], disable=True, **their_options)
        reference = model(x_last, torch.full((N,), out.sigmas[-2].item(), dtype=torch.float64))
    else:
        reference = sampler(model, out.x_T.clone(), out.sigmas, disable=True, **their_options)
    deviation = relative_deviation(out.x, reference)
    print(f"{case_id(case)}: relative deviation {deviation:.1e}")
    assert deviation <= TOLERANCE
    # and the comparison can fail: another seed's noise, or another sampler, is far off
    if out.stochastic:
        assert relative_deviation(bench.sample(gmm2d, ours, nfe=nfe, n=N, seed=SEED + 1, dtype=torch.float64,
                                               warmup=False, **options).x, reference) > 1e-2
