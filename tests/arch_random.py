"""Random RWKV-5.2/6/7 checkpoints with BlinkDL's names and shapes, for the arch tests.

Values are scaled like trained models (mixes in [0, 1], decays spread over fast and slow
channels, matrices N(0, 1/n_in)), so every path of the math is exercised. write_rwkv_cpp
applies rwkv.cpp's converter (python/convert_pytorch_to_ggml.py) to the same tensors, so a
model can be read in both layouts and compared.
"""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np


def random_checkpoint(version: str, n_layer=3, n_embd=64, head_size=16, n_vocab=97, n_ffn=None,
                      seed=0, lora=8) -> dict[str, np.ndarray]:
    """BlinkDL's tensors of a random model; version "v5", "v6" or "v7"."""
    rng = np.random.default_rng(seed)
    c, h = n_embd, n_embd // head_size
    f = n_ffn or 4 * n_embd

    def mat(rows, cols, scale=1.0):
        return (rng.standard_normal((rows, cols)) * scale / np.sqrt(cols)).astype(np.float32)

    def vec(lo=0.0, hi=1.0, shape=(1, 1, c)):
        return rng.uniform(lo, hi, shape).astype(np.float32)

    t = {"emb.weight": rng.standard_normal((n_vocab, c)).astype(np.float32),
         "blocks.0.ln0.weight": vec(0.8, 1.2, (c,)), "blocks.0.ln0.bias": vec(-0.1, 0.1, (c,))}
    for layer in range(n_layer):
        b, att, ffn = f"blocks.{layer}.", f"blocks.{layer}.att.", f"blocks.{layer}.ffn."
        for ln in ("ln1", "ln2"):
            t[f"{b}{ln}.weight"] = vec(0.8, 1.2, (c,))
            t[f"{b}{ln}.bias"] = vec(-0.1, 0.1, (c,))
        if version == "v5":
            # ln_x and gate before time_decay: the rwkv package detects 5.2 in key order
            t[att + "ln_x.weight"] = vec(0.5, 1.5, (c,))
            t[att + "ln_x.bias"] = vec(-0.1, 0.1, (c,))
            t[att + "gate.weight"] = mat(c, c)
            for m in "kvrg":
                t[att + f"time_mix_{m}"] = vec()
            t[att + "time_decay"] = vec(-5, 1, (h, head_size))
            t[att + "time_faaaa"] = vec(-1, 1, (h, head_size))
            for m in ("receptance", "key", "value", "output"):
                t[f"{att}{m}.weight"] = mat(c, c)
            t[ffn + "time_mix_k"] = vec()
            t[ffn + "time_mix_r"] = vec()
        elif version == "v6":
            for m in "xwkvrg":
                t[att + f"time_maa_{m}"] = vec()
            t[att + "time_maa_w1"] = (rng.standard_normal((c, 5 * lora)) * 0.5 / np.sqrt(c)).astype(np.float32)
            t[att + "time_maa_w2"] = (rng.standard_normal((5, lora, c)) * 0.5 / np.sqrt(lora)).astype(np.float32)
            t[att + "time_decay"] = vec(-5, 1)
            t[att + "time_decay_w1"] = (rng.standard_normal((c, 2 * lora)) * 0.5 / np.sqrt(c)).astype(np.float32)
            t[att + "time_decay_w2"] = (rng.standard_normal((2 * lora, c)) * 0.5 / np.sqrt(2 * lora)).astype(np.float32)
            t[att + "time_faaaa"] = vec(-1, 1, (h, head_size))
            for m in ("receptance", "key", "value", "output", "gate"):
                t[f"{att}{m}.weight"] = mat(c, c)
            t[att + "ln_x.weight"] = vec(0.5, 1.5, (c,))
            t[att + "ln_x.bias"] = vec(-0.1, 0.1, (c,))
            t[ffn + "time_maa_k"] = vec()
            t[ffn + "time_maa_r"] = vec()
        else:
            for m in "rwkvag":
                t[att + f"x_{m}"] = vec()
            ranks = {"w": lora, "a": lora, "v": lora // 2, "g": 2 * lora}
            for name, rank in ranks.items():
                if name == "v" and layer == 0:
                    continue
                if name != "g":
                    t[att + f"{name}0"] = vec(-1, 1) if name != "w" else vec(-4, 1)
                t[att + f"{name}1"] = (rng.standard_normal((c, rank)) / np.sqrt(c)).astype(np.float32)
                t[att + f"{name}2"] = (rng.standard_normal((rank, c)) * 0.5 / np.sqrt(rank)).astype(np.float32)
            t[att + "k_k"] = vec(0.5, 1.0)
            t[att + "k_a"] = vec(0.0, 1.0)
            t[att + "r_k"] = vec(-0.5, 0.5, (h, head_size))
            for m in ("receptance", "key", "value", "output"):
                t[f"{att}{m}.weight"] = mat(c, c)
            t[att + "ln_x.weight"] = vec(0.5, 1.5, (c,))
            t[att + "ln_x.bias"] = vec(-0.1, 0.1, (c,))
            t[ffn + "x_k"] = vec()
        t[ffn + "key.weight"] = mat(f, c)
        if version != "v7":
            t[ffn + "receptance.weight"] = mat(c, c)
        t[ffn + "value.weight"] = mat(c, f)
    t["ln_out.weight"] = vec(0.8, 1.2, (c,))
    t["ln_out.bias"] = vec(-0.1, 0.1, (c,))
    t["head.weight"] = mat(n_vocab, c)
    return t


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
