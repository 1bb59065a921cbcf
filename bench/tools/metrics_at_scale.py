"""Precision/recall and FID at scale: ours next to torch-fidelity's functions, on the same features, in one run.

The features stand in for Inception's pool3 (2048-d, non-negative, correlated): |z A| for Gaussian z and a fixed
random mixing A, with the "generated" set slightly shifted so that precision and recall are neither
0 nor 1. Timings include moving nothing: both start from features on ``--device`` (torch-fidelity then moves
every distance block to the CPU, as it does inside calculate_metrics). Values are compared to the last digit:
precision and recall may differ only where a distance ties a k-NN radius to rounding.

    python -m bench.tools.metrics_at_scale --device cuda --n 50000           # the H200 figures
    python -m bench.tools.metrics_at_scale --device cpu --n 10000            # on the CPU (torch-fidelity: minutes at 50k)
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from bench.measure.distances import feature_statistics, frechet_distance, precision_recall


def inception_like_features(n: int, d: int, seed: int, shift: float, scale: float, device: torch.device) -> Tensor:
    generator = torch.Generator(device="cpu").manual_seed(1234)
    mixing = (torch.randn(d, d, generator=generator) / d**0.5).to(device)  # shared by both sets
    generator.manual_seed(seed)
    z = torch.randn(n, d, generator=generator).to(device)
    return ((z * scale + shift) @ mixing).abs()


def _timed(run: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    value = run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, value


def compare(n: int, d: int, device: torch.device, k: int = 3) -> dict[str, Any]:
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric

    generated = inception_like_features(n, d, seed=1, shift=0.02, scale=1.0, device=device)
    real = inception_like_features(n, d, seed=2, shift=0.0, scale=1.0, device=device)
    precision_recall(generated[:256], real[:256], k)  # warm-up: kernels, cuBLAS handles
    ours_prc_seconds, (precision, recall) = _timed(lambda: precision_recall(generated, real, k), device)
    # torch-fidelity's defaults inside calculate_metrics (save_cpu_ram=False: full distance matrices on the CPU)
    theirs_prc_seconds, theirs_prc = _timed(lambda: prc_features_to_metric(
        generated, real, prc_neighborhood=k, prc_batch_size=10000, save_cpu_ram=False, verbose=False), device)

    def ours_fid() -> float:
        return frechet_distance(feature_statistics(generated), feature_statistics(real))

    def theirs_fid() -> float:  # it takes numpy float64 statistics from CPU features
        statistics = [fid_features_to_statistics(f.cpu()) for f in (generated, real)]
        return fid_statistics_to_metric(*statistics, verbose=False)[KEY_METRIC_FID]

    ours_fid()  # warm-up: cuSOLVER's workspace
    ours_fid_seconds, fid = _timed(ours_fid, device)
    theirs_fid_seconds, theirs_fid_value = _timed(theirs_fid, device)
    return {"n": n, "d": d, "device": str(device),
            "precision": precision, "recall": recall,
            "precision_theirs": theirs_prc["precision"], "recall_theirs": theirs_prc["recall"],
            "prc_seconds": ours_prc_seconds, "prc_seconds_theirs": theirs_prc_seconds,
            "fid": fid, "fid_theirs": theirs_fid_value,
            "fid_seconds": ours_fid_seconds, "fid_seconds_theirs": theirs_fid_seconds}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--n", type=int, default=50000, help="samples in each set (default 50000)")
    parser.add_argument("--d", type=int, default=2048, help="feature dimension (default 2048, Inception's pool3)")
    args = parser.parse_args(argv)
    row = compare(args.n, args.d, torch.device(args.device))
    print(f"{args.n} x {args.n} features of {args.d} dimensions on {args.device}")
    print(f"{'':<22}{'ours':>14}{'torch-fidelity':>16}{'difference':>12}{'speed-up':>10}")
    for name, seconds in (("precision", "prc_seconds"), ("recall", "prc_seconds"), ("fid", "fid_seconds")):
        ours, theirs = row[name], row[f"{name}_theirs"]
        print(f"{name:<22}{ours:>14.6f}{theirs:>16.6f}{ours - theirs:>12.2e}")
    for label, key in (("precision+recall s", "prc_seconds"), ("fid s", "fid_seconds")):
        print(f"{label:<22}{row[key]:>14.3f}{row[key + '_theirs']:>16.3f}{'':>12}"
              f"{row[key + '_theirs'] / row[key]:>9.1f}x")


if __name__ == "__main__":
    main()
