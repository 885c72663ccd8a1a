"""NF4 quantisation against bitsandbytes (CPU) as the oracle.

bitsandbytes is only imported here; `gemma4_keras.model.quant` never imports it.
"""

import math

import jax
import jax.numpy as jnp
import keras
import numpy as np
import oracles
import pytest

from gemma4_keras.model import quant


def _torch():
    return oracles.need("torch")


def _bnb():
    """bitsandbytes' public functional API (the oracle)."""
    return oracles.need("bitsandbytes.functional")


def _bnb_quantize(w: np.ndarray, double_quant: bool):
    """bitsandbytes' packed codes and quant state for a numpy tensor."""
    torch = _torch()
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    tensor = torch.from_numpy(np.asarray(w, np.float32)).to(dtypes[str(w.dtype)])
    return _bnb().quantize_4bit(
        tensor, blocksize=64, quant_type="nf4", compress_statistics=double_quant
    )


def _bnb_flat_dequantize(packed, state) -> np.ndarray:
    """NF4 dequantisation from bitsandbytes' own codes, scales and codebook.

    Every factor comes from bitsandbytes' public API (its packed nibbles, its
    absmax, undone with its `dequantize_blockwise` for double quant, its NF4
    codebook); only the definition `code[nibble] * absmax[block]` (float32,
    then cast) is written here. bitsandbytes 0.50's AVX-512 CPU kernel
    indexes absmax per row, which is wrong when the last dimension is even
    but not a multiple of the block (e.g. (2, 96)): it then disagrees with
    its own quantiser and its CUDA kernel, so such shapes are checked only
    against this.
    """
    bnb = _bnb()
    absmax = state.absmax
    if state.nested:
        absmax = bnb.dequantize_blockwise(state.absmax, state.state2)
        absmax = absmax + state.offset
    absmax = absmax.float().numpy()
    code = bnb.get_4bit_type("nf4", device="cpu").float().numpy()
    codes = packed.numpy().reshape(-1)
    nibbles = np.stack([codes >> 4, codes & 15], axis=-1).reshape(-1)
    n = int(np.prod(state.shape))
    flat = code[nibbles[:n]] * np.repeat(absmax, 64)[:n]
    torch = _torch()
    return torch.from_numpy(flat).to(state.dtype).float().numpy()


def _to_numpy(x) -> np.ndarray:
    return np.asarray(jnp.asarray(x).astype(jnp.float32))


def test_nf4_codebook_is_bnb():
    expected = _bnb().get_4bit_type("nf4", device="cpu").numpy()
    assert quant.NF4_CODEBOOK.dtype == np.float32
    np.testing.assert_array_equal(quant.NF4_CODEBOOK, expected)


def test_dynamic_8bit_codebook_is_bnb():
    expected = _bnb().create_dynamic_map().numpy()
    np.testing.assert_array_equal(quant.DYNAMIC_8BIT_CODEBOOK, expected)


# (shape, whether bitsandbytes' public CPU dequantize_4bit is self-consistent)
SHAPES = [
    ((7,), True),  # one short block, odd count (padding nibble)
    ((64,), True),  # exactly one block
    ((3, 5), True),
    ((100, 37), True),  # n % 64 != 0, odd last dim
    ((33, 65), True),
    ((128, 256), True),
    ((300, 200), False),  # 938 blocks: 4 absmax blocks of 256, the last short
    ((4, 64, 128), True),  # expert bank, quantised as one tensor
    ((5, 64, 96), False),  # rows not aligned to blocks (bnb AVX-512 kernel bug)
]


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape,bnb_cpu_ok", SHAPES, ids=lambda v: str(v))
def test_matches_bitsandbytes(shape, bnb_cpu_ok, dtype, double_quant):
    rng = np.random.default_rng(math.prod(shape))
    w = (rng.standard_normal(shape) * 0.02).astype(np.float32)
    if w.size >= 192:
        w.reshape(-1)[64:128] = 0.0  # an all-zero block
    w = w.astype(jnp.bfloat16) if dtype == "bfloat16" else w

    packed, state = _bnb_quantize(w, double_quant)
    q = quant.nf4_quantize(w, block_size=64, double_quant=double_quant)

    np.testing.assert_array_equal(q.packed, packed.numpy().reshape(-1))
    if double_quant:
        assert q.absmax is None
        np.testing.assert_array_equal(q.absmax_codes, state.absmax.numpy())
        np.testing.assert_array_equal(q.absmax_scales, state.state2.absmax.numpy())
        assert q.absmax_offset == state.offset.numpy()
    else:
        np.testing.assert_array_equal(q.absmax, state.absmax.numpy())

    # Compiled, as in a train step (XLA must not fuse away bnb's roundings).
    nf4 = jax.jit(quant.nf4_dequantize, static_argnames="dtype")(q, dtype=dtype)
    assert nf4.shape == shape and nf4.dtype == jnp.dtype(dtype)
    ours = _to_numpy(nf4).reshape(-1)
    np.testing.assert_array_equal(ours, _bnb_flat_dequantize(packed, state).ravel())
    if bnb_cpu_ok:
        public = _bnb().dequantize_4bit(packed, state).float().numpy()
        np.testing.assert_array_equal(ours, public.reshape(-1))


def test_float16_input_matches_bitsandbytes():
    w = (np.random.default_rng(3).standard_normal((40, 72)) * 0.1).astype(np.float16)
    packed, state = _bnb().quantize_4bit(
        _torch().from_numpy(w), blocksize=64, quant_type="nf4", compress_statistics=True
    )
    q = quant.nf4_quantize(w, double_quant=True)
    np.testing.assert_array_equal(q.packed, packed.numpy().reshape(-1))
    ours = np.asarray(quant.nf4_dequantize(q, dtype="float16"))
    expected = _bnb().dequantize_4bit(packed, state).numpy()
    np.testing.assert_array_equal(ours, expected)


def test_ties_between_nf4_levels_take_the_lower_code():
    # A block scaled by 1.0 whose values sit exactly on the midpoints between
    # NF4 levels (and on the levels themselves): bnb rounds ties down.
    code = quant.NF4_CODEBOOK
    midpoints = ((code[:-1] + code[1:]) / np.float32(2)).astype(np.float32)
    block = np.zeros(64, np.float32)
    block[0] = 1.0
    block[1:16] = midpoints
    block[16:32] = code
    block[32:47] = np.nextafter(midpoints, np.float32(2))
    packed, _ = _bnb_quantize(block, double_quant=False)
    q = quant.nf4_quantize(block)
    np.testing.assert_array_equal(q.packed, packed.numpy().reshape(-1))
    codes = np.stack([q.packed >> 4, q.packed & 15], axis=-1).reshape(-1)
    np.testing.assert_array_equal(codes[1:16], np.arange(15))
    np.testing.assert_array_equal(codes[32:47], np.arange(1, 16))


def test_absmax_8bit_codes_match_bnb_at_bin_edges():
    # Values swept densely over [-1, 1], including exact bin centres and
    # edges of bitsandbytes' 65536-bin table, each block scaled by a leading 1.
    grid = np.concatenate(
        [
            np.linspace(-1.0, 1.0, 40001),
            np.arange(-65535, 65536, 7) / 65535,
            (np.arange(-65535, 65535, 7) + 0.5) / 65535,
        ]
    ).astype(np.float32)
    n_blocks = -(-grid.size // 255)
    body = np.zeros(n_blocks * 255, np.float32)
    body[: grid.size] = grid
    x = np.concatenate([np.ones((n_blocks, 1), np.float32), body.reshape(-1, 255)], 1)
    x = x.reshape(-1)
    expected, state = _bnb().quantize_blockwise(_torch().from_numpy(x), blocksize=256)
    codes, scales = quant._quantize_8bit_blockwise(x)
    np.testing.assert_array_equal(scales, state.absmax.numpy())
    np.testing.assert_array_equal(codes, expected.numpy())


@pytest.mark.parametrize("n", [1, 5, 8, 9, 31, 33, 64, 100, 255, 1000, 4097, 20000])
def test_offset_sum_order_matches_torch(n):
    x = np.abs(np.random.default_rng(n).standard_normal(n)).astype(np.float32)
    assert quant._torch_float32_sum(x) == _torch().from_numpy(x).sum().numpy()


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double"])
def test_expert_bank_per_expert_matches_bnb_per_expert(double_quant):
    bank = (np.random.default_rng(7).standard_normal((3, 48, 64)) * 0.02).astype(
        np.float32
    )
    q = quant.nf4_quantize_experts(bank, double_quant=double_quant)
    assert q.batch_dims == 1 and q.shape == bank.shape
    assert all(leaf.shape[0] == 3 for leaf in jax.tree_util.tree_leaves(q))
    full = _to_numpy(jax.jit(quant.nf4_dequantize)(q))
    assert full.shape == bank.shape
    for e in range(3):
        packed, state = _bnb_quantize(bank[e], double_quant)
        np.testing.assert_array_equal(q.packed[e], packed.numpy().reshape(-1))
        expected = _bnb().dequantize_4bit(packed, state).numpy()
        np.testing.assert_array_equal(full[e], expected)


def test_expert_bank_whole_and_per_expert_codes_agree():
    bank = np.random.default_rng(8).standard_normal((2, 64, 64)).astype(np.float32)
    whole = quant.nf4_quantize(bank)
    per_expert = quant.nf4_quantize_experts(bank)
    np.testing.assert_array_equal(whole.packed, per_expert.packed.reshape(-1))
    np.testing.assert_array_equal(whole.absmax, per_expert.absmax.reshape(-1))


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double"])
def test_dequantize_under_jit_holds_only_packed_data(double_quant):
    w = np.random.default_rng(1).standard_normal((256, 384)).astype(np.float32)
    q = quant.nf4_quantize(w, double_quant=double_quant)
    leaves = jax.tree_util.tree_leaves(q)
    expected_leaves = 4 if double_quant else 2
    assert len(leaves) == expected_leaves
    assert {leaf.dtype for leaf in leaves} <= {np.dtype("uint8"), np.dtype("float32")}

    compiled = jax.jit(quant.nf4_dequantize).lower(q).compile()
    resident = compiled.memory_analysis().argument_size_in_bytes
    assert resident == sum(leaf.nbytes for leaf in leaves)
    assert resident < 0.57 * w.size  # vs 4 bytes per float32 weight
    np.testing.assert_array_equal(
        np.asarray(compiled(q)), np.asarray(quant.nf4_dequantize(q))
    )


def _bytes_per_param(q: quant.NF4Weight) -> float:
    """Resident bytes per represented weight (codebooks not counted)."""
    leaves = jax.tree_util.tree_leaves(q)
    return sum(np.asarray(leaf).nbytes for leaf in leaves) / q.size


def test_bytes_per_param_4096_square():
    w = np.random.default_rng(0).standard_normal((4096, 4096), dtype=np.float32)
    plain = _bytes_per_param(quant.nf4_quantize(w))
    double = _bytes_per_param(quant.nf4_quantize(w, double_quant=True))
    assert plain == 0.5625  # 0.5 + 4 / 64
    assert double <= 0.52
    assert double == pytest.approx(0.5 + 1 / 64 + 4 / (64 * 256), abs=1e-6)


def test_reconstruction_error_is_bounded_by_the_codebook_gap():
    w = np.random.default_rng(2).standard_normal((64, 128)).astype(np.float32)
    q = quant.nf4_quantize(w)
    error = np.abs(np.asarray(quant.nf4_dequantize(q)) - w).reshape(-1, 64)
    largest_half_gap = np.max(np.diff(quant.NF4_CODEBOOK)) / 2
    assert np.all(error <= q.absmax[:, None] * largest_half_gap * (1 + 1e-6))


def test_nf4_kernel_holder():
    w = np.random.default_rng(4).standard_normal((96, 64)).astype(np.float32)
    holder = quant.NF4Kernel.from_array(w, double_quant=True, name="q_nf4")
    assert holder.trainable_weights == []
    variables = holder.non_trainable_weights
    assert len(variables) == 4
    assert not any(v.trainable for v in variables)
    assert {v.dtype for v in variables} == {"uint8", "float32"}
    assert (
        sum(math.prod(v.shape) * (1 if v.dtype == "uint8" else 4) for v in variables)
        < w.size
    )

    expected = np.asarray(
        quant.nf4_dequantize(quant.nf4_quantize(w, double_quant=True))
    )
    np.testing.assert_array_equal(np.asarray(holder.dequantize()), expected)
    bf16 = jax.jit(lambda: holder.dequantize("bfloat16"))()
    assert bf16.dtype == jnp.bfloat16 and bf16.shape == w.shape

    class NF4Dense(keras.layers.Layer):
        def __init__(self, kernel, **kwargs):
            super().__init__(**kwargs)
            self.kernel = quant.NF4Kernel.from_array(kernel, double_quant=True)

        def call(self, x):
            return keras.ops.matmul(x, self.kernel.dequantize(x.dtype))

    layer = NF4Dense(w)
    x = np.ones((2, 96), np.float32)
    out = layer(x)
    assert len(layer.non_trainable_weights) == 4 and layer.trainable_weights == []
    np.testing.assert_allclose(np.asarray(out), x @ expected, rtol=1e-5, atol=1e-5)

    # Under mixed precision the float32 scales must not be autocast to bf16.
    class Probe(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.kernel = quant.NF4Kernel.from_array(w, double_quant=True)

        def call(self, x):
            return self.kernel.dequantize("float32")

    inside_call = Probe(dtype="mixed_bfloat16")(x)
    np.testing.assert_array_equal(np.asarray(inside_call), expected)

    clone = quant.NF4Kernel.from_config(holder.get_config())
    clone.set_weights(holder.get_weights())
    np.testing.assert_array_equal(np.asarray(clone.dequantize()), expected)


def test_nf4_kernel_rejects_mismatched_layout():
    holder = quant.NF4Kernel((64, 64))
    with pytest.raises(ValueError, match="does not match"):
        holder.assign_quantized(
            quant.nf4_quantize(np.ones((64, 64), np.float32), double_quant=True)
        )


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        quant.nf4_quantize(np.ones((4, 4), np.int32))
    with pytest.raises(ValueError, match="block_size=48"):
        quant.nf4_quantize(np.ones((4, 4), np.float32), block_size=48)
    with pytest.raises(ValueError, match="empty"):
        quant.nf4_quantize(np.ones((0, 4), np.float32))
