"""Model-size and method tables, the config builder, and config validation.

Every file under `configs/` is `get_config(arg)` delegating to `get_config`
here: adding a size is one row of `SIZES`, adding a method one row of
`METHODS`. Fields users type on the command line:

    --config.model.preset=gemma4_instruct_4b      (preset | hf://org/repo | dir | tiny)
    --config.data.path=train.jsonl                (file or tfds:name[/config]:split)
    --config.data.eval_path=eval.jsonl            (held-out file; empty = split data.path)
    --config.data.template=auto                   (auto | small | large chat template)
    --config.lora.rank=16 --config.lora.alpha=32 --config.lora.dropout=0.05
    --config.lora.targets=q_proj,v_proj           (HF module names or all-linear)
    --config.quant.mode=nf4                       (none | nf4 | int8 | int4)
    --config.quant.embedding=int8                 (none | int8: the tied embedding)
    --config.train.learning_rate=2e-4 --config.checkpoint.every_steps=100
"""

from __future__ import annotations

import dataclasses
import importlib.resources
from collections.abc import Sequence

import ml_collections

from gemma4_keras.settings import DataSettings

LORA_TARGETS = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)
# lora.targets naming an MoE expert bank (26B-A4B) start with this; the names
# are the schema's (`schema.EXPERT_TARGETS`, PEFT's `target_parameters`), not
# part of all-linear (as in PEFT). One LoRA pair per expert (model/lora.py).
EXPERT_PREFIX = "experts."
# lora.targets naming a layer of the vision tower start with this
# (`vision_tower.o_proj`; the names are `schema.TOWER_TARGETS`', not part of
# all-linear): LoRA on the tower, the decoder's targets as they are.
TOWER_PREFIX = "vision_tower."
QUANT_MODES = ("none", "nf4", "int8", "int4")
# quant.embedding: how the tied embedding (the LM head) is stored. int8 =
# int8 rows with a float32 scale per row (`quant.Int8Rows`): half bfloat16's
# bytes (1.40 -> 0.69 GiB at 26B-A4B), logits from int8 weights.
EMBEDDING_QUANTS = ("none", "int8")
DTYPES = ("auto", "float32", "bfloat16", "float16")
# data.template: auto = the checkpoint's chat_template.jinja, else the size table.
TEMPLATE_CHOICES = ("auto", "small", "large")
# `eval.task_type` values; their metrics are in eval/metrics.py.
TASK_TYPES = ("classification", "generation", "extraction", "instruction", "tool_call")


class ConfigError(ValueError):
    """A config field has a value the package cannot use."""


@dataclasses.dataclass(frozen=True)
class Size:
    """Facts of one Gemma 4 size that change default run settings."""

    preset: str  # KerasHub preset of the instruction-tuned model
    base_preset: str  # KerasHub preset of the pretrained (base) model
    hf_id: str  # Hugging Face repo of the instruction-tuned model
    max_length: int  # default training sequence length, tokens
    remat: bool  # rematerialise decoder blocks by default
    micro_batch: int  # per-device micro-batch
    # Official chat template of the -it model: "small" (no empty thought block
    # in the thinking-off generation prompt) or "large" (with it).
    template: str
    tiny: str = "tiny"  # the :runlocal stand-in with this size's architecture features


# The tiny model is a stand-in trained on a CPU; it renders like the small
# models (E2B/E4B), the ones people fine-tune on such hardware.
SIZES: dict[str, Size] = {
    "tiny": Size("tiny", "tiny", "", 128, False, 8, "small"),
    "e2b": Size(
        "gemma4_instruct_2b",
        "gemma4_2b",
        "google/gemma-4-E2B-it",
        2048,
        True,
        4,
        "small",
        "tiny:ple,kv_shared,double_wide_mlp",
    ),
    "e4b": Size(
        "gemma4_instruct_4b",
        "gemma4_4b",
        "google/gemma-4-E4B-it",
        2048,
        True,
        4,
        "small",
        "tiny:ple,kv_shared",
    ),
    "26b_a4b": Size(
        "gemma4_instruct_26b_a4b",
        "gemma4_26b_a4b",
        "google/gemma-4-26B-A4B-it",
        2048,
        True,
        2,
        "large",
        "tiny:moe,k_eq_v",
    ),
    "31b": Size(
        "gemma4_instruct_31b",
        "gemma4_31b",
        "google/gemma-4-31B-it",
        2048,
        True,
        1,
        "large",
        "tiny:k_eq_v",
    ),
}

# method -> quantisation of the frozen base. Hyperparameters follow the
# fine-tuning guide: rank 16, alpha 2 x rank, dropout 0.05, lr 2e-4.
METHODS: dict[str, dict] = {
    "lora": {"mode": "none", "double_quant": False},
    "qlora": {"mode": "nf4", "double_quant": True},
}


def _resource(name: str) -> str:
    return str(importlib.resources.files("gemma4_keras") / "resources" / name)


def default_dataset_path() -> str:
    """Path of the sentiment dataset that ships with the package."""
    return _resource("sentiment.jsonl")


def tools_dataset_path() -> str:
    """Path of the tool-call dataset that ships with the package (`:tools`)."""
    return _resource("support_tools.jsonl")


def get_config(
    size: str, method: str, arg: str | None = None
) -> ml_collections.ConfigDict:
    """Builds the run config for `size` x `method`.

    Args:
      size: a key of `SIZES` (tiny, e2b, e4b, 26b_a4b, 31b).
      method: a key of `METHODS` (lora, qlora).
      arg: the `:arg` of `--config=file.py:arg`; `runlocal` shrinks the run to
        the tiny model for a couple of steps (tests, smoke runs); `embedded`
        (tiny only) sets `EMBEDDED_DEFAULT`, the run of `configs/tiny.py`;
        `tools` (tiny only) sets `TOOLS_DEFAULT`, the run of
        `configs/tiny_tools.py` (with `runlocal`: only its data fields);
        `16gb` sets `LOW_MEMORY` (26B-A4B QLoRA at 4k tokens in 16 GB).
        Comma-separated switches combine.

    Example:
      >>> cfg = get_config("e4b", "qlora")
      >>> cfg.quant.mode, cfg.lora.rank, cfg.lora.alpha
      ('nf4', 16, 32.0)
    """
    if size not in SIZES:
        raise ConfigError(
            f"unknown model size {size!r}; known sizes: {', '.join(SIZES)}"
        )
    if method not in METHODS:
        raise ConfigError(
            f"unknown method {method!r}; known methods: {', '.join(METHODS)}"
        )
    facts = SIZES[size]
    c = ml_collections.ConfigDict()
    c.size = size
    c.method = method

    c.model = ml_collections.ConfigDict()
    c.model.preset = (
        facts.preset
    )  # KerasHub preset name, hf://org/repo, a local dir, or tiny
    # auto = float32 on CPU, float16 (with float32 islands, loss scaling) on
    # GPUs without bfloat16 tensor cores (T4, V100), bfloat16 on other GPUs/TPUs
    c.model.dtype = "auto"
    # No effect since float16 runs with float32 islands (docs/t4.md); kept so
    # configs and command lines that set it still load.
    c.model.allow_float16 = False
    # MoE experts (26B-A4B, model/moe.py): auto = routed, each expert on its
    # own tokens only (jax.lax.ragged_dot on GPU/TPU for a float bank, else
    # blocks of rows, one matmul per block) | ragged | blocks | dense (every
    # expert on every token, KerasHub's dispatch: 16x the expert FLOPs).
    c.model.moe_dispatch = "auto"
    # Tokens per chunk of the routed experts (auto / ragged / blocks), each
    # chunk recomputed in the backward pass: one layer's expert rows (about
    # 1.2 GiB at 26B-A4B, 4,096 tokens, bfloat16) become 1/chunks of that,
    # for one more forward pass of the experts. 0 = every token at once.
    c.model.moe_token_chunk = 0
    # The per-layer-embedding table (E2B/E4B) in host memory, each step
    # fetching only its tokens' rows: auto = on for one GPU/TPU (saves
    # 4.4 / 5.3 GiB of device memory), off on CPU and on a mesh | on | off.
    c.model.ple_on_host = "auto"
    # The frozen vision / audio towers of a multimodal HF checkpoint: auto =
    # loaded when the data (data.path, data.eval_path) has image or audio
    # parts, only those | on (every tower the checkpoint has) | off (text
    # only; data with media parts is refused).
    c.model.towers = "auto"
    # Attention (model/attention.py): auto = cuDNN flash attention on GPUs
    # where it applies, else queries in chunks when rows are longer than
    # attention_chunk_size (memory heads x chunk x keys; sliding layers read
    # only chunk + window keys), else dense | dense | chunked | fused.
    c.model.attention = "auto"
    c.model.attention_chunk_size = 512  # queries per chunk [tokens]
    c.model.remat = facts.remat  # rematerialise each decoder block
    c.model.loss_chunk_size = 1024  # tokens per chunk of the vocab projection

    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 16
    c.lora.alpha = 32.0  # scale = alpha / rank (alpha / sqrt(rank) with rslora)
    c.lora.dropout = 0.05  # on the adapter input only, only while training
    c.lora.targets = "all-linear"  # comma-separated HF module names, or all-linear
    c.lora.layers = ""  # comma-separated decoder layer indices; empty = all layers
    c.lora.rslora = False
    c.lora.seed = 0

    c.quant = ml_collections.ConfigDict(dict(METHODS[method]))
    c.quant.block_size = 64  # NF4 block (bitsandbytes' default)
    c.quant.embedding = "none"  # none | int8 (EMBEDDING_QUANTS)

    # The data fields, their meaning and defaults are `data.DataSettings`'s
    # (the data steps read that object); the size sets the sequence length.
    c.data = ml_collections.ConfigDict(
        dataclasses.asdict(DataSettings(max_length=facts.max_length))
    )

    c.train = ml_collections.ConfigDict()
    c.train.epochs = 3
    c.train.max_steps = -1  # optimiser steps; -1 = epochs x data
    c.train.batch_size = (
        facts.micro_batch
    )  # examples per micro-batch, global (all hosts)
    c.train.grad_accum = 4  # micro-batches per optimiser step
    c.train.learning_rate = 2e-4
    c.train.warmup_ratio = 0.1  # of all optimiser steps; ignored when warmup_steps > 0
    c.train.warmup_steps = 0
    c.train.schedule = "cosine"  # cosine | constant
    c.train.weight_decay = 0.0
    c.train.max_grad_norm = 1.0  # global-norm clipping; 0 = off
    c.train.seed = 0
    # MoE models (26B-A4B) only: adds coef x the load-balancing loss
    # (Switch / Mixtral, transformers' router_aux_loss_coef; top_k when
    # routing is even) to the loss; 0 = off, as the released model was trained.
    # train_log.csv has router_aux_loss and expert loads either way.
    c.train.router_aux_loss_coef = 0.0
    # Stop before loading when `plan`'s host-memory estimate exceeds the
    # machine's available memory; False = try anyway.
    c.train.memory_check = True
    c.train.log_every = 10  # optimiser steps between progress lines
    c.train.eval_every = 0  # optimiser steps between validation losses; 0 = each epoch
    c.train.overfit_patience = (
        0  # evaluations of rising/flat val_loss while loss falls; 0 = off
    )
    c.train.overfit_action = "warn"  # warn | stop (stop restores the best adapter)
    c.train.tensorboard = False  # also write workdir/tensorboard (needs tensorflow)
    c.train.sample_every = (
        0  # optimiser steps between samples.jsonl generations; 0 = off
    )

    c.distribution = ml_collections.ConfigDict()
    c.distribution.mode = "auto"  # auto | none | data | model (see distributed.py)
    c.distribution.model_parallel = 1  # devices on the model axis when mode=model

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 100  # optimiser steps
    c.checkpoint.max_to_keep = 3

    c.eval = ml_collections.ConfigDict()
    c.eval.max_examples = 200  # held-out examples generated for the report; -1 = all
    c.eval.max_new_tokens = 64
    # classification | generation | extraction | instruction | tool_call; empty =
    # infer (tool_call for the held-out model turns that call tools)
    c.eval.task_type = ""
    c.eval.batch_size = 8
    c.eval.compare_base = True  # also evaluate the untouched base model
    # Also evaluate the merged model (the adapter folded into an unquantised
    # base in model.dtype: what a merged export serves). Loads that base
    # beside the trained model: more memory, opt-in.
    c.eval.merged = False

    if arg:
        _apply_arg(c, arg)
    return c


# The embedded default (`configs/tiny.py`, the quickstart notebook): LoRA on
# the tiny model, tuned to lift held-out accuracy on the shipped sample within
# about 40 s on 2 CPU cores. `:embedded` applies it to the tiny size.
EMBEDDED_DEFAULT: dict[str, object] = {
    "lora.rank": 8,
    "lora.alpha": 16.0,
    "lora.dropout": 0.0,
    "data.max_length": 96,
    "train.epochs": 2,
    "train.batch_size": 16,
    "train.grad_accum": 1,
    "train.learning_rate": 3e-3,
    "train.log_every": 10,
    "checkpoint.every_steps": 50,
    "eval.max_examples": 120,
    "eval.max_new_tokens": 4,
}


# The tool-call example (`configs/tiny_tools.py`): LoRA on the tiny model, on
# the shipped support-agent sample (`data/samples.py`), tuned to lift the
# held-out exact-call rate (0 -> 0.57) in about 12 min on 2 CPU cores (800 steps). Every example
# repeats the four tool declarations (~620 tokens in the tiny tokenizer);
# the longest example is ~1,010 tokens, a call 30-60. `:tools` applies it.
TOOLS_DEFAULT: dict[str, object] = {
    "data.path": tools_dataset_path(),
    "data.max_length": 928,
    "data.holdout_fraction": 0.2,
    "lora.rank": 16,
    "lora.alpha": 32.0,
    "lora.dropout": 0.0,
    "train.epochs": 8,
    "train.batch_size": 4,
    "train.grad_accum": 1,
    "train.learning_rate": 5e-3,
    "train.log_every": 10,
    "checkpoint.every_steps": 200,
    "eval.max_examples": 60,
    "eval.max_new_tokens": 96,
}


# `:16gb`: what fits 26B-A4B QLoRA at seq 4,096 (batch 1) in 16 GB (16e9
# bytes) per `plan` (14.78 GiB; 15.63 with the float table; docs/real_size.md):
# an int8 tied embedding (the LM head reads int8 weights: logits move by
# about 1 %), the routed experts, loss and attention in smaller chunks
# (memory for a little speed; the values are the same). Any size takes it.
LOW_MEMORY: dict[str, object] = {
    "quant.embedding": "int8",
    "model.moe_token_chunk": 256,
    "model.loss_chunk_size": 128,
    "model.attention_chunk_size": 128,
}


def _apply_arg(c: ml_collections.ConfigDict, arg: str) -> None:
    """Applies the `:arg` switches (comma-separated); runlocal first."""
    switches = arg.split(",")
    for switch in sorted(switches, key=lambda s: s != "runlocal"):
        if switch == "runlocal":
            _shrink_to_tiny(c)
        elif switch == "16gb":
            _set_fields(c, LOW_MEMORY)
        elif switch in ("embedded", "tools"):
            if c.size != "tiny":
                raise ConfigError(
                    f"config switch {switch!r} is a run of the tiny model; "
                    f"size {c.size!r} has none (use runlocal)"
                )
            fields = EMBEDDED_DEFAULT if switch == "embedded" else TOOLS_DEFAULT
            # A smoke run keeps only the data of the switch (long enough rows).
            _set_fields(
                c,
                {
                    f: v
                    for f, v in fields.items()
                    if "runlocal" not in switches or f.startswith("data.")
                },
            )
        else:
            raise ConfigError(
                f"unknown config switch {switch!r}; known switches: runlocal, "
                "16gb, embedded, tools"
            )


def _set_fields(c: ml_collections.ConfigDict, fields: dict[str, object]) -> None:
    """Sets each `section.name` field of `fields` in `c`."""
    for field, value in fields.items():
        section, name = field.split(".")
        c[section][name] = value


def _shrink_to_tiny(c: ml_collections.ConfigDict) -> None:
    """Turns any config into a two-step run of the tiny model on the sample data.

    The tiny model carries the size's architecture features (PLE and KV
    sharing for E2B/E4B, MoE and K=V attention for 26B-A4B, ...).
    """
    c.model.preset = SIZES[c.size].tiny
    c.data.path = ""
    c.data.max_length = 96
    c.train.batch_size = 2
    c.train.grad_accum = 1
    c.train.max_steps = 2
    c.train.log_every = 1
    c.checkpoint.every_steps = 2
    c.eval.max_examples = 4
    c.eval.max_new_tokens = 4
    c.eval.compare_base = False
    c.lora.rank = 4
    c.lora.alpha = 8.0


def data_settings(data_cfg, template: str | None = None) -> DataSettings:
    """`config.data` as the data steps read it: a frozen `DataSettings`.

    An empty `data.path` becomes the shipped sample dataset and empty
    `data.fields` entries are dropped (the key keeps its own name).
    `template`, the resolved chat template variant
    (`presets.chat_template(config, preset).variant`), replaces
    `data.template` (which may be `auto`).

    Example:
      >>> settings = data_settings(get_config("tiny", "lora").data, "small")
      >>> settings.template, settings.eval_path, settings.path.endswith(".jsonl")
      ('small', '', True)
    """
    settings = DataSettings.of(data_cfg)
    return dataclasses.replace(
        settings,
        path=settings.path or default_dataset_path(),
        fields={k: v for k, v in settings.fields.items() if v},
        template=settings.template if template is None else template,
    )


def parse_list(value: str | Sequence[str]) -> list[str]:
    """Splits a comma-separated config value.

    >>> parse_list("q_proj, v_proj")
    ['q_proj', 'v_proj']
    """
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [str(v).strip() for v in value]


def lora_targets(
    value: str | Sequence[str], experts: Sequence[str] | None = None
) -> list[str]:
    """Resolves `lora.targets` to HF module names, in canonical order.

    `experts`: the expert-bank targets the model knows (`schema.EXPERT_TARGETS`);
    None (config validation, which cannot import the schema) passes any
    `experts.*` name on, for the model to check.
    """
    names = parse_list(value)
    if not names:
        raise ConfigError(
            "lora.targets is empty; give HF module names, e.g. q_proj,v_proj, or all-linear"
        )
    names = [n for n in names if not n.startswith(TOWER_PREFIX)]
    if not names:
        raise ConfigError(
            f"lora.targets={value!r} names only vision tower layers; add the "
            "decoder's, e.g. all-linear," + ",".join(parse_list(value))
        )
    if "all-linear" in names:
        names = [n for n in names if n != "all-linear"] + list(LORA_TARGETS)
    if experts is None:
        experts = [n for n in names if n.startswith(EXPERT_PREFIX)]
    known = LORA_TARGETS + tuple(experts)
    unknown = [n for n in names if n not in known]
    if unknown:
        banks = f" (MoE expert banks: {', '.join(experts)})" if experts else ""
        raise ConfigError(
            f"lora.targets has unknown module name(s) {unknown}; known: "
            f"{', '.join(LORA_TARGETS)} or all-linear{banks}"
        )
    return list(dict.fromkeys(t for t in known if t in names))


def lora_tower_targets(value: str | Sequence[str]) -> list[str]:
    """The vision tower targets of `lora.targets` (`vision_tower.<name>`), as
    `<name>`s; the model checks them (`schema.TOWER_TARGETS`)."""
    names = parse_list(value)
    return [n.removeprefix(TOWER_PREFIX) for n in names if n.startswith(TOWER_PREFIX)]


def lora_layers(value: str | Sequence[str]) -> list[int] | None:
    """Resolves `lora.layers` to layer indices; None means every layer."""
    names = parse_list(value)
    if not names:
        return None
    try:
        return sorted({int(n) for n in names})
    except ValueError as e:
        raise ConfigError(
            f"lora.layers must be comma-separated integers, got {value!r}"
        ) from e


# Fields with a fixed set of values: "--config.<field>=<v> must be one of ...".
CHOICES = {
    "size": SIZES,
    "method": METHODS,
    "quant.mode": QUANT_MODES,
    "quant.embedding": EMBEDDING_QUANTS,
    "data.template": TEMPLATE_CHOICES,  # small: E2B/E4B, large: 26B-A4B/31B
    "data.on_error": ("raise", "skip"),
    "data.train_on": ("last_model_turn", "all_model_turns"),
    "data.truncation": ("drop", "cut_history"),
    "train.schedule": ("cosine", "constant"),
    "train.overfit_action": ("warn", "stop"),
    "eval.task_type": ("", *TASK_TYPES),  # "": inferred from the data
    "distribution.mode": ("auto", "none", "data", "model"),
    "model.moe_dispatch": ("auto", "ragged", "blocks", "dense"),
    "model.attention": ("auto", "dense", "chunked", "fused"),
    "model.ple_on_host": ("auto", "on", "off"),
    "model.towers": ("auto", "on", "off"),
    "model.dtype": DTYPES,
}
# Counts and sizes that must be > 0.
POSITIVE = (
    "lora.rank lora.alpha quant.block_size train.batch_size train.grad_accum "
    "train.epochs train.learning_rate train.log_every model.loss_chunk_size "
    "model.attention_chunk_size eval.batch_size eval.max_new_tokens "
    "checkpoint.every_steps checkpoint.max_to_keep"
).split()


def validate(c: ml_collections.ConfigDict) -> None:
    """Raises ConfigError naming the first field whose value is unusable."""
    checks = [
        (
            _value(c, f) in allowed,
            f,
            f"must be one of {', '.join(map(_shown, allowed))}",
        )
        for f, allowed in CHOICES.items()
    ]
    checks += [(_value(c, f) > 0, f, "must be > 0") for f in POSITIVE]
    checks += [
        (0 <= c.lora.dropout < 1, "lora.dropout", "must be in [0, 1)"),
        (
            0 < c.data.holdout_fraction <= 0.5,
            "data.holdout_fraction",
            "must be in (0, 0.5]",
        ),
        (c.data.max_length > 1, "data.max_length", "must be > 1"),
        (0 <= c.train.warmup_ratio < 1, "train.warmup_ratio", "must be in [0, 1)"),
        (c.train.warmup_steps >= 0, "train.warmup_steps", "must be >= 0"),
        (
            c.model.moe_token_chunk >= 0,
            "model.moe_token_chunk",
            "must be >= 0 (0 = every token at once)",
        ),
        (c.train.max_grad_norm >= 0, "train.max_grad_norm", "must be >= 0"),
        (
            c.train.overfit_patience >= 0,
            "train.overfit_patience",
            "must be >= 0 (0 = off)",
        ),
        (c.train.sample_every >= 0, "train.sample_every", "must be >= 0 (0 = off)"),
        (
            c.train.router_aux_loss_coef >= 0,
            "train.router_aux_loss_coef",
            "must be >= 0 (0 = off)",
        ),
        (
            c.train.max_steps > 0 or c.train.max_steps == -1,
            "train.max_steps",
            "must be > 0, or -1 (= epochs x data)",
        ),
        (c.train.eval_every >= 0, "train.eval_every", "must be >= 0 (0 = each epoch)"),
        (
            c.eval.max_examples > 0 or c.eval.max_examples == -1,
            "eval.max_examples",
            "must be > 0, or -1 (= all)",
        ),
        (
            c.distribution.model_parallel >= 1,
            "distribution.model_parallel",
            "must be >= 1",
        ),
        (
            bool(str(c.model.preset).strip()),
            "model.preset",
            "is empty; name a preset, hf://org/repo or a directory",
        ),
    ]
    for ok, field, rule in checks:
        if not ok:
            raise ConfigError(f"--config.{field}={_value(c, field)!r} {rule}")
    experts = [t for t in lora_targets(c.lora.targets) if t.startswith(EXPERT_PREFIX)]
    if experts and float(c.lora.dropout) > 0:
        raise ConfigError(
            f"--config.lora.dropout={c.lora.dropout!r} with expert targets "
            f"({', '.join(experts)}): PEFT's LoRA on expert banks has no dropout; "
            "set --config.lora.dropout=0"
        )
    towers = lora_tower_targets(c.lora.targets)
    if towers and float(c.lora.dropout) > 0:
        raise ConfigError(
            f"--config.lora.dropout={c.lora.dropout!r} with vision tower targets "
            f"({', '.join(TOWER_PREFIX + t for t in towers)}): the tower's LoRA "
            "(Keras' enable_lora) has no dropout; set --config.lora.dropout=0"
        )
    lora_layers(c.lora.layers)


def _shown(choice: str) -> str:
    return choice or '""'


def _value(c: ml_collections.ConfigDict, dotted: str):
    for part in dotted.split("."):
        c = c[part]
    return c
