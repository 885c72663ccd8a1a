"""The shipped tool-call sample (`support_tools.jsonl`) and `configs/tiny_tools.py`."""

import collections
import importlib.util
import json
import pathlib

import jsonschema
import pytest

from gemma4_keras import config_lib
from gemma4_keras.data import samples

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def examples():
    text = samples.SUPPORT_TOOLS_PATH.read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines()]


def _calls(messages):
    """Every call after the last user message, as (name, arguments)."""
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    return [
        (c["function"]["name"], c["function"]["arguments"])
        for m in messages[last_user:]
        for c in m.get("tool_calls", ())
    ]


def test_shipped_tool_sample_is_reproduced_byte_for_byte():
    shipped = samples.SUPPORT_TOOLS_PATH.read_bytes()
    assert samples.support_tools_jsonl_text().encode("utf-8") == shipped


def test_sample_is_unique_and_mixes_every_kind(examples):
    assert len(examples) == samples.DEFAULT_NUM_TOOL_EXAMPLES
    assert len({json.dumps(e["messages"]) for e in examples}) == len(examples)
    shapes = collections.Counter()
    for e in examples:
        messages = e["messages"]
        calls_per_message = [
            len(m["tool_calls"]) for m in messages if m.get("tool_calls")
        ]
        shapes["system"] += messages[0]["role"] == "system"
        shapes["no_call"] += not _calls(messages)
        shapes["parallel"] += 2 in calls_per_message
        shapes["two_rounds"] += calls_per_message == [1, 1]
        shapes["history"] += sum(m["role"] == "user" for m in messages) > 1
    n = len(examples)
    assert 0.2 * n < shapes["system"] < 0.4 * n, shapes
    for kind in ("no_call", "parallel", "two_rounds", "history"):
        assert 0.03 * n < shapes[kind] < 0.2 * n, shapes
    names = collections.Counter(c[0] for e in examples for c in _calls(e["messages"]))
    assert set(names) == {t["function"]["name"] for t in samples.support_tools()}
    assert min(names.values()) > 0.1 * sum(names.values()), names


def test_calls_match_their_schema_results_and_the_users_words(examples):
    schemas = {
        t["function"]["name"]: t["function"]["parameters"]
        for t in samples.support_tools()
    }
    for e in examples:
        assert e["tools"] == samples.support_tools()
        messages = e["messages"]
        user = next(m for m in reversed(messages) if m["role"] == "user")["content"]
        for name, arguments in _calls(messages):
            jsonschema.validate(arguments, schemas[name])
            # Copyable: ids, products, sizes and summaries are in the text.
            for key in ("order_id", "product", "summary"):
                if key in arguments:
                    assert arguments[key] in user, (user, arguments)
            if "size" in arguments:
                assert f"size {arguments['size']}" in user
        ids = [c["id"] for m in messages for c in m.get("tool_calls", ())]
        answered = [m["tool_call_id"] for m in messages if m["role"] == "tool"]
        assert sorted(answered) == sorted(ids)
        assert messages[-1]["role"] == "assistant" and messages[-1]["content"]


def _tiny_tools_config(arg=None):
    path = ROOT / "configs" / "tiny_tools.py"
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.mark.parametrize("arg", [None, "runlocal"])
def test_tiny_tools_config_trains_on_the_shipped_sample(arg):
    config = _tiny_tools_config(arg)
    config_lib.validate(config)
    assert pathlib.Path(config.data.path) == samples.SUPPORT_TOOLS_PATH
    assert config.data.max_length == config_lib.TOOLS_DEFAULT["data.max_length"]
    if arg == "runlocal":
        assert config.train.max_steps == 2 and config.model.preset == "tiny"
    else:
        assert config == config_lib.get_config("tiny", "lora", "tools")


def test_tools_switch_is_the_tiny_models_only():
    with pytest.raises(config_lib.ConfigError, match="'tools' is a run of the tiny"):
        config_lib.get_config("e2b", "lora", "tools")
