"""RWKV-4 in float64 numpy: the executable specification every fast path is tested against.

A transliteration of BlinkDL's RWKV_in_150_lines.py (layer_norm, time_mixing,
channel_mixing, a loop over blocks) with no optimisation: same state layout, same
-1e30 start for pp, same max trick in the WKV recurrence. Quantised matrices are
dequantised first, so this also defines what the uint8 and q4 kernels must compute.
"""
from __future__ import annotations

import numpy as np

from rwkvx.quant import Q4Matrix, QuantizedMatrix
from rwkvx.weights import ATT_AA, ATT_BB, ATT_PP, ATT_XX, FFN_XX, ModelWeights, new_state, to_float32

LAYER_NORM_EPS = 1e-5


def _f64(a) -> np.ndarray:
    if isinstance(a, (QuantizedMatrix, Q4Matrix)):
        return a.dequantize(np.float64)
    return to_float32(np.asarray(a)).astype(np.float64)


def layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    mean = x.mean()
    var = ((x - mean) ** 2).mean()
    return (x - mean) / np.sqrt(var + LAYER_NORM_EPS) * w + b


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def wkv_step(k: np.ndarray, v: np.ndarray, aa: np.ndarray, bb: np.ndarray, pp: np.ndarray, p: dict):
    """One WKV step, in the dtype of its inputs; k, v, aa, bb, pp (n_embd,) or (B, n_embd).
    Returns (wkv, aa, bb, pp) after this token."""
    # wkv = (e^pp * aa + e^(u + k) * v) / (e^pp * bb + e^(u + k)), scaled by e^-max
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
    return wkv, e1 * aa + e2 * v, e1 * bb + e2, qq


def time_mixing(x: np.ndarray, s: np.ndarray, p: dict) -> np.ndarray:
    """x: ln1(x) (n_embd,); s: this layer's state (5, n_embd), updated in place."""
    last_x = s[ATT_XX]
    xk = x * p["att_time_mix_k"] + last_x * (1 - p["att_time_mix_k"])
    xv = x * p["att_time_mix_v"] + last_x * (1 - p["att_time_mix_v"])
    xr = x * p["att_time_mix_r"] + last_x * (1 - p["att_time_mix_r"])
    s[ATT_XX] = x

    r = sigmoid(p["att_receptance"] @ xr)
    k = p["att_key"] @ xk
    v = p["att_value"] @ xv

    wkv, s[ATT_AA], s[ATT_BB], s[ATT_PP] = wkv_step(k, v, s[ATT_AA], s[ATT_BB], s[ATT_PP], p)
    return p["att_output"] @ (r * wkv)


def channel_mixing(x: np.ndarray, s: np.ndarray, p: dict) -> np.ndarray:
    """x: ln2(x) (n_embd,); s: this layer's state (5, n_embd), updated in place."""
    last_x = s[FFN_XX]
    xk = x * p["ffn_time_mix_k"] + last_x * (1 - p["ffn_time_mix_k"])
    xr = x * p["ffn_time_mix_r"] + last_x * (1 - p["ffn_time_mix_r"])
    s[FFN_XX] = x
    r = sigmoid(p["ffn_receptance"] @ xr)
    k = np.square(np.maximum(p["ffn_key"] @ xk, 0))
    return r * (p["ffn_value"] @ k)


class Reference:
    """The float64 model. forward(tokens, state) -> (logits, new_state), like RWKV."""

    def __init__(self, weights: ModelWeights):
        self.emb = weights.emb
        self.ln0 = (_f64(weights.ln0_weight), _f64(weights.ln0_bias))
        self.ln_out = (_f64(weights.ln_out_weight), _f64(weights.ln_out_bias))
        self.head = _f64(weights.head)
        self.blocks = [{name: _f64(value) for name, value in b.items()} for b in weights.blocks]
        self.n_layer, self.n_embd, self.n_vocab = weights.n_layer, weights.n_embd, weights.n_vocab

    def new_state(self) -> np.ndarray:
        return new_state(self.n_layer, self.n_embd, np.float64)

    def forward(self, tokens, state=None, all_logits: bool = False):
        """Logits float64 (n_vocab,) after the last token (or (len(tokens), n_vocab))."""
        state = self.new_state() if state is None else np.array(state, dtype=np.float64)
        outs = []
        for token in tokens:
            x = layer_norm(to_float32(self.emb[token]).astype(np.float64), *self.ln0)
            for p, s in zip(self.blocks, state):
                x = x + time_mixing(layer_norm(x, p["ln1_weight"], p["ln1_bias"]), s, p)
                x = x + channel_mixing(layer_norm(x, p["ln2_weight"], p["ln2_bias"]), s, p)
            outs.append(self.head @ layer_norm(x, *self.ln_out))
        return (np.stack(outs) if all_logits else outs[-1]), state
