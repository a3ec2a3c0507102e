"""Random RWKV-5.2/6/7 checkpoints for the arch tests, in BlinkDL's layout
(rwkvx.arch.random_weights) and as rwkv.cpp's converter (python/convert_pytorch_to_ggml.py)
writes them, so a model can be read in both layouts and compared.
"""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from rwkvx.arch.random_weights import random_checkpoint  # noqa: F401 (re-exported for the tests)


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], dtype: str = "float32") -> Path:
    from rwkvx.testing import write_safetensors as write
    write(path, tensors, dtype=dtype)
    return path


def rwkv_cpp_tensors(version: str, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What rwkv.cpp's converter writes for BlinkDL's tensors (float32)."""
    out = {}
    if version == "v7":
        packed = {}
        for k, v in tensors.items():
            if ".att.x_" in k:
                layer = k.split(".")[1]
                packed.setdefault(layer, []).append(v)
        for k, v in tensors.items():
            if ".att.x_" in k:
                layer = k.split(".")[1]
                if k.endswith(".att.x_r"):
                    out[f"blocks.{layer}.att.x_rwkvag"] = np.concatenate(packed[layer], axis=0)
                continue
            out[k] = v
        tensors, out = out, {}
    n_head = next(v.shape[0] for k, v in tensors.items() if k.endswith((".time_faaaa", ".r_k")))
    for k, v in tensors.items():
        v = v.astype(np.float32)
        if ".time_" in k:
            v = np.squeeze(v)
        if version == "v7":
            if any(s in k for s in (".w1", ".w2", ".a1", ".a2", ".v1", ".v2", ".g1", ".g2")):
                v = v.T
        elif version == "v6":
            if ".time_faaaa" in k:
                v = v[..., None]
            if ".time_maa_w1" in k or ".time_decay_w" in k:
                v = v.T
            if ".time_maa_w2" in k:
                v = v.transpose(0, 2, 1)
            if ".time_decay" in k and "_w" not in k:
                v = v.reshape(n_head, -1, 1)
        else:
            if ".time_decay" in k:
                v = np.exp(-np.exp(v))[..., None]
            if ".time_faaaa" in k:
                v = v[..., None]
        out[k] = np.ascontiguousarray(v, dtype=np.float32)
    return out


def write_rwkv_cpp(path: Path, version: str, tensors: dict[str, np.ndarray]) -> Path:
    """An rwkv.cpp FP32 .bin (format version 101) of BlinkDL's tensors."""
    tensors = rwkv_cpp_tensors(version, tensors)
    n_vocab, n_embd = tensors["emb.weight"].shape
    n_layer = len({k.split(".")[1] for k in tensors if k.startswith("blocks.")})
    with open(path, "wb") as f:
        f.write(struct.pack("<6i", 0x67676D66, 101, n_vocab, n_embd, n_layer, 0))
        for k, v in tensors.items():
            key = k.encode()
            f.write(struct.pack("<3i", v.ndim, len(key), 0))
            f.write(struct.pack(f"<{v.ndim}i", *reversed(v.shape)))
            f.write(key)
            f.write(v.tobytes())
    return path
