"""`generate` (CLI and Python API) with images and audio, against transformers.

Oracle: transformers' `Gemma4ForConditionalGeneration.generate` (greedy) on
the tiny multimodal checkpoint (`tiny.tiny_checkpoint(layout="multimodal")`),
fed the prompt ids, pixel values and position ids our data layer makes
(their equality with the HF processor's is tests/test_media_data.py's).
"""

import json
import pathlib
import shutil

import numpy as np
import oracles
import pytest

import gemma4_keras
from gemma4_keras import cli, config_lib
from gemma4_keras.data import media
from gemma4_keras.eval import generate
from gemma4_keras.model import hub
from gemma4_keras.testing import media as media_files
from gemma4_keras.testing import tiny
from gemma4_keras.training import api

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"


@pytest.fixture(scope="module")
def checkpoint():
    return tiny.tiny_checkpoint(layout="multimodal")


def _config(checkpoint):
    config = config_lib.get_config("tiny", "lora", "runlocal")
    config.model.preset = str(checkpoint)
    return config


def _question(image_path):
    return [
        {
            "role": "user",
            "content": [
                {"type": "image", "path": str(image_path)},
                {"type": "text", "text": "What colour is this?"},
            ],
        }
    ]


def _hf_model(checkpoint):
    torch = oracles.need("torch")
    transformers = oracles.need("transformers")
    return transformers.Gemma4ForConditionalGeneration.from_pretrained(
        checkpoint, dtype=torch.float32
    ).eval()


def _hf_greedy(hf, ids, pixels, positions, max_new_tokens):
    torch = oracles.need("torch")
    image_id = tiny.SPECIAL_TOKENS["<|image|>"]
    ids = torch.tensor([ids])
    with torch.no_grad():
        out = hf.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pixel_values=torch.tensor(pixels[None]),
            image_position_ids=torch.tensor(positions[None]),
            mm_token_type_ids=(ids == image_id).long(),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=list(generate.STOP_IDS),
            pad_token_id=0,
        )
    new = [int(t) for t in out[0, ids.shape[1] :]]
    cut = [j for j, t in enumerate(new) if t in generate.STOP_IDS]
    return new[: cut[0]] if cut else new


@pytest.mark.slow  # compiles KerasHub's generate loop over ~300 tokens and runs transformers (~60 s)
def test_generate_with_an_image_equals_transformers(checkpoint, tmp_path):
    """The public `generate` with an image part: the towers load from the
    preset, and the greedy answer is transformers' on the same inputs.

    The tiny random base writes the same token whatever the image (its top
    logit leads by 7-12 for red, blue, green or noise), so this pins the
    path (towers from the preset, prompt ids, decoding) more than the
    pixels; that the cached prefill reads the pixels (zeroed ones give
    other logits) is tests/test_media_model.py's
    test_generation_prefill_with_media_equals_transformers."""
    path = media_files.write_image(tmp_path / "a.png", 60, 90, seed=3)
    config = _config(checkpoint)
    messages = _question(path)
    (answer,) = gemma4_keras.generate(config, [messages], max_new_tokens=8)

    tokenizer = hub.tokenizer_from_preset(str(checkpoint))
    gen = generate.Generator(None, tokenizer, template="small")
    normalised, _ = generate.check_prompt(messages)
    (ids,) = gen.prompt_ids([normalised])
    (record,) = media.media_of(normalised)
    assert ids.count(tiny.SPECIAL_TOKENS["<|image|>"]) == record["soft_tokens"]
    pixels, positions = media.image_features(record)
    hf_ids = _hf_greedy(_hf_model(checkpoint), ids, pixels, positions, 8)
    print(f"ours {answer!r}; transformers {generate.decode_ids(tokenizer, hf_ids)!r}")
    assert hf_ids, "transformers stopped at once: the comparison would be empty"
    assert answer == generate.decode_ids(tokenizer, hf_ids)


def test_a_missing_image_stops_before_the_model_loads(checkpoint, tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(generate.PromptError, match=f"{missing}: no such file"):
        gemma4_keras.generate(_config(checkpoint), [_question(missing)])


def test_cli_image_flag_names_a_bad_path(checkpoint, tmp_path, capsys):
    bad = tmp_path / "not_an_image.png"
    bad.write_text("hello")
    argv = [
        "gemma4-keras",
        "generate",
        f"--config={CONFIGS}/tiny.py:runlocal",
        f"--config.model.preset={checkpoint}",
        "--adapter=none",
        "--prompt=What is it?",
        f"--image={bad}",
    ]
    assert cli.main(argv) != 0
    assert f"{bad}: not an image" in capsys.readouterr().err


def test_read_prompts_puts_media_before_each_prompt(tmp_path):
    image = media_files.write_image(tmp_path / "a.png", 20, 30)
    clip = media_files.write_wav(tmp_path / "a.wav", np.zeros(8000))
    (conversation,) = generate.read_prompts(["Describe."], None, [image], [clip])
    (message,) = conversation.messages
    assert [r["type"] for r in message["media"]] == ["image", "audio"]
    assert message["content"] == "<|image|><|audio|>Describe."
    with pytest.raises(generate.PromptError, match="--prompt"):
        generate.read_prompts([], None, [image])


def test_prompts_file_media_paths_are_relative_to_it(tmp_path):
    (tmp_path / "pics").mkdir()
    media_files.write_image(tmp_path / "pics" / "a.png", 20, 30)
    line = {"messages": _question("a.png")}
    path = tmp_path / "pics" / "prompts.jsonl"
    path.write_text(json.dumps(line) + "\n")
    (conversation,) = generate.read_prompts([], str(path))
    (record,) = media.media_of(conversation.messages)
    assert record["source"] == str(tmp_path / "pics" / "a.png")
    path.write_text(json.dumps({"messages": _question("b.png")}) + "\n")
    with pytest.raises(generate.PromptError, match=r"prompts.jsonl:1: .*b.png"):
        generate.read_prompts([], str(path))


def test_data_check_sizes_images_by_the_checkpoints_processor_config(
    checkpoint, tmp_path
):
    """`data check` (as training) and generate read processor_config.json from the
    preset: 60 soft tokens for a 300 x 500 image at max_soft_tokens=70 (the
    HF processor's count: tests/test_media_data.py), 252 at the default."""
    shutil.copytree(checkpoint, tmp_path / "ckpt")
    image = media_files.write_image(tmp_path / "a.png", 300, 500)
    record = {"messages": [*_question(image), {"role": "model", "content": "red"}]}
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps(record) + "\n")
    config = _config(tmp_path / "ckpt")
    config.data.path = str(data)
    assert gemma4_keras.check(config)["media"]["image_soft_tokens"] == 252
    (tmp_path / "ckpt" / "processor_config.json").write_text(
        json.dumps({"image_processor": {"max_soft_tokens": 70}})
    )
    assert gemma4_keras.check(config)["media"]["image_soft_tokens"] == 60
    # generate's prompts too (--image, and the Python API's messages).
    (prompt,) = api.read_prompts(config, ["Colour?"], None, [image])
    assert [r["soft_tokens"] for r in media.media_of(prompt.messages)] == [60]


COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220)}


def _colour_set(directory, name, per_colour, seed):
    """A JSONL of colour squares (shades vary) answered with the colour's name."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    lines, images = [], []
    for k in range(per_colour):
        for colour, rgb in COLOURS.items():
            shade = np.clip(np.asarray(rgb) + rng.integers(-20, 21, 3), 0, 255)
            path = directory / f"{name}_{colour}_{k}.png"
            Image.fromarray(np.tile(shade.astype(np.uint8), (24, 24, 1))).save(path)
            answer = {"role": "model", "content": colour}
            lines.append({"messages": [*_question(path), answer]})
            images.append((path, colour))
    path = directory / f"{name}.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path, images


@pytest.mark.slow  # a 24-step tiny multimodal run (~60 s), then our and PEFT's generate (~60 s)
def test_tuned_answers_on_images_equal_transformers_with_peft(checkpoint, tmp_path):
    """After a short run on colour squares the answers depend on the image
    (the base's do not: see above), and the public `generate` with the run's
    adapter answers as transformers + PEFT with it (exported for the
    multimodal class), greedy."""
    peft = oracles.need("peft")
    train, _ = _colour_set(tmp_path, "train", 4, 0)
    held, images = _colour_set(tmp_path, "held", 1, 1)
    config = _config(checkpoint)
    for field, value in {
        "data.path": str(train),
        "data.eval_path": str(held),
        "data.max_length": 600,
        "data.packing": True,
        "train.batch_size": 4,
        "train.max_steps": 24,
        "train.learning_rate": 0.01,
        "eval.max_examples": 1,
    }.items():
        section, key = field.split(".")
        config[section][key] = value
    workdir = tmp_path / "run"
    assert gemma4_keras.run(config, str(workdir))["status"] == "finished"
    adapter = str(workdir / "adapter")
    prompts = [_question(path) for path, _ in images]
    ours = gemma4_keras.generate(config, prompts, adapter=adapter, max_new_tokens=4)
    print("tuned answers", list(zip([c for _, c in images], ours)))
    assert len(set(ours)) > 1, ours  # the answer reads the image

    tokenizer = hub.tokenizer_from_preset(str(checkpoint))
    gen = generate.Generator(None, tokenizer, template="small")
    # The run's adapter/ has the text model's keys; the export for
    # transformers' multimodal class puts them under model.language_model.
    exported = gemma4_keras.export(
        config,
        str(workdir),
        "peft",
        str(tmp_path / "peft"),
        layout="conditional_generation",
    )
    hf = peft.PeftModel.from_pretrained(_hf_model(checkpoint), exported).eval()
    theirs = []
    for messages in prompts:
        normalised, _ = generate.check_prompt(messages)
        (ids,) = gen.prompt_ids([normalised])
        (record,) = media.media_of(normalised)
        pixels, positions = media.image_features(record)
        new = _hf_greedy(hf, ids, pixels, positions, 4)
        theirs.append(generate.decode_ids(tokenizer, new))
    assert ours == theirs
