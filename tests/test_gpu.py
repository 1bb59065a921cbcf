"""On a CUDA device: CUDA-graph replay gives the eager samples, and the suite runs there. Skipped without CUDA."""

import pytest
import torch

import bench
from bench.tools.efficiency import cifar_sized_model, full_cell
from bench.tools.overhead import TWINS, ours_loop

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


FIXED_STEP_SOLVERS = [
    ("euler", {}), ("heun", {}), ("ddim", {"eta": 1.0}), ("edm-stochastic", {}), ("euler-maruyama", {}),
    ("pndm", {"method": "plms"}), ("pndm", {"method": "f-pndm"}), ("ipndm", {"order": 4}),
    ("deis", {"method": "tab", "order": 3}), ("dpm-solver", {"method": "singlestep", "order": 3}),
    ("dpm-solver", {"method": "multistep", "order": 2}), ("dpm-solver++", {"method": "multistep", "order": 3}),
    ("dpm-solver++", {"method": "singlestep", "order": 2}), ("dpm-solver++", {"method": "multistep", "order": 2, "sde": True}),
    ("unipc", {"variant": "bh2", "order": 3}),
]


def solver_id(value):
    return ",".join(f"{key}={option}" for key, option in value.items()) if isinstance(value, dict) else str(value)


@pytest.mark.parametrize("solver, options", FIXED_STEP_SOLVERS, ids=solver_id)
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


@pytest.mark.parametrize("twin", TWINS, ids=lambda twin: twin.solver + solver_id(twin.options))
def test_solver_steps_never_wait_for_the_gpu(twin):
    """No .item(), no host copy, no value-dependent branch inside a step: torch's sync debug mode turns any
    synchronising call into an error while the solver's whole loop runs (after one warm-up run)."""
    run = ours_loop(twin, 64, torch.device("cuda")).run
    torch.cuda.set_sync_debug_mode("error")
    try:
        run()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_a_50k_sample_cell_of_a_cifar_sized_unet_fits_by_itself():
    model = cifar_sized_model("cuda")
    row = full_cell(model, n=50_000, nfe=2, precision="bf16")
    assert row["finite"] and row["batch_chosen"] <= 50_000 and row["peak_memory_gib"] > 0
