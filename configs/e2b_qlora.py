"""Gemma 4 E2B fine-tuned with QLORA.

Run (full size, needs the model download credentials, see README):

    gemma4-keras train --config=configs/e2b_qlora.py --workdir=runs/e2b_qlora \
        --config.data.path=train.jsonl

Smoke test on the tiny model (CPU, seconds):

    gemma4-keras train --config=configs/e2b_qlora.py:runlocal --workdir=/tmp/e2b_qlora
"""

from gemma4_keras import config_lib


def get_config(arg=None):
    return config_lib.get_config("e2b", "qlora", arg)
