"""Generation with tools: decoding the tool syntax, prompts with declarations,
structured answers, and the `chat` loop that runs Python functions."""

import doctest
import json
import pathlib

import keras_hub
import numpy as np
import pytest

import gemma4_keras
from gemma4_keras import cli, config_lib
from gemma4_keras.data import chat, records, tool_format
from gemma4_keras.eval import generate
from gemma4_keras.testing import tiny
from gemma4_keras.training import api

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"
WEATHER = {
    "type": "function",
    "function": {
        "name": "weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
OSLO = {"name": "weather", "arguments": {"city": "Oslo"}}


def weather(city: str) -> dict:
    """Current weather in a city."""
    return {"temp": -2, "city": city}


@pytest.fixture(scope="module")
def tokenizer():
    return keras_hub.models.Gemma4Tokenizer.from_preset(str(tiny.tiny_checkpoint()))


def scripted(tokenizer, outputs, **kwargs) -> generate.Generator:
    """A real Generator whose decoder answers from `outputs`, one per prompt;
    or, `outputs` a function, `outputs(prompt ids)`.

    `gen.prompts` records the token ids of every prompt it was given.
    """
    kwargs.setdefault("template", "small")
    gen = generate.Generator(None, tokenizer, **kwargs)
    script = iter(outputs) if not callable(outputs) else None
    gen.prompts = []

    def decode(prompts, max_new_tokens, length=None, media=None):
        gen.prompts.extend(prompts)
        return [outputs(p) if script is None else next(script) for p in prompts]

    gen._generate_batch = decode  # this instance only
    return gen


def encode(gen, messages, tools=None) -> list[int]:
    text = chat.generation_prompt(
        messages,
        template=gen.template,
        tools=tools,
        enable_thinking=gen.enable_thinking,
    )
    return gen.chat_tokenizer.encode_texts([text])[0]


def test_docstring_examples():
    names = [
        "tools_per_conversation",
        "check_prompt",
        "read_prompts",
        "parse_answer",
        "structured_answer",
        "function_declaration",
        "tool_functions",
        "run_tool",
        "buffer_length",
    ]
    runner = doctest.DocTestRunner()
    finder = doctest.DocTestFinder()
    for name in names:
        for test in finder.find(getattr(generate, name), name, globs=vars(generate)):
            runner.run(test)
    assert runner.failures == 0


# --- decoding ---------------------------------------------------------------


class DropsControls:
    """The tiny tokenizer, detokenizing as a tokenizer that drops control ids."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def detokenize(self, ids):
        kept = [i for i in np.asarray(ids).tolist() if i >= tiny.NUM_SPECIAL_IDS]
        return self._tokenizer.detokenize(np.asarray(kept, np.int32))


@pytest.mark.parametrize("wrap", [False, True], ids=["tiny", "drops_controls"])
def test_generated_call_ids_decode_to_a_parsable_call(tokenizer, wrap):
    def ids(text):
        return np.asarray(tokenizer(text)).tolist()

    quote = tokenizer.token_to_id(tool_format.QUOTE)
    generated = (
        [48] + ids("call:weather{city:") + [quote] + ids("Oslo") + [quote] + ids("}")
    )
    generated += [49]
    assert (generated[0], generated[-1]) == (48, 49)
    tok = DropsControls(tokenizer) if wrap else tokenizer
    if wrap:  # the tokenizer alone loses the syntax ...
        lost = tok.detokenize(np.asarray(generated, np.int32))
        lost = lost.numpy().decode() if hasattr(lost, "numpy") else str(lost)
        assert tool_format.CALL_OPEN not in lost
    text = generate.decode_ids(tok, generated)  # ... the decoder keeps it
    assert text == tool_format.format_call(OSLO)
    assert tool_format.parse_calls(text) == [OSLO]


def test_stop_ids_are_cut_and_the_rest_decoded(tokenizer):
    gen = generate.Generator(None, tokenizer, template="small")

    class LM:
        def generate(self, inputs, stop_token_ids):
            out = inputs["token_ids"].copy()
            mask = inputs["padding_mask"].copy()
            n = int(mask[0].sum())
            out[0, n : n + 3] = [48, 49, 50]  # a call, then <|tool_response>
            mask[0, n : n + 3] = True
            return {"token_ids": out, "padding_mask": mask}

    gen.lm = LM()
    messages = [{"role": "user", "content": "Hi"}]
    (text,) = gen.generate([messages], tools=[[WEATHER]], max_new_tokens=8)
    assert text == tool_format.CALL_OPEN + tool_format.CALL_CLOSE


# --- prompts ----------------------------------------------------------------


def test_prompts_carry_their_declarations_and_continue_after_results(tokenizer):
    ask = [{"role": "user", "content": "Weather in Oslo?"}]
    after = ask + [
        {
            "role": "model",
            "content": "",
            "tool_calls": [OSLO],
            "tool_responses": [{"name": "weather", "response": {"temp": -2}}],
        }
    ]
    for thinking in (False, True):
        gen = scripted(tokenizer, ["a", "b", "c"], enable_thinking=thinking)
        gen.generate([ask], tools=[[WEATHER]])
        gen.generate([after], tools=[[WEATHER]])
        gen.generate([ask])
        assert gen.prompts == [
            encode(gen, ask, [WEATHER]),
            encode(gen, after, [WEATHER]),
            encode(gen, ask),
        ]
        tail = "<|channel>thought\n" if thinking else "<tool_response|>"
        assert gen.prompt_text(after, [WEATHER]).endswith(tail)


def test_tools_must_be_one_list_per_conversation(tokenizer):
    gen = scripted(tokenizer, [])
    ask = [{"role": "user", "content": "Hi"}]
    with pytest.raises(generate.PromptError, match="one list of declarations"):
        gen.generate([ask], tools=[WEATHER])  # a flat list of declarations
    with pytest.raises(generate.PromptError, match="got 2 entries for 1"):
        gen.generate([ask], tools=[[WEATHER], [WEATHER]])


def write_lines(path: pathlib.Path, *lines) -> str:
    path.write_text(
        "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n"
    )
    return str(path)


OPENAI_TURN = [
    {"role": "user", "content": "Weather in Oslo?"},
    {
        "role": "assistant",
        "tool_calls": [
            {
                "id": "c1",
                "function": {"name": "weather", "arguments": '{"city": "Oslo"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "c1", "content": '{"temp": -2}'},
]


def test_read_prompts_takes_tools_and_tool_results(tmp_path):
    path = write_lines(
        tmp_path / "p.jsonl",
        "plain text",
        {"messages": OPENAI_TURN[:1], "tools": [WEATHER]},
        {"messages": OPENAI_TURN, "tools": [WEATHER]},
    )
    prompts = generate.read_prompts(['{"messages": 1}'], path)
    assert [p.source for p in prompts] == [
        "prompt 1",
        f"{path}:1",
        f"{path}:2",
        f"{path}:3",
    ]
    # A --prompt is a user message, even when it looks like JSON.
    assert prompts[0].messages == [{"role": "user", "content": '{"messages": 1}'}]
    assert prompts[1].tools == [] and prompts[2].tools == [WEATHER]
    last = prompts[3].messages[-1]
    assert last["tool_calls"] == [{**OSLO, "id": "c1"}]
    assert last["tool_responses"] == [{"name": "weather", "response": '{"temp": -2}'}]


@pytest.mark.parametrize(
    "line, message",
    [
        (
            {"messages": OPENAI_TURN[:2]},
            r"p.jsonl:1: the conversation must end with a user turn",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "model", "content": "b"},
                ]
            },
            "must end with a user turn, or with tool results",
        ),
        (
            {"messages": OPENAI_TURN[:1], "tools": [{"name": "a b"}]},
            r"p.jsonl:1: tools\[0\]",
        ),
        (
            {"messages": [{"role": "user", "content": " "}]},
            "p.jsonl:1: empty user message",
        ),
        ({"messages": [{"role": "tool", "content": "x"}]}, "p.jsonl:1: message 0"),
        ({"prompt": "x"}, r'p.jsonl:1: expected \{"messages"'),
    ],
)
def test_read_prompts_names_a_bad_prompt(tmp_path, line, message):
    path = write_lines(tmp_path / "p.jsonl", line)
    with pytest.raises(generate.PromptError, match=message):
        generate.read_prompts([], path)


# --- answers ----------------------------------------------------------------


def test_parse_answer_splits_thought_calls_and_text():
    call = tool_format.format_call(OSLO)
    thought = "<|channel>thought\nneed data<channel|>"
    assert generate.parse_answer(thought + call) == {
        "role": "model",
        "content": "",
        "thinking": "need data",
        "tool_calls": [OSLO],
    }
    # After results with thinking on the prompt opened the thought.
    assert generate.parse_answer("checked<channel|>It is -2 C.") == {
        "role": "model",
        "content": "It is -2 C.",
        "thinking": "checked",
    }
    broken = generate.parse_answer(call[:-4])
    assert broken["content"] == call[:-4] and "not closed" in broken["tool_call_error"]
    assert "tool_calls" not in broken


# --- declarations and tool runs ---------------------------------------------


def test_function_declarations_from_signatures():
    def search(
        query: str,
        limit: int = 5,
        score: float | None = None,
        tags: list[str] | None = None,
        exact: bool = False,
        filters: dict = None,  # noqa: RUF013
        *rest,
        anything=None,
        **options,
    ) -> list:
        """Search the catalogue.

        Longer text.

        Args:
          query: what to look for.
          limit (int): how many hits.
            A continuation line.

        Returns:
          hits.
        """

    declared = generate.function_declaration(search)
    assert declared["type"] == "function"
    function = declared["function"]
    assert (function["name"], function["description"]) == (
        "search",
        "Search the catalogue.",
    )
    assert function["parameters"] == {
        "type": "object",
        "properties": {
            "query": {"type": "string", "description": "what to look for."},
            "limit": {"type": "integer", "description": "how many hits."},
            "score": {"type": "number"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "exact": {"type": "boolean"},
            "filters": {"type": "object"},
            "anything": {},
        },
        "required": ["query"],
    }
    # What the template writes of it reads as a valid declaration.
    assert records.normalise_tools([declared]) == [declared]
    assert generate.function_declaration(search, "find")["function"]["name"] == "find"


def test_tools_and_declarations_are_checked():
    assert list(generate.tool_functions({"w": weather})) == ["w"]
    assert list(generate.tool_functions([weather])) == ["weather"]
    with pytest.raises(ValueError, match="not a function"):
        generate.tool_functions({"w": 3})
    assert generate.declare({"weather": weather}) == [
        generate.function_declaration(weather)
    ]
    assert generate.declare({"weather": weather}, [WEATHER]) == [WEATHER]
    with pytest.raises(generate.PromptError, match="declared twice"):
        generate.declare({}, [WEATHER, WEATHER])


def test_run_tool_turns_failures_into_results():
    def boom(city: str):
        raise RuntimeError("service down")

    functions = {"weather": weather, "boom": boom, "obj": lambda: object}
    assert generate.run_tool(functions, OSLO) == {
        "name": "weather",
        "response": {"temp": -2, "city": "Oslo"},
    }
    assert generate.run_tool(
        functions, {"name": "boom", "arguments": {"city": "x"}}
    ) == {
        "name": "boom",
        "response": {"error": "service down"},
    }
    bad_args = generate.run_tool(functions, {"name": "weather", "arguments": {}})
    assert "city" in bad_args["response"]["error"]
    assert generate.run_tool(functions, {"name": "nope", "arguments": {}})[
        "response"
    ] == {"error": "unknown function 'nope'"}
    assert generate.run_tool(functions, {"name": "obj", "arguments": {}})[
        "response"
    ] == str(object)


# --- the chat loop ----------------------------------------------------------

ASK = [{"role": "user", "content": "Weather in Oslo?"}]


def test_chat_loop_runs_the_calls_and_goes_on_after_their_results(tokenizer):
    ran = []

    def tool(city: str) -> dict:
        ran.append(city)
        return {"temp": -2}

    call = tool_format.format_call(OSLO)
    gen = scripted(tokenizer, [call, "It is -2 C in Oslo."])
    new = generate.chat_loop(
        gen,
        list(ASK),
        functions={"weather": tool},
        declarations=[WEATHER],
        max_steps=5,
    )
    first = {
        "role": "model",
        "content": "",
        "tool_calls": [OSLO],
        "tool_responses": [{"name": "weather", "response": {"temp": -2}}],
    }
    assert new == [first, {"role": "model", "content": "It is -2 C in Oslo."}]
    assert ran == ["Oslo"]
    # The second prompt is the template's, after the results.
    assert gen.prompts == [
        encode(gen, ASK, [WEATHER]),
        encode(gen, ASK + [first], [WEATHER]),
    ]
    text = chat.generation_prompt(ASK + [first], template="small", tools=[WEATHER])
    assert text.endswith(
        call + "<|tool_response>response:weather{temp:-2}<tool_response|>"
    )


def test_chat_loop_with_thinking_reads_the_opened_thought(tokenizer):
    call = tool_format.format_call(OSLO)
    gen = scripted(
        tokenizer,
        ["<|channel>thought\nlook it up<channel|>" + call, "cold<channel|>-2 C."],
        template="large",
        enable_thinking=True,
    )
    new = generate.chat_loop(
        gen, list(ASK), functions={"weather": weather}, declarations=[WEATHER]
    )
    assert new[0]["thinking"] == "look it up" and new[0]["tool_calls"] == [OSLO]
    assert new[1] == {"role": "model", "content": "-2 C.", "thinking": "cold"}
    assert gen.prompts[1] == encode(gen, ASK + new[:1], [WEATHER])


def test_chat_loop_stops_after_max_steps(tokenizer):
    call = tool_format.format_call(OSLO)
    gen = scripted(tokenizer, [call] * 5)
    new = generate.chat_loop(
        gen,
        list(ASK),
        functions={"weather": weather},
        declarations=[WEATHER],
        max_steps=2,
    )
    assert len(new) == 2 and len(gen.prompts) == 2
    assert all(m["tool_calls"] and m["tool_responses"] for m in new)
    with pytest.raises(generate.PromptError, match="max_steps=0"):
        generate.chat_loop(gen, ASK, functions={}, declarations=[], max_steps=0)


@pytest.fixture
def loads(monkeypatch, tokenizer):
    """Replaces the model load by scripted generators; lists what loaded."""
    made = []

    def load_generator(config, adapter=None, media_kinds=()):
        made.append((adapter, scripted(tokenizer, made_outputs.pop(0))))
        return made[-1][1]

    made_outputs = []
    monkeypatch.setattr(generate, "load_generator", load_generator)
    return made, made_outputs


def test_public_chat_loads_the_model_once(loads):
    made, outputs = loads
    outputs.append([tool_format.format_call(OSLO), "It is -2 C."])
    config = config_lib.get_config("tiny", "lora", "runlocal")
    new = gemma4_keras.chat(config, "Weather in Oslo?", tools=[weather], max_steps=3)
    assert [m.get("tool_calls") for m in new] == [[OSLO], None]
    assert new[0]["tool_responses"][0]["response"] == {"temp": -2, "city": "Oslo"}
    assert new[-1]["content"] == "It is -2 C."
    assert len(made) == 1 and made[0][0] == "none"
    # Declarations shown: built from the signature, or given.
    gen = made[0][1]
    declared = [generate.function_declaration(weather)]
    assert gen.prompts[0] == encode(gen, ASK, declared)
    outputs.append(["Fine."])
    gemma4_keras.chat(config, ASK, tools={"weather": weather}, declarations=[WEATHER])
    assert made[1][1].prompts[0] == encode(made[1][1], ASK, [WEATHER])


def test_public_generate_returns_calls_when_tools_are_given(loads):
    made, outputs = loads
    call = tool_format.format_call(OSLO)
    config = config_lib.get_config("tiny", "lora", "runlocal")
    outputs.append([call])
    assert gemma4_keras.generate(config, "Weather?", tools=[WEATHER]) == [
        {"content": "", "tool_calls": [OSLO]}
    ]
    outputs.append([call])
    prompt = {"messages": OPENAI_TURN, "tools": [WEATHER]}
    assert gemma4_keras.generate(config, [prompt]) == [
        {"content": "", "tool_calls": [OSLO]}
    ]
    assert made[-1][1].prompts[0] == encode(
        made[-1][1], records.normalise_messages(OPENAI_TURN), [WEATHER]
    )
    outputs.append(["Hello"])
    assert gemma4_keras.generate(config, "Hi") == ["Hello"]  # no tools: strings


def test_cli_generate_prints_the_calls(loads, tmp_path, capsys):
    made, outputs = loads
    call = tool_format.format_call(OSLO)
    tool_open = 46  # <|tool>: the prompt declares tools
    outputs.append(lambda ids: call if tool_open in ids else "Plain.")
    path = write_lines(
        tmp_path / "p.jsonl", {"messages": OPENAI_TURN[:1], "tools": [WEATHER]}, "Hi"
    )
    argv = ["gemma4-keras", "generate", f"--config={CONFIGS}/tiny.py:runlocal"]
    assert cli.main([*argv, f"--prompts_file={path}", "--adapter=none"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()[-2:]]
    assert lines == [
        {"prompt": "Weather in Oslo?", "answer": call, "tool_calls": [OSLO]},
        {"prompt": "Hi", "answer": "Plain."},
    ]


def test_chat_on_the_tiny_model():
    config = config_lib.get_config("tiny", "lora", "runlocal")
    new = api.chat(
        config, "Weather in Oslo?", tools=[weather], max_steps=2, max_new_tokens=4
    )
    assert 1 <= len(new) <= 2
    assert all(m["role"] == "model" for m in new)
    assert isinstance(new[-1]["content"], str)
