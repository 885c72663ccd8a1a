"""KV-cached decoding with the training model (`model.decoding`).

Greedy tokens equal KerasHub's `Gemma4CausalLM.generate` over a backbone
with the adapter merged in, on every tiny variant; cached logits equal the
training forward pass at every position (float and NF4); padded batches,
stop ids, samplers and adapter switching.
"""

from __future__ import annotations

import functools

import jax
import keras_hub
import numpy as np
import pytest

from gemma4_keras.model import decoding, gemma4_lora_model, hub, lora
from gemma4_keras.testing import tiny, variants

# `backbone` is a fresh one: tests merge adapters into it.
from gemma4_keras.testing.variants import load_backbone as backbone

VARIANTS = variants.select(*variants.FEATURES)
WINDOW = 16  # the tiny checkpoints' sliding window
LENGTHS = (10, 20)  # one prompt inside the window, one longer than it
BUFFER = 40  # generation runs past the window for both rows


def randomize(model, name: str, seed: int, std: float = 0.3) -> None:
    """Non-zero B factors, so adapter `name` changes the logits."""
    rng = np.random.default_rng(seed)
    for a in model.adapters(name).values():
        a.lora_b.assign(rng.normal(0, std, a.lora_b.shape).astype(np.float32))


@functools.cache
def model(variant: str, quant: str = "none"):
    m = gemma4_lora_model.Gemma4LoraModel.from_backbone(
        variants.backbone(variant), lora.LoraSpec(rank=4), quant=quant, dtype="float32"
    )
    randomize(m, "default", seed=1)
    return m


def prompts(lengths=LENGTHS, buffer: int = BUFFER, seed: int = 0):
    """Right-padded prompts: {"token_ids", "padding_mask"} [len(lengths), buffer]."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((len(lengths), buffer), np.int32)
    mask = np.zeros((len(lengths), buffer), bool)
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(4, 1000, n)
        ids[i, 0] = tiny.BOS_ID
        mask[i, :n] = True
    return {"token_ids": ids, "padding_mask": mask}


def keras_hub_greedy(bb, inputs, stop=None):
    lm = keras_hub.models.Gemma4CausalLM(backbone=bb, preprocessor=None)
    lm.compile(sampler="greedy")
    return lm.generate(dict(inputs), stop_token_ids=stop)


@functools.cache
def causal_lm(m):
    """One decoder per model: its compiled functions serve every test."""
    return decoding.Gemma4LoraCausalLM(m)


def ours_greedy(m, inputs, stop=None, sampler=None):
    lm = (
        causal_lm(m)
        if sampler is None
        else decoding.Gemma4LoraCausalLM(m, sampler=sampler)
    )
    return lm.generate(dict(inputs), stop_token_ids=stop)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_equals_keras_hub_with_merged_adapter(variant):
    m = model(variant)
    merged = backbone(variant)
    assert hub.apply_deltas(merged, lora.model_deltas(m)) > 0
    inputs = prompts()
    want = keras_hub_greedy(merged, inputs)["token_ids"]
    got = ours_greedy(m, inputs)["token_ids"]
    new = [slice(n, BUFFER) for n in LENGTHS]
    print(variant, [list(got[i, s]) for i, s in enumerate(new)])
    np.testing.assert_array_equal(got, want)
    # The adapter matters: without it the logits differ (so would the merge).
    ids = got[:, :BUFFER]
    with_adapter = full_logits(m, ids)
    m.set_adapter(None)
    try:
        base = full_logits(m, ids)
    finally:
        m.set_adapter("default")
    assert np.abs(with_adapter - base).max() > 0.1 * np.abs(base).max()


def cached_logits(m, ids: np.ndarray, prefill: int) -> np.ndarray:
    """Logits at every position: prefill `prefill` tokens, then one at a time."""
    lm = decoding.Gemma4LoraCausalLM(m)
    b, t = ids.shape
    cache = decoding.empty_cache(m, b, t)
    logits, _, cache = lm.call_with_cache(ids[:, :prefill], cache, 0)
    out = [np.asarray(logits)]
    step = jax.jit(lm.call_with_cache)
    for i in range(prefill, t):
        logits, _, cache = step(ids[:, i : i + 1], cache, i)
        out.append(np.asarray(logits))
    return np.concatenate(out, axis=1)


def full_logits(m, ids: np.ndarray) -> np.ndarray:
    b, t = ids.shape
    batch = {
        "token_ids": ids,
        "positions": np.tile(np.arange(t), (b, 1)),
        "segment_ids": np.ones((b, t), np.int32),
    }
    return np.asarray(m.logits(m(batch)))


@pytest.mark.parametrize("variant", ["kv_shared", "moe", "k_eq_v"])
def test_cached_logits_equal_full_forward_at_every_position(variant):
    m = model(variant)
    ids = prompts((30, 30), 30)["token_ids"]
    got, want = cached_logits(m, ids, prefill=5), full_logits(m, ids)
    err = np.abs(got - want).max() / np.abs(want).max()
    print(f"{variant}: cached vs full logits {err:.2e}")
    assert err < 1e-5


def test_nf4_base_decodes_through_the_training_dequantisation():
    q, f = model("kv_shared", "nf4"), model("kv_shared")
    assert q.blocks[0].proj["q_proj"].nf4 is not None
    ids = prompts((24, 24), 24)["token_ids"]
    got, want = cached_logits(q, ids, prefill=4), full_logits(q, ids)
    err = np.abs(got - want).max() / np.abs(want).max()
    quant_err = np.abs(full_logits(f, ids) - want).max() / np.abs(want).max()
    print(f"nf4 cached vs nf4 forward {err:.2e}; nf4 vs float forward {quant_err:.2e}")
    assert err < 1e-5 < 100 * err < quant_err
    # Greedy decoding runs on the NF4 model as on a float one.
    out = ours_greedy(q, prompts())
    assert out["padding_mask"].all()


def test_padded_batch_equals_each_prompt_alone():
    m = model("kv_shared")
    batch = prompts((6, 13, 21))
    got = ours_greedy(m, batch)["token_ids"]
    for i in range(3):
        alone = {k: v[i : i + 1] for k, v in batch.items()}
        np.testing.assert_array_equal(
            got[i : i + 1], ours_greedy(m, alone)["token_ids"]
        )


def test_stops_once_every_row_has_a_stop_id():
    m = model("default")
    inputs = prompts()
    free = ours_greedy(m, inputs)["token_ids"]
    first = [int(free[i, n]) for i, n in enumerate(LENGTHS)]
    out = ours_greedy(m, inputs, stop=tuple(first))
    for i, n in enumerate(LENGTHS):
        assert out["token_ids"][i, n] == first[i]
        assert out["padding_mask"][i, : n + 1].all()
        assert not out["padding_mask"][i, n + 1 :].any()
    # The loop ended: the row that stopped last left the rest of the buffer unfilled.
    assert (out["token_ids"][:, max(LENGTHS) + 1 :] == 0).all()
    kh = keras_hub_greedy(_merged("default"), inputs, stop=tuple(first))
    np.testing.assert_array_equal(out["padding_mask"], kh["padding_mask"])


def _merged(variant):
    bb = backbone(variant)
    hub.apply_deltas(bb, lora.model_deltas(model(variant)))
    return bb


@pytest.mark.parametrize(
    "sampler,allowed",
    [
        (lambda: keras_hub.samplers.TopKSampler(k=3, seed=7), 3),
        (lambda: keras_hub.samplers.TopPSampler(p=0.5, k=8, seed=7), 8),
    ],
    ids=["top_k", "top_p"],
)
def test_keras_hub_samplers_drive_the_decoder(sampler, allowed):
    m = model("kv_shared")
    inputs = prompts((20, 20), 32)
    out = ours_greedy(m, inputs, sampler=sampler())["token_ids"]
    logits = full_logits(m, out)
    top = np.argsort(-logits, axis=-1)[:, :, :allowed]
    for pos in range(20, 32):  # each sampled token is among the allowed at its step
        for row in range(2):
            assert out[row, pos] in top[row, pos - 1], (row, pos)
    greedy = ours_greedy(m, inputs)["token_ids"]
    assert (out != greedy).any()  # it sampled, not argmax


def test_switching_adapters_switches_the_compiled_decoder():
    m = gemma4_lora_model.Gemma4LoraModel.from_backbone(
        backbone("kv_shared"), lora.LoraSpec(rank=4), dtype="float32"
    )
    m.add_adapter("b", lora.LoraSpec(rank=4, seed=5))
    randomize(m, "default", seed=1)
    randomize(m, "b", seed=5)  # seeds whose greedy tokens differ from each other
    lm = decoding.Gemma4LoraCausalLM(m)
    inputs = prompts()

    def run(name):
        m.set_adapter(name)
        return lm.generate(dict(inputs), stop_token_ids=None)["token_ids"]

    a, base, b, a_again = run("default"), run(None), run("b"), run("default")
    np.testing.assert_array_equal(a, a_again)
    assert (a != base).any() and (b != base).any() and (a != b).any()
    for name, got in (("default", a), ("b", b), (None, base)):
        bb = backbone("kv_shared")
        if name is not None:
            hub.apply_deltas(bb, lora.model_deltas(m, name))
        np.testing.assert_array_equal(got, keras_hub_greedy(bb, inputs)["token_ids"])
    # The base ran through a compiled adapter function with B held at 0, and
    # got the adapter's weights back.
    assert set(lm._generate_functions) == {"default", "b"}
    np.testing.assert_array_equal(run("default"), a)


def test_no_backbone_is_loaded_after_training_starts(tmp_path, monkeypatch):
    """Samples and evaluation decode with the training model itself."""
    from gemma4_keras import config_lib  # the run's modules, for this test only
    from gemma4_keras.training import train  # the run's modules, for this test only

    c = config_lib.get_config("tiny", "lora", "runlocal")
    c.train.sample_every = 1
    c.eval.compare_base = True
    started = []
    real_fit = train.fit

    def fit(*args, **kwargs):
        started.append(True)
        return real_fit(*args, **kwargs)

    def guarded(load):
        def guard(*args, **kwargs):
            assert not started, "Gemma4Backbone.from_preset after training started"
            return load(*args, **kwargs)

        return guard

    monkeypatch.setattr(train, "fit", fit)
    monkeypatch.setattr(hub, "backbone_from_preset", guarded(hub.backbone_from_preset))
    cls = keras_hub.models.Gemma4Backbone
    monkeypatch.setattr(cls, "from_preset", staticmethod(guarded(cls.from_preset)))
    state = train.run(c, str(tmp_path))
    assert started and state["status"] == "finished"
    assert state["evaluated_on"] == "float32 + adapter"
    assert state["base"] is not None and state["finetuned"] is not None
    report = (tmp_path / "eval" / "eval_report.md").read_text()
    assert "float32 + adapter" in report
    samples = (tmp_path / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 4  # 2 prompts at steps 1 and 2


def test_nf4_dequantisation_stays_inside_the_decode_loop():
    """XLA must not hoist the dequantised kernels out of the step loop (a
    full-precision copy of the base for the whole generation)."""
    import itertools  # this test only
    import re  # this test only

    import keras  # this test only

    lm = decoding.Gemma4LoraCausalLM(model("default", "nf4"))
    variables = (
        lm.sampler.variables,
        lm.trainable_variables,
        lm.non_trainable_variables,
    )

    def step(inputs, state):
        pairs = itertools.chain(*(zip(v, s) for v, s in zip(variables, state)))
        with keras.StatelessScope(state_mapping=pairs):
            return lm.generate_step(inputs, (1,))

    state = [[v.value for v in vs] for vs in variables]
    inputs = {k: jax.numpy.asarray(v) for k, v in prompts().items()}
    hlo = jax.jit(step).lower(inputs, state).compile().as_text()
    (body,) = set(re.findall(r"body=%?([\w.\-]+)", hlo))
    text = re.search(r"\n%?" + re.escape(body) + r" .*?\n}\n", hlo, re.S).group(0)
    # The packed uint8 codes are read inside the loop body, not before it.
    assert len(re.findall(r"u8\[", text)) > 0


def test_ids_past_the_tokenizers_vocabulary_decode_as_nothing():
    """A model's embedding may be padded past its tokenizer (the released
    vocabulary, 262,144 rows, over a smaller tokenizer here): an id no text
    maps to is dropped, not a SentencePiece "piece id is out of range"."""
    import types

    from gemma4_keras.eval import generate

    tok = keras_hub.models.Gemma4Tokenizer.from_preset(str(tiny.tiny_checkpoint()))
    ids = np.asarray(tok("hello world")).tolist()
    holder = types.SimpleNamespace(tokenizer=tok)
    known = tok.vocabulary_size()
    decode = generate.Generator._decode
    assert decode(holder, ids[:1] + [known, known + 5000] + ids[1:]) == decode(
        holder, ids
    )
    assert decode(holder, [known]) == ""
