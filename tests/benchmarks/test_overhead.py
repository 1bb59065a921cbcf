"""Per-call overhead of every solver against its diffusers twin, with a trivial denoiser (bench/tools/overhead.py).

Skipped by the default test run (--benchmark-skip); `make bench` runs them and writes results/benchmarks.json.
Each benchmark's extra_info holds NFE and the solver's own microseconds per call (loop time per call minus the
bare model call), which is the figure to compare between ours and the twin of the same batch and device.
"""

import pytest
import torch

from bench.tools.overhead import TWINS, diffusers_loop, model_seconds_per_call, ours_loop

pytest.importorskip("diffusers")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def twin_id(twin) -> str:
    options = ",".join(f"{key}={value}" for key, value in twin.options.items())
    return twin.solver + (f"[{options}]" if options else "")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch", [64, 1024])
@pytest.mark.parametrize("implementation", ["ours", "diffusers", "ours-graph"])
@pytest.mark.parametrize("twin", TWINS, ids=twin_id)
def test_overhead_per_call(benchmark, twin, implementation, batch, device):
    device = torch.device(device)
    if implementation == "ours-graph" and device.type != "cuda":
        pytest.skip("CUDA graphs need CUDA")
    if implementation == "diffusers":
        loop = diffusers_loop(twin, batch, device)
    else:
        loop = ours_loop(twin, batch, device, cuda_graph=implementation == "ours-graph")
    loop.model.clocked = False  # pytest-benchmark times whole loops; the bare call is timed apart below

    def timed():
        loop.run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    benchmark.group = f"{twin_id(twin)} batch {batch} {device.type}"
    benchmark.pedantic(timed, rounds=15, warmup_rounds=2)
    model_seconds = model_seconds_per_call(batch, device)
    benchmark.extra_info.update(nfe=loop.nfe, twin=twin.scheduler, model_us_per_call=model_seconds * 1e6,
                                overhead_us_per_call=(benchmark.stats.stats.median / loop.nfe - model_seconds) * 1e6)
