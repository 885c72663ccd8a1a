"""Text generation from chat messages, with the training model itself.

`Generator.from_model` decodes with the `Gemma4LoraModel` that trained (float
or NF4 base, adapter on, off or switched) through its KV-cached KerasHub
`CausalLM` (`model.decoding`): no second copy of the base is loaded.
Prompts are rendered by `data.generation_prompt` with the chat template
variant of the tuned size (`presets.chat_template`) and already start with
`<bos>`: they are tokenized without adding another start token. Decoding
stops on the ids the -it `generation_config.json` lists: `<eos>`, `<turn|>`
and `<|tool_response>`.

Generated text keeps every chat control token (`chat.CONTROL_TOKENS`), so a
tool call reads back with `tool_format.parse_calls`. `chat_loop` drives a
conversation with Python functions as tools: generate, run the calls, go on
in the same turn after their results, until an answer without calls.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import keras
import numpy as np

from gemma4_keras.data import (
    as_chat_tokenizer,
    chat,
    generation_prompt,
    media,
    packing,
    records,
    tool_format,
)
from gemma4_keras.exporters import peft
from gemma4_keras.model import decoding, lora, presets

# generation_config.json of the Gemma 4 -it checkpoints: eos_token_id [1, 106, 50].
STOP_IDS = decoding.STOP_IDS
STOP_TOKENS = ("<eos>", "<turn|>", "<|tool_response>")


def stop_ids(tokenizer) -> tuple[int, ...]:
    """Ids of `STOP_TOKENS` in `tokenizer`, which must match `STOP_IDS`.

    A tokenizer that puts them elsewhere is not a Gemma 4 tokenizer (the
    tiny one keeps the real ids); decoding would run past the turn.
    """
    ids = tuple(int(tokenizer.token_to_id(t)) for t in STOP_TOKENS)
    if ids != STOP_IDS:
        raise ValueError(
            f"the tokenizer maps {list(STOP_TOKENS)} to {list(ids)}, not "
            f"{list(STOP_IDS)} as Gemma 4 does; is it a Gemma 4 tokenizer?"
        )
    return ids


# Context windows of the released sizes (tokens), for presets without a
# config.json; matched in this order against the lower-cased preset name.
CONTEXT_LENGTHS = (("26b", 262144), ("31b", 262144), ("2b", 131072), ("4b", 131072))


class PromptError(ValueError):
    """A prompt that cannot be generated from (empty, malformed, too long)."""


def context_length(preset: str) -> int | None:
    """The model's context window in tokens, or None when unknown.

    Read from a checkpoint directory's `config.json` (`max_position_embeddings`),
    else from the preset name of a released size.
    """

    path = os.path.join(str(preset), "config.json")
    if os.path.isfile(path):
        try:
            with open(path) as f:
                cfg = json.load(f)
        except (OSError, ValueError):
            return None
        cfg = cfg.get("text_config", cfg) if isinstance(cfg, dict) else {}
        value = cfg.get("max_position_embeddings")
        return int(value) if value else None
    name = os.path.basename(str(preset).rstrip("/")).lower()
    for size, length in CONTEXT_LENGTHS:
        if size in name:
            return length
    return None


def buffer_length(prompt_len: int, max_new_tokens: int) -> int:
    """Token buffer of a batch: rounded up to a power of two, so a handful
    of compiled shapes serve every batch.

    >>> buffer_length(30, 4)
    64
    """
    return int(2 ** np.ceil(np.log2(prompt_len + max_new_tokens)))


def batch_devices() -> int:
    """Devices on the batch axis of the active Keras distribution (1 if none)."""
    dist = keras.distribution.distribution()
    if dist is None:
        return 1
    mesh = dist.device_mesh
    name = getattr(dist, "batch_dim_name", None) or mesh.axis_names[0]
    return int(mesh.shape[list(mesh.axis_names).index(name)])


def tools_per_conversation(tools, n: int) -> list:
    """`tools` as one declaration list (or None) per conversation.

    >>> tools_per_conversation(None, 2)
    [None, None]
    """
    if tools is None:
        return [None] * n
    tools = list(tools)
    if len(tools) != n or any(isinstance(t, Mapping) for t in tools):
        raise PromptError(
            f"tools: got {len(tools)} entries for {n} conversations; pass one list "
            "of declarations (or None) per conversation"
        )
    return tools


def _detokenize(tokenizer, ids: list[int]) -> str:
    if not ids:
        return ""
    text = tokenizer.detokenize(np.asarray(ids, np.int32))
    text = text.numpy() if hasattr(text, "numpy") else text
    return text.decode("utf-8") if isinstance(text, bytes) else str(text)


def decode_ids(tokenizer, ids: Sequence[int]) -> str:
    """Generated ids as text, each chat control token spelled out.

    A tokenizer may drop control tokens when it detokenizes; the tool syntax
    needs them (`<|tool_call>`, `<|"|>`, ...), so they are mapped by id and
    only the text runs between them are detokenized. Ids past the
    tokenizer's vocabulary (a model's embedding may be padded past it) are
    dropped: SentencePiece refuses them.

    Example (ids of the tiny tokenizer):
        ids   48            "call:f{x:"  52     "a"  52     "}"  49
        text  <|tool_call>  call:f{x:    <|"|>  a    <|"|>  }    <tool_call|>
    """
    controls = {i: t for t, i in as_chat_tokenizer(tokenizer).special_ids.items()}
    known = tokenizer.vocabulary_size()
    parts, run = [], []
    for i in map(int, ids):
        if i in controls:
            parts += [_detokenize(tokenizer, run), controls[i]]
            run = []
        elif 0 <= i < known:
            run.append(i)
    return "".join(parts) + _detokenize(tokenizer, run)


class Generator:
    """Batched generation from chat messages, over any KerasHub `CausalLM`.

    Example:
      >>> gen = Generator.from_model(model, tokenizer, template="small")
      >>> gen.generate([[{"role": "user", "content": "Hi"}]], max_new_tokens=16)
      ['Hello! How can I help?']
      >>> gen.generate([[{"role": "user", "content": "Weather in Oslo?"}]],
      ...              tools=[[weather_declaration]])
      ['<|tool_call>call:weather{city:<|"|>Oslo<|"|>}<tool_call|>']
      >>> model.set_adapter(None)   # the same generator, now the base alone
    """

    def __init__(
        self,
        lm,
        tokenizer,
        *,
        template: str,
        enable_thinking: bool = False,
        max_length: int | None = None,
    ):
        self.max_length = max_length  # context window; None = unchecked
        self.lm = lm
        self.tokenizer = tokenizer
        self.chat_tokenizer = as_chat_tokenizer(tokenizer)
        self.template = chat.check_template(template)
        self.enable_thinking = enable_thinking
        self.stop_ids = stop_ids(tokenizer)

    @classmethod
    def from_model(cls, model, tokenizer, *, sampler: str = "greedy", **kwargs):
        """Decodes with a `Gemma4LoraModel` (its active adapter, its base)."""
        lm = decoding.Gemma4LoraCausalLM(model, sampler=sampler)
        return cls(lm, tokenizer, **kwargs)

    def prompt_text(self, messages, tools=None) -> str:
        """The serving prompt of one conversation (`data.generation_prompt`)."""
        return generation_prompt(
            messages,
            template=self.template,
            tools=tools,
            enable_thinking=self.enable_thinking,
        )

    def prompt_ids(self, messages_list, tools=None) -> list[list[int]]:
        """Token ids of the serving prompts, each image / clip expanded into
        its markers and soft tokens (`media.expand`, as in training)."""
        tools = tools_per_conversation(tools, len(messages_list))
        texts = [self.prompt_text(m, t) for m, t in zip(messages_list, tools)]
        out = []
        for ids, messages in zip(
            self.chat_tokenizer.encode_texts(texts), messages_list
        ):
            records = media.media_of(messages)
            if records:
                ids = np.asarray(ids, np.int64)
                ids, _ = media.expand(
                    ids,
                    np.zeros(len(ids), bool),
                    records,
                    self.chat_tokenizer.special_ids,
                )
                ids = [int(i) for i in ids]
            out.append(list(ids))
        return out

    def generate(
        self,
        messages_list,
        *,
        tools=None,
        max_new_tokens: int = 64,
        batch_size: int = 8,
    ) -> list[str]:
        """Generates what the model writes next in each conversation, up to its stop.

        Args:
          messages_list: conversations in the package's form
            (`records.normalise_messages`), each ending in a user message (a
            new model turn) or in a model message with `tool_responses` (the
            same turn goes on after the results).
          tools: None, or one list of OpenAI-style declarations (or None)
            per conversation, written into its system turn.

        Returns:
          One text per conversation, control tokens spelled out (a call
          reads back with `tool_format.parse_calls`); the stop token is cut.
        """
        if max_new_tokens < 1:
            raise PromptError(f"max_new_tokens={max_new_tokens} must be > 0")
        prompts = self.prompt_ids(messages_list, tools)
        records = [media.media_of(m) for m in messages_list]
        for i, p in enumerate(prompts):
            if self.max_length and len(p) + max_new_tokens > self.max_length:
                raise PromptError(
                    f"prompt {i + 1} is {len(p)} tokens; with max_new_tokens="
                    f"{max_new_tokens} that is {len(p) + max_new_tokens}, over the "
                    f"model's context of {self.max_length} tokens. Shorten the prompt "
                    "or lower --max_new_tokens"
                )
        # Batches of similar length (fewer steps through longer prompts), all
        # of one shape: each shape and adapter is one compilation.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        length = buffer_length(len(prompts[order[-1]]), max_new_tokens)
        out: list[str] = [""] * len(prompts)
        # Every batch is padded to one size that splits over the data-parallel
        # devices (a mesh refuses 3 rows over 4 devices).
        split = batch_devices()
        full = -(-min(batch_size, len(prompts)) // split) * split
        for start in range(0, len(prompts), batch_size):
            rows = order[start : start + batch_size]
            batch = [prompts[i] for i in rows]
            batch += [batch[-1]] * (full - len(batch))
            media_rows = [records[i] for i in rows]
            media_rows += [media_rows[-1]] * (full - len(media_rows))
            texts = self._generate_batch(
                batch, max_new_tokens, length, media_rows if any(records) else None
            )
            for i, text in zip(rows, texts):
                out[i] = text
        return out

    def _decode(self, ids: list[int]) -> str:
        return decode_ids(self.tokenizer, ids)

    def _generate_batch(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        length: int | None = None,
        media_rows: list | None = None,
    ) -> list[str]:
        """Texts generated after `prompts`; `media_rows`: each prompt's media records."""
        length = length or buffer_length(max(map(len, prompts)), max_new_tokens)
        n = len(prompts)
        token_ids = np.zeros((n, length), np.int32)
        padding_mask = np.zeros((n, length), bool)
        for i, p in enumerate(prompts):
            token_ids[i, : len(p)] = p
            padding_mask[i, : len(p)] = True
        inputs = {"token_ids": token_ids, "padding_mask": padding_mask}
        if media_rows is not None:  # each row's tower inputs, for the prefill
            inputs.update(packing.media_inputs(media_rows))
        result = self.lm.generate(
            inputs,
            stop_token_ids=self.stop_ids,
        )
        ids, mask = np.asarray(result["token_ids"]), np.asarray(result["padding_mask"])
        texts = []
        for i, p in enumerate(prompts):
            new = [int(t) for t, m in zip(ids[i, len(p) :], mask[i, len(p) :]) if m]
            new = new[:max_new_tokens]
            cut = [j for j, t in enumerate(new) if t in self.stop_ids]
            new = new[: cut[0]] if cut else new
            texts.append(self._decode(new))
        return texts


def check_prompt(
    messages: Any,
    tools: Any = None,
    where: str = "prompt",
    base_dir: str | None = None,
    processor: media.ProcessorSettings = media.PROCESSOR,
) -> tuple[list[dict], list[dict]]:
    """A prompt conversation in the package's form, and its tool declarations.

    Messages may be OpenAI-style (`records.normalise_messages`: assistant
    `tool_calls`, `tool` results); the conversation must end in a user
    message (a new model turn) or in tool results (the turn goes on).
    Content may be a list of parts, images and audio as in the data records
    (`{"type": "image", "path": ...}`, `{"type": "audio", "path": ...}`,
    OpenAI's `image_url` / `input_audio`); each file is read and checked
    here, paths resolving against `base_dir` (default the working
    directory), so a bad one stops before the model loads; they are sized
    as `processor` (the preset's processor_config.json) says.

    Raises:
      PromptError: `where` and what is wrong.

    Example:
      >>> check_prompt([{"role": "user", "content": " Hi "}])
      ([{'role': 'user', 'content': 'Hi'}], [])
    """
    if not isinstance(messages, list) or not messages:
        raise PromptError(f"{where}: 'messages' must be a non-empty list")
    for m in messages:
        if not isinstance(m, Mapping) or m.get("role") != "user":
            continue
        if isinstance(m.get("content"), str) and not m["content"].strip():
            raise PromptError(f"{where}: empty user message")
    try:
        normalised = records.normalise_messages(messages, base_dir, processor)
        declared = records.normalise_tools(tools)
    except ValueError as e:
        raise PromptError(f"{where}: {e}") from e
    last = normalised[-1]
    if last["role"] != "user" and not last.get("tool_responses"):
        raise PromptError(
            f"{where}: the conversation must end with a user turn, or with tool "
            "results (`tool` messages after the assistant's tool_calls)"
        )
    return normalised, declared


def _read_prompt_lines(prompts_file: str) -> list[str]:
    if not os.path.isfile(prompts_file):
        raise PromptError(f"--prompts_file={prompts_file}: no such file")
    try:
        with open(prompts_file, encoding="utf-8") as f:
            return f.read().splitlines()
    except UnicodeDecodeError as e:
        raise PromptError(
            f"--prompts_file={prompts_file}: invalid UTF-8 at byte {e.start}; "
            "save it as UTF-8"
        ) from e


def _prompt(
    messages: Any,
    tools: Any,
    where: str,
    base_dir: str | None = None,
    processor: media.ProcessorSettings = media.PROCESSOR,
) -> records.Conversation:
    messages, tools = check_prompt(messages, tools, where, base_dir, processor)
    return records.Conversation(messages=messages, source=where, tools=tools)


def _prompt_line(
    line: str,
    where: str,
    base_dir: str,
    processor: media.ProcessorSettings = media.PROCESSOR,
) -> records.Conversation:
    if not line.startswith("{"):
        return _prompt([{"role": "user", "content": line}], None, where)
    try:
        record = json.loads(line)
        messages, tools = record["messages"], record.get("tools")
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise PromptError(
            f'{where}: expected {{"messages": [...], "tools"?: [...]}} ({e})'
        ) from e
    return _prompt(messages, tools, where, base_dir, processor)


def media_parts(images: Sequence[str] = (), audio: Sequence[str] = ()) -> list[dict]:
    """Content parts of --image / --audio paths, images first (as they are
    written before the text in the Gemma 4 model card's examples).

    >>> media_parts(["cat.png"], ["a.wav"])
    [{'type': 'image', 'path': 'cat.png'}, {'type': 'audio', 'path': 'a.wav'}]
    """
    parts = [{"type": media.IMAGE, "path": p} for p in images]
    return parts + [{"type": media.AUDIO, "path": p} for p in audio]


def read_prompts(
    prompts: list[str],
    prompts_file: str | None,
    images: Sequence[str] = (),
    audio: Sequence[str] = (),
    processor: media.ProcessorSettings = media.PROCESSOR,
) -> list[records.Conversation]:
    """Prompt conversations from --prompt flags and/or a prompts file.

    A prompts file holds per line one plain-text user message or one
    `{"messages": [...], "tools": [...]}` object (OpenAI-style messages and
    tool declarations, `tools` optional; content may hold image and audio
    parts, paths relative to the prompts file). Each conversation ends in a
    user message or in tool results (`check_prompt`). `images` / `audio`
    (--image, --audio; paths relative to the working directory) go before
    the text of every --prompt message.

    Example:
      >>> [c.messages for c in read_prompts(["Hi"], None)]
      [[{'role': 'user', 'content': 'Hi'}]]
    """
    parts = media_parts(images, audio)
    if parts and not prompts:
        raise PromptError(
            "--image / --audio go with a --prompt=... message (the question "
            "about them); a prompts file names its media in its messages"
        )
    out = [
        _prompt(
            [{"role": "user", "content": [*parts, {"type": "text", "text": p}]}]
            if parts
            else [{"role": "user", "content": p}],
            None,
            f"prompt {i + 1}",
            processor=processor,
        )
        for i, p in enumerate(prompts)
    ]
    if prompts_file:
        base_dir = os.path.dirname(os.path.abspath(prompts_file))
        for n, line in enumerate(_read_prompt_lines(prompts_file), 1):
            if line.strip():
                where = f"{prompts_file}:{n}"
                out.append(_prompt_line(line.strip(), where, base_dir, processor))
    if not out:
        raise PromptError("no prompt: give --prompt=... or --prompts_file=FILE")
    return out


def load_model(config, preset: str, adapter=None, source: str = "adapter"):
    """The training model of `config`, with `adapter` active if given.

    The base is built as training builds it (`presets.build_training_model`:
    same dtype, same quantisation). `adapter` is `(LoraSpec, factors)` as
    `export.peft.read_adapter` returns them (`source` names its directory in
    errors); None leaves the base alone (no adapter active).

    Example:
      >>> model = load_model(config, preset, peft.read_adapter("run/adapter"))
    """
    model = presets.build_training_model(preset, presets.ModelSettings.of(config))
    model.unload_adapter("default")  # the config's fresh, untrained adapter
    if adapter is not None:
        try:
            lora.add_adapter_from_factors(model, *adapter, name="default")
        except lora.AdapterMismatchError as e:
            raise peft.AdapterFormatError(f"{source}: {e}") from e
    return model


def load_generator(
    config, adapter: str | None = None, media_kinds: Sequence[str] = ()
) -> Generator:
    """The model of `config`, with the PEFT adapter directory `adapter`, as a `Generator`.

    `adapter` None or "none" is the base alone. Decodes with the training
    model (the base quantised as `config.quant` says), never with a merged
    full-precision copy; the adapter is read before the slow model load.
    `media_kinds`: the media the prompts hold ("image", "audio"); those
    frozen towers of the preset are attached (`presets.attach_towers`).

    Example:
      >>> gen = load_generator(config, "runs/tiny/adapter")
      >>> gen.generate([[{"role": "user", "content": "Hi"}]])
      ['Hello!']
    """
    factors = None
    if adapter and adapter != "none":  # checked before the slow model load
        if not os.path.isdir(adapter):
            raise FileNotFoundError(
                f"--adapter={adapter}: no such directory (train first, or give "
                "--adapter=none for the base model)"
            )
        factors = peft.read_adapter(adapter)
    preset = presets.resolve_preset(config.model.preset)
    tokenizer = presets.load_tokenizer(preset)
    model = load_model(config, preset, factors, source=str(adapter))
    if media_kinds:
        presets.attach_towers(model, preset, media_kinds)
    return Generator.from_model(
        model,
        tokenizer,
        template=presets.chat_template(config, preset).variant,
        enable_thinking=bool(config.data.enable_thinking),
        max_length=context_length(preset),
    )


# --------------------------------------------------------------------------
# Reading answers: thought, calls, text
# --------------------------------------------------------------------------


def parse_answer(text: str) -> dict:
    """One generated text as a model message: `thinking`, `tool_calls`, `content`.

    A thought whose opening the prompt wrote (after tool results, thinking
    on) is read as a thought too. Malformed calls (e.g. cut by
    max_new_tokens) leave the text as `content` and say why in
    `tool_call_error`.

    Example:
      >>> parse_answer('<|tool_call>call:f{x:1}<tool_call|>')
      {'role': 'model', 'content': '', 'tool_calls': [{'name': 'f', 'arguments': {'x': 1}}]}
      >>> parse_answer("thought\\nhmm<channel|>It is 4.")
      {'role': 'model', 'content': 'It is 4.', 'thinking': 'hmm'}
    """
    head = text.split(chat.CHANNEL_CLOSE, 1)[0]
    if chat.CHANNEL_CLOSE in text and chat.CHANNEL_OPEN not in head:
        text = chat.CHANNEL_OPEN + text  # the prompt opened this thought
    thinking, rest = chat.extract_thinking(text)
    message: dict = {"role": "model"}
    try:
        calls, message["content"] = tool_format.split_answer(rest)
    except tool_format.ToolFormatError as e:
        calls, message["content"] = [], rest
        message["tool_call_error"] = str(e)
    if thinking:
        message["thinking"] = thinking
    if calls:
        message["tool_calls"] = calls
    return message


def structured_answer(text: str) -> dict:
    """`{"content", "tool_calls"}` of a generated text (+ `thinking`,
    `tool_call_error` when there are), as `generate(..., tools=...)` returns.

    >>> structured_answer("Hello")
    {'content': 'Hello', 'tool_calls': []}
    """
    message = parse_answer(text)
    out = {"content": message["content"], "tool_calls": message.get("tool_calls", [])}
    for key in ("thinking", "tool_call_error"):
        if key in message:
            out[key] = message[key]
    return out


# --------------------------------------------------------------------------
# Python functions as tools: declarations, calls, the chat loop
# --------------------------------------------------------------------------

_JSON_TYPES = {
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    list: "array",
    tuple: "array",
    dict: "object",
}
_ARG_LINE = re.compile(r"^\s+(\w+)(?:\s*\(.*?\))?:\s*(.*\S)")


def _schema_of(hint: Any) -> dict:
    """The JSON schema type of a type hint; {} when there is none."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        hint, args = args[0], list(typing.get_args(args[0]))
    kind = _JSON_TYPES.get(typing.get_origin(hint) or hint)
    if kind is None:
        return {}
    schema = {"type": kind}
    if kind == "array" and len(args) == 1 and _schema_of(args[0]):
        schema["items"] = _schema_of(args[0])
    return schema


def _argument_docs(doc: str) -> dict[str, str]:
    """{name: first line of its description} from a Google-style `Args:` section."""
    docs, inside = {}, False
    for line in doc.splitlines():
        if line.strip() in ("Args:", "Arguments:"):
            inside = True
        elif inside and line.strip() and not line[0].isspace():
            inside = False
        elif inside and (match := _ARG_LINE.match(line)):
            docs.setdefault(match.group(1), match.group(2))
    return docs


def _signature(function: Callable, name: str) -> tuple[inspect.Signature, dict]:
    try:
        return inspect.signature(function), typing.get_type_hints(function)
    except (TypeError, ValueError, NameError) as e:
        raise ValueError(
            f"tools[{name!r}]: cannot read the signature of {function!r} ({e}); "
            "pass declarations=[...] explicitly"
        ) from e


def function_declaration(function: Callable, name: str | None = None) -> dict:
    """An OpenAI-style declaration of a Python function, from its signature.

    Description: the docstring's first line; parameters: the signature's,
    typed from their hints (str, int, float, bool, list, dict, optionally
    `| None`; others get no type), described by a Google-style `Args:`
    section; those without a default are required.

    Example:
      >>> def weather(city: str, days: int = 1) -> dict:
      ...     \"\"\"Current weather in a city.
      ...
      ...     Args:
      ...       city: the city's name.
      ...     \"\"\"
      >>> function_declaration(weather)["function"]
      {'name': 'weather', 'description': 'Current weather in a city.', 'parameters': {'type': 'object', 'properties': {'city': {'type': 'string', 'description': "the city's name."}, 'days': {'type': 'integer'}}, 'required': ['city']}}
    """
    name = name or function.__name__
    signature, hints = _signature(function, name)
    doc = inspect.getdoc(function) or ""
    described = _argument_docs(doc)
    properties, required = {}, []
    for param in signature.parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        properties[param.name] = _schema_of(hints.get(param.name))
        if param.name in described:
            properties[param.name]["description"] = described[param.name]
        if param.default is param.empty:
            required.append(param.name)
    parameters = {"type": "object", "properties": properties, "required": required}
    function_part = {"name": name, "description": doc.split("\n", 1)[0].strip()}
    return {"type": "function", "function": {**function_part, "parameters": parameters}}


def tool_functions(tools: Any) -> dict[str, Callable]:
    """`{name: function}` of a mapping or a list of Python functions.

    >>> list(tool_functions([len]))
    ['len']
    """
    if tools is None:
        return {}
    pairs = tools.items() if isinstance(tools, Mapping) else [(None, f) for f in tools]
    out = {}
    for name, function in pairs:
        if not callable(function):
            raise ValueError(f"tools[{name!r}] is {function!r}, not a function")
        out[name or function.__name__] = function
    return out


def declare(functions: Mapping[str, Callable], declarations: Any = None) -> list[dict]:
    """Checked declarations: `declarations` if given, else built from `functions`."""
    if declarations is None:
        declarations = [function_declaration(f, n) for n, f in functions.items()]
    try:
        return records.normalise_tools(list(declarations))
    except ValueError as e:
        raise PromptError(f"tools: {e}") from e


def _is_json(value: Any) -> bool:
    if value is None or isinstance(value, bool | int | str):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(_is_json(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_json(v) for k, v in value.items())
    return False


def run_tool(functions: Mapping[str, Callable], call: Mapping) -> dict:
    """Runs one parsed call; its `{"name", "response"}` for the conversation.

    An unknown function or an exception becomes the result `{"error": ...}`
    (the model reads it, as a runtime would show it); a result that is not a
    JSON value is written as its `str`.

    Example:
      >>> run_tool({"add": lambda a, b: a + b}, {"name": "add", "arguments": {"a": 1, "b": 2}})
      {'name': 'add', 'response': 3}
      >>> run_tool({}, {"name": "nope", "arguments": {}})
      {'name': 'nope', 'response': {'error': "unknown function 'nope'"}}
    """
    name = call["name"]
    function = functions.get(name)
    if function is None:
        return {"name": name, "response": {"error": f"unknown function {name!r}"}}
    try:
        result = function(**call.get("arguments", {}))
    except Exception as e:  # any failure of the tool is the model's to read
        result = {"error": str(e) or type(e).__name__}
    return {"name": name, "response": result if _is_json(result) else str(result)}


def chat_loop(
    gen: Generator,
    messages: list[dict],
    *,
    functions: Mapping[str, Callable],
    declarations: list[dict],
    max_steps: int = 5,
    max_new_tokens: int = 64,
) -> list[dict]:
    """Generates, runs the model's calls, goes on after their results.

    Each generation that calls tools becomes a model message with
    `tool_calls` and the results in `tool_responses` (text beside the calls
    is dropped: the template has no place for it before the results), and
    the same turn goes on from `generation_prompt` after them. Stops at an
    answer without calls, or after `max_steps` generations (the last
    message then holds calls and results: pass the history back to go on).

    Args:
      gen: a `Generator` (its template and thinking mode).
      messages: the conversation so far, in the package's form, ending in a
        user message or in tool results (`check_prompt`).
      functions: `{name: Python function}` the calls run.
      declarations: the tools the model is shown.

    Returns:
      The new model messages; the last one the answer.
    """
    if max_steps < 1:
        raise PromptError(f"max_steps={max_steps} must be >= 1")
    history, new = list(messages), []
    for _ in range(max_steps):
        text = gen.generate(
            [history], tools=[declarations], max_new_tokens=max_new_tokens
        )[0]
        message = parse_answer(text)
        new.append(message)
        history.append(message)
        if not message.get("tool_calls"):
            break
        message["content"] = ""
        calls = message["tool_calls"]
        message["tool_responses"] = [run_tool(functions, c) for c in calls]
    return new
