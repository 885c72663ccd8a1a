"""The reference implementations the tests compare against, loaded per test.

    bnb = oracles.need("bitsandbytes.functional")   # inside a test or fixture

A missing oracle skips only the tests that use it, with the install command
as the reason. With `--require-oracles` (CI passes it through
`PYTEST_ADDOPTS`) the session stops before collection instead: CI must never
be green because a comparison was silently skipped. The review page's
browser tests (Debian's chromium and chromium-driver) follow the same rule.

Why triton is kept out: with the registry's default (CUDA) torch build,
`import tensorflow` (KerasHub brings it in) followed by `import triton`
(`torch._dynamo` and bitsandbytes import it when present) segfaults the
process. `block_triton()` makes `import triton` raise ImportError, which
torch and bitsandbytes read as "no triton", exactly as on a CPU build; the
tests never run triton kernels (there is no GPU in a test run).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType
from typing import NoReturn

import pytest

# Importable names of the reference implementations (all in the `test` extra).
ORACLES = ("torch", "transformers", "peft", "bitsandbytes", "gguf", "xllamacpp")
INSTALL = 'pip install -e ".[test]"'
# Set from `--require-oracles` by conftest.py (in every xdist worker too): a
# missing oracle, or the browser of the review-page tests, fails instead.
REQUIRED = False


def block_triton() -> None:
    """Makes `import triton` fail cleanly in this process (see module doc)."""
    if "triton" not in sys.modules:
        sys.modules["triton"] = None  # import machinery: raise ImportError


def missing() -> list[str]:
    """The oracles that are not installed, by module name."""
    return [name for name in ORACLES if importlib.util.find_spec(name) is None]


def unavailable(reason: str) -> NoReturn:
    """Skips the test, or fails it under `--require-oracles`."""
    if REQUIRED:
        pytest.fail(f"--require-oracles: {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def need(name: str) -> ModuleType:
    """Imports an oracle module (e.g. "bitsandbytes.functional") or skips."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        unavailable(f"oracle {name} is not importable ({e}); {INSTALL}")
