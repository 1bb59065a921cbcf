"""Per-sample Gaussian noise from a counter-based generator.

Guarantees
----------
Every number is a pure function of (seed, stream, sample index, element index) for a given sample shape, so
sample i of seed s gets the same x_T and the same per-step noise whatever the batch size, the batch it falls in,
the order of the indices, the device or the executor. The random bits are identical on every device; the normals
differ across devices only by the last-ulp differences of their log/sin/cos. ``gaussian`` is vectorised over the
batch (no per-sample Python loop), never syncs with the host, does no host-to-device copy and keeps every shape
static, so it can be captured in a CUDA graph. Seeds, streams and sample indices are taken modulo 2**64 (indices
are int64, meant to be >= 0).

The generator (``GENERATOR``, for cache keys: it changes whenever the numbers do)
-----------------------------------------------------------------------------------
A sample's key is 64 bits, two 32-bit lanes, from (seed, stream, index): (seed, stream) is hashed on Python ints
(SplitMix64's finaliser) into a 63-bit salt per lane, so it costs no device work; on the device each lane folds
index ^ salt to 32 bits, low ^ (high * 0x7FEB352D mod 2**32), and hashes that. For indices below 2**32 this is a
bijection, so the samples of one (seed, stream) never share a key; two rows of different streams or seeds share
both keys with probability 2**-64 (with one 32-bit key, as in v1, a run of 50k samples and 256 stochastic steps
would hold some 19,000 pairs of identical noise rows). Box-Muller pair p of a sample takes one word per lane::

    word(lane, p) = lowbias32(key[lane] ^ lowbias32(2 * p + lane))

lowbias32 is Chris Wellons' 32-bit integer hash: two xorshift-multiply rounds with a very low avalanche bias, so
even keys or counters one bit apart give unrelated words. Both its multipliers are below 2**31, so a 32-bit word
times either is below 2**63: the words live in int64, every product is exact (a signed overflow would be undefined
behaviour in C++), and only int64 ``^ & >> *`` are used, which every device has. The first xorshift of lowbias32
is linear, so the outer one is applied to the key and to the counter's hash apart, on [batch] and [pairs]
tensors, not on the [batch, pairs] product.

Box-Muller turns the two words of a pair into two normals: the lane-0 word w gives the radius sqrt(-2 ln u) with
u = (w + 1/2) / 2**32 in (0, 1], the lane-1 word the angle 2 pi w / 2**32; element p < P of a sample is the
radius times cos(angle), element P + p the radius times sin(angle), P = ceil(numel / 2) (an odd numel drops the
last sine). Both uniforms have 32 bits, so the largest |z| is sqrt(-2 ln 2**-33) = 6.76 (torch.randn's 24-bit
uniforms stop at 5.77; P(|z| > 5.77) = 8e-9). float64 output is this transform in float64; float32 output is
the same transform of the same bits in float32 (u rounded to 24 significant bits: exact in the tail, within
~1e-4 near u = 1), so a float32 and a float64 run draw the same noise; float16 and bfloat16 are cast from float32.

Cost (python -m bench.tools.noise_cost)
---------------------------------------
The int64 multiply is torch's dearest integer op on the CPU (about 1 ns an element here, 3-4 times an xor; four
per pair), so hashing costs about what the Box-Muller transform does. Each of the ~18 elementwise ops of a block
is a pass over memory, so on the CPU the batch is cut into blocks of about ``CPU_BLOCK_PAIRS`` pairs per thread
whose buffers (40 bytes a pair) stay in the core's L2 cache from one op to the next: twice as fast as one pass
over a batch of 1024 3x32x32 samples. The blocks change no bit (every op is elementwise; tested); off the CPU the
batch is one block.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

GENERATOR = "lowbias32-boxmuller-v2"  # v1: one 32-bit key per sample, uniforms from lowbias32(key ^ lowbias32(i))
X_T_STREAM = 0  # the initial noise; solvers draw their per-step noise from streams 1, 2, ...
CPU_BLOCK_PAIRS = 1 << 15  # per thread: 1.3 MB of buffers, inside a core's 2 MB L2 cache

_MASK32 = 0xFFFFFFFF
_MASK64 = 0xFFFFFFFFFFFFFFFF
_LOWBIAS_MUL1, _LOWBIAS_MUL2 = 0x21F0AAAD, 0x735A2D97  # both < 2**31: exact products with 32-bit words in int64
_HIGH_HALF_MUL = 0x7FEB352D  # odd, < 2**31


def _mix64_int(z: int) -> int:
    """SplitMix64's finaliser on a Python int: a bijection of 64-bit values."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _lane_salts(seed: int, stream: int) -> tuple[int, int]:
    """Two 63-bit salts from (seed, stream), hashed on the host: a bijection of the seed for a fixed stream and of
    the stream for a fixed seed. 63 bits keep index ^ salt a valid int64."""
    state = _mix64_int(_mix64_int(seed & _MASK64) ^ (stream & _MASK64))
    return _mix64_int(state ^ 0x9E3779B97F4A7C15) >> 1, _mix64_int(state ^ 0x3C6EF372FE94F82A) >> 1


def _xorshift_(x: Tensor, shift: int, scratch: Tensor) -> Tensor:
    """x ^= x >> shift in place; x holds 32-bit words (>= 0), so the arithmetic shift is the logical one."""
    torch.bitwise_right_shift(x, shift, out=scratch)
    return x.bitwise_xor_(scratch)


def _lowbias32_rest_(x: Tensor, scratch: Tensor) -> Tensor:
    """lowbias32 after its first xorshift, in place on int64 32-bit words."""
    x.mul_(_LOWBIAS_MUL1).bitwise_and_(_MASK32)
    _xorshift_(x, 15, scratch)
    x.mul_(_LOWBIAS_MUL2).bitwise_and_(_MASK32)
    return _xorshift_(x, 15, scratch)


def _keys_and_pair_words(seed: int, stream: int, indices: Tensor, counters: Tensor) -> tuple[Tensor, Tensor]:
    """The two halves of every word's input, each already through lowbias32 and then through the first (linear)
    xorshift of the outer lowbias32: keys [batch, 2, 1], one 32-bit key per sample and lane, and pair words
    [2, pairs], lowbias32 of the word counters [pairs, 2] (2 p + lane, below 2**32). Both are hashed in one pass:
    on tensors this small an op costs its dispatch, not its arithmetic."""
    salt0, salt1 = _lane_salts(seed, stream)
    salted = torch.stack([indices ^ salt0, indices ^ salt1], dim=1)  # [batch, 2]: a 64-bit input per lane
    # bits 32-63 spread over all 32 bits, differently in each lane (|high| < 2**31: the product is exact)
    key_inputs = (salted >> 32).mul_(_HIGH_HALF_MUL).bitwise_xor_(salted).bitwise_and_(_MASK32)
    hashed = torch.cat([key_inputs, counters])
    hashed.bitwise_xor_(hashed >> 16)
    _lowbias32_rest_(hashed, torch.empty_like(hashed))
    hashed.bitwise_xor_(hashed >> 16)
    batch = len(indices)
    return hashed[:batch].unsqueeze(2), hashed[batch:].T.contiguous()


def random_words(seed: int, indices: Tensor, pairs: Tensor, *, stream: int = X_T_STREAM) -> Tensor:
    """The random bits behind ``gaussian``: int64 [len(indices), 2, len(pairs)], the 32-bit words of the given
    Box-Muller pairs (0 <= pair < 2**31) of the given samples, lane 0 for the radius, lane 1 for the angle.
    Bit-identical on every device."""
    pairs = pairs.to(torch.int64)
    counters = torch.stack([2 * pairs, 2 * pairs + 1], dim=1) & _MASK32
    keys, pair_words = _keys_and_pair_words(seed, stream, indices.to(torch.int64), counters)
    out = torch.bitwise_xor(keys, pair_words)
    return _lowbias32_rest_(out, torch.empty_like(out))


def _block_shape(batch: int, pairs: int, device: torch.device) -> tuple[int, int]:
    """(rows, pairs) per block: the whole batch off the CPU; on the CPU about CPU_BLOCK_PAIRS pairs per thread
    (torch splits each op over its threads, each with its own L2 cache), whole rows while a row fits, the rows
    spread evenly over the blocks (no near-empty last block)."""
    if device.type != "cpu":
        return max(batch, 1), max(pairs, 1)
    block_pairs = CPU_BLOCK_PAIRS * torch.get_num_threads()
    cols = max(1, min(pairs, block_pairs))
    row_blocks = max(1, math.ceil(batch * cols / block_pairs))
    return max(1, math.ceil(batch / row_blocks)), cols


def gaussian(seed: int, indices: Tensor, shape: tuple[int, ...], *, stream: int = X_T_STREAM,
             dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
    """Standard normal noise of shape [len(indices), *shape]; row j belongs to sample ``indices[j]`` of ``seed``."""
    if not dtype.is_floating_point:
        raise TypeError(f"gaussian noise needs a floating dtype, not {dtype}")
    device = torch.device(device) if device is not None else indices.device
    indices = indices.to(device=device, dtype=torch.int64)
    batch, numel = len(indices), math.prod(shape)
    pairs = (numel + 1) // 2
    if pairs > 2**31:
        raise ValueError(f"at most 2**32 elements per sample, not {numel}")
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    counters = torch.arange(2 * pairs, dtype=torch.int64, device=device).view(pairs, 2)  # 2 p + lane
    keys, pair_words = _keys_and_pair_words(seed, stream, indices, counters)
    half_step = torch.full((), 2.0**-33, dtype=compute, device=device)
    normal = torch.empty(batch, 2, pairs, dtype=compute, device=device)  # per sample: the cosines, then the sines
    rows, cols = _block_shape(batch, pairs, device)
    word_buffer = torch.empty(rows, 2, cols, dtype=torch.int64, device=device)
    scratch_buffer = torch.empty(rows, 2, cols, dtype=torch.int64, device=device)
    # the uniforms live in the scratch memory, free once the words are hashed: a smaller block in the cache
    buffers = (word_buffer, scratch_buffer, scratch_buffer.view(compute)[..., :cols])
    views: dict[tuple[int, int], tuple[Tensor, ...]] = {}  # per block shape (at most 4): a view costs a dispatch too
    for row in range(0, batch, rows):
        block_rows = min(rows, batch - row)
        row_keys, row_normal = keys.narrow(0, row, block_rows), normal.narrow(0, row, block_rows)
        for col in range(0, pairs, cols):
            block_cols = min(cols, pairs - col)
            if (block_rows, block_cols) not in views:
                x, scratch, uniform = (buffer[:block_rows, :, :block_cols] for buffer in buffers)
                radius, angle = uniform.select(1, 0), uniform.select(1, 1)
                views[block_rows, block_cols] = x, scratch, uniform, radius, angle, radius.unsqueeze(1)
            x, scratch, uniform, radius, angle, radius_both = views[block_rows, block_cols]
            whole_rows = block_cols == pairs  # the usual case: no column views to make
            torch.bitwise_xor(row_keys, pair_words if whole_rows else pair_words.narrow(1, col, block_cols), out=x)
            _lowbias32_rest_(x, scratch)
            uniform.copy_(x)  # exact in float64; float32 rounds to 24 significant bits
            torch.add(half_step, radius, alpha=2.0**-32, out=radius)  # u = (w + 1/2) / 2**32 in (0, 1]
            radius.log_().mul_(-2.0).sqrt_()
            angle.mul_(2.0 * math.pi * 2.0**-32)
            out = row_normal if whole_rows else row_normal.narrow(2, col, block_cols)
            torch.cos(angle, out=out.select(1, 0))
            torch.sin(angle, out=out.select(1, 1))
            out.mul_(radius_both)
    if numel % 2:  # drop the last sine of each sample (a copy, only for an odd numel)
        return normal.view(batch, 2 * pairs)[:, :numel].reshape(batch, *shape).to(dtype)
    return normal.view(batch, *shape).to(dtype)


class NoiseStream:
    """The per-step noise of a stochastic solver for one batch: ``noise(step)`` is fresh N(0, I) like x."""

    def __init__(self, seed: int, indices: Tensor, shape: tuple[int, ...], dtype: torch.dtype,
                 device: torch.device | str) -> None:
        self.seed, self.indices, self.shape, self.dtype, self.device = seed, indices, shape, dtype, device

    def __call__(self, step: int) -> Tensor:
        return gaussian(self.seed, self.indices, self.shape, stream=1 + step, dtype=self.dtype, device=self.device)
