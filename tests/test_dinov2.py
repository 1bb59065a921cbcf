"""FD-DINOv2: torch-fidelity's DINOv2 extractor on a backbone read from a local file (never a download); the test
writes its own small file of random weights with the parameter names of facebookresearch/dinov2's checkpoints."""

import math

import pytest
import torch

import bench
from bench.errors import BenchError
from bench.measure.dinov2 import DINOV2_WEIGHTS_ENV, DinoV2, dinov2
from bench.measure.metrics import REFERENCE_DATA_SEED, MetricContext, SharedCache
from bench.measure.reference import ReferenceCache
from bench.registry import manager

# the names of every tensor of facebookresearch/dinov2's dinov2_vits14_pretrain.pth, block 0 standing for all 12
CHECKPOINT_KEYS = {"cls_token", "pos_embed", "mask_token", "patch_embed.proj.weight", "patch_embed.proj.bias",
                   "norm.weight", "norm.bias"} | {f"blocks.0.{name}" for name in (
    "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
    "ls1.gamma", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
    "ls2.gamma")}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A small DINOv2 of the real layout: the trained 37 x 37 position grid and 14-pixel patches, 64 wide (one
    head), 2 blocks deep, random weights."""
    torch.manual_seed(0)
    model = DinoV2(dim=64, depth=2, patch=14, grid=37)
    for parameter in model.parameters():
        torch.nn.init.normal_(parameter, std=0.2)
    path = tmp_path_factory.mktemp("dinov2") / "dinov2_tiny.pth"
    torch.save(model.state_dict(), path)
    return path


def context_for(model, samples):
    return MetricContext(model=model, model_id=model.name, samples=samples, x_T=samples, labels=None, seed=0,
                         stochastic=False, references=ReferenceCache(), shared=SharedCache())


def test_the_backbone_has_the_checkpoints_names_and_shapes():
    small = DinoV2(dim=384, depth=12, patch=14, grid=37)  # ViT-S/14 as released
    state = small.state_dict()
    assert {key for key in state if not key.startswith("blocks.") or key.startswith("blocks.0.")} == CHECKPOINT_KEYS
    assert state["pos_embed"].shape == (1, 1 + 37 * 37, 384) and state["blocks.11.attn.qkv.weight"].shape == (1152, 384)
    rebuilt = DinoV2.from_state_dict(state)  # the shape is read back from the file's tensors
    assert (rebuilt.cls_token.shape[-1], len(rebuilt.blocks), rebuilt.patch) == (384, 12, 14)


def test_positions_are_resized_to_the_input_grid_with_dinov2s_offset(weights):
    model = DinoV2.from_state_dict(torch.load(weights, weights_only=True))
    assert model.positions(37, 37) is model.pos_embed
    resized = model.positions(16, 16)  # a 224 x 224 input
    assert resized.shape == (1, 1 + 16 * 16, 64) and torch.equal(resized[:, 0], model.pos_embed[:, 0])
    grid = model.pos_embed[:, 1:].reshape(1, 37, 37, 64).permute(0, 3, 1, 2)
    expected = torch.nn.functional.interpolate(grid, scale_factor=(16.1 / 37, 16.1 / 37), mode="bicubic")
    torch.testing.assert_close(resized[:, 1:], expected.permute(0, 2, 3, 1).reshape(1, 256, 64))


def test_fd_dinov2_computes_from_the_local_file(weights, monkeypatch, gmm_image):
    monkeypatch.setenv(DINOV2_WEIGHTS_ENV, str(weights))
    space = dinov2()
    assert space.name.startswith("dinov2-vit-64x2-p14-")
    real = gmm_image.sample_data(24, seed=REFERENCE_DATA_SEED)
    features = space(real)
    assert features.shape == (24, 64) and features.dtype == torch.float64 and torch.isfinite(features).all()
    fd = manager().get("metric", "fd_dinov2").obj.compute
    assert fd(context_for(gmm_image, real.float())) == pytest.approx(0, abs=1e-6)  # the real data itself
    noise = torch.rand(24, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    far = fd(context_for(gmm_image, noise))
    assert far > 1e-3 and math.isfinite(far)
    assert fd(context_for(bench.load_model("gmm2d"), torch.zeros(24, 2))) is None  # not images: does not apply


def test_a_missing_file_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.delenv(DINOV2_WEIGHTS_ENV, raising=False)
    with pytest.raises(BenchError, match=rf"dinov2_vitl14_pretrain.pth .* set the environment variable "
                                         rf"{DINOV2_WEIGHTS_ENV} to its path"):
        dinov2()
    monkeypatch.setenv(DINOV2_WEIGHTS_ENV, str(tmp_path / "nowhere.pth"))
    with pytest.raises(BenchError, match=r"nowhere.pth' \(SAMPLERBENCH_DINOV2_WEIGHTS\) does not exist; put "
                                         r"dinov2_vitl14_pretrain.pth there"):
        dinov2()
    other = tmp_path / "other.pth"
    torch.save({"weight": torch.zeros(2)}, other)
    with pytest.raises(BenchError, match=r"is not a DINOv2 ViT state dict"):
        dinov2(str(other))


def test_a_suite_names_the_weights_file(weights, tmp_path, monkeypatch):
    from bench.sweep.runner import run_suite
    from bench.sweep.store import read_results
    from bench.sweep.suite import load_suite
    from helpers import write_suite

    monkeypatch.delenv(DINOV2_WEIGHTS_ENV, raising=False)
    text = f"""
    name = "dino"
    n = 12
    seeds = [0]
    nfe = [3]
    metrics = ["fd_dinov2", "fid"]
    dinov2_weights_path = "{weights}"
    [[models]]
    name = "gmm-image"
    [[solvers]]
    name = "euler"
    """
    run_suite(load_suite(write_suite(tmp_path, text)), tmp_path, progress=False)
    row = read_results(tmp_path / "dino.sqlite").iloc[0]
    assert row["status"] == "done" and row["fd_dinov2"] > 0 and row["fd_dinov2"] != row["fid"]
    with pytest.raises(BenchError, match=r"dinov2_weights_path: no file 'nowhere.pth'"):
        load_suite(write_suite(tmp_path, text.replace(str(weights), "nowhere.pth")))
