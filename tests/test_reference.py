"""The reference solution: the adaptive solve agrees with an independent fixed-step RK4, and is cached."""

import math

import pytest
import torch

import bench
from bench.measure import reference as reference_module
from bench.measure.reference import REFERENCE_TOLERANCE, ReferenceCache, solve_reference


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


@pytest.mark.slow  # seconds to a minute on a loaded 2-core machine: `make bench` runs it
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


def test_the_reference_in_batches_agrees_with_one_solve(gmm2d, monkeypatch):
    """dopri5 picks its steps per batch, so batching changes the steps, not the accuracy: every batch is solved
    to the tolerance, and the batched reference stays within 100 x tolerance of one solve over all samples (the
    bound both meet against a converged RK4 above)."""
    x_T = bench.sample(gmm2d, "euler", nfe=1, n=300, dtype=torch.float64).x_T
    labels = torch.arange(300) % 8
    one = reference_module._solve(gmm2d, x_T, labels, gmm2d.sigma_max, gmm2d.sigma_min, REFERENCE_TOLERANCE)
    sizes, solve = [], reference_module._solve
    monkeypatch.setattr(reference_module, "_solve", lambda model, x, *rest: sizes.append(len(x)) or solve(model, x, *rest))
    batched = solve_reference(gmm2d, x_T, labels, memory_budget="400kB")  # ~1.7 kB a sample: batches of ~60
    assert len(sizes) >= 4 and sum(sizes) == 300
    assert (batched - one).abs().max() < 100 * REFERENCE_TOLERANCE
