"""rwkv.cpp .bin files in every data type: FP32/FP16, and ggml's Q8_0, Q5_1, Q5_0, Q4_1, Q4_0 blocks.

The quantised files are written here by a numpy transcription of ggml's reference quantisers
(quantize_row_*_ref in ggml-quants.c), which also gives the exact dequantised values the
loader must produce, independently of the loader's unpacking."""
import struct

import numpy as np
import pytest

import rwkvx
from rwkvx.errors import CheckpointError
from rwkvx.loader import load_weights, open_checkpoint
from rwkvx.reference import Reference
from rwkvx.testing import random_tensors

from conftest import TINY_EXPECTED, TINY_MODEL, shared_file

TYPE_IDS = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q5_0": 7, "Q5_1": 8, "Q8_0": 9}
QUANT = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]


def _f16(a):
    return a.astype(np.float16)


def quantize(kind, x):
    """ggml's reference quantiser for a float32 matrix whose rows are whole blocks of 32.

    Returns (the packed blocks as bytes, the float32 values ggml's dequantiser gives back)."""
    blocks = x.astype(np.float32).reshape(-1, 32)
    n = len(blocks)
    if kind in ("Q4_0", "Q5_0", "Q8_0"):
        amax_at = np.abs(blocks).argmax(axis=1)
        signed_max = blocks[np.arange(n), amax_at]
        if kind == "Q8_0":
            d = np.abs(blocks).max(axis=1) / 127
        else:
            d = signed_max / (-8 if kind == "Q4_0" else -16)
        with np.errstate(divide="ignore"):
            inv = np.where(d != 0, 1 / d, 0).astype(np.float32)
        if kind == "Q8_0":
            # roundf: halves away from zero
            scaled = blocks * inv[:, None]
            q = (np.sign(scaled) * np.floor(np.abs(scaled) + 0.5)).astype(np.int8)
            dh = _f16(d)
            packed = np.concatenate([dh.view(np.uint8).reshape(n, 2), q.view(np.uint8)], axis=1)
            return packed.tobytes(), (q.astype(np.float32) * dh.astype(np.float32)[:, None]).reshape(x.shape)
        top, offset = (15, 8.5) if kind == "Q4_0" else (31, 16.5)
        # (int8_t)(x + 8.5f): truncation toward zero, then MIN with the top code
        q = np.minimum(top, np.trunc(blocks * inv[:, None] + offset)).astype(np.uint8)
        dh = _f16(d)
        values = (q.astype(np.float32) - (8 if kind == "Q4_0" else 16)) * dh.astype(np.float32)[:, None]
        mh = None
    else:
        lo, hi = blocks.min(axis=1), blocks.max(axis=1)
        top = 15 if kind == "Q4_1" else 31
        d = (hi - lo) / top
        with np.errstate(divide="ignore"):
            inv = np.where(d != 0, 1 / d, 0).astype(np.float32)
        q = np.minimum(top, np.trunc((blocks - lo[:, None]) * inv[:, None] + 0.5)).astype(np.uint8)
        dh, mh = _f16(d), _f16(lo)
        values = q.astype(np.float32) * dh.astype(np.float32)[:, None]
        values += mh.astype(np.float32)[:, None]
    nibbles = (q[:, :16] & 15) | ((q[:, 16:] & 15) << 4)
    parts = [dh.view(np.uint8).reshape(n, 2)]
    if mh is not None:
        parts.append(mh.view(np.uint8).reshape(n, 2))
    if kind in ("Q5_0", "Q5_1"):
        fifth = ((q >> 4) & 1).astype(np.uint32)
        qh = (fifth << np.arange(32, dtype=np.uint32)).sum(axis=1, dtype=np.uint32)
        parts.append(qh.astype("<u4").view(np.uint8).reshape(n, 4))
    parts.append(nibbles.astype(np.uint8))
    return np.concatenate(parts, axis=1).tobytes(), values.reshape(x.shape)


def write_rwkv_cpp(path, tensors, types, version=101):
    """tensors: BlinkDL names -> float32 arrays (as rwkv.cpp stores them); types: name -> data type.

    Returns name -> the values a reader must get back."""
    emb = tensors["emb.weight"]
    n_layer = 1 + max(int(k.split(".")[1]) for k in tensors if k.startswith("blocks."))
    out = bytearray(struct.pack("<6i", 0x67676D66, version, emb.shape[0], emb.shape[1], n_layer, 1))
    expected = {}
    for name, value in tensors.items():
        kind = types.get(name, "F32")
        key = name.encode()
        out += struct.pack("<3i", len(value.shape), len(key), TYPE_IDS[kind])
        out += struct.pack(f"<{value.ndim}i", *reversed(value.shape)) + key
        if kind == "F32":
            data, expected[name] = value.astype("<f4").tobytes(), value
        elif kind == "F16":
            data, expected[name] = _f16(value).tobytes(), _f16(value).astype(np.float32)
        else:
            data, expected[name] = quantize(kind, value)
        out += data
    path.write_bytes(bytes(out))
    return expected


def rwkv_cpp_tensors(n_layer, n_embd, n_vocab, seed=0):
    """A random model as rwkv.cpp stores it: time vectors squeezed, decay as -exp(raw)."""
    t = random_tensors(n_layer, n_embd, n_vocab, seed=seed, time_shape="flat")
    for i in range(n_layer):
        t[f"blocks.{i}.att.time_decay"] = -np.exp(t[f"blocks.{i}.att.time_decay"])
    return t


def matrices_but_emb_and_head(tensors, kind):
    # rwkv.cpp's quantiser keeps the embedding and the head in float
    return {k: kind for k, v in tensors.items() if v.ndim == 2 and k not in ("emb.weight", "head.weight")}


@pytest.mark.parametrize("kind", QUANT)
@pytest.mark.parametrize("shape", [(1, 32), (3, 64), (17, 96), (33, 160)])
def test_dequantised_blocks_match_the_reference(tmp_path, kind, shape):
    rng = np.random.default_rng(sum(shape))
    x = (rng.standard_normal(shape) * np.cos(np.arange(shape[1]))).astype(np.float32)
    x[0, :32] = 0  # an all-zero block has scale 0
    tensors = {"emb.weight": np.zeros((4, 8), np.float32), "blocks.0.x": x}
    expected = write_rwkv_cpp(tmp_path / "q.bin", tensors, {"blocks.0.x": kind})
    tensor = open_checkpoint(tmp_path / "q.bin").tensors["blocks.0.x"]
    assert tensor.dtype == kind and tensor.shape == shape and tensor.view() is None
    np.testing.assert_array_equal(tensor.float32(), expected["blocks.0.x"])


# relative RMSE of quantise -> dequantise on N(0, 1) data, measured once with the loader:
# Q4_0 0.0860, Q4_1 0.0778, Q5_0 0.0427, Q5_1 0.0379, Q8_0 0.00533; budgets are 1.5x those
ROUND_TRIP_BUDGET = {"Q4_0": 0.129, "Q4_1": 0.117, "Q5_0": 0.064, "Q5_1": 0.057, "Q8_0": 0.0080}


@pytest.mark.parametrize("kind", QUANT)
def test_round_trip_error(tmp_path, kind):
    x = np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32)
    write_rwkv_cpp(tmp_path / "q.bin", {"emb.weight": np.zeros((4, 8), np.float32), "blocks.0.x": x},
                   {"blocks.0.x": kind})
    back = open_checkpoint(tmp_path / "q.bin").tensors["blocks.0.x"].float32()
    rmse = np.sqrt(np.mean((back - x) ** 2)) / np.sqrt(np.mean(x ** 2))
    assert rmse <= ROUND_TRIP_BUDGET[kind]


@pytest.mark.parametrize("kind", ["F16"] + QUANT)
@pytest.mark.parametrize("dtype", ["float32", "uint8"])
def test_quantised_model_runs_like_the_reference_of_its_dequantised_weights(tmp_path, kind, dtype):
    tensors = rwkv_cpp_tensors(2, 64, 97)
    types = matrices_but_emb_and_head(tensors, kind)
    types["head.weight"] = kind
    write_rwkv_cpp(tmp_path / "q.bin", tensors, types)
    w = load_weights(tmp_path / "q.bin", dtype=dtype)
    assert w.source == "rwkv.cpp"
    tokens = list(range(0, 97, 5))
    logits, _ = rwkvx.RWKV(w).forward(tokens)
    ref, _ = Reference(w).forward(tokens)
    assert np.abs(logits - ref).max() <= 1e-3


def test_quantised_embedding_is_dequantised_to_float32(tmp_path):
    tensors = rwkv_cpp_tensors(1, 32, 10)
    expected = write_rwkv_cpp(tmp_path / "q.bin", tensors, {"emb.weight": "Q8_0"})
    w = load_weights(tmp_path / "q.bin")
    assert w.emb.dtype == np.float32
    np.testing.assert_array_equal(w.emb, expected["emb.weight"])


# max |logit - rwkv.cpp's FP32 logit| / max |logit|, measured once: Q4_0 0.062, Q4_1 0.036,
# Q5_0 0.021, Q5_1 0.017, Q8_0 0.0034; budgets are 1.5x those
TINY_BUDGET = {"Q4_0": 0.093, "Q4_1": 0.054, "Q5_0": 0.032, "Q5_1": 0.025, "Q8_0": 0.0051}


@pytest.mark.parametrize("kind", QUANT)
def test_tiny_trained_model_quantised_like_rwkv_cpp(tmp_path, kind):
    # re-write the real FP32 model with its matrices quantised, as rwkv.cpp's quantiser does
    source = open_checkpoint(shared_file(TINY_MODEL))
    tensors = {name: t.float32() for name, t in source.tensors.items()}
    write_rwkv_cpp(tmp_path / "q.bin", tensors, matrices_but_emb_and_head(tensors, kind))
    expected = np.fromfile(shared_file(TINY_EXPECTED), dtype="<f4")
    logits, _ = rwkvx.load(tmp_path / "q.bin").forward([34, 105, 110])
    assert np.abs(logits - expected).max() <= TINY_BUDGET[kind] * np.abs(expected).max()
    assert logits.argmax() == expected.argmax()


def test_tiny_model_round_trip_through_our_writer_is_exact(tmp_path):
    source = open_checkpoint(shared_file(TINY_MODEL))
    write_rwkv_cpp(tmp_path / "f.bin", {n: t.float32() for n, t in source.tensors.items()}, {})
    expected = np.fromfile(shared_file(TINY_EXPECTED), dtype="<f4")
    logits, _ = rwkvx.load(tmp_path / "f.bin").forward([34, 105, 110])
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


# ---- bad files ----

def expect_error(path, match):
    with pytest.raises(CheckpointError, match=match) as info:
        load_weights(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def _small(tmp_path, kind="Q8_0", version=101):
    tensors = {"emb.weight": np.zeros((4, 8), np.float32), "blocks.0.x": np.ones((2, 64), np.float32)}
    write_rwkv_cpp(tmp_path / "q.bin", tensors, {"blocks.0.x": kind}, version=version)
    return tmp_path / "q.bin"


def test_version_100_quantised_files_are_refused(tmp_path):
    expect_error(_small(tmp_path, version=100), "pre-2023-05-27 block layout")


def test_unknown_version(tmp_path):
    expect_error(_small(tmp_path, version=7), "version 7 is not supported")


def test_unknown_data_type(tmp_path):
    path = _small(tmp_path)
    data = bytearray(path.read_bytes())
    # the second record's data type field
    pos = 24 + 12 + 8 + len(b"emb.weight") + 4 * 8 * 4
    struct.pack_into("<i", data, pos + 8, 5)
    path.write_bytes(bytes(data))
    expect_error(path, "unknown rwkv.cpp data type 5")


def test_rows_that_are_not_whole_blocks(tmp_path):
    path = tmp_path / "q.bin"
    out = bytearray(struct.pack("<6i", 0x67676D66, 101, 4, 8, 1, 1))
    key = b"blocks.0.x"
    out += struct.pack("<3i", 2, len(key), TYPE_IDS["Q8_0"]) + struct.pack("<2i", 48, 2) + key + b"\0" * 200
    path.write_bytes(bytes(out))
    expect_error(path, "rows of 48 weights are not whole blocks of 32")


def test_truncated_quantised_tensor(tmp_path):
    path = _small(tmp_path)
    path.write_bytes(path.read_bytes()[:-10])
    expect_error(path, "truncated: tensor blocks.0.x needs 136 bytes")
