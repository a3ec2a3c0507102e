"""RWKV-7: the tiny trained model of rwkv.cpp's test suite and its expected logits; the
layer-0 value residual; early x070 checkpoints with time_*-prefixed names."""
import numpy as np
import pytest

import rwkvx
from rwkvx.arch import recognise_path
from rwkvx.arch.common import Reference, read_weights

from arch_random import random_checkpoint, write_safetensors
from conftest import SHARED, shared_file

MODEL = SHARED / "models" / "tiny-rwkv-7v0-834K-FP32.bin"
EXPECTED = SHARED / "models" / "expected-logits-7v0-834K.bin"
PROMPT = [34, 105, 110]  # the bytes '"in'


def test_reference_reproduces_rwkv_cpp_expected_logits():
    arch, source = recognise_path(shared_file(MODEL))
    expected = np.fromfile(shared_file(EXPECTED), dtype="<f4")
    logits, _ = Reference(read_weights(source, arch)).forward(PROMPT)
    # measured 3.7e-7 (rwkv.cpp computes in float32)
    assert np.abs(logits - expected).max() < 2e-6


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "uint8"])
def test_runtime_on_the_trained_model(dtype):
    model = rwkvx.load(shared_file(MODEL), dtype=dtype)
    assert (model.architecture, model.n_layer, model.n_head, model.head_size) == ("RWKV-7", 12, 1, 64)
    prompt = list(b'"in the beginning')
    logits, state = model.forward(prompt, all_logits=True)
    ref_logits, ref_state = Reference(model.weights).forward(prompt, all_logits=True)
    assert np.abs(logits - ref_logits).max() <= 1e-5 * np.abs(ref_logits).max()
    assert np.abs(state - ref_state).max() <= 1e-5 * np.abs(ref_state).max()
    if dtype == "float32":
        expected = np.fromfile(shared_file(EXPECTED), dtype="<f4")
        first, _ = model.forward(PROMPT)
        assert np.abs(first - expected).max() < 2e-6


def test_layer_0_needs_no_value_residual_weights(tmp_path):
    tensors = random_checkpoint("v7")
    assert "blocks.0.att.v0" not in tensors and "blocks.1.att.v0" in tensors
    # some files store unused layer-0 v0/v1/v2 anyway: accepted and ignored
    extra = dict(tensors, **{f"blocks.0.att.{k}": tensors[f"blocks.1.att.{k}"] for k in ("v0", "v1", "v2")})
    a, _ = rwkvx.load(write_safetensors(tmp_path / "a.safetensors", tensors)).forward([1, 2, 3])
    b, _ = rwkvx.load(write_safetensors(tmp_path / "b.safetensors", extra)).forward([1, 2, 3])
    assert np.array_equal(a, b)


def test_early_x070_names(tmp_path):
    tensors = random_checkpoint("v7")
    old_names = {"x_r": "time_maa_r", "x_w": "time_maa_w", "x_k": "time_maa_k", "x_v": "time_maa_v",
                 "x_a": "time_maa_a", "x_g": "time_maa_g", "w0": "time_decay", "w1": "time_decay_w1",
                 "w2": "time_decay_w2", "a0": "time_aaaaa", "a1": "time_aaa_w1", "a2": "time_aaa_w2",
                 "v0": "time_misc_v", "v1": "mv_w1", "v2": "mv_w2", "g1": "gate_w1", "g2": "gate_w2",
                 "k_k": "time_misc_kkk", "k_a": "time_misc_a", "r_k": "time_faaaa"}
    renamed = {}
    for key, value in tensors.items():
        head, _, last = key.rpartition(".")
        if ".att." in key and last in old_names:
            key = f"{head}.{old_names[last]}"
        elif key.endswith(".ffn.x_k"):
            key = key.replace(".ffn.x_k", ".ffn.time_maa_k")
        renamed[key] = value
    new, _ = rwkvx.load(write_safetensors(tmp_path / "new.safetensors", tensors)).forward([4, 5, 6])
    model = rwkvx.load(write_safetensors(tmp_path / "old.safetensors", renamed))
    old, _ = model.forward([4, 5, 6])
    assert model.architecture == "RWKV-7" and np.array_equal(old, new)

