"""Training data: read, validate, render in the Gemma 4 chat format, pack.

A run's data path, step by step (or all at once with `prepare`):

    settings = DataSettings.of({"path": "train.jsonl"})  # or config.data
    conversations, read_stats = load_conversations(settings)
    conversations, dedupe_stats = dedupe(conversations)
    train, holdout = split_holdout(conversations, 0.1, seed=0)
    examples, encode_stats = encode_conversations(
        train, tokenizer, train_on="last_model_turn", max_length=1024,
        template="small")                      # E2B/E4B; "large" for 26B-A4B/31B
    report = quality_report(train + holdout, examples, read_stats,
                            dedupe_stats=dedupe_stats, encode_stats=encode_stats)
    print(format_report(report))
    batches = build_dataset(examples, seq_len=1024, batch_size=8, seed=0)
"""

# The data fields, typed, with their defaults (`config.data` of a run).
from gemma4_keras.settings import DataSettings  # isort: skip

# Records: readers and validation.
from gemma4_keras.data.records import (
    Conversation,
    DataError,
    Message,
    Problem,
    load_conversations,
    normalise_messages,
    normalise_tools,
    validate_messages,
)

# Chat format.
from gemma4_keras.data.chat import (  # isort: skip
    generation_prompt,
    render_conversation,
    strip_thinking,
)

# Gemma's tool syntax: calls written and parsed back.
from gemma4_keras.data.tool_format import ToolFormatError, format_call, parse_calls  # isort: skip

# Which official chat template (small / large), and the guard against the
# checkpoint's own `chat_template.jinja`.
from gemma4_keras.data.template import (  # isort: skip
    ChatTemplate,
    TemplateError,
    check_conversations,
)

# Tokens and loss masks.
from gemma4_keras.data.tokenize import (  # isort: skip
    ChatTokenizer,
    EncodedExample,
    as_chat_tokenizer,
    encode_conversation,
    encode_conversations,
)

# Quality: duplicates, split, report.
from gemma4_keras.data.quality import (  # isort: skip
    dedupe,
    format_report,
    quality_report,
    split_holdout,
)

# Packing and batches.
from gemma4_keras.data.packing import pack_examples  # isort: skip
from gemma4_keras.data.pipeline import BatchStream, build_dataset  # isort: skip

# Whole steps (train.py, `gemma4-keras data check|stats|split`; `data render` is
# `data.render.render`).
from gemma4_keras.data.commands import PreparedData, check, prepare, split, stats  # isort: skip

__all__ = [
    "BatchStream",
    "ChatTemplate",
    "ChatTokenizer",
    "Conversation",
    "DataError",
    "DataSettings",
    "EncodedExample",
    "Message",
    "PreparedData",
    "Problem",
    "TemplateError",
    "ToolFormatError",
    "as_chat_tokenizer",
    "build_dataset",
    "check",
    "check_conversations",
    "dedupe",
    "encode_conversation",
    "encode_conversations",
    "format_report",
    "generation_prompt",
    "format_call",
    "load_conversations",
    "normalise_messages",
    "normalise_tools",
    "pack_examples",
    "parse_calls",
    "prepare",
    "quality_report",
    "render_conversation",
    "split",
    "split_holdout",
    "stats",
    "strip_thinking",
    "validate_messages",
]
