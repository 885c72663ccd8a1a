"""gemma4_keras: fine-tune Gemma 4 with LoRA and QLoRA in Keras 3 / JAX.

Importing the package selects the JAX backend for Keras (it must happen
before `import keras`) and has no other side effect: the names below load
their modules on first use.

One run, as `gemma4-keras train` does it (resumes when rerun)::

    import gemma4_keras as g4

    config = g4.get_config("e4b", "qlora", overrides={"data.path": "train.jsonl"})
    g4.check(config)                         # data quality report (file:line errors)
    print(g4.format_plan(g4.plan(config, tflops=65)))
    g4.run(config, "runs/e4b")               # train, eval report, adapter/
    g4.generate(config, "Hi!", adapter="runs/e4b/adapter")
    g4.export(config, "runs/e4b", "gguf", "out/gguf")

Tool calls (records with OpenAI-style `tools`, `tool_calls`, `tool` messages
train as Gemma serves them; the eval report scores the calls)::

    def weather(city: str) -> dict:
        "Current weather in a city."
        return {"temp": -2}

    g4.chat(config, "Weather in Oslo?", tools=[weather], adapter="runs/e4b/adapter")

Bring your own `fit`::

    model, tokenizer, preset = g4.load_training_model(config)
    data = g4.training_data(config, tokenizer, preset)
    g4.compile_model(model, config, data)
    model.fit(data.batches, steps_per_epoch=data.steps_per_epoch, epochs=data.epochs,
              shuffle=False)  # the batches are shuffled by train.seed
    g4.generate(config, "Hi!", adapter=model)
"""

import importlib
import sys

from gemma4_keras._backend import BackendError, ensure_jax_backend

ensure_jax_backend()

__version__ = "0.1.0"

_API = "gemma4_keras.training.api"  # where every public function below lives

# Public names, by section -> the module that defines them (resolved lazily).
_PUBLIC: dict[str, str] = {
    # Config: a locked, validated run config (`configs/<size>_<method>.py`).
    "get_config": _API,
    # Data: what the CLI's `data check | stats | render` print.
    "check": _API,
    "stats": _API,
    "render": _API,
    # Plan: memory and time of a run, from the preset's config.json alone.
    "plan": _API,
    "format_plan": _API,
    # Train: one resumable run (checkpoints, eval report, adapter).
    "run": _API,
    # Bring your own fit: the model, the data pipeline, the optimiser.
    "load_training_model": _API,
    "training_data": _API,
    "compile_model": _API,
    "TrainingData": _API,
    # Evaluate, generate, export a run.
    "evaluate": _API,
    "generate": _API,
    "export": _API,
    # Agents: one model turn with Python functions as tools.
    "chat": _API,
}

__all__ = ["BackendError", "__version__", *_PUBLIC]


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'gemma4_keras' has no attribute {name!r}")
    # Resolved on first use: `import gemma4_keras` loads neither keras nor jax.
    if _PUBLIC[name] not in sys.modules:
        # TensorFlow (KerasHub's tokenizers) is shown no GPU, so it never takes
        # the accelerator memory JAX trains in; start-up chatter is dropped.
        importlib.import_module("gemma4_keras._quiet").start_libraries()
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
