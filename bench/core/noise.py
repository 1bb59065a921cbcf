"""Per-sample Gaussian noise from a counter-based generator.

Every number is a pure function of (seed, stream, sample index, element index), so sample i of seed s gets the
same x_T and the same per-step noise whatever the batch size, the batch it falls in, the device or the executor.
It is vectorised over the whole batch, so stochastic solvers draw their per-step noise without a per-sample loop
or a host sync. The hash is Chris Wellons' "lowbias32" (a 32-bit integer finaliser with very low bias), written
with 16-bit partial products so that no int64 product ever overflows; Box-Muller turns pairs of uniforms into
normals in float64.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

GENERATOR = "lowbias32-box-muller-v1"  # names the stream of numbers below: part of every cell key and cache key
_MASK32 = 0xFFFFFFFF
X_T_STREAM = 0  # the initial noise; solvers draw their per-step noise from streams 1, 2, ...


def _mul32(a: Tensor, constant: int) -> Tensor:
    """(a * constant) mod 2**32 for a < 2**32, from 16-bit halves of the constant (no int64 overflow)."""
    low, high = constant & 0xFFFF, constant >> 16
    return (a * low + (((a * high) & 0xFFFF) << 16)) & _MASK32


def _hash32(a: Tensor) -> Tensor:
    a = a ^ (a >> 16)
    a = _mul32(a, 0x21F0AAAD)
    a = a ^ (a >> 15)
    a = _mul32(a, 0x735A2D97)
    return a ^ (a >> 15)


def _hash32_int(a: int) -> int:
    """_hash32 on a Python int: the (seed, stream) part of a key needs no device work, nor a host-to-device copy
    (which a CUDA graph could not capture)."""
    a ^= a >> 16
    a = (a * 0x21F0AAAD) & _MASK32
    a ^= a >> 15
    a = (a * 0x735A2D97) & _MASK32
    return a ^ (a >> 15)


def _key(seed: int, stream: int, indices: Tensor) -> Tensor:
    """One 32-bit key per sample from (seed, stream, sample index)."""
    seed_key = _hash32_int(_hash32_int((seed & _MASK32) ^ 0x9E3779B9) ^ ((seed >> 32) & _MASK32))
    stream_key = _hash32_int(seed_key ^ (stream & _MASK32))
    return _hash32(stream_key ^ _hash32(indices & _MASK32) ^ _hash32((indices >> 32) + 0x85EBCA6B))


def gaussian(seed: int, indices: Tensor, shape: tuple[int, ...], *, stream: int = X_T_STREAM,
             dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
    """Standard normal noise of shape [len(indices), *shape]; row j belongs to sample ``indices[j]`` of ``seed``."""
    device = torch.device(device) if device is not None else indices.device
    indices = indices.to(device=device, dtype=torch.int64)
    numel = math.prod(shape)
    pairs = (numel + 1) // 2
    key = _key(seed, stream, indices)[:, None]
    counter = torch.arange(pairs, dtype=torch.int64, device=device)[None, :] * 2
    bits_a = _hash32(key ^ _hash32(counter))
    bits_b = _hash32(key ^ _hash32(counter + 1))
    # uniforms in (0, 1]: never log(0)
    u_a = (bits_a.to(torch.float64) + 1.0) / 4294967296.0
    u_b = bits_b.to(torch.float64) / 4294967296.0
    radius = torch.sqrt(-2.0 * torch.log(u_a))
    angle = 2.0 * math.pi * u_b
    normal = torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)[:, :numel]
    return normal.reshape(len(indices), *shape).to(dtype)


class NoiseStream:
    """The per-step noise of a stochastic solver for one batch: ``noise(step)`` is fresh N(0, I) like x."""

    def __init__(self, seed: int, indices: Tensor, shape: tuple[int, ...], dtype: torch.dtype,
                 device: torch.device | str) -> None:
        self.seed, self.indices, self.shape, self.dtype, self.device = seed, indices, shape, dtype, device

    def __call__(self, step: int) -> Tensor:
        return gaussian(self.seed, self.indices, self.shape, stream=1 + step, dtype=self.dtype, device=self.device)
