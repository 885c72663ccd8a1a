"""Images and audio in chat records (data/media.py), equal to the Hugging Face processor.

Oracle: transformers' `Gemma4Processor`, built here from the tiny
checkpoint's tokenizer, the Pillow image processor `Gemma4ImageProcessorPil`
and `Gemma4AudioFeatureExtractor` with their default (released) values. The
text it expands is the conversation rendered by the checkpoint's
`chat_template.jinja` (`template.render_official`), so ids, masks, pixel
values and audio features are compared end to end. Images and WAV files are
made in the test (Pillow, numpy, `wave`).
"""

import base64
import io
import json
import wave

import numpy as np
import pytest

from gemma4_keras import cli
from gemma4_keras.data import chat, commands, media, records, template, tokenize
from gemma4_keras.data.records import DataError
from gemma4_keras.testing import media as media_files
from gemma4_keras.testing import tiny

Image = pytest.importorskip("PIL.Image")

# (height, width): default-size square, wide, tall, tiny (upscaled), extreme
# aspect ratios (the processor's zero-side branches), a large photo.
IMAGE_SIZES = [
    (896, 896),
    (300, 500),
    (640, 200),
    (20, 30),
    (10, 1000),
    (900, 12),
    (1500, 2000),
]
# Samples at 16 kHz: 0.25 s, 2 s + 123, 7.3 s, exactly 30 s (the most kept).
AUDIO_LENGTHS = [4000, 32123, 116800, 480000]


def _image(path, height, width, seed=0, mode="RGB"):
    media_files.write_image(path, height, width, seed, mode)
    return path


def _samples(n, seed=0):
    t = np.arange(n) / 16000
    noise = np.random.default_rng(seed).normal(0, 0.05, n)
    return np.clip(0.4 * np.sin(2 * np.pi * 440 * t) + noise, -1, 1)


def _wav(path, n, seed=0, rate=16000):
    media_files.write_wav(path, _samples(n, seed), rate)
    return path


def _pcm_float(n, seed=0):
    """What a 16-bit WAV of `_samples` decodes to (soundfile's scaling)."""
    return (np.round(_samples(n, seed) * 32767).astype(np.int16) / 32768).astype(
        np.float32
    )


@pytest.fixture(scope="module")
def checkpoint():
    return tiny.tiny_checkpoint(chat_template="small")


@pytest.fixture(scope="module")
def hf_processor(checkpoint):
    transformers = pytest.importorskip("transformers")
    from transformers.models.gemma4 import processing_gemma4
    from transformers.models.gemma4.feature_extraction_gemma4 import (
        Gemma4AudioFeatureExtractor,
    )
    from transformers.models.gemma4.image_processing_pil_gemma4 import (
        Gemma4ImageProcessorPil,
    )

    class Processor(processing_gemma4.Gemma4Processor):
        # The video processor needs torchvision, which the test extra does
        # not install; this test gives the processor no video.
        def check_argument_for_proper_class(self, name, arg):
            if name == "video_processor":
                return None
            return super().check_argument_for_proper_class(name, arg)

    tok = transformers.AutoTokenizer.from_pretrained(
        str(checkpoint),
        model_specific_special_tokens={
            "image_token": "<|image|>",
            "boi_token": "<|image>",
            "eoi_token": "<image|>",
            "audio_token": "<|audio|>",
            "boa_token": "<|audio>",
            "eoa_token": "<audio|>",
        },
    )
    return Processor(
        feature_extractor=Gemma4AudioFeatureExtractor(),
        image_processor=Gemma4ImageProcessorPil(),
        tokenizer=tok,
        video_processor=None,
    )


@pytest.fixture(scope="module")
def chat_tokenizer(hf_processor):
    tok = hf_processor.tokenizer
    special = {t: tok.convert_tokens_to_ids(t) for t in chat.CONTROL_TOKENS}

    def encode(texts):
        return [tok.encode(t, add_special_tokens=False) for t in texts]

    return tokenize.ChatTokenizer(encode, special)


def _record(parts, answer="A cat."):
    return {
        "messages": [
            {"role": "user", "content": parts},
            {"role": "assistant", "content": answer},
        ]
    }


def _hf_ids(hf_processor, checkpoint, messages, images, audio):
    """Ids of the conversation as transformers makes them (template, then processor)."""
    source = (checkpoint / "chat_template.jinja").read_text()
    text = template.render_official(source, chat.template_messages(messages))
    kwargs = {}
    if images:
        kwargs["images"] = [images]
    if audio:
        kwargs["audio"] = audio
    out = hf_processor(text=[text], return_tensors="np", **kwargs)
    return out, text


def _ours(tmp_path, record, chat_tokenizer):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(record) + "\n")
    conversations, _ = records.load_conversations({"path": str(path)})
    (example,) = tokenize.encode_conversation(
        conversations[0], chat_tokenizer, max_length=100_000, template="small"
    )
    return conversations[0], example


@pytest.mark.parametrize("size", IMAGE_SIZES)
def test_image_ids_and_pixels_equal_the_hf_processor(
    size, tmp_path, hf_processor, checkpoint, chat_tokenizer
):
    _image(tmp_path / "img.png", *size)
    record = _record(
        [
            {"type": "text", "text": "What is in "},
            {"type": "image", "path": "img.png"},  # relative to the data file
            {"type": "text", "text": " this picture?"},
        ]
    )
    conversation, example = _ours(tmp_path, record, chat_tokenizer)
    pil = Image.open(tmp_path / "img.png")
    out, text = _hf_ids(hf_processor, checkpoint, conversation.messages, [pil], None)
    assert "<|image|>" in text
    hf = out["input_ids"][0]
    # The training sequence is the conversation up to its closing <turn|>.
    np.testing.assert_array_equal(example.token_ids, hf[:-1])
    (record_,) = example.media
    assert record_["soft_tokens"] == media.image_soft_tokens(*size)
    assert (hf == hf_processor.image_token_id).sum() == record_["soft_tokens"]
    pixels, positions = media.image_features(record_)
    np.testing.assert_array_equal(pixels, out["pixel_values"][0])
    np.testing.assert_array_equal(positions, out["image_position_ids"][0])


@pytest.mark.parametrize("n", AUDIO_LENGTHS)
def test_audio_ids_and_features_equal_the_hf_processor(
    n, tmp_path, hf_processor, checkpoint, chat_tokenizer
):
    _wav(tmp_path / "clip.wav", n, seed=n)
    record = _record(
        [{"type": "audio", "path": "clip.wav"}, {"type": "text", "text": "Transcribe."}]
    )
    conversation, example = _ours(tmp_path, record, chat_tokenizer)
    out, _ = _hf_ids(
        hf_processor, checkpoint, conversation.messages, None, [_pcm_float(n, n)]
    )
    np.testing.assert_array_equal(example.token_ids, out["input_ids"][0][:-1])
    (record_,) = example.media
    assert record_["samples"] == n
    assert (example.token_ids == hf_processor.audio_token_id).sum() == record_[
        "soft_tokens"
    ]
    assert record_["soft_tokens"] == hf_processor._compute_audio_num_tokens(
        np.zeros(n), 16000
    )
    features, mask = media.audio_features(record_)
    np.testing.assert_array_equal(mask, out["input_features_mask"][0])
    np.testing.assert_allclose(features, out["input_features"][0], rtol=0, atol=1e-5)


def test_processor_config_sets_the_soft_token_counts(
    tmp_path, hf_processor, checkpoint, chat_tokenizer
):
    """A checkpoint's processor_config.json (here as transformers writes it,
    with at most 70 soft tokens per image and a 20 ms mel hop) is read: ids, pixels
    and features equal that processor's, and differ from the defaults'."""
    from transformers.models.gemma4.feature_extraction_gemma4 import (
        Gemma4AudioFeatureExtractor,
    )
    from transformers.models.gemma4.image_processing_pil_gemma4 import (
        Gemma4ImageProcessorPil,
    )

    hf = type(hf_processor)(
        feature_extractor=Gemma4AudioFeatureExtractor(hop_length_ms=20.0),
        image_processor=Gemma4ImageProcessorPil(max_soft_tokens=70),
        tokenizer=hf_processor.tokenizer,
        video_processor=None,
        image_seq_length=70,
    )
    saved = {k: v for k, v in hf.to_dict().items() if k != "chat_template"}
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "processor_config.json").write_text(json.dumps(saved))
    settings = media.processor_settings(tmp_path / "ckpt")
    assert (settings.max_soft_tokens, settings.hop_length) == (70, 320)

    _image(tmp_path / "img.png", 300, 500)
    n = 116800  # 7.3 s: 183 soft tokens with 10 ms frames, 92 with 20 ms
    _wav(tmp_path / "clip.wav", n, seed=n)
    parts = [
        {"type": "image", "path": "img.png"},
        {"type": "audio", "path": "clip.wav"},
        {"type": "text", "text": "Both?"},
    ]
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(_record(parts)) + "\n")
    (conversation,), _ = records.load_conversations({"path": str(path)}, settings)
    (example,) = tokenize.encode_conversation(
        conversation, chat_tokenizer, max_length=100_000, template="small"
    )
    out, _ = _hf_ids(
        hf,
        checkpoint,
        conversation.messages,
        [Image.open(tmp_path / "img.png")],
        [_pcm_float(n, n)],
    )
    np.testing.assert_array_equal(example.token_ids, out["input_ids"][0][:-1])
    image, clip = example.media
    assert (image["soft_tokens"], clip["soft_tokens"]) == (60, 92)
    assert (media.image_soft_tokens(300, 500), media.audio_soft_tokens(n)) == (
        252,
        183,
    )
    pixels, positions = media.image_features(image)  # the record's settings
    assert pixels.shape[0] == 70 * 9
    np.testing.assert_array_equal(pixels, out["pixel_values"][0])
    np.testing.assert_array_equal(positions, out["image_position_ids"][0])
    features, mask = media.audio_features(clip)
    np.testing.assert_array_equal(mask, out["input_features_mask"][0])
    np.testing.assert_allclose(features, out["input_features"][0], rtol=0, atol=1e-5)
    with pytest.raises(media.MediaError, match="feature_extractor.dither=0.5"):
        media.processor_settings({"feature_extractor": {"dither": 0.5}})


def test_image_and_audio_in_one_message_and_several_turns(
    tmp_path, hf_processor, checkpoint, chat_tokenizer
):
    _image(tmp_path / "a.png", 300, 500, seed=1)
    _image(tmp_path / "b.jpg", 640, 200, seed=2)
    _wav(tmp_path / "c.wav", 50_000, seed=3)
    pcm = np.round(_samples(12_345, 4) * 32767).astype("<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(16000)
        f.writeframes(pcm.tobytes())
    b64 = base64.b64encode(buffer.getvalue()).decode()
    png = base64.b64encode((tmp_path / "a.png").read_bytes()).decode()
    record = {
        "messages": [
            {"role": "system", "content": "Describe what you get."},
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": "a.png"}},
                    {"type": "text", "text": "and"},
                    {"type": "audio", "path": str(tmp_path / "c.wav")},
                ],
            },
            {"role": "assistant", "content": "A picture and a tone."},
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": "file://" + str(tmp_path / "b.jpg")},
                    {
                        "type": "input_audio",
                        "input_audio": {"data": b64, "format": "wav"},
                    },
                    {"type": "image", "url": "data:image/png;base64," + png},
                    {"type": "text", "text": "Now these."},
                ],
            },
            {"role": "assistant", "content": "Another picture, a tone, the first one."},
        ]
    }
    conversation, example = _ours(tmp_path, record, chat_tokenizer)
    kinds = [r["type"] for r in example.media]
    assert kinds == ["image", "audio", "image", "audio", "image"]
    images = [Image.open(tmp_path / p) for p in ("a.png", "b.jpg", "a.png")]
    audio = [_pcm_float(50_000, 3), _pcm_float(12_345, 4)]
    out, _ = _hf_ids(hf_processor, checkpoint, conversation.messages, images, audio)
    np.testing.assert_array_equal(example.token_ids, out["input_ids"][0][:-1])
    # No loss on any marker or soft token; loss on the last answer only.
    media_ids = [hf_processor.tokenizer.convert_tokens_to_ids(t) for t in media.TOKENS]
    assert not example.loss_mask[np.isin(example.token_ids, media_ids)].any()
    assert np.isin(example.token_ids, media_ids).sum() == sum(
        r["soft_tokens"] + 2 for r in example.media
    )
    trained = example.token_ids[example.loss_mask]
    answer = chat_tokenizer.encode_texts(["Another picture, a tone, the first one."])[0]
    assert trained.tolist() == answer + [chat_tokenizer.special_ids[chat.TURN_CLOSE]]


def test_all_model_turns_mask_no_media(tmp_path, chat_tokenizer):
    _image(tmp_path / "a.png", 50, 60)
    record = {
        "messages": [
            {"role": "user", "content": [{"type": "image", "path": "a.png"}]},
            {"role": "assistant", "content": "one"},
            {"role": "user", "content": [{"type": "image", "path": "a.png"}]},
            {"role": "assistant", "content": "two"},
        ]
    }
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(record) + "\n")
    (conversation,), _ = records.load_conversations({"path": str(path)})
    examples = tokenize.encode_conversation(
        conversation,
        chat_tokenizer,
        max_length=10_000,
        template="small",
        train_on="all_model_turns",
    )
    (example,) = examples  # the small template: turn 1 is a prefix of turn 2
    soft = chat_tokenizer.special_ids["<|image|>"]
    assert (example.token_ids == soft).sum() == 2 * media.image_soft_tokens(50, 60)
    assert len(example.media) == 2
    ids = set(chat_tokenizer.special_ids[t] for t in media.TOKENS)
    assert not any(
        m for i, m in zip(example.token_ids, example.loss_mask) if int(i) in ids
    )


def test_soft_token_counts_match_the_processor_formula(hf_processor):
    sizes = [[h, w] for h, w in IMAGE_SIZES] + [[1, 5000], [333, 777], [2048, 2048]]
    data = hf_processor._get_num_multimodal_tokens(
        image_sizes=sizes, audio_lengths=AUDIO_LENGTHS + [161, 2000, 99_999]
    )
    assert [media.image_soft_tokens(h, w) for h, w in sizes] == data["num_image_tokens"]
    assert [
        media.audio_soft_tokens(n) for n in AUDIO_LENGTHS + [161, 2000, 99_999]
    ] == data["num_audio_tokens"]
    assert media.image_soft_tokens(896, 896) == 256
    assert media.image_soft_tokens(672, 960) == 280  # the default budget, filled


def _write(tmp_path, lines):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


def test_data_check_names_file_and_line_of_bad_media(tmp_path, monkeypatch, capsys):
    _image(tmp_path / "ok.png", 300, 500)
    _image(tmp_path / "big.png", 400, 500)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    _wav(tmp_path / "long.wav", 16000 * 31)
    _wav(tmp_path / "rate.wav", 8000, rate=8000)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 160_000)  # ok.png: 150_000
    lines = [
        _record([{"type": "image", "path": "ok.png"}, {"type": "text", "text": "?"}]),
        _record([{"type": "image", "path": "missing.png"}]),
        _record([{"type": "image", "path": "broken.png"}]),
        _record([{"type": "image", "path": "big.png"}]),
        _record([{"type": "audio", "path": "long.wav"}]),
        _record([{"type": "audio", "path": "rate.wav"}]),
        _record([{"type": "image", "url": "https://example.com/a.png"}]),
        _record([{"type": "video", "path": "v.mp4"}]),
    ]
    path = _write(tmp_path, lines)
    args = ["gemma4-keras", "data", "check", "--config=configs/tiny.py"]
    assert cli.main(args + [f"--config.data.path={path}"]) == 1
    err = capsys.readouterr().err
    expected = {
        2: "missing.png: no such file",
        3: "broken.png: not an image Pillow can read",
        4: "big.png: 500 x 400 pixels is more than Pillow's limit",
        5: "long.wav: 31.0 s is longer than the 30 s",
        6: "rate.wav: 8000 Hz",
        7: "URLs are not fetched",
        8: "unknown part type 'video'",
    }
    for line, reason in expected.items():
        assert f"data.jsonl:{line}: message 0 (user) part 0: " in err, err
        assert reason in err, (reason, err)
    assert "data.jsonl:1:" not in err


def test_data_check_counts_media_and_soft_tokens(tmp_path, capsys):
    _image(tmp_path / "a.png", 300, 500)
    _image(tmp_path / "b.png", 896, 896, seed=1)
    _wav(tmp_path / "c.wav", 32123)
    lines = [
        _record(
            [{"type": "image", "path": "a.png"}, {"type": "image", "path": "b.png"}]
        ),
        _record([{"type": "audio", "path": "c.wav"}, {"type": "text", "text": "x"}]),
        {
            "messages": [
                {"role": "user", "content": "t"},
                {"role": "assistant", "content": "u"},
            ]
        },
    ]
    path = _write(tmp_path, lines)
    args = ["gemma4-keras", "data", "check", "--config=configs/tiny.py"]
    flags = [f"--config.data.path={path}", "--config.data.max_length=2048"]
    assert cli.main(args + flags + [f"--out={tmp_path}/o"]) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "o" / "data_check.json").read_text())
    stats = report["media"]
    assert stats["images"] == 2 and stats["audio"] == 1 and stats["with_media"] == 2
    assert stats["image_soft_tokens"] == 252 + 256
    assert stats["audio_soft_tokens"] == 50
    first = next(r for r in stats["records"] if r["source"].endswith(":1"))
    assert first == {
        "source": f"{path}:1",
        "images": 2,
        "audio": 0,
        "soft_tokens": 508,
    }
    assert "images / audio clips" in out and "2 / 1" in out and "508 / 50" in out
    # The token statistics count the expanded sequences.
    assert report["tokens"]["max"] > 508 + 4
    assert report["tokens"]["trained"] < 3 * 10  # three short answers, no media


def test_data_render_shows_the_placeholders(tmp_path, capsys):
    _image(tmp_path / "a.png", 300, 500)
    _wav(tmp_path / "c.wav", 32123)
    record = _record(
        [
            {"type": "text", "text": "Look:"},
            {"type": "image", "path": "a.png"},
            {"type": "audio", "path": "c.wav"},
        ]
    )
    path = _write(tmp_path, [record])
    out = tmp_path / "render.jsonl"
    args = [
        "gemma4-keras",
        "data",
        "render",
        "--config=configs/tiny.py",
        f"--config.data.path={path}",
        f"--config.data.eval_path={path}",
        "--config.data.max_length=1024",
        f"--out={out}",
    ]
    assert cli.main(args) == 0
    (line,) = [json.loads(x) for x in out.read_text().splitlines()]
    assert (
        "user\nLook:<|image><|image|><image|><|audio><|audio|><audio|><turn|>"
        in line["text"]
    )
    assert [m["soft_tokens"] for m in line["media"]] == [252, 50]
    start, end = line["trained"][-1]
    assert line["text"][start:end] == "A cat.<turn|>"


def test_generation_prompts_read_media_as_the_data_does(tmp_path):
    """Prompts (generate, chat) read image parts as the records do: the same
    media record, and a missing file named before any model loads
    (tests/test_media_generate.py decodes with them)."""
    _image(tmp_path / "a.png", 30, 30)
    path = _write(tmp_path, [_record([{"type": "image", "path": "a.png"}])])
    conversations, _ = records.load_conversations({"path": str(path)})
    assert commands.has_media(conversations)
    from gemma4_keras.eval import generate

    part = {"type": "image", "path": str(tmp_path / "a.png")}
    messages, _ = generate.check_prompt([{"role": "user", "content": [part]}])
    assert media.media_of(messages) == media.media_of(conversations[0].messages)
    part["path"] = str(tmp_path / "b.png")
    with pytest.raises(generate.PromptError, match="b.png: no such file"):
        generate.check_prompt([{"role": "user", "content": [part]}])


def test_media_in_a_model_message_is_refused(tmp_path):
    _image(tmp_path / "a.png", 30, 30)
    record = {
        "messages": [
            {"role": "user", "content": "draw"},
            {"role": "assistant", "content": [{"type": "image", "path": "a.png"}]},
        ]
    }
    path = _write(tmp_path, [record])
    with pytest.raises(DataError, match="a image part in a model message"):
        records.load_conversations({"path": str(path)})


def test_placeholders_in_text_are_refused(tmp_path):
    path = _write(tmp_path, [_record("look <|image|> here")])
    with pytest.raises(DataError, match="control token '<|image|>'"):
        records.load_conversations({"path": str(path)})


def test_dedupe_and_split_keep_media(tmp_path):
    _image(tmp_path / "a.png", 30, 40, seed=1)
    _image(tmp_path / "b.png", 30, 40, seed=2)
    same_text = [
        _record([{"type": "image", "path": "a.png"}, {"type": "text", "text": "?"}]),
        _record([{"type": "image", "path": "b.png"}, {"type": "text", "text": "?"}]),
        _record([{"type": "image", "path": "a.png"}, {"type": "text", "text": "?"}]),
    ]
    path = _write(tmp_path, same_text)
    conversations, _ = records.load_conversations({"path": str(path)})
    from gemma4_keras.data import quality

    kept, stats = quality.dedupe(conversations)
    assert len(kept) == 2 and stats["duplicates"][0]["source"].endswith(":3")
    paths = commands.split(
        {"path": str(path), "holdout_fraction": 0.0}, str(tmp_path / "split")
    )
    again, _ = records.load_conversations({"path": paths["train"]})
    assert [m.get("media") for c in again for m in c.messages] == [
        m.get("media") for c in kept for m in c.messages
    ]


def test_docstring_examples():
    import doctest

    failures, attempted = doctest.testmod(media)
    assert attempted >= 4 and failures == 0
