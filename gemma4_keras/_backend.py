"""Selects the JAX backend for Keras before Keras is imported.

Keras reads `KERAS_BACKEND` once, at its first import. This package runs on
JAX only, so it sets the variable when it is unset and refuses to go on when
Keras was already imported (or configured) with another backend.
"""

import os
import sys

REQUIRED_BACKEND = "jax"


class BackendError(RuntimeError):
    """Keras is bound to a backend other than JAX."""


def ensure_jax_backend() -> None:
    """Sets `KERAS_BACKEND=jax`, or raises if Keras already uses another one."""
    requested = os.environ.get("KERAS_BACKEND")
    if "keras" in sys.modules:
        import keras  # after KERAS_BACKEND is set above

        active = keras.config.backend()
        if active != REQUIRED_BACKEND:
            raise BackendError(
                f"Keras was imported with the {active!r} backend before "
                "gemma4_keras; this package needs 'jax'. Import gemma4_keras "
                "first, or set KERAS_BACKEND=jax before importing keras."
            )
        return
    if requested and requested != REQUIRED_BACKEND:
        raise BackendError(
            f"KERAS_BACKEND={requested!r} is set; gemma4_keras needs 'jax'. "
            "Unset it or set KERAS_BACKEND=jax."
        )
    os.environ["KERAS_BACKEND"] = REQUIRED_BACKEND
