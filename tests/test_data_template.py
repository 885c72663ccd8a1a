"""Which chat template a run uses, and the guard against the checkpoint's own.

Runs the real data path (`train.prepare_data`, `train.run` up to the guard)
on the tiny checkpoints; the template the tiny writer ships is itself checked
against the official renderings in test_data_chat.py.
"""

import glob
import importlib.util
import os

import pytest

from gemma4_keras import config_lib
from gemma4_keras.data import TemplateError, chat
from gemma4_keras.data import template as template_lib
from gemma4_keras.data.records import Conversation, validate_messages
from gemma4_keras.data.render import decode_with_spans
from gemma4_keras.model import presets
from gemma4_keras.testing import tiny
from gemma4_keras.training import train

CONFIGS = sorted(
    glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "*.py"))
)
EXPECTED = {
    "tiny": "small",
    "e2b": "small",
    "e4b": "small",
    "26b_a4b": "large",
    "31b": "large",
}


def _load(path, arg="runlocal"):
    spec = importlib.util.spec_from_file_location("cfg", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def test_size_table_names_a_template_for_every_size():
    assert {k: s.template for k, s in config_lib.SIZES.items()} == EXPECTED


@pytest.mark.parametrize("size", list(EXPECTED))
def test_auto_uses_the_size_table(size):
    got = template_lib.resolve(
        "auto", size=size, size_variant=config_lib.SIZES[size].template
    )
    assert (got.variant, got.source) == (EXPECTED[size], f"size table ({size})")


def test_explicit_field_overrides_and_unknown_values_are_errors():
    assert (
        template_lib.resolve("large", size="e4b", size_variant="small").variant
        == "large"
    )
    with pytest.raises(
        TemplateError, match=r"--config.data.template='medium' is unknown"
    ):
        template_lib.resolve("medium", size="e4b", size_variant="small")
    c = config_lib.get_config("e4b", "lora")
    c.data.template = "medium"
    with pytest.raises(
        config_lib.ConfigError,
        match=r"--config.data.template='medium' must be one of auto, small, large",
    ):
        config_lib.validate(c)


def test_auto_without_checkpoint_template_or_size_fact_asks_for_the_field():
    with pytest.raises(
        TemplateError, match=r"set --config.data.template=small \(E2B/E4B\) or large"
    ):
        template_lib.resolve("auto", size="e6b", size_variant=None)


@pytest.mark.parametrize("variant", chat.TEMPLATES)
def test_auto_reads_the_checkpoint_template_first(tmp_path, variant):
    d = tiny.write_tiny_checkpoint(tmp_path / "ckpt", chat_template=variant)
    c = config_lib.get_config("e4b" if variant == "large" else "31b", "lora")
    got = presets.chat_template(c, str(d))  # the size table says the other one
    assert got.variant == variant
    assert got.official_path == str(d / "chat_template.jinja")


def test_a_template_that_is_neither_variant_is_an_error(tmp_path):
    (tmp_path / "chat_template.jinja").write_text(
        "{{ bos_token }}<start_of_turn>model\n"
    )
    with pytest.raises(
        TemplateError,
        match=r"chat_template.jinja: its thinking-off generation prompt ends",
    ):
        template_lib.resolve(
            "auto", size="e4b", size_variant="small", preset_dir=str(tmp_path)
        )


def _prepared_text(config):
    preset = presets.resolve_preset(config.model.preset)
    template = presets.chat_template(config, preset)
    tokenizer = presets.load_tokenizer(preset)
    prepared = train.prepare_data(config.data, tokenizer, template)
    example = prepared.train_examples[0]
    text, spans = decode_with_spans(
        example.token_ids, example.loss_mask, tokenizer.id_to_token
    )
    return template.variant, text, spans


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_runlocal_configs_train_behind_the_prompt_of_their_size(path):
    """E2B/E4B train without the empty thought block; 26B-A4B/31B with it."""
    config = _load(path)
    variant, text, spans = _prepared_text(config)
    assert variant == EXPECTED[config.size]
    # The first trained span: later ones may follow a tool result, not a prompt.
    prompt = text[: spans[0][0]]
    assert prompt.endswith(
        "<|turn>model\n"
        if variant == "small"
        else "<|turn>model\n" + chat.EMPTY_THOUGHT
    )
    assert (chat.EMPTY_THOUGHT in text) == (variant == "large")


def _conversations():
    raw = [
        [
            {"role": "user", "content": "Is it good?"},
            {"role": "assistant", "content": "yes"},
        ],
        [
            {"role": "developer", "content": "Be terse."},
            {"role": "user", "content": "And now?"},
            {"role": "assistant", "content": "<|channel>thought\nhmm<channel|>no"},
        ],
    ]
    return [
        Conversation(validate_messages(m), source=f"train.jsonl:{i + 1}")
        for i, m in enumerate(raw)
    ]


@pytest.mark.parametrize("variant", chat.TEMPLATES)
@pytest.mark.parametrize("enable_thinking", [False, True])
def test_guard_passes_when_the_checkpoint_template_renders_alike(
    tmp_path, variant, enable_thinking
):
    d = tiny.write_tiny_checkpoint(tmp_path / "ckpt", chat_template=variant)
    tmpl = template_lib.resolve(
        "auto", size="e4b", size_variant="small", preset_dir=str(d)
    )
    assert (
        template_lib.check_conversations(
            _conversations(), tmpl, enable_thinking=enable_thinking
        )
        == 2
    )


def test_guard_samples_the_first_twenty_and_every_system_or_thought():
    plain = _conversations()[0]
    special = _conversations()[1]
    sample = template_lib.sample_for_check([plain] * 30 + [special])
    assert len(sample) == 21 and sample[-1] is special


def test_guard_stops_on_a_template_the_package_does_not_render(tmp_path):
    d = tiny.write_tiny_checkpoint(tmp_path / "ckpt", chat_template="small")
    official = (d / "chat_template.jinja").read_text()
    edited = official.replace(
        "'<turn|>\\n' -}}{%- endif -%}\n{%- endfor",
        "'<turn|>\\n\\n' -}}{%- endif -%}\n{%- endfor",
    )
    assert edited != official
    (d / "chat_template.jinja").write_text(edited)
    tmpl = template_lib.resolve(
        "auto", size="e4b", size_variant="small", preset_dir=str(d)
    )
    ours = chat.render_conversation(_conversations()[0].messages, template="small")
    i = ours.index("<turn|>\n") + len("<turn|>\n")
    with pytest.raises(TemplateError) as info:
        template_lib.check_conversations(_conversations(), tmpl)
    message = str(info.value)
    assert message.startswith(
        f"train.jsonl:1: the conversation differs from {d / 'chat_template.jinja'} at character {i}:"
    )
    assert repr(ours[i - 30 : i + 30]) in message
    assert "official '" in message and "vs package '" in message


def test_explicit_variant_against_the_other_checkpoint_template_stops(tmp_path):
    d = tiny.write_tiny_checkpoint(tmp_path / "ckpt", chat_template="large")
    tmpl = template_lib.resolve(
        "small", size="e4b", size_variant="small", preset_dir=str(d)
    )
    with pytest.raises(
        TemplateError,
        match=r"train.jsonl:1: the generation prompt before message 1 differs",
    ):
        template_lib.check_conversations(_conversations(), tmpl)


def test_run_stops_before_training_on_an_edited_checkpoint_template(tmp_path):
    d = tiny.write_tiny_checkpoint(
        tmp_path / "ckpt", chat_template="small", ple=True, kv_shared_layers=2
    )
    path = d / "chat_template.jinja"
    path.write_text(
        path.read_text().replace("(content | trim)", "(content | trim | upper)")
    )
    config = _load(
        os.path.join(os.path.dirname(__file__), "..", "configs", "e4b_lora.py")
    )
    config.model.preset = str(d)
    with pytest.raises(
        TemplateError,
        match=r"sentiment.jsonl:\d+: the conversation differs from .*chat_template.jinja at character \d+",
    ):
        train.run(config, str(tmp_path / "run"))
    assert not os.path.exists(
        tmp_path / "run" / "config.json"
    )  # nothing of a run written


def test_transformers_renders_the_tiny_template_as_the_package_does(tmp_path):
    """transformers' own chat-template renderer is a second oracle for the guard's."""
    transformers = pytest.importorskip("transformers")
    messages = _conversations()[1].messages
    for variant in chat.TEMPLATES:
        d = tiny.write_tiny_checkpoint(tmp_path / variant, chat_template=variant)
        hf_tok = transformers.AutoTokenizer.from_pretrained(d)
        for thinking in (False, True):
            got = hf_tok.apply_chat_template(
                messages[:-1],
                tokenize=False,
                add_generation_prompt=True,
                enable_thinking=thinking,
            )
            assert got == chat.generation_prompt(
                messages[:-1], template=variant, enable_thinking=thinking
            )
            # add_special_tokens=True (the default): the tokenizer adds no BOS
            # of its own, the rendered <bos> stays the only one.
            ids = hf_tok(got)["input_ids"]
            assert ids[0] == tiny.BOS_ID and ids.count(tiny.BOS_ID) == 1


@pytest.mark.parametrize("size", ["e4b", "31b"])
def test_generate_prompts_and_stops_like_the_size(size):
    from gemma4_keras.eval import generate

    c = config_lib.get_config(size, "lora", "runlocal")
    preset = presets.resolve_preset(c.model.preset)
    tokenizer = presets.load_tokenizer(preset)
    # Prompts and stops need no model.
    gen = generate.Generator(
        None, tokenizer, template=presets.chat_template(c, preset).variant
    )
    assert gen.stop_ids == (1, 106, 50) == tiny.STOP_IDS
    messages = [{"role": "user", "content": "Is 'great soup' positive?"}]
    (ids,) = gen.prompt_ids([messages])
    want = chat.generation_prompt(messages, template=EXPECTED[size])
    assert ids == [int(i) for i in tokenizer(want)]
    assert (ids[-1] == 101) == (size == "31b")  # <channel|> ends the large prompt
