"""Every config field the package reads exists in `config_lib.get_config`.

The config is locked after parsing, so a field that code reads but
`get_config` lacks cannot be set from the command line, and a fallback such
as `getattr(cfg, "field", default)` hides its default from everyone. The
checker below parses the source (no import, no run) for reads of config
fields and looks each one up in the config of every size and method.
"""

from __future__ import annotations

import ast
import dataclasses
import pathlib
from collections.abc import Sequence

import ml_collections
import pytest

from gemma4_keras import config_lib
from gemma4_keras.data import DataSettings

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "gemma4_keras"
CONFIGS = ROOT / "configs"

# How the package names a run config and its slices: name -> path in the config.
SLICES: dict[str, tuple[str, ...]] = {
    "config": (),
    "data_cfg": ("data",),
    "settings": ("data",),  # a DataSettings: the fields of config.data
    "train_cfg": ("train",),
    "model_cfg": ("model",),
    "lora_cfg": ("lora",),
    "quant_cfg": ("quant",),
    "dist_cfg": ("distribution",),
    "eval_cfg": ("eval",),
    "checkpoint_cfg": ("checkpoint",),
}
# config_lib builds and validates the config as `c`.
FILE_SLICES = {"config_lib.py": {"c": ()}}
CONFIGDICT_METHODS = {
    n for n in dir(ml_collections.ConfigDict) if not n.startswith("_")
}


@dataclasses.dataclass(frozen=True)
class Read:
    """One read of a config field: where, and the dotted path read."""

    where: str  # file:line
    path: tuple[str, ...]
    # getattr(c, "x", default), hasattr(c, "x") or c.get("x"): code that would
    # still run without the field, hiding a default from get_config.
    fallback: bool = False


def _chain(node: ast.AST) -> tuple[str, list[str]] | None:
    """(root name, attribute names) of `a.b["c"].d`, or None."""
    names = []
    while True:
        if isinstance(node, ast.Attribute):
            names.append(node.attr)
            node = node.value
        elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
            if not isinstance(node.slice.value, str):
                return None
            names.append(node.slice.value)
            node = node.value
        elif isinstance(node, ast.Name):
            return node.id, names[::-1]
        else:
            return None


def _literal(node: ast.AST) -> str | None:
    ok = isinstance(node, ast.Constant) and isinstance(node.value, str)
    return node.value if ok else None


# Calls that return a run config or its data settings: the name keeps its slice.
BUILDERS = {
    ("config_lib", "get_config"),
    ("config_lib", "data_settings"),
    ("DataSettings", "of"),
    ("dataclasses", "replace"),
    ("ml_collections", "ConfigDict"),
}


def _builds_config(value: ast.AST) -> bool:
    if isinstance(value, ast.Call):
        chain = _chain(value.func)
        return chain is not None and (chain[0], *chain[1]) in BUILDERS
    return _chain(value) == ("_CONFIG", ["value"])  # cli.py


def _is_config_type(annotation: ast.AST) -> bool:
    return ast.unparse(annotation).split(".")[-1] in ("ConfigDict", "DataSettings")


class _Reads(ast.NodeVisitor):
    """Collects config reads; names bound to a slice (`t = config.train`) follow.

    `passed` ({function name: {argument position or name: slice}}) binds the
    parameters of functions that callers hand a slice; the visit records the
    calls it sees in `self.passed` for the next pass.
    """

    def __init__(self, where: str, roots: dict, stores: bool, passed: dict):
        self.where, self.stores = where, stores
        self.scopes = [dict(roots)]
        self.reads: list[Read] = []
        self.bound, self.passed = passed, {}

    def _path(self, node: ast.AST) -> tuple[str, ...] | None:
        chain = _chain(node)
        if chain is None or chain[0] not in self.scopes[-1]:
            return None
        base = self.scopes[-1][chain[0]]
        return None if base is None else base + tuple(chain[1])

    def _add(self, node: ast.AST, path: tuple[str, ...], fallback=False) -> None:
        self.reads.append(Read(f"{self.where}:{node.lineno}", path, fallback))

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        scope = dict(self.scopes[-1])
        for arg in node.args.args + node.args.kwonlyargs:
            typed = arg.annotation is not None
            if arg.arg in scope and typed and not _is_config_type(arg.annotation):
                scope[arg.arg] = None  # `config: dict` is some other config
        names = [a.arg for a in node.args.posonlyargs + node.args.args]
        names = names[1:] if names[:1] in (["self"], ["cls"]) else names
        for key, path in self.bound.get(node.name, {}).items():
            name = names[key] if isinstance(key, int) and key < len(names) else key
            if isinstance(name, str) and path is not None and name not in scope:
                scope[name] = path
        self.scopes.append(scope)
        self.generic_visit(node)
        self.scopes.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Assign(self, node: ast.Assign) -> None:
        self.generic_visit(node)
        for target in node.targets:
            pairs = [(target, node.value)]
            if isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple):
                pairs = list(zip(target.elts, node.value.elts))
            for name, value in pairs:
                if isinstance(name, ast.Name) and not _builds_config(value):
                    self._bind(name.id, value)

    def _bind(self, name: str, value: ast.AST) -> None:
        # `t = config.train` makes `t` a slice; any other value unmakes one
        # (`config = super().get_config()` is a Keras layer's config).
        path = self._path(value)
        if name in self.scopes[-1] or path is not None:
            self.scopes[-1][name] = path

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if isinstance(node.ctx, ast.Load) or self.stores:
            path = self._path(node)
            if path:
                self._add(node, path)
        self.generic_visit(node)

    visit_Subscript = visit_Attribute

    def visit_Call(self, node: ast.Call) -> None:
        self.generic_visit(node)
        self._record_passed(node)
        func, args = node.func, node.args
        key = _literal(args[1]) if len(args) > 1 else None
        if isinstance(func, ast.Name) and func.id in ("getattr", "hasattr") and key:
            path = self._path(args[0])
            if path is not None:
                fallback = func.id == "hasattr" or len(args) > 2
                self._add(node, (*path, key), fallback)
        key = _literal(args[0]) if args else None
        if isinstance(func, ast.Attribute) and func.attr in ("get", "pop") and key:
            path = self._path(func.value)
            if path is not None:
                self._add(node, (*path, key), fallback=True)

    def _record_passed(self, node: ast.Call) -> None:
        """Notes `f(config.train)`: `f`'s parameter there is the train slice."""
        callee = _chain(node.func)
        if callee is None:
            return
        name = (callee[0], *callee[1])[-1]
        args = [*enumerate(node.args), *((k.arg, k.value) for k in node.keywords)]
        for key, arg in args:
            path = self._path(arg)
            if path is not None and len(path) <= 1:  # the config or a section
                calls = self.passed.setdefault(name, {})
                calls[key] = path if calls.get(key, path) == path else None


def config_reads(files: dict[str, str], stores: Sequence[str] = ()) -> list[Read]:
    """Every config field read in `files` ({file: source}); in `stores`, set too.

    Passes repeat until the functions that receive a slice from a caller
    (`LoraSpec.from_config(config.lora)`) stop changing, so their reads count.
    """
    trees = {where: ast.parse(source) for where, source in files.items()}
    passed: dict = {}
    for _ in range(5):
        reads, found = [], {}
        for where, tree in trees.items():
            roots = {**SLICES, **FILE_SLICES.get(where.rsplit("/", 1)[-1], {})}
            visitor = _Reads(where, roots, where in stores, passed)
            visitor.visit(tree)
            reads += visitor.reads
            for callee, keys in visitor.passed.items():
                calls = found.setdefault(callee, {})
                for key, path in keys.items():
                    calls[key] = path if calls.get(key, path) == path else None
        if found == passed:
            break
        passed = found
    return reads


def unknown_field(config: ml_collections.ConfigDict, path: tuple[str, ...]):
    """The dotted prefix of `path` that `config` lacks, or None.

    A ConfigDict method (`config.to_dict()`) or an attribute of a field's
    value (`config.model.preset.strip`) ends the lookup: it is no field.
    """
    node = config
    for i, name in enumerate(path):
        if not isinstance(node, ml_collections.ConfigDict):
            return None
        if name in node:
            node = node[name]
        elif name in CONFIGDICT_METHODS:
            return None
        else:
            return ".".join(path[: i + 1])
    return None


def problems(config: ml_collections.ConfigDict, reads: list[Read]) -> list[str]:
    """'file:line: config.<field>' for each read of a field `config` lacks."""
    found = {(r.where, unknown_field(config, r.path)) for r in reads}
    found = sorted((w.split(":")[0], int(w.split(":")[1]), f) for w, f in found if f)
    return [f"{file}:{line}: config.{field}" for file, line, field in found]


def _source_reads() -> list[Read]:
    paths = sorted(PACKAGE.rglob("*.py")) + sorted(CONFIGS.glob("*.py"))
    files = {str(p.relative_to(ROOT)): p.read_text(encoding="utf-8") for p in paths}
    # A config file's assignments must name fields too: on the unlocked
    # config a misspelt one would silently add a field nothing reads.
    return config_reads(files, stores=[w for w in files if w.startswith("configs/")])


READS = _source_reads()
CONFIGS_UNDER_TEST = [
    (size, method, arg)
    for size in config_lib.SIZES
    for method in config_lib.METHODS
    for arg in (None, "runlocal")
]


def test_the_package_reads_config_fields():
    # A checker that finds nothing would pass for the wrong reason.
    paths = {".".join(r.path) for r in READS}
    assert {"data.eval_path", "data.tfds_data_dir", "train.grad_accum"} <= paths
    assert "data.template" in paths and "eval.max_examples" in paths


@pytest.mark.parametrize("size, method, arg", CONFIGS_UNDER_TEST)
def test_every_field_the_package_reads_is_in_get_config(size, method, arg):
    config = config_lib.get_config(size, method, arg)
    assert problems(config, READS) == []


def test_no_config_read_falls_back_to_a_default_of_its_own():
    # Every field is in get_config, so code reads it plainly: a fallback would
    # hide a second default (and a field get_config lacks) from the CLI.
    assert [f"{r.where}: {'.'.join(r.path)}" for r in READS if r.fallback] == []


def test_the_checker_finds_reads_of_unknown_fields():
    source = """
def f(config, data_cfg, settings):
    t = config.train
    getattr(t, "epochs"), config.data.eval_path, config.lora.targets.split(",")
    config.data.to_dict(), config.get("size"), settings.tfds_data_dir
    return (
        config.data.eval_pth,
        data_cfg.tfds_dir,
        t.epoch_count,
        getattr(config.train, "warmup", 0),
        config.eval.get("max_exampels"),
        config["quant"]["modes"],
        settings.holdout,
    )


def g(config: dict, t):
    return config["text_config"], t.whatever  # no run config here


def h(config):
    return Spec.from_config(config.lora), Spec.from_config(lora_c=config.lora)


class Spec:
    @classmethod
    def from_config(cls, lora_c):
        return lora_c.rank, lora_c.rnak
"""
    reads = config_reads({"x.py": source})
    lines = source.splitlines()

    def at(text: str, field: str) -> str:
        line = next(i for i, ln in enumerate(lines, 1) if text in ln)
        return f"x.py:{line}: config.{field}"

    assert problems(config_lib.get_config("e4b", "qlora"), reads) == [
        at("eval_pth", "data.eval_pth"),
        at("tfds_dir,", "data.tfds_dir"),
        at("epoch_count", "train.epoch_count"),
        at('"warmup"', "train.warmup"),
        at("max_exampels", "eval.max_exampels"),
        at('"modes"', "quant.modes"),
        at("holdout", "data.holdout"),
        at("lora_c.rnak", "lora.rnak"),
    ]
    fallbacks = sorted(".".join(r.path) for r in reads if r.fallback)
    assert fallbacks == ["eval.max_exampels", "size", "train.warmup"]


def test_the_checker_finds_a_config_file_setting_an_unknown_field():
    source = """
def get_config(arg=None):
    config = config_lib.get_config("tiny", "lora", arg)
    config.train.epochs = 2
    config.train.epocs = 2
    return config
"""
    reads = config_reads({"configs/x.py": source}, stores=["configs/x.py"])
    assert problems(config_lib.get_config("tiny", "lora"), reads) == [
        "configs/x.py:5: config.train.epocs"
    ]


@pytest.mark.parametrize("size, method, arg", CONFIGS_UNDER_TEST)
def test_data_settings_has_exactly_the_fields_of_config_data(size, method, arg):
    data = config_lib.get_config(size, method, arg).data
    names = [f.name for f in dataclasses.fields(DataSettings)]
    assert sorted(names) == sorted(data.keys())
    settings = config_lib.data_settings(data)
    assert {n: getattr(settings, n) for n in names if n not in ("path", "fields")} == {
        n: data[n] for n in names if n not in ("path", "fields")
    }
