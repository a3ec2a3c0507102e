"""RWKV-6 "Finch" (x060): RWKV-5.2 with data-dependent token shift and decay.

The five token-shift mixes get a low-rank, input-dependent correction (a 5-way LoRA through
tanh), and the decay w = exp(-exp(time_decay + LoRA(x))) changes every token; the WKV step
itself is RWKV-5.2's. Written after ChatRWKV's att_one_v6_0 (rwkv pip package).
"""
from __future__ import annotations

import numpy as np

from rwkvx.arch.common import (ATT_XX, FFN_XX, GROUP_NORM_EPS, group_norm, layer_norm, one_row_each, sigmoid,
                               silu, wkv_matrices)
from rwkvx.arch.v5 import wkv
from rwkvx.weights import linear

NAME = "RWKV-6"
ID = "x060"

LINEAR = ("att_receptance", "att_key", "att_value", "att_gate", "att_output",
          "ffn_key", "ffn_receptance", "ffn_value")
# the order of the five mixes in time_maa_w1/w2
MIXES = "wkvrg"
# rwkvx.convert writes these (in, out), the orientation their kernel reads (_lowrank.h)
STORED_IN_OUT = ("att_time_maa_w1", "att_time_maa_w2", "att_time_decay_w1", "att_time_decay_w2")


def recognise(names: set[str]) -> bool:
    return "blocks.0.att.ln_x.weight" in names and any(n.endswith(".att.time_maa_x") for n in names) and \
        not any(n.endswith((".att.time_misc_kkk", ".att.k_k")) for n in names)


def heads(source) -> tuple[int, int]:
    from rwkvx.formats.tensorfile import fail
    t = source.tensors.get("blocks.0.att.time_faaaa")
    shape = [d for d in t.shape if d != 1] if t is not None else []
    if len(shape) not in (1, 2):
        raise fail(source.path, "RWKV-6 checkpoint without a (heads, head size) blocks.0.att.time_faaaa")
    # a single head may be stored (N,) or (1, N)
    return (1, shape[0]) if len(shape) == 1 else (shape[0], shape[1])


def read_block(reader, layer: int, n_embd: int, n_head: int, head_size: int) -> dict:
    """One layer's tensors. BlinkDL stores time_maa_w1 (C, 5D), time_maa_w2 (5, D, C),
    time_decay_w1 (C, Dw), time_decay_w2 (Dw, C), i.e. (in, out), as rwkvx.convert now
    writes them (metadata low_rank = "in,out"); rwkv.cpp's converter and files converted
    before hold all four transposed, (out, in). p holds them (out, in) for the
    specification: views of the file where it has (in, out). rwkv.cpp's stores
    time_decay/time_faaaa as (H, N, 1)."""
    att, ffn, c = f"blocks.{layer}.att.", f"blocks.{layer}.ffn.", n_embd
    p = {f"att_time_maa_{m}": reader.vector(f"{att}time_maa_{m}", c) for m in "x" + MIXES}
    # time_maa_w1 holds the five mixes' first halves side by side
    d_mix, d_decay = max(1, reader.low_rank_out(att + "time_maa_w1") // 5), reader.low_rank_out(att + "time_decay_w1")
    p["att_time_maa_w1"] = reader.low_rank(att + "time_maa_w1", (5 * d_mix, c))
    w2 = reader.values(att + "time_maa_w2", 5 * d_mix * c)
    if w2 is None:
        w2 = np.zeros((5, c, d_mix), np.float32)
    in_out = reader.low_rank_in_out
    p["att_time_maa_w2"] = w2.reshape(5, d_mix, c).transpose(0, 2, 1) if in_out else w2.reshape(5, c, d_mix)
    p["att_time_decay_w1"] = reader.low_rank(att + "time_decay_w1", (d_decay, c))
    p["att_time_decay_w2"] = reader.low_rank(att + "time_decay_w2", (c, d_decay))
    p["att_time_decay"] = reader.vector(att + "time_decay", c)
    p["att_time_faaaa"] = reader.heads(att + "time_faaaa", n_head, head_size)
    for m in ("receptance", "key", "value", "gate", "output"):
        p[f"att_{m}"] = reader.big(f"{att}{m}.weight", (c, c))
    p["att_ln_x_weight"] = reader.vector(att + "ln_x.weight", c)
    p["att_ln_x_bias"] = reader.vector(att + "ln_x.bias", c)
    from rwkvx.arch.v5 import read_ffn_v4
    p.update(read_ffn_v4(reader, ffn, c, "time_maa"))
    return p


# ---- the specification (float64, one token) ----

def time_mixing(x, s, p, eps=GROUP_NORM_EPS):
    n_head, n = p["att_time_faaaa"].shape
    last_x, s[ATT_XX] = s[ATT_XX].copy(), x
    sx = last_x - x
    # data-dependent token shift: five mixes corrected by one low-rank map of x
    lora = np.tanh(p["att_time_maa_w1"] @ (x + sx * p["att_time_maa_x"])).reshape(5, -1)
    xw, xk, xv, xr, xg = (x + sx * (p[f"att_time_maa_{m}"] + p["att_time_maa_w2"][i] @ lora[i])
                          for i, m in enumerate(MIXES))

    r = (p["att_receptance"] @ xr).reshape(n_head, n)
    k = (p["att_key"] @ xk).reshape(n_head, n)
    v = (p["att_value"] @ xv).reshape(n_head, n)
    g = silu(p["att_gate"] @ xg)
    # data-dependent decay
    w = p["att_time_decay"] + p["att_time_decay_w2"] @ np.tanh(p["att_time_decay_w1"] @ xw)
    w = np.exp(-np.exp(w)).reshape(n_head, n)

    y = wkv(r, k, v, w, p["att_time_faaaa"], wkv_matrices(s, n_head))
    y = group_norm(y.reshape(-1), p["att_ln_x_weight"], p["att_ln_x_bias"], n_head, eps)
    return p["att_output"] @ (y * g)


def channel_mixing(x, s, p):
    last_x, s[FFN_XX] = s[FFN_XX].copy(), x
    xk = x + (last_x - x) * p["ffn_time_maa_k"]
    xr = x + (last_x - x) * p["ffn_time_maa_r"]
    r = sigmoid(p["ffn_receptance"] @ xr)
    k = np.square(np.maximum(p["ffn_key"] @ xk, 0))
    return r * (p["ffn_value"] @ k)


def block(x, s, p, carry=None, eps=GROUP_NORM_EPS):
    x = x + time_mixing(layer_norm(x, p["ln1_weight"], p["ln1_bias"]), s, p, eps)
    x = x + channel_mixing(layer_norm(x, p["ln2_weight"], p["ln2_bias"]), s, p)
    return x, None


# ---- the runtime (float32; big matrices in the run dtype) ----

class Layer:
    """One RWKV-6 layer ready to run: forward(X, states, starts, carry, n_threads) moves
    the rows X (R, C) of one or more sequences (sequence b: rows starts[b]..starts[b+1])
    through it in place, updating their layer states states[b] (2 + N, C)."""

    def __init__(self, p: dict, n_head: int, arithmetic: str = "float32"):
        from rwkvx.arch.common import low_rank_in_out
        self.p = p
        self.n_head = n_head
        self.lin = {name: linear(p[name], arithmetic) for name in LINEAR}
        self.low = low_rank_in_out(p, STORED_IN_OUT)
        # the five halves of the mixes' correction apart, as V6Step and lowrank() take them
        self.low.update({f"maa_w2_{i}": m for i, m in enumerate(self.low.pop("att_time_maa_w2"))})
        self.ffn_mix = np.stack([p["ffn_time_maa_k"], p["ffn_time_maa_r"]])
        self.bonus = p["att_time_faaaa"].reshape(-1)
        self.maa_x = p["att_time_maa_x"].reshape(1, -1)
        self.maa = np.stack([p[f"att_time_maa_{m}"] for m in MIXES])
        from rwkvx.kernels._step import V6Step
        self.step = V6Step(p, self.lin, self.low, self.ffn_mix, self.bonus, n_head, GROUP_NORM_EPS)

    def forward(self, X, states, starts, carry, n):
        T, C = X.shape
        if one_row_each(starts, T):
            # one decoded token for each sequence: the same kernels in one call from Python
            # (rwkvx.kernels._step)
            self.step.batch(X, states, states.sources, None, n)
            return None
        from rwkvx.kernels._wkv import lora_act, mix_rows, silu_rows, v6_decay_rows, wkv5
        from rwkvx.arch.common import heads_of, lowrank, matmul, norm_rows, products, shift, wkv_threads
        from rwkvx.arch.v5 import channel_mixing_rows
        p, L, H = self.p, self.lin, self.n_head
        x = norm_rows(X, p["ln1_weight"], p["ln1_bias"], n)
        prev = shift(x, states, ATT_XX, starts)
        sx = prev - x
        xx = np.empty((1, T, C), np.float32)
        mix_rows(x, prev, self.maa_x, xx, n)
        lora, = lowrank(self.low, [("att_time_maa_w1", xx[0])], n)
        lora_act(lora, lora[:0])  # tanh
        D = lora.shape[1] // 5
        # the five mixed inputs x + sx·(time_maa + correction), built in one array in place:
        # fresh temporaries of this size cost page faults on every layer
        mixed = np.empty((5, T, C), np.float32)
        lowrank(self.low, [(f"maa_w2_{i}", lora[:, i * D:(i + 1) * D]) for i in range(5)], n, outs=list(mixed))
        mixed += self.maa[:, None, :]
        mixed *= sx
        mixed += x
        xw, xk, xv, xr, xg = mixed
        w, = lowrank(self.low, [("att_time_decay_w1", xw)], n)
        r, k, v, g = products([(L["att_receptance"], xr), (L["att_key"], xk), (L["att_value"], xv),
                               (L["att_gate"], xg)], n)
        silu_rows(g)
        lora_act(w, w[:0])  # tanh
        w, = lowrank(self.low, [("att_time_decay_w2", w)], n)
        v6_decay_rows(w, p["att_time_decay"])  # exp(-exp(time_decay + w))
        y = np.empty((T, C), np.float32)
        wkv5(r, k, v, w, self.bonus, p["att_ln_x_weight"], p["att_ln_x_bias"], g, heads_of(states, H), starts, y,
             eps=GROUP_NORM_EPS, n_threads=wkv_threads(T, H, C // H, n), sources=heads_of(states.sources, H))
        X += matmul(L["att_output"], y, n)
        channel_mixing_rows(X, states, starts, p, L, n, self.ffn_mix)
        return None
