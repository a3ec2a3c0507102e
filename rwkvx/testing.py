"""Random RWKV-4 checkpoints of any shape, for tests and benchmarks.

Real checkpoints cannot ship with the package; these have the real key names, shapes
and value ranges (weights ~ N(0, 1/n_cols), decays and mixes like a trained model's),
so every code path and every speed measurement can run without a download.
"""
from __future__ import annotations

import json
import os

import numpy as np

from rwkvx.weights import to_bfloat16


def random_tensors(n_layer: int, n_embd: int, n_vocab: int, *, n_ffn: int | None = None,
                   seed: int = 0, time_shape: str = "blinkdl") -> dict[str, np.ndarray]:
    """BlinkDL-named float32 tensors of a random RWKV-4.

    time_shape "blinkdl" stores time_* vectors as (1, 1, C) like the trainer; "flat" as (C,).
    """
    rng = np.random.default_rng(seed)
    n_ffn = 4 * n_embd if n_ffn is None else n_ffn
    c = n_embd

    def mat(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    def vec(values: np.ndarray) -> np.ndarray:
        values = values.astype(np.float32)
        return values.reshape(1, 1, c) if time_shape == "blinkdl" else values

    t = {"emb.weight": rng.standard_normal((n_vocab, c)).astype(np.float32)}
    t["blocks.0.ln0.weight"] = (1 + 0.1 * rng.standard_normal(c)).astype(np.float32)
    t["blocks.0.ln0.bias"] = (0.1 * rng.standard_normal(c)).astype(np.float32)
    for i in range(n_layer):
        p = f"blocks.{i}."
        for ln in ("ln1", "ln2"):
            t[p + ln + ".weight"] = (1 + 0.1 * rng.standard_normal(c)).astype(np.float32)
            t[p + ln + ".bias"] = (0.1 * rng.standard_normal(c)).astype(np.float32)
        # raw decay spans fast (e^-e^1) to slow (e^-e^-6) channels, as in trained models
        t[p + "att.time_decay"] = rng.uniform(-6, 1, c).astype(np.float32)
        t[p + "att.time_first"] = vec(rng.uniform(-1, 1, c) + np.log(0.3))
        for name in ("att.time_mix_k", "att.time_mix_v", "att.time_mix_r", "ffn.time_mix_k", "ffn.time_mix_r"):
            t[p + name] = vec(rng.uniform(0, 1, c))
        for name in ("att.key", "att.value", "att.receptance", "att.output", "ffn.receptance"):
            t[p + name + ".weight"] = mat(c, c)
        t[p + "ffn.key.weight"] = mat(n_ffn, c)
        t[p + "ffn.value.weight"] = mat(c, n_ffn)
    t["ln_out.weight"] = (1 + 0.1 * rng.standard_normal(c)).astype(np.float32)
    t["ln_out.bias"] = (0.1 * rng.standard_normal(c)).astype(np.float32)
    t["head.weight"] = mat(n_vocab, c)
    return t


def write_safetensors(path: str | os.PathLike, tensors: dict[str, np.ndarray], dtype: str = "float32",
                      metadata: dict[str, str] | None = None) -> None:
    """Write tensors as a safetensors file stored in dtype ("float32", "float16" or "bfloat16").

    Written directly (the format is an 8-byte length, a JSON header and raw data) because
    the safetensors package's numpy API has no bfloat16.
    """
    code = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}[dtype]
    header, blobs, offset = {}, [], 0
    for name, value in tensors.items():
        if dtype == "bfloat16":
            raw = to_bfloat16(value)
        else:
            raw = np.ascontiguousarray(value, dtype=np.float32 if dtype == "float32" else np.float16)
        data = raw.tobytes()
        header[name] = {"dtype": code, "shape": list(value.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    if metadata:
        header["__metadata__"] = dict(metadata)
    text = json.dumps(header, separators=(",", ":")).encode()
    # pad the header so tensor data starts 8-byte aligned, as the reference writer does
    text += b" " * (-(8 + len(text)) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for data in blobs:
            f.write(data)
