"""Fine-tuning on images (and audio) through `gemma4-keras train`.

The data side (fast): every batch carries its rows' tower inputs in token
order, padded to the same image / clip slots, packing or not. The run (slow):
a tiny multimodal checkpoint (`tiny.tiny_checkpoint(layout="multimodal")`)
fine-tuned on solid-colour squares labelled with their colour; the loss
falls, and the first step's loss equals transformers' loss
(`Gemma4ForConditionalGeneration`, the same examples read by the data layer's
`media` functions, not the batches) over the same examples.
"""

import csv
import json

import numpy as np
import pytest

from gemma4_keras import cli
from gemma4_keras.data import media, pipeline, records, tokenize
from gemma4_keras.model import hub
from gemma4_keras.testing import media as media_files
from gemma4_keras.testing import tiny

Image = pytest.importorskip("PIL.Image")

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 200, 40),
    "blue": (30, 40, 220),
    "yellow": (230, 220, 30),
}


def _square(path, rgb, size=24):
    Image.fromarray(np.tile(np.asarray(rgb, np.uint8), (size, size, 1))).save(path)
    return path.name


def _wav(path, n, seed):
    x = np.clip(0.3 * np.random.default_rng(seed).standard_normal(n), -1, 1)
    media_files.write_wav(path, x)
    return path.name


def _colour_set(directory, name, per_colour, seed):
    """A JSONL of colour squares (shades vary) answered with the colour's name."""
    rng = np.random.default_rng(seed)
    lines = []
    for k in range(per_colour):
        for colour, rgb in COLOURS.items():
            shade = np.clip(np.asarray(rgb) + rng.integers(-20, 21, 3), 0, 255)
            image = _square(directory / f"{name}_{colour}_{k}.png", shade)
            lines.append(
                {
                    "messages": [
                        {
                            "role": "user",
                            "content": [
                                {"type": "image", "path": image},
                                {"type": "text", "text": "Colour?"},
                            ],
                        },
                        {"role": "assistant", "content": colour},
                    ]
                }
            )
    path = directory / f"{name}.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def _tone(path, freq, n):
    media_files.write_wav(path, 0.5 * np.sin(2 * np.pi * freq * np.arange(n) / 16000))
    return path.name


def _pitch_set(directory, name, per_label, seed):
    """A JSONL of tones (0.4-0.9 s) answered `low` (~200 Hz) or `high` (~2 kHz)."""
    rng = np.random.default_rng(seed)
    lines = []
    for k in range(per_label):
        for label, freq in {"low": 200, "high": 2000}.items():
            n = int(rng.integers(6000, 14000))
            clip = _tone(directory / f"{name}_{label}_{k}.wav", freq, n)
            parts = [
                {"type": "audio", "path": clip},
                {"type": "text", "text": "Pitch?"},
            ]
            lines.append(
                {
                    "messages": [
                        {"role": "user", "content": parts},
                        {"role": "assistant", "content": label},
                    ]
                }
            )
    path = directory / f"{name}.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def _encode(path, tokenizer, max_length=10_000):
    conversations, _ = records.load_conversations({"path": str(path)})
    examples, _ = tokenize.encode_conversations(
        conversations, tokenizer, max_length=max_length, template="small"
    )
    return examples


@pytest.fixture(scope="module")
def checkpoint():
    return tiny.tiny_checkpoint(layout="multimodal")


def test_batches_carry_each_rows_media_in_token_order(checkpoint, tmp_path):
    """Packed rows: images and clips of the row's members, in order; empty
    slots give no soft token; every batch has the same shapes."""
    red = _square(tmp_path / "r.png", (255, 0, 0), 40)
    wide = _square(tmp_path / "w.png", (0, 0, 255), 16)
    clip = _wav(tmp_path / "c.wav", 9000, 1)
    lines = [
        [{"type": "image", "path": red}, {"type": "image", "path": wide}],
        [{"type": "audio", "path": clip}, {"type": "image", "path": wide}],
        [{"type": "text", "text": "no media"}],
        [{"type": "image", "path": red}],
    ]
    path = tmp_path / "d.jsonl"
    path.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": parts},
                        {"role": "assistant", "content": f"answer {i}"},
                    ]
                }
            )
            + "\n"
            for i, parts in enumerate(lines)
        )
    )
    tokenizer = hub.tokenizer_from_preset(str(checkpoint))
    examples = _encode(path, tokenizer)
    lengths = [len(e) - 1 for e in examples]
    seq_len = lengths[0] + lengths[1] + 8  # examples 0 and 1 share a row
    stream = pipeline.build_dataset(
        examples, seq_len=seq_len, batch_size=1, shuffle=False
    )
    assert stream.media_slots.images == 3 and stream.media_slots.clips == 1
    image_id = tiny.SPECIAL_TOKENS["<|image|>"]
    audio_id = tiny.SPECIAL_TOKENS["<|audio|>"]
    pool = 9  # the processor's 3x3 pooling: soft tokens per 9 real patches
    shapes = set()
    for step, row in enumerate(stream.rows):
        batch = stream.batch(step)
        shapes.add(tuple((k, v.shape) for k, v in sorted(batch.items())))
        want = [m for i in row.members for m in examples[i].media]
        images = [m for m in want if m["type"] == media.IMAGE]
        clips = [m for m in want if m["type"] == media.AUDIO]
        pixels, positions = batch["pixel_values"][0], batch["pixel_position_ids"][0]
        for slot in range(stream.media_slots.images):
            if slot < len(images):
                p, q = media.image_features(images[slot])
                np.testing.assert_array_equal(pixels[slot], p)
                np.testing.assert_array_equal(positions[slot], q)
            else:
                assert (positions[slot] == -1).all() and not pixels[slot].any()
        # The row's image tokens are exactly the valid soft tokens of its slots.
        real = (positions >= 0).all(-1).sum(-1) // pool
        assert (batch["token_ids"][0] == image_id).sum() == real.sum()
        assert real.sum() == sum(m["soft_tokens"] for m in images)
        frames = batch["audio_mask"][0]
        if clips:
            f, m = media.audio_features(clips[0])
            np.testing.assert_array_equal(batch["audio_features"][0, 0, : len(m)], f)
            assert frames[0, : len(m)].all() and not frames[0, len(m) :].any()
        else:
            assert not frames.any()
        assert (batch["token_ids"][0] == audio_id).sum() == sum(
            m["soft_tokens"] for m in clips
        )
    assert [r.members for r in stream.rows] == [(0, 1), (2, 3)]  # packed
    assert len(shapes) == 1  # one compiled step


def _assert_peft_loads(checkpoint, adapter):
    """The run's adapter loads in transformers + PEFT on the multimodal model
    (keys under `language_model`), every trained factor where it belongs."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    safetensors = pytest.importorskip("safetensors.numpy")
    base = transformers.Gemma4ForConditionalGeneration.from_pretrained(
        checkpoint, dtype=torch.float32
    )
    model = peft.PeftModel.from_pretrained(base, str(adapter))
    saved = safetensors.load_file(str(adapter / "adapter_model.safetensors"))
    loaded = {
        k: v.detach().numpy()
        for k, v in model.state_dict().items()
        if "lora_B" in k  # the factors training moved off zero
    }
    assert saved and len(loaded) == sum("lora_B" in k for k in saved), loaded.keys()
    for key, value in saved.items():
        if "lora_B" in key:
            name = key.replace("lora_B.weight", "lora_B.default.weight")
            np.testing.assert_array_equal(loaded[name], value, err_msg=key)
    assert any(np.abs(v).max() > 0 for v in loaded.values())


def _hf_loss(checkpoint, examples):
    """transformers' mean next-token loss over the trained tokens of `examples`."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = transformers.Gemma4ForConditionalGeneration.from_pretrained(
        checkpoint, dtype=torch.float32
    ).eval()
    image_id = tiny.SPECIAL_TOKENS["<|image|>"]
    audio_id = tiny.SPECIAL_TOKENS["<|audio|>"]
    total, count = 0.0, 0.0
    for e in examples:
        ids = torch.tensor(e.token_ids[None].astype(np.int64))
        # transformers reads the image blocks off mm_token_type_ids (image 1, audio 3).
        types = (ids == image_id).long() + 3 * (ids == audio_id).long()
        inputs = {"input_ids": ids, "mm_token_type_ids": types}
        images = [m for m in e.media if m["type"] == media.IMAGE]
        clips = [m for m in e.media if m["type"] == media.AUDIO]
        if images:
            pixels, positions = zip(*(media.image_features(m) for m in images))
            inputs["pixel_values"] = torch.tensor(np.stack(pixels))
            inputs["image_position_ids"] = torch.tensor(np.stack(positions))
        if clips:
            (clip,) = clips  # one clip: transformers pads a batch of clips
            features, mask = media.audio_features(clip)
            inputs["input_features"] = torch.tensor(features[None])
            inputs["input_features_mask"] = torch.tensor(mask[None])
        with torch.no_grad():
            logits = hf(**inputs).logits[0, :-1]
        nll = -torch.log_softmax(logits.double(), -1)
        nll = nll.gather(-1, ids[0, 1:, None])[:, 0].numpy()
        weights = e.loss_mask[1:].astype(np.float64)
        total += float((nll * weights).sum())
        count += float(weights.sum())
    return total / count


# Each a tiny multimodal run through the CLI and transformers' loss (~2 min
# for images on 2 cores, ~1 min for audio).
KINDS = [
    pytest.param((_colour_set, 2), id="image", marks=pytest.mark.slow),
    pytest.param((_pitch_set, 4), id="audio", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("kind", KINDS)
def test_train_on_media_end_to_end(kind, checkpoint, tmp_path):
    """`gemma4-keras train` on colour squares (tones): the loss falls
    (training and held-out), and step 1's loss (the base: LoRA B starts at
    0) equals transformers' over the same examples; packed rows."""
    make, per_label = kind
    train = make(tmp_path, "train", per_label, 0)  # 8 examples
    held = make(tmp_path, "eval", 1, 1)
    tokenizer = hub.tokenizer_from_preset(str(checkpoint))
    examples = _encode(train, tokenizer)
    longest = max(len(e) - 1 for e in examples)
    max_length = 2 * longest + 4  # two or more per row: the whole set a batch
    workdir = tmp_path / "run"
    args = [
        "gemma4-keras",
        "train",
        "--config=configs/tiny.py:runlocal",
        f"--workdir={workdir}",
        f"--config.model.preset={checkpoint}",
        f"--config.data.path={train}",
        f"--config.data.eval_path={held}",
        f"--config.data.max_length={max_length}",
        "--config.data.packing=True",
        "--config.train.batch_size=4",
        "--config.train.max_steps=6",
        "--config.train.learning_rate=0.01",
        "--config.train.eval_every=3",
        "--config.checkpoint.every_steps=100",
    ]
    assert cli.main(args) == 0
    state = json.loads((workdir / "run_state.json").read_text())
    assert state["status"] == "finished" and state["step"] == 6
    _assert_peft_loads(checkpoint, workdir / "adapter")
    # The eval report generated from the held-out images / clips.
    predictions = (workdir / "eval" / "predictions.jsonl").read_text().splitlines()
    assert len(predictions) == len(held.read_text().splitlines())
    print("held-out answers:", [json.loads(x) for x in predictions])
    with open(workdir / "train_log.csv") as f:
        log = list(csv.DictReader(f))
    loss = [float(r["loss"]) for r in log]
    val = [float(r["val_loss"]) for r in log if r["val_loss"] not in ("", "NA")]
    print(f"train loss by step {[round(x, 4) for x in loss]}; val loss {val}")
    assert loss[-1] < 0.7 * loss[0]
    assert len(val) == 2 and val[1] < val[0]
    theirs = _hf_loss(checkpoint, examples)
    print(f"step 1 loss {loss[0]:.6f}, transformers {theirs:.6f}")
    assert abs(loss[0] - theirs) < 1e-4 * abs(theirs)
