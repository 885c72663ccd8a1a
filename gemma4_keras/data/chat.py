"""The Gemma 4 chat format: rendering, generation prompts, training pieces.

Everything here works on strings; `tokenize.py` turns the pieces into ids.

Google ships TWO instruction-tuned chat templates (see `shared/GEMMA4.md`,
"Chat format"): the "small" one of E2B-it / E4B-it and the "large" one of
26B-A4B-it / 31B-it. They differ only in the generation prompt with thinking
off: the large one ends it with the empty thought block
`<|channel>thought\n<channel|>`, the small one at `<|turn>model\n`. Every
function whose output can depend on it takes `template="small"|"large"`, with
no default: which variant a run uses is decided once, per model size or from
the checkpoint's own `chat_template.jinja` (`data/template.py`), never guessed
here. The rules both templates share:

- `<bos>` once, then a system turn when the first message is `system` /
  `developer`, thinking is on (`<|think|>\n` at its top) or tools are
  declared (one `<|tool>declaration:...<tool|>` each, `tool_format.py`);
- every other message is `<|turn>{role}\n{content}<turn|>\n`, `assistant`
  renders as `model`; user/system text is trimmed; model text has its
  `<|channel>...<channel|>` thoughts stripped, then is trimmed; a model
  message's own thought (`thinking`) is written as
  `<|channel>thought\n...\n<channel|>` when it comes after the last user
  message;
- tool use is ONE model turn: calls `<|tool_call>call:NAME{...}<tool_call|>`,
  then `<|tool_response>` (the model's stop), the runtime's results
  `response:NAME{...}<tool_response|>`, and the same turn goes on with the
  next model message;
- an image or audio part of a user/system message is its placeholder
  (`<|image|>`, `<|audio|>`) where the part stands (`media.py`; the
  tokenizer expands it into the markers and soft tokens);
- the generation prompt is `<|turn>model\n`, followed (large template,
  thinking off) by the empty thought block; after tool results it adds
  nothing, or `<|channel>thought\n` with thinking on.

Oracle: `tests/data/gemma4_chat_golden.json`, 36 renderings of the official
templates, 14 with tools (tests/test_data_chat.py).

The train/serve rule: a history model turn is rendered without any thought
block, but the large template's serving prompt prefills the empty one.
`training_pieces` therefore builds each trained model message as
`generation_prompt(history) + what the model writes`, so the model is trained
on exactly the prefix serving shows for its size, at the start of a turn and
after each round of tool results. What the model writes, so what carries
loss: the thought (thinking on), the calls, the `<|tool_response>` that ends
them, the answer and `<turn|>`; never declarations, user text or results.
"""

from collections.abc import Mapping, Sequence

from gemma4_keras.data import media, tool_format

BOS = "<bos>"
EOS = "<eos>"
PAD = "<pad>"
TURN_OPEN = "<|turn>"
TURN_CLOSE = "<turn|>"
CHANNEL_OPEN = "<|channel>"
CHANNEL_CLOSE = "<channel|>"
THINK = "<|think|>"

# Control tokens this module emits; content may not contain them (the
# tokenizer would read them as structure, not text).
CONTROL_TOKENS = (
    (
        BOS,
        TURN_OPEN,
        TURN_CLOSE,
        CHANNEL_OPEN,
        CHANNEL_CLOSE,
        THINK,
    )
    + tool_format.TOOL_TOKENS
    + media.TOKENS
)
FORBIDDEN_IN_CONTENT = CONTROL_TOKENS + (EOS, PAD)
# Gemma 2/3 markers: plain text to Gemma 4, a sign of mis-formatted data.
LEGACY_MARKERS = ("<start_of_turn>", "<end_of_turn>")

EMPTY_THOUGHT = CHANNEL_OPEN + "thought\n" + CHANNEL_CLOSE
# The two official template variants: "small" (E2B-it, E4B-it) and "large"
# (26B-A4B-it, 31B-it, which prefill EMPTY_THOUGHT when thinking is off).
TEMPLATES = ("small", "large")
ROLE_ALIASES = {
    "user": "user",
    "model": "model",
    "assistant": "model",
    "system": "system",
    "developer": "system",
}

# A piece is (text, trainable). Control tokens are always pieces of their own,
# so a tokenizer can encode the text between them independently.
Piece = tuple[str, bool]


def strip_thinking(text: str) -> str:
    """Removes `<|channel>...<channel|>` blocks and trims, as the template does.

    Example:
        >>> strip_thinking("<|channel>thought\\nhmm<channel|> Positive ")
        'Positive'
    """
    kept = []
    for part in text.split(CHANNEL_CLOSE):
        kept.append(part.split(CHANNEL_OPEN)[0] if CHANNEL_OPEN in part else part)
    return "".join(kept).strip()


def extract_thinking(text: str) -> tuple[str, str]:
    """Splits model text into (thinking, answer).

    Example:
        >>> extract_thinking("<|channel>thought\\nstep 1<channel|>42")
        ('step 1', '42')
    """
    thoughts = []
    for part in text.split(CHANNEL_CLOSE):
        if CHANNEL_OPEN in part:
            thought = part.split(CHANNEL_OPEN, 1)[1]
            thought = thought.removeprefix("thought")
            thoughts.append(thought.strip())
    return "\n".join(t for t in thoughts if t), strip_thinking(text)


def check_template(template: str) -> str:
    """Returns `template` if it is a known variant, else raises ValueError.

    Example:
        >>> check_template("small")
        'small'
    """
    if template not in TEMPLATES:
        raise ValueError(
            f"chat template variant {template!r} is unknown; use one of "
            f"{', '.join(TEMPLATES)} (small: E2B/E4B, large: 26B-A4B/31B)"
        )
    return template


def _role(message: Mapping) -> str:
    return ROLE_ALIASES.get(message["role"], message["role"])


def _text(message: Mapping) -> str:
    content = message.get("content") or ""
    if _role(message) == "model":
        return strip_thinking(content)
    return content.strip()


def split_controls(text: str, trainable: bool) -> list[Piece]:
    """`text` as pieces, each control token (`CONTROL_TOKENS`) a piece of its own.

    Example:
        >>> split_controls('a<|"|>b', False)
        [('a', False), ('<|"|>', False), ('b', False)]
    """
    pieces: list[Piece] = []
    start = 0
    i = text.find("<", start)
    while i >= 0:
        token = next((t for t in CONTROL_TOKENS if text.startswith(t, i)), None)
        if token is None:
            i = text.find("<", i + 1)
            continue
        if i > start:
            pieces.append((text[start:i], trainable))
        pieces.append((token, trainable))
        start = i + len(token)
        i = text.find("<", start)
    if start < len(text):
        pieces.append((text[start:], trainable))
    return pieces


def _system_pieces(
    messages: Sequence[Mapping], tools: Sequence[Mapping] | None, enable_thinking: bool
) -> list[Piece]:
    has_system = bool(messages) and _role(messages[0]) == "system"
    if not (enable_thinking or tools or has_system):
        return []
    pieces: list[Piece] = [(TURN_OPEN, False), ("system\n", False)]
    if enable_thinking:
        pieces += [(THINK, False), ("\n", False)]
    if has_system:
        pieces.append((_text(messages[0]), False))
    for tool in tools or ():
        text = tool_format.format_declaration(tool)
        pieces += [(tool_format.TOOL_OPEN, False)]
        pieces += split_controls(text, False) + [(tool_format.TOOL_CLOSE, False)]
    pieces += [(TURN_CLOSE, False), ("\n", False)]
    return pieces


def _thought_pieces(thinking: str, trainable: bool, opened: bool) -> list[Piece]:
    """`<|channel>thought\\n...\\n<channel|>`; `opened`: the prompt wrote its start."""
    if opened:
        body = [(thinking + "\n", trainable)] if thinking else []
        return body + [(CHANNEL_CLOSE, trainable)]
    return [
        (CHANNEL_OPEN, trainable),
        ("thought\n" + thinking + "\n", trainable),
        (CHANNEL_CLOSE, trainable),
    ]


def _call_pieces(calls: Sequence[Mapping], trainable: bool) -> list[Piece]:
    pieces: list[Piece] = []
    for call in calls:
        pieces += split_controls(tool_format.format_call(call), trainable)
    return pieces


def _response_pieces(
    responses: Sequence[Mapping], first_trainable: bool
) -> list[Piece]:
    """Response blocks; only the first `<|tool_response>` is the model's (its stop)."""
    pieces: list[Piece] = []
    for response in responses:
        pieces += split_controls(tool_format.format_response(response), False)
    if pieces and first_trainable:
        pieces[0] = (pieces[0][0], True)
    return pieces


def _last_user(messages: Sequence[Mapping]) -> int:
    users = [i for i, m in enumerate(messages) if _role(m) == "user"]
    return users[-1] if users else -1


def prompt_pieces(
    messages: Sequence[Mapping],
    *,
    template: str,
    tools: Sequence[Mapping] | None = None,
    add_generation_prompt: bool = False,
    enable_thinking: bool = False,
) -> list[Piece]:
    """The template's output as pieces, none of them trainable.

    Messages are in the package's form (`records.normalise_messages`):
    `tool` messages already folded into the `tool_responses` of the model
    message whose calls they answer. A model message renders as: thought
    (only after the last user message), calls, response blocks, text, then
    `<|tool_response>` when it called without results (the model's stop),
    nothing when the next model message continues the same turn after
    results, or `<turn|>\\n`.
    """
    check_template(template)
    pieces: list[Piece] = [(BOS, False)]
    pieces += _system_pieces(messages, tools, enable_thinking)
    start = 1 if messages and _role(messages[0]) == "system" else 0
    loop = list(messages[start:])
    last_user = _last_user(loop)
    prev_role, after = None, None  # after: "call" | "response" | None
    for i, message in enumerate(loop):
        role, after = _role(message), None
        if not (role == "model" and prev_role == "model"):
            pieces += [(TURN_OPEN, False), (role + "\n", False)]
        thinking = message.get("thinking") or ""
        if role == "model" and thinking and i > last_user:
            pieces += _thought_pieces(thinking, False, opened=False)
        calls = message.get("tool_calls") or []
        responses = message.get("tool_responses") or []
        if calls:
            pieces += _call_pieces(calls, False)
            after = "call"
        if responses:
            pieces += _response_pieces(responses, False)
            after = "response"
        text = _text(message)
        pieces += split_controls(text, False)
        following = _role(loop[i + 1]) if i + 1 < len(loop) else None
        continues = role == "model" and following == "model"
        continues = continues and (not calls or bool(responses))
        if after == "call":
            pieces.append((tool_format.RESPONSE_OPEN, False))
        elif continues:
            pass
        elif not (responses and not text and following is None):
            pieces += [(TURN_CLOSE, False), ("\n", False)]
        prev_role = role
    if add_generation_prompt:
        if after is None:
            pieces += [(TURN_OPEN, False), ("model\n", False)]
            if template == "large" and not enable_thinking:
                pieces += [(CHANNEL_OPEN, False), ("thought\n", False)]
                pieces += [(CHANNEL_CLOSE, False)]
        elif after == "response" and enable_thinking:
            pieces += [(CHANNEL_OPEN, False), ("thought\n", False)]
    return [p for p in pieces if p[0]]


def render_conversation(
    messages: Sequence[Mapping],
    *,
    template: str,
    tools: Sequence[Mapping] | None = None,
    add_generation_prompt: bool = False,
    enable_thinking: bool = False,
) -> str:
    """Renders messages exactly as the official Gemma 4 chat template does.

    Args:
        messages: dicts with `role` (user, model, assistant, system,
            developer) and `content` (str); a model message may also have
            `thinking`, `tool_calls` ([{"name", "arguments"}]) and
            `tool_responses` ([{"name", "response"}]): the package's form,
            which `records.normalise_messages` makes of OpenAI-style
            messages. A system/developer message is only honoured first.
        template: "small" (E2B, E4B) or "large" (26B-A4B, 31B) official
            template; they differ only in the thinking-off generation prompt.
        tools: OpenAI-style tool declarations (`{"type": "function",
            "function": {"name", "description", "parameters"}}`), written
            into the system turn.
        add_generation_prompt: append the prompt for the next model turn (or,
            after tool results, for the rest of the same turn).
        enable_thinking: thinking mode (`<|think|>` in the system turn, no
            empty thought block in the generation prompt).

    Returns:
        The text, starting with `<bos>`.

    Example:
        >>> render_conversation([
        ...     {"role": "user", "content": "Hi "},
        ...     {"role": "assistant", "content": "Hello"}], template="small")
        '<bos><|turn>user\\nHi<turn|>\\n<|turn>model\\nHello<turn|>\\n'
    """
    pieces = prompt_pieces(
        messages,
        template=template,
        tools=tools,
        add_generation_prompt=add_generation_prompt,
        enable_thinking=enable_thinking,
    )
    return "".join(text for text, _ in pieces)


def generation_prompt(
    messages: Sequence[Mapping],
    *,
    template: str,
    tools: Sequence[Mapping] | None = None,
    enable_thinking: bool = False,
) -> str:
    """What serving shows the model of `template` before it writes.

    After a user message that is the start of a model turn; after tool
    results (the last message a model message with `tool_responses`) it is
    the rendered results themselves, plus `<|channel>thought\\n` with
    thinking on.

    Example:
        >>> generation_prompt([{"role": "user", "content": "Hi"}], template="small")
        '<bos><|turn>user\\nHi<turn|>\\n<|turn>model\\n'
        >>> generation_prompt([{"role": "user", "content": "Hi"}], template="large")
        '<bos><|turn>user\\nHi<turn|>\\n<|turn>model\\n<|channel>thought\\n<channel|>'
    """
    return render_conversation(
        messages,
        template=template,
        tools=tools,
        add_generation_prompt=True,
        enable_thinking=enable_thinking,
    )


def after_results(messages: Sequence[Mapping]) -> bool:
    """Whether the next model output continues a turn after tool results."""
    return bool(messages) and bool(messages[-1].get("tool_responses"))


def target_pieces(
    message: Mapping, *, enable_thinking: bool = False, after_response: bool = False
) -> list[Piece]:
    """What the model writes for one model message, all trainable.

    [thought] + calls + text, then `<|tool_response>` when it calls (its
    stop: the results come from the runtime) or `<turn|>`. The thought is
    trained only with thinking on: with thinking off the model is not asked
    to think (the large template even prefills an empty thought block).
    With thinking on after tool results the prompt already opened the
    thought (`<|channel>thought\\n`), so it is closed, empty when the message
    has none.

    Example:
        >>> target_pieces({"role": "model", "content": "42", "thinking": "6*7"},
        ...               enable_thinking=True)
        [('<|channel>', True), ('thought\\n6*7\\n', True), ('<channel|>', True), ('42', True), ('<turn|>', True)]
    """
    pieces: list[Piece] = []
    thinking = (message.get("thinking") or "").strip()
    if enable_thinking and (thinking or after_response):
        pieces += _thought_pieces(thinking, True, opened=after_response)
    calls = message.get("tool_calls") or []
    pieces += _call_pieces(calls, True)
    text = _text(message)
    if text:
        pieces += split_controls(text, True)
    end = tool_format.RESPONSE_OPEN if calls else TURN_CLOSE
    return pieces + [(end, True)]


def training_pieces(
    messages: Sequence[Mapping],
    turn: int,
    *,
    template: str,
    tools: Sequence[Mapping] | None = None,
    enable_thinking: bool = False,
) -> list[Piece]:
    """Pieces of one training sequence whose trained output is `messages[turn]`.

    The sequence is `generation_prompt(messages[:turn]) + target`, so its
    untrained part is, character for character, what serving presents: the
    start of a model turn, or a turn so far with its tool results.

    Example (thinking off; T = trainable):
        template  generation_prompt(history)                                                answer  <turn|>
        small     <bos><|turn>user\\nHi<turn|>\\n<|turn>model\\n                               Hello   <turn|>
        large     <bos><|turn>user\\nHi<turn|>\\n<|turn>model\\n<|channel>thought\\n<channel|>  Hello   <turn|>
                  ...........................not trained...............................  T....   T
    """
    if _role(messages[turn]) != "model":
        raise ValueError(
            f"message {turn} is a {messages[turn]['role']} turn, not model"
        )
    history = messages[:turn]
    pieces = prompt_pieces(
        history,
        template=template,
        tools=tools,
        add_generation_prompt=True,
        enable_thinking=enable_thinking,
    )
    return pieces + target_pieces(
        messages[turn],
        enable_thinking=enable_thinking,
        after_response=after_results(history),
    )


def _parts(content: str) -> list[dict]:
    """Content with media placeholders as the list of parts a template reads.

    Example:
        >>> _parts("Name it: <|image|>")
        [{'type': 'text', 'text': 'Name it: '}, {'type': 'image'}]
    """
    kinds = {token: kind for kind, token in media.PLACEHOLDER.items()}
    parts: list[dict] = []
    for text, _ in split_controls(content, False):
        if text in kinds:
            parts.append({"type": kinds[text]})
        elif parts and parts[-1]["type"] == "text":
            parts[-1]["text"] += text
        else:
            parts.append({"type": "text", "text": text})
    return parts


def template_messages(messages: Sequence[Mapping]) -> list[dict]:
    """The package's messages in the shape the official template reads.

    Model messages become `assistant` (the template continues a turn only
    after an `assistant` message), `thinking` becomes `reasoning_content`,
    calls get the OpenAI `{"function": {"name", "arguments"}}` shape, results
    stay as Gemma's native `tool_responses`.
    """
    out = []
    for message in messages:
        role = _role(message)
        shaped: dict = {"role": "assistant" if role == "model" else role}
        shaped["content"] = message.get("content") or ""
        if message.get("media"):
            shaped["content"] = _parts(shaped["content"])
        if message.get("thinking"):
            shaped["reasoning_content"] = message["thinking"]
        if message.get("tool_calls"):
            shaped["tool_calls"] = [
                {
                    "type": "function",
                    "function": {"name": c["name"], "arguments": c["arguments"]},
                }
                for c in message["tool_calls"]
            ]
        if message.get("tool_responses"):
            shaped["tool_responses"] = [dict(r) for r in message["tool_responses"]]
        out.append(shaped)
    return out
