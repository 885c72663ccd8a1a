"""The embedded default: LoRA on a tiny Gemma 4-architecture model, on a CPU.

Trains the tiny model the package writes itself (Hugging Face format, loaded
through KerasHub) on the sentiment sample that ships with the package, then
evaluates base vs fine-tuned on the 10% held out:

    gemma4-keras train --config=configs/tiny.py --workdir=runs/tiny

Its settings are `config_lib.EMBEDDED_DEFAULT` (shared with the quickstart
notebook: `gemma4_keras.get_config("tiny", "lora", "embedded")`).
Rerunning the command on the same workdir resumes, or reports a finished run.
"""

from gemma4_keras import config_lib


def get_config(arg=None):
    # :runlocal shrinks everything itself; no arg is the embedded default.
    return config_lib.get_config("tiny", "lora", arg or "embedded")
