"""Low-precision storage for training, as pure functions: stochastic rounding
to bfloat16 and 8- or 4-bit block-wise quantization of optimizer moments.

Why: an AdamW step at lr 1e-5 moves a weight of 0.05 by ~1e-5, below half a
bfloat16 spacing there (~1e-4), so round-to-nearest throws the update away,
every step. Rounding up with probability equal to the remainder's share of the
spacing keeps the expected value of every update (unbiased), at no memory
cost. The same holds for a moment that decays by 0.1% a step (Adam's v):
stored to nearest in bfloat16 or 8 bits it could never decay.

The random bits are a hash of (entry position, a 32-bit seed): a counter-based
generator computed inside the consumer's kernel, so no random tensor of the
weight's size is materialised. Callers derive the seed from (run seed,
optimizer step, tensor), which makes a resumed run draw exactly the bits the
uninterrupted run would have.
"""

from __future__ import annotations

import zlib
from functools import lru_cache

import mlx.core as mx

from gmt_mlx.core.masking import index_hash, mix32

# Entries per quantization block of an 8-bit moment (one float32 scale each:
# 4/128 = 0.03 bytes per entry).
BLOCK = 128
# Signed 8-bit levels on each side of zero.
_LEVELS = 127.0


def noise_bits(shape, seed: mx.array, start: mx.array | None = None) -> mx.array:
    """32 pseudo-random bits (uint32) per entry of ``shape``, from ``seed`` (a uint32 scalar);
    ``start``: the shape is a slice of a larger tensor (masking.hash_start), with its bits."""
    return mix32(index_hash(tuple(shape), start) ^ seed)


def uniform_noise(shape, seed: mx.array, start: mx.array | None = None) -> mx.array:
    """Uniform noise in [0, 1) per entry (24 bits: what float32 holds exactly)."""
    return (noise_bits(shape, seed, start) >> 8).astype(mx.float32) * (1.0 / (1 << 24))


def round_to(x: mx.array, dtype: mx.Dtype, seed: mx.array | None = None, start: mx.array | None = None) -> mx.array:
    """``x`` (float32) in ``dtype``: stochastically rounded to bfloat16 when ``seed`` is given, else to nearest.

    Stochastic rounding adds 16 random bits below bfloat16's last mantissa
    bit and truncates: the result is the next value up with probability equal
    to the dropped bits' share of the spacing, so E[result] = x. Sign and
    magnitude are separate in IEEE floats, so negatives round symmetrically.
    Only bfloat16 (float32 with 16 bits cut off) is rounded this way; other
    dtypes round to nearest. ``start``: ``x`` is a slice of a larger tensor
    (masking.hash_start), rounded as the whole would be there.
    """
    if x.dtype == dtype:
        return x
    if seed is None or dtype != mx.bfloat16:
        return x.astype(dtype)
    return _stochastic_bfloat16(x, seed, start)


@mx.compile
def _stochastic_bfloat16(x: mx.array, seed: mx.array, start: mx.array | None) -> mx.array:
    # Compiled: called eagerly (layerwise's staged update), the hash's dozen
    # elementwise ops would each materialise a 4-byte array. (Inside another
    # compiled function it is traced inline.)
    bits = mx.view(x.astype(mx.float32), mx.uint32)
    noise = noise_bits(x.shape, seed, start) & mx.array(0xFFFF, mx.uint32)
    truncated = (bits + noise) & mx.array(0xFFFF0000, mx.uint32)
    return mx.view(truncated, mx.float32).astype(mx.bfloat16)  # exact: the low 16 bits are zero


def quantizable(shape) -> bool:
    """Whether a tensor can hold a block-wise 8-bit moment (whole blocks; small tensors stay float32)."""
    size = 1
    for n in shape:
        size *= n
    return size >= 16 * BLOCK and size % BLOCK == 0


def blocks_of(x: mx.array) -> mx.array:
    """``x`` as rows of BLOCK entries (a view of a contiguous array)."""
    return x if x.ndim == 2 and x.shape[1] == BLOCK else x.reshape(-1, BLOCK)


def _block_max_abs(blocks: mx.array) -> mx.array:
    # max(max, -min) rather than max(abs): two reductions that read the blocks
    # as they are, where abs would be materialised first (a float32 copy).
    return mx.maximum(mx.max(blocks, axis=-1, keepdims=True), -mx.min(blocks, axis=-1, keepdims=True))


def pack4(codes: mx.array) -> mx.array:
    """Codes in 0..15 (any integer dtype, an even last dimension) two to a byte: (..., n) -> (..., n / 2) uint8."""
    pairs = codes.astype(mx.uint8).reshape(*codes.shape[:-1], -1, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack4(packed: mx.array) -> mx.array:
    """`pack4`'s codes again: (..., n / 2) uint8 -> (..., n) uint8."""
    return mx.stack([packed & 15, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)


def quantize_signed(
    x: mx.array, seed: mx.array, start: mx.array | None = None, bits: int = 8
) -> tuple[mx.array, mx.array]:
    """(codes, float32 scale per block of BLOCK entries): x ~ codes * scale, stochastically rounded.

    The scale is the block's largest |x| / 127, so the largest entry is exact
    and the others are unbiased to within one step. 8 bits: int8 codes in x's
    shape; 4 bits: powers of two (`_LOG_LEVELS`), two codes a byte (`pack4`),
    x's shape with half its last dimension. x given as blocks (`blocks_of`) avoids
    a reshaped copy inside a compiled update.
    """
    blocks = blocks_of(x.astype(mx.float32))
    if bits == 4:
        codes, scale = _quantize_signed4(blocks, seed, start)
        return codes.reshape(*x.shape[:-1], -1), scale
    scale = _block_max_abs(blocks) / _LEVELS
    safe = mx.where(scale > 0, scale, 1.0)
    codes = mx.clip(mx.floor(blocks / safe + uniform_noise(blocks.shape, seed, start)), -_LEVELS, _LEVELS)
    return codes.astype(mx.int8).reshape(x.shape), scale.reshape(-1)


# 4-bit m: a sign and 3 bits of magnitude, levels 0 and 2^-6 .. 2^0 of the
# block's largest |m| (powers of two: finer near zero, where most of a block
# lies). Linear levels (-7..7) with stochastic rounding converged to a loss
# 4x float32's on tests/test_precision.py's regression, these to 2x; nearest
# rounding to 40x. (Li et al. 2023 found the same for 4-bit Adam: a dynamic
# exponent map for m.)
_LOG_LEVELS = 7


@mx.compile
def _quantize_signed4(blocks: mx.array, seed: mx.array, start: mx.array | None) -> tuple[mx.array, mx.array]:
    """(packed codes of ``blocks``' shape with half the columns, float32 scale per block): `quantize_signed` in 4 bits.

    Each |x| / scale lies between two neighbouring levels and is rounded to
    one of them with the probability that keeps its expected value (stochastic rounding).
    """
    scale = _block_max_abs(blocks)
    safe = mx.where(scale > 0, scale, 1.0)
    a = mx.minimum(mx.abs(blocks) / safe, 1.0)
    smallest = 2.0 ** (1 - _LOG_LEVELS)
    level = mx.where(a >= smallest, mx.floor(mx.log2(mx.maximum(a, smallest))) + _LOG_LEVELS, 0.0)
    lower = mx.where(level > 0, mx.power(2.0, level - _LOG_LEVELS), 0.0)
    upper = mx.power(2.0, level + 1 - _LOG_LEVELS)
    up = uniform_noise(blocks.shape, seed, start) < (a - lower) / (upper - lower)
    magnitude = mx.minimum(level + up, _LOG_LEVELS)
    return pack4(magnitude + 8.0 * (blocks < 0)), scale.reshape(-1)


def _dequantize_signed4(codes: mx.array) -> mx.array:
    nibble = unpack4(codes).astype(mx.float32)
    negative = nibble >= 8
    magnitude = nibble - 8.0 * negative
    return mx.where(magnitude > 0, mx.power(2.0, magnitude - _LOG_LEVELS), 0.0) * mx.where(negative, -1.0, 1.0)


def dequantize_signed(codes: mx.array, scale: mx.array, shape=None, bits: int = 8) -> mx.array:
    """float32 values of `quantize_signed`'s codes, in ``shape`` (default: the codes', unpacked)."""
    values = codes.astype(mx.float32) if bits == 8 else _dequantize_signed4(codes)
    blocks = blocks_of(values) * scale[:, None]
    return blocks.reshape(values.shape if shape is None else shape)


def quantize_root(v: mx.array, seed: mx.array, bits: int = 8) -> tuple[mx.array, mx.array]:
    """(uint8 codes, float32 scale per block) of a non-negative second moment, stored as sqrt(v).

    Why it does not diverge, where a plain 8-bit v does: Adam divides by
    sqrt(v), so a v rounded towards zero blows the update up. Storing sqrt(v)
    halves the dynamic range in bits; stochastic rounding keeps it unbiased
    (deterministic rounding could never let v decay by Adam's 0.1% a step);
    and no non-zero v is ever stored as 0: the smallest code for one is 1
    (1/255 of its block's largest sqrt(v); 4 bits: 1/15), so the division is
    bounded: a small v is stored too large, which shrinks its update, never too small.
    """
    codes, scale = quantize_sqrt(mx.sqrt(v.astype(mx.float32)), seed, bits=bits)
    return codes.reshape(*v.shape[:-1], -1), scale


def quantize_sqrt(
    root: mx.array, seed: mx.array, start: mx.array | None = None, bits: int = 8
) -> tuple[mx.array, mx.array]:
    """`quantize_root` given sqrt(v) (which Adam's update needs too): codes in root's shape (4 bits: packed)."""
    top = 255.0 if bits == 8 else 15.0
    blocks = blocks_of(root)
    scale = mx.max(blocks, axis=-1, keepdims=True) / top
    safe = mx.where(scale > 0, scale, 1.0)
    codes = mx.floor(blocks / safe + uniform_noise(blocks.shape, seed, start))
    codes = mx.clip(mx.where(blocks > 0, mx.maximum(codes, 1.0), 0.0), 0, top)
    if bits == 4:
        return pack4(codes).reshape(*root.shape[:-1], -1), scale.reshape(-1)
    return codes.astype(mx.uint8).reshape(root.shape), scale.reshape(-1)


def dequantize_root(codes: mx.array, scale: mx.array, shape=None, bits: int = 8) -> mx.array:
    """float32 v from `quantize_root`'s codes (the square of the stored root), in ``shape`` (default: the codes',
    unpacked)."""
    values = (codes if bits == 8 else unpack4(codes)).astype(mx.float32)
    root = blocks_of(values) * scale[:, None]
    return mx.square(root).reshape(values.shape if shape is None else shape)


# Salts that give the weights and each moment their own random stream.
SALT_WEIGHTS, SALT_M, SALT_V = 0x5EED0001, 0x5EED0002, 0x5EED0003


def step_seed(run_seed: int, step: mx.array) -> mx.array:
    """A uint32 seed for one optimizer step (``step``: the optimizer's step counter)."""
    return mix32(step.astype(mx.uint32) * mx.array(0x9E3779B9, mx.uint32) ^ mx.array(run_seed & 0xFFFFFFFF, mx.uint32))


def tensor_seed(seed: mx.array, name: str, salt: int) -> mx.array:
    """The step seed made specific to one tensor (by its parameter path) and one use (``salt``)."""
    return mix32(seed ^ mx.array((zlib.crc32(name.encode()) ^ salt) & 0xFFFFFFFF, mx.uint32))


@lru_cache(maxsize=8)
def _ones(n: int) -> mx.array:
    return mx.ones((n,), mx.float32)


def sum_of_squares(g: mx.array) -> mx.array:
    """sum(g ** 2) in float32: squares summed in rows of <= 64 by a matrix-vector product.

    On CPU, mx.sum over a whole tensor is one sequential float32 loop: slow,
    and over a 28M-entry embedding gradient off by ~0.4% against float64. The
    BLAS's vectorised row sums made the whole norm of SmolLM2-135M's
    (contiguous, see trainer.make_step_fns) gradient 1.5x faster, within 1e-5 of float64.
    mx.square, not ** 2: an uncompiled power costs ~5x more.
    """
    flat = g.reshape(-1).astype(mx.float32)
    cols = 64
    while flat.size % cols:
        cols //= 2
    return mx.sum(mx.square(flat.reshape(-1, cols)) @ _ones(cols))
