"""The package's layering: imports point down, never up or in a circle.

Layers, lowest first (a module may import its own layer and those below):

    base      gemma4_keras (package root), _backend, _quiet, atomic, config_lib, disk,
              host_memory, settings, outputs, workdir_lock, resources (data files)
    data      data/          dataset reading, chat rendering, tokenizing, packing
    schema    model/spec.py, schema.py, hf_config.py, hub.py, safetensors_io.py: the
              architecture's
              facts, its tensor table and the readers of its configs (HF's,
              KerasHub's), which the checkpoint writers below the model use
    testing   testing/       checkpoints the package writes itself (the tiny preset)
    model     model/         KerasHub bridge, layers, LoRA, NF4, loss, presets, plan
    exporters exporters/     PEFT, Hugging Face, GGUF and KerasHub formats
    eval      eval/          generation, metrics, evaluation, report, review page
    training  training/      the training run and the API (`training/api.py`)
    cli       cli            the command line

A function-level import needs a reason on its line (an optional or heavy
dependency, or a named cycle); `test_function_level_imports_say_why` checks.
"""

import ast
import pathlib
import re

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "gemma4_keras"
LAYERS = [
    "base",
    "data",
    "schema",
    "testing",
    "model",
    "exporters",
    "eval",
    "training",
    "cli",
]
BASE = (
    "_backend",
    "_quiet",
    "atomic",
    "config_lib",
    "disk",
    "host_memory",
    "settings",
    "outputs",
    "workdir_lock",
    "resources",
)


SCHEMA = tuple(
    f"gemma4_keras.model.{m}"
    for m in ("spec", "schema", "hf_config", "hub", "safetensors_io")
)


def layer_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in BASE:
        return "base"
    if module in SCHEMA:
        return "schema"
    return parts[1]


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _real_module(name: str) -> str:
    """`gemma4_keras.model.hub.PresetError` -> `gemma4_keras.model.hub`."""
    parts = name.split(".")
    while parts:
        p = PACKAGE.parent.joinpath(*parts)
        if p.with_suffix(".py").exists() or (p / "__init__.py").exists():
            return ".".join(parts)
        parts.pop()
    return name


def _top_level(tree: ast.Module) -> set[int]:
    """ids of module-level nodes (inside a module-level if/try/with too)."""
    top = set()
    for node in tree.body:
        if isinstance(node, ast.If | ast.Try | ast.With):
            top |= {id(n) for n in ast.walk(node)}
        top.add(id(node))
    return top


def imports(path: pathlib.Path, source: str | None = None):
    """(imported gemma4_keras module, line, at module level?) for each import.

    `from gemma4_keras.data import chat` is an edge to `gemma4_keras.data.chat`
    (the submodule), `from gemma4_keras.data import DataError` one to the
    package `gemma4_keras.data`.
    """
    tree = ast.parse(source if source is not None else path.read_text())
    top = _top_level(tree)
    here = module_name(path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                base = here.rsplit(".", node.level)[0]
                mod = f"{base}.{mod}" if mod else base
            targets = [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        for name in sorted({_real_module(t) for t in targets}):
            if name.startswith("gemma4_keras"):
                yield name, node.lineno, id(node) in top


def upward_imports(path: pathlib.Path, source: str | None = None) -> list[str]:
    here = module_name(path)
    mine = LAYERS.index(layer_of(here))
    return [
        f"{path.name}:{line} {here} -> {target}"
        for target, line, _ in imports(path, source)
        if LAYERS.index(layer_of(target)) > mine
    ]


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer():
    for path in MODULES:
        assert layer_of(module_name(path)) in LAYERS, path


@pytest.mark.parametrize("path", MODULES, ids=module_name)
def test_no_upward_imports(path):
    assert upward_imports(path) == []


def test_an_upward_import_is_detected():
    path = PACKAGE / "model" / "hub.py"
    assert upward_imports(path, "from gemma4_keras.training import train\n")
    assert upward_imports(path, "def f():\n    from gemma4_keras.eval import metrics\n")
    assert not upward_imports(path, "from gemma4_keras.data import chat\n")


def _graph() -> dict[str, set[str]]:
    """Module -> the modules it imports, at module level or inside a function:
    a function-level import hides a cycle from Python, not from the design."""
    return {
        module_name(p): {n for n, _, _ in imports(p)} - {module_name(p)}
        for p in MODULES
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` (module -> modules it imports), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles():
    assert find_cycle(_graph()) is None


def test_a_cycle_is_detected():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def function_level_imports_without_reason(path: pathlib.Path) -> list[str]:
    lines = path.read_text().splitlines()
    tree = ast.parse("\n".join(lines))
    top = _top_level(tree)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom) and id(node) not in top:
            text = " ".join(lines[node.lineno - 1 : node.end_lineno])
            if not _states_a_reason(text):
                out.append(f"{module_name(path)}:{node.lineno}: {text.strip()}")
    return out


# Comments that pass the "say why" rule without saying why.
_NOT_A_REASON = ("see module doc", "lazy", "lazily", "deferred", "late import")


def _reason(comment: str) -> str:
    """The reason in an import line's comment, without `noqa` / `type:` tags."""
    parts = [p.strip() for p in comment.split("#")[1:]]
    tags = re.compile(
        r"^(noqa(:\s*[A-Z]+[0-9]+(,\s*[A-Z]+[0-9]+)*)?|type:\s*\S+|pragma:.*)"
    )
    return " ".join(tags.sub("", p).strip() for p in parts)


def _states_a_reason(comment_text: str) -> bool:
    reason = _reason(comment_text).lower().strip(" .:;")
    for filler in _NOT_A_REASON:
        reason = reason.replace(filler, "")
    return len(reason.strip(" .:;,()-").split()) >= 2


def test_function_level_imports_say_why():
    missing = [m for p in MODULES for m in function_level_imports_without_reason(p)]
    assert missing == [], "\n".join(missing)


def test_a_reason_is_required_not_a_token():
    assert not _states_a_reason("    import x  # lazy: see module doc")
    assert not _states_a_reason("    import x  # noqa: F401")
    assert not _states_a_reason("    import x")
    assert _states_a_reason("    import torch  # optional: only the export needs it")
    assert _states_a_reason("    import x  # noqa: E402  heavy (TensorFlow)")


def test_a_function_level_cycle_is_a_cycle(tmp_path):
    a = "def f():\n    from gemma4_keras.data import chat  # optional here\n"
    names = [n for n, _, top in imports(PACKAGE / "data" / "records.py", a)]
    assert names == ["gemma4_keras.data.chat"]


_PATH_NAMED = re.compile(r"(?<![\w./-])((?:[a-z_]+/)+[a-z_0-9]+\.py)\b")


def test_every_module_path_the_package_names_exists():
    # A docstring or comment naming `export/hf.py` after the module moved
    # sends the reader nowhere.
    root = PACKAGE.parent
    stale = [
        f"{module_name(p)}: {m}"
        for p in MODULES
        for m in _PATH_NAMED.findall(p.read_text())
        if not (PACKAGE / m).exists() and not (root / m).exists()
    ]
    assert stale == [], "\n".join(stale)
