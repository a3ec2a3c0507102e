"""Random RWKV-4 checkpoints of any shape, for tests and benchmarks.

Real checkpoints cannot ship with the package; these have the real key names, shapes
and value ranges (weights ~ N(0, 1/n_cols), decays and mixes like a trained model's),
so every code path and every speed measurement can run without a download.
"""
from __future__ import annotations

import json
import os
from typing import Callable

import numpy as np

from rwkvx.weights import to_bfloat16


class LazyTensor:
    """A tensor whose shape is known now and whose values are made when make() runs.

    The random generators below draw every tensor from one stream, so the make() calls of
    one model must run in the order its tensors are listed (write_safetensors does).
    """

    def __init__(self, shape: tuple[int, ...], make: Callable[[], np.ndarray]):
        self.shape = tuple(int(d) for d in shape)
        self._make = make

    def make(self) -> np.ndarray:
        return self._make()


# The float64 draw of a 65536 x 4096 head would take 2 GB (4 with its scaled copy) beside
# the 1 GB float32 result; drawn in blocks of rows it costs a block. numpy's Generator fills
# an array in order, so the blocks hold the same numbers as one draw of the whole.
_BLOCK_BYTES = 64 << 20


def draw_normal(rng: np.random.Generator, shape: tuple[int, ...], scale: float = 1.0,
                divisor: float = 1.0) -> np.ndarray:
    """float32 standard_normal(shape) * scale / divisor, the float64 draw made a block of rows at a time."""
    out = np.empty(shape, dtype=np.float32)
    if out.size == 0:
        return out
    row = out.size // shape[0]
    step = max(1, _BLOCK_BYTES // (8 * row))
    for start in range(0, shape[0], step):
        stop = min(shape[0], start + step)
        block = rng.standard_normal((stop - start,) + tuple(shape[1:]))
        out[start:stop] = block * scale / divisor
    return out


def random_tensors(n_layer: int, n_embd: int, n_vocab: int, *, n_ffn: int | None = None,
                   seed: int = 0, time_shape: str = "blinkdl", lazy: bool = False) -> dict:
    """BlinkDL-named float32 tensors of a random RWKV-4.

    time_shape "blinkdl" stores time_* vectors as (1, 1, C) like the trainer; "flat" as (C,).
    lazy=True returns LazyTensors instead (shapes now, values made in order on demand), so
    a model bigger than memory can be written one tensor at a time; the values are the same.
    """
    rng = np.random.default_rng(seed)
    n_ffn = 4 * n_embd if n_ffn is None else n_ffn
    c = n_embd
    vec_shape = (1, 1, c) if time_shape == "blinkdl" else (c,)

    def mat(rows: int, cols: int) -> LazyTensor:
        return LazyTensor((rows, cols), lambda: draw_normal(rng, (rows, cols), divisor=np.sqrt(cols)))

    def vec(values: Callable[[], np.ndarray]) -> LazyTensor:
        return LazyTensor(vec_shape, lambda: values().astype(np.float32).reshape(vec_shape))

    def norm_weight() -> LazyTensor:
        return LazyTensor((c,), lambda: (1 + 0.1 * rng.standard_normal(c)).astype(np.float32))

    def norm_bias() -> LazyTensor:
        return LazyTensor((c,), lambda: (0.1 * rng.standard_normal(c)).astype(np.float32))

    t = {"emb.weight": LazyTensor((n_vocab, c), lambda: draw_normal(rng, (n_vocab, c)))}
    t["blocks.0.ln0.weight"] = norm_weight()
    t["blocks.0.ln0.bias"] = norm_bias()
    for i in range(n_layer):
        p = f"blocks.{i}."
        for ln in ("ln1", "ln2"):
            t[p + ln + ".weight"] = norm_weight()
            t[p + ln + ".bias"] = norm_bias()
        # raw decay spans fast (e^-e^1) to slow (e^-e^-6) channels, as in trained models
        t[p + "att.time_decay"] = LazyTensor((c,), lambda: rng.uniform(-6, 1, c).astype(np.float32))
        t[p + "att.time_first"] = vec(lambda: rng.uniform(-1, 1, c) + np.log(0.3))
        for name in ("att.time_mix_k", "att.time_mix_v", "att.time_mix_r", "ffn.time_mix_k", "ffn.time_mix_r"):
            t[p + name] = vec(lambda: rng.uniform(0, 1, c))
        for name in ("att.key", "att.value", "att.receptance", "att.output", "ffn.receptance"):
            t[p + name + ".weight"] = mat(c, c)
        t[p + "ffn.key.weight"] = mat(n_ffn, c)
        t[p + "ffn.value.weight"] = mat(c, n_ffn)
    t["ln_out.weight"] = norm_weight()
    t["ln_out.bias"] = norm_bias()
    t["head.weight"] = mat(n_vocab, c)
    return t if lazy else materialise(t)


def materialise(tensors: dict[str, LazyTensor]) -> dict[str, np.ndarray]:
    """The arrays of LazyTensors, made in order."""
    return {name: value.make() for name, value in tensors.items()}


def write_safetensors(path: str | os.PathLike, tensors: dict, dtype: str = "float32",
                      metadata: dict[str, str] | None = None, align: int = 8) -> None:
    """Write tensors as a safetensors file stored in dtype ("float32", "float16" or "bfloat16"),
    the data starting `align`-byte aligned: 8 as the reference writer does, 64 as torch's
    .pth archives and rwkvx.convert place tensors (mapped bfloat16 matrices 16 bytes off a
    cache line decoded 12% slower: RWKV-7 0.4B shape, Zen 4).

    Values are arrays or LazyTensors; a LazyTensor is made only when its turn comes and
    dropped once written, so the memory needed is one tensor, not the model. Each is
    converted and written a block of rows at a time (bfloat16 rounding of a whole 1 GB
    tensor would take four times that in temporaries).

    Written directly (the format is an 8-byte length, a JSON header and raw data) because
    the safetensors package's numpy API has no bfloat16.
    """
    code = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}[dtype]
    itemsize = {"float32": 4, "float16": 2, "bfloat16": 2}[dtype]
    header, offset = {}, 0
    for name, value in tensors.items():
        nbytes = int(np.prod(value.shape, dtype=np.int64)) * itemsize
        header[name] = {"dtype": code, "shape": list(value.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = dict(metadata)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % align)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for name in list(tensors):
            value = tensors[name]
            array = value.make() if isinstance(value, LazyTensor) else np.asarray(value)
            if array.shape != tuple(header[name]["shape"]):
                raise ValueError(f"{name}: expected shape {tuple(header[name]['shape'])}, got {array.shape}")
            _write_converted(f, array, dtype)
            del array


def _write_converted(f, array: np.ndarray, dtype: str) -> None:
    flat = np.ascontiguousarray(array).reshape(-1)
    step = _BLOCK_BYTES // 8
    for start in range(0, flat.size, step):
        block = flat[start:start + step]
        if dtype == "bfloat16":
            raw = to_bfloat16(block)
        else:
            raw = np.ascontiguousarray(block, dtype=np.float32 if dtype == "float32" else np.float16)
        f.write(raw.tobytes())
