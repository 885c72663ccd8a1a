"""The weight schema is the one list of tensors (`model/schema.py`).

A made-up norm added to the schema (and so to the tiny checkpoint, whose
writer is a loop over it) loads, exports and plans with no other edit; and
no module but the schema spells an HF tensor name.
"""

from __future__ import annotations

import ast
import os
import pathlib

import numpy as np
import pytest
from export_fixtures import factor_workdir, merged_tensors, random_factors
from safetensors.numpy import load_file

from gemma4_keras.exporters import commands, gguf, hf, peft
from gemma4_keras.exporters.hf import ExportError
from gemma4_keras.model import hub, plan, schema, stream_load
from gemma4_keras.model.lora import LoraSpec
from gemma4_keras.testing import tiny

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "gemma4_keras"
MADE_UP = schema.Row(
    "post_made_up_norm",
    "layers.{i}.made_up_layernorm.weight",
    "decoder_block_{i}.made_up_norm.scale",  # not in KerasHub: unused here
    "norm",
    ("D",),
    float32=True,
)


@pytest.fixture(scope="module")
def made_up(tmp_path_factory):
    """A tiny checkpoint written, loaded and exported with the made-up row."""
    root = tmp_path_factory.mktemp("made_up")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(schema, "BLOCK", [*schema.BLOCK, MADE_UP])
        config = tiny.tiny_hf_config(ple=True, kv_shared_layers=2)
        base = str(tiny.write_checkpoint(root / "base", config, seed=0))
        model = stream_load.stream_training_model(base, LoraSpec(rank=2))
        spec = LoraSpec(rank=2, alpha=4.0)
        workdir = factor_workdir(str(root), base, spec, random_factors(base, spec))
        q = {"mode": "nf4", "double_quant": True, "block_size": 64}
        listed = plan.training_variables(model.spec, q, 4)
        counts = plan.param_counts(model.spec)
        exports = {}
        for fmt in ("hf", "peft"):
            out = str(root / fmt)
            cfg = commands.config_lib.get_config("tiny", "lora")
            cfg.model.preset = base
            commands.export(cfg, workdir, fmt, out)
            exports[fmt] = out
        # gguf's name map has no row for it: the GGUF formats (gguf-lora
        # writes the base GGUF it applies to) say so, naming the tensor.
        for fmt in ("gguf", "gguf-lora"):
            with pytest.raises(ExportError, match="made_up_layernorm"):
                commands.export(cfg, workdir, fmt, str(root / fmt))
        merged = merged_tensors(model)
    yield {
        "base": base,
        "model": model,
        "listed": listed,
        "counts": counts,
        "exports": exports,
        "merged": merged,
    }


def test_the_tiny_writer_writes_the_row(made_up):
    tensors = load_file(os.path.join(made_up["base"], "model.safetensors"))
    for i in range(tiny.NUM_LAYERS):
        assert tensors[f"model.layers.{i}.made_up_layernorm.weight"].shape == (
            tiny.HIDDEN_SIZE,
        )


def test_it_loads_with_the_checkpoint_values(made_up):
    tensors = load_file(os.path.join(made_up["base"], "model.safetensors"))
    for blk in made_up["model"].blocks:
        var = blk.norms["post_made_up_norm"]
        assert var.dtype == "float32"
        want = tensors[f"model.layers.{blk.bspec.index}.made_up_layernorm.weight"]
        np.testing.assert_array_equal(np.asarray(var.value), want)


def test_it_is_exported(made_up):
    name = "model.layers.3.made_up_layernorm.weight"
    got = load_file(os.path.join(made_up["exports"]["hf"], "model.safetensors"))
    base = load_file(os.path.join(made_up["base"], "model.safetensors"))
    np.testing.assert_array_equal(got[name], base[name])
    # The Keras model's tensors, read back by the schema, carry it too.
    np.testing.assert_array_equal(made_up["merged"][name], base[name])
    spec, factors = peft.read_adapter(made_up["exports"]["peft"])
    assert spec.rank == 2 and factors


def test_it_is_planned(made_up):
    spec = made_up["model"].spec
    d, n = spec.hidden_dim, spec.num_layers
    listed = {p: (s, i) for p, s, i in made_up["listed"]}
    for i in range(n):
        assert listed[f"block_{i}/post_made_up_norm"] == ((d,), 4)
    # Plan's counts move by exactly the new row.
    assert made_up["counts"]["norms"] == plan.param_counts(spec)["norms"] + n * d
    built = {v.path for v in made_up["model"].non_trainable_variables}
    assert any(p.endswith("post_made_up_norm") for p in built)


# ----------------------------------------------------------------------------
# One module spells the HF names.


def _string_literals(path: pathlib.Path) -> set[str]:
    """String constants of a module (f-string parts too), docstrings left out."""
    tree = ast.parse(path.read_text())
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(
            node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef
        ):
            body = node.body
            if body and isinstance(body[0], ast.Expr):
                docstrings.add(id(body[0].value))
    return {
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in docstrings
    }


def _spells(literal: str, suffix: str) -> bool:
    return literal == suffix or literal.endswith("." + suffix)


def test_only_the_schema_spells_hf_tensor_names():
    ours = {r.name for r in schema.GLOBALS + schema.BLOCK}
    suffixes = {r.hf.removeprefix("layers.{i}.") for r in schema.GLOBALS + schema.BLOCK}
    assert len(suffixes) == len(schema.GLOBALS + schema.BLOCK) - 1  # gate_up: 2 rows
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "schema.py":
            continue
        for literal in _string_literals(path) - ours:
            for suffix in suffixes:
                if _spells(literal, suffix):
                    found.setdefault(suffix, []).append(f"{path.name}: {literal!r}")
    assert found == {}


def test_a_spelled_name_is_found():
    assert _spells("model.embed_tokens.weight", "embed_tokens.weight")
    assert _spells("router.scale", "router.scale")
    assert not _spells("router_scale", "router.scale")


def test_hf_shapes_match_a_tiny_checkpoint():
    """Every schema row of the `all` variant names a tensor of the checkpoint."""
    config = tiny.tiny_hf_config(ple=True, kv_shared_layers=2, moe=True, k_eq_v=True)
    spec = hub.model_spec(config)
    want = {
        k.removeprefix("model."): v[0] for k, v in tiny.weight_shapes(config).items()
    }
    got = {name: shape for name, (shape, _) in schema.hf_tensors(spec).items()}
    assert got == want and "layers.0.experts.gate_up_proj" in got


def test_exporters_read_the_schema(monkeypatch):
    """GGUF keeps exactly the schema's tensors of the spec (no redundant K/V)."""
    config = tiny.tiny_hf_config(kv_shared_layers=2)
    spec = hub.model_spec(config)
    names = [f"model.{n}" for n in schema.hf_tensors(spec)]
    redundant = "model.layers.3.self_attn.k_proj.weight"
    assert set(gguf.text_tensors([*names, redundant], "causal_lm", spec)) == set(names)
    assert hf.PREFIXES["causal_lm"] == "model."
