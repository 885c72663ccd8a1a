"""Images and audio through the training model, against transformers.

Oracle: transformers' `Gemma4ForConditionalGeneration` on the tiny
multimodal checkpoint (`tiny.tiny_checkpoint(layout="multimodal")`: the tiny
text decoder with tiny vision and audio towers, tensor names as transformers
writes them). Ours: the package's decoder (`stream_load`) with KerasHub's
towers (`hub.load_towers`). Inputs come from the data layer (`data.media`):
token ids with expanded soft tokens, pixel values and log-mel features.

The comparison is split so that each part can fail on its own:
  * the towers' soft tokens against transformers' `get_image_features` /
    `get_audio_features`;
  * the decoder fed transformers' own soft tokens (the merge: order, pad
    ids for the embedding tables, PLE, the bidirectional image mask);
  * end to end: the logits with KerasHub's towers.
"""

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import oracles
import pytest

from gemma4_keras.data import media, records, tokenize
from gemma4_keras.model import hub, stream_load
from gemma4_keras.testing import media as media_files
from gemma4_keras.testing import tiny

torch = oracles.need("torch")
transformers = oracles.need("transformers")
Image = pytest.importorskip("PIL.Image")

IMAGE, AUDIO = tiny.SPECIAL_TOKENS["<|image|>"], tiny.SPECIAL_TOKENS["<|audio|>"]
# Relative max-abs logit error. Text alone agrees to ~7e-7; KerasHub's towers
# differ from transformers' by ~3e-6 (float32 summation order over 2,520
# patches), which the decoder amplifies to ~6e-5 at the soft tokens (measured:
# 5.1e-5, 6.0e-5 with PLE). A wrong merge (two images swapped) gives ~1.
TOWER_TOL, MERGE_TOL, END_TO_END_TOL = 2e-5, 2e-5, 1.5e-4


def rel(a, b) -> float:
    return float(np.abs(np.asarray(a) - b).max() / np.abs(b).max())


class Case:
    """One conversation: ids from the data pipeline and the tower inputs."""

    def __init__(self, directory, tmp_path, parts):
        path = tmp_path / "data.jsonl"
        record = {
            "messages": [
                {"role": "user", "content": parts},
                {"role": "assistant", "content": "A cat."},
            ]
        }
        path.write_text(json.dumps(record) + "\n")
        (conversation,), _ = records.load_conversations({"path": str(path)})
        tokenizer = hub.tokenizer_from_preset(str(directory))
        (example,) = tokenize.encode_conversation(
            conversation, tokenizer, max_length=10_000, template="small"
        )
        self.ids = example.token_ids[None].astype(np.int64)
        self.mask = example.loss_mask[None]
        images = [r for r in example.media if r["type"] == media.IMAGE]
        clips = [r for r in example.media if r["type"] == media.AUDIO]
        self.hf_inputs = {"input_ids": torch.tensor(self.ids)}
        self.ours = {
            "token_ids": self.ids.astype(np.int32),
            "positions": np.arange(self.ids.shape[1], dtype=np.int32)[None],
            "segment_ids": np.ones(self.ids.shape, np.int32),
        }
        if images:
            pixels, positions = zip(*(media.image_features(r) for r in images))
            self.ours["pixel_values"] = np.stack(pixels)
            self.ours["pixel_position_ids"] = np.stack(positions)
            self.hf_inputs["pixel_values"] = torch.tensor(np.stack(pixels))
            self.hf_inputs["image_position_ids"] = torch.tensor(np.stack(positions))
        if clips:
            (clip,) = clips  # one clip: transformers pads a batch of clips
            features, mask = media.audio_features(clip)
            self.ours["audio_features"] = features[None]
            self.ours["audio_mask"] = mask[None]
            self.hf_inputs["input_features"] = torch.tensor(features[None])
            self.hf_inputs["input_features_mask"] = torch.tensor(mask[None])
        # transformers reads the image blocks off mm_token_type_ids (image 1, audio 3).
        types = np.where(self.ids == IMAGE, 1, np.where(self.ids == AUDIO, 3, 0))
        self.hf_inputs["mm_token_type_ids"] = torch.tensor(types)


def _image(path, height, width, seed):
    return media_files.write_image(path, height, width, seed)


def _wav(path, n, seed):
    x = np.clip(0.3 * np.random.default_rng(seed).standard_normal(n), -1, 1)
    return media_files.write_wav(path, x)


PARTS = {
    "text": lambda tmp: [{"type": "text", "text": "Hello there"}],
    "image": lambda tmp: [
        {"type": "image", "path": _image(tmp / "a.png", 300, 500, 1)},
        {"type": "text", "text": "and"},
        {"type": "image", "path": _image(tmp / "b.png", 64, 40, 2)},
    ],
    "audio": lambda tmp: [
        {"type": "audio", "path": _wav(tmp / "c.wav", 32123, 3)},
        {"type": "text", "text": "Transcribe."},
    ],
    "image_audio": lambda tmp: [
        {"type": "image", "path": _image(tmp / "a.png", 300, 500, 1)},
        {"type": "audio", "path": _wav(tmp / "c.wav", 20000, 4)},
        {"type": "text", "text": "Both."},
    ],
}


class Models:
    def __init__(self, **variant):
        self.directory = tiny.tiny_checkpoint(layout="multimodal", **variant)
        self.hf = transformers.Gemma4ForConditionalGeneration.from_pretrained(
            self.directory, dtype=torch.float32
        ).eval()
        self.ours = stream_load.stream_training_model(self.directory, dtype="float32")
        self.towers = hub.load_towers(str(self.directory))
        self.ours.attach_towers(self.towers)

    def reference(self, case):
        with torch.no_grad():
            return self.hf(**case.hf_inputs).logits.numpy()

    def logits(self, case):
        return np.asarray(self.ours.logits(self.ours(case.ours)))


@pytest.fixture(scope="module")
def models():
    return Models(ple=True)


# image + audio covers both towers in the default run; the others are slow
# (about 10-20 s each on 2 cores: eager calls of the decoder over 500+ tokens).
KINDS = [
    "image_audio",
    pytest.param("text", marks=pytest.mark.slow),
    pytest.param("image", marks=pytest.mark.slow),
    pytest.param("audio", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("kind", KINDS)
def test_logits_equal_transformers(kind, models, tmp_path):
    case = Case(models.directory, tmp_path, PARTS[kind](tmp_path))
    reference = models.reference(case)
    err = rel(models.logits(case), reference)
    print(f"{kind}: logits vs transformers {err:.2e}")
    assert err < (1e-5 if kind == "text" else END_TO_END_TOL)


def _hf_soft_tokens(hf, case):
    """transformers' soft tokens (image, audio) for `case`, as numpy."""
    with torch.no_grad():
        inputs = case.hf_inputs
        image = audio = None
        if "pixel_values" in inputs:
            out = hf.model.get_image_features(
                inputs["pixel_values"], inputs["image_position_ids"], return_dict=True
            )
            image = torch.cat(out.pooler_output, 0).numpy()
        if "input_features" in inputs:
            out = hf.model.get_audio_features(
                inputs["input_features"],
                inputs["input_features_mask"],
                return_dict=True,
            )
            audio = out.pooler_output[out.attention_mask].numpy()
    return image, audio


class _Given(hub.Towers):
    """Towers that return given soft tokens (transformers')."""

    def __init__(self, towers, image, audio):
        super().__init__(**{**towers.__dict__})
        self.given = image, audio

    def image_soft_tokens(self, pixel_values, position_ids):
        return jnp.asarray(self.given[0]), jnp.ones(len(self.given[0]), bool)

    def audio_soft_tokens(self, features, mask):
        return jnp.asarray(self.given[1]), jnp.ones(len(self.given[1]), bool)


def test_towers_and_merge_separately(models, tmp_path):
    case = Case(models.directory, tmp_path, PARTS["image_audio"](tmp_path))
    image, audio = _hf_soft_tokens(models.hf, case)
    ours_image, valid = models.towers.image_soft_tokens(
        case.ours["pixel_values"], case.ours["pixel_position_ids"]
    )
    ours_image = np.asarray(ours_image)[np.asarray(valid)]
    assert ours_image.shape == image.shape == (252, 64)
    ours_audio, valid = models.towers.audio_soft_tokens(
        case.ours["audio_features"], case.ours["audio_mask"]
    )
    ours_audio = np.asarray(ours_audio)[np.asarray(valid)]
    assert ours_audio.shape == audio.shape == (media.audio_soft_tokens(20000), 64)
    print(
        f"towers: image {rel(ours_image, image):.2e}, audio {rel(ours_audio, audio):.2e}"
    )
    assert rel(ours_image, image) < TOWER_TOL and rel(ours_audio, audio) < TOWER_TOL

    reference = models.reference(case)
    models.ours.attach_towers(_Given(models.towers, image, audio))
    try:
        err = rel(models.logits(case), reference)
    finally:
        models.ours.attach_towers(models.towers)
    print(f"decoder fed transformers' soft tokens: {err:.2e}")
    assert err < MERGE_TOL


def _prefill_logits(model, case, extra=7):
    """Logits of the decoder's cached prefill (`Gemma4LoraCausalLM._build_cache`)
    over the case's prompt right-padded by `extra`, its media per row."""
    from gemma4_keras.model import decoding

    ids = case.ours["token_ids"]
    n = ids.shape[1]
    token_ids = np.zeros((1, n + extra), np.int32)
    token_ids[:, :n] = ids
    padding = token_ids > 0
    media_inputs = {
        k: v[None]
        for k, v in case.ours.items()
        if k in ("pixel_values", "pixel_position_ids", "audio_features", "audio_mask")
    }
    lm = decoding.Gemma4LoraCausalLM(model)
    hidden, _ = lm._build_cache(
        jnp.asarray(token_ids), jnp.asarray(padding), media_inputs
    )
    return np.asarray(model.logits(hidden))[:, :n]


def test_generation_prefill_with_media_equals_transformers(models, tmp_path):
    """Generation reads images and audio: the cached prefill (per-row media,
    right-padded buffer) gives transformers' logits; without the media it
    does not."""
    case = Case(models.directory, tmp_path, PARTS["image_audio"](tmp_path))
    reference = models.reference(case)
    err = rel(_prefill_logits(models.ours, case), reference)
    print(f"prefill with media vs transformers {err:.2e}")
    assert err < END_TO_END_TOL
    blind = dict(case.ours)
    for key in ("pixel_values", "audio_features"):
        blind[key] = np.zeros_like(blind[key])
    case.ours = blind
    assert rel(_prefill_logits(models.ours, case), reference) > 0.1


@pytest.mark.slow  # compiles KerasHub's generate loop over 500+ tokens (~30 s)
def test_generator_decodes_prompts_with_media(models, tmp_path):
    """Chat messages with an image and a clip: the prompt ids carry their soft
    tokens, and a batch mixing them with a text prompt decodes."""
    from gemma4_keras.eval.generate import Generator

    messages = records.normalise_messages(
        [{"role": "user", "content": PARTS["image_audio"](tmp_path)}]
    )
    tokenizer = hub.tokenizer_from_preset(str(models.directory))
    gen = Generator.from_model(models.ours, tokenizer, template="small")
    (ids,) = gen.prompt_ids([messages])
    assert ids.count(IMAGE) == 252 and ids.count(AUDIO) == media.audio_soft_tokens(
        20000
    )
    texts = gen.generate(
        [messages, records.normalise_messages([{"role": "user", "content": "Hi"}])],
        max_new_tokens=2,
    )
    assert len(texts) == 2


@pytest.mark.slow  # ~6 s more on the shared fixture; the tolerance's margin
def test_swapped_images_are_caught(models, tmp_path):
    """The comparison can fail: the images' order matters."""
    case = Case(models.directory, tmp_path, PARTS["image"](tmp_path))
    reference = models.reference(case)
    for key in ("pixel_values", "pixel_position_ids"):
        case.ours[key] = case.ours[key][::-1].copy()
    assert rel(models.logits(case), reference) > 0.1


@pytest.mark.slow  # a second multimodal checkpoint and transformers model (~40 s)
def test_bidirectional_image_attention_equals_transformers(tmp_path):
    models = Models(vision_bidirectional=True)
    assert models.ours.spec.vision_bidirectional
    case = Case(models.directory, tmp_path, PARTS["image_audio"](tmp_path))
    reference = models.reference(case)
    err = rel(models.logits(case), reference)
    print(f"bidirectional image attention: logits vs transformers {err:.2e}")
    assert err < END_TO_END_TOL
    prefill = rel(_prefill_logits(models.ours, case), reference)
    print(f"bidirectional image attention, cached prefill: {prefill:.2e}")
    assert prefill < END_TO_END_TOL
    # Causal attention over the image would not do.
    causal = dataclasses.replace(models.ours.spec, vision_bidirectional=False)
    for blk in models.ours.blocks:
        blk.spec = causal
    assert rel(models.logits(case), reference) > 10 * END_TO_END_TOL


@pytest.mark.slow  # ~25 s more: a second transformers model wrapped by PEFT
def test_peft_round_trip_on_the_multimodal_model(models, tmp_path):
    """Our adapter in PEFT on transformers' multimodal model, image + audio in.

    Keys under `base_model.model.model.language_model.layers...`; PEFT wraps
    the decoder's projections and none of the towers'.
    """
    peft = oracles.need("peft")
    from gemma4_keras.exporters import peft as peft_lib
    from gemma4_keras.model.lora import LoraSpec

    model = models.ours
    model.add_adapter("media", LoraSpec(rank=4, alpha=5.0))
    try:
        rng = np.random.default_rng(7)
        for a in model.adapters("media").values():
            a.lora_a.assign(rng.normal(0, 0.2, a.lora_a.shape).astype(np.float32))
            a.lora_b.assign(rng.normal(0, 0.2, a.lora_b.shape).astype(np.float32))
        case = Case(models.directory, tmp_path, PARTS["image_audio"](tmp_path))
        ours_end_to_end = models.logits(case)
        # The adapter compared on transformers' own soft tokens (the towers'
        # float32 difference, ~3e-6, grows through a random adapter to ~3e-4).
        model.attach_towers(_Given(models.towers, *_hf_soft_tokens(models.hf, case)))
        ours = models.logits(case)
        model.set_adapter(None)
        ours_base = models.logits(case)
        path = peft_lib.save_adapter(
            model,
            str(tmp_path / "adapter"),
            base_model=str(models.directory),
            name="media",
            layout="conditional_generation",
        )
    finally:
        model.unload_adapter("media")
        model.attach_towers(models.towers)
    weights = peft_lib.read_adapter_files(path)[1]
    assert all(
        k.startswith("base_model.model.model.language_model.layers.") for k in weights
    )
    hf = transformers.Gemma4ForConditionalGeneration.from_pretrained(
        models.directory, dtype=torch.float32
    ).eval()
    peft_model = peft.PeftModel.from_pretrained(hf, path).eval()
    wrapped = [n for n, m in peft_model.named_modules() if hasattr(m, "lora_A")]
    assert wrapped and all(".language_model.layers." in n for n in wrapped)
    assert not any("tower" in n for n in wrapped)
    with torch.no_grad():
        theirs = peft_model(**case.hf_inputs).logits.numpy()
        with peft_model.disable_adapter():
            theirs_base = peft_model(**case.hf_inputs).logits.numpy()
    effect = rel(ours - ours_base, theirs - theirs_base)
    err = rel(ours, theirs)
    end_to_end = rel(ours_end_to_end, theirs)
    print(
        f"PEFT on the multimodal model: logits {err:.2e}, adapter effect "
        f"{effect:.2e}; with KerasHub's towers {end_to_end:.2e}"
    )
    assert np.abs(theirs - theirs_base).max() > 0.1  # the adapter does something
    assert err < 1e-4 and effect < 1e-3
    assert end_to_end < 1e-3


@pytest.mark.slow  # a jitted loss-and-gradient step and PEFT's backward (~60 s)
def test_adapter_gradients_with_media_equal_peft(models, tmp_path):
    """The training step's adapter gradients, an image and a clip in, equal PEFT's.

    Ours: `stateless_call` + `compute_loss` under `jax.jit` (the towers run
    inside the compiled step, frozen), loss on the answer only (the data
    layer's mask). PEFT: the same adapter on transformers' multimodal model,
    the same masked cross-entropy, `backward()`.
    """
    import jax

    peft = oracles.need("peft")
    from gemma4_keras.exporters import peft as peft_lib
    from gemma4_keras.model.lora import LoraSpec

    case = Case(models.directory, tmp_path, PARTS["image_audio"](tmp_path))
    example_mask = np.asarray(case.mask, np.float32)
    ids = case.ids
    data = {
        **case.ours,
        "target_ids": np.roll(ids, -1, axis=1).astype(np.int32),
        "loss_weights": np.roll(example_mask, -1, axis=1),
        "loss_norm": np.array([np.roll(example_mask, -1, axis=1).sum()], np.float32),
    }
    model = models.ours
    model.add_adapter("grad", LoraSpec(rank=4, alpha=5.0))
    try:
        rng = np.random.default_rng(11)
        for a in model.adapters("grad").values():
            a.lora_a.assign(rng.normal(0, 0.1, a.lora_a.shape).astype(np.float32))
            a.lora_b.assign(rng.normal(0, 0.1, a.lora_b.shape).astype(np.float32))
        path = peft_lib.save_adapter(
            model,
            str(tmp_path / "adapter"),
            base_model=str(models.directory),
            name="grad",
            layout="conditional_generation",
        )
        sites = model.adapters("grad")
        trainable = [v.value for v in model.trainable_variables]
        frozen = [v.value for v in model.non_trainable_variables]

        def loss_fn(tv, ntv):
            hidden, _ = model.stateless_call(tv, ntv, data, training=False)
            return model.compute_loss(x=data, y_pred=hidden)

        loss, grads = jax.jit(jax.value_and_grad(loss_fn))(trainable, frozen)
        by_path = {
            v.path: np.asarray(g) for v, g in zip(model.trainable_variables, grads)
        }
        ours = {
            site: (by_path[a.lora_a.path], by_path[a.lora_b.path])
            for site, a in sites.items()
        }
    finally:
        model.unload_adapter("grad")

    hf = transformers.Gemma4ForConditionalGeneration.from_pretrained(
        models.directory, dtype=torch.float32
    ).eval()
    peft_model = peft.PeftModel.from_pretrained(hf, path, is_trainable=True)
    logits = peft_model(**case.hf_inputs).logits[0]
    targets = torch.tensor(data["target_ids"][0], dtype=torch.long)
    weights = torch.tensor(data["loss_weights"][0])
    nll = -torch.log_softmax(logits, -1).gather(-1, targets[:, None])[:, 0]
    theirs_loss = (nll * weights).sum() / weights.sum()
    theirs_loss.backward()
    worst = 0.0
    for name, module in peft_model.named_modules():
        if not hasattr(module, "lora_A") or "default" not in module.lora_A:
            continue
        parts = name.split(".")
        site = (int(parts[parts.index("layers") + 1]), parts[-1])
        grad_a = module.lora_A["default"].weight.grad.numpy().T  # ours: (in, r)
        grad_b = module.lora_B["default"].weight.grad.numpy().T  # ours: (r, out)
        ga, gb = ours.pop(site)
        worst = max(worst, rel(ga, grad_a), rel(gb, grad_b))
    assert not ours, f"sites PEFT did not train: {sorted(ours)}"
    print(
        f"loss {float(loss):.6f} vs PEFT {float(theirs_loss):.6f}; adapter "
        f"gradients: worst relative difference {worst:.2e}"
    )
    assert abs(float(loss) - float(theirs_loss)) < 1e-4 * abs(float(theirs_loss))
    assert worst < 1e-3
