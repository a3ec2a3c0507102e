"""Checkpoint files -> ModelWeights: format detection, name map, load-time transforms, checks.

Formats, recognised by content rather than by file name (readers in the modules named):
- safetensors with BlinkDL's or transformers' key names, stored float32, float16 or
  bfloat16 (safetensors_io);
- rwkvx's own safetensors layout, written by ``python -m rwkvx.convert``: weights already
  in the run dtype and transformed (safetensors_io);
- PyTorch ``.pth`` zip checkpoints (BlinkDL's releases), read without torch and without
  running any code from the file (pth);
- rwkv.cpp ``.bin`` files: FP32, FP16, Q8_0, Q5_1, Q5_0, Q4_1, Q4_0 (ggml);
- Hugging Face RwkvForCausalLM folders: config.json plus safetensors or pytorch_model.bin,
  sharded or not (hf).

Memory. Files are memory-mapped. Where the stored dtype is what the model runs in (bfloat16
tensors of a bfloat16 run, every tensor of a converted file loaded in its dtype) and for the
embedding, the model's arrays are read-only views of the mapping: no copy is made and the
OS pages weights in as they are first read. Every other tensor is read privately and
converted on its own, so a load holds the weights it keeps plus one tensor in float32.
File mappings, and the one block that converted matrices are written into, ask for 2 MB
pages (hugepages), which decoding reads faster. load_weights(mmap=False) reads into that
block even the matrices it could map, and keeps no view of the file at all.

Checkpoint key strings (BlinkDL's names) appear only here and in the format readers.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np

from rwkvx import demo
from rwkvx.formats import ggml, hf, pth
from rwkvx.errors import RwkvxError
from rwkvx.hugepages import Arena, drop_from_page_cache
from rwkvx.quant import Q4Matrix, QuantizedMatrix, q4_part_nbytes, quantize_q4, quantize_u8
from rwkvx.formats.safetensors_io import FORMAT_NAME, looks_like_safetensors, open_safetensors
from rwkvx.formats.tensorfile import (DTYPE_NAMES, FLOAT_DTYPES, NUMPY_DTYPES, RUN_STORED, MappedFile, Progress,
                              Q4Tensor, QuantizedTensor, TensorSource, fail, n_elements, printable)
from rwkvx.weights import MATRIX_NAMES, ModelWeights, to_bfloat16

# what the weight matrices are kept in while running
DTYPES = ("float32", "bfloat16", "float16", "uint8", "q4")
_FLOAT16_MAX = 65504.0
_RUN_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}

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
_LN0_KEYS = ("blocks.0.ln0.weight", "blocks.0.ln0.bias")

# Key fragments of the later RWKV generations, to name what a file is instead of
# listing dozens of missing tensors.
_OTHER_ARCHITECTURES = (
    (re.compile(r"\.att\.(w0|a0|v0|k_k|k_a|r_k)$"), "RWKV-7"),
    (re.compile(r"\.(time_maa_x|time_decay_w1|time_maa_w1)$"), "RWKV-6"),
    (re.compile(r"\.(time_faaaa|ln_x\.weight|gate\.weight)$"), "RWKV-5"),
)

FORMAT_NAMES = {
    "safetensors": "safetensors",
    FORMAT_NAME: "rwkvx (converted by rwkvx.convert)",
    "pth": "PyTorch zip checkpoint (torch.save)",
    "rwkv.cpp": "rwkv.cpp (ggml)",
    "hf": "Hugging Face folder (RwkvForCausalLM)",
}


# ---- opening: format detection by content ----

def open_checkpoint(path: str | os.PathLike) -> TensorSource:
    """Recognise a checkpoint's format by its content and index its tensors (nothing is read yet).

    The name "demo" (when no such file exists) is the model packaged with rwkvx.
    """
    path = os.fspath(demo.resolve(path))
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if "\0" in path:
        raise fail(printable(path), "a path with a NUL character")
    if os.path.isdir(path):
        source = hf.open_folder(path, _open_file)
    else:
        source = _open_file(path)
        hf.normalise_names(source)
    return source


def _open_file(path: str) -> TensorSource:
    file = MappedFile(path)
    head = file.head(16)
    if head[:4] == pth.ZIP_MAGIC:
        return pth.open_pth(file)
    if head[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05"):
        raise fail(path, "is a legacy PyTorch pickle file (torch.save before 1.6, or with "
                         "_use_new_zipfile_serialization=False); rwkvx does not unpickle such files: "
                         "load and save it again with a current torch, which writes the zip format")
    if len(head) >= 4 and int.from_bytes(head[:4], "little") == ggml.MAGIC:
        return ggml.open_ggml(file)
    if looks_like_safetensors(head):
        return open_safetensors(file)
    raise fail(path, "not a checkpoint rwkvx can read (expected safetensors, a PyTorch .pth zip, "
                     "an rwkv.cpp .bin file or a Hugging Face folder)")


def _check_architecture(source: TensorSource) -> None:
    for pattern, name in _OTHER_ARCHITECTURES:
        if any(pattern.search(key) for key in source.tensors):
            raise fail(source.path, f"this is an {name} checkpoint; rwkvx supports RWKV-4")


# ---- the plan: every tensor's name, shape and role, checked before any data is read ----

@dataclass(frozen=True)
class Plan:
    n_layer: int
    n_embd: int
    n_vocab: int
    n_ffn: int

    def entries(self) -> list[tuple[str, str, int, str]]:
        """(checkpoint key, kind, layer or -1, rwkvx name) in load order; kind is emb, vector or matrix."""
        out = [("emb.weight", "emb", -1, "emb"),
               (_LN0_KEYS[0], "vector", -1, "ln0_weight"), (_LN0_KEYS[1], "vector", -1, "ln0_bias")]
        for layer in range(self.n_layer):
            for suffix, name in _BLOCK_KEYS.items():
                kind = "matrix" if name in MATRIX_NAMES else "vector"
                out.append((f"blocks.{layer}.{suffix}", kind, layer, name))
        out += [("ln_out.weight", "vector", -1, "ln_out_weight"), ("ln_out.bias", "vector", -1, "ln_out_bias"),
                ("head.weight", "matrix", -1, "head")]
        return out

    def matrix_shapes(self) -> list[tuple[int, int]]:
        c, f = self.n_embd, self.n_ffn
        return [(c, c)] * 5 * self.n_layer + [(f, c), (c, f)] * self.n_layer + [(self.n_vocab, c)]


def plan(source: TensorSource) -> Plan:
    """Check every name and shape; return the model's sizes or raise listing all problems."""
    _check_architecture(source)
    names = set(source.tensors)
    emb = source.tensors.get("emb.weight")
    if emb is None or len(emb.shape) != 2:
        found = ", ".join(sorted(names)[:5]) + (", ..." if len(names) > 5 else "")
        raise fail(source.path, f"no 2-D emb.weight: not an RWKV-4 checkpoint "
                                f"({FORMAT_NAMES.get(source.format, source.format)}, "
                                f"found {found or 'no tensors'})")
    n_vocab, n_embd = emb.shape
    if n_vocab == 0 or n_embd == 0:
        raise fail(source.path, f"emb.weight: shape {list(emb.shape)} has a zero-sized dimension")
    # at most 6 digits: a name like blocks.99999999999999.x must not size anything
    layers = {int(m.group(1)) for key in names if (m := re.match(r"blocks\.(\d{1,6})\.", key))}
    n_layer = len(layers)
    if n_layer == 0:
        raise fail(source.path, "no blocks.N.* tensors: not an RWKV-4 checkpoint")
    if max(layers) != n_layer - 1:
        # say which layers are missing in ranges, rather than listing every tensor of each;
        # the gaps between present layers, never a list as long as the highest number
        present = sorted(layers)
        spans = [(b + 1, a - 1) for b, a in zip([-1] + present, present) if a > b + 1]
        shown = ", ".join(f"{lo}" if lo == hi else f"{lo}-{hi}" for lo, hi in spans[:10])
        shown += ", ..." if len(spans) > 10 else ""
        raise fail(source.path, f"layers must be numbered 0..N-1: blocks {shown} are missing "
                                f"(highest is blocks.{max(layers)})")
    ffn_key = source.tensors.get("blocks.0.ffn.key.weight")
    n_ffn = ffn_key.shape[0] if ffn_key is not None and len(ffn_key.shape) == 2 else 4 * n_embd
    if n_ffn == 0:
        raise fail(source.path, f"blocks.0.ffn.key.weight: shape {list(ffn_key.shape)} has a zero-sized dimension")
    result = Plan(n_layer, n_embd, n_vocab, n_ffn)

    vec = (n_embd,)
    expected = {}
    for key, kind, _, name in result.entries():
        if kind == "vector":
            expected[key] = vec
        elif name == "ffn_key":
            expected[key] = (n_ffn, n_embd)
        elif name == "ffn_value":
            expected[key] = (n_embd, n_ffn)
        elif name in ("emb", "head"):
            expected[key] = (n_vocab, n_embd)
        else:
            expected[key] = (n_embd, n_embd)

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
        tensor = source.tensors[key]
        actual = tensor.shape
        # time_* vectors are stored (1, 1, C) by BlinkDL's trainer and (C,) by converters
        if len(shape) == 1:
            ok = n_elements(actual) == shape[0] and sum(d != 1 for d in actual) <= 1
        else:
            ok = actual == shape
        if not ok:
            problems.append(f"{key}: expected {list(shape)}, got {list(actual)}")
        elif tensor.dtype not in FLOAT_DTYPES and not isinstance(tensor, (QuantizedTensor, Q4Tensor,
                                                                          ggml.GgmlQuantTensor)):
            problems.append(f"{key}: stored as {tensor.dtype}, expected floating point")
    if problems:
        raise fail(source.path, "; ".join(problems))
    # Every reader checks each tensor against the file; tensors may still overlap (views of
    # one PyTorch storage). Loading reads and converts each one, so their sum bounds what a
    # load allocates: it may not exceed the file. A tensor used twice (a head tied to the
    # embedding, the same bytes named twice) counts once.
    used = {}
    for key in expected:
        t = source.tensors[key]
        parts = t.parts.values() if isinstance(t, (QuantizedTensor, Q4Tensor)) else (t,)
        for p in parts:
            used[(id(p.file), p.offset, p.nbytes, p.dtype, p.strides)] = p.nbytes
    total = sum(used.values())
    if total > source.file_size:
        raise fail(source.path, f"its tensors span {total} bytes, more than the file's {source.file_size}: "
                                "tensors overlap one another (views sharing a storage)")
    return result


# ---- finiteness: NaN or infinite weights make every logit NaN ----

# the bits of a NaN or infinity: all exponent bits set. Compared on the magnitude bits of
# each stored dtype's integer view, in chunks, with one reusable temporary: a pass at
# memory speed, no float conversion
_NONFINITE_BITS = {
    np.dtype(np.float32): (np.uint32, 0x7FFFFFFF, 0x7F800000),
    np.dtype(np.float16): (np.uint16, 0x7FFF, 0x7C00),
    # bfloat16, kept as its uint16 bit patterns
    np.dtype(np.uint16): (np.uint16, 0x7FFF, 0x7F80),
}
_CHECK_CHUNK = 1 << 20


def _first_nonfinite(array: np.ndarray) -> Optional[tuple[int, ...]]:
    """Index of the first NaN/inf in a float32, float16 or bfloat16-bits array, or None."""
    bits = _NONFINITE_BITS.get(array.dtype)
    if bits is None or array.size == 0:
        return None
    itype, mask, limit = bits
    flat = np.ascontiguousarray(array).reshape(-1).view(itype)
    tmp = np.empty(min(_CHECK_CHUNK, flat.size), dtype=itype)
    for start in range(0, flat.size, _CHECK_CHUNK):
        chunk = flat[start:start + _CHECK_CHUNK]
        t = tmp[:chunk.size]
        np.bitwise_and(chunk, mask, out=t)
        if t.max() >= limit:
            first = start + int(np.flatnonzero(t >= limit)[0])
            return tuple(int(i) for i in np.unravel_index(first, array.shape))
    return None


def check_finite(source: TensorSource, key: str, value) -> None:
    """Raise CheckpointError naming the tensor when `value` (an array as kept, or the float
    parts of a QuantizedMatrix) holds a NaN or an infinity."""
    if isinstance(value, QuantizedMatrix):
        arrays = [value.mx, value.rx, value.my, value.ry]
    elif isinstance(value, Q4Matrix):
        # the integer parts are always finite
        arrays = [value.D, value.M]
    else:
        arrays = [value]
    for array in arrays:
        at = _first_nonfinite(array)
        if at is None:
            continue
        x = array[at]
        if array.dtype == np.uint16:  # bfloat16 bits: the top half of a float32
            x = np.array([int(x) << 16], dtype=np.uint32).view(np.float32)[0]
        raise fail(source.path, f"{key} holds {'NaN' if np.isnan(x) else 'infinite'} values (first at index "
                                f"{list(at)}): the file is damaged, or was saved from a training run that diverged")


# ---- per-tensor conversion to what the model keeps ----

def _checked(source: TensorSource, key: str, value, check: str, mapped: bool):
    """value, after the finiteness check `check` asks for: "all" every tensor, "read" those
    read into memory (not those left mapped), "none" none."""
    if check == "all" or (check == "read" and not mapped):
        check_finite(source, key, value)
    return value


def read_embedding(source: TensorSource, tensor, copy_mapped: bool, check: str = "read") -> np.ndarray:
    """emb.weight as the model keeps it, for any architecture: a view of the file when stored
    float32, float16 or bfloat16 (a private copy with copy_mapped), else float32."""
    # the embedding stays as stored (one row per token is widened when looked up)
    if tensor.dtype in ("F32", "F16", "BF16"):
        view = None if copy_mapped else tensor.view()
        if view is not None:
            return _checked(source, "emb.weight", view, check, mapped=True)
        return _checked(source, "emb.weight", tensor.read(), check, mapped=False)
    if isinstance(tensor, (QuantizedTensor, Q4Tensor)):
        raise fail(source.path, f"emb.weight: an embedding stored as {_stored_kind(tensor)} is not supported")
    return _checked(source, "emb.weight", tensor.float32(), check, mapped=False)


def _vector(source: TensorSource, key: str, tensor, n_embd: int, copy_mapped: bool,
            check: str = "read") -> np.ndarray:
    if isinstance(tensor, (QuantizedTensor, Q4Tensor)):
        raise fail(source.path, f"{key}: expected a float32 vector, got a {_stored_kind(tensor)} matrix")
    view = tensor.view() if tensor.dtype == "F32" and not copy_mapped else None
    v = (view if view is not None else tensor.float32()).reshape(n_embd)
    # vectors are small: checked even when mapped, as stored (before the decay transform)
    _checked(source, key, v, check, mapped=False)
    if key.endswith(".att.time_decay") and not source.decay_is_transformed:
        # the real decay per token is e^{-e^x}: keep its log, -e^x, computed in float64.
        # Above x = 88, e^x passes float32's range; the decay is 0 either way, so x is capped
        # there and the log stays finite (-1.65e38), not -inf
        v = (-np.exp(np.minimum(v.astype(np.float64), 88.0))).astype(np.float32)
    return v


def matrix_format(dtype: str, key: str) -> str:
    """The format the matrix `key` is kept in for the run dtype `dtype`: q4 keeps the head in
    uint8. Measured (KL against float32, nats per byte of held-out text), all-q4 against q4
    with a uint8 head: the demo model 1.97e-2 -> 1.63e-2, rwkv.cpp's tiny RWKV-4 9.4e-3 ->
    1.8e-3, tiny RWKV-7 9.6e-4 -> 1.2e-5, tiny RWKV-5 5.7e-2 -> 5.4e-2; for 2% more bytes
    a token at 7B (32 x 4096, vocabulary 65536), 12% at 430M (24 x 1024, 50277)."""
    return "uint8" if dtype == "q4" and key == "head.weight" else dtype


def _stored_kind(tensor) -> str:
    return "q4" if isinstance(tensor, Q4Tensor) else "uint8"


def stored_as_run(tensor, dtype: str) -> bool:
    # the file already holds what the kernels read for dtype (a uint8 or q4 file is only
    # loadable as such): mapped, or read as is, never converted
    return isinstance(tensor, (QuantizedTensor, Q4Tensor)) or tensor.dtype == RUN_STORED.get(dtype)


def read_matrix(source: TensorSource, key: str, tensor, dtype: str, arena: Arena, copy_mapped: bool,
                check: str = "read"):
    """A weight matrix in the run dtype, for any architecture: a view of the file where it
    stores `dtype` (rwkvx's uint8 parts included; read into `arena` with copy_mapped), else
    converted from float32 into `arena`, after the finiteness check `check` asks for (see
    iter_weights). Raises CheckpointError naming the tensor."""
    dtype = matrix_format(dtype, key)
    if isinstance(tensor, QuantizedTensor):
        if dtype == "uint8":
            # rwkvx's uint8 layout: q, mx, rx, my, ry are mapped as they are (or read); the
            # float parts are small and always checked (q, uint8, is always finite)
            if copy_mapped:
                value = tensor.read(q_out=arena.take(tuple(tensor.shape), np.uint8))
            else:
                value = tensor.view()
            return _checked(source, key, value, check, mapped=False)
        raise fail(source.path, f"holds uint8 weights (converted with --dtype uint8), which cannot be "
                                f"loaded as {dtype}: load it with dtype uint8, or convert the original "
                                f"checkpoint to {dtype}")
    if isinstance(tensor, Q4Tensor):
        if dtype == "q4":
            # mapped as they are (or read); the float16 row scales are small and always checked
            value = tensor.read() if copy_mapped else tensor.view()
            if copy_mapped:
                value = _kept_q4(value, arena)
            return _checked(source, key, value, check, mapped=False)
        raise fail(source.path, f"holds q4 weights (converted with --dtype q4), which cannot be "
                                f"loaded as {dtype}: load it with dtype q4, or convert the original "
                                f"checkpoint to {dtype}")
    if stored_as_run(tensor, dtype):
        # the file holds what the kernels read: map it, copy nothing (or read it, if asked)
        if copy_mapped:
            value = tensor.read(out=arena.take(tuple(tensor.shape), NUMPY_DTYPES[tensor.dtype]))
            return _checked(source, key, value, check, mapped=False)
        view = tensor.view()
        if view is not None:
            return _checked(source, key, view, check, mapped=True)
        return _checked(source, key, tensor.read(), check, mapped=False)
    # a private float32 copy, converted on its own: one float tensor at a time; results
    # are written to the arena directly where the conversion allows
    shape = tuple(tensor.shape)
    w = tensor.float32(out=arena.take(shape, np.float32) if dtype == "float32" else None)
    _checked(source, key, w, check, mapped=False)
    if dtype == "uint8":
        try:
            return quantize_u8(w, overwrite=True, q_out=arena.take(shape, np.uint8), name=key)
        except RwkvxError as e:
            raise fail(source.path, str(e)) from None
    if dtype == "q4":
        try:
            return _kept_q4(quantize_q4(w, name=key), arena)
        except RwkvxError as e:
            raise fail(source.path, str(e)) from None
    if dtype == "bfloat16":
        bits = to_bfloat16(w)
        # rounding to nearest takes the float32 values within half a step of 3.4e38 to inf
        at = _first_nonfinite(bits) if check != "none" else None
        if at is not None:
            raise fail(source.path, f"{key}: a weight of magnitude {abs(float(w[at])):g} rounds past "
                                    "bfloat16's largest value; use float32")
        return arena.keep(bits)
    if dtype == "float16":
        biggest = float(max(w.max(), -w.min())) if w.size else 0.0
        if biggest > _FLOAT16_MAX:
            raise fail(source.path, f"{key}: a weight of magnitude {biggest:g} does not fit "
                                    f"float16 (max {_FLOAT16_MAX:g}); use bfloat16 or float32")
        out = arena.take(shape, np.float16)
        if out is None:
            return w.astype(np.float16)
        np.copyto(out, w, casting="same_kind")
        return out
    return w


def _kept_q4(m: Q4Matrix, arena: Arena) -> Q4Matrix:
    # the parts join the block of 2 MB pages (as uint8's q is written there)
    return Q4Matrix(arena.keep(m.q4), arena.keep(m.sd), arena.keep(m.sm), arena.keep(m.D), arena.keep(m.M), m.n_cols)


def run_nbytes(shape: tuple[int, int], dtype: str, padded: bool = False) -> int:
    """Bytes one (n_rows, n_cols) matrix is kept in for `dtype` (uint8: its q only, as the
    arena holds it); padded: each array padded to the arena's cache lines."""
    n_rows, n_cols = shape
    if dtype == "q4":
        parts = q4_part_nbytes(n_rows, n_cols)
        return sum(Arena.arena_nbytes(b) for b in parts) if padded else sum(parts)
    nbytes = n_rows * n_cols * (1 if dtype == "uint8" else _RUN_ITEMSIZE[dtype])
    return Arena.arena_nbytes(nbytes) if padded else nbytes


def held_nbytes(shape: tuple[int, int], fmt: str) -> int:
    """Bytes a model holds for one (n_rows, n_cols) matrix kept in format `fmt`."""
    return run_nbytes(shape, fmt) + (8 * sum(shape) if fmt == "uint8" else 0)


def _arena_nbytes(source: TensorSource, the_plan: Plan, dtype: str, copy_mapped: bool) -> int:
    """Bytes of the matrices _matrix puts in its arena: those it converts (rather than maps)
    for `dtype`, and with copy_mapped the others too."""
    total = 0
    for key, kind, _, _ in the_plan.entries():
        tensor = source.tensors[key]
        fmt = matrix_format(dtype, key)
        if kind == "matrix" and (copy_mapped or not stored_as_run(tensor, fmt)):
            total += run_nbytes(tuple(tensor.shape), fmt, padded=True)
    return total


def check_mode(check_tensors: Optional[bool]) -> str:
    """load_weights' check_tensors as iter_weights' check: True "all", None "read", False "none"."""
    if check_tensors is not None and not isinstance(check_tensors, bool):
        raise RwkvxError(f"check_tensors: expected True, False or None, got {check_tensors!r}")
    return {True: "all", None: "read", False: "none"}[check_tensors]


def iter_weights(source: TensorSource, the_plan: Plan, dtype: str, arena: Optional[Arena] = None,
                 copy_mapped: bool = False, check: str = "read") -> Iterator[tuple[str, str, int, str, object, int]]:
    """Convert tensor by tensor: yields (key, kind, layer, rwkvx name, value, stored bytes).

    value is what ModelWeights keeps: a float32 vector, the embedding as stored, or a matrix
    in `dtype` (a QuantizedMatrix for uint8). Transforms are applied. Converted matrices
    are written into `arena` when one is given; with copy_mapped, so are the matrices that
    would otherwise be views of the file, and nothing is a view of it.
    check: which tensors are scanned for NaN and infinities (a CheckpointError names the
    first bad one): "read" (default) those read or converted into memory, whose data passes
    through the CPU anyway, and the vectors; "all" also those left mapped (which reads the
    whole file); "none" none.
    """
    arena = arena if arena is not None else Arena(0)
    for key, kind, layer, name in the_plan.entries():
        tensor = source.tensors[key]
        if kind == "emb":
            value = read_embedding(source, tensor, copy_mapped, check)
        elif kind == "vector":
            value = _vector(source, key, tensor, the_plan.n_embd, copy_mapped, check)
        else:
            value = read_matrix(source, key, tensor, dtype, arena, copy_mapped, check)
        yield key, kind, layer, name, value, tensor.nbytes
        # the caller holds what it keeps: don't pin this tensor while the next is converted
        del value


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise RwkvxError(f"dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")


def load_weights(path: str | os.PathLike, dtype: str = "float32", *,
                 progress: Optional[bool] = None, mmap: bool = True,
                 check_tensors: Optional[bool] = None, source: Optional[TensorSource] = None) -> ModelWeights:
    """Read a checkpoint (file or Hugging Face folder) into ModelWeights with matrices in `dtype`.

    dtype: one of DTYPES. progress: None draws a progress bar on stderr when it is a terminal
    and the load takes over a second; False never; True always (after a second).
    mmap: matrices stored in `dtype` (and float32 vectors, and the embedding) are views of
    the mapped file; False reads them into memory instead (the matrices in 2 MB pages), then
    drops the file from the page cache (where no other process maps it), so that one copy of
    the weights stays.
    check_tensors: True scans every weight for NaN and infinities (reading a mapped file
    through once); None (default) scans those the load reads or converts anyway (all of
    them unless the file stores `dtype` and is mapped) and the vectors; False none.
    Raises CheckpointError naming the file and every problem found (the first non-finite
    tensor by name). source: path already opened by open_checkpoint, so it is not indexed twice.
    """
    check_dtype(dtype)
    check = check_mode(check_tensors)
    if source is None:
        source = open_checkpoint(path)
    the_plan = plan(source)
    total = sum(source.tensors[key].nbytes for key, *_ in the_plan.entries())
    bar = Progress(f"loading {os.path.basename(os.path.normpath(source.path))}", total, enabled=progress)
    top: dict[str, object] = {}
    blocks: list[dict] = [{} for _ in range(the_plan.n_layer)]
    # converted matrices go to one block in 2 MB pages, as a mapped file's are (hugepages)
    arena = Arena(_arena_nbytes(source, the_plan, dtype, not mmap))
    try:
        for _, _, layer, name, value, nbytes in iter_weights(source, the_plan, dtype, arena, not mmap, check):
            (blocks[layer] if layer >= 0 else top)[name] = value
            bar.advance(nbytes)
    finally:
        bar.close()
    if not mmap:
        for file in source.files:
            drop_from_page_cache(file.path)
    info = {"path": source.path, "format": source.format, "file_size": source.file_size}
    if source.metadata:
        info["metadata"] = dict(source.metadata)
    return ModelWeights(blocks=blocks, dtype=dtype, source=source.format, info=info, **top)


# ---- --info: what a checkpoint holds and what it needs, without reading weights ----

@dataclass
class CheckpointInfo:
    path: str
    format: str
    n_layer: int
    n_embd: int
    n_vocab: int
    n_ffn: int
    stored: str
    embedding: str
    file_size: int
    n_params: int
    # run dtype -> (weight bytes, extra bytes while loading, how) or None when not loadable
    memory: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [
            f"file          {self.path} ({size_text(self.file_size)})",
            f"format        {FORMAT_NAMES.get(self.format, self.format)}",
            f"architecture  RWKV-4: {self.n_layer} layers, n_embd {self.n_embd}, vocabulary {self.n_vocab}, "
            f"ffn {self.n_ffn} ({self.n_params / 1e6:.1f}M parameters)",
            f"stored        {self.stored}; embedding {self.embedding}",
        ]
        if self.format == FORMAT_NAME:
            m = self.metadata
            lines.append(f"converted     to {m.get('dtype')} from {m.get('source')} ({m.get('source_format')}), "
                         f"rwkvx file format version {m.get('format_version')}")
        lines.append("memory by --dtype (weights held; extra while loading):")
        for dtype, entry in self.memory.items():
            if entry is None:
                lines.append(f"  {dtype:<9}  -          not loadable: the file holds {self.metadata.get('dtype')} weights")
                continue
            nbytes, extra, how = entry
            extra_text = f", +{size_text(extra)} while loading" if extra else ""
            lines.append(f"  {dtype:<9}  {size_text(nbytes):>9}  {how}{extra_text}")
        return "\n".join(lines)


def size_text(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def dtype_summary(tensors: list) -> str:
    counts: dict[str, int] = {}
    for t in tensors:
        if isinstance(t, (QuantizedTensor, Q4Tensor)):
            label = f"{_stored_kind(t)} (rwkvx)"
        else:
            label = DTYPE_NAMES.get(t.dtype, t.dtype)
        counts[label] = counts.get(label, 0) + 1
    if len(counts) == 1:
        return next(iter(counts))
    return ", ".join(f"{k} ({v} tensors)" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))


def describe(path: str | os.PathLike) -> CheckpointInfo:
    """Format, shapes, stored dtypes and the memory each run dtype needs; reads headers only."""
    source = open_checkpoint(path)
    p = plan(source)
    entries = p.entries()
    matrices = [source.tensors[k] for k, kind, _, _ in entries if kind == "matrix"]
    emb = source.tensors["emb.weight"]
    emb_bytes = emb.nbytes if emb.dtype in ("F32", "F16", "BF16") else emb.size * 4
    n_vectors = sum(1 for _, kind, _, _ in entries if kind == "vector")
    vector_bytes = n_vectors * p.n_embd * 4
    shapes = p.matrix_shapes()
    elements = sum(r * c for r, c in shapes)
    largest = max(r * c for r, c in shapes)
    memory = {}
    keyed = [(k, tuple(source.tensors[k].shape)) for k, kind, _, _ in entries if kind == "matrix"]
    for dtype in DTYPES:
        formats = {k: matrix_format(dtype, k) for k, _ in keyed}
        nbytes = sum(held_nbytes(shape, formats[k]) for k, shape in keyed)
        # a file of quantised matrices loads only in the formats it holds
        if any(isinstance(source.tensors[k], (QuantizedTensor, Q4Tensor))
               and _stored_kind(source.tensors[k]) != formats[k] for k, _ in keyed):
            memory[dtype] = None
            continue
        if all(stored_as_run(source.tensors[k], formats[k]) for k, _ in keyed):
            how, extra = "mapped from the file, no copy", 0
        elif dtype == "uint8":
            # one matrix in float32, its finiteness check and its uint8 result while quantised
            how, extra = "quantised at load", largest * 6
        elif dtype == "q4":
            # one matrix in float32 and the temporaries of a block of its rows while quantised
            how, extra = "quantised at load", largest * 4 + (16 << 20)
        else:
            how, extra = "converted at load", largest * 4
        if dtype == "q4":
            how += f" ({8 * nbytes / elements:.2f} bits/weight, head uint8)"
        memory[dtype] = (nbytes + emb_bytes + vector_bytes, extra, how)
    return CheckpointInfo(
        path=source.path, format=source.format, n_layer=p.n_layer, n_embd=p.n_embd, n_vocab=p.n_vocab,
        n_ffn=p.n_ffn, stored=dtype_summary(matrices), embedding=dtype_summary([emb]),
        file_size=source.file_size, n_params=elements + emb.size + n_vectors * p.n_embd,
        memory=memory, metadata=dict(source.metadata))

