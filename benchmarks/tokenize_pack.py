"""Throughput of the data path: render + tokenize + mask, then pack + batch.

Run:
    python benchmarks/tokenize_pack.py
    python benchmarks/tokenize_pack.py --conversations 50000 --seq-len 2048
    python benchmarks/tokenize_pack.py --preset /path/to/gemma4/checkpoint

Pinned to one CPU core (`os.sched_setaffinity`). The conversations are the
shipped sentiment set (`gemma4_keras/resources/sentiment.jsonl`), each user
turn made unique (so the per-text cache does not flatter the numbers), cycled
to `--conversations`. Prints tokens per second for

- encode: `encode_conversations` (render the Gemma 4 chat format, encode the
  text between control tokens with the tokenizer's SentencePiece model in one
  batched call, build loss masks);
- pack: `build_dataset(packing=True)` and materialising every batch of one
  epoch (shift, segment ids, positions, padding);
- baseline: calling the KerasHub tokenizer once per rendered string (ids
  only, no masks), the slow path the encoder avoids.

The default tokenizer is the tiny test one (vocabulary 1024); a real Gemma 4
preset (262,144 pieces) tokenizes somewhat slower per token, and its longer
pieces make fewer tokens per conversation.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir))

import gemma4_keras  # noqa: E402,F401  (selects the JAX backend first)
from gemma4_keras import data  # noqa: E402

RESOURCE = os.path.join(
    os.path.dirname(gemma4_keras.__file__), "resources", "sentiment.jsonl"
)


def pin_one_core() -> str:
    """Restricts this process to one CPU; returns a description."""
    if not hasattr(os, "sched_setaffinity"):
        return "affinity not supported; all cores"
    core = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})
    return f"pinned to core {core}"


def make_conversations(n: int) -> list[data.Conversation]:
    base, _ = data.load_conversations({"path": RESOURCE})
    out = []
    for i in range(n):
        source = base[i % len(base)]
        messages = [dict(m) for m in source.messages]
        user = next(m for m in messages if m["role"] == "user")
        user["content"] += f" (#{i})"
        out.append(data.Conversation(messages, f"bench:{i}"))
    return out


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--conversations", type=int, default=20000)
    parser.add_argument(
        "--seq-len", type=int, default=1024, help="packed row length (tokens)"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="rows per batch")
    parser.add_argument(
        "--baseline",
        type=int,
        default=2000,
        help="strings for the per-string baseline (0 = skip)",
    )
    parser.add_argument(
        "--preset",
        default="",
        help="tokenizer preset/dir (default: the tiny test tokenizer)",
    )
    args = parser.parse_args()

    affinity = pin_one_core()
    import keras_hub

    from gemma4_keras.testing.tiny import tiny_checkpoint

    preset = args.preset or str(tiny_checkpoint())
    tokenizer = keras_hub.models.Gemma4Tokenizer.from_preset(preset)
    conversations = make_conversations(args.conversations)
    chat_tokenizer = data.as_chat_tokenizer(tokenizer)

    (examples, _), t_encode = timed(
        lambda: data.encode_conversations(
            conversations,
            chat_tokenizer,
            max_length=args.seq_len + 1,
            template="small",  # the variant changes a few prompt tokens only
        )
    )
    tokens = sum(len(e) for e in examples)

    def pack_epoch():
        stream = data.build_dataset(
            examples, seq_len=args.seq_len, batch_size=args.batch_size, seed=0
        )
        return [stream.batch(k) for k in range(stream.steps_per_epoch)]

    batches, t_pack = timed(pack_epoch)
    fill = sum(float(b["padding_mask"].mean()) for b in batches) / len(batches)

    results = {
        "affinity": affinity,
        "tokenizer": "tiny" if not args.preset else args.preset,
        "conversations": len(conversations),
        "tokens": tokens,
        "encode_tokens_per_s": round(tokens / t_encode),
        "pack_tokens_per_s": round(tokens / t_pack),
        "tokenize_pack_tokens_per_s": round(tokens / (t_encode + t_pack)),
        "row_fill": round(fill, 4),
    }
    if args.baseline:
        texts = [
            data.render_conversation(c.messages) for c in conversations[: args.baseline]
        ]
        counts, t_base = timed(lambda: [len(tokenizer(t)) for t in texts])
        results["baseline_per_string_tokens_per_s"] = round(sum(counts) / t_base)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
