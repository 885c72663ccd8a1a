"""What the compiler must be told for a step to hold what it needs, and no more.

Every function here leaves values unchanged; each changes what XLA may
schedule early, merge (CSE) or hoist out of a loop. They were found on
XLA:CPU, the backend the tests and `memory_analysis()` figures run on; the
figures below are XLA:CPU's. None of them is measured on GPU or TPU yet (no
accelerator was at hand): whether those need them is open. Each runs on
every backend, because each is correct and about free there (values
unchanged; the 2-layer step below counts 520.6 MFLOP with `remat`, 519.8
with `jax.checkpoint`: the ties' adds), and a GPU or TPU run is where a
step that silently holds every layer's kernels would cost most. Measure
there (`tests/test_step_memory.py` compiles for the default backend)
before selecting `jax.checkpoint` by `jax.default_backend()`.

* `tie_to`: a computation that reads only weights (an NF4 dequantisation,
  a dropout mask from a fixed key) is otherwise scheduled at the start of
  the step and kept alive: at E2B's size 16 GiB of float32 kernels in a
  step that needs about 2 (`quant.nf4_matmul`, `remat`). An optimization
  barrier does not do it: XLA:CPU removes barriers before its last CSE and
  its scheduler.
* `remat`: `jax.checkpoint` keeps its recomputation apart from the forward
  pass with optimization barriers, which XLA:CPU removes before its last
  CSE; it then merges the two and keeps every layer's activations (and
  dequantised kernels) alive until the backward pass: a step that needs
  2 GiB held 16 GiB of temporaries at E2B's size. The NF4 step of
  `tests/test_step_memory.py` (width 256, FFN 1024, 32 tokens; 3.00 MiB is
  one layer's float32 MLP kernels), compiled temporaries at 2 / 8 layers:
  `remat` 3.82 / 4.49 MiB (+0.11 MiB per layer); `jax.checkpoint` in its
  place 6.16 / 18.35 MiB (+2.03 MiB per layer), worse than no remat at all,
  5.40 / 17.00 MiB (+1.93 MiB per layer). At E2B's width, 5 NF4 layers
  (`docs/real_size.md`): 2.63 GiB with `jax.checkpoint`, 1.54 GiB with
  `remat` (1.57 GiB at 10 layers).
* `stored` (each block's input under `remat`): XLA fuses the residual
  stream, an elementwise chain from the embedding up, into its readers, so
  the input `remat` keeps was read through the previous layers' projection
  outputs, which stayed alive until the backward pass. Stored, a layer
  keeps only its input (width 256, seq 1024: 8.1 MiB of temporaries per
  layer before; `tests/test_step_memory.py`: 0.11 -> 0.008 MiB per layer
  at seq 32, the routed MoE model 1.12 -> 0.25).
* `remat_chunks`: the same for chunks of one computation (the routed MoE
  experts over chunks of tokens, `model.moe_token_chunk`): the backward
  pass recomputes one chunk at a time.
* `materialise` and `recompute_apart` (the loss's chunk, `model/loss.py`):
  which of a [chunk, vocab] block's readers share it. On XLA:CPU a chunk
  held two [chunk, vocab] float32 blocks without `materialise` and three
  without `recompute_apart`; one with them.
* `weights_read_per_step` (decoding): loop-invariant code motion hoists the
  dequantisation of every NF4 kernel out of a decode loop, a full-precision
  copy of the base for the whole generation; a barrier that also takes the
  loop's index keeps it in the step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import keras
import numpy as np

__all__ = [
    "materialise",
    "no_cotangent",
    "recompute_apart",
    "remat",
    "remat_chunks",
    "stored",
    "tie_to",
    "weight_for",
    "weights_read_per_step",
]


def tie_to(tree: Any, anchor: jax.Array, integers: bool = False) -> Any:
    """`tree` with its float (and, if asked, integer) leaves made to depend on
    `anchor`; values unchanged.

    `leaf + 0 * max(anchor[:2])` is a data dependency XLA keeps (it does not
    fold a float multiply by zero), unlike an optimization barrier, which
    XLA:CPU removes before its last CSE and its scheduler. A computation that
    reads only weights (a dequantisation, a dropout mask from a fixed key) is
    then neither scheduled before `anchor` exists nor merged with a copy of
    itself computed from another anchor (a rematerialisation). The zero is
    NaN if one of the first two elements of `anchor` is infinite or NaN.

    Example:

        w = nf4_dequantize(tie_to(q, x))   # not computed before x exists
    """
    # A reduction, not `anchor[0]`: XLA fuses the slice of an element into
    # each tied leaf's consumer together with the whole elementwise chain that
    # produces `anchor` (an RMS norm, a gradient's sum of terms) and evaluates
    # it once per output element; a reduction over two elements is not fused
    # there, so the scalar is computed once. Issue 17: in a QLoRA step this
    # made the dequantisations 2-3x slower (docs/performance.md, section 3).
    # No gradient through the tie: a weight tied to an activation would
    # otherwise make autodiff keep that activation to differentiate a zero.
    first = jnp.max(jnp.ravel(jax.lax.stop_gradient(anchor))[:2])
    zero = first.astype(jnp.float32) * jnp.float32(0)

    def tie(leaf):
        if jnp.issubdtype(leaf.dtype, jnp.floating) or (
            integers and jnp.issubdtype(leaf.dtype, jnp.integer)
        ):
            return leaf + zero.astype(leaf.dtype)
        return leaf

    return jax.tree_util.tree_map(tie, tree)


def weight_for(w: jax.Array, x: jax.Array, dtype) -> jax.Array:
    """Frozen weight `w` (a norm's scale, a layer scalar) in `dtype`, tied to
    the activation `x` it multiplies (`tie_to`).

    Untied, `broadcast(w)` to x's shape reads only a weight: XLA:CPU
    materialised it once per weight and shared it between the forward pass
    and the rematerialised backward pass, so every layer's broadcasts lived
    through the whole step (26B-A4B, 6 layers, seq 4096: 42 float32
    [4096, 2816] buffers and 12 more, 2.9 GiB; `tests/test_step_memory.py`).
    """
    return tie_to(w.astype(dtype), x)


def no_cotangent(leaf: jax.Array) -> Any:
    """The zero cotangent of a `jax.custom_vjp` input that gets no gradient."""
    if jnp.issubdtype(leaf.dtype, jnp.floating):
        return jnp.zeros_like(leaf)
    return np.zeros(jnp.shape(leaf), jax.dtypes.float0)


def remat(layer: keras.layers.Layer, fn: Callable, floats: tuple, ints: tuple):
    """`fn(*floats, *ints)`, recomputed in the backward pass instead of stored.

    The backward pass recomputes `fn` from inputs tied to the incoming
    gradient (`tie_to`), so the recomputation cannot run before that
    layer's backward pass nor be merged with the forward pass, on any
    backend (see the module docstring for what `jax.checkpoint` does on
    XLA:CPU). `layer`'s weights go in as explicit arguments (a
    `jax.custom_vjp` must not close over traced values); its frozen ones get
    no gradient, nor do `ints` (positions, segment ids, dropout keys), which
    are tied to the first float input in the forward pass (dropout masks
    from fixed keys would otherwise be computed at the start of the step).

    Args:
      layer: the Keras layer whose variables `fn` reads.
      fn: a function of `(*floats, *ints)` built from `layer` (no traced
        values in its closure).
      floats: differentiable inputs (pytrees; None allowed).
      ints: inputs without gradient (pytrees of arrays; None allowed).
    """
    trainable = layer.trainable_variables
    frozen = layer.non_trainable_variables

    def run(floats, t_values, f_values, ints):
        values = list(zip(trainable, t_values)) + list(zip(frozen, f_values))
        with keras.StatelessScope(state_mapping=values):
            return fn(*floats, *ints)

    @jax.custom_vjp
    def block(floats, t_values, f_values, ints):
        ints = tie_to(ints, jax.tree_util.tree_leaves(floats)[0], integers=True)
        return run(floats, t_values, f_values, ints)

    def block_fwd(*args):
        return block(*args), args

    def block_bwd(args, g):
        floats, t_values, f_values, ints = args
        anchor = jax.tree_util.tree_leaves(g)[0]
        floats = tie_to(floats, anchor)
        ints = tie_to(ints, anchor, integers=True)
        _, vjp = jax.vjp(lambda fl, tv: run(fl, tv, f_values, ints), floats, t_values)
        nondiff = jax.tree_util.tree_map(no_cotangent, (f_values, ints))
        return (*vjp(g), *nondiff)

    block.defvjp(block_fwd, block_bwd)
    floats = stored(floats)
    return block(floats, [v.value for v in trainable], [v.value for v in frozen], ints)


def remat_chunks(fn: Callable, floats: Any, ints: Any, params: Any, consts: Any):
    """`fn` over chunks (the leading axis of `floats` and `ints`), each chunk
    recomputed in the backward pass, one at a time, instead of stored.

    `jax.checkpoint` inside `jax.lax.map` does not do it on XLA:CPU (see
    `remat`: the recomputation is merged with the forward pass and every
    chunk's values stay alive). Here the backward pass is a loop over the
    chunks whose inputs are tied to that chunk's incoming gradient, so no
    chunk is recomputed before its gradient exists. Both loops write into
    buffers tied to their input (a scan's zero-filled output stack reads
    only a constant: XLA created every layer's at the start of the step).

    Args:
      fn: `fn(floats_c, ints_c, params, consts)` -> one chunk's output (a
        pytree); no traced values in its closure.
      floats: differentiable per-chunk inputs, [chunks, ...] leaves.
      ints: per-chunk inputs without gradient, [chunks, ...] leaves.
      params: differentiable inputs every chunk reads (an adapter's
        factors, attention's keys); their gradient is summed over chunks.
      consts: inputs every chunk reads, without gradient (frozen weights).

    Returns:
      The chunks' outputs stacked on the leading axis.
    """
    tree = jax.tree_util
    n = tree.tree_leaves(floats)[0].shape[0]
    params = tree.tree_map(jnp.asarray, params)  # a Python float scale too

    def chunk_of(t, c):
        return tree.tree_map(
            lambda a: jax.lax.dynamic_index_in_dim(a, c, keepdims=False), t
        )

    def put_chunk(buffers, values, c):
        return tree.tree_map(
            lambda b, v: jax.lax.dynamic_update_index_in_dim(
                b, v.astype(b.dtype), c, 0
            ),
            buffers,
            values,
        )

    def tied_zeros(shapes, anchor, stacked=True):
        lead = (n,) if stacked else ()
        return tie_to(
            tree.tree_map(lambda a: jnp.zeros(lead + a.shape, a.dtype), shapes),
            anchor,
        )

    @jax.custom_vjp
    def run(floats, ints, params, consts):
        def run_chunk(c):
            return fn(chunk_of(floats, c), chunk_of(ints, c), params, consts)

        out = tied_zeros(jax.eval_shape(run_chunk, 0), tree.tree_leaves(floats)[0])
        return jax.lax.fori_loop(
            0, n, lambda c, out: put_chunk(out, run_chunk(c), c), out
        )

    def run_fwd(floats, ints, params, consts):
        return run(floats, ints, params, consts), (floats, ints, params, consts)

    def run_bwd(residuals, g):
        floats, ints, params, consts = residuals
        anchor = tree.tree_leaves(g)[0]

        def run_chunk(c, carry):
            total, d_floats = carry
            gc = chunk_of(g, c)
            tie = tree.tree_leaves(gc)[0]
            f = tie_to(chunk_of(floats, c), tie)
            i = tie_to(chunk_of(ints, c), tie, integers=True)
            _, vjp = jax.vjp(lambda f, p: fn(f, i, p, consts), f, params)
            df, dp = vjp(gc)
            return tree.tree_map(jnp.add, total, dp), put_chunk(d_floats, df, c)

        carry = (
            tied_zeros(params, anchor, stacked=False),
            tied_zeros(chunk_of(floats, 0), anchor),
        )
        total, d_floats = jax.lax.fori_loop(0, n, run_chunk, carry)
        nondiff = tree.tree_map(no_cotangent, (ints, consts))
        return d_floats, nondiff[0], total, nondiff[1]

    run.defvjp(run_fwd, run_bwd)
    return run(floats, ints, params, consts)


def stored(tree: Any) -> Any:
    """`tree` with each leaf written to a buffer of its own; values and
    gradients unchanged.

    XLA fuses an elementwise chain into each of its readers instead of
    storing it. The residual stream is one such chain from the embedding
    up (adds of normed projections): a layer's input that `remat` keeps for
    the backward pass was read there through its chain's inputs, the
    previous layers' projection outputs, which stayed alive until then
    (XLA:CPU, width 256, seq 1024: 8.1 MiB of temporaries per layer; 1 MiB
    is the input itself). A dropout mask was kept as the random bits it is
    compared from (2 to 4 bytes an element, not 1). An optimization barrier
    does not stop the fusion on XLA:CPU. A reduction does: XLA does not
    fuse it into its readers. It is a max of the leaf with itself, over
    the leaf's bits for a float (XLA:CPU computes bfloat16 in float32: a
    bfloat16 leaf is stored in bfloat16).
    """

    def store(leaf):
        if leaf is None:
            return leaf
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            return _store_float(leaf)
        if leaf.dtype == jnp.bool_:
            return _store_bits(leaf.astype(jnp.uint8)).astype(jnp.bool_)
        if jnp.issubdtype(leaf.dtype, jnp.unsignedinteger):
            return _store_bits(leaf)
        return leaf  # signed integers (ids, positions): never a long chain

    return jax.tree_util.tree_map(store, tree)


def _store_bits(x: jax.Array) -> jax.Array:
    return jnp.stack([x, jnp.zeros_like(x)]).max(0)  # unsigned: x


@jax.custom_vjp
def _store_float(leaf: jax.Array) -> jax.Array:
    bits = jax.lax.bitcast_convert_type(leaf, _UINT[leaf.dtype.itemsize])
    return jax.lax.bitcast_convert_type(_store_bits(bits), leaf.dtype)


_UINT = {2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}
_store_float.defvjp(lambda leaf: (_store_float(leaf), None), lambda _, g: (g,))


def materialise(x: jax.Array) -> jax.Array:
    """`x`, formed once: its readers may not each recompute it from its inputs.

    The loss's `exp(z - cap)` block (`loss._d_logits_from_exp`): recomputed
    per reader from the raw logits, both [chunk, vocab] blocks stay alive;
    materialised, it takes the raw logits' buffer (one block per chunk).
    """
    return jax.lax.optimization_barrier(x)


def recompute_apart(tree: Any) -> Any:
    """`tree`, which XLA may not share between computations before and after.

    The loss's soft-cap (and its broadcast constants) would otherwise be
    shared between the logsumexp pass and the d_logits pass over a chunk
    (`loss._d_logits`): shared, each is a [chunk, vocab] temporary of its
    own (three blocks alive on XLA:CPU); recomputed, each pass is one loop
    over the logits and d_logits overwrites them (one block).
    """
    return jax.lax.optimization_barrier(tree)


@contextlib.contextmanager
def weights_read_per_step(layer: keras.layers.Layer, anchor: jax.Array):
    """Makes every weight of `layer` depend on the loop-varying `anchor`.

    Inside a decode loop the weights do not change, and XLA's loop-invariant
    code motion would hoist whatever is computed from them alone out of the
    loop: the dequantised NF4 kernels of every layer, i.e. a full-precision
    copy of the base held for the whole generation. An optimization barrier
    that also takes `anchor` keeps each dequantisation inside the step, one
    layer at a time, as in training.
    """
    variables = layer.trainable_variables + layer.non_trainable_variables
    values, _ = jax.lax.optimization_barrier(([v.value for v in variables], anchor))
    with keras.StatelessScope(state_mapping=list(zip(variables, values))):
        yield
