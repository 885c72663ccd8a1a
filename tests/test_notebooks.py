"""Every notebook in colab/ runs top to bottom in smoke mode, and calls only the
public API.

Smoke mode: a cell `SMOKE = True` is injected after the notebook's parameters
cell (tagged `parameters`), so the notebook itself swaps in the tiny model and
the packaged data, shrinks the run and skips installs and logins. The kernel
is this interpreter's (ipykernel), importing this checkout. A notebook fails
on any cell error and on any output that shows a Python traceback, e.g. one a
library logged and swallowed.
"""

from __future__ import annotations

import ast
import os
import pathlib
import re
import sys
import time

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "colab").glob("*.ipynb"))
TRACEBACK = re.compile(r"Traceback \(most recent call last\)")
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # IPython colours its tracebacks


class NotebookError(AssertionError):
    """A notebook failed: a cell raised, or an output shows a traceback."""


def _parameters_index(nb) -> int:
    tagged = [
        i
        for i, c in enumerate(nb.cells)
        if "parameters" in c.get("metadata", {}).get("tags", [])
    ]
    if len(tagged) != 1:
        raise NotebookError(
            f"expected exactly one cell tagged 'parameters', found {len(tagged)}"
        )
    return tagged[0]


def smoke(nb):
    """`nb` with `SMOKE = True` injected after its parameters cell."""
    cell = nbformat.v4.new_code_cell(
        "SMOKE = True  # injected by tests/test_notebooks.py"
    )
    cell.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(_parameters_index(nb) + 1, cell)
    return nb


def _output_text(output) -> str:
    if output.get("output_type") == "stream":
        return output.get("text", "")
    if output.get("output_type") == "error":
        return "\n".join(output.get("traceback", []))
    data = output.get("data", {})
    return "\n".join(str(data.get(k, "")) for k in ("text/plain", "text/markdown"))


def execute(nb, cwd: pathlib.Path, timeout: int = 600):
    """Runs `nb` in a fresh kernel in `cwd`; raises NotebookError on failure.

    The kernel imports this checkout first (PYTHONPATH), whatever is
    installed.
    """
    env_path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = env_path.rstrip(os.pathsep)
    try:
        client = nbclient.NotebookClient(
            nb,
            timeout=timeout,
            kernel_name="python3",
            resources={"metadata": {"path": str(cwd)}},
        )
        client.execute()
    except nbclient.exceptions.CellExecutionError as e:
        lines = ANSI.sub("", str(e)).strip().splitlines()
        raise NotebookError("a cell raised:\n" + "\n".join(lines[-15:])) from None
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved
    for i, cell in enumerate(nb.cells):
        for output in cell.get("outputs", []):
            text = _output_text(output)
            if TRACEBACK.search(text):
                raise NotebookError(
                    f"cell {i} printed a traceback:\n{text[-2000:]}\n"
                    f"--- cell source:\n{cell.source}"
                )
    return nb


def test_kernel_is_this_interpreter():
    from jupyter_client.kernelspec import KernelSpecManager

    spec = KernelSpecManager().get_kernel_spec("python3")
    argv0 = spec.argv[0]
    assert argv0 in ("python", sys.executable) or pathlib.Path(argv0).resolve() == (
        pathlib.Path(sys.executable).resolve()
    ), spec.argv


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stripped_and_parameterised(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, (
                f"{path.name} cell {i}: outputs not stripped"
            )
    params = nb.cells[_parameters_index(nb)].source
    assert re.search(r"^SMOKE = False\b", params, re.M), params
    assert re.search(r'^REPO_URL = "https://', params, re.M), params
    install = "\n".join(c.source for c in nb.cells if '"pip", "install"' in c.source)
    assert "git+{REPO_URL}" in install, f"{path.name}: install from REPO_URL"
    assert "if not SMOKE" in install, f"{path.name}: smoke mode must not install"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_calls_only_the_public_api(path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        body = "\n".join(
            ln
            for ln in cell.source.splitlines()
            if not ln.lstrip().startswith(("!", "%"))
        )
        for node in ast.walk(ast.parse(body)):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for name in names:
                assert not name.startswith("gemma4_keras."), (
                    f"{path.name}: imports {name}; use `import gemma4_keras as g4`"
                )


def test_notebooks_are_found():
    names = {p.name for p in NOTEBOOKS}
    assert {
        "quickstart.ipynb",
        "e4b_qlora_t4.ipynb",
        "e2b_lora.ipynb",
        "tpu.ipynb",
        "e4b_vision_qlora_t4.ipynb",
    } <= names


# Each takes 40-90 s on 2 CPU cores (kernel start, imports, a two-step run of
# the tiny model, evaluation, exports; the vision notebook 130-190 s: 24
# steps over images of 256 soft tokens): marked slow.
@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_in_smoke_mode(path, tmp_path):
    nb = smoke(nbformat.read(path, as_version=4))
    start = time.monotonic()
    execute(nb, tmp_path)
    print(f"{path.name}: {time.monotonic() - start:.0f} s")


def _generated(cells: list[str]):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("SMOKE = False")] + [
        nbformat.v4.new_code_cell(c) for c in cells
    ]
    nb.cells[0].metadata["tags"] = ["parameters"]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3"}
    return nb


def test_a_broken_cell_fails_the_notebook(tmp_path):
    nb = smoke(_generated(["assert SMOKE", "x = 1 / 0", "print('never')"]))
    with pytest.raises(NotebookError, match="ZeroDivisionError"):
        execute(nb, tmp_path, timeout=60)


def test_a_printed_traceback_fails_the_notebook(tmp_path):
    swallowed = "import traceback\ntry:\n    1 / 0\nexcept ZeroDivisionError:\n    traceback.print_exc()"
    nb = smoke(_generated([swallowed]))
    with pytest.raises(NotebookError, match="cell 2 printed a traceback"):
        execute(nb, tmp_path, timeout=60)


def test_smoke_is_injected_after_the_parameters_cell(tmp_path):
    nb = smoke(_generated(["assert SMOKE is True, SMOKE"]))
    execute(nb, tmp_path, timeout=60)
    with pytest.raises(NotebookError, match="exactly one cell tagged"):
        smoke(nbformat.v4.new_notebook())


def test_readme_badges_and_notebooks_name_one_repository():
    urls = set()
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        params = nb.cells[_parameters_index(nb)].source
        urls |= set(
            re.findall(r'^REPO_URL = "https://github.com/([^"]+)"', params, re.M)
        )
    assert len(urls) == 1, f"the notebooks name different repositories: {urls}"
    (repo,) = urls
    readme = (ROOT / "README.md").read_text()
    for path in NOTEBOOKS:
        link = f"https://colab.research.google.com/github/{repo}/blob/main/colab/{path.name})"
        assert link in readme, f"README has no Open-in-Colab badge for {path.name}"


# ----------------------------------------------------------------------------
# Cells that decide what a user's runtime is asked for, run on their own.


def _cell(name: str, marker: str) -> str:
    """The source of the code cell of colab/`name` that contains `marker`."""
    nb = nbformat.read(ROOT / "colab" / name, as_version=4)
    (source,) = [
        c.source for c in nb.cells if c.cell_type == "code" and marker in c.source
    ]
    return source


class _Login:
    """A stand-in hub module that records whether it was asked to log in."""

    def __init__(self):
        self.calls = 0

    def login(self):
        self.calls += 1


@pytest.mark.parametrize(
    "preset, hf_logins, kaggle_logins",
    [("hf://google/gemma-4-E4B-it", 1, 0), ("gemma4_instruct_4b", 0, 1)],
)
def test_t4_notebook_logs_in_only_where_the_weights_come_from(
    preset, hf_logins, kaggle_logins, monkeypatch
):
    hf, kaggle = _Login(), _Login()
    monkeypatch.setitem(sys.modules, "huggingface_hub", hf)
    monkeypatch.setitem(sys.modules, "kagglehub", kaggle)
    monkeypatch.setitem(sys.modules, "google", None)  # not on Colab
    for name in ("HF_TOKEN", "KAGGLE_KEY", "KAGGLE_USERNAME"):
        monkeypatch.delenv(name, raising=False)
    source = _cell("e4b_qlora_t4.ipynb", "kagglehub.login()")
    exec(source, {"SMOKE": False, "PRESET": preset})
    assert (hf.calls, kaggle.calls) == (hf_logins, kaggle_logins)


def test_e2b_notebook_stops_before_a_load_the_host_cannot_hold():
    source = _cell("e2b_lora.ipynb", "MemAvailable")

    class Config:
        class model:
            preset = "gemma4_instruct_2b"

    huge = {"params": {"total": 2**50}, "host_ple_table_bytes": 0}
    with pytest.raises(MemoryError, match="hf://google/gemma-4-E2B-it"):
        exec(source, {"config": Config, "plan": huge})
    small = {"params": {"total": 1000}, "host_ple_table_bytes": 0}
    exec(source, {"config": Config, "plan": small})  # fits: no error


def test_tpu_notebook_builds_its_mesh_from_the_devices_it_has():
    # This process has one CPU device: a single-chip runtime needs no mesh
    # (the smoke run checks the 8-device 4 x 2 mesh).
    source = _cell("tpu.ipynb", "model_parallel")
    source = source.replace("print(g4.format_plan", "(g4.format_plan")
    scope = {"SMOKE": True, "DATA_PATH": ""}
    exec(source, scope)
    config = scope["config"]
    assert scope["devices"] == 1 and config.distribution.mode == "auto"
    assert config.train.batch_size == 1
