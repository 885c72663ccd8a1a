"""NF4 storage for frozen weights (QLoRA), bit-compatible with bitsandbytes.

A frozen kernel is kept as packed 4-bit NormalFloat codes plus one scale
(absmax) per block of 64 values, optionally with the scales themselves
quantised to 8 bits in blocks of 256 ("double quantisation"). Only those
arrays stay resident; `nf4_dequantize` rebuilds the float kernel inside the
compiled step, one layer at a time.

The algorithm is the one bitsandbytes runs on the CPU (its test oracle in
`tests/test_quant.py`), so that for the same weights the dequantised values
are bit-identical to `dequantize_4bit(quantize_4bit(w, blocksize=64,
quant_type="nf4", compress_statistics=...))`:

* the tensor is flattened in C order and cut into blocks of `block_size`;
  the last block may be short (it is not padded with zeros for the absmax);
* full blocks are scaled by `x * (1 / absmax)`, the short tail block by
  `x / absmax` (bitsandbytes does it this way; the two differ in the last bit);
* each scaled value takes the code of the nearest NF4 level; a value exactly
  half-way between two levels takes the lower code;
* two codes per byte, the first element in the high nibble; an odd count is
  padded with the code of 0.0 (7);
* double quantisation subtracts the mean of the absmax values (the "offset",
  summed in torch's float32 order) and quantises the rest with bitsandbytes'
  signed 8-bit dynamic codebook in blocks of 256, through the same
  65536-bin lookup table its CPU kernel uses (nearly, not exactly, nearest).

bitsandbytes 0.50's AVX-512 CPU `dequantize_4bit` mis-indexes the absmax of
tensors whose last dimension is even but not a multiple of the block (e.g.
(2, 96)); there it disagrees with its own quantiser and its CUDA / generic
kernels. We follow the flat-block definition those share.

Quantisation runs once, at load time, in numpy on the host (exact IEEE float32
arithmetic, no dependence on an accelerator's rounding). Dequantisation is
pure `jax.numpy` and jit-able.

`Int8Rows` is the other frozen format here: a table (the tied token
embedding, `quant.embedding=int8`) kept as int8 rows with one float32 scale
per row, Keras' own abs-max quantisation (`keras.quantizers.abs_max_quantize`,
as KerasHub's int8 `ReversibleEmbedding`).

Example:

    w = np.random.default_rng(0).standard_normal((256, 512)).astype("float32")
    q = nf4_quantize(w, double_quant=True)
    w_hat = jax.jit(nf4_dequantize)(q)          # (256, 512) float32
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import keras
import numpy as np

from gemma4_keras.model.xla_workarounds import no_cotangent, tie_to

__all__ = [
    "DYNAMIC_8BIT_CODEBOOK",
    "Int8Rows",
    "NF4_CODEBOOK",
    "NF4Kernel",
    "NF4Weight",
    "nf4_dequantize",
    "nf4_dequantize_expert",
    "nf4_leaf_specs",
    "nf4_matmul",
    "nf4_quantize",
    "nf4_quantize_experts",
]

# The 16 NormalFloat levels (QLoRA, Dettmers et al. 2023), as float32, exactly
# the table bitsandbytes hard-codes in `get_4bit_type("nf4")`.
NF4_CODEBOOK = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=np.float32,
)
NF4_CODEBOOK.setflags(write=False)

# Decision boundaries: a scaled value v gets the first code i with v <= bound[i]
# (torch.bucketize, right=False), so exact midpoints fall to the lower code.
_NF4_BOUNDS = ((NF4_CODEBOOK[:-1] + NF4_CODEBOOK[1:]) / np.float32(2)).astype(
    np.float32
)
_NF4_ZERO_CODE = 7  # NF4_CODEBOOK[7] == 0.0; bitsandbytes pads odd counts with it.

DOUBLE_QUANT_BLOCK_SIZE = 256  # bitsandbytes' fixed block for the absmax codes.
_LUT_SIZE = 65536  # bins of bitsandbytes' CPU 8-bit quantisation table

# torch's CPU float32 sum (which gives bitsandbytes' offset via `absmax.mean()`)
# accumulates in Vectorized<float> registers of this many lanes.
_TORCH_SUM_LANES = 8


def _torch_linspace_float32(start: float, end: float, steps: int) -> np.ndarray:
    """`torch.linspace(start, end, steps, dtype=torch.float32)`, bit for bit.

    torch fills the first half as `start + step * i` and the second half as
    `end - step * (steps - 1 - i)`, each a fused multiply-add in its CPU
    kernel (a single rounding), which float64 arithmetic rounded once to
    float32 reproduces exactly for these small integers.
    """
    start32, end32 = np.float32(start), np.float32(end)
    step = np.float32((end32 - start32) / np.float32(steps - 1))
    idx = np.arange(steps, dtype=np.float64)
    low = np.float64(start32) + np.float64(step) * idx
    high = np.float64(end32) - np.float64(step) * (steps - 1 - idx)
    return np.where(idx < steps // 2, low, high).astype(np.float32)


def _dynamic_8bit_codebook() -> np.ndarray:
    """bitsandbytes' signed 8-bit dynamic map (`create_dynamic_map()` defaults).

    Each of 7 decades 1e-6 .. 1 holds 2**i fraction levels (the midpoints of
    `linspace(0.1, 1, 2**i + 1)`), mirrored for negatives, plus 0 and 1; 256
    sorted levels.
    """
    levels: list[np.ndarray] = []
    for i in range(7):
        bounds = _torch_linspace_float32(0.1, 1.0, 2**i + 1)
        means = ((bounds[:-1] + bounds[1:]) / np.float32(2)).astype(np.float32)
        scale = np.float32(10.0 ** (i - 6))
        levels += [scale * means, -scale * means]
    levels.append(np.array([0.0, 1.0], dtype=np.float32))
    code = np.sort(np.concatenate(levels).astype(np.float32))
    assert code.shape == (256,), code.shape
    return code


DYNAMIC_8BIT_CODEBOOK = _dynamic_8bit_codebook()
DYNAMIC_8BIT_CODEBOOK.setflags(write=False)


@dataclasses.dataclass(frozen=True)
class NF4Weight:
    """A tensor in block-wise NF4, as a JAX pytree.

    The arrays are the pytree's leaves (they go through `jax.jit` as traced
    arguments); `shape`, `block_size`, `dtype` and `batch_dims` are static
    aux data (part of the compiled program's signature). Leaves are numpy
    arrays after `nf4_quantize`; they may be replaced by jax arrays or Keras
    variable values.

    Attributes:
        packed: uint8 [*batch, ceil(n / 2)]; two codes per byte, the first
            value in the high nibble.
        absmax: float32 [*batch, ceil(n / block_size)] block scales, or None
            with double quantisation.
        absmax_codes: uint8 [*batch, ceil(n / block_size)] 8-bit codes of
            `absmax - absmax_offset` (double quantisation), else None.
        absmax_scales: float32 [*batch, ceil(n_blocks / 256)] scales of those
            codes, else None.
        absmax_offset: float32 [*batch] mean of the absmax values, else None.
        shape: the original tensor shape (static).
        block_size: values per absmax (static).
        dtype: the original dtype name (static), e.g. "bfloat16".
        batch_dims: leading axes of `shape` quantised independently (static);
            1 for a per-expert bank, else 0. `n` above is the size of one
            slice, `prod(shape[batch_dims:])`.

    Example:

        q = nf4_quantize(np.ones((64, 64), "float32"))
        leaves = jax.tree_util.tree_leaves(q)   # [packed, absmax]
        q.shape, q.block_size                   # ((64, 64), 64)
    """

    packed: Any
    absmax: Any = None
    absmax_codes: Any = None
    absmax_scales: Any = None
    absmax_offset: Any = None
    shape: tuple[int, ...] = ()
    block_size: int = 64
    dtype: str = "float32"
    batch_dims: int = 0

    @property
    def double_quant(self) -> bool:
        """Whether the block scales are themselves 8-bit quantised."""
        return self.absmax_codes is not None

    @property
    def size(self) -> int:
        """Number of weights represented (all batch slices)."""
        return math.prod(self.shape)


jax.tree_util.register_dataclass(
    NF4Weight,
    data_fields=["packed", "absmax", "absmax_codes", "absmax_scales", "absmax_offset"],
    meta_fields=["shape", "block_size", "dtype", "batch_dims"],
)


# --------------------------------------------------------------------------
# Quantisation (numpy, host, once at load time)
# --------------------------------------------------------------------------


def _as_float32_flat(w: Any) -> tuple[np.ndarray, tuple[int, ...], str]:
    """Host float32 copy of `w` in C order, its shape and its dtype name."""
    arr = np.asarray(w)  # jax arrays (incl. bfloat16 via ml_dtypes) -> host
    dtype = str(arr.dtype)
    if dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(
            f"nf4_quantize expects a float32, float16 or bfloat16 tensor, got "
            f"dtype {dtype}; cast the weight first."
        )
    if arr.size == 0:
        raise ValueError(f"nf4_quantize got an empty tensor of shape {arr.shape}.")
    # float16/bfloat16 -> float32 is exact, as in bitsandbytes' `A.float()`.
    return np.ascontiguousarray(arr, dtype=np.float32).reshape(-1), arr.shape, dtype


def _nf4_codes_and_absmax(
    x: np.ndarray, block_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """NF4 codes (uint8, unpacked) and float32 absmax of a flat float32 array."""
    n = x.size
    full = n - n % block_size
    blocks = x[:full].reshape(-1, block_size)
    absmax = np.abs(blocks).max(axis=1) if full else np.zeros(0, np.float32)
    # Multiply by the reciprocal (not divide): bitsandbytes does, and the two
    # round differently. 1e-38 guards all-zero blocks exactly like its clamp.
    inv = np.float32(1.0) / np.maximum(absmax, np.float32(1e-38))
    scaled = [np.clip(blocks * inv[:, None], -1.0, 1.0).reshape(-1)]
    if full < n:
        tail = x[full:]
        tail_max = np.abs(tail).max()
        absmax = np.append(absmax, tail_max).astype(np.float32)
        # The short tail block is divided, again as bitsandbytes does.
        scaled.append(np.clip(tail / np.maximum(tail_max, np.float32(1e-38)), -1, 1))
    codes = np.searchsorted(_NF4_BOUNDS, np.concatenate(scaled), side="left")
    return codes.astype(np.uint8), absmax


def _pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """Two 4-bit codes per byte, first in the high nibble; odd count padded."""
    if codes.size % 2:
        codes = np.append(codes, np.uint8(_NF4_ZERO_CODE))
    return ((codes[0::2] << 4) | codes[1::2]).astype(np.uint8)


def _torch_float32_sum(x: np.ndarray, lanes: int = _TORCH_SUM_LANES) -> np.float32:
    """The float32 sum of a 1-D array in the order torch's CPU kernel adds it.

    bitsandbytes' offset is `absmax.mean()` in torch, i.e. a float32 sum
    divided by n; its last bit depends on the order of the additions, so we
    repeat that order (torch's cascade sum: `lanes`-wide vector accumulators,
    4 of them interleaved, cascaded every 16 steps). It matches torch run on
    one thread, or on any number of threads below 32768 values (torch splits
    larger sums across its threads).
    """
    x = np.asarray(x, dtype=np.float32).reshape(-1)
    n = x.size
    if n >= lanes:
        n_vec = n // lanes
        vec_acc = _row_sum(x[: n_vec * lanes].reshape(n_vec, lanes))
        total = np.float32(0.0)
        for value in x[n_vec * lanes :]:  # scalar tail first, then the lanes
            total = np.float32(total + value)
        for value in vec_acc:
            total = np.float32(total + value)
    else:
        total = _row_sum(x.reshape(n, 1))[0] if n else np.float32(0.0)
    return np.float32(total)


def _row_sum(rows: np.ndarray) -> np.ndarray:
    """torch's `row_sum`: 4 interleaved accumulators over the rows of `rows`."""
    n = rows.shape[0]
    n_ilp = n // 4
    partial = _multi_row_sum(rows[: n_ilp * 4].reshape(n_ilp, 4, *rows.shape[1:]))
    for i in range(n_ilp * 4, n):
        partial[0] += rows[i]
    for k in range(1, 4):
        partial[0] += partial[k]
    return partial[0]


def _multi_row_sum(rows: np.ndarray) -> np.ndarray:
    """torch's `multi_row_sum`: a 4-level cascade of float32 accumulators."""
    size = rows.shape[0]
    ceil_log2 = 1 if size <= 2 else int(size - 1).bit_length()
    power = max(4, ceil_log2 // 4)
    step, mask = 1 << power, (1 << power) - 1
    acc = np.zeros((4, *rows.shape[1:]), dtype=np.float32)
    i = 0
    while i + step <= size:
        for _ in range(step):
            acc[0] += rows[i]
            i += 1
        for level in range(1, 4):
            acc[level] += acc[level - 1]
            acc[level - 1] = 0.0
            if i & (mask << (level * power)):
                break
    for j in range(i, size):
        acc[0] += rows[j]
    for level in range(1, 4):
        acc[0] += acc[level]
    return acc[0]


@functools.cache
def _dynamic_lookup_table() -> np.ndarray:
    """bitsandbytes' 65536-bin table from a normalised value to an 8-bit code.

    Its CPU quantiser does not search the codebook: it cuts [-1, 1] into
    65536 evenly spaced bins and gives every value in a bin the code nearest
    to the bin's centre (ties to the lower code). This is that table.
    """
    code = DYNAMIC_8BIT_CODEBOOK
    midpoints = (np.float32(0.5) * (code[:-1] + code[1:])).astype(np.float32)
    bins = np.arange(_LUT_SIZE, dtype=np.float32)
    centres = np.float32(-1.0) + (np.float32(2.0) * bins) / np.float32(_LUT_SIZE - 1)
    # code index = number of midpoints strictly below the centre
    return np.searchsorted(midpoints, centres, side="left").astype(np.uint8)


def _quantize_8bit_blockwise(
    x: np.ndarray, block_size: int = DOUBLE_QUANT_BLOCK_SIZE
) -> tuple[np.ndarray, np.ndarray]:
    """bitsandbytes' CPU `quantize_blockwise` with the dynamic 8-bit codebook.

    Returns the uint8 codes and the float32 absmax per block of `block_size`.
    The code of a value is looked up in a 65536-bin table (see
    `_dynamic_lookup_table`), which is what bitsandbytes does; it is not always
    the nearest level (a value within ~1.5e-5 of a midpoint may round the
    other way).
    """
    n = x.size
    n_blocks = -(-n // block_size)
    padded = np.zeros(n_blocks * block_size, dtype=np.float32)
    padded[:n] = x
    blocks = padded.reshape(n_blocks, block_size)
    scales = np.abs(blocks).max(axis=1)  # zero padding never raises a max
    # All-zero block: bitsandbytes writes code 0 (the scale 0 zeroes it anyway).
    inv = np.float32(1.0) / np.where(scales > 0, scales, np.float32(1.0))
    normed = np.clip(blocks * inv[:, None], -1.0, 1.0)
    # bin = trunc((v + 1) * 0.5 * 65535 + 0.5), the last multiply-add fused
    # into one rounding as bitsandbytes' x86 build (-mfma) compiles it.
    half_scaled = ((normed + np.float32(1.0)) * np.float32(0.5)).astype(np.float32)
    bins = (half_scaled.astype(np.float64) * (_LUT_SIZE - 1) + 0.5).astype(np.float32)
    codes = _dynamic_lookup_table()[bins.astype(np.int64)]
    codes[scales == 0] = 0
    return codes.reshape(-1)[:n], scales


def _quantize_flat(x: np.ndarray, block_size: int, double_quant: bool) -> dict:
    """Leaves of one independently quantised flat float32 slice."""
    codes, absmax = _nf4_codes_and_absmax(x, block_size)
    leaves = {"packed": _pack_nibbles(codes)}
    if not double_quant:
        leaves["absmax"] = absmax
        return leaves
    offset = np.float32(_torch_float32_sum(absmax) / np.float32(absmax.size))
    absmax_codes, absmax_scales = _quantize_8bit_blockwise(
        (absmax - offset).astype(np.float32)
    )
    leaves.update(
        absmax_codes=absmax_codes,
        absmax_scales=absmax_scales,
        absmax_offset=np.asarray(offset, dtype=np.float32),
    )
    return leaves


def _check_block_size(block_size: int) -> None:
    if block_size not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
        raise ValueError(
            f"block_size={block_size} is not supported; use a power of two "
            "from 32 to 4096 (QLoRA uses 64)."
        )


def nf4_quantize(
    w: Any, *, block_size: int = 64, double_quant: bool = False
) -> NF4Weight:
    """Quantises a float tensor to block-wise NF4, as bitsandbytes does.

    The tensor is flattened in C order (so a Keras kernel `(in, out)` and a
    torch weight `(out, in)` give different blocks, each matching bitsandbytes
    on that same tensor).

    Args:
        w: numpy or JAX array of any shape; float32, float16 or bfloat16.
        block_size: values per absmax scale (QLoRA: 64).
        double_quant: also quantise the absmax values to 8 bits in blocks of
            256 (bitsandbytes' `compress_statistics=True`): ~0.516 instead
            of 0.5625 bytes per weight.

    Returns:
        An `NF4Weight` with numpy leaves.

    Raises:
        ValueError: unsupported dtype or block size, or an empty tensor.

    Example:

        q = nf4_quantize(jnp.ones((3, 100), jnp.bfloat16), double_quant=True)
        q.packed.shape, q.absmax_codes.shape     # ((150,), (5,))
    """
    _check_block_size(block_size)
    x, shape, dtype = _as_float32_flat(w)
    leaves = _quantize_flat(x, block_size, double_quant)
    return NF4Weight(**leaves, shape=tuple(shape), block_size=block_size, dtype=dtype)


def nf4_quantize_experts(
    w: Any, *, block_size: int = 64, double_quant: bool = False
) -> NF4Weight:
    """Quantises a raw expert bank `(num_experts, d, f)` one expert at a time.

    Each expert gets its own blocks, absmax values and (with double
    quantisation) its own offset and 256-blocks, stacked along a leading
    expert axis (`batch_dims=1`). Per expert rather than the bank as one
    tensor, because:

    * an expert's bytes are a slice of every leaf, so a router can gather
      just the selected experts and dequantise only those, and an
      expert-parallel mesh can shard every leaf on axis 0;
    * one expert's statistics never depend on another's: the result equals
      bitsandbytes' `quantize_4bit(bank[e])` for each expert `e`.

    When `d * f` is a multiple of `block_size` (all Gemma 4 banks) the 4-bit
    codes and plain absmax are identical to quantising the whole bank;
    only the double-quant offset and its 256-blocks differ. The size cost is
    one float32 offset and at most one partial 256-block per expert.

    Args:
        w: array of shape (num_experts, ...), float32/float16/bfloat16.
        block_size: values per absmax scale.
        double_quant: 8-bit quantise the absmax values too.

    Returns:
        An `NF4Weight` with `batch_dims=1` and leaves of leading size
        `num_experts`; `nf4_dequantize` returns the bank's original shape.

    Example:

        bank = np.random.default_rng(0).standard_normal((4, 64, 96), "float32")
        q = nf4_quantize_experts(bank, double_quant=True)
        q.packed.shape                        # (4, 3072)
        nf4_dequantize(q).shape               # (4, 64, 96)
    """
    _check_block_size(block_size)
    arr = np.asarray(w)
    if arr.ndim < 2:
        raise ValueError(
            f"nf4_quantize_experts expects (num_experts, ...) with ndim >= 2, "
            f"got shape {arr.shape}; use nf4_quantize for a single tensor."
        )
    per_expert = [
        nf4_quantize(e, block_size=block_size, double_quant=double_quant) for e in arr
    ]
    stacked = {
        field: np.stack([getattr(q, field) for q in per_expert])
        for field in (
            "packed",
            "absmax",
            "absmax_codes",
            "absmax_scales",
            "absmax_offset",
        )
        if getattr(per_expert[0], field) is not None
    }
    return NF4Weight(
        **stacked,
        shape=tuple(arr.shape),
        block_size=block_size,
        dtype=per_expert[0].dtype,
        batch_dims=1,
    )


# --------------------------------------------------------------------------
# Dequantisation (pure jnp, inside the compiled step)
# --------------------------------------------------------------------------


def _blockwise_scale(
    values: jax.Array, scales: jax.Array, block_size: int, n: int
) -> jax.Array:
    """`values[i] * scales[i // block_size]` for the first n values, float32."""
    n_blocks = scales.shape[-1]
    padded = jnp.pad(values, (0, n_blocks * block_size - values.shape[-1]))
    return (padded.reshape(n_blocks, block_size) * scales[:, None]).reshape(-1)[:n]


def _dequantize_absmax(q: NF4Weight) -> jax.Array:
    """The float32 block scales of one slice (undoing double quantisation)."""
    if not q.double_quant:
        return jnp.asarray(q.absmax, jnp.float32)
    code = jnp.asarray(DYNAMIC_8BIT_CODEBOOK)[jnp.asarray(q.absmax_codes, jnp.int32)]
    absmax = _blockwise_scale(
        code,
        jnp.asarray(q.absmax_scales, jnp.float32),
        DOUBLE_QUANT_BLOCK_SIZE,
        q.absmax_codes.shape[-1],
    )
    # bitsandbytes rounds the product, then adds the offset. Compiled XLA
    # contracts a multiply feeding an add into one FMA (one rounding: a
    # different last bit); a select between them (a no-op except for NaN,
    # which XLA cannot assume away) keeps the two roundings.
    absmax = jnp.where(jnp.isnan(absmax), jnp.float32(0.0), absmax)
    return absmax + jnp.asarray(q.absmax_offset, jnp.float32)


def _dequantize_slice(q: NF4Weight, n: int) -> jax.Array:
    """Float32 values (flat, length n) of one independently quantised slice."""
    packed = jnp.asarray(q.packed, jnp.uint8)
    codes = jnp.stack([packed >> 4, packed & 0xF], axis=-1).reshape(-1)
    values = jnp.asarray(NF4_CODEBOOK)[codes.astype(jnp.int32)]
    return _blockwise_scale(values, _dequantize_absmax(q), q.block_size, n)


def nf4_dequantize(q: NF4Weight, dtype: Any = "float32") -> jax.Array:
    """Rebuilds the tensor from NF4: `code[q] * absmax`, then cast to `dtype`.

    Pure `jax.numpy`: call it inside `jax.jit` (or a Keras layer's `call`) so
    the float tensor only exists transiently within the compiled step.

    Args:
        q: from `nf4_quantize` / `nf4_quantize_experts` (numpy, jax or
            traced leaves).
        dtype: output dtype. The product is formed in float32 and rounded
            once to `dtype` (round to nearest even), as bitsandbytes does;
            pass `q.dtype` to get bitsandbytes' output dtype.

    Returns:
        A jax array of shape `q.shape` and dtype `dtype`.

    Example:

        q = nf4_quantize(w)                      # w: (d, f) float32
        w_hat = jax.jit(nf4_dequantize, static_argnames="dtype")(
            q, dtype="bfloat16")                 # (d, f) bfloat16
    """
    if q.batch_dims == 0:
        flat = _dequantize_slice(q, q.size)
    else:
        batch_shape = q.shape[: q.batch_dims]
        slice_size = math.prod(q.shape[q.batch_dims :])
        leading = math.prod(batch_shape)
        leaves, treedef = jax.tree_util.tree_flatten(q)
        flat_leaves = [
            jnp.reshape(leaf, (leading, *jnp.shape(leaf)[q.batch_dims :]))
            for leaf in leaves
        ]
        batched = jax.tree_util.tree_unflatten(treedef, flat_leaves)
        flat = jax.vmap(lambda s: _dequantize_slice(s, slice_size))(batched)
    return flat.astype(dtype).reshape(q.shape)


def nf4_dequantize_expert(q: NF4Weight, e: jax.Array, dtype: Any = "float32"):
    """Expert `e` of a per-expert bank (`nf4_quantize_experts`), dequantised.

    Only expert `e`'s codes and scales are read (a dynamic slice of each
    leaf, `e` may be traced): `nf4_dequantize(q)[e]` without the rest of
    the bank.

    Example:

        w3 = nf4_dequantize_expert(nf4_quantize_experts(bank), 3)  # bank[3]
    """
    if q.batch_dims != 1:
        raise ValueError(
            f"nf4_dequantize_expert needs a per-expert bank (batch_dims=1), got "
            f"batch_dims={q.batch_dims}; quantise it with nf4_quantize_experts."
        )
    one = jax.tree_util.tree_map(
        lambda leaf: jax.lax.dynamic_index_in_dim(leaf, e, keepdims=False), q
    )
    one = dataclasses.replace(one, shape=q.shape[1:], batch_dims=0)
    return nf4_dequantize(one, dtype)


@jax.custom_vjp
def nf4_matmul(x: jax.Array, q: NF4Weight) -> jax.Array:
    """`x @ nf4_dequantize(q, x.dtype).T`, one layer's kernel alive at a time.

    `q` holds an HF-layout (out, in) kernel; the result is [..., out]. The
    frozen kernel gets no gradient. The dequantisation depends on `x` in the
    forward pass and on the incoming gradient in the backward pass (which
    dequantises again rather than keeping the float kernel as a residual):
    a kernel's dequantisation otherwise depends on the weights alone, and
    XLA schedules those of every layer early and keeps them all alive (at
    E2B's size, 16 GiB of float32 kernels in one train step on a CPU), or
    merges the forward pass's with the rematerialised one.

    Example:

        y = nf4_matmul(x, nf4_quantize(w_hf))   # == x @ w_hf.T, dequantised
    """
    return x @ nf4_dequantize(tie_to(q, x, integers=True), dtype=x.dtype).T


def _nf4_matmul_fwd(x, q):
    return nf4_matmul(x, q), q


def _nf4_matmul_bwd(q, g):
    dx = g @ nf4_dequantize(tie_to(q, g, integers=True), dtype=g.dtype)
    return dx, jax.tree_util.tree_map(no_cotangent, q)


nf4_matmul.defvjp(_nf4_matmul_fwd, _nf4_matmul_bwd)


# --------------------------------------------------------------------------
# Keras holder
# --------------------------------------------------------------------------

_LEAF_DTYPES = {
    "packed": "uint8",
    "absmax": "float32",
    "absmax_codes": "uint8",
    "absmax_scales": "float32",
    "absmax_offset": "float32",
}


def _leaf_shapes(
    shape: Sequence[int], block_size: int, double_quant: bool, batch_dims: int
) -> dict[str, tuple[int, ...]]:
    """Shapes of the leaves `nf4_quantize(_experts)` produces for `shape`."""
    batch = tuple(shape[:batch_dims])
    n = math.prod(shape[batch_dims:])
    n_blocks = -(-n // block_size)
    shapes = {"packed": (*batch, -(-n // 2))}
    if double_quant:
        shapes["absmax_codes"] = (*batch, n_blocks)
        shapes["absmax_scales"] = (*batch, -(-n_blocks // DOUBLE_QUANT_BLOCK_SIZE))
        shapes["absmax_offset"] = batch
    else:
        shapes["absmax"] = (*batch, n_blocks)
    return shapes


def nf4_leaf_specs(
    shape: Sequence[int],
    block_size: int = 64,
    double_quant: bool = False,
    batch_dims: int = 0,
) -> dict[str, tuple[tuple[int, ...], str]]:
    """{leaf name: (shape, dtype)} of the variables `NF4Kernel` holds for `shape`.

    Example:

        nf4_leaf_specs((4096, 2560), double_quant=True)["absmax_codes"]
        # ((163840,), 'uint8')
    """
    shapes = _leaf_shapes(tuple(shape), block_size, double_quant, batch_dims)
    return {name: (tuple(s), _LEAF_DTYPES[name]) for name, s in shapes.items()}


class NF4Kernel(keras.layers.Layer):
    """A frozen kernel stored as NF4 in non-trainable Keras variables.

    Holds only the packed codes and scales (uint8 / float32 variables,
    `trainable=False`); no float copy of the kernel stays resident. Call
    `dequantize()` inside the owning layer's `call` so the float kernel is
    rebuilt within the compiled step. Assign it as an attribute of a Keras
    layer and its variables are tracked, saved and restored with that layer.

    Args:
        shape: the original kernel shape.
        block_size: values per absmax scale.
        double_quant: whether the absmax values are 8-bit quantised.
        source_dtype: dtype name of the weights that were quantised.
        batch_dims: 1 for a per-expert bank (see `nf4_quantize_experts`).
        **kwargs: `keras.layers.Layer` arguments (e.g. `name`).

    Example:

        class NF4Dense(keras.layers.Layer):
            def __init__(self, kernel, **kwargs):
                super().__init__(**kwargs)
                self.kernel = NF4Kernel.from_array(kernel, double_quant=True)

            def call(self, x):
                return x @ self.kernel.dequantize(x.dtype)
    """

    def __init__(
        self,
        shape: Sequence[int],
        block_size: int = 64,
        double_quant: bool = False,
        source_dtype: str = "float32",
        batch_dims: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(trainable=False, **kwargs)
        _check_block_size(block_size)
        self.kernel_shape = tuple(int(d) for d in shape)
        self.block_size = block_size
        self.double_quant = double_quant
        self.source_dtype = source_dtype
        self.batch_dims = batch_dims
        self._leaf_names = []
        shapes = _leaf_shapes(self.kernel_shape, block_size, double_quant, batch_dims)
        for field, leaf_shape in shapes.items():
            variable = self.add_weight(
                shape=leaf_shape,
                dtype=_LEAF_DTYPES[field],
                initializer="zeros",
                trainable=False,
                # Never autocast the float32 scales to a mixed-precision
                # compute dtype: dequantisation needs them exact.
                autocast=False,
                name=field,
            )
            setattr(self, field, variable)
            self._leaf_names.append(field)
        self.built = True

    @classmethod
    def from_array(
        cls,
        w: Any,
        *,
        block_size: int = 64,
        double_quant: bool = False,
        per_expert: bool = False,
        **kwargs: Any,
    ) -> NF4Kernel:
        """Quantises `w` and returns a holder with those values.

        Args:
            w: the float kernel (numpy or JAX).
            block_size: values per absmax scale.
            double_quant: 8-bit quantise the absmax values too.
            per_expert: quantise axis 0 slice by slice (`nf4_quantize_experts`).
            **kwargs: `keras.layers.Layer` arguments (e.g. `name`).

        Example:

            holder = NF4Kernel.from_array(w, double_quant=True, name="q_nf4")
        """
        quantize = nf4_quantize_experts if per_expert else nf4_quantize
        q = quantize(w, block_size=block_size, double_quant=double_quant)
        holder = cls(
            q.shape,
            block_size=block_size,
            double_quant=double_quant,
            source_dtype=q.dtype,
            batch_dims=q.batch_dims,
            **kwargs,
        )
        holder.assign_quantized(q)
        return holder

    def assign_quantized(self, q: NF4Weight) -> None:
        """Writes an `NF4Weight` of matching layout into the variables."""
        if (q.shape, q.block_size, q.double_quant, q.batch_dims) != (
            self.kernel_shape,
            self.block_size,
            self.double_quant,
            self.batch_dims,
        ):
            raise ValueError(
                f"NF4Weight layout (shape={q.shape}, block_size={q.block_size}, "
                f"double_quant={q.double_quant}, batch_dims={q.batch_dims}) does "
                f"not match this holder's (shape={self.kernel_shape}, "
                f"block_size={self.block_size}, double_quant={self.double_quant}, "
                f"batch_dims={self.batch_dims})."
            )
        for field in self._leaf_names:
            getattr(self, field).assign(getattr(q, field))

    def quantized(self) -> NF4Weight:
        """The current variable values as an `NF4Weight` (jit-friendly)."""
        leaves = {field: getattr(self, field).value for field in self._leaf_names}
        return NF4Weight(
            **leaves,
            shape=self.kernel_shape,
            block_size=self.block_size,
            dtype=self.source_dtype,
            batch_dims=self.batch_dims,
        )

    def dequantize(self, dtype: Any = "float32") -> jax.Array:
        """The float kernel, of the original shape, computed from the variables."""
        return nf4_dequantize(self.quantized(), dtype=dtype)

    def get_config(self) -> dict:
        config = super().get_config()
        config.pop("trainable", None)  # always frozen
        config.update(
            shape=self.kernel_shape,
            block_size=self.block_size,
            double_quant=self.double_quant,
            source_dtype=self.source_dtype,
            batch_dims=self.batch_dims,
        )
        return config


class Int8Rows(NamedTuple):
    """A frozen [rows, dim] table as int8 values, one float32 scale per row.

    Row r is `values[r] / scale[r]`: `keras.quantizers.abs_max_quantize`
    along the last axis (scale = 127 / (max |row| + epsilon)), the layout
    KerasHub's int8 `ReversibleEmbedding` keeps. Gemma 4's tied embedding
    (262,144 x 2816 at 26B-A4B) is 0.69 GiB this way instead of 1.40 in
    bfloat16. Its readers (`take`, the loss's `_dot`) convert a few rows at
    a time, never the whole table.

    A pytree of two arrays; `value` gives the arrays of a table whose fields
    are Keras variables (as `Variable.value` does), so the model's readers
    see the values Keras' stateless step passes in.

    Example:

        table = Int8Rows.quantize(np.ones((4, 8), "float32"))
        table.take(jnp.array([0, 3]), "float32").shape   # (2, 8)
    """

    values: Any  # int8 [rows, dim]
    scale: Any  # float32 [rows]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    @property
    def ndim(self) -> int:
        return len(self.values.shape)

    @property
    def value(self) -> Int8Rows:
        """The arrays of a table held in Keras variables."""
        return Int8Rows(self.values.value, self.scale.value)

    @staticmethod
    def quantize(rows: Any) -> Int8Rows:
        """Keras' abs-max int8 of float `rows` [n, dim], computed in float32
        on the host (numpy): (int8 [n, dim], float32 [n]) as JAX arrays."""
        values, scale = keras.quantizers.abs_max_quantize(
            np.asarray(rows, np.float32), axis=-1, to_numpy=True
        )
        return Int8Rows(values, jnp.reshape(scale, (-1,)))

    def take(self, ids: jax.Array, dtype: Any) -> jax.Array:
        """Rows `ids` [...] dequantised in float32, then cast: [..., dim] `dtype`
        (the rows of the float32 table `values / scale[:, None]`)."""
        rows = jnp.take(self.values, ids, axis=0).astype(jnp.float32)
        return (rows / jnp.take(self.scale, ids, axis=0)[..., None]).astype(dtype)

    def dequantize(self, dtype: Any = "float32") -> jax.Array:
        """The whole float table (tests and small tables only)."""
        return (self.values.astype(jnp.float32) / self.scale[:, None]).astype(dtype)
