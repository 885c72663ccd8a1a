"""The embedded default: LoRA on a tiny Gemma 4-architecture model, on a CPU.

Trains the tiny model the package writes itself (Hugging Face format, loaded
through KerasHub) on the sentiment sample that ships with the package, then
evaluates base vs fine-tuned on the 10% held out:

    gemma4-keras train --config=configs/tiny.py --workdir=runs/tiny

Rerunning the command on the same workdir resumes, or reports a finished run.
"""

from gemma4_keras import config_lib


def get_config(arg=None):
    config = config_lib.get_config("tiny", "lora", arg)
    if arg:  # :runlocal already shrank everything
        return config
    config.lora.rank = 8
    config.lora.alpha = 16.0
    config.lora.dropout = 0.0
    config.data.max_length = 96
    config.train.epochs = 2
    config.train.batch_size = 16
    config.train.grad_accum = 1
    config.train.learning_rate = 3e-3
    config.train.log_every = 10
    config.checkpoint.every_steps = 50
    config.eval.max_examples = 120
    config.eval.max_new_tokens = 4
    return config
