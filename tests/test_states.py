"""States as files: exact round trips, the model fingerprint, and every kind of bad file."""
import json
import os
import struct
import warnings

import numpy as np
import pytest

import rwkvx
from rwkvx.errors import CheckpointError, RwkvxError, RwkvxWarning

from conftest import save_random_model


@pytest.fixture
def model(tiny_path):
    return rwkvx.load(tiny_path)


def run(model, tokens, state=None):
    return model.forward(tokens, state)


def test_state_shape_and_new_state(model):
    assert model.state_shape == (2, 5, 64)
    assert model.new_state().shape == model.state_shape


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "uint8"])
def test_round_trip_is_exact_and_continues_bit_identically(tiny_path, tmp_path, dtype):
    model = rwkvx.load(tiny_path, dtype=dtype)
    prompt = [5, 17, 3, 96, 0, 42]
    _, state = model.forward(prompt)
    path = tmp_path / "s.state"
    model.save_state(path, state, tokens=prompt)
    loaded, tokens = model.load_state(path)
    assert tokens == prompt
    assert loaded.dtype == np.float32 and loaded.flags.writeable
    np.testing.assert_array_equal(loaded, state)
    a, sa = model.forward([7, 8, 9], state)
    b, sb = model.forward([7, 8, 9], loaded)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(sa, sb)


def test_tokens_are_optional(model, tmp_path):
    _, state = model.forward([1, 2])
    model.save_state(tmp_path / "a", state)
    assert model.load_state(tmp_path / "a")[1] is None
    model.save_state(tmp_path / "b", state, tokens=[])
    assert model.load_state(tmp_path / "b")[1] == []
    model.save_state(tmp_path / "c", state, tokens=np.array([1, 2]))
    assert model.load_state(tmp_path / "c")[1] == [1, 2]


def test_fingerprint_is_the_same_for_every_dtype_and_tells_checkpoints_apart(tmp_path, tiny_path):
    prints = {rwkvx.load(tiny_path, dtype=d).fingerprint for d in ("float32", "bfloat16", "float16", "uint8")}
    assert len(prints) == 1
    other = save_random_model(tmp_path / "other.safetensors", seed=1)
    assert rwkvx.load(other).fingerprint not in prints


def test_state_of_another_checkpoint_of_the_same_shape_loads_with_a_warning(model, tmp_path):
    other = rwkvx.load(save_random_model(tmp_path / "other.safetensors", seed=1))
    _, state = other.forward([1, 2, 3])
    other.save_state(tmp_path / "s", state, [1, 2, 3])
    with pytest.warns(RwkvxWarning, match="different checkpoint"):
        loaded, tokens = model.load_state(tmp_path / "s")
    np.testing.assert_array_equal(loaded, state)


def test_state_of_another_shape_is_refused(model, tmp_path):
    wide = rwkvx.load(save_random_model(tmp_path / "wide.safetensors", n_embd=32))
    wide.save_state(tmp_path / "s", wide.new_state())
    with pytest.raises(CheckpointError, match=r"s: a state of shape \(2, 5, 32\), this model's states are \(2, 5, 64\)"):
        model.load_state(tmp_path / "s")


def _write_state(path, header, data=b""):
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def _meta(model, **extra):
    meta = {"format": "rwkvx-state", "format_version": "1", "architecture": "RWKV-4",
            "model_fingerprint": model.fingerprint}
    meta.update(extra)
    return meta


@pytest.mark.parametrize("case, message", [
    ("missing", "no such file"),
    ("empty", "file is empty"),
    ("garbage", "not an rwkvx state file"),
    ("truncated", "truncated"),
    ("checkpoint", "not an rwkvx state file"),
    ("newer", "newer rwkvx"),
    ("architecture", "a state of an RWKV-9 model"),
    ("nan", "NaN or infinite"),
    ("token range", "outside this model's vocabulary"),
    ("no state", "without a float32 'state' tensor"),
    ("float16", "without a float32 'state' tensor"),
    ("int64 tokens", "holds F32 and I32 tensors, got I64"),
    ("directory", "is a directory"),
])
def test_bad_files_are_one_line_checkpoint_errors(model, tmp_path, tiny_path, case, message):
    path = tmp_path / "bad.state"
    n = int(np.prod(model.state_shape))
    good = {"__metadata__": _meta(model),
            "state": {"dtype": "F32", "shape": list(model.state_shape), "data_offsets": [0, 4 * n]}}
    state_bytes = model.new_state().tobytes()
    if case == "empty":
        path.write_bytes(b"")
    elif case == "garbage":
        path.write_bytes(os.urandom(300))
    elif case == "truncated":
        _write_state(path, good, state_bytes[:-4])
    elif case == "checkpoint":
        path = tiny_path
    elif case == "newer":
        _write_state(path, {**good, "__metadata__": _meta(model, format_version="99")}, state_bytes)
    elif case == "architecture":
        _write_state(path, {**good, "__metadata__": _meta(model, architecture="RWKV-9")}, state_bytes)
    elif case == "nan":
        bad = model.new_state()
        bad[0, 0, 3] = np.nan
        _write_state(path, good, bad.tobytes())
    elif case == "token range":
        tokens = {"dtype": "I32", "shape": [2], "data_offsets": [4 * n, 4 * n + 8]}
        _write_state(path, {**good, "tokens": tokens}, state_bytes + np.array([1, 97], np.int32).tobytes())
    elif case == "no state":
        _write_state(path, {"__metadata__": _meta(model)})
    elif case == "float16":
        _write_state(path, {"__metadata__": _meta(model), "state": {"dtype": "F16", "shape": list(model.state_shape),
                                                                   "data_offsets": [0, 2 * n]}},
                     np.zeros(n, np.float16).tobytes())
    elif case == "int64 tokens":
        tokens = {"dtype": "I64", "shape": [2], "data_offsets": [4 * n, 4 * n + 16]}
        _write_state(path, {**good, "tokens": tokens}, state_bytes + np.array([1, 2], np.int64).tobytes())
    elif case == "directory":
        path = tmp_path
    with pytest.raises(CheckpointError) as info:
        model.load_state(path)
    text = str(info.value)
    assert message in text and "\n" not in text
    assert str(path) in text


def test_a_state_file_is_not_a_checkpoint(model, tmp_path):
    model.save_state(tmp_path / "s.safetensors", model.new_state())
    with pytest.raises(CheckpointError, match="is a saved model state"):
        rwkvx.load(tmp_path / "s.safetensors")


def test_saving_checks_its_arguments_and_leaves_no_temporary_files(model, tmp_path):
    tmp_path = tmp_path / "states"
    tmp_path.mkdir()
    with pytest.raises(RwkvxError, match="is a directory"):
        model.save_state(tmp_path, model.new_state())
    with pytest.raises(RwkvxError, match="cannot write the state"):
        model.save_state(tmp_path / "no" / "such" / "dir", model.new_state())
    with pytest.raises(RwkvxError, match="expected a float32 array"):
        model.save_state(tmp_path / "s", np.zeros((1, 5, 64), np.float32))
    with pytest.raises(RwkvxError, match="out of range"):
        model.save_state(tmp_path / "s", model.new_state(), tokens=[1, 1000])
    with pytest.raises(RwkvxError, match="got a string"):
        model.save_state(tmp_path / "s", model.new_state(), tokens="abc")
    assert os.listdir(tmp_path) == []


def test_overwriting_replaces_the_file_whole(model, tmp_path):
    tmp_path = tmp_path / "states"
    tmp_path.mkdir()
    _, s1 = model.forward([1])
    _, s2 = model.forward([2, 3])
    model.save_state(tmp_path / "s", s1, [1])
    model.save_state(tmp_path / "s", s2, [2, 3])
    state, tokens = model.load_state(tmp_path / "s")
    np.testing.assert_array_equal(state, s2)
    assert tokens == [2, 3] and os.listdir(tmp_path) == ["s"]


@pytest.mark.parametrize("dtype", [np.complex64, np.int32, object, "U3"])
def test_states_of_the_wrong_dtype_are_refused(model, dtype):
    bad = np.zeros(model.state_shape, dtype=dtype)
    with pytest.raises(RwkvxError, match="dtype"):
        model.forward([1], bad)
    with pytest.raises(RwkvxError, match="dtype"):
        model.forward_batch([[1]], [bad])


def test_float64_states_are_converted(model):
    _, state = model.forward([1, 2])
    a, _ = model.forward([3], state)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b, _ = model.forward([3], state.astype(np.float64))
    np.testing.assert_array_equal(a, b)


def test_a_fine_tune_has_another_fingerprint(tmp_path):
    from rwkvx.testing import random_tensors, write_safetensors
    tensors = random_tensors(2, 64, 97)
    write_safetensors(tmp_path / "base.safetensors", tensors)
    # a merged LoRA: one matrix changes, every vector stays
    tensors["blocks.1.att.key.weight"] = tensors["blocks.1.att.key.weight"] * 1.5
    write_safetensors(tmp_path / "tuned.safetensors", tensors)
    base, tuned = rwkvx.load(tmp_path / "base.safetensors"), rwkvx.load(tmp_path / "tuned.safetensors")
    assert base.fingerprint != tuned.fingerprint
    base.save_state(tmp_path / "s", base.forward([1, 2])[1])
    with pytest.warns(RwkvxWarning):
        tuned.load_state(tmp_path / "s")


def test_a_converted_file_keeps_its_sources_fingerprint(tmp_path, tiny_path):
    from rwkvx.convert import convert
    source = rwkvx.load(tiny_path)
    for dtype in ("uint8", "bfloat16"):
        convert(tiny_path, tmp_path / f"{dtype}.safetensors", dtype)
        assert rwkvx.load(tmp_path / f"{dtype}.safetensors", dtype=dtype).fingerprint == source.fingerprint
