"""Merged KerasHub preset: reloads with the Keras merged model's logits."""

import json
import os

import keras_hub
import numpy as np
import pytest
from export_fixtures import (
    TOKENS,
    config_for,
    fake_workdir,
    keras_logits,
    rel_err,
    trained_model,
    variant_preset,
)

from gemma4_keras.exporters import commands


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    preset = variant_preset(ple=True, kv_shared_layers=2)
    root = str(tmp_path_factory.mktemp("keras"))
    model = trained_model(preset)
    workdir = fake_workdir(root, model, preset)
    out = commands.export(
        config_for(preset), workdir, "keras", os.path.join(root, "keras")
    )
    return model, out


def _backbone_logits(backbone) -> np.ndarray:
    positions = np.arange(TOKENS.shape[1], dtype=np.int32)[None]
    inputs = {
        "token_ids": TOKENS,
        "padding_mask": np.ones_like(TOKENS),
        "position_ids": positions,
    }
    hidden = np.asarray(backbone(inputs))
    emb = np.asarray(backbone.get_layer("token_embedding").embeddings)
    z = hidden @ emb.T
    return np.tanh(z / 30.0) * 30.0


def test_causal_lm_reloads_with_merged_logits(exported):
    model, out = exported
    causal_lm = keras_hub.models.Gemma4CausalLM.from_preset(out)
    got = _backbone_logits(causal_lm.backbone)
    ref = keras_logits(model)
    err = rel_err(got, ref)
    print(f"keras preset vs Keras merged model: max rel err {err:.2e}")
    assert err < 1e-5
    model.set_adapter(None)
    base = keras_logits(model)
    model.set_adapter("default")
    assert rel_err(base, ref) > 1e-2
    # The tokenizer came along.
    ids = causal_lm.preprocessor.tokenizer("hello world")
    assert len(np.asarray(ids)) > 0


def test_preset_files_and_manifest(exported):
    _, out = exported
    files = set(os.listdir(out))
    assert {
        "config.json",
        "metadata.json",
        "model.weights.h5",
        "export_manifest.json",
    } <= files
    with open(os.path.join(out, "export_manifest.json")) as f:
        man = json.load(f)
    assert man["format"] == "keras"
    assert man["dtype"] == man["base_dtype"] == "float32"  # the base's own


def test_merged_kernels_are_base_plus_delta(exported):
    from gemma4_keras.model import hub, schema

    model, out = exported
    merged = keras_hub.models.Gemma4Backbone.from_preset(out, dtype="float32")
    base = keras_hub.models.Gemma4Backbone.from_preset(
        variant_preset(ple=True, kv_shared_layers=2), dtype="float32"
    )
    for (layer, target), adapter in model.adapters().items():
        row = schema.row(target)
        got = np.asarray(hub.variable(merged, row, layer))
        was = np.asarray(hub.variable(base, row, layer))
        delta = hub.twod_to_keras(adapter.delta_weight(), row.keras_layout, was.shape)
        np.testing.assert_allclose(
            got, was + delta, rtol=0, atol=1e-6, err_msg=f"{layer} {target}"
        )


def test_kerashub_generate_keeps_turn_end_as_docs_deploy_says(exported):
    """KerasHub 0.32 (not the export): the stop token stays in the answer.

    `Gemma4CausalLM.generate` stops at `<turn|>` but masks only what follows
    it, and `generate_postprocess` strips the tokenizer's special tokens,
    which do not include `<turn|>` (106) or `<|tool_response>` (50); its
    preprocessor adds `<bos>` itself. docs/deploy.md ("KerasHub preset")
    tells users to cut at `<turn|>` and to leave `<bos>` out; when KerasHub
    changes, this fails and that text goes.
    """
    _, out = exported
    lm = keras_hub.models.Gemma4CausalLM.from_preset(out)
    tokenizer = lm.preprocessor.tokenizer
    assert tokenizer.token_to_id("<turn|>") == 106
    assert {1, 2} <= set(tokenizer.special_token_ids)
    assert not {50, 106} & set(tokenizer.special_token_ids)
    ids = np.array([[2, 105, 462, 370, 397, 106, 0]], np.int32)
    mask = np.array([[1, 1, 1, 1, 1, 1, 0]], bool)
    text = lm.preprocessor.generate_postprocess(
        {"token_ids": ids, "padding_mask": mask}
    )
    assert str(np.asarray(text).reshape(-1)[0]).endswith("a<turn|>")
    x = lm.preprocessor.generate_preprocess(["<bos>Hi"], sequence_length=8)
    assert np.asarray(x["token_ids"])[0, :2].tolist() == [2, 2]  # two BOS
