"""RWKV-6: the tiny trained model of rwkv.cpp's test suite, here only as Q5_1 (16 heads of 8).

Its expected logits are those of the unquantised original, so the Q5_1 weights (dequantised
exactly at load) land near them: max abs diff 0.076 measured, with logits up to ~23."""
import numpy as np
import pytest

import rwkvx
from rwkvx.arch import recognise_path
from rwkvx.arch.common import Reference, read_weights

from conftest import SHARED, shared_file

MODEL = SHARED / "models" / "tiny-rwkv-6v0-3m-Q5_1.bin"
EXPECTED = SHARED / "models" / "expected-logits-6v0-3m.bin"
PROMPT = [34, 105, 110]


def test_q5_1_lands_near_the_expected_logits():
    arch, source = recognise_path(shared_file(MODEL))
    expected = np.fromfile(shared_file(EXPECTED), dtype="<f4")
    ref = Reference(read_weights(source, arch))
    assert (ref.n_layer, ref.n_embd, ref.head_size) == (12, 128, 8)
    logits, _ = ref.forward(PROMPT)
    diff = np.abs(logits - expected)
    assert diff.max() < 0.1
    assert np.argmax(logits) == np.argmax(expected)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "uint8"])
def test_runtime_on_the_trained_model(dtype):
    model = rwkvx.load(shared_file(MODEL), dtype=dtype)
    assert model.architecture == "RWKV-6"
    prompt = list(b'"in the beginning')
    logits, state = model.forward(prompt, all_logits=True)
    ref_logits, ref_state = Reference(model.weights).forward(prompt, all_logits=True)
    assert np.abs(logits - ref_logits).max() <= 1e-5 * np.abs(ref_logits).max()
    assert np.abs(state - ref_state).max() <= 1e-5 * np.abs(ref_state).max()
