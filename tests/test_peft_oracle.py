"""Hugging Face PEFT as the oracle for our LoRA adapters, both directions.

Our model with a random non-zero adapter is saved with `export.peft` and
loaded with `peft.PeftModel.from_pretrained` on the transformers model of the
same tiny checkpoint; the logits must agree. The reverse: a PEFT LoRA made
with `peft.get_peft_model`, randomised and saved, loaded by
`export.peft.load_adapter`, must give PEFT's logits.

Tolerances (float32): base-vs-base sits at the cross-framework floor (~5e-6
relative here, 7.6e-5 noted in GEMMA4.md); the adapter's own effect
(adapter logits minus base logits) must agree within 1e-3 relative. Measured
when written: base 4.6e-6 / 6.3e-6, effect 8.6e-6 / 5.6e-6 (causal_lm /
conditional_generation); k_eq_v base 8.6e-7, effect 1.9e-6 both ways;
double_wide_mlp effect 1.6e-6.
"""

from __future__ import annotations

import functools

import keras_hub
import numpy as np
import oracles
import pytest

from gemma4_keras.config_lib import LORA_TARGETS
from gemma4_keras.exporters import peft as peft_lib
from gemma4_keras.model import gemma4_lora_model
from gemma4_keras.model.lora import LoraSpec
from gemma4_keras.model.schema import EXPERT_TARGETS
from gemma4_keras.testing import tiny, variants

# Every test here compares with PEFT on transformers: without them the module
# is skipped (or, under --require-oracles, the session never starts).
peft = oracles.need("peft")
torch = oracles.need("torch")
transformers = oracles.need("transformers")

BASE_TOL = 1e-4  # cross-framework float32 floor, with margin
EFFECT_TOL = 1e-3
SEQ = 24  # longer than the tiny sliding window (16)

VARIANTS = {
    "causal_lm": variants.VARIANTS["default"],
    **variants.select(
        "conditional_generation", "kv_shared", "moe", "k_eq_v", "double_wide_mlp"
    ),
}


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@functools.cache
def checkpoint(variant: str):
    return tiny.tiny_checkpoint(**VARIANTS[variant])


@functools.cache
def backbone(variant: str):
    return keras_hub.models.Gemma4Backbone.from_preset(str(checkpoint(variant)))


def hf_model(variant: str):
    """A fresh transformers model (PEFT injects layers into it in place)."""
    path = checkpoint(variant)
    if VARIANTS[variant].get("layout") == "conditional_generation":
        cls = transformers.AutoModelForImageTextToText
    else:
        cls = transformers.AutoModelForCausalLM
    return cls.from_pretrained(path, dtype=torch.float32).eval()


def token_ids(vocab: int) -> np.ndarray:
    rng = np.random.default_rng(1)
    ids = rng.integers(4, vocab, size=(2, SEQ))
    ids[:, 0] = 2  # <bos>
    return ids


def our_logits(model, ids: np.ndarray, adapter: str | None) -> np.ndarray:
    model.set_adapter(adapter)
    batch = dict(
        token_ids=ids,
        positions=np.tile(np.arange(ids.shape[1]), (ids.shape[0], 1)),
        segment_ids=np.ones(ids.shape, np.int32),
    )
    return np.asarray(model.logits(model(batch)))


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        # logits_to_keep=slice(None): transformers 5.24 otherwise crashes on
        # some KV-shared configs; it is a no-op elsewhere.
        out = model(input_ids=torch.tensor(ids), logits_to_keep=slice(None))
    return out.logits.float().numpy()


def randomise(model, name: str, seed: int) -> None:
    """Non-zero A and B, so every site has an effect PEFT must reproduce."""
    rng = np.random.default_rng(seed)
    for a in model.adapters(name).values():
        a.lora_a.assign(rng.normal(0, 0.2, a.lora_a.shape).astype(np.float32))
        a.lora_b.assign(rng.normal(0, 0.2, a.lora_b.shape).astype(np.float32))


# (variant, LoraSpec kwargs) of the forward direction.
EXPORT_CASES = [
    ("causal_lm", dict(rank=4, alpha=7.0)),
    (
        "causal_lm",
        dict(
            rank=4,
            alpha=7.0,
            rslora=True,
            layers=(1, 3),
            targets=("q_proj", "v_proj", "down_proj"),
        ),
    ),
    ("conditional_generation", dict(rank=4, alpha=5.0)),
    (
        "conditional_generation",
        dict(
            rank=2,
            alpha=3.0,
            rslora=True,
            layers=(0, 2),
            targets=("k_proj", "o_proj", "up_proj"),
        ),
    ),
    ("kv_shared", dict(rank=4, alpha=6.0)),
    ("moe", dict(rank=4, alpha=6.0, rslora=True)),
    ("k_eq_v", dict(rank=4, alpha=6.0)),
    ("double_wide_mlp", dict(rank=4, alpha=6.0, rslora=True)),
    # Expert LoRA: PEFT's target_parameters on the 3-D expert banks, one
    # pair per expert, beside every projection; then one bank on a layer
    # subset (spelled per layer in target_parameters).
    ("moe", dict(rank=4, alpha=6.0, targets=LORA_TARGETS + EXPERT_TARGETS)),
    ("moe", dict(rank=2, alpha=3.0, targets=("experts.down_proj",), layers=(1, 2))),
]


def lora_sites(peft_model) -> set[tuple[int, str]]:
    """(layer, projection) of every LoRA layer PEFT injected; an expert
    bank's (a `ParamWrapper`) as (layer, `experts.<parameter>`)."""
    sites = set()
    for module_name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and "layers." in module_name:
            parts = module_name.split(".")
            target = parts[-1]
            if hasattr(module, "parameter_name"):
                target = "experts." + module.parameter_name
            sites.add((int(parts[parts.index("layers") + 1]), target))
    return sites


@pytest.mark.parametrize("variant,lora", EXPORT_CASES, ids=lambda v: str(v))
def test_our_adapter_in_peft(variant, lora, tmp_path):
    bb = backbone(variant)
    model = gemma4_lora_model.Gemma4LoraModel.from_backbone(
        bb, LoraSpec(**lora), dtype="float32"
    )
    randomise(model, "default", seed=len(str(lora)))
    ids = token_ids(model.spec.vocab_size)
    ours_base = our_logits(model, ids, None)
    ours = our_logits(model, ids, "default")

    layout = VARIANTS[variant].get("layout", "causal_lm")
    path = peft_lib.save_adapter(
        model,
        str(tmp_path / "adapter"),
        base_model=str(checkpoint(variant)),
        layout=layout,
    )
    hf = hf_model(variant)
    hf_base = hf_logits(hf, ids)
    peft_model = peft.PeftModel.from_pretrained(hf, path).eval()
    hf_adapted = hf_logits(peft_model, ids)
    # PEFT wraps exactly the projections we adapt: none that the base lacks
    # (k/v of KV-shared layers, v_proj of k_eq_v layers), none left out.
    assert lora_sites(peft_model) == set(model.adapters())

    base_err = rel(ours_base, hf_base)
    adapter_err = rel(ours, hf_adapted)
    effect_err = rel(ours - ours_base, hf_adapted - hf_base)
    print(
        f"{variant} {lora}: base {base_err:.2e} adapter {adapter_err:.2e} effect {effect_err:.2e}"
    )
    # The adapter must have a visible effect, or the comparison proves nothing.
    assert np.abs(hf_adapted - hf_base).max() > 0.1
    assert base_err < BASE_TOL
    assert adapter_err < BASE_TOL
    assert effect_err < EFFECT_TOL


# (variant, peft.LoraConfig kwargs) of the reverse direction.
IMPORT_CASES = [
    ("causal_lm", dict(r=4, lora_alpha=9, target_modules="all-linear")),
    (
        "causal_lm",
        dict(
            r=3,
            lora_alpha=5,
            use_rslora=True,
            target_modules=["q_proj", "up_proj"],
            layers_to_transform=[0, 2],
        ),
    ),
    (
        "conditional_generation",
        dict(
            r=4,
            lora_alpha=6,
            target_modules=r".*language_model\.layers\.\d+\.(self_attn|mlp)\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
        ),
    ),
    (
        "kv_shared",
        dict(
            r=4,
            lora_alpha=6,
            use_rslora=True,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
        ),
    ),
    (
        "moe",
        dict(r=2, lora_alpha=4, target_modules=["q_proj", "gate_proj", "down_proj"]),
    ),
    ("k_eq_v", dict(r=4, lora_alpha=6, target_modules="all-linear")),
    (
        "moe",
        dict(
            r=2,
            lora_alpha=4,
            target_modules=["q_proj"],
            target_parameters=list(EXPERT_TARGETS),
        ),
    ),
    ("moe", dict(r=3, lora_alpha=5, target_parameters=["experts.gate_up_proj"])),
]


@pytest.mark.parametrize("variant,config", IMPORT_CASES, ids=lambda v: str(v))
def test_peft_adapter_in_ours(variant, config, tmp_path):
    hf = hf_model(variant)
    ids = token_ids(hf.config.get_text_config().vocab_size)
    hf_base = hf_logits(hf, ids)
    peft_model = peft.get_peft_model(hf, peft.LoraConfig(**config))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for pname, p in peft_model.named_parameters():
            if "lora_" in pname:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    peft_model.eval()
    hf_adapted = hf_logits(peft_model, ids)
    peft_model.save_pretrained(tmp_path / "adapter")

    model = gemma4_lora_model.Gemma4LoraModel.from_backbone(
        backbone(variant), None, dtype="float32"
    )
    peft_lib.load_adapter(model, str(tmp_path / "adapter"), name="imported")
    assert set(model.adapters("imported")) == lora_sites(peft_model)
    ours_base = our_logits(model, ids, None)
    ours = our_logits(model, ids, "imported")
    spec = model.lora_specs["imported"]
    assert spec.rank == config["r"] and spec.alpha == config["lora_alpha"]
    assert spec.rslora == config.get("use_rslora", False)

    base_err = rel(ours_base, hf_base)
    adapter_err = rel(ours, hf_adapted)
    effect_err = rel(ours - ours_base, hf_adapted - hf_base)
    print(
        f"{variant} {config}: base {base_err:.2e} adapter {adapter_err:.2e} effect {effect_err:.2e}"
    )
    assert np.abs(hf_adapted - hf_base).max() > 0.1
    assert base_err < BASE_TOL
    assert adapter_err < BASE_TOL
    assert effect_err < EFFECT_TOL


def test_v_proj_adapter_on_a_k_eq_v_layer_is_refused(tmp_path):
    """A v_proj adapter for a layer whose V is its K projection has no weight
    to act on; loading must say so instead of inventing one."""
    from safetensors.numpy import save_file

    model = gemma4_lora_model.Gemma4LoraModel.from_backbone(
        backbone("k_eq_v"), LoraSpec(rank=2, targets=("v_proj",))
    )
    assert sorted(model.adapters()) == [(0, "v_proj"), (2, "v_proj")]
    path = peft_lib.save_adapter(
        model, str(tmp_path / "a"), base_model=str(checkpoint("k_eq_v"))
    )
    tensors = peft_lib.read_adapter_files(path)[1]
    renamed = {k.replace("layers.2.", "layers.3."): v for k, v in tensors.items()}
    save_file(renamed, f"{path}/adapter_model.safetensors", {"format": "pt"})
    fresh = gemma4_lora_model.Gemma4LoraModel.from_backbone(backbone("k_eq_v"), None)
    with pytest.raises(
        peft_lib.AdapterFormatError,
        match=r"layers\.3\.self_attn\.v_proj: this layer has no v_proj \(V is computed by k_proj",
    ):
        peft_lib.load_adapter(fresh, path)


def test_expert_lora_gradients_match_peft(tmp_path):
    """Adapter gradients with expert LoRA equal PEFT's (transformers + PEFT
    on the same tiny MoE checkpoint): d sum(logits * w) / d A, B for every
    site, the per-expert pairs of both banks included. PEFT's gradients are
    written as an adapter and read back by `read_adapter`, so they arrive in
    our layout through the same (linear) key mapping as weights do."""
    import jax  # the gradient of our model: only this test needs it

    bb = backbone("moe")
    lora = LoraSpec(rank=2, alpha=4.0, targets=("q_proj",) + EXPERT_TARGETS)
    model = gemma4_lora_model.Gemma4LoraModel.from_backbone(bb, lora, dtype="float32")
    randomise(model, "default", seed=5)
    ids = token_ids(model.spec.vocab_size)
    w = np.random.default_rng(2).standard_normal((2, SEQ, model.spec.vocab_size))
    w = w.astype(np.float32)
    batch = dict(
        token_ids=ids,
        positions=np.tile(np.arange(SEQ), (2, 1)),
        segment_ids=np.ones(ids.shape, np.int32),
    )
    tv = [v.value for v in model.trainable_variables]
    ntv = [v.value for v in model.non_trainable_variables]

    def objective(tv):
        hidden, _ = model.stateless_call(tv, ntv, batch)
        return (model.logits(hidden) * w).sum()

    grads = jax.jit(jax.grad(objective))(tv)
    index = {id(v): i for i, v in enumerate(model.trainable_variables)}
    ours = {
        site: (
            np.asarray(grads[index[id(a.lora_a)]]),
            np.asarray(grads[index[id(a.lora_b)]]),
        )
        for site, a in model.adapters().items()
    }

    path = peft_lib.save_adapter(
        model, str(tmp_path / "adapter"), base_model=str(checkpoint("moe"))
    )
    peft_model = peft.PeftModel.from_pretrained(
        hf_model("moe"), path, is_trainable=True
    )
    out = peft_model(input_ids=torch.tensor(ids), logits_to_keep=slice(None))
    (out.logits * torch.tensor(w)).sum().backward()
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(p.grad)
    peft_model.save_pretrained(tmp_path / "grads")
    _, theirs = peft_lib.read_adapter(str(tmp_path / "grads"))

    assert set(theirs) == set(ours)
    assert {t for _, t in ours} == {"q_proj", *EXPERT_TARGETS}
    worst = 0.0
    for site in sorted(ours):
        for g_ours, g_theirs in zip(ours[site], theirs[site]):
            assert g_ours.shape == g_theirs.shape, site
            assert np.abs(g_theirs).max() > 0, site
            worst = max(worst, rel(g_ours, g_theirs))
    print(f"expert LoRA gradients vs PEFT: worst relative error {worst:.2e}")
    assert worst < EFFECT_TOL
