"""Whole-cell efficiency: a cell's sampling wall-clock next to NFE bare forward passes of its network.

The network is a DDPM-CIFAR10-sized diffusers UNet2DModel (google/ddpm-cifar10-32's configuration, 35.7M
parameters) with random weights: timing needs the architecture, not the training. "Bare" is the UNet called
directly, ``unet(x, t).sample``, in the same precision, at the same batch, NFE times in a row; the cell is
``bench.sample`` with a fixed-step solver, so the ratio charges the harness with everything it adds: the
sigma -> timestep conversion and preconditioning of the adapter, the solver's arithmetic, noise and batching.
Both run in one process, alternately, and each figure is the median of its repeats.

    python -m bench.tools.efficiency --device cuda                        # fp32, tf32, bf16 at batch 512, NFE 20
    python -m bench.tools.efficiency --device cpu --batch 8 --nfe 4       # the same on a small batch, on the CPU

``--full-n 50000`` also draws one whole 50,000-sample cell per precision with the batch chosen automatically (all
n, halved until it fits), and reports the batch it chose, its throughput and the peak device memory.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from bench.core.sampling import PRECISIONS, numerics, sample

# google/ddpm-cifar10-32's UNet (Ho et al. 2020's CIFAR-10 network as diffusers configures it)
DDPM_CIFAR10_UNET = dict(
    sample_size=32, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6, norm_num_groups=32,
    attention_head_dim=None, act_fn="silu", center_input_sample=False, time_embedding_type="positional",
)


def cifar_sized_model(device: str | torch.device, seed: int = 0):
    """The DDPM-CIFAR10-sized UNet with seeded random weights, wrapped as a Denoiser (linear betas, epsilon)."""
    import diffusers

    from bench.adapters.diffusers import from_diffusers

    torch.manual_seed(seed)
    unet = diffusers.UNet2DModel(**DDPM_CIFAR10_UNET)
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    return from_diffusers(unet, scheduler, name="ddpm-cifar10-sized").to(device).requires_grad_(False)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(run: Callable[[], Any], device: torch.device) -> float:
    _synchronize(device)
    start = time.perf_counter()
    run()
    _synchronize(device)
    return time.perf_counter() - start


def measure(model, batch: int, nfe: int, precision: str, solver: str = "euler", repeats: int = 5) -> dict[str, Any]:
    """Median seconds of NFE bare UNet calls and of a one-batch cell with ``solver``, measured alternately."""
    device = next(model.unet.parameters()).device
    x = torch.randn(batch, *model.shape, device=device)
    timestep = torch.full((batch,), 500.0, device=device)

    def bare() -> None:
        with torch.inference_mode(), numerics(precision, device):
            for _ in range(nfe):
                model.unet(x, timestep).sample

    def cell():
        return sample(model, solver, nfe=nfe, n=batch, batch_size=batch, precision=precision, warmup=False)

    bare()  # warm-up: cuDNN's algorithm choice, the allocator's first blocks
    counted = cell()
    if counted.nfe != nfe:
        raise AssertionError(f"{solver} made {counted.nfe} calls for a budget of {nfe}")
    bare_seconds, cell_seconds = [], []
    for _ in range(repeats):  # alternating, so that a slow spell of a shared machine hits both
        bare_seconds.append(_timed(bare, device))
        cell_seconds.append(cell().seconds)
    bare_median, cell_median = statistics.median(bare_seconds), statistics.median(cell_seconds)
    return {"precision": precision, "batch": batch, "nfe": nfe, "solver": solver, "device": str(device),
            "bare_ms_per_call": bare_median / nfe * 1e3, "cell_seconds": cell_median,
            "ratio": cell_median / bare_median, "images_per_second_per_nfe": batch * nfe / cell_median}


def full_cell(model, n: int, nfe: int, precision: str, solver: str = "euler") -> dict[str, Any]:
    """One n-sample cell with the batch chosen by bench.sample (all n, halved until it fits)."""
    out = sample(model, solver, nfe=nfe, n=n, precision=precision)
    return {"precision": precision, "n": n, "nfe": nfe, "batch_chosen": out.batch_size, "seconds": out.seconds,
            "images_per_second_per_nfe": n * nfe / out.seconds, "peak_memory_gib": (out.peak_memory_bytes or 0) / 2**30,
            "finite": bool(torch.isfinite(out.x).all())}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--batch", type=int, default=512 if cuda else 8)
    parser.add_argument("--nfe", type=int, default=20 if cuda else 4)
    parser.add_argument("--precision", nargs="+", choices=PRECISIONS, default=["fp32", "tf32", "bf16"] if cuda
                        else ["fp32", "bf16"])
    parser.add_argument("--solver", default="euler", help="a fixed-step solver (default euler)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--full-n", type=int, default=0, help="also draw one cell of this many samples per precision")
    args = parser.parse_args(argv)

    model = cifar_sized_model(args.device)
    parameters = sum(p.numel() for p in model.unet.parameters())
    print(f"DDPM-CIFAR10-sized UNet2DModel, {parameters / 1e6:.1f}M parameters, random weights, on {args.device}; "
          f"solver {args.solver}, batch {args.batch}, NFE {args.nfe}, median of {args.repeats}")
    print(f"{'precision':<10}{'bare ms/call':>14}{'cell s':>10}{'cell / (NFE x bare)':>21}{'img/s/NFE':>11}")
    for precision in args.precision:
        row = measure(model, args.batch, args.nfe, precision, args.solver, args.repeats)
        print(f"{precision:<10}{row['bare_ms_per_call']:>14.2f}{row['cell_seconds']:>10.3f}{row['ratio']:>21.4f}"
              f"{row['images_per_second_per_nfe']:>11.0f}")
    if args.full_n:
        print(f"\nwhole cells of {args.full_n} samples, batch chosen automatically:")
        print(f"{'precision':<10}{'batch':>7}{'seconds':>10}{'img/s/NFE':>11}{'peak GiB':>10}{'finite':>8}")
        for precision in args.precision:
            row = full_cell(model, args.full_n, args.nfe, precision, args.solver)
            print(f"{precision:<10}{row['batch_chosen']:>7}{row['seconds']:>10.1f}"
                  f"{row['images_per_second_per_nfe']:>11.0f}{row['peak_memory_gib']:>10.2f}{str(row['finite']):>8}")


if __name__ == "__main__":
    main()
