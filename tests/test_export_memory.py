"""Peak host memory of each export on a ~480 MB model, measured in a subprocess.

The base is a random float32 Gemma 4 checkpoint of 8 layers at d=1024 / FFN
4096 (`testing.tiny.write_checkpoint` at larger dims), the adapter rank 16 on
all linear layers. Each export runs in a fresh Python process, which reports
the kernel's high-water mark of its resident set (`VmHWM` in
/proc/self/status) right after importing the package (the baseline: Python,
JAX, Keras, KerasHub, TensorFlow: about 1 GiB) and at the end (the peak).
Not `getrusage(RUSAGE_CHILDREN).ru_maxrss`: Linux carries the maxrss of the
forking process (pytest, with torch and transformers loaded, ~1.5 GiB) over
`exec` into the child's figure, so it measures the parent. `VmHWM` belongs to
the child's own address space, which `exec` creates afresh.

Budgets (issue #14): a streamed export's peak <= largest shard + largest
tensor + 1 GiB. That alone would not catch a whole-model copy of this model
(the imports take most of the GiB), so the growth over the baseline must also
stay under a quarter of the model's size. The streamed merge must equal the
one from the KerasHub backbone held in memory in float32 (the route of a
KerasHub-preset base: the schema's tensors read off the backbone) bit for bit.

Run with `-s` to see the figures.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from export_fixtures import factor_workdir, random_factors

from gemma4_keras.model import safetensors_io
from gemma4_keras.model.lora import LoraSpec
from gemma4_keras.testing import tiny

MIB = 1024**2
GIB = 1024**3
SHARD = 64 * MIB
LAYERS = 8

# One child process runs a list of exports. Before each, writing 5 to
# /proc/self/clear_refs resets the high-water mark to the current RSS (Linux
# >= 4.0), so each export's own peak is measured after the imports are paid once.
CHILD = r"""
import json, sys, time
def status(key):
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith(key + ":"))
    return int(line.split()[1]) * 1024
jobs = json.loads(sys.argv[1])
import ml_collections
from gemma4_keras.exporters import commands, hf
figures = []
for job in jobs:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    baseline, start = status("VmRSS"), time.time()
    if job["fmt"] == "in-memory":
        from gemma4_keras.exporters import peft
        from gemma4_keras.model import presets
        backbone = presets.load_backbone(job["preset"], "float32")
        spec, factors = peft.read_adapter(job["adapter"])
        hf.write_hf_streamed(
            backbone, job["out"], spec, factors, dtype="float32", shard_size=job["shard"]
        )
        del backbone
    else:
        config = ml_collections.ConfigDict({"model": {"preset": job["preset"]}})
        commands.export(config, job["workdir"], job["fmt"], job["out"], **job["options"])
    figures.append(
        {"baseline": baseline, "peak": status("VmHWM"), "seconds": time.time() - start}
    )
with open(sys.argv[2], "w") as f:
    json.dump(figures, f)
"""


def _config() -> dict:
    types = ["sliding_attention"] * 3 + ["full_attention"]
    return tiny.tiny_hf_config(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=LAYERS,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=128,
        global_head_dim=256,
        layer_types=types * (LAYERS // 4),
    )


@pytest.fixture(scope="module")
def mid(tmp_path_factory):
    root = tmp_path_factory.mktemp("mid")
    base = str(tiny.write_checkpoint(root / "base", _config(), seed=0))
    spec = LoraSpec(rank=16, alpha=32.0)
    workdir = factor_workdir(str(root), base, spec, random_factors(base, spec))
    refs = safetensors_io.tensor_refs(base)
    sizes = {
        "model": sum(r.nbytes for r in refs.values()),
        "tensor": max(r.nbytes for r in refs.values()),
    }
    return base, workdir, root, sizes


def _run(mid, *runs) -> list[dict]:
    """Runs exports `(fmt, options, name)` in one child process; their figures."""
    base, workdir, root, _ = mid
    jobs = []
    for fmt, options, name in runs:
        out = str(root / name)
        if fmt == "in-memory":
            os.makedirs(out)
        jobs.append(
            {
                "fmt": fmt,
                "preset": base,
                "workdir": workdir,
                "adapter": os.path.join(workdir, "adapter"),
                "out": out,
                "shard": SHARD,
                "options": options,
            }
        )
    report, log_path = str(root / f"{runs[0][2]}.json"), str(root / f"{runs[0][2]}.log")
    with open(log_path, "w") as log:
        code = subprocess.call(
            [sys.executable, "-c", CHILD, json.dumps(jobs), report],
            stdout=log,
            stderr=log,
        )
    if code:
        with open(log_path) as f:
            raise AssertionError(f"export child failed:\n{f.read()[-3000:]}")
    with open(report) as f:
        figures = json.load(f)
    for job, fig in zip(jobs, figures, strict=True):
        fig.update(out=job["out"], growth=fig["peak"] - fig["baseline"])
        print(
            f"{job['fmt']}: peak RSS {fig['peak'] / MIB:.0f} MiB, before it "
            f"{fig['baseline'] / MIB:.0f} MiB, growth {fig['growth'] / MIB:.0f} MiB, "
            f"{fig['seconds']:.1f} s"
        )
    return figures


def _check_streamed(figures, sizes, label):
    budget = SHARD + sizes["tensor"] + GIB
    assert figures["peak"] <= budget, f"{label}: {figures['peak']} > {budget}"
    assert figures["growth"] <= sizes["model"] / 4, (
        f"{label}: grew {figures['growth'] / MIB:.0f} MiB for a "
        f"{sizes['model'] / MIB:.0f} MiB model"
    )


STREAMED = {
    "peft": {},
    "hf": {"shard_size": SHARD},
    "gguf": {"gguf_type": "f16"},
    "gguf-lora": {"gguf_type": "f32"},
}


@pytest.fixture(scope="module")
def streamed(mid):
    sizes = mid[3]
    print(
        f"\nmodel {sizes['model'] / MIB:.0f} MiB, largest tensor {sizes['tensor'] / MIB:.0f} MiB"
    )
    runs = [(fmt, options, fmt) for fmt, options in STREAMED.items()]
    return dict(zip(STREAMED, _run(mid, *runs), strict=True))


@pytest.mark.parametrize("fmt", list(STREAMED))
def test_streamed_exports_stay_within_budget(mid, streamed, fmt):
    _check_streamed(streamed[fmt], mid[3], fmt)


@pytest.mark.slow
def test_streamed_hf_equals_in_memory_bit_for_bit(mid, streamed):
    """The in-memory route (a float32 KerasHub backbone) is the oracle; its peak too."""
    sizes = mid[3]
    (old,) = _run(mid, ("in-memory", {}, "in_memory"))
    assert old["growth"] > sizes["model"]  # it holds (more than) the model
    got = safetensors_io.tensor_refs(streamed["hf"]["out"])
    want = safetensors_io.tensor_refs(old["out"])
    assert set(got) == set(want)
    for name in sorted(want):
        a, b = (
            safetensors_io.read_tensor(got[name]),
            safetensors_io.read_tensor(want[name]),
        )
        assert a.dtype == b.dtype, name
        assert np.array_equal(a.view(np.uint8), b.view(np.uint8)), name


@pytest.mark.slow
def test_keras_peak(mid):
    """KerasHub saves a built model: the backbone in the output dtype is resident."""
    (keras,) = _run(mid, ("keras", {}, "keras"))
    assert keras["growth"] <= 3.5 * mid[3]["model"]
