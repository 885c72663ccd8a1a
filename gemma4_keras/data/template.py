"""Which official chat template a run renders, and the guard against drift.

Gemma 4 ships two chat templates (`chat.TEMPLATES`): "small" for E2B-it /
E4B-it and "large" for 26B-A4B-it / 31B-it. `resolve` decides the variant of
a run from `data.template`:

    small | large   as given;
    auto            the checkpoint's own `chat_template.jinja` when the
                    preset directory has one (rendered on a probe: does the
                    thinking-off generation prompt end in the empty thought
                    block?), else the size table (`config_lib.SIZES`), else
                    a TemplateError asking for `--config.data.template`.

When the checkpoint ships `chat_template.jinja`, `check_conversations`
renders a sample of the run's conversations with it (sandboxed jinja2 with
`trim_blocks` and `lstrip_blocks`, as transformers renders chat templates)
and compares them with `chat.py`'s rendering; the first difference stops the
run, naming the record and the character:

    tmpl = resolve("auto", size="e4b", size_variant="small", preset_dir=d)
    check_conversations(conversations, tmpl, enable_thinking=False)
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence

import jinja2
from jinja2 import sandbox
from jinja2.sandbox import ImmutableSandboxedEnvironment

from gemma4_keras.data import chat
from gemma4_keras.data.records import Conversation, DataError, Problem

CHOICES = ("auto",) + chat.TEMPLATES
TEMPLATE_FILE = "chat_template.jinja"
# Conversations the guard always renders; plus every one with a system turn,
# a thought or tools, the parts where templates differ most.
CHECK_FIRST = 20
_PROBE = [{"role": "user", "content": "probe"}]
_CONTEXT = 30  # characters shown either side of a difference


class TemplateError(DataError):
    """The chat template cannot be decided, or disagrees with the checkpoint's."""


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """The chat template variant of a run and where it came from.

    Attributes:
        variant: "small" or "large".
        source: how it was decided (for logs and `data render`).
        official: text of the checkpoint's `chat_template.jinja`, if any.
        official_path: path of that file.
    """

    variant: str
    source: str
    official: str | None = None
    official_path: str | None = None


def read_official(preset_dir: str | None) -> tuple[str, str] | None:
    """(text, path) of `preset_dir/chat_template.jinja`; None when absent."""
    if not preset_dir or not os.path.isdir(preset_dir):
        return None
    path = os.path.join(preset_dir, TEMPLATE_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return f.read(), path


# A chat template renders a few messages. A rendering that makes more range()
# items or repeated-sequence items than this, or runs longer, is refused:
# nested `range(100000)` loops would otherwise hang the command for hours.
MAX_ITEMS = sandbox.MAX_RANGE
MAX_SECONDS = 10.0


class _Unbounded(RuntimeError):
    """A template rendering past `MAX_ITEMS` or `MAX_SECONDS`."""


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox with a per-rendering budget of loop items and time.

    The budget is checked where the rendered code calls back into the
    environment: `range`, sequence repetition and powers, calls, attribute
    and item access (every loop that does anything does one of these).
    """

    intercepted_binops = frozenset({"*", "**"})

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.globals["range"] = self._range
        self._items = 0
        self._deadline = time.monotonic() + MAX_SECONDS

    def _spend(self, items: int = 0) -> None:
        self._items += items
        if self._items > MAX_ITEMS:
            raise _Unbounded(
                f"it loops over more than {MAX_ITEMS} range() / repeated items in one "
                "rendering, which no chat template needs; is it the checkpoint's own "
                "template?"
            )
        if time.monotonic() > self._deadline:
            raise _Unbounded(
                f"one rendering ran past {MAX_SECONDS:.0f} s; is it the checkpoint's "
                "own template?"
            )

    def _range(self, *args):
        items = sandbox.safe_range(*args)
        self._spend(len(items))
        return items

    def call_binop(self, context, operator, left, right):
        self._spend()
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                    self._spend(len(seq) * max(n, 0))
        if operator == "**" and isinstance(right, int) and right > 64:
            self._spend(MAX_ITEMS + 1)  # a power no chat template computes
        return super().call_binop(context, operator, left, right)

    def call(self, context, obj, /, *args, **kwargs):
        self._spend()
        return super().call(context, obj, *args, **kwargs)

    def getattr(self, obj, attribute):
        self._spend()
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        self._spend()
        return super().getitem(obj, argument)


def render_official(
    source: str,
    messages: Sequence[dict],
    *,
    tools: Sequence[dict] | None = None,
    add_generation_prompt: bool = False,
    enable_thinking: bool = False,
    bos_token: str = chat.BOS,
) -> str:
    """Renders a jinja chat template the way transformers does (sandboxed, bounded).

    `messages` go to the template as given (OpenAI-style, or the package's
    own through `chat.template_messages`); `tools` are the declarations. A
    rendering past `MAX_ITEMS` loop items or `MAX_SECONDS` raises (the
    callers name the template file).

    Example:
        >>> render_official("{{ bos_token }}{{ messages[0]['content'] }}",
        ...                 [{"role": "user", "content": "Hi"}])
        '<bos>Hi'
    """

    def raise_exception(message: str):
        raise jinja2.TemplateError(message)

    env = _BoundedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=["jinja2.ext.loopcontrols"],
    )
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source).render(
        messages=list(messages),
        tools=list(tools) if tools else None,
        add_generation_prompt=add_generation_prompt,
        enable_thinking=enable_thinking,
        bos_token=bos_token,
        eos_token=chat.EOS,
    )


def official_variant(source: str, path: str) -> str:
    """The variant of a template: does its generation prompt end in the empty thought block?

    Only the ending decides; any other difference from the package's
    rendering is for `check_conversations` to report, record by record.
    """
    try:
        prompt = render_official(source, _PROBE, add_generation_prompt=True)
    except Exception as e:  # a broken template is the user's file to fix
        raise TemplateError(f"{path}: cannot render the chat template ({e})") from e
    if prompt.endswith(chat.TURN_OPEN + "model\n" + chat.EMPTY_THOUGHT):
        return "large"
    if prompt.endswith(chat.TURN_OPEN + "model\n"):
        return "small"
    raise TemplateError(
        f"{path}: its thinking-off generation prompt ends {prompt[-40:]!r}, like "
        "neither official Gemma 4 template (small ends at '<|turn>model\\n', "
        "large adds '<|channel>thought\\n<channel|>'); is this a Gemma 4 checkpoint?"
    )


def resolve(
    choice: str,
    *,
    size: str,
    size_variant: str | None,
    preset_dir: str | None = None,
) -> ChatTemplate:
    """Decides the template variant of a run (see the module docstring).

    Args:
        choice: `data.template`: auto, small or large.
        size: `config.size`, for messages.
        size_variant: the size table's variant for `size`; None if unknown.
        preset_dir: the resolved preset when it is a local directory.

    Returns:
        A ChatTemplate; `official` is set whenever the directory ships a
        template, so the guard runs even when `choice` is explicit.

    Example:
        >>> resolve("auto", size="31b", size_variant="large").variant
        'large'
    """
    if choice not in CHOICES:
        raise TemplateError(
            f"--config.data.template={choice!r} is unknown; use auto, small "
            "(E2B/E4B) or large (26B-A4B/31B)"
        )
    official = read_official(preset_dir)
    text, path = official if official else (None, None)
    if choice != "auto":
        return ChatTemplate(choice, "--config.data.template", text, path)
    if official:
        return ChatTemplate(official_variant(text, path), path, text, path)
    if size_variant in chat.TEMPLATES:
        return ChatTemplate(size_variant, f"size table ({size})")
    raise TemplateError(
        f"--config.data.template=auto: cannot tell which chat template size "
        f"{size!r} uses (no {TEMPLATE_FILE} in the preset directory, none in the "
        "size table); set --config.data.template=small (E2B/E4B) or large (26B-A4B/31B)"
    )


def sample_for_check(
    conversations: Sequence[Conversation], first: int = CHECK_FIRST
) -> list[Conversation]:
    """The first `first` conversations plus every one with a system turn, thought or tools."""

    def special(c: Conversation) -> bool:
        return bool(c.tools) or any(
            m["role"] == "system" or m.get("thinking") or m.get("tool_calls")
            for m in c.messages
        )

    return [c for i, c in enumerate(conversations) if i < first or special(c)]


def _difference(official: str, ours: str) -> int:
    n = min(len(official), len(ours))
    return next((i for i in range(n) if official[i] != ours[i]), n)


def _compare(official: str, ours: str, source: str, what: str, path: str) -> None:
    if official == ours:
        return
    i = _difference(official, ours)
    lo, hi = max(0, i - _CONTEXT), i + _CONTEXT
    raise TemplateError(
        Problem(
            source or "<record>",
            f"{what} differs from {path} at character {i}: official "
            f"{official[lo:hi]!r} vs package {ours[lo:hi]!r}; the checkpoint's "
            "template is the authority: fix --config.data.template or the "
            "template, or report a template revision the package does not know",
        )
    )


def check_conversations(
    conversations: Sequence[Conversation],
    template: ChatTemplate,
    *,
    enable_thinking: bool = False,
) -> int:
    """Compares the package's rendering with the checkpoint's template.

    For each sampled conversation: the whole conversation, and the
    generation prompt before each model turn (the untrained prefix of its
    training sequence), for `template.variant`.

    Returns:
        How many conversations were checked (0 without an official template).

    Raises:
        TemplateError: at the first difference, naming the record
            (file:line), the character index and both strings around it.
    """
    if template.official is None:
        return 0
    sample = sample_for_check(conversations)
    for c in sample:
        messages = c.messages
        kw = {"enable_thinking": enable_thinking, "tools": c.tools}
        cuts = [t for t, m in enumerate(messages) if m["role"] == "model"]
        cases = [(messages, False, "the conversation")] + [
            (messages[:t], True, f"the generation prompt before message {t}")
            for t in cuts
        ]
        for part, gen, what in cases:
            try:
                official = render_official(
                    template.official,
                    chat.template_messages(part),
                    add_generation_prompt=gen,
                    **kw,
                )
            except Exception as e:
                raise TemplateError(
                    Problem(c.source, f"{template.official_path} fails on it ({e})")
                ) from e
            ours = chat.render_conversation(
                part, template=template.variant, add_generation_prompt=gen, **kw
            )
            _compare(official, ours, c.source, what, template.official_path)
    return len(sample)
