"""RWKV-4 decode in plain float32 numpy: the speed baseline for scripts/bench_decode.py.

The math of rwkvx/reference.py (itself BlinkDL's RWKV_in_150_lines.py), but in float32
and with every matrix-vector product written as ``W @ x``, which numpy hands to the BLAS
it was built with (OpenBLAS sgemv for C-contiguous float32). It shares the weight
arrays of a float32 ModelWeights, so it reads exactly the bytes rwkvx float32 reads.
Only the (1 - time_mix) vectors are precomputed, as a fast numpy port would.

Import this module after setting OPENBLAS_NUM_THREADS: OpenBLAS reads it once, when
numpy is first imported.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

from rwkvx.weights import ATT_AA, ATT_BB, ATT_PP, ATT_XX, FFN_XX, MATRIX_NAMES, ModelWeights, new_state

LAYER_NORM_EPS = np.float32(1e-5)
MIX_NAMES = ("att_time_mix_k", "att_time_mix_v", "att_time_mix_r", "ffn_time_mix_k", "ffn_time_mix_r")


def layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    mean = x.mean()
    var = np.square(x - mean).mean()
    return (x - mean) / np.sqrt(var + LAYER_NORM_EPS) * w + b


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def time_mixing(x: np.ndarray, s: np.ndarray, p: dict) -> np.ndarray:
    """x: ln1(x) (n_embd,) float32; s: this layer's state (5, n_embd), updated in place."""
    last_x = s[ATT_XX]
    # xk = x * time_mix_k + last_x * (1 - time_mix_k), likewise xv, xr
    xk = x * p["att_time_mix_k"] + last_x * p["1-att_time_mix_k"]
    xv = x * p["att_time_mix_v"] + last_x * p["1-att_time_mix_v"]
    xr = x * p["att_time_mix_r"] + last_x * p["1-att_time_mix_r"]
    s[ATT_XX] = x

    r = sigmoid(p["att_receptance"] @ xr)
    k = p["att_key"] @ xk
    v = p["att_value"] @ xv

    # wkv = (e^pp * aa + e^(u + k) * v) / (e^pp * bb + e^(u + k)), scaled by e^-max
    aa, bb, pp = s[ATT_AA], s[ATT_BB], s[ATT_PP]
    ww = p["att_time_first"] + k
    qq = np.maximum(pp, ww)
    e1 = np.exp(pp - qq)
    e2 = np.exp(ww - qq)
    wkv = (e1 * aa + e2 * v) / (e1 * bb + e2)

    # decay the running sums by e^w (w = -e^time_decay), then add this token
    ww = pp + p["att_time_decay"]
    qq = np.maximum(ww, k)
    e1 = np.exp(ww - qq)
    e2 = np.exp(k - qq)
    s[ATT_AA] = e1 * aa + e2 * v
    s[ATT_BB] = e1 * bb + e2
    s[ATT_PP] = qq
    return p["att_output"] @ (r * wkv)


def channel_mixing(x: np.ndarray, s: np.ndarray, p: dict) -> np.ndarray:
    """x: ln2(x) (n_embd,) float32; s: this layer's state (5, n_embd), updated in place."""
    last_x = s[FFN_XX]
    xk = x * p["ffn_time_mix_k"] + last_x * p["1-ffn_time_mix_k"]
    xr = x * p["ffn_time_mix_r"] + last_x * p["1-ffn_time_mix_r"]
    s[FFN_XX] = x
    r = sigmoid(p["ffn_receptance"] @ xr)
    # k = relu(key @ xk) ** 2
    k = np.square(np.maximum(p["ffn_key"] @ xk, 0))
    return r * (p["ffn_value"] @ k)


def _check_matrix(name: str, m) -> np.ndarray:
    # a non-contiguous or non-float32 W would make every `W @ x` copy or convert it first
    if not isinstance(m, np.ndarray):
        raise TypeError(f"{name}: expected a float32 ndarray (load the model with dtype='float32'), "
                        f"got {type(m).__name__}")
    if m.dtype != np.float32 or m.ndim != 2 or not m.flags.c_contiguous:
        raise ValueError(f"{name}: expected a C-contiguous 2-D float32 array, got {m.ndim}-D {m.dtype}"
                         f"{'' if m.flags.c_contiguous else ' non-contiguous'}")
    return m


class NumpyRWKV:
    """The float32 numpy model. forward(tokens, state) -> (logits, new_state), like rwkvx.RWKV."""

    def __init__(self, weights: ModelWeights):
        self.weights = weights
        self.emb = weights.emb
        self.ln0 = (weights.ln0_weight, weights.ln0_bias)
        self.ln_out = (weights.ln_out_weight, weights.ln_out_bias)
        self.head = _check_matrix("head", weights.head)
        self.blocks = []
        for l, b in enumerate(weights.blocks):
            p = dict(b)
            for name in MATRIX_NAMES:
                _check_matrix(f"blocks.{l}.{name}", p[name])
            for name in MIX_NAMES:
                p["1-" + name] = 1 - p[name]
            self.blocks.append(p)
        self.n_layer, self.n_embd, self.n_vocab = weights.n_layer, weights.n_embd, weights.n_vocab

    def new_state(self) -> np.ndarray:
        """A fresh state: float32 (n_layer, 5, n_embd)."""
        return new_state(self.n_layer, self.n_embd)

    def forward(self, tokens: Iterable[int], state: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Logits float32 (n_vocab,) after the last token, and the new state (the one passed is not modified).

        tokens are trusted: this is a benchmark baseline, not an API boundary.
        """
        state = self.new_state() if state is None else state.copy()
        for token in tokens:
            x = layer_norm(self.emb[token], *self.ln0)
            for p, s in zip(self.blocks, state):
                x = x + time_mixing(layer_norm(x, p["ln1_weight"], p["ln1_bias"]), s, p)
                x = x + channel_mixing(layer_norm(x, p["ln2_weight"], p["ln2_bias"]), s, p)
        # like rwkvx, only the last token's logits are computed
        return self.head @ layer_norm(x, *self.ln_out), state
