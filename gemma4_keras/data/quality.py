"""Duplicates, the holdout split and the data quality report."""

import collections
import hashlib
import json
import re
import unicodedata
from collections.abc import Sequence

import numpy as np

from gemma4_keras.data.chat import LEGACY_MARKERS
from gemma4_keras.data.records import Conversation

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


def _key(conversation: Conversation, normalise: bool) -> str:
    fix = normalise_text if normalise else (lambda s: s)
    turns = [
        (m["role"], fix(m["content"]), fix(m.get("thinking", "")))
        for m in conversation.messages
    ]
    return json.dumps(turns, ensure_ascii=False)


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
    answers = [c.messages[-1]["content"] for c in conversations]
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


def _conversation_stats(conversations: Sequence[Conversation]) -> dict:
    turns = [sum(m["role"] == "model" for m in c.messages) for c in conversations]
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
    if report["conversations"]["legacy_markers"]:
        warnings.append(
            "Gemma 2/3 markers (<start_of_turn>) in the text; Gemma 4 uses <|turn>"
        )
    return warnings


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
