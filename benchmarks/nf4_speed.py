"""Time of NF4 dequantisation and of an NF4 matmul, next to a float32 matmul.

Run:
    python benchmarks/nf4_speed.py                    # 7 interleaved rounds
    python benchmarks/nf4_speed.py --rounds 3 --tokens 512
    python benchmarks/nf4_speed.py --variants reference package   # fewer

Kernels of (2048, 512) and (512, 2048) (an MLP's gate/up and down at d 512),
block 64, with and without double quantisation, seeded N(0, 1) weights. It
times the jitted dequantisation `dequantize(q)` of each variant:

  reference    as it was before issue 17's change (nibble unpack by
               stack/reshape, an int32 gather into the 16 levels, scales
               through pad/reshape)
  package      `quant.nf4_dequantize` as it is now
  pairs        one gather of the packed byte into a 256 x 2 table of pairs
  uint8-index  the reference's unpack, gathered with uint8 indices (no
               negative-index select), scaled by broadcasting without pad
  select-tree  no gather: four levels of selects on the code's bits
  where-chain  no gather: 16 compare-and-selects

and the jitted gradient of `loss(nf4_matmul(norm(h), q))` with respect to
h at h [tokens, in] (forward and backward, the kernel dequantised by the
package in both passes, tied to x = an RMS norm of h in the forward pass and
to the incoming gradient, a chain of elementwise terms, in the backward
pass, as in a decoder block) with the `tie_to` of before issue 17
(`reference-tie`: the zero from `anchor[0]`) and the package's
(`package-tie`: the zero from a reduction). The float32 matmul with the same
norm and loss is printed for scale.

Every variant's output is checked bit for bit against `reference` (float32
and bfloat16) before it is timed. The rounds are interleaved (each variant
once per round), so a machine whose load drifts treats all alike; per
variant the best and median of `--rounds` calls are printed, in
milliseconds of wall time, and also of process CPU time (user + system,
all threads): on a shared machine the CPU time moves less with the load.
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from gemma4_keras.model import (
    quant,  # noqa: E402
    xla_workarounds,  # noqa: E402
)

SHAPES = ((2048, 512), (512, 2048))


# --- the dequantisation before this change (the baseline) ---------------------


def _reference_scale(values, scales, block_size, n):
    n_blocks = scales.shape[-1]
    padded = jnp.pad(values, (0, n_blocks * block_size - values.shape[-1]))
    return (padded.reshape(n_blocks, block_size) * scales[:, None]).reshape(-1)[:n]


def _reference_absmax(q):
    if not q.double_quant:
        return jnp.asarray(q.absmax, jnp.float32)
    codebook = jnp.asarray(quant.DYNAMIC_8BIT_CODEBOOK)
    code = codebook[jnp.asarray(q.absmax_codes, jnp.int32)]
    absmax = _reference_scale(
        code,
        jnp.asarray(q.absmax_scales, jnp.float32),
        quant.DOUBLE_QUANT_BLOCK_SIZE,
        q.absmax_codes.shape[-1],
    )
    absmax = jnp.where(jnp.isnan(absmax), jnp.float32(0.0), absmax)
    return absmax + jnp.asarray(q.absmax_offset, jnp.float32)


def reference_dequantize(q, dtype="float32"):
    """`quant.nf4_dequantize` before issue 17 (batch_dims=0 only)."""
    packed = jnp.asarray(q.packed, jnp.uint8)
    codes = jnp.stack([packed >> 4, packed & 0xF], axis=-1).reshape(-1)
    values = jnp.asarray(quant.NF4_CODEBOOK)[codes.astype(jnp.int32)]
    flat = _reference_scale(values, _reference_absmax(q), q.block_size, q.size)
    return flat.astype(dtype).reshape(q.shape)


# --- alternatives (all bit-identical to the reference) -------------------------

# byte b -> (level of its high nibble, level of its low nibble)
_PAIRS = np.stack(
    [np.repeat(quant.NF4_CODEBOOK, 16), np.tile(quant.NF4_CODEBOOK, 16)], axis=-1
)


def _scale_blocks(values, q, dtype):
    """values [n_blocks, block] * absmax per block (n a multiple of the block)."""
    absmax = quant._dequantize_absmax(q)
    return (values * absmax[:, None]).astype(dtype).reshape(q.shape)


def pairs_dequantize(q, dtype="float32"):
    """One gather of the packed byte into a 256 x 2 table of level pairs."""
    values = jnp.asarray(_PAIRS)[q.packed]  # uint8 index: no wrap-around select
    return _scale_blocks(values.reshape(-1, q.block_size), q, dtype)


def uint8_index_dequantize(q, dtype="float32"):
    """The reference's unpack, gathered with uint8 indices, scaled without pad."""
    packed = q.packed
    codes = jnp.stack([packed >> 4, packed & 0xF], axis=-1)
    values = jnp.asarray(quant.NF4_CODEBOOK)[codes]
    return _scale_blocks(values.reshape(-1, q.block_size), q, dtype)


def _select_tree(codes):
    levels = [jnp.float32(v) for v in quant.NF4_CODEBOOK]
    for bit in range(4):
        high = (codes & (1 << bit)) != 0
        levels = [
            jnp.where(high, levels[i + 1], levels[i]) for i in range(0, len(levels), 2)
        ]
    return levels[0]


def select_tree_dequantize(q, dtype="float32"):
    """No gather: four levels of selects on the code's bits."""
    packed = q.packed
    values = jnp.stack([_select_tree(packed >> 4), _select_tree(packed & 0xF)], -1)
    return _scale_blocks(values.reshape(-1, q.block_size), q, dtype)


def where_chain_dequantize(q, dtype="float32"):
    """No gather: 16 compare-and-selects (a one-hot without the dot)."""
    packed = q.packed
    codes = jnp.stack([packed >> 4, packed & 0xF], axis=-1).reshape(-1, q.block_size)
    values = jnp.zeros(codes.shape, jnp.float32)
    for code, level in enumerate(quant.NF4_CODEBOOK):
        values = jnp.where(codes == code, level, values)
    return _scale_blocks(values, q, dtype)


VARIANTS = {
    "reference": reference_dequantize,
    "package": quant.nf4_dequantize,
    "pairs": pairs_dequantize,
    "uint8-index": uint8_index_dequantize,
    "select-tree": select_tree_dequantize,
    "where-chain": where_chain_dequantize,
}


def reference_tie_to(tree, anchor, integers=False):
    """`quant.tie_to` before issue 17: the zero from `anchor[0]`."""
    zero = jnp.ravel(anchor)[0].astype(jnp.float32) * jnp.float32(0)

    def tie(leaf):
        if jnp.issubdtype(leaf.dtype, jnp.floating) or (
            integers and jnp.issubdtype(leaf.dtype, jnp.integer)
        ):
            return leaf + zero.astype(leaf.dtype)
        return leaf

    return jax.tree_util.tree_map(tie, tree)


TIES = {"reference-tie": reference_tie_to, "package-tie": xla_workarounds.tie_to}


# --- timing -------------------------------------------------------------------


def timed(fn, *args):
    """(wall ms, cpu ms) of one call, waiting for the result."""
    c0, t0 = time.process_time(), time.perf_counter()
    jax.block_until_ready(fn(*args))
    return (time.perf_counter() - t0) * 1e3, (time.process_time() - c0) * 1e3


def _norm(h):
    """An RMS norm: as in a decoder block, x (the forward anchor) is a chain."""
    return h * jax.lax.rsqrt(jnp.mean(h * h, -1, keepdims=True) + 1e-6) * 1.5


def _loss(y):
    """The cotangent of y (the backward anchor) is a chain too."""
    return jnp.sum(y * jnp.tanh(y))


def matmul_fwd_bwd(dequantize, tie):
    """jit of d loss(x @ W.T) / d h, x = norm(h), W dequantised in both passes."""

    @jax.custom_vjp
    def mm(x, q):
        return x @ dequantize(tie(q, x, integers=True), x.dtype).T

    def fwd(x, q):
        return mm(x, q), q

    def bwd(q, g):
        w = dequantize(tie(q, g, integers=True), g.dtype)
        return g @ w, jax.tree_util.tree_map(xla_workarounds.no_cotangent, q)

    mm.defvjp(fwd, bwd)
    return jax.jit(jax.grad(lambda h, q: _loss(mm(_norm(h), q))))


@jax.jit
def float_fwd_bwd(h, w):
    return jax.grad(lambda h: _loss(_norm(h) @ w.T))(h)


def bits(a) -> np.ndarray:
    """The array's bit patterns (so -0.0 != 0.0 and NaNs compare)."""
    a = np.asarray(a)
    return a.view(f"uint{8 * a.dtype.itemsize}")


def check_exact(q, variants) -> None:
    """Exits unless every variant equals the reference bit for bit."""
    for name, fn in variants.items():
        for dtype in ("float32", "bfloat16"):
            got = jax.jit(fn, static_argnames="dtype")(q, dtype=dtype)
            if not np.array_equal(bits(got), bits(reference_dequantize(q, dtype))):
                raise SystemExit(f"{name} ({dtype}) differs from reference")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7, help="timed calls per case")
    p.add_argument("--tokens", type=int, default=2048, help="rows of x")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    args = p.parse_args()
    variants = {name: VARIANTS[name] for name in args.variants}
    rng = np.random.default_rng(0)
    print(f"jax {jax.__version__}, {os.cpu_count()} cpus, load {os.getloadavg()}")
    for shape in SHAPES:
        w = rng.standard_normal(shape, dtype=np.float32)
        x = jnp.asarray(rng.standard_normal((args.tokens, shape[1]), dtype=np.float32))
        for double_quant in (True, False):
            q = jax.tree_util.tree_map(
                jnp.asarray, quant.nf4_quantize(w, double_quant=double_quant)
            )
            check_exact(q, variants)
            w_hat = reference_dequantize(q)
            cases = {"float32 matmul fwd+bwd": (float_fwd_bwd, (x, w_hat))}
            for name, fn in variants.items():
                cases[f"{name} dequantize"] = (jax.jit(fn), (q,))
            for tie_name, tie in TIES.items():
                matmul = matmul_fwd_bwd(quant.nf4_dequantize, tie)
                cases[f"nf4 matmul fwd+bwd, {tie_name}"] = (matmul, (x, q))
            for fn, fn_args in cases.values():
                jax.block_until_ready(fn(*fn_args))  # compile
            times = {case: [] for case in cases}
            for _ in range(args.rounds):
                for case, (fn, fn_args) in cases.items():
                    times[case].append(timed(fn, *fn_args))
            print(f"\nkernel {shape} double_quant={double_quant} x [{args.tokens}, "
                  f"{shape[1]}]  (ms: wall best / median, cpu best / median)")  # fmt: skip
            for case, runs in times.items():
                wall, cpu = zip(*runs)
                print(
                    f"  {case:<36} {min(wall):8.2f} {statistics.median(wall):8.2f}"
                    f"   {min(cpu):8.2f} {statistics.median(cpu):8.2f}"
                )
    print(f"\nload at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
