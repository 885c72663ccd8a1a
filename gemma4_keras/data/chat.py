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
  `developer` or thinking is on (`<|think|>\n` at its top);
- every other message is `<|turn>{role}\n{content}<turn|>\n`, `assistant`
  renders as `model`; user/system text is trimmed; model text has its
  `<|channel>...<channel|>` thoughts stripped, then is trimmed;
- the generation prompt is `<|turn>model\n`, followed (large template,
  thinking off) by the empty thought block.

Oracle: `tests/data/gemma4_chat_golden.json`, 22 renderings of the official
templates (tests/test_data_chat.py).

The train/serve rule: a history model turn is rendered without any thought
block, but the large template's serving prompt prefills the empty one.
`training_pieces` therefore builds each trained turn as
`generation_prompt(history) + answer + <turn|>`, so the model is trained on
exactly the prefix serving shows for its size.
"""

from collections.abc import Sequence

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
CONTROL_TOKENS = (BOS, TURN_OPEN, TURN_CLOSE, CHANNEL_OPEN, CHANNEL_CLOSE, THINK)
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


def _role(message: dict) -> str:
    role = message["role"]
    return "model" if role == "assistant" else role


def _content(message: dict) -> str:
    content = message["content"]
    if _role(message) == "model":
        return strip_thinking(content)
    return content.strip()


def _system_pieces(messages: Sequence[dict], enable_thinking: bool) -> list[Piece]:
    has_system = bool(messages) and messages[0]["role"] in ("system", "developer")
    if not (enable_thinking or has_system):
        return []
    pieces: list[Piece] = [(TURN_OPEN, False), ("system\n", False)]
    if enable_thinking:
        pieces += [(THINK, False), ("\n", False)]
    if has_system:
        pieces.append((messages[0]["content"].strip(), False))
    pieces += [(TURN_CLOSE, False), ("\n", False)]
    return pieces


def prompt_pieces(
    messages: Sequence[dict],
    *,
    template: str,
    add_generation_prompt: bool = False,
    enable_thinking: bool = False,
) -> list[Piece]:
    """The template's output as pieces, none of them trainable."""
    check_template(template)
    pieces: list[Piece] = [(BOS, False)]
    pieces += _system_pieces(messages, enable_thinking)
    has_system = bool(messages) and messages[0]["role"] in ("system", "developer")
    for message in messages[1 if has_system else 0 :]:
        pieces += [
            (TURN_OPEN, False),
            (_role(message) + "\n", False),
            (_content(message), False),
            (TURN_CLOSE, False),
            ("\n", False),
        ]
    if add_generation_prompt:
        pieces += [(TURN_OPEN, False), ("model\n", False)]
        if template == "large" and not enable_thinking:
            pieces += [(CHANNEL_OPEN, False), ("thought\n", False)]
            pieces += [(CHANNEL_CLOSE, False)]
    return [p for p in pieces if p[0]]


def render_conversation(
    messages: Sequence[dict],
    *,
    template: str,
    add_generation_prompt: bool = False,
    enable_thinking: bool = False,
) -> str:
    """Renders messages exactly as the official Gemma 4 chat template does.

    Args:
        messages: dicts with `role` (user, model, assistant, system,
            developer) and `content` (str). A system/developer message is
            only honoured in first position, as in the template.
        template: "small" (E2B, E4B) or "large" (26B-A4B, 31B) official
            template; they differ only in the thinking-off generation prompt.
        add_generation_prompt: append the prompt for the next model turn.
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
        add_generation_prompt=add_generation_prompt,
        enable_thinking=enable_thinking,
    )
    return "".join(text for text, _ in pieces)


def generation_prompt(
    messages: Sequence[dict], *, template: str, enable_thinking: bool = False
) -> str:
    """What serving shows the model of `template` before its next model turn.

    Example:
        >>> generation_prompt([{"role": "user", "content": "Hi"}], template="small")
        '<bos><|turn>user\\nHi<turn|>\\n<|turn>model\\n'
        >>> generation_prompt([{"role": "user", "content": "Hi"}], template="large")
        '<bos><|turn>user\\nHi<turn|>\\n<|turn>model\\n<|channel>thought\\n<channel|>'
    """
    return render_conversation(
        messages,
        template=template,
        add_generation_prompt=True,
        enable_thinking=enable_thinking,
    )


def target_pieces(message: dict, *, enable_thinking: bool = False) -> list[Piece]:
    """The trained part of a model turn: [thought block +] answer + `<turn|>`.

    The thought (`message["thinking"]`) is trained only with thinking on:
    with thinking off the model is not asked to think (the large template
    even prefills an empty thought block), so it never writes one.

    Example:
        >>> target_pieces({"role": "model", "content": "42", "thinking": "6*7"},
        ...               enable_thinking=True)
        [('<|channel>', True), ('thought\\n6*7\\n', True), ('<channel|>', True), ('42', True), ('<turn|>', True)]
    """
    pieces: list[Piece] = []
    thinking = (message.get("thinking") or "").strip()
    if enable_thinking and thinking:
        pieces += [(CHANNEL_OPEN, True), ("thought\n" + thinking + "\n", True)]
        pieces.append((CHANNEL_CLOSE, True))
    pieces += [(_content(message), True), (TURN_CLOSE, True)]
    return pieces


def training_pieces(
    messages: Sequence[dict],
    turn: int,
    *,
    template: str,
    enable_thinking: bool = False,
) -> list[Piece]:
    """Pieces of one training sequence whose trained turn is `messages[turn]`.

    The sequence is `generation_prompt(messages[:turn]) + target`, so its
    untrained part is, character for character, what serving presents.

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
        add_generation_prompt=True,
        enable_thinking=enable_thinking,
    )
    return pieces + target_pieces(messages[turn], enable_thinking=enable_thinking)
