"""Duplicates, the holdout split, tool-call checks and the data quality report."""

import collections
import hashlib
import json
import re
import unicodedata
from collections.abc import Mapping, Sequence

import numpy as np

from gemma4_keras.data import media, tool_format
from gemma4_keras.data.chat import LEGACY_MARKERS
from gemma4_keras.data.records import Conversation, Problem

PERCENTILES = (50, 90, 95, 99)
MAX_LISTED = 50
_NON_WORD = re.compile(r"[^\w\s]+")
_SPACE = re.compile(r"\s+")


def normalise_text(text: str) -> str:
    """Case-, width-, punctuation- and whitespace-insensitive form.

    Example:
        >>> normalise_text("  Hello,   WORLD! ")
        'hello world'
    """
    text = unicodedata.normalize("NFKC", text).casefold()
    return _SPACE.sub(" ", _NON_WORD.sub(" ", text)).strip()


def _turn_key(message: Mapping, fix) -> list:
    turn = [message["role"], fix(message["content"]), fix(message.get("thinking", ""))]
    # Call ids are arbitrary labels: two conversations that differ only in
    # them are duplicates. Arguments and results are compared exactly.
    calls = [[c["name"], c["arguments"]] for c in message.get("tool_calls") or ()]
    responses = [
        [r["name"], r["response"]] for r in message.get("tool_responses") or ()
    ]
    turn = turn + [calls, responses] if calls or responses else turn
    # The same text with other images is another example: media by content.
    found = [[r["type"], r["sha256"]] for r in message.get("media") or ()]
    return turn + [found] if found else turn


def _key(conversation: Conversation, normalise: bool) -> str:
    fix = normalise_text if normalise else (lambda s: s)
    turns = [_turn_key(m, fix) for m in conversation.messages]
    # Without tools the key is what it always was, so splits stay put.
    key = {"tools": conversation.tools, "turns": turns} if conversation.tools else turns
    return json.dumps(key, ensure_ascii=False, sort_keys=True)


def dedupe(conversations: Sequence[Conversation]) -> tuple[list[Conversation], dict]:
    """Removes exact and normalised duplicates, keeping the first occurrence.

    Returns:
        (kept, stats) with stats = {"exact": n, "normalised": m (not exact),
        "removed": n + m, "duplicates": [{"source", "duplicate_of", "kind"}]}.
    """
    exact_seen: dict[str, str] = {}
    norm_seen: dict[str, str] = {}
    kept, found = [], []
    for conversation in conversations:
        exact, norm = _key(conversation, False), _key(conversation, True)
        if exact in exact_seen or norm in norm_seen:
            kind = "exact" if exact in exact_seen else "normalised"
            first = exact_seen.get(exact) or norm_seen[norm]
            found.append(
                {"source": conversation.source, "duplicate_of": first, "kind": kind}
            )
            continue
        exact_seen[exact] = norm_seen[norm] = conversation.source
        kept.append(conversation)
    counts = collections.Counter(d["kind"] for d in found)
    stats = {
        "exact": counts["exact"],
        "normalised": counts["normalised"],
        "removed": len(found),
        "duplicates": found,
    }
    return kept, stats


def content_hash(conversation: Conversation, seed: int = 0) -> str:
    """A hash of the normalised content (so near-duplicates split together)."""
    return hashlib.sha256(f"{seed}\0{_key(conversation, True)}".encode()).hexdigest()


def split_holdout(
    conversations: Sequence[Conversation], fraction: float = 0.1, seed: int = 0
) -> tuple[list[Conversation], list[Conversation]]:
    """Deterministic (train, holdout) split by content hash.

    The round(fraction * n) conversations with the smallest hashes (at least
    one when fraction > 0 and n > 1) are held out, so reruns and resumed runs
    see the same split whatever the input order; both keep the input order.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"holdout fraction {fraction} must be in [0, 1)")
    n = len(conversations)
    k = int(round(fraction * n))
    if fraction > 0 and n > 1:
        k = max(k, 1)
    ranked = sorted(range(n), key=lambda i: content_hash(conversations[i], seed))
    held = set(ranked[:k])
    train = [c for i, c in enumerate(conversations) if i not in held]
    return train, [c for i, c in enumerate(conversations) if i in held]


def label_stats(
    conversations: Sequence[Conversation], imbalance_ratio: float = 5.0
) -> dict | None:
    """Distribution of final answers when they look like class labels, else None.

    They look like labels when every final model turn is short (at most 4
    words, 40 characters) and there are at most 50 distinct values, fewer
    than half the number of conversations.
    """
    # A conversation ending in tool calls has no final answer to count.
    answers = [
        c.messages[-1]["content"]
        for c in conversations
        if not c.messages[-1].get("tool_calls")
    ]
    if len(answers) < 4 or any(len(a) > 40 or len(a.split()) > 4 for a in answers):
        return None
    counts = collections.Counter(answers)
    if len(counts) > 50 or len(counts) * 2 > len(answers):
        return None
    ratio = max(counts.values()) / min(counts.values())
    warning = None
    if ratio > imbalance_ratio:
        common, rare = counts.most_common()[0], counts.most_common()[-1]
        warning = f"label imbalance: {common[0]!r} x{common[1]} vs {rare[0]!r} x{rare[1]} (ratio {ratio:.1f} > {imbalance_ratio})"
    return {
        "counts": dict(counts.most_common()),
        "distinct": len(counts),
        "imbalance_ratio": round(ratio, 3),
        "warning": warning,
    }


def token_stats(encoded: Sequence, max_length: int | None = None) -> dict | None:
    """Length percentiles and trained-token counts of encoded examples."""
    if not encoded:
        return None
    lengths = np.array([len(e.token_ids) for e in encoded])
    trained = int(sum(int(e.loss_mask.sum()) for e in encoded))
    pct = {f"p{p}": float(np.percentile(lengths, p)) for p in PERCENTILES}
    stats = {
        "examples": len(encoded),
        "total": int(lengths.sum()),
        "trained": trained,
        "min": int(lengths.min()),
        "max": int(lengths.max()),
        "mean": round(float(lengths.mean()), 2),
        "percentiles": pct,
    }
    if max_length:
        stats["max_length"] = int(max_length)
    return stats


# --------------------------------------------------------------------------
# Tool calls
# --------------------------------------------------------------------------


def call_problems(conversation: Conversation) -> list[Problem]:
    """Every call of a conversation with tools that its declarations refuse.

    A call must name a declared function, and its arguments must validate
    against that function's `parameters` (a JSON schema, checked with
    jsonschema; `nullable: true` allows None); a function declaring no
    parameters takes any arguments. Messages are counted as in
    `Conversation.messages` (`tool` messages folded into the model message
    whose calls they answer). Conversations without tools are not checked.

    Example:
        >>> tools = [{"type": "function", "function": {"name": "ping",
        ...     "parameters": {"type": "object", "required": ["host"]}}}]
        >>> c = Conversation([{"role": "user", "content": "Up?"}, {"role": "model",
        ...     "content": "", "tool_calls": [{"name": "ping", "arguments": {}}]}],
        ...     "f.jsonl:3", tools=tools)
        >>> print(call_problems(c)[0])
        f.jsonl:3: message 1, tool_calls[0] (ping): 'host' is a required property
    """
    if not conversation.tools:
        return []
    declared, problems = tool_format.declared_parameters(conversation.tools), []
    for i, message in enumerate(conversation.messages):
        for j, call in enumerate(message.get("tool_calls") or ()):
            ident = f", id {call['id']}" if call.get("id") else ""
            where = f"message {i}, tool_calls[{j}] ({call['name']}{ident})"
            for reason in tool_format.call_errors(call, declared):
                problems.append(Problem(conversation.source, f"{where}: {reason}"))
    return problems


def check_tool_calls(
    conversations: Sequence[Conversation],
) -> tuple[list[Conversation], list[Problem]]:
    """(conversations whose calls all validate, the problems of the others).

    Example:
        >>> check_tool_calls([Conversation([{"role": "user", "content": "Hi"},
        ...     {"role": "model", "content": "Hello"}], "f.jsonl:1")])[1]
        []
    """
    kept, problems = [], []
    for conversation in conversations:
        found = call_problems(conversation)
        problems += found
        if not found:
            kept.append(conversation)
    return kept, problems


def _listed(records: list[dict], count: int | None = None) -> dict:
    return {
        "count": len(records) if count is None else count,
        "records": records[:MAX_LISTED],
    }


def _results_check(source: str, index: int, message: Mapping) -> tuple[list, list]:
    """(results that answer no call, calls that get no result) of one model message.

    Results are matched to calls by function name; a `tool` message naming
    no call (nor a call id) has the name "unknown", which answers nothing.
    """
    calls = collections.Counter(c["name"] for c in message.get("tool_calls") or ())
    results = collections.Counter(r["name"] for r in message["tool_responses"])
    stray = [
        {
            "source": source,
            "detail": f"message {index}: a result of {name!r} "
            f"answers no call (calls: {', '.join(sorted(calls)) or 'none'})",
        }
        for name in sorted(results)
        if name not in calls
    ]
    missing = [
        {
            "source": source,
            "detail": f"message {index}: {n} call(s) of {name!r} get no result",
            "calls": n,
        }
        for name, n in sorted((calls - results).items())
    ]
    return stray, missing


def _result_problems(conversations: Sequence[Conversation]) -> dict:
    stray, missing = [], []
    for conv in conversations:
        found = [
            _results_check(conv.source, i, m)
            for i, m in enumerate(conv.messages)
            if m.get("tool_responses")
        ]
        stray += [r for f in found for r in f[0]][:1]  # one line a conversation
        missing += [r for f in found for r in f[1]]
    return {
        "stray_results": _listed(stray),
        "calls_without_result": _listed(missing, sum(m["calls"] for m in missing)),
    }


def tool_stats(conversations: Sequence[Conversation]) -> dict | None:
    """Tool use in the data, or None when no conversation declares or calls a tool.

    Returns:
        {"with_tools": conversations declaring tools, "calls", "calls_mean" /
        "calls_max" (per conversation with tools), "used" ({function:
        calls}), "parallel_call_turns" (model messages with several calls),
        "ending_with_calls" (conversations ending in calls without results:
        they train the calls alone), and, each as {"count", "records":
        [{"source", "detail"}]}: "undeclared" (conversations calling tools
        they declare none of), "stray_results" (conversations with a result
        that answers no call of its message), "calls_without_result"
        (calls of a message with results that get none; count = calls)}.

    Example:
        >>> tool_stats([Conversation([{"role": "user", "content": "Hi"},
        ...     {"role": "model", "content": "Hello"}])]) is None
        True
    """
    calls_of = [
        [c for m in conv.messages for c in m.get("tool_calls") or ()]
        for conv in conversations
    ]
    if not any(calls_of) and not any(c.tools for c in conversations):
        return None
    declaring = [len(calls) for c, calls in zip(conversations, calls_of) if c.tools]
    used = collections.Counter(c["name"] for calls in calls_of for c in calls)
    undeclared = [
        {"source": c.source, "detail": "calls tools but declares none"}
        for c, calls in zip(conversations, calls_of)
        if calls and not c.tools
    ]
    last = [c.messages[-1] for c in conversations]
    return {
        "with_tools": len(declaring),
        "calls": sum(used.values()),
        "calls_mean": round(float(np.mean(declaring)), 3) if declaring else 0.0,
        "calls_max": max(declaring, default=0),
        "used": dict(used.most_common()),
        "parallel_call_turns": sum(
            len(m.get("tool_calls") or ()) > 1
            for c in conversations
            for m in c.messages
        ),
        "ending_with_calls": sum(
            bool(m.get("tool_calls")) and not m.get("tool_responses") for m in last
        ),
        "undeclared": _listed(undeclared),
        **_result_problems(conversations),
    }


def media_stats(conversations: Sequence[Conversation]) -> dict | None:
    """Images and audio clips per conversation and the soft tokens they take.

    None when no conversation has any. `records` lists the first
    conversations with media: {"source", "images", "audio", "soft_tokens"}.

    Example (two records, one with two 300 x 500 images):
        images 2, audio 0, image_soft_tokens 504 (252 each), with_media 1
    """
    rows = []
    totals = collections.Counter()
    for c in conversations:
        found = media.media_of(c.messages)
        if not found:
            continue
        counts = collections.Counter(r["type"] for r in found)
        tokens = sum(int(r["soft_tokens"]) for r in found)
        for r in found:
            totals[r["type"] + "_soft_tokens"] += int(r["soft_tokens"])
        totals.update(counts)
        rows.append(
            {
                "source": c.source,
                "images": counts[media.IMAGE],
                "audio": counts[media.AUDIO],
                "soft_tokens": tokens,
            }
        )
    if not rows:
        return None
    return {
        "with_media": len(rows),
        "images": totals[media.IMAGE],
        "audio": totals[media.AUDIO],
        "image_soft_tokens": totals["image_soft_tokens"],
        "audio_soft_tokens": totals["audio_soft_tokens"],
        "max_images": max(r["images"] for r in rows),
        "max_audio": max(r["audio"] for r in rows),
        "max_soft_tokens": max(r["soft_tokens"] for r in rows),
        "records": rows[:MAX_LISTED],
    }


def _model_turns(messages: Sequence[Mapping]) -> int:
    """Model turns: model messages after tool results continue the same turn."""
    return sum(
        m["role"] == "model" and (i == 0 or messages[i - 1]["role"] != "model")
        for i, m in enumerate(messages)
    )


def _conversation_stats(conversations: Sequence[Conversation]) -> dict:
    turns = [_model_turns(c.messages) for c in conversations]
    legacy = [
        c.source
        for c in conversations
        if any(marker in m["content"] for m in c.messages for marker in LEGACY_MARKERS)
    ]
    return {
        "count": len(conversations),
        "model_turns_mean": round(float(np.mean(turns)), 3) if turns else 0.0,
        "model_turns_max": max(turns, default=0),
        "multi_turn": sum(t > 1 for t in turns),
        "with_system": sum(c.messages[0]["role"] == "system" for c in conversations),
        "with_thinking": sum(
            any("thinking" in m for m in c.messages) for c in conversations
        ),
        "legacy_markers": legacy[:MAX_LISTED],
    }


def quality_report(
    conversations: Sequence[Conversation],
    encoded: Sequence | None,
    read_stats: dict,
    *,
    dedupe_stats: dict | None = None,
    encode_stats: dict | None = None,
    split: dict | None = None,
    max_length: int | None = None,
    imbalance_ratio: float = 5.0,
) -> dict:
    """A JSON-serialisable report on the data (see `format_report`).

    Args:
        conversations: the conversations kept (after dedupe).
        encoded: their encoded examples, or None before tokenization.
        read_stats: from `load_conversations`.
        dedupe_stats: from `dedupe`.
        encode_stats: from `encode_conversations` (truncation counts).
        split: e.g. {"train": n, "holdout": m, "fraction": f, "seed": s}.
        max_length: data.max_length, shown beside the length percentiles.
        imbalance_ratio: warn when the most / least frequent label exceed it.
    """
    report = {
        "read": read_stats,
        "duplicates": dedupe_stats,
        "conversations": _conversation_stats(conversations),
        "labels": label_stats(conversations, imbalance_ratio),
        "tools": tool_stats(conversations),
        "media": media_stats(conversations),
        "tokens": token_stats(encoded or [], max_length),
        "truncation": encode_stats,
        "split": split,
    }
    report["warnings"] = _warnings(report)
    return report


def _warnings(report: dict) -> list[str]:
    warnings = []
    read = report["read"] or {}
    if read.get("skipped"):
        warnings.append(
            f"{read['skipped']} bad records skipped (see read.skipped_records)"
        )
    dup = report["duplicates"] or {}
    if dup.get("removed"):
        warnings.append(
            f"{dup['removed']} duplicates removed ({dup['exact']} exact, {dup['normalised']} normalised)"
        )
    if report["labels"] and report["labels"]["warning"]:
        warnings.append(report["labels"]["warning"])
    trunc = report["truncation"] or {}
    if trunc.get("dropped_too_long"):
        warnings.append(
            f"{trunc['dropped_too_long']} examples dropped as longer than max_length"
        )
    if trunc.get("thoughts_not_trained"):
        warnings.append(
            f"{trunc['thoughts_not_trained']} trained turns carry thoughts that are "
            "not trained (data.enable_thinking=False)"
        )
    if trunc.get("history_cut"):
        warnings.append(f"{trunc['history_cut']} examples had their oldest history cut")
    warnings += _tool_warnings(report.get("tools"))
    if report["conversations"]["legacy_markers"]:
        warnings.append(
            "Gemma 2/3 markers (<start_of_turn>) in the text; Gemma 4 uses <|turn>"
        )
    return warnings


def _tool_warnings(tools: dict | None) -> list[str]:
    if not tools:
        return []
    texts = {
        "undeclared": "conversation(s) call tools they do not declare (add `tools`)",
        "stray_results": "conversation(s) have a tool result that answers no call "
        "(check tool_call_id / name)",
        "calls_without_result": "tool call(s) get no result in a turn with results",
    }
    return [
        f"{tools[k]['count']} {text}" for k, text in texts.items() if tools[k]["count"]
    ]


def format_report(report: dict) -> str:
    """The report as a printable table."""
    lines = []

    def row(name: str, value: object) -> None:
        lines.append(f"  {name:<28} {value}")

    read = report.get("read") or {}
    lines.append(f"data: {read.get('path', '?')} (format {read.get('format', '?')})")
    row("records read", read.get("records", 0))
    row("valid", read.get("valid", 0))
    row("skipped (bad)", read.get("skipped", 0))
    if read.get("tool_call_errors"):
        row("  of them: bad tool calls", read["tool_call_errors"])
    for p in read.get("skipped_records", [])[:MAX_LISTED]:
        lines.append(f"    {p['source']}: {p['reason']}")
    dup = report.get("duplicates")
    if dup:
        row(
            "duplicates removed",
            f"{dup['removed']} ({dup['exact']} exact, {dup['normalised']} normalised)",
        )
        for d in dup["duplicates"][:MAX_LISTED]:
            lines.append(
                f"    {d['source']}: {d['kind']} duplicate of {d['duplicate_of']}"
            )
    conv = report["conversations"]
    row("conversations", conv["count"])
    row("multi-turn / with system", f"{conv['multi_turn']} / {conv['with_system']}")
    if report.get("split"):
        s = report["split"]
        row(
            "split train / holdout",
            f"{s.get('train')} / {s.get('holdout')} (fraction {s.get('fraction')}, seed {s.get('seed')})",
        )
    lines += _format_tools(report.get("tools"))
    lines += _format_media(report.get("media"))
    if report.get("labels"):
        labels = report["labels"]
        row("labels", ", ".join(f"{k!r}: {v}" for k, v in labels["counts"].items()))
    tokens = report.get("tokens")
    if tokens:
        row(
            "examples / tokens",
            f"{tokens['examples']} / {tokens['total']} ({tokens['trained']} trained)",
        )
        pct = " ".join(f"{k}={v:g}" for k, v in tokens["percentiles"].items())
        row(
            "length",
            f"min={tokens['min']} {pct} max={tokens['max']}"
            + (
                f" (max_length {tokens['max_length']})"
                if "max_length" in tokens
                else ""
            ),
        )
    trunc = report.get("truncation")
    if trunc:
        row(
            "dropped too long / cut",
            f"{trunc.get('dropped_too_long', 0)} / {trunc.get('history_cut', 0)}",
        )
        for r in trunc.get("dropped_too_long_records", [])[:MAX_LISTED]:
            lines.append(f"    {r['source']}: {r['value']} tokens, dropped")
    for warning in report.get("warnings", []):
        lines.append(f"WARNING: {warning}")
    return "\n".join(lines)


def _format_tools(tools: dict | None) -> list[str]:
    """The report's tool rows (see `tool_stats`); none without tool use."""
    if not tools:
        return []
    used = ", ".join(f"{name}: {n}" for name, n in tools["used"].items()) or "none"
    lines = [
        f"  {'conversations with tools':<28} {tools['with_tools']}",
        f"  {'calls per conversation':<28} mean {tools['calls_mean']:g}, max "
        f"{tools['calls_max']} ({tools['calls']} calls, {tools['parallel_call_turns']} "
        f"parallel-call turns, {tools['ending_with_calls']} ending in calls)",
        f"  {'tools used (calls)':<28} {used}",
    ]
    for key, name in (
        ("undeclared", "calls without declarations"),
        ("stray_results", "results answering no call"),
        ("calls_without_result", "calls without result"),
    ):
        if tools[key]["count"]:
            lines.append(f"  {name:<28} {tools[key]['count']}")
            lines += [
                f"    {r['source']}: {r['detail']}" for r in tools[key]["records"]
            ]
    return lines


def _format_media(stats: dict | None) -> list[str]:
    """The report's media rows (see `media_stats`); none without media."""
    if not stats:
        return []
    lines = [
        f"  {'conversations with media':<28} {stats['with_media']}",
        f"  {'images / audio clips':<28} {stats['images']} / {stats['audio']} "
        f"(at most {stats['max_images']} / {stats['max_audio']} per conversation)",
        f"  {'soft tokens image / audio':<28} {stats['image_soft_tokens']} / "
        f"{stats['audio_soft_tokens']} (at most {stats['max_soft_tokens']} per "
        "conversation)",
    ]
    return lines + [
        f"    {r['source']}: {r['images']} image(s), {r['audio']} audio, "
        f"{r['soft_tokens']} soft tokens"
        for r in stats["records"][:10]
    ]
