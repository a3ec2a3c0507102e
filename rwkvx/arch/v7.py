"""RWKV-7 "Goose" (x070): the generalised delta rule.

Per head, the state S (N values x N keys) evolves as

    S = S·diag(w) + (S·(−κ̂)) (κ̂·a)ᵀ + v kᵀ        y = S r

with a data-dependent decay w, the normalised "removal key" κ̂ and in-context learning
rate a; v is mixed towards layer 0's value (the value residual). Written after BlinkDL's
RWKV-v7/rwkv_v7_numpy.py and ChatRWKV's RWKV_x070 (rwkv pip package).
"""
from __future__ import annotations

import numpy as np

from rwkvx.arch.common import (ATT_XX, FFN_XX, GROUP_NORM_EPS, group_norm, layer_norm, one_row_each, sigmoid,
                               wkv_matrices)
from rwkvx.weights import linear

NAME = "RWKV-7"
ID = "x070"

# the matrices that run in the model's dtype; every other tensor stays float32
LINEAR = ("att_receptance", "att_key", "att_value", "att_output", "ffn_key", "ffn_value")
MIXES = "rwkvag"
LORAS = ("w", "a", "v", "g")
LOW_RANK = tuple(f"att_{lora}{i}" for lora in LORAS for i in "12")
# rwkvx.convert writes these (in, out), the orientation their kernel reads (_lowrank.h)
STORED_IN_OUT = LOW_RANK
# e^-0.5: the decay per token is exp(-e^-0.5 · sigmoid(.)), in (e^-0.607, 1)
DECAY_SCALE = float(np.exp(-0.5))

# early x070 checkpoints name the same tensors with time_* prefixes
_OLD_NAMES = {
    "w0": "time_decay", "w1": "time_decay_w1", "w2": "time_decay_w2",
    "a0": "time_aaaaa", "a1": "time_aaa_w1", "a2": "time_aaa_w2",
    "v0": "time_misc_v", "v1": "mv_w1", "v2": "mv_w2",
    "g1": "gate_w1", "g2": "gate_w2",
    "k_k": "time_misc_kkk", "k_a": "time_misc_a", "r_k": "time_faaaa",
    **{f"x_{c}": f"time_maa_{c}" for c in MIXES},
}


def recognise(names: set[str]) -> bool:
    return "blocks.0.att.ln_x.weight" in names and \
        any(n.endswith((".att.k_k", ".att.r_k", ".att.x_rwkvag", ".att.time_misc_kkk")) for n in names)


def heads(source) -> tuple[int, int]:
    """(n_head, head_size) from the bonus r_k (H, N); a single head may be stored (N,) or (1, N)."""
    from rwkvx.formats.tensorfile import fail
    for key in ("blocks.0.att.r_k", "blocks.0.att.time_faaaa"):
        t = source.tensors.get(key)
        if t is not None:
            shape = [d for d in t.shape if d != 1]
            if len(shape) in (1, 2):
                return (1, shape[0]) if len(shape) == 1 else (shape[0], shape[1])
    raise fail(source.path, "RWKV-7 checkpoint without a (heads, head size) blocks.0.att.r_k")


def read_block(reader, layer: int, n_embd: int, n_head: int, head_size: int) -> dict:
    """One layer's tensors: BlinkDL's names and layouts (.pth, safetensors), or rwkv.cpp's,
    whose converter packs the six token-shift mixes into att.x_rwkvag (6, 1, C) and stores
    the low-rank matrices transposed (already (out, in)), or rwkvx.convert's (the mixes apart,
    the low-rank matrices (in, out) as BlinkDL's, or (out, in) in files converted before
    that, whose metadata lacks low_rank = "in,out")."""
    att, ffn, c = f"blocks.{layer}.att.", f"blocks.{layer}.ffn.", n_embd
    old = not reader.has(att + "k_k") and reader.has(att + "time_misc_kkk")

    def name(short):
        return att + (_OLD_NAMES[short] if old else short)

    p = {}
    if reader.has(att + "x_rwkvag"):
        packed = reader.values(att + "x_rwkvag", 6 * c)
        packed = np.zeros((6, c), np.float32) if packed is None else packed.reshape(6, c)
        for i, m in enumerate(MIXES):
            p[f"att_x_{m}"] = np.ascontiguousarray(packed[i])
    else:
        for m in MIXES:
            p[f"att_x_{m}"] = reader.vector(name(f"x_{m}"), c)
    for lora in LORAS:
        if lora == "v" and layer == 0:
            # layer 0 makes v_first; its v0/v1/v2, if stored, are never used
            for i in "012":
                reader.used.add(name(f"v{i}"))
            continue
        if lora != "g":
            p[f"att_{lora}0"] = reader.vector(name(f"{lora}0"), c)
        rank = reader.low_rank_out(name(f"{lora}1"))
        for i, shape in (("1", (rank, c)), ("2", (c, rank))):
            # (out, in) for the specification; a view of the file's (in, out) where it has those
            p[f"att_{lora}{i}"] = reader.low_rank(name(f"{lora}{i}"), shape)
    p["att_k_k"] = reader.vector(name("k_k"), c)
    p["att_k_a"] = reader.vector(name("k_a"), c)
    p["att_r_k"] = reader.heads(name("r_k"), n_head, head_size)
    for m in ("receptance", "key", "value", "output"):
        p[f"att_{m}"] = reader.big(f"{att}{m}.weight", (c, c))
    p["att_ln_x_weight"] = reader.vector(att + "ln_x.weight", c)
    p["att_ln_x_bias"] = reader.vector(att + "ln_x.bias", c)
    p["ffn_x_k"] = reader.vector(ffn + ("time_maa_k" if old else "x_k"), c)
    key = reader.source.tensors.get(ffn + "key.weight")
    n_ffn = key.shape[0] if key is not None and len(key.shape) == 2 else 4 * c
    p["ffn_key"] = reader.big(ffn + "key.weight", (n_ffn, c))
    p["ffn_value"] = reader.big(ffn + "value.weight", (c, n_ffn))
    return p


# ---- the specification (float64, one token) ----

def time_mixing(x, s, p, v_first, eps=GROUP_NORM_EPS):
    """x: ln1(x) (C,); s: this layer's state, updated in place; v_first: layer 0's v (None
    in layer 0). Returns (output, v_first)."""
    n_head, n = p["att_r_k"].shape
    last_x, s[ATT_XX] = s[ATT_XX].copy(), x
    xr, xw, xk, xv, xa, xg = (x + (last_x - x) * p[f"att_x_{m}"] for m in MIXES)

    r = p["att_receptance"] @ xr
    w = np.exp(-DECAY_SCALE * sigmoid(p["att_w0"] + p["att_w2"] @ np.tanh(p["att_w1"] @ xw)))
    k = p["att_key"] @ xk
    v = p["att_value"] @ xv
    a = sigmoid(p["att_a0"] + p["att_a2"] @ (p["att_a1"] @ xa))
    g = p["att_g2"] @ sigmoid(p["att_g1"] @ xg)

    kk = (k * p["att_k_k"]).reshape(n_head, n)
    kk = kk / np.maximum(np.linalg.norm(kk, axis=1, keepdims=True), 1e-12)
    k = k * (1 + (a - 1) * p["att_k_a"])
    if v_first is None:
        v_first = v
    else:
        v = v + (v_first - v) * sigmoid(p["att_v0"] + p["att_v2"] @ (p["att_v1"] @ xv))

    r, w, k, v, a = (t.reshape(n_head, n) for t in (r, w, k, v, a))
    S = wkv_matrices(s, n_head)  # (H, N values, N keys)
    S[:] = S * w[:, None, :] + (S @ -kk[:, :, None]) * (kk * a)[:, None, :] + v[:, :, None] * k[:, None, :]
    y = (S @ r[:, :, None])[:, :, 0]

    y = group_norm(y.reshape(-1), p["att_ln_x_weight"], p["att_ln_x_bias"], n_head, eps)
    y = y + ((r * k * p["att_r_k"]).sum(axis=1, keepdims=True) * v).reshape(-1)
    return p["att_output"] @ (y * g), v_first


def channel_mixing(x, s, p):
    last_x, s[FFN_XX] = s[FFN_XX].copy(), x
    k = np.square(np.maximum(p["ffn_key"] @ (x + (last_x - x) * p["ffn_x_k"]), 0))
    return p["ffn_value"] @ k


def block(x, s, p, v_first, eps=GROUP_NORM_EPS):
    dx, v_first = time_mixing(layer_norm(x, p["ln1_weight"], p["ln1_bias"]), s, p, v_first, eps)
    x = x + dx
    x = x + channel_mixing(layer_norm(x, p["ln2_weight"], p["ln2_bias"]), s, p)
    return x, v_first


# ---- the runtime (float32; big matrices in the run dtype) ----

class Layer:
    """One RWKV-7 layer ready to run: forward(X, states, starts, v_first, n_threads) moves
    the rows X (R, C) of one or more sequences (sequence b: rows starts[b]..starts[b+1])
    through it in place, updating their layer states states[b] (2 + N, C)."""

    def __init__(self, p: dict, n_head: int, arithmetic: str = "float32"):
        from rwkvx.arch.common import low_rank_in_out
        self.p = p
        self.n_head = n_head
        self.lin = {name: linear(p[name], arithmetic) for name in LINEAR}
        self.low = low_rank_in_out(p, LOW_RANK)  # layer 0 has no v1, v2
        self.r_k = p["att_r_k"].reshape(-1)
        self.mixes = np.stack([p[f"att_x_{m}"] for m in MIXES])
        self.ffn_mix = p["ffn_x_k"].reshape(1, -1)
        from rwkvx.kernels._step import V7Step
        self.step = V7Step(p, self.lin, self.low, self.mixes, n_head, DECAY_SCALE, GROUP_NORM_EPS)

    def forward(self, X, states, starts, v_first, n):
        T, C = X.shape
        if one_row_each(starts, T):
            # one decoded token for each sequence: the same kernels in one call from Python
            # (rwkvx.kernels._step)
            if v_first is None:
                v_first = np.empty((T, C), np.float32)
            self.step.batch(X, states, states.sources, v_first, n)
            return v_first
        from rwkvx.kernels._wkv import lora_act, mix_rows, v7_prepare, wkv7
        from rwkvx.arch.common import heads_of, lowrank, matmul, norm_rows, products, shift, wkv_threads
        p, L, H = self.p, self.lin, self.n_head
        x = norm_rows(X, p["ln1_weight"], p["ln1_bias"], n)
        mixed = np.empty((6, T, C), np.float32)
        mix_rows(x, shift(x, states, ATT_XX, starts), self.mixes, mixed, n)
        xr, xw, xk, xv, xa, xg = mixed
        # the projections, and the low-rank paths' two halves
        layer0 = v_first is None
        low = [("att_w1", xw), ("att_a1", xa), ("att_g1", xg)] + ([] if layer0 else [("att_v1", xv)])
        w, a, g, *mv = lowrank(self.low, low, n)
        r, k, v = products([(L["att_receptance"], xr), (L["att_key"], xk), (L["att_value"], xv)], n)
        lora_act(w, g)  # tanh, sigmoid
        w, a, g, *mv = lowrank(self.low, [("att_w2", w), ("att_a2", a), ("att_g2", g)]
                               + ([] if layer0 else [("att_v2", mv[0])]), n)
        # decay, in-context rate, removal key, key and value residual (in place)
        kk, b = np.empty((T, C), np.float32), np.empty((T, C), np.float32)
        v7_prepare(w, k, v, a, None if layer0 else mv[0], v_first, p["att_w0"], p["att_a0"], p.get("att_v0"),
                   p["att_k_k"], p["att_k_a"], kk, b, n_head=H, decay_scale=DECAY_SCALE, n_threads=n)
        if layer0:
            v_first = v

        y = np.empty((T, C), np.float32)
        wkv7(r, w, k, v, kk, b, self.r_k,
             p["att_ln_x_weight"], p["att_ln_x_bias"], g, heads_of(states, H), starts, y, eps=GROUP_NORM_EPS,
             n_threads=wkv_threads(T, H, C // H, n), sources=heads_of(states.sources, H))
        X += matmul(L["att_output"], y, n)

        x = norm_rows(X, p["ln2_weight"], p["ln2_bias"], n)
        xk = np.empty((1, T, C), np.float32)
        mix_rows(x, shift(x, states, FFN_XX, starts), self.ffn_mix, xk, n)
        k = matmul(L["ffn_key"], xk[0], n)
        np.square(np.maximum(k, 0, out=k), out=k)  # in place: (T, 4C) is the layer's largest array
        X += matmul(L["ffn_value"], k, n)
        return v_first
