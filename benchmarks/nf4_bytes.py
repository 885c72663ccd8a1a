"""NF4 storage cost and accuracy for a 4096 x 4096 weight, checked against bnb.

Run: python benchmarks/nf4_bytes.py

Prints, with and without double quantisation: resident bytes per weight
(all leaves, as measured by XLA's `memory_analysis()` of the compiled
dequantisation), the max / mean absolute error against the float32 weight,
and whether our packed codes, scales and dequantised values are identical to
bitsandbytes' `quantize_4bit` / `dequantize_4bit` (CPU) on the same tensor.
bitsandbytes and torch are only needed for that last comparison.
"""

import time

import jax
import numpy as np

from gemma4_keras.model import quant  # the package selects the JAX backend for keras

SHAPE = (4096, 4096)


def _compare_with_bnb(w: np.ndarray, q: quant.NF4Weight, ours: np.ndarray) -> str:
    """'identical' or what differs from bitsandbytes; a note if it is absent."""
    try:
        import bitsandbytes.functional as bnb_functional
        import torch
    except ImportError as error:
        return f"skipped ({error.name} not installed)"
    # bnb's double-quant offset is torch's float32 mean, whose addition order
    # depends on torch's thread count above 32768 values; we reproduce the
    # single-threaded order.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        packed, state = bnb_functional.quantize_4bit(
            torch.from_numpy(w),
            blocksize=q.block_size,
            quant_type="nf4",
            compress_statistics=q.double_quant,
        )
        expected = bnb_functional.dequantize_4bit(packed, state).numpy()
    finally:
        torch.set_num_threads(threads)
    checks = {"packed codes": np.array_equal(q.packed, packed.numpy().reshape(-1))}
    if q.double_quant:
        checks["absmax codes"] = np.array_equal(q.absmax_codes, state.absmax.numpy())
        checks["absmax scales"] = np.array_equal(
            q.absmax_scales, state.state2.absmax.numpy()
        )
        checks["offset"] = bool(q.absmax_offset == state.offset.numpy())
    else:
        checks["absmax"] = np.array_equal(q.absmax, state.absmax.numpy())
    checks["dequantised"] = np.array_equal(ours, expected)
    failed = [name for name, ok in checks.items() if not ok]
    return "identical" if not failed else "DIFFERS in " + ", ".join(failed)


def main() -> None:
    w = np.random.default_rng(0).standard_normal(SHAPE, dtype=np.float32)
    print(f"weight {SHAPE} float32 ~ N(0, 1), block 64")
    for double_quant in (False, True):
        start = time.perf_counter()
        q = quant.nf4_quantize(w, block_size=64, double_quant=double_quant)
        quantise_s = time.perf_counter() - start
        compiled = jax.jit(quant.nf4_dequantize).lower(q).compile()
        resident = compiled.memory_analysis().argument_size_in_bytes
        ours = np.asarray(compiled(q))
        error = np.abs(ours - w)
        print(
            f"double_quant={double_quant!s:5}  "
            f"bytes/param={sum(np.asarray(leaf).nbytes for leaf in jax.tree_util.tree_leaves(q)) / q.size:.5f} "
            f"(compiled args {resident / w.size:.5f})  "
            f"max|err|={error.max():.4f}  mean|err|={error.mean():.4f}  "
            f"quantise {quantise_s:.1f}s  "
            f"bitsandbytes: {_compare_with_bnb(w, q, ours)}"
        )


if __name__ == "__main__":
    main()
