"""The measuring tools of make bench / make gpu give true figures: the efficiency ratio charges the harness with
everything it adds, and the metrics-at-scale comparison computes torch-fidelity's values both ways."""

import pytest
import torch

from bench.tools import efficiency, metrics_at_scale


def test_the_cifar_sized_unet_is_ddpm_cifar10s():
    diffusers = pytest.importorskip("diffusers")
    unet = diffusers.UNet2DModel(**efficiency.DDPM_CIFAR10_UNET)
    assert sum(p.numel() for p in unet.parameters()) == pytest.approx(35.7e6, rel=2e-3)  # Ho et al.: 35.7M


def test_efficiency_measures_a_cell_against_bare_calls(monkeypatch):
    diffusers = pytest.importorskip("diffusers")
    tiny = dict(efficiency.DDPM_CIFAR10_UNET, sample_size=8, block_out_channels=(32, 32, 32, 32), norm_num_groups=8)
    monkeypatch.setattr(efficiency, "DDPM_CIFAR10_UNET", tiny)
    model = efficiency.cifar_sized_model("cpu")
    assert isinstance(model.unet, diffusers.UNet2DModel) and model.shape == (3, 8, 8)
    row = efficiency.measure(model, batch=2, nfe=3, precision="fp32", solver="heun", repeats=1)
    assert row["nfe"] == 3 and row["bare_ms_per_call"] > 0
    # the cell makes the same three network calls plus the harness's own work: it cannot take a fraction of them
    assert row["ratio"] > 0.5
    with pytest.raises(AssertionError, match="made 3 calls for a budget of 4"):
        efficiency.measure(model, batch=2, nfe=4, precision="fp32", solver="heun", repeats=1)


def test_metrics_at_scale_agree_with_torch_fidelity():
    row = metrics_at_scale.compare(n=600, d=64, device=torch.device("cpu"))
    assert 0.05 < row["precision"] < 0.95 and 0.05 < row["recall"] < 0.95  # features that test the k-NN balls
    assert row["precision"] == pytest.approx(row["precision_theirs"], abs=1e-4)
    assert row["recall"] == pytest.approx(row["recall_theirs"], abs=1e-4)
    # torch-fidelity takes the mean of float32 features in float32, so the two differ from the 7th digit
    assert row["fid"] == pytest.approx(row["fid_theirs"], rel=1e-6)
