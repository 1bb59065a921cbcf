"""The reference solution: the adaptive solve agrees with an independent fixed-step RK4, and is cached."""

import math

import torch

import bench
from bench.measure.reference import ReferenceCache, solve_reference


def rk4_in_log_sigma(model, x, steps):
    """Classical RK4 on dx/du = x - D(x; e^u), fixed steps: slow, simple, and shares no code with the reference."""
    u0, u1 = math.log(model.sigma_max), math.log(model.sigma_min)
    h = (u1 - u0) / steps

    def velocity(x, u):
        return x - model(x, torch.full((len(x),), math.exp(u), dtype=x.dtype))

    for i in range(steps):
        u = u0 + i * h
        k1 = velocity(x, u)
        k2 = velocity(x + h / 2 * k1, u + h / 2)
        k3 = velocity(x + h / 2 * k2, u + h / 2)
        k4 = velocity(x + h * k3, u + h)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return model(x, torch.full((len(x),), model.sigma_min, dtype=x.dtype))


def test_reference_agrees_with_fine_rk4(gmm2d):
    x_T = bench.sample(gmm2d, "euler", nfe=1, n=64, dtype=torch.float64).x_T
    reference = solve_reference(gmm2d, x_T)
    fine, finer = rk4_in_log_sigma(gmm2d, x_T, 1024), rk4_in_log_sigma(gmm2d, x_T, 2048)
    assert (fine - finer).abs().max() < 1e-9  # RK4 itself has converged
    assert (reference - finer).abs().max() < 1e-8


def test_reference_is_cached_in_memory_and_on_disk(gmm2d, tmp_path, monkeypatch):
    x_T = bench.sample(gmm2d, "euler", nfe=1, n=8, dtype=torch.float64).x_T
    calls = []
    real = solve_reference

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr("bench.measure.reference.solve_reference", counting)
    first = ReferenceCache(tmp_path).get(gmm2d, "gmm2d", x_T, None)
    again = ReferenceCache(tmp_path).get(gmm2d, "gmm2d", x_T, None)  # a new process: from disk
    assert len(calls) == 1 and torch.equal(first, again)
    assert len(list(tmp_path.glob("reference-*.safetensors"))) == 1
    ReferenceCache(tmp_path).get(gmm2d, "gmm2d", x_T[:4], None)  # another n is another key
    assert len(calls) == 2
    # other initial states of the same size (another noise generator, another sample range) are another key
    ReferenceCache(tmp_path).get(gmm2d, "gmm2d", x_T.flip(0), None)
    assert len(calls) == 3
