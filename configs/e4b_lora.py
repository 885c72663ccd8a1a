"""Gemma 4 E4B fine-tuned with LORA.

Run (full size, needs the model download credentials, see README):

    gemma4-keras train --config=configs/e4b_lora.py --workdir=runs/e4b_lora \
        --config.data.path=train.jsonl

Smoke test on the tiny model (CPU, seconds):

    gemma4-keras train --config=configs/e4b_lora.py:runlocal --workdir=/tmp/e4b_lora
"""

from gemma4_keras import config_lib


def get_config(arg=None):
    return config_lib.get_config("e4b", "lora", arg)
