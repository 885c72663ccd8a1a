"""Import-time behaviour: the JAX backend is selected, nothing heavy loads."""

import ast
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def python(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    full_env.update(env)
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=300,
    )


def test_import_selects_jax_and_loads_no_framework():
    r = python(
        "import sys, gemma4_keras; print('keras' in sys.modules, 'jax' in sys.modules);"
        "import keras; print(keras.config.backend())"
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "False", "jax"]


@pytest.mark.parametrize(
    "code, env",
    [
        ("import keras; import gemma4_keras", {"KERAS_BACKEND": "tensorflow"}),
        ("import gemma4_keras", {"KERAS_BACKEND": "torch"}),
    ],
)
def test_other_backend_is_refused_with_a_clear_message(code, env):
    r = python(code, **env)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("gemma4_keras._backend.BackendError:")
    assert "needs 'jax'" in last


def test_notebook_only_calls_the_public_api():
    nb = json.loads((ROOT / "colab" / "quickstart.ipynb").read_text())
    code = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    assert code, "the notebook has no code"
    for cell in code:
        body = "\n".join(
            ln for ln in cell.splitlines() if not ln.lstrip().startswith("!")
        )
        tree = ast.parse(body)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith("gemma4_keras._"), node.module


def test_one_version_number():
    # pyproject.toml reads it from gemma4_keras.__version__; the installed
    # distribution must agree, and no other file may state its own.
    import importlib.metadata

    import gemma4_keras

    assert importlib.metadata.version("gemma4-keras") == gemma4_keras.__version__
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject
    assert "\nversion =" not in pyproject.split("[tool.setuptools.dynamic]")[0]
