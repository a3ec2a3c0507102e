"""Checkpoint files -> ModelWeights: format detection, name map, load-time transforms, checks.

Formats read here, recognised by content rather than by file name:
- safetensors with BlinkDL's key names, stored float32, float16 or bfloat16;
- rwkv.cpp's ``.bin`` (ggmf magic, versions 100 and 101) in FP32 or FP16.

Files are memory-mapped. Where the stored dtype is what the model runs in (bfloat16
tensors of a bfloat16 run, and so on) and for the embedding, the model's arrays are
read-only views of the mapping: no copy is made and the OS pages weights in as they are
first read. Otherwise tensors are
converted one at a time, so at most one float tensor exists besides the weights kept.
Checkpoint key strings appear only in this module.
"""
from __future__ import annotations

import json
import mmap
import os
import re
import struct
from typing import Callable

import numpy as np

from rwkvx.errors import CheckpointError, RwkvxError
from rwkvx.quant import quantize_u8
from rwkvx.weights import MATRIX_NAMES, VECTOR_NAMES, ModelWeights, to_bfloat16, to_float32

# what the weight matrices are kept in while running
DTYPES = ("float32", "bfloat16", "float16", "uint8")
_STORED = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
_FLOAT16_MAX = 65504.0

# checkpoint suffix after "blocks.N." -> rwkvx name
_BLOCK_KEYS = {
    "ln1.weight": "ln1_weight",
    "ln1.bias": "ln1_bias",
    "ln2.weight": "ln2_weight",
    "ln2.bias": "ln2_bias",
    "att.time_mix_k": "att_time_mix_k",
    "att.time_mix_v": "att_time_mix_v",
    "att.time_mix_r": "att_time_mix_r",
    "att.time_first": "att_time_first",
    "att.time_decay": "att_time_decay",
    "att.key.weight": "att_key",
    "att.value.weight": "att_value",
    "att.receptance.weight": "att_receptance",
    "att.output.weight": "att_output",
    "ffn.time_mix_k": "ffn_time_mix_k",
    "ffn.time_mix_r": "ffn_time_mix_r",
    "ffn.key.weight": "ffn_key",
    "ffn.receptance.weight": "ffn_receptance",
    "ffn.value.weight": "ffn_value",
}
_TOP_KEYS = ("emb.weight", "ln_out.weight", "ln_out.bias", "head.weight")
_LN0_KEYS = ("blocks.0.ln0.weight", "blocks.0.ln0.bias")

# Key fragments of the later RWKV generations, to name what a file is instead of
# listing dozens of missing tensors.
_OTHER_ARCHITECTURES = (
    (re.compile(r"\.att\.(w0|a0|v0|k_k|k_a|r_k)$"), "RWKV-7"),
    (re.compile(r"\.(time_maa_x|time_decay_w1|time_maa_w1)$"), "RWKV-6"),
    (re.compile(r"\.(time_faaaa|ln_x\.weight|gate\.weight)$"), "RWKV-5"),
)

_SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}
_GGML_MAGIC = 0x67676D66
_GGML_TYPES = {0: ("F32", np.float32), 1: ("F16", np.float16)}
_GGML_QUANT_NAMES = {2: "Q4_0", 3: "Q4_1", 7: "Q5_0", 8: "Q5_1", 9: "Q8_0"}


class TensorSource:
    """Named raw tensors of one file: name -> (stored dtype name, shape, array view)."""

    def __init__(self, path: str, fmt: str, decay_is_transformed: bool):
        self.path = path
        self.format = fmt
        # rwkv.cpp stores att.time_decay as -exp(raw) already
        self.decay_is_transformed = decay_is_transformed
        self.tensors: dict[str, tuple[str, tuple[int, ...], Callable[[], np.ndarray]]] = {}

    def stored(self, name: str) -> tuple[str, np.ndarray]:
        """The stored dtype name (F32, F16, BF16) and a view of the file (bfloat16 as uint16)."""
        dtype, _, view = self.tensors[name]
        return dtype, view()

    def float32(self, name: str) -> np.ndarray:
        """The tensor as float32: a view of the file when stored float32, else a new array."""
        return to_float32(self.stored(name)[1])


def _fail(path: str, message: str) -> CheckpointError:
    return CheckpointError(f"{path}: {message}")


def _open_map(path: str) -> tuple[mmap.mmap | None, int]:
    try:
        if os.path.isdir(path):
            raise _fail(path, "is a directory, not a checkpoint file")
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise _fail(path, "file is empty")
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), size
    except FileNotFoundError:
        raise _fail(path, "no such file") from None
    except PermissionError:
        raise _fail(path, "permission denied") from None
    except OSError as e:
        raise _fail(path, f"cannot read: {e.strerror or e}") from None


def _view(buf, np_dtype, offset: int, shape: tuple[int, ...]) -> Callable[[], np.ndarray]:
    count = int(np.prod(shape, dtype=np.int64))

    def make() -> np.ndarray:
        return np.frombuffer(buf, dtype=np_dtype, count=count, offset=offset).reshape(shape)

    return make


def open_safetensors(path: str, buf: mmap.mmap, size: int) -> TensorSource:
    """Parse and check a safetensors header; tensors become lazy views of the mapping."""
    (header_len,) = struct.unpack("<Q", buf[:8])
    if 8 + header_len > size:
        raise _fail(path, f"truncated: the header needs {8 + header_len} bytes, the file has {size}")
    try:
        header = json.loads(bytes(buf[8:8 + header_len]))
    except (UnicodeDecodeError, ValueError) as e:
        raise _fail(path, f"safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise _fail(path, "safetensors header is not a JSON object")
    data_start = 8 + header_len
    data_size = size - data_start
    source = TensorSource(path, "safetensors", decay_is_transformed=False)
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            if not all(isinstance(d, int) and d >= 0 for d in shape + (begin, end)):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise _fail(path, f"tensor {name}: malformed header entry {entry!r}") from None
        if dtype not in _SAFETENSORS_DTYPES:
            raise _fail(path, f"tensor {name}: unsupported dtype {dtype} (expected F32, F16 or BF16)")
        np_dtype = _SAFETENSORS_DTYPES[dtype]
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(np_dtype).itemsize
        if end - begin != nbytes:
            raise _fail(path, f"tensor {name}: shape {list(shape)} {dtype} needs {nbytes} bytes, "
                              f"its offsets span {end - begin}")
        if end > data_size:
            raise _fail(path, f"truncated: tensor {name} ends at byte {data_start + end}, "
                              f"the file has {size}")
        spans.append((begin, end, name))
        source.tensors[name] = (dtype, shape, _view(buf, np_dtype, data_start + begin, shape))
    spans.sort()
    for (_, end_a, name_a), (begin_b, _, name_b) in zip(spans, spans[1:]):
        if begin_b < end_a:
            raise _fail(path, f"tensors {name_a} and {name_b} overlap in the file")
    return source


def open_ggml(path: str, buf: mmap.mmap, size: int) -> TensorSource:
    """Parse rwkv.cpp's format (see the README of the test models for its layout)."""
    if size < 24:
        raise _fail(path, "truncated: rwkv.cpp header is 24 bytes")
    _, version, n_vocab, n_embd, _, _ = struct.unpack_from("<6i", buf, 0)
    if version not in (100, 101):
        raise _fail(path, f"rwkv.cpp file version {version} is not supported (expected 100 or 101)")
    source = TensorSource(path, "rwkv.cpp", decay_is_transformed=True)
    pos = 24
    while pos < size:
        if pos + 12 > size:
            raise _fail(path, f"truncated: tensor header at byte {pos}")
        n_dims, key_len, type_id = struct.unpack_from("<3i", buf, pos)
        pos += 12
        if not 1 <= n_dims <= 4 or not 0 < key_len < 4096:
            raise _fail(path, f"corrupt tensor header at byte {pos - 12}")
        if pos + 4 * n_dims + key_len > size:
            raise _fail(path, f"truncated: tensor header at byte {pos - 12}")
        dims = struct.unpack_from(f"<{n_dims}i", buf, pos)
        pos += 4 * n_dims
        try:
            name = bytes(buf[pos:pos + key_len]).decode("utf-8")
        except UnicodeDecodeError:
            raise _fail(path, f"tensor name at byte {pos} is not UTF-8") from None
        pos += key_len
        if type_id in _GGML_QUANT_NAMES:
            raise _fail(path, f"tensor {name} is {_GGML_QUANT_NAMES[type_id]}: quantised rwkv.cpp "
                              "files are not supported yet (use an FP32 or FP16 file)")
        if type_id not in _GGML_TYPES:
            raise _fail(path, f"tensor {name}: unknown rwkv.cpp data type {type_id}")
        if any(d < 0 for d in dims):
            raise _fail(path, f"tensor {name}: negative dimension {dims}")
        dtype, np_dtype = _GGML_TYPES[type_id]
        # rwkv.cpp stores dimensions reversed against PyTorch's shape
        shape = tuple(reversed(dims))
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(np_dtype).itemsize
        if pos + nbytes > size:
            raise _fail(path, f"truncated: tensor {name} needs {nbytes} bytes at byte {pos}, "
                              f"the file has {size}")
        source.tensors[name] = (dtype, shape, _view(buf, np_dtype, pos, shape))
        pos += nbytes
    emb = source.tensors.get("emb.weight")
    if emb is not None and emb[1] != (n_vocab, n_embd):
        raise _fail(path, f"header says n_vocab={n_vocab}, n_embd={n_embd} but emb.weight is {list(emb[1])}")
    return source


def open_checkpoint(path: str | os.PathLike) -> TensorSource:
    """Recognise the file's format by its first bytes and index its tensors."""
    path = os.fspath(path)
    buf, size = _open_map(path)
    head = bytes(buf[:8])
    if head[:4] == b"PK\x03\x04":
        raise _fail(path, "is a PyTorch zip checkpoint (.pth); convert it to safetensors first "
                          "(see 'Getting a model' in the README)")
    if head[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05"):
        raise _fail(path, "is a pickle file; rwkvx does not unpickle (convert it to safetensors)")
    if len(head) >= 4 and struct.unpack("<I", head[:4])[0] == _GGML_MAGIC:
        return open_ggml(path, buf, size)
    if len(head) == 8:
        (header_len,) = struct.unpack("<Q", head)
        if 2 <= header_len <= 100_000_000 and bytes(buf[8:9]) == b"{":
            return open_safetensors(path, buf, size)
    raise _fail(path, "not a checkpoint rwkvx can read (expected safetensors or an rwkv.cpp .bin file)")


def _check_architecture(source: TensorSource) -> None:
    for pattern, name in _OTHER_ARCHITECTURES:
        if any(pattern.search(key) for key in source.tensors):
            raise _fail(source.path, f"this is an {name} checkpoint; rwkvx supports RWKV-4")


def _plan(source: TensorSource) -> tuple[int, int, int, int]:
    """Check every name and shape; return (n_layer, n_embd, n_vocab, n_ffn) or raise listing all problems."""
    names = set(source.tensors)
    if "emb.weight" not in names or len(source.tensors["emb.weight"][1]) != 2:
        found = ", ".join(sorted(names)[:5]) + (", ..." if len(names) > 5 else "")
        raise _fail(source.path, f"no 2-D emb.weight: not an RWKV-4 checkpoint (found {found or 'no tensors'})")
    n_vocab, n_embd = source.tensors["emb.weight"][1]
    layers = {int(m.group(1)) for key in names if (m := re.match(r"blocks\.(\d+)\.", key))}
    n_layer = max(layers) + 1 if layers else 0
    if n_layer == 0:
        raise _fail(source.path, "no blocks.N.* tensors: not an RWKV-4 checkpoint")
    ffn_key = source.tensors.get("blocks.0.ffn.key.weight")
    n_ffn = ffn_key[1][0] if ffn_key is not None and len(ffn_key[1]) == 2 else 4 * n_embd

    vec = (n_embd,)
    expected = {"emb.weight": (n_vocab, n_embd), "ln_out.weight": vec, "ln_out.bias": vec,
                "head.weight": (n_vocab, n_embd), _LN0_KEYS[0]: vec, _LN0_KEYS[1]: vec}
    for layer in range(n_layer):
        for suffix, name in _BLOCK_KEYS.items():
            shape = vec if name in VECTOR_NAMES else (n_embd, n_embd)
            if name == "ffn_key":
                shape = (n_ffn, n_embd)
            elif name == "ffn_value":
                shape = (n_embd, n_ffn)
            expected[f"blocks.{layer}.{suffix}"] = shape

    problems = []
    missing = [key for key in expected if key not in names]
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {', '.join(missing)}")
    unexpected = sorted(names - set(expected))
    if unexpected:
        problems.append(f"unexpected tensor(s): {', '.join(unexpected)}")
    for key, shape in expected.items():
        if key not in names:
            continue
        actual = source.tensors[key][1]
        # time_* vectors are stored (1, 1, C) by BlinkDL's trainer and (C,) by converters
        if len(shape) == 1:
            ok = int(np.prod(actual)) == shape[0] and sum(d != 1 for d in actual) <= 1
        else:
            ok = actual == shape
        if not ok:
            problems.append(f"{key}: expected {list(shape)}, got {list(actual)}")
    if problems:
        raise _fail(source.path, "; ".join(problems))
    return n_layer, n_embd, n_vocab, n_ffn


def load_weights(path: str | os.PathLike, dtype: str = "float32") -> ModelWeights:
    """Read a checkpoint into ModelWeights with matrices in `dtype` (one of DTYPES).

    Raises CheckpointError naming the file and every problem found.
    """
    if dtype not in DTYPES:
        raise RwkvxError(f"dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    source = open_checkpoint(path)
    _check_architecture(source)
    n_layer, n_embd, _, _ = _plan(source)

    def vector(key: str) -> np.ndarray:
        return np.ascontiguousarray(source.float32(key).reshape(n_embd), dtype=np.float32)

    def matrix(key: str):
        stored, raw = source.stored(key)
        if stored == _STORED.get(dtype):
            # the file holds what the kernels read: map it, copy nothing
            return raw
        w = to_float32(raw)
        if dtype == "uint8":
            # quantise from a private float copy, overwritten in place: one float tensor at a time
            return quantize_u8(w if w.flags.writeable else w.copy(), overwrite=True)
        if dtype == "bfloat16":
            return to_bfloat16(w)
        if dtype == "float16":
            biggest = float(np.abs(w).max())
            if biggest > _FLOAT16_MAX:
                raise _fail(source.path, f"{key}: a weight of magnitude {biggest:g} does not fit "
                                         f"float16 (max {_FLOAT16_MAX:g}); use bfloat16 or float32")
            return w.astype(np.float16)
        return w

    blocks = []
    for layer in range(n_layer):
        block = {}
        for suffix, name in _BLOCK_KEYS.items():
            key = f"blocks.{layer}.{suffix}"
            block[name] = matrix(key) if name in MATRIX_NAMES else vector(key)
        if not source.decay_is_transformed:
            # the real decay per token is e^{-e^x}: keep its log, -e^x, computed in float64
            raw = block["att_time_decay"].astype(np.float64)
            block["att_time_decay"] = (-np.exp(raw)).astype(np.float32)
        blocks.append(block)

    return ModelWeights(
        # the embedding stays as stored: one row per token is widened when looked up
        emb=source.stored("emb.weight")[1],
        ln0_weight=vector(_LN0_KEYS[0]),
        ln0_bias=vector(_LN0_KEYS[1]),
        blocks=blocks,
        ln_out_weight=vector("ln_out.weight"),
        ln_out_bias=vector("ln_out.bias"),
        head=matrix("head.weight"),
        dtype=dtype,
        source=source.format,
    )
