"""RWKV-5.2 "Eagle" (x052): multi-headed matrix-valued state with a static per-channel decay.

Per head, the state S (N keys x N values) evolves as

    y = rᵀ (diag(u) kᵀv + S)        S = diag(w) S + kᵀv

with w = exp(-exp(time_decay)) and the bonus u = time_faaaa, followed by a group norm over
heads (ln_x) and a SiLU gate. Channel mixing is RWKV-4's. Written after ChatRWKV's
att_one_v5_1 / v5.2 path (rwkv pip package).
"""
from __future__ import annotations

import numpy as np

from rwkvx.arch.common import (ATT_XX, FFN_XX, GROUP_NORM_EPS, group_norm, layer_norm, one_row_each, silu,
                               wkv_matrices)
# RWKV-5.2's channel mixing is RWKV-4's (the state's FFN_XX row is row 0 in both layouts)
from rwkvx.reference import channel_mixing
from rwkvx.weights import linear

NAME = "RWKV-5"
ID = "x052"

LINEAR = ("att_receptance", "att_key", "att_value", "att_gate", "att_output",
          "ffn_key", "ffn_receptance", "ffn_value")


def recognise(names: set[str]) -> bool:
    return "blocks.0.att.ln_x.weight" in names and \
        not any(n.endswith((".att.time_maa_x", ".att.k_k", ".att.r_k", ".att.x_rwkvag", ".att.time_misc_kkk"))
                for n in names)


def heads(source) -> tuple[int, int]:
    """(n_head, head_size). 5.2 keeps one decay per channel: (H, N) in BlinkDL's files, (H, N, 1)
    in rwkv.cpp's, (N, 1) there for a single head; 5.0/5.1 keep one per head."""
    from rwkvx.formats.tensorfile import fail
    decay = source.tensors.get("blocks.0.att.time_decay")
    emb = source.tensors.get("emb.weight")
    n_embd = emb.shape[-1] if emb is not None else (decay.size if decay is not None else 0)
    if decay is None or "blocks.0.att.gate.weight" not in source.tensors or decay.size != n_embd:
        raise fail(source.path, "this is an RWKV-5.0 or 5.1 checkpoint (one decay per head); "
                                "rwkvx runs RWKV-4, 5.2, 6 and 7")
    shape = tuple(decay.shape)
    if len(shape) >= 2 and shape[1] > 1:
        return shape[0], shape[1]
    return 1, n_embd


def read_block(reader, layer: int, n_embd: int, n_head: int, head_size: int) -> dict:
    """One layer's tensors. rwkv.cpp's converter stores time_decay as exp(-exp(raw)) (H, N, 1)
    and time_faaaa as (H, N, 1), rwkvx.convert both as exp(-exp(raw)) (H, N); BlinkDL's files
    hold the raw (H, N)."""
    att, ffn, c = f"blocks.{layer}.att.", f"blocks.{layer}.ffn.", n_embd
    p = {f"att_time_mix_{m}": reader.vector(f"{att}time_mix_{m}", c) for m in "kvrg"}
    decay = reader.heads(att + "time_decay", n_head, head_size)
    if not reader.transformed:
        # the decay per token is e^{-e^x}: keep the factor, computed in float64
        decay = np.exp(-np.exp(decay.astype(np.float64))).astype(np.float32)
    p["att_time_decay"] = decay
    p["att_time_faaaa"] = reader.heads(att + "time_faaaa", n_head, head_size)
    for m in ("receptance", "key", "value", "gate", "output"):
        p[f"att_{m}"] = reader.big(f"{att}{m}.weight", (c, c))
    p["att_ln_x_weight"] = reader.vector(att + "ln_x.weight", c)
    p["att_ln_x_bias"] = reader.vector(att + "ln_x.bias", c)
    p.update(read_ffn_v4(reader, ffn, c, "time_mix"))
    return p


def read_ffn_v4(reader, ffn: str, c: int, mix: str) -> dict:
    key = reader.source.tensors.get(ffn + "key.weight")
    n_ffn = key.shape[0] if key is not None and len(key.shape) == 2 else 4 * c
    return {
        f"ffn_{mix}_k": reader.vector(f"{ffn}{mix}_k", c),
        f"ffn_{mix}_r": reader.vector(f"{ffn}{mix}_r", c),
        "ffn_key": reader.big(ffn + "key.weight", (n_ffn, c)),
        "ffn_receptance": reader.big(ffn + "receptance.weight", (c, c)),
        "ffn_value": reader.big(ffn + "value.weight", (c, n_ffn)),
    }


# ---- the specification (float64, one token) ----

def wkv(r, k, v, w, u, S):
    """One step of every head; r, k, v (H, N), w, u (H, N); S (H, N, N) updated in place."""
    kv = k[:, :, None] * v[:, None, :]
    y = (r[:, None, :] @ (u[:, :, None] * kv + S))[:, 0, :]
    S[:] = kv + w[:, :, None] * S
    return y


def time_mixing(x, s, p, eps=GROUP_NORM_EPS):
    n_head, n = p["att_time_faaaa"].shape
    last_x, s[ATT_XX] = s[ATT_XX].copy(), x
    xk, xv, xr, xg = (x * p[f"att_time_mix_{m}"] + last_x * (1 - p[f"att_time_mix_{m}"]) for m in "kvrg")

    r = (p["att_receptance"] @ xr).reshape(n_head, n)
    k = (p["att_key"] @ xk).reshape(n_head, n)
    v = (p["att_value"] @ xv).reshape(n_head, n)
    g = silu(p["att_gate"] @ xg)

    y = wkv(r, k, v, p["att_time_decay"], p["att_time_faaaa"], wkv_matrices(s, n_head))
    y = group_norm(y.reshape(-1), p["att_ln_x_weight"], p["att_ln_x_bias"], n_head, eps)
    return p["att_output"] @ (y * g)


def block(x, s, p, carry=None, eps=GROUP_NORM_EPS):
    x = x + time_mixing(layer_norm(x, p["ln1_weight"], p["ln1_bias"]), s, p, eps)
    x = x + channel_mixing(layer_norm(x, p["ln2_weight"], p["ln2_bias"]), s, p)
    return x, None


# ---- the runtime (float32; big matrices in the run dtype) ----

def channel_mixing_rows(X, states, starts, p, L, n, mixes):
    """RWKV-4's channel mixing on rows, residual added to X; mixes (2, C): the previous
    token's share for k and r (x + (prev - x) * share: 1 - time_mix, or v6's time_maa)."""
    from rwkvx.arch.common import matmul, norm_rows, products, shift
    from rwkvx.kernels._wkv import add_gated_rows, mix_rows
    x = norm_rows(X, p["ln2_weight"], p["ln2_bias"], n)
    xkr = np.empty((2, len(x), x.shape[1]), np.float32)
    mix_rows(x, shift(x, states, FFN_XX, starts), mixes, xkr, n)
    k, r = products([(L["ffn_key"], xkr[0]), (L["ffn_receptance"], xkr[1])], n)
    np.square(np.maximum(k, 0, out=k), out=k)  # in place: (T, 4C) is the layer's largest array
    add_gated_rows(X, r, matmul(L["ffn_value"], k, n))  # X += sigmoid(r) * (value @ k)


class Layer:
    """One RWKV-5.2 layer ready to run: forward(X, states, starts, carry, n_threads) moves
    the rows X (R, C) of one or more sequences (sequence b: rows starts[b]..starts[b+1])
    through it in place, updating their layer states states[b] (2 + N, C)."""

    def __init__(self, p: dict, n_head: int, arithmetic: str = "float32"):
        self.p = p
        self.n_head = n_head
        self.lin = {name: linear(p[name], arithmetic) for name in LINEAR}
        # x·mix + prev·(1 − mix) = x + (prev − x)·(1 − mix): the previous token's shares
        self.mix = np.stack([1 - p[f"att_time_mix_{m}"] for m in "kvrg"])
        self.ffn_mix = np.stack([1 - p["ffn_time_mix_k"], 1 - p["ffn_time_mix_r"]])
        self.decay = p["att_time_decay"].reshape(1, -1)
        self.bonus = p["att_time_faaaa"].reshape(-1)
        from rwkvx.kernels._step import V5Step
        self.step = V5Step(p, self.lin, self.mix, self.ffn_mix, self.decay, self.bonus, n_head, GROUP_NORM_EPS)

    def forward(self, X, states, starts, carry, n):
        T, C = X.shape
        if one_row_each(starts, T):
            # one decoded token for each sequence: the same kernels in one call from Python
            # (rwkvx.kernels._step)
            self.step.batch(X, states, states.sources, None, n)
            return None
        from rwkvx.kernels._wkv import mix_rows, silu_rows, wkv5
        from rwkvx.arch.common import heads_of, matmul, norm_rows, products, shift, wkv_threads
        p, L, H = self.p, self.lin, self.n_head
        x = norm_rows(X, p["ln1_weight"], p["ln1_bias"], n)
        xk, xv, xr, xg = mixed = np.empty((4, T, C), np.float32)
        mix_rows(x, shift(x, states, ATT_XX, starts), self.mix, mixed, n)
        r, k, v, g = products([(L["att_receptance"], xr), (L["att_key"], xk), (L["att_value"], xv),
                               (L["att_gate"], xg)], n)
        silu_rows(g)
        y = np.empty((T, C), np.float32)
        wkv5(r, k, v, self.decay, self.bonus, p["att_ln_x_weight"], p["att_ln_x_bias"], g, heads_of(states, H),
             starts, y, eps=GROUP_NORM_EPS, n_threads=wkv_threads(T, H, C // H, n), sources=heads_of(states.sources, H))
        X += matmul(L["att_output"], y, n)
        channel_mixing_rows(X, states, starts, p, L, n, self.ffn_mix)
        return None
