"""Sequence mode (chunks as matrix-matrix products) and batched decoding.

Both use the same inner loops as one-token decoding, summed in the same order, so the
results are not just close but bit-identical to feeding tokens one at a time.
"""
import numpy as np
import pytest

import rwkvx
from rwkvx.errors import RwkvxError
from rwkvx.reference import Reference

from conftest import save_random_model

DTYPES = ["float32", "bfloat16", "float16", "uint8"]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return save_random_model(tmp_path_factory.mktemp("seq") / "m.safetensors", 2, 40, 97, n_ffn=70, seed=3)


def one_by_one(model, tokens, state=None):
    logits = []
    for token in tokens:
        out, state = model.forward([token], state)
        logits.append(out)
    return np.stack(logits), state


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk_size", [1, 2, 3, 17, 64])
def test_sequence_mode_equals_token_by_token(model_path, dtype, chunk_size):
    model = rwkvx.load(model_path, dtype=dtype)
    tokens = np.random.default_rng(chunk_size).integers(0, 97, 40).tolist()
    _, start = model.forward([5, 6, 7])
    expected, expected_state = one_by_one(model, tokens, start)
    model.chunk_size = chunk_size
    logits, state = model.forward(tokens, start)
    assert np.array_equal(logits, expected[-1]) and np.array_equal(state, expected_state)
    every, state = model.forward(tokens, start, all_logits=True)
    assert every.shape == (40, 97) and np.array_equal(every, expected)


def test_all_logits_against_reference(model_path):
    model = rwkvx.load(model_path)
    tokens = list(range(0, 97, 3))
    every, _ = model.forward(tokens, all_logits=True)
    ref, _ = Reference(model.weights).forward(tokens, all_logits=True)
    assert np.abs(every - ref).max() <= 1e-5 * np.abs(ref).max()


def test_all_logits_of_one_token_is_two_dimensional(model_path):
    model = rwkvx.load(model_path)
    every, _ = model.forward([3], all_logits=True)
    assert every.shape == (1, 97) and np.array_equal(every[0], model.forward([3])[0])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 2, 3, 17])
def test_batched_decoding_equals_sequences_run_alone(model_path, dtype, batch):
    model = rwkvx.load(model_path, dtype=dtype)
    model.chunk_size = 5  # several chunks, some splitting a sequence
    rng = np.random.default_rng(batch)
    prompts = [rng.integers(0, 97, rng.integers(1, 6)).tolist() for _ in range(batch)]
    logits, states = model.forward_batch(prompts)
    assert logits.shape == (batch, 97) and len(states) == batch
    for b, prompt in enumerate(prompts):
        alone, alone_state = one_by_one(model, prompt)
        assert np.array_equal(logits[b], alone[-1]) and np.array_equal(states[b], alone_state)
    # then one token each, from the states just made, some sequences fresh
    next_tokens = [[int(t)] for t in rng.integers(0, 97, batch)]
    mixed = [None if b % 3 == 2 else s for b, s in enumerate(states)]
    before = [None if s is None else s.copy() for s in mixed]
    logits, new_states = model.forward_batch(next_tokens, mixed)
    for b in range(batch):
        alone, alone_state = model.forward(next_tokens[b], mixed[b])
        assert np.array_equal(logits[b], alone) and np.array_equal(new_states[b], alone_state)
        if before[b] is not None:
            assert np.array_equal(mixed[b], before[b])  # inputs untouched


def test_batch_errors(model_path):
    model = rwkvx.load(model_path)
    with pytest.raises(RwkvxError, match="at least one sequence"):
        model.forward_batch([])
    with pytest.raises(RwkvxError, match="at least one token"):
        model.forward_batch([[1], []])
    with pytest.raises(RwkvxError, match="out of range"):
        model.forward_batch([[1], [97]])
    with pytest.raises(RwkvxError, match="states: expected a list of 2"):
        model.forward_batch([[1], [2]], [None])
    with pytest.raises(RwkvxError, match="state"):
        model.forward_batch([[1]], [np.zeros((2, 5, 3), np.float32)])
    with pytest.raises(RwkvxError, match="list of token lists"):
        model.forward_batch("abc")
