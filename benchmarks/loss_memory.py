"""Temp memory and FLOPs of the loss's compiled train step: chunked vs full logits.

Run:
    python benchmarks/loss_memory.py
    python benchmarks/loss_memory.py --dims 64 --chunk-sizes 256 1024

For each hidden size it lowers `jit(value_and_grad(loss wrt hidden))` at
batch 1, seq 4096, vocab 262,144 from `jax.ShapeDtypeStruct`s (nothing is
allocated), compiles it for the local backend and prints XLA's own
`memory_analysis().temp_size_in_bytes` and `cost_analysis()['flops']`. The
numbers are exact for the compiled program and independent of the machine's
speed; they depend on the backend (CPU here unless a GPU/TPU is visible).

XLA's cost analysis counts the body of a loop once, not once per trip, so the
chunked step's FLOPs are printed as XLA's figure times the number of chunks
(the loop body holds all the work: per chunk the logits and, the embedding
being frozen, d_hidden, both formed in the forward pass; outside it are only
the padding and a few sums). That is the same as the full-logits version
(flop ratio 1.00); the earlier loss recomputed the logits in the backward
pass and cost 1.5x. Its temp memory is one [chunk, vocab] float32 block plus
one [tokens, dim] float32 array (the saved d_hidden), as before plus that
array. `docs/performance.md` has both versions' figures.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from gemma4_keras.model import loss  # noqa: E402

GIB = 1024**3


def compile_train_step(loss_fn, batch, seq, vocab, dim, dtype):
    """Compiles value_and_grad of `loss_fn(hidden, embedding, targets, weights)`."""

    def step(hidden, embedding, targets, weights):
        def mean_loss(h):
            total, count = loss_fn(h, embedding, targets, weights)
            return total / count

        return jax.value_and_grad(mean_loss)(hidden)

    args = (
        jax.ShapeDtypeStruct((batch, seq, dim), dtype),
        jax.ShapeDtypeStruct((vocab, dim), dtype),
        jax.ShapeDtypeStruct((batch, seq), jnp.int32),
        jax.ShapeDtypeStruct((batch, seq), jnp.float32),
    )
    return jax.jit(step).lower(*args).compile()


def measure(loss_fn, batch, seq, vocab, dim, dtype):
    """Returns (temp bytes, flops, compile seconds) of the compiled step."""
    start = time.perf_counter()
    compiled = compile_train_step(loss_fn, batch, seq, vocab, dim, dtype)
    seconds = time.perf_counter() - start
    cost = compiled.cost_analysis()
    # Older JAX returns a list with one dict per computation.
    if isinstance(cost, list | tuple):
        cost = cost[0]
    temp = compiled.memory_analysis().temp_size_in_bytes
    return temp, float(cost.get("flops", float("nan"))), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=4096, help="tokens per row")
    parser.add_argument("--vocab", type=int, default=262144)
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 2560])
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[1024, 256])
    parser.add_argument("--dtype", default="float32", help="hidden/embedding dtype")
    args = parser.parse_args()
    dtype = jnp.dtype(args.dtype)

    print(
        f"backend={jax.default_backend()} jax={jax.__version__} batch={args.batch} "
        f"seq={args.seq} vocab={args.vocab} dtype={dtype.name}"
    )
    header = (
        f"{'dim':>5} {'loss':>14} {'temp GiB':>9} {'ratio':>7} "
        f"{'GFLOPs':>9} {'flop ratio':>10} {'compile s':>9}"
    )
    print(header)
    for dim in args.dims:
        shape = (args.batch, args.seq, args.vocab, dim, dtype)
        full_temp, full_flops, full_s = measure(loss.full_cross_entropy, *shape)
        print(
            f"{dim:>5} {'full':>14} {full_temp / GIB:>9.3f} {1:>7.3f} "
            f"{full_flops / 1e9:>9.1f} {1:>10.3f} {full_s:>9.1f}"
        )
        tokens = args.batch * args.seq
        for chunk in args.chunk_sizes:

            def chunked(h, e, t, w, chunk=chunk):
                return loss.chunked_cross_entropy(h, e, t, w, chunk_size=chunk)

            temp, body_flops, secs = measure(chunked, *shape)
            trips = -(-tokens // chunk)
            total_flops = body_flops * trips
            print(
                f"{dim:>5} {'chunked/' + str(chunk):>14} {temp / GIB:>9.3f} "
                f"{temp / full_temp:>7.3f} {total_flops / 1e9:>9.1f} "
                f"{total_flops / full_flops:>10.3f} {secs:>9.1f}"
                f"   (XLA: {body_flops / 1e9:.1f} GFLOPs x {trips} chunks)"
            )


if __name__ == "__main__":
    main()
