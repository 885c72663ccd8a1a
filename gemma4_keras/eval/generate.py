"""Text generation from chat messages, with the training model itself.

`Generator.from_model` decodes with the `Gemma4LoraModel` that trained (float
or NF4 base, adapter on, off or switched) through its KV-cached KerasHub
`CausalLM` (`model.decoding`): no second copy of the base is loaded.
`Generator.from_backbone` wraps KerasHub's own `Gemma4CausalLM`, for checking
exported presets. Prompts are rendered by `data.generation_prompt` with the
chat template variant of the tuned size (`presets.chat_template`) and
already start with `<bos>`: they are tokenized without adding another start
token. Decoding stops on the ids the -it `generation_config.json` lists:
`<eos>`, `<turn|>` and `<|tool_response>`.
"""

from __future__ import annotations

import json
import os

import keras
import numpy as np

from gemma4_keras.data import as_chat_tokenizer, chat, generation_prompt
from gemma4_keras.export import peft
from gemma4_keras.model import decoding, hub, lora, presets

EOS_ID = 1
END_OF_TURN_ID = 106  # <turn|>
TOOL_RESPONSE_ID = 50  # <|tool_response>: a tool call waits for its result
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


class Generator:
    """Batched generation from chat messages, over any KerasHub `CausalLM`.

    Example:
      >>> gen = Generator.from_model(model, tokenizer, template="small")
      >>> gen.generate([[{"role": "user", "content": "Hi"}]], max_new_tokens=16)
      ['Hello! How can I help?']
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

    @classmethod
    def from_backbone(cls, backbone, tokenizer, *, sampler: str = "greedy", **kwargs):
        """Decodes with KerasHub's `Gemma4CausalLM` (e.g. an exported preset)."""
        lm = hub.causal_lm(backbone)
        lm.compile(sampler=sampler)
        return cls(lm, tokenizer, **kwargs)

    def prompt_ids(self, messages_list) -> list[list[int]]:
        texts = [
            generation_prompt(
                m, template=self.template, enable_thinking=self.enable_thinking
            )
            for m in messages_list
        ]
        return self.chat_tokenizer.encode_texts(texts)

    def generate(
        self, messages_list, *, max_new_tokens: int = 64, batch_size: int = 8
    ) -> list[str]:
        """Generates one model turn for each conversation (ending in a user turn)."""
        if max_new_tokens < 1:
            raise PromptError(f"max_new_tokens={max_new_tokens} must be > 0")
        prompts = self.prompt_ids(messages_list)
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
            texts = self._generate_batch(batch, max_new_tokens, length)
            for i, text in zip(rows, texts):
                out[i] = text
        return out

    def _decode(self, ids: list[int]) -> str:
        # A model's vocabulary may be padded past its tokenizer's (embedding
        # rows no text maps to); SentencePiece refuses such ids: drop them.
        known = self.tokenizer.vocabulary_size()
        ids = [i for i in ids if 0 <= i < known]
        if not ids:
            return ""
        text = self.tokenizer.detokenize(np.asarray(ids, np.int32))
        text = text.numpy() if hasattr(text, "numpy") else text
        return text.decode("utf-8") if isinstance(text, bytes) else str(text)

    def _generate_batch(
        self, prompts: list[list[int]], max_new_tokens: int, length: int | None = None
    ) -> list[str]:
        length = length or buffer_length(max(map(len, prompts)), max_new_tokens)
        n = len(prompts)
        token_ids = np.zeros((n, length), np.int32)
        padding_mask = np.zeros((n, length), bool)
        for i, p in enumerate(prompts):
            token_ids[i, : len(p)] = p
            padding_mask[i, : len(p)] = True
        result = self.lm.generate(
            {"token_ids": token_ids, "padding_mask": padding_mask},
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


def read_prompts(prompts: list[str], prompts_file: str | None) -> list[list[dict]]:
    """Conversations (ending in a user turn) from --prompt flags and/or a file.

    A prompts file holds one `{"messages": [...]}` object or one plain-text
    user message per line.
    """

    out = [[{"role": "user", "content": p}] for p in prompts]
    if prompts_file:
        if not os.path.isfile(prompts_file):
            raise PromptError(f"--prompts_file={prompts_file}: no such file")
        try:
            with open(prompts_file, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except UnicodeDecodeError as e:
            raise PromptError(
                f"--prompts_file={prompts_file}: invalid UTF-8 at byte {e.start}; "
                "save it as UTF-8"
            ) from e
        for n, line in enumerate(lines, 1):
            line = line.strip()
            if not line:
                continue
            if line.startswith("{"):
                try:
                    messages = json.loads(line)["messages"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise PromptError(
                        f'{prompts_file}:{n}: expected {{"messages": [...]}} ({e})'
                    ) from e
                out.append(messages)
            else:
                out.append([{"role": "user", "content": line}])
    if not out:
        raise PromptError("no prompt: give --prompt=... or --prompts_file=FILE")
    for i, messages in enumerate(out):
        where = f"prompt {i + 1}"
        if not isinstance(messages, list) or not messages:
            raise PromptError(f"{where}: 'messages' must be a non-empty list")
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                raise PromptError(
                    f"{where}: every message needs a role and a string content"
                )
            if not m["content"].strip() and m.get("role") == "user":
                raise PromptError(f"{where}: empty user message")
        if messages[-1].get("role") != "user":
            raise PromptError(f"{where}: the conversation must end with a user turn")
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
    model = presets.build_training_model(
        preset, config.model, config.lora, config.quant, config.train
    )
    model.unload_adapter("default")  # the config's fresh, untrained adapter
    if adapter is not None:
        try:
            lora.add_adapter_from_factors(model, *adapter, name="default")
        except lora.AdapterMismatchError as e:
            raise peft.AdapterFormatError(f"{source}: {e}") from e
    return model


def generate_answers(
    config, conversations, *, adapter: str | None, max_new_tokens: int
) -> list[str]:
    """`gemma4-keras generate`: the base model, or base + a PEFT adapter.

    Decodes with the training model (the base quantised as `config.quant`
    says), never with a merged full-precision copy.
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
    gen = Generator.from_model(
        model,
        tokenizer,
        template=presets.chat_template(config, preset).variant,
        enable_thinking=bool(config.data.enable_thinking),
        max_length=context_length(preset),
    )
    return gen.generate(
        conversations,
        max_new_tokens=max_new_tokens,
        batch_size=int(config.eval.batch_size),
    )
