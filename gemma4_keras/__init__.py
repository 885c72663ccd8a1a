"""gemma4_keras: fine-tune Gemma 4 with LoRA and QLoRA in Keras 3 / JAX.

Importing the package selects the JAX backend for Keras (it must happen
before `import keras`) and has no other side effect.
"""

from gemma4_keras._backend import BackendError, ensure_jax_backend

ensure_jax_backend()

__version__ = "0.1.0"

__all__ = ["BackendError", "__version__"]
