"""Per-sample noise: a pure function of (seed, sample index), and Gaussian."""

import numpy as np
import pytest
import scipy.stats
import torch

from bench.core.noise import NoiseStream, gaussian


def test_same_sample_same_noise_whatever_the_batch():
    whole = gaussian(7, torch.arange(100), (3, 4, 4))
    parts = torch.cat([gaussian(7, torch.arange(a, b), (3, 4, 4)) for a, b in [(0, 13), (13, 50), (50, 100)]])
    assert torch.equal(whole, parts)
    shuffled = torch.tensor([42, 3, 99])
    assert torch.equal(gaussian(7, shuffled, (3, 4, 4)), whole[shuffled])


def test_seeds_streams_and_samples_differ():
    indices = torch.arange(64)
    base = gaussian(0, indices, (16,))
    assert not torch.allclose(base, gaussian(1, indices, (16,)))
    assert not torch.allclose(base, gaussian(0, indices, (16,), stream=1))
    assert not torch.allclose(base[0], base[1])
    assert torch.equal(base, gaussian(0, indices, (16,)))


def test_huge_indices_and_seeds_do_not_overflow():
    noise = gaussian(2**40 + 3, torch.tensor([0, 2**33, 2**62]), (5,))
    assert torch.isfinite(noise).all()
    assert not torch.equal(noise[0], noise[1])


def test_distribution_is_standard_normal():
    noise = gaussian(3, torch.arange(2000), (101,), dtype=torch.float64).flatten().numpy()
    assert abs(noise.mean()) < 5 * 1 / np.sqrt(noise.size)
    assert abs(noise.var() - 1) < 5 * np.sqrt(2 / noise.size)
    assert scipy.stats.kstest(noise, "norm").pvalue > 1e-3
    # no correlation between neighbouring elements or neighbouring samples
    grid = noise.reshape(2000, 101)
    assert abs(np.corrcoef(grid[:, 0], grid[:, 1])[0, 1]) < 0.1
    assert abs(np.corrcoef(grid[0], grid[1])[0, 1]) < 0.35


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_and_stream(dtype):
    stream = NoiseStream(5, torch.arange(4), (2,), dtype, "cpu")
    first, second = stream(0), stream(1)
    assert first.dtype == dtype and first.shape == (4, 2)
    assert not torch.equal(first, second)
    assert torch.equal(first, stream(0))
