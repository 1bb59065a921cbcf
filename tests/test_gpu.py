"""On a CUDA device: CUDA-graph replay gives the eager samples, and the suite runs there. Skipped without CUDA."""

import pytest
import torch

import bench

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("solver, options", [("euler", {}), ("heun", {}), ("ddim", {"eta": 1.0}),
                                             ("edm-stochastic", {})])
def test_cuda_graph_replay_gives_the_eager_samples(solver, options):
    model = bench.load_model("gmm-image", device="cuda")
    eager = bench.sample(model, solver, nfe=10, n=300, batch_size=128, **options)
    graphed = bench.sample(model, solver, nfe=10, n=300, batch_size=128, cuda_graph=True, **options)
    assert graphed.nfe == eager.nfe
    assert torch.equal(graphed.x, eager.x)


def test_cuda_matches_cpu():
    cpu = bench.sample("gmm-image", "heun", nfe=9, n=64, dtype="float64")
    cuda = bench.sample(bench.load_model("gmm-image", device="cuda"), "heun", nfe=9, n=64, dtype="float64")
    torch.testing.assert_close(cuda.x.cpu(), cpu.x, rtol=1e-9, atol=1e-9)
    # the noise is a function of (seed, index) on any device: integer hashing is exact, and only the float64
    # log / cos of Box-Muller may round differently in the last bit
    torch.testing.assert_close(cuda.x_T.cpu(), cpu.x_T, rtol=1e-14, atol=0)


def test_peak_memory_and_automatic_batch():
    out = bench.sample(bench.load_model("gmm-image", device="cuda"), "euler", nfe=4, n=1000)
    assert out.peak_memory_bytes > 0 and out.batch_size == 1000
