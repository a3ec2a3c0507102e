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


# ---- the fused token step (rwkvx._step.V7Step): one decoded token, one call a layer ----

STEP_TOKENS = [5, 17, 0, 96, 33, 2, 64, 7]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "uint8", "q4"])
@pytest.mark.parametrize("threads", [1, 2])
def test_decoding_token_by_token_is_bit_identical_to_a_prompt(tmp_path, dtype, threads):
    # wide enough that every product group runs on both threads; the token step and the rows
    # path share their kernels, so one token gives the same bits through either
    path = write_safetensors(tmp_path / "m.safetensors",
                             random_checkpoint("v7", n_layer=3, n_embd=128, head_size=32))
    model = rwkvx.load(path, dtype=dtype, threads=threads)
    logits, state = model.forward(STEP_TOKENS, all_logits=True)
    s, rows = None, []
    for t in STEP_TOKENS:
        one, s = model.forward([t], s)
        rows.append(one)
    assert np.array_equal(np.stack(rows), logits) and np.array_equal(s, state)


def test_the_token_step_may_update_its_state_in_place(tmp_path):
    path = write_safetensors(tmp_path / "m.safetensors", random_checkpoint("v7", n_layer=2))
    model = rwkvx.load(path)
    layer = model.layers[1]
    _, state = model.forward(STEP_TOKENS[:3])
    x = np.random.default_rng(0).standard_normal(model.n_embd).astype(np.float32)
    v_first = np.random.default_rng(1).standard_normal(model.n_embd).astype(np.float32)
    apart, x_apart = np.empty_like(state[1]), x.copy()
    layer.step(x_apart, apart, state[1], v_first, 1)
    inplace, x_inplace = state[1].copy(), x.copy()
    layer.step(x_inplace, inplace, inplace, v_first, 1)
    assert np.array_equal(apart, inplace) and np.array_equal(x_apart, x_inplace)


def test_the_token_step_refuses_wrong_shapes(tmp_path):
    path = write_safetensors(tmp_path / "m.safetensors", random_checkpoint("v7", n_layer=1))
    model = rwkvx.load(path)
    C = model.n_embd
    state = model.new_state()[0]
    with pytest.raises(rwkvx.RwkvxError, match="x and v_first"):
        model.layers[0].step(np.zeros(C + 1, np.float32), state, state, np.zeros(C, np.float32))
    with pytest.raises(rwkvx.RwkvxError, match="state: expected"):
        model.layers[0].step(np.zeros(C, np.float32), state[1:], state, np.zeros(C, np.float32))
