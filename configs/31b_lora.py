"""Gemma 4 31B fine-tuned with LORA.

Run (full size, needs the model download credentials, see README):

    gemma4-keras train --config=configs/31b_lora.py --workdir=runs/31b_lora \
        --config.data.path=train.jsonl

Smoke test on the tiny model (CPU, seconds):

    gemma4-keras train --config=configs/31b_lora.py:runlocal --workdir=/tmp/31b_lora
"""

from gemma4_keras import config_lib


def get_config(arg=None):
    return config_lib.get_config("31b", "lora", arg)
