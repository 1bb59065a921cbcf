"""DINOv2 features for FD-DINOv2 (Stein et al. 2023: the Frechet distance in DINOv2 ViT-L/14's feature space ranks
generative models closer to human judgement than Inception's).

torch-fidelity 0.4's DINOv2 extractor (``torch_fidelity.feature_extractor_dinov2``) resizes uint8 images to 224 x 224
as TensorFlow 1 did, normalizes them with ImageNet's statistics and takes the backbone's normalized class token;
but it builds the backbone through ``torch.hub`` (a download of facebookresearch/dinov2's code and weights) and
refuses a local weights file. Here the same extractor runs on a backbone built from a local file: the ViT below has
the parameter names of facebookresearch/dinov2's checkpoints (``dinov2_vits14_pretrain.pth`` ...
``dinov2_vitl14_pretrain.pth``), and its shape (width, depth, patch, position grid) is read from the file, so any
of them loads. The file comes from the suite (``dinov2_weights_path``) or the environment
(SAMPLERBENCH_DINOV2_WEIGHTS); nothing is downloaded.

The backbone, as DINOv2 defines it: patches of 14 x 14 pixels embedded by a strided convolution, a class token
prepended, learned position embeddings (trained on a 37 x 37 grid, bicubically resized to the input's grid with
DINOv2's +0.1 offset), pre-norm blocks x += ls1 * attn(norm1(x)); x += ls2 * mlp(norm2(x)) with LayerScale and
64-dimensional heads, then a final LayerNorm whose class token is the feature.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.errors import BenchError
from bench.measure.features import FeatureSpace, to_uint8

DINOV2_WEIGHTS_ENV = "SAMPLERBENCH_DINOV2_WEIGHTS"
HEAD_DIM = 64  # every DINOv2 ViT (S: 6 heads of 384, B: 12 of 768, L: 16 of 1024)
POSITION_OFFSET = 0.1  # DINOv2 adds it to the target grid before resizing its position embeddings


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = nn.Module()
        self.attn.qkv, self.attn.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.ls1, self.ls2 = nn.Module(), nn.Module()
        self.ls1.gamma, self.ls2.gamma = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.ones(dim))

    def attention(self, x: Tensor) -> Tensor:
        batch, tokens, dim = x.shape
        q, k, v = self.attn.qkv(x).reshape(batch, tokens, 3, dim // HEAD_DIM, HEAD_DIM).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(64)) v per head
        return self.attn.proj(out.transpose(1, 2).reshape(batch, tokens, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.ls1.gamma * self.attention(self.norm1(x))
        return x + self.ls2.gamma * self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


class DinoV2(nn.Module):
    """A DINOv2 ViT backbone: images [n, 3, H, W] (normalized) -> class-token features [n, dim]."""

    def __init__(self, dim: int, depth: int, patch: int, grid: int) -> None:
        super().__init__()
        self.patch = patch
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim))  # used in training only; kept so the file loads strictly
        self.blocks = nn.ModuleList(Block(dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor]) -> "DinoV2":
        dim, patch = state["cls_token"].shape[-1], state["patch_embed.proj.weight"].shape[-1]
        depth = 1 + max(int(key.split(".")[1]) for key in state if key.startswith("blocks."))
        grid = math.isqrt(state["pos_embed"].shape[1] - 1)
        model = cls(dim, depth, patch, grid)
        model.load_state_dict(state, strict=True)
        return model

    def positions(self, rows: int, columns: int) -> Tensor:
        """The position embeddings for a rows x columns patch grid, resized as DINOv2 resizes them."""
        grid = math.isqrt(self.pos_embed.shape[1] - 1)
        if rows == columns == grid:
            return self.pos_embed
        cls_position, patches = self.pos_embed[:, :1], self.pos_embed[:, 1:].float()
        patches = patches.reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
        patches = F.interpolate(patches, mode="bicubic", scale_factor=((rows + POSITION_OFFSET) / grid,
                                                                       (columns + POSITION_OFFSET) / grid))
        patches = patches.permute(0, 2, 3, 1).reshape(1, rows * columns, -1).to(self.pos_embed.dtype)
        return torch.cat([cls_position, patches], dim=1)

    def forward(self, images: Tensor) -> Tensor:
        x = self.patch_embed.proj(images)  # [n, dim, H / patch, W / patch]
        rows, columns = x.shape[-2:]
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x.flatten(2).transpose(1, 2)], dim=1)
        x = x + self.positions(rows, columns)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 0]


def weights_path(path: str | None = None) -> Path:
    """The DINOv2 weights file: ``path`` (a suite's dinov2_weights_path), else SAMPLERBENCH_DINOV2_WEIGHTS; a clear
    error where there is none."""
    path = path or os.environ.get(DINOV2_WEIGHTS_ENV)
    if not path:
        raise BenchError("FD-DINOv2 needs DINOv2 ViT weights, which are not bundled and are never downloaded: put "
                         "facebookresearch/dinov2's dinov2_vitl14_pretrain.pth (the paper's ViT-L/14; vits14 and "
                         f"vitb14 load too) on this machine and set the environment variable {DINOV2_WEIGHTS_ENV} "
                         "to its path (or the suite's dinov2_weights_path)")
    if not Path(path).is_file():
        raise BenchError(f"DINOv2 weights file {path!r} ({DINOV2_WEIGHTS_ENV}) does not exist; put "
                         "dinov2_vitl14_pretrain.pth there, or point the variable at it")
    return Path(path)


@functools.cache
def _extractor(path: Path, digest: str):
    """torch-fidelity's DINOv2 extractor (its resize and normalization) around the backbone of ``path``."""
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase
    from torch_fidelity.feature_extractor_dinov2 import FeatureExtractorDinoV2

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # plain tensors only: no code runs
        backbone = DinoV2.from_state_dict(state)
    except Exception as error:
        raise BenchError(f"DINOv2 weights file {str(path)!r} is not a DINOv2 ViT state dict: {error}") from None

    class LocalDinoV2(FeatureExtractorDinoV2):
        def __init__(self) -> None:  # the base builds its backbone through torch.hub: here, from the file
            FeatureExtractorBase.__init__(self, "dinov2-vit-s-14", ["dinov2"])
            self.feature_extractor_internal_dtype = torch.float32
            self.model = backbone
            self.requires_grad_(False)
            self.eval()

    return LocalDinoV2()


def dinov2(path: str | None = None, batch_size: int = 64) -> FeatureSpace:
    """DINOv2 class-token features of 3xHxW samples in [-1, 1], as torch-fidelity's extractor computes them."""
    path = weights_path(path)
    with path.open("rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()[:16]
    extractor = _extractor(path, digest)
    backbone = extractor.model
    name = (f"dinov2-vit-{backbone.cls_token.shape[-1]}x{len(backbone.blocks)}-p{backbone.patch}-{digest}")

    def extract(x: Tensor) -> Tensor:
        extractor.to(x.device)
        return torch.cat([extractor(to_uint8(batch))[0] for batch in x.split(batch_size)])

    return FeatureSpace(name, extract)
