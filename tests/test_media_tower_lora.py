"""LoRA on the vision tower's linear layers, against transformers + PEFT.

Oracle: PEFT's LoRA on transformers' `Gemma4ForConditionalGeneration` (the
tiny multimodal checkpoint), built with the same target modules, alpha and
rank, its A / B set from ours (`enable_tower_lora`: Keras' `enable_lora` on
the KerasHub encoder's layers). Logits with an image and the gradients
w.r.t. every tower LoRA factor must agree; the default model keeps the
tower frozen.
"""

import re
import types

import jax
import keras
import ml_collections
import numpy as np
import oracles
import pytest
from test_media_model import PARTS, Case, rel

from gemma4_keras import config_lib
from gemma4_keras.config_lib import TOWER_PREFIX
from gemma4_keras.exporters import peft as peft_export
from gemma4_keras.model import hub, schema, stream_load
from gemma4_keras.model.lora import LoraSpec
from gemma4_keras.model.presets import check_tower_targets
from gemma4_keras.testing import tiny

torch = oracles.need("torch")
peft = oracles.need("peft")
transformers = oracles.need("transformers")

RANK, ALPHA = 4, 8.0
LORA = dict(rank=RANK, alpha=ALPHA, dropout=0.0, layers="", rslora=False, seed=3)
TARGETS = tuple(schema.TOWER_TARGETS)
# Relative max-abs error. The towers alone differ from transformers' by
# ~3e-6 (float32 summation order), which the decoder amplifies to ~6e-5 at
# the soft tokens (test_media_model's END_TO_END_TOL); a LoRA factor
# transposed, mis-scaled or on the wrong layer gives > 1e-2.
LOGIT_TOL, GRAD_TOL = 1.5e-4, 1e-3


def _one_image(tmp):
    return [PARTS["image"](tmp)[2], {"type": "text", "text": "What is it?"}]


@pytest.fixture(scope="module")
def tuned():
    """Ours and PEFT's, tower LoRA on every target with the same non-zero A, B.

    Ours as a run builds it: the spec's tower targets (`lora.targets`
    vision_tower.*) take effect when the towers are attached.
    """
    m = types.SimpleNamespace()
    m.directory = tiny.tiny_checkpoint(layout="multimodal", ple=True)
    spec = LoraSpec.from_config(
        ml_collections.ConfigDict(
            dict(LORA, targets="q_proj," + ",".join(TOWER_PREFIX + t for t in TARGETS))
        )
    )
    m.ours = stream_load.stream_training_model(m.directory, spec, dtype="float32")
    m.towers = hub.load_towers(str(m.directory))
    m.ours.attach_towers(m.towers)
    m.sites = m.ours.tower_lora
    assert [(i, t) for i, t, _ in m.sites] == [
        (i, t) for i in range(len(m.sites) // len(TARGETS)) for t in TARGETS
    ]
    rng = np.random.default_rng(0)
    for _, _, layer in m.sites:
        b = layer.lora_kernel_b
        b.assign(0.05 * rng.standard_normal(b.shape).astype("float32"))
    names = "|".join(re.escape(schema.TOWER_TARGETS[t][0]) for t in TARGETS)
    pattern = rf".*vision_tower\.encoder\.layers\.\d+\.({names})"
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=pattern)
    m.peft = peft.get_peft_model(_hf(m.directory), config).eval()
    modules = dict(m.peft.base_model.model.named_modules())
    for i, target, layer in m.sites:
        module = modules["model." + schema.tower_module(i, target)]
        a = np.asarray(layer.lora_kernel_a).reshape(-1, RANK)
        with torch.no_grad():
            module.lora_A["default"].weight.copy_(torch.tensor(a.T))
            module.lora_B["default"].weight.copy_(
                torch.tensor(np.asarray(layer.lora_kernel_b).T)
            )
    return m


def _hf(directory):
    return transformers.Gemma4ForConditionalGeneration.from_pretrained(
        directory, dtype=torch.float32
    ).eval()


def _loss_weights(shape):
    return np.random.default_rng(1).standard_normal(shape).astype("float32")


def test_logits_and_gradients_equal_peft(tuned, tmp_path):
    case = Case(tuned.directory, tmp_path, _one_image(tmp_path))
    inputs = case.hf_inputs
    out = tuned.peft(**inputs).logits
    w = _loss_weights(tuple(out.shape))
    (out * torch.tensor(w)).sum().backward()
    variables = [v for _, _, layer in tuned.sites for v in layer.trainable_weights]
    # Every tower LoRA factor, and nothing else of the tower, is trainable.
    assert len(variables) == 2 * len(tuned.sites)
    tower = tuned.towers.vision.trainable_weights
    assert {id(v) for v in tower} == {id(v) for v in variables}
    # The train step, optimizer and checkpoints take the model's trainable
    # variables (keyed by path): the tower's LoRA is among them, uniquely named.
    model_vars = {id(v) for v in tuned.ours.trainable_variables}
    assert {id(v) for v in variables} <= model_vars
    paths = [v.path for v in tuned.ours.trainable_variables]
    assert len(set(paths)) == len(paths)

    def loss(values):
        with keras.StatelessScope(state_mapping=list(zip(variables, values))):
            logits = tuned.ours.logits(tuned.ours(case.ours))
        return (logits * w).sum(), logits

    values = [v.value for v in variables]
    grads, logits = jax.grad(loss, has_aux=True)(values)
    err = rel(logits, out.detach().numpy())
    diff = np.abs(np.asarray(logits) - out.detach().numpy()).max()
    print(f"tower LoRA logits vs PEFT {err:.2e} relative, max |diff| {diff:.2e}")
    assert err < LOGIT_TOL
    with torch.no_grad(), tuned.peft.disable_adapter():
        plain = tuned.peft(**inputs).logits.numpy()
    effect = rel(plain, out.detach().numpy())
    print(f"tower LoRA's own effect on the logits {effect:.2e}")
    assert effect > 100 * LOGIT_TOL  # the comparison can fail
    modules = dict(tuned.peft.base_model.model.named_modules())
    worst = most = 0.0
    for k, (i, target, _) in enumerate(tuned.sites):
        module = modules["model." + schema.tower_module(i, target)]
        ga = module.lora_A["default"].weight.grad.numpy().T
        gb = module.lora_B["default"].weight.grad.numpy().T
        ours_a = np.asarray(grads[2 * k]).reshape(-1, RANK)
        ours_b = np.asarray(grads[2 * k + 1])
        assert np.abs(gb).max() > 0 and np.abs(ga).max() > 0
        worst = max(worst, rel(ours_a, ga), rel(ours_b, gb))
        most = max(most, np.abs(ours_a - ga).max(), np.abs(ours_b - gb).max())
    print(
        f"tower LoRA gradients vs PEFT, worst relative {worst:.2e}, |diff| {most:.2e}"
    )
    assert worst < GRAD_TOL


def test_default_keeps_the_tower_frozen():
    directory = tiny.tiny_checkpoint(layout="multimodal", ple=True)
    spec = LoraSpec.from_config(config_lib.get_config("tiny", "lora").lora)
    assert spec.tower_targets == ()  # the default: the decoder only
    model = stream_load.stream_training_model(directory, spec, dtype="float32")
    model.attach_towers(hub.load_towers(str(directory)))
    assert model.trainable_variables  # the decoder's LoRA
    assert model.towers.vision.trainable_weights == []
    assert not any("vision" in v.path for v in model.trainable_variables)


def test_tower_targets_need_a_vision_tower():
    directory = tiny.tiny_checkpoint()
    model = stream_load.stream_training_model(directory, dtype="float32")
    with pytest.raises(config_lib.ConfigError, match="model.towers=on"):
        model.enable_tower_lora(("o_proj",), RANK, ALPHA)


def test_saved_adapter_loads_in_peft(tuned, tmp_path):
    case = Case(tuned.directory, tmp_path, _one_image(tmp_path))
    adapter = tmp_path / "adapter"
    peft_export.save_adapter(
        tuned.ours,
        str(adapter),
        base_model=str(tuned.directory),
        layout="conditional_generation",
    )
    loaded = peft.PeftModel.from_pretrained(_hf(tuned.directory), str(adapter))
    state = loaded.state_dict()
    tower_keys = [k for k in state if "vision_tower" in k and "lora_B" in k]
    assert len(tower_keys) == len(tuned.sites)
    with torch.no_grad():
        want = tuned.peft(**case.hf_inputs).logits.numpy()
        got = loaded.eval()(**case.hf_inputs).logits.numpy()
    err = rel(got, want)
    print(f"saved tower LoRA adapter in PEFT vs in-memory PEFT {err:.2e}")
    assert err < 1e-6
    assert rel(np.asarray(tuned.ours.logits(tuned.ours(case.ours))), got) < LOGIT_TOL
    # Loading it back into the package is refused, naming what to use.
    with pytest.raises(peft_export.AdapterFormatError, match="vision tower LoRA"):
        peft_export.read_adapter(str(adapter))


def test_tower_target_refusals():
    def config(**kw):
        return ml_collections.ConfigDict({**LORA, **kw})

    with pytest.raises(config_lib.ConfigError, match=r"vision_tower\.q_proj.*known"):
        LoraSpec.from_config(config(targets="all-linear,vision_tower.q_proj"))
    with pytest.raises(config_lib.ConfigError, match="only vision tower layers"):
        LoraSpec.from_config(config(targets="vision_tower.o_proj"))
    spec = LoraSpec.from_config(config(targets="all-linear,vision_tower.up_proj"))
    assert spec.tower_targets == ("up_proj",)
    assert spec.targets == config_lib.LORA_TARGETS
    with pytest.raises(config_lib.ConfigError, match="model.towers=on"):
        check_tower_targets(spec, ("audio",))
    check_tower_targets(spec, ("image",))
    c = config_lib.get_config("tiny", "lora")
    c.lora.targets = "all-linear,vision_tower.o_proj"
    c.lora.dropout = 0.1
    with pytest.raises(config_lib.ConfigError, match=r"lora.dropout=0.1.*set"):
        config_lib.validate(c)
