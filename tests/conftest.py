"""Shared pytest setup: the package picks the JAX backend before keras loads."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("KAGGLE_OFFLINE", "1")

import gemma4_keras  # noqa: E402,F401  (sets KERAS_BACKEND=jax first)
