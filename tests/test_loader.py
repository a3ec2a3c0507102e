"""Loading checkpoints: formats and dtypes, zero-copy mapping, and every bad file."""
import json
import struct

import numpy as np
import pytest

import rwkvx
from rwkvx.errors import CheckpointError, RwkvxError
from rwkvx.loader import load_weights
from rwkvx.quant import QuantizedMatrix
from rwkvx.reference import Reference
from rwkvx.testing import random_tensors, write_safetensors
from rwkvx.weights import to_bfloat16

from conftest import TINY_MODEL, save_random_model, shared_file


def bf16_round(a: np.ndarray) -> np.ndarray:
    return (to_bfloat16(a).astype(np.uint32) << 16).view(np.float32)


@pytest.mark.parametrize("time_shape", ["blinkdl", "flat"])
def test_time_vectors_in_either_shape(tmp_path, time_shape):
    tensors = random_tensors(2, 16, 10, time_shape=time_shape)
    write_safetensors(tmp_path / "m.safetensors", tensors)
    w = load_weights(tmp_path / "m.safetensors")
    np.testing.assert_array_equal(w.blocks[1]["att_time_mix_k"], tensors["blocks.1.att.time_mix_k"].reshape(16))
    # the recurrence needs -exp(raw decay), computed once at load
    np.testing.assert_allclose(w.blocks[1]["att_time_decay"], -np.exp(tensors["blocks.1.att.time_decay"]), rtol=1e-6)


@pytest.mark.parametrize("stored", ["float16", "bfloat16"])
def test_half_precision_files_load_exactly(tmp_path, stored):
    tensors = random_tensors(2, 16, 10)
    write_safetensors(tmp_path / "m.safetensors", tensors, dtype=stored)
    w = load_weights(tmp_path / "m.safetensors")
    expected = tensors["blocks.0.att.key.weight"]
    expected = expected.astype(np.float16).astype(np.float32) if stored == "float16" else bf16_round(expected)
    assert w.blocks[0]["att_key"].dtype == np.float32
    np.testing.assert_array_equal(w.blocks[0]["att_key"], expected)


def test_float32_file_is_mapped_not_copied(tiny_path):
    w = load_weights(tiny_path)
    for array in (w.emb, w.head, w.blocks[0]["att_key"], w.blocks[1]["ffn_value"]):
        assert not array.flags.owndata and not array.flags.writeable


def test_uint8_quantises_every_matrix_but_not_the_embedding(tiny_path):
    w = load_weights(tiny_path, dtype="uint8")
    assert w.emb.dtype == np.float32
    assert isinstance(w.head, QuantizedMatrix)
    assert all(isinstance(w.blocks[0][n], QuantizedMatrix) for n in ("att_key", "ffn_key", "ffn_value"))
    assert w.nbytes < load_weights(tiny_path).nbytes / 2


def test_rwkv_cpp_file_loads():
    w = load_weights(shared_file(TINY_MODEL))
    assert (w.n_layer, w.n_embd, w.n_vocab) == (4, 128, 256)
    assert w.source == "rwkv.cpp"
    # rwkv.cpp already stores -exp(decay): it must not be transformed twice
    assert (w.blocks[0]["att_time_decay"] < 0).all()


# ---- bad input: every case is a CheckpointError naming the file and the problem ----

def expect_error(path, match):
    with pytest.raises(CheckpointError, match=match) as info:
        rwkvx.load(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def test_missing_file(tmp_path):
    expect_error(tmp_path / "nope.safetensors", "no such file")


def test_directory(tmp_path):
    expect_error(tmp_path, "directory")


def test_empty_file(tmp_path):
    (tmp_path / "e.safetensors").write_bytes(b"")
    expect_error(tmp_path / "e.safetensors", "empty")


def test_unreadable_file(tmp_path):
    import os
    path = save_random_model(tmp_path / "m.safetensors")
    path.chmod(0)
    if os.access(path, os.R_OK):  # root reads anything
        pytest.skip("running as a user that can read any file")
    expect_error(path, "permission denied")


@pytest.mark.parametrize("content", [b"hello world, not a model", b"\x00" * 64, b"{\"a\": 1}"])
def test_not_a_checkpoint(tmp_path, content):
    (tmp_path / "x.bin").write_bytes(content)
    expect_error(tmp_path / "x.bin", "not a checkpoint")


def test_pytorch_zip_without_tensors_names_its_format(tmp_path):
    import zipfile
    with zipfile.ZipFile(tmp_path / "m.pth", "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
    expect_error(tmp_path / "m.pth",
                 "not an RWKV-4 checkpoint \\(PyTorch zip checkpoint \\(torch.save\\), found no tensors")


def test_integer_tensor_where_a_weight_belongs(tmp_path):
    from test_formats_pth import state_dict_pickle, write_zip
    tensors = random_tensors(1, 8, 10)
    entries, storages = [], {}
    for i, (name, value) in enumerate(tensors.items()):
        cls, raw = ("LongStorage", value.astype(np.int64)) if name == "ln_out.bias" else ("FloatStorage", value)
        strides = [int(np.prod(value.shape[d + 1:])) for d in range(value.ndim)]
        entries.append((name, cls, str(i), raw.size, 0, value.shape, strides))
        storages[str(i)] = raw.tobytes()
    write_zip(tmp_path / "m.pth", state_dict_pickle(entries), storages)
    expect_error(tmp_path / "m.pth", "ln_out.bias: stored as I64, expected floating point")


def test_pickle_is_refused_without_unpickling(tmp_path):
    import pickle
    (tmp_path / "m.pth").write_bytes(pickle.dumps({"emb.weight": 1}, protocol=2))
    expect_error(tmp_path / "m.pth", "pickle")


@pytest.mark.parametrize("keep", [0.999, 0.5, 0.01])
def test_truncated_safetensors(tiny_path, keep):
    data = tiny_path.read_bytes()
    tiny_path.write_bytes(data[:int(len(data) * keep)])
    expect_error(tiny_path, "truncated")


def test_truncated_rwkv_cpp(tmp_path):
    data = shared_file(TINY_MODEL).read_bytes()
    (tmp_path / "t.bin").write_bytes(data[:len(data) - 1000])
    expect_error(tmp_path / "t.bin", "truncated")


def _rewrite_header(path, edit):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    edit(header)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n:])


def test_overlapping_tensors(tiny_path):
    def edit(h):
        h["ln_out.bias"]["data_offsets"] = h["ln_out.weight"]["data_offsets"]
    _rewrite_header(tiny_path, edit)
    expect_error(tiny_path, "overlap")


def test_offsets_that_do_not_match_the_shape(tiny_path):
    def edit(h):
        h["ln_out.bias"]["shape"] = [65]
    _rewrite_header(tiny_path, edit)
    expect_error(tiny_path, "ln_out.bias.*needs")


def test_unsupported_tensor_dtype(tiny_path):
    def edit(h):
        h["ln_out.bias"]["dtype"] = "I64"
    _rewrite_header(tiny_path, edit)
    expect_error(tiny_path, "unsupported dtype I64")


def test_garbage_header(tiny_path):
    data = bytearray(tiny_path.read_bytes())
    data[9:20] = b"not json!!!"
    tiny_path.write_bytes(bytes(data))
    expect_error(tiny_path, "JSON")


def test_missing_and_misshaped_tensors_are_all_listed(tmp_path):
    tensors = random_tensors(2, 16, 10)
    del tensors["blocks.1.att.key.weight"]
    del tensors["ln_out.bias"]
    tensors["blocks.0.ffn.value.weight"] = tensors["blocks.0.ffn.value.weight"][:, :10]
    tensors["blocks.0.att.extra"] = np.zeros(3, np.float32)
    write_safetensors(tmp_path / "m.safetensors", tensors)
    message = expect_error(tmp_path / "m.safetensors", "missing 2 tensor")
    for part in ("blocks.1.att.key.weight", "ln_out.bias", "blocks.0.ffn.value.weight: expected [16, 64], got [16, 10]",
                 "unexpected tensor(s): blocks.0.att.extra"):
        assert part in message


def test_no_embedding(tmp_path):
    write_safetensors(tmp_path / "m.safetensors", {"foo": np.zeros(3, np.float32)})
    expect_error(tmp_path / "m.safetensors", "not an RWKV-4 checkpoint")


@pytest.mark.parametrize("key,name", [("blocks.0.att.time_faaaa", "RWKV-5"), ("blocks.0.att.time_maa_x", "RWKV-6"),
                                      ("blocks.0.att.w0", "RWKV-7")])
def test_later_rwkv_generations_are_named(tmp_path, key, name):
    tensors = random_tensors(1, 8, 10)
    tensors[key] = np.zeros(8, np.float32)
    write_safetensors(tmp_path / "m.safetensors", tensors)
    expect_error(tmp_path / "m.safetensors", f"this is an {name} checkpoint; rwkvx supports RWKV-4")


def test_unknown_dtype_argument(tiny_path):
    with pytest.raises(RwkvxError, match="dtype: expected one of float32, bfloat16, float16, uint8, q4, got 'int4'"):
        rwkvx.load(tiny_path, dtype="int4")


def test_bf16_model_runs_like_its_float32_rounding(tmp_path):
    tensors = random_tensors(2, 32, 50)
    write_safetensors(tmp_path / "b.safetensors", tensors, dtype="bfloat16")
    write_safetensors(tmp_path / "f.safetensors", {k: bf16_round(v) for k, v in tensors.items()})
    a, _ = rwkvx.load(tmp_path / "b.safetensors").forward([1, 2, 3])
    b, _ = rwkvx.load(tmp_path / "f.safetensors").forward([1, 2, 3])
    assert np.array_equal(a, b)
    ref, _ = Reference(load_weights(tmp_path / "f.safetensors")).forward([1, 2, 3])
    assert np.abs(a - ref).max() <= 1e-5 * np.abs(ref).max()


@pytest.mark.parametrize("dtype,stored", [("bfloat16", "bfloat16"), ("float16", "float16"), ("float32", "float32")])
def test_matching_stored_dtype_is_mapped_not_copied(tmp_path, dtype, stored):
    write_safetensors(tmp_path / "m.safetensors", random_tensors(2, 16, 10), dtype=stored)
    w = load_weights(tmp_path / "m.safetensors", dtype=dtype)
    for array in (w.emb, w.head, w.blocks[0]["att_key"], w.blocks[1]["ffn_value"]):
        assert not array.flags.owndata and not array.flags.writeable


@pytest.mark.parametrize("dtype,expected", [("bfloat16", np.uint16), ("float16", np.float16)])
def test_half_precision_run_from_float32_file(tiny_path, dtype, expected):
    w = load_weights(tiny_path, dtype=dtype)
    assert w.head.dtype == expected and w.blocks[0]["ffn_key"].dtype == expected
    assert w.nbytes < 0.6 * load_weights(tiny_path).nbytes


def test_float16_overflow_is_reported(tmp_path):
    tensors = random_tensors(1, 8, 10)
    tensors["blocks.0.att.key.weight"][0, 0] = 1e6
    write_safetensors(tmp_path / "m.safetensors", tensors)
    with pytest.raises(CheckpointError, match="blocks.0.att.key.weight: a weight of magnitude 1e"):
        load_weights(tmp_path / "m.safetensors", dtype="float16")


def test_sparse_layer_numbers_are_reported_as_ranges(tmp_path):
    tensors = random_tensors(1, 8, 10)
    tensors["blocks.20000.ln1.weight"] = np.ones(8, np.float32)
    write_safetensors(tmp_path / "m.safetensors", tensors)
    message = expect_error(tmp_path / "m.safetensors", "blocks 1-19999 are missing")
    assert len(message) < 300


def test_shapes_that_overflow_int64_are_refused(tmp_path):
    tensors = random_tensors(1, 8, 10)
    write_safetensors(tmp_path / "m.safetensors", tensors)
    path = tmp_path / "m.safetensors"

    def edit(h):
        begin = h["head.weight"]["data_offsets"][0]
        h["head.weight"] = {"dtype": "F32", "shape": [2**62, 4], "data_offsets": [begin, begin]}
    _rewrite_header(path, edit)
    with pytest.raises(CheckpointError):
        rwkvx.load(path)
