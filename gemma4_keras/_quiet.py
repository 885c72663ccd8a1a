"""Keeps the start-up chatter of the libraries below us off the terminal.

TensorFlow (which KerasHub imports for its tokenizers), XLA and SentencePiece
log from C++ straight to file descriptor 2, where no Python logging setting
reaches, and TensorFlow 2.21 prints its start-up lines whatever
`TF_CPP_MIN_LOG_LEVEL` says. `filtered_stderr` captures descriptor 2 around
the few calls that print them and writes back every line that is not one of
those known, harmless messages, so real warnings still reach the user.

    with filtered_stderr():
        import keras_hub          # TensorFlow's oneDNN / CUDA-stub lines dropped
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Iterator

# Start-up lines a user can do nothing about (none concerns their data,
# config or results). Each is matched anywhere in one line.
NOISE = re.compile(
    "|".join(
        [
            r"All log messages before absl::InitializeLog\(\) is called",
            r"oneDNN custom operations are on",
            r"Could not find cuda drivers on your machine",
            r"failed call to cuInit",
            r"Unable to register cu(DNN|FFT|BLAS) factory",
            r"TF-TRT Warning: Could not find TensorRT",
            r"This TensorFlow binary is optimized to use available CPU instructions",
            r"rebuild TensorFlow with the appropriate compiler flags",
            r"precompiled_charsmap is empty\. use identity normalization",
        ]
    )
)


def drop_noise(text: str) -> str:
    """`text` without the lines that match `NOISE`.

    >>> drop_noise("I0 port.cc] oneDNN custom operations are on.\\nreal\\n")
    'real\\n'
    """
    return "".join(
        line for line in text.splitlines(keepends=True) if not NOISE.search(line)
    )


@contextlib.contextmanager
def filtered_stderr() -> Iterator[None]:
    """Runs the body with descriptor 2 captured; replays all but `NOISE`."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no descriptor 2 (a daemon): nothing to filter
        yield
        return
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = drop_noise(captured.read().decode("utf-8", "replace"))
            if kept:
                sys.stderr.write(kept)
                sys.stderr.flush()


def start_libraries() -> None:
    """Imports TensorFlow and KerasHub and starts JAX, without their chatter.

    TensorFlow only runs tokenizers here; it is shown no GPU, so it never
    claims the accelerator memory that JAX trains in.
    """
    with filtered_stderr():
        try:
            import tensorflow as tf  # after the environment variables above are set
        except ImportError:  # KerasHub without tensorflow-text
            tf = None
        if tf is not None:
            with contextlib.suppress(RuntimeError):  # devices already in use
                tf.config.set_visible_devices([], "GPU")
        import jax  # after the environment variables above are set
        import keras_hub  # noqa: F401  (its start-up chatter lands in this filter)

        jax.devices()
