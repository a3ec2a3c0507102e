"""RWKV-5.2: the tiny trained model of rwkv.cpp's test suite (eight heads of 8) and its
expected logits; RWKV-5.0/5.1 refused.

rwkv.cpp's v5 graph normalises ln_x with eps 1e-5, BlinkDL's runtime (and rwkvx) with 64e-5
(training's GroupNorm eps 1e-5 on x / head_size_divisor 8): its expected logits are matched
with 1e-5, and differ by up to 1.09 with 64e-5."""
import numpy as np
import pytest

import rwkvx
from rwkvx.arch import recognise_path
from rwkvx.arch.common import Reference, read_weights
from rwkvx.errors import CheckpointError

from arch_random import random_checkpoint, write_safetensors
from conftest import SHARED, shared_file

MODEL = SHARED / "models" / "tiny-rwkv-5v2-730K-FP32.bin"
EXPECTED = SHARED / "models" / "expected-logits-5v2-730K.bin"
PROMPT = [34, 105, 110]


def test_reference_reproduces_rwkv_cpp_expected_logits_with_its_eps():
    arch, source = recognise_path(shared_file(MODEL))
    expected = np.fromfile(shared_file(EXPECTED), dtype="<f4")
    ref = Reference(read_weights(source, arch))
    assert (ref.n_layer, ref.head_size) == (12, 8)
    ref.group_norm_eps = 1e-5
    logits, _ = ref.forward(PROMPT)
    # measured 3.1e-6
    assert np.abs(logits - expected).max() < 1e-5
    ref.group_norm_eps = 64e-5
    logits, _ = ref.forward(PROMPT)
    assert np.abs(logits - expected).max() > 0.5


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "uint8"])
def test_runtime_on_the_trained_model(dtype):
    model = rwkvx.load(shared_file(MODEL), dtype=dtype)
    assert (model.architecture, model.n_head, model.head_size) == ("RWKV-5", 8, 8)
    prompt = list(b'"in the beginning')
    logits, state = model.forward(prompt, all_logits=True)
    ref_logits, ref_state = Reference(model.weights).forward(prompt, all_logits=True)
    assert np.abs(logits - ref_logits).max() <= 1e-5 * np.abs(ref_logits).max()
    assert np.abs(state - ref_state).max() <= 1e-5 * np.abs(ref_state).max()


def test_rwkv_5_0_and_5_1_are_refused(tmp_path):
    tensors = random_checkpoint("v5")
    # 5.1: one decay and bonus per head
    for key in [k for k in tensors if k.endswith((".time_decay", ".time_faaaa"))]:
        tensors[key] = tensors[key][:, :1]
    with pytest.raises(CheckpointError, match="RWKV-5.0 or 5.1"):
        rwkvx.load(write_safetensors(tmp_path / "v51.safetensors", tensors))
