"""The two networks of the digits plugin: the UNet inside the diffusion model, and the classifier whose penultimate
layer is the feature space in which the model's samples are measured.

`DigitsUNet` is the F of EDM's preconditioned denoiser (the preconditioning itself is in denoiser.py): 8x8 images
in and out, conditioned on the noise level through a Fourier embedding and on the class through a learned embedding
with one extra row for "no label". `DigitsClassifier` is a small CNN; its 64 penultimate features are what fid,
kid, precision and recall compare for digits (features.py registers it with torch-fidelity).

Only the architectures are here; the weights come from pretrained/ (weights.py) or from training (train.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import NUM_CLASSES

FEATURE_DIM = 64  # the classifier's penultimate layer: the feature space of fid / kid / precision / recall


class DigitsClassifier(nn.Module):
    """Two 3x3 conv pairs (8x8 with 32 channels, 4x4 with 64), max-pooled to 2x2, then 256 -> 64 -> 10.

    ``features`` is the 64-d penultimate layer; dropout sits after it, so evaluation (eval mode) uses all of it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.SiLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.SiLU(),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
            nn.Conv2d(32, 64, 3, padding=1), nn.SiLU(),
            nn.Conv2d(64, 64, 3, padding=1), nn.SiLU(),
            nn.MaxPool2d(2),  # 4x4 -> 2x2
            nn.Flatten(),
            nn.Linear(64 * 2 * 2, FEATURE_DIM), nn.SiLU(),
        )
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.dropout(self.features(x)))



class FourierEmbedding(nn.Module):
    """cos and sin of c_noise at fixed log-spaced frequencies. c_noise = log(sigma) / 4 spans about [-1.55, 1.10]
    for sigma in [0.002, 80]; frequencies from 1 to 32 radians per unit resolve it from its whole range down to a
    few percent of it, and the MLP that follows mixes them."""

    def __init__(self, num_frequencies: int = 16, lowest: float = 1.0, highest: float = 32.0) -> None:
        super().__init__()
        frequencies = torch.exp(torch.linspace(math.log(lowest), math.log(highest), num_frequencies))
        self.register_buffer("frequencies", frequencies, persistent=False)  # a constant, not a weight

    def forward(self, c_noise: Tensor) -> Tensor:
        angles = c_noise[:, None] * self.frequencies.to(c_noise.dtype)
        return torch.cat([angles.cos(), angles.sin()], dim=1)


class ResidualBlock(nn.Module):
    """GroupNorm, SiLU, 3x3 conv; the embedding scales and shifts the second normalisation (FiLM, as EDM's
    adaptive scale); dropout; 3x3 conv initialised to zero, so that a fresh block is the identity."""

    def __init__(self, in_channels: int, out_channels: int, embedding_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(8, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.embedding = nn.Linear(embedding_dim, 2 * out_channels)
        self.norm2 = nn.GroupNorm(8, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor, embedding: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.embedding(embedding)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(self.norm2(h) * (1 + scale) + shift)
        return self.skip(x) + self.conv2(self.dropout(h))


class DigitsUNet(nn.Module):
    """F of the preconditioned denoiser: [B, 1, 8, 8] -> [B, 1, 8, 8], conditioned on c_noise and a class.

        8x8, 32 ch:  conv_in -> block ------------------------------------------> concat -> block -> conv_out
                                  \\ down (3x3, stride 2)            up (3x3, then nearest) /
        4x4, 64 ch:                block -> block -----------> concat -> block
                                     \\___________________________/  (skip)

    Classes 0..9 and NO_LABEL_INDEX = 10 ("no label") share one embedding table. 442,017 parameters; about 16
    MFLOP per image, so a forward pass of 512 images takes some 70 ms on two CPU cores.
    """

    NO_LABEL_INDEX = NUM_CLASSES

    def __init__(self, channels: tuple[int, int] = (32, 64), embedding_dim: int = 128, dropout: float = 0.1) -> None:
        super().__init__()
        fine, coarse = channels
        self.noise_embedding = FourierEmbedding()
        self.noise_mlp = nn.Sequential(nn.Linear(2 * self.noise_embedding.frequencies.numel(), embedding_dim),
                                       nn.SiLU(), nn.Linear(embedding_dim, embedding_dim))
        self.class_embedding = nn.Embedding(NUM_CLASSES + 1, embedding_dim)
        self.conv_in = nn.Conv2d(1, fine, 3, padding=1)
        self.encode_fine = ResidualBlock(fine, fine, embedding_dim, dropout)
        self.down = nn.Conv2d(fine, coarse, 3, stride=2, padding=1)
        self.encode_coarse = ResidualBlock(coarse, coarse, embedding_dim, dropout)
        self.middle = ResidualBlock(coarse, coarse, embedding_dim, dropout)
        self.decode_coarse = ResidualBlock(2 * coarse, coarse, embedding_dim, dropout)
        self.up = nn.Conv2d(coarse, fine, 3, padding=1)
        self.decode_fine = ResidualBlock(2 * fine, fine, embedding_dim, dropout)
        self.norm_out = nn.GroupNorm(8, fine)
        self.conv_out = nn.Conv2d(fine, 1, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)  # F starts at 0, so D starts as c_skip x, the best guess knowing nothing
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: Tensor, c_noise: Tensor, class_index: Tensor) -> Tensor:
        embedding = F.silu(self.noise_mlp(self.noise_embedding(c_noise)) + self.class_embedding(class_index))
        fine = self.encode_fine(self.conv_in(x), embedding)
        coarse = self.encode_coarse(self.down(fine), embedding)
        h = self.middle(coarse, embedding)
        h = self.decode_coarse(torch.cat([h, coarse], dim=1), embedding)
        h = F.interpolate(self.up(h), scale_factor=2, mode="nearest")  # the conv at 4x4 costs a quarter of one at 8x8
        h = self.decode_fine(torch.cat([h, fine], dim=1), embedding)
        return self.conv_out(F.silu(self.norm_out(h)))

