"""The speed benchmarks run: gpu.py's CPU dry run, compare.py's table logic."""

import importlib.util
import math
import pathlib

import numpy as np
import pytest

BENCH = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gpu():
    return _load("gpu")


@pytest.fixture(scope="module")
def compare():
    return _load("compare")


def test_gpu_dry_run_reports_a_step(gpu):
    (r,) = gpu.main(["--size", "tiny", "--seq", "32", "--steps", "2", "--chunk",
                     "16", "--methods", "qlora", "--no-peft", "--json"])  # fmt: skip
    assert r["tokens_per_s"] > 0 and all(math.isfinite(x) for x in r["losses"])
    assert r["xla_temp_bytes"] > 0 and r["flops_per_step"] > 0
    assert r["mfu"] is None  # no known peak on a CPU


@pytest.mark.slow
def test_gpu_dry_run_counts_the_same_flops_whatever_the_loss_chunk(gpu):
    # XLA counts the loss's chunk loop once; the script adds the other trips.
    # Two chunks or one must give the same step FLOPs.
    one, two = (
        gpu.main(["--size", "tiny", "--seq", "32", "--steps", "2", "--chunk",
                  str(chunk), "--methods", "lora", "--no-peft", "--json"])[0]
        for chunk in (32, 16)
    )  # fmt: skip
    assert abs(one["flops_per_step"] / two["flops_per_step"] - 1) < 0.01
    # Same weights, same batch: the same first loss.
    assert one["losses"][0] == pytest.approx(two["losses"][0], rel=1e-4)


def test_gpu_random_source_is_seeded_and_shaped(gpu):
    from gemma4_keras.model import hub, schema
    from gemma4_keras.testing import tiny

    spec = hub.model_spec(tiny.tiny_hf_config())
    src = gpu.RandomSource("float32", seed=1)
    up, norm = schema.row("up_proj"), schema.row("pre_attn")
    a = src.value(up, spec, 0)
    assert a.shape == up.shape(spec, spec.blocks[0]) and a.std() > 0
    assert (src.value(up, spec, 0) == a).all()
    assert (src.value(norm, spec, 0) == 1).all()
    table = schema.row("embedding")
    rows = np.concatenate(list(src.blocks(table, spec, None, block=100)))
    assert rows.shape == table.shape(spec, None)


def test_compare_checkpoint_has_the_requested_pattern(compare):
    args = type("Args", (), dict(vocab=512, dim=64, layers=8, sliding=3, window=16,
                                 seq=32))()  # fmt: skip
    config = compare.hf_config(args)
    types = config["layer_types"]
    assert types.count("full_attention") == 2
    assert types[3] == types[7] == "full_attention"
    assert config["vocab_size"] == 512 and config["hidden_size"] == 64


def test_compare_table_takes_the_best_round_and_the_fastest_peer(compare):
    def r(tps, rss):
        return {"tokens_per_s": tps, "median_s": 1.0 / tps, "peak_rss": rss * 1e9,
                "losses": [1.0, 1.0]}  # fmt: skip

    rounds = [
        {"ours-float": r(90, 5), "kerashub": r(70, 12), "peft": r(100, 11)},
        {"ours-float": r(120, 5), "kerashub": r(80, 12), "peft": {"error": "x"}},
    ]
    best = compare.best_rounds(rounds)
    assert best["ours-float"]["tokens_per_s"] == 120
    assert best["peft"]["tokens_per_s"] == 100  # the failed round does not win
    row = next(line for line in compare.table(best).splitlines()
               if line.startswith("ours-float"))  # fmt: skip
    # 120 / 100 (peft is the fastest peer), 5 / 11 GB, 120 / 80 (KerasHub).
    assert "1.20" in row and "0.45" in row and "1.50" in row
