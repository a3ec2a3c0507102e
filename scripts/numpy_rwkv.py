"""RWKV-4 in plain float32 numpy: the speed baseline for scripts/bench_decode.py and scripts/bench.py.

The math of rwkvx/reference.py (itself BlinkDL's RWKV_in_150_lines.py), but in float32
and with every projection handed to the BLAS numpy was built with (OpenBLAS):

- one token (decode): each matrix-vector product is ``W @ x`` (sgemv);
- several tokens of one sequence (``forward`` with a prompt): the tokens go through the
  model ``chunk_size`` at a time, and each projection of a chunk is one ``X @ W.T``
  (sgemm on the (T, n_embd) activations); only the WKV recurrence steps token by token;
- B sequences, one token each (``forward_batch``): each projection is one ``X @ W.T`` on
  the (B, n_embd) activations, and the WKV step is elementwise over the B rows.

It shares the weight arrays of a float32 ModelWeights, so it reads exactly the bytes
rwkvx float32 reads. Only the (1 - time_mix) vectors are precomputed, as a fast numpy
port would. The embedding is used as the loader keeps it (float32, float16 or bfloat16
bit patterns): one row per token is widened to float32 when looked up, as in rwkvx.

Import this module after setting OPENBLAS_NUM_THREADS: OpenBLAS reads it once, when
numpy is first imported.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from rwkvx.reference import wkv_step
from rwkvx.weights import (ATT_AA, ATT_BB, ATT_PP, ATT_XX, FFN_XX, MATRIX_NAMES, ModelWeights, new_state,
                           to_float32)

LAYER_NORM_EPS = np.float32(1e-5)
MIX_NAMES = ("att_time_mix_k", "att_time_mix_v", "att_time_mix_r", "ffn_time_mix_k", "ffn_time_mix_r")


def layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Normalise the last axis: x (n_embd,) or (n_rows, n_embd)."""
    mean = x.mean(axis=-1, keepdims=True)
    var = np.square(x - mean).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + LAYER_NORM_EPS) * w + b


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def _mix(x: np.ndarray, last_x: np.ndarray, p: dict, name: str) -> np.ndarray:
    # x * time_mix + last_x * (1 - time_mix)
    return x * p[name] + last_x * p["1-" + name]


# ---- one token: matrix-vector products ----

def time_mixing(x: np.ndarray, s: np.ndarray, p: dict) -> np.ndarray:
    """x: ln1(x) (n_embd,) float32; s: this layer's state (5, n_embd), updated in place."""
    last_x = s[ATT_XX]
    xk = _mix(x, last_x, p, "att_time_mix_k")
    xv = _mix(x, last_x, p, "att_time_mix_v")
    xr = _mix(x, last_x, p, "att_time_mix_r")
    s[ATT_XX] = x

    r = sigmoid(p["att_receptance"] @ xr)
    k = p["att_key"] @ xk
    v = p["att_value"] @ xv

    wkv, s[ATT_AA], s[ATT_BB], s[ATT_PP] = wkv_step(k, v, s[ATT_AA], s[ATT_BB], s[ATT_PP], p)
    return p["att_output"] @ (r * wkv)


def channel_mixing(x: np.ndarray, s: np.ndarray, p: dict) -> np.ndarray:
    """x: ln2(x) (n_embd,) float32; s: this layer's state (5, n_embd), updated in place."""
    last_x = s[FFN_XX]
    xk = _mix(x, last_x, p, "ffn_time_mix_k")
    xr = _mix(x, last_x, p, "ffn_time_mix_r")
    s[FFN_XX] = x
    r = sigmoid(p["ffn_receptance"] @ xr)
    # k = relu(key @ xk) ** 2
    k = np.square(np.maximum(p["ffn_key"] @ xk, 0))
    return r * (p["ffn_value"] @ k)


# ---- many rows: matrix-matrix products, X (n_rows, n_embd) @ W.T ----

def _time_mixing_projections(x: np.ndarray, last_x: np.ndarray, p: dict):
    """x, last_x (n_rows, n_embd) -> r, k, v (n_rows, n_embd): three GEMMs."""
    r = sigmoid(_mix(x, last_x, p, "att_time_mix_r") @ p["att_receptance"].T)
    k = _mix(x, last_x, p, "att_time_mix_k") @ p["att_key"].T
    v = _mix(x, last_x, p, "att_time_mix_v") @ p["att_value"].T
    return r, k, v


def channel_mixing_rows(x: np.ndarray, last_x: np.ndarray, p: dict) -> np.ndarray:
    """x: ln2(x) (n_rows, n_embd); last_x: each row's previous ln2 input. Three GEMMs."""
    r = sigmoid(_mix(x, last_x, p, "ffn_time_mix_r") @ p["ffn_receptance"].T)
    k = np.square(np.maximum(_mix(x, last_x, p, "ffn_time_mix_k") @ p["ffn_key"].T, 0))
    return r * (k @ p["ffn_value"].T)


def _shifted(x: np.ndarray, first: np.ndarray) -> np.ndarray:
    # the previous token of each row of one sequence: first, x[0], ..., x[T-2]
    return np.concatenate([first[None], x[:-1]])


def time_mixing_seq(x: np.ndarray, s: np.ndarray, p: dict) -> np.ndarray:
    """x: ln1(x) of T consecutive tokens (T, n_embd); s: this layer's state (5, n_embd), updated in place."""
    r, k, v = _time_mixing_projections(x, _shifted(x, s[ATT_XX]), p)
    s[ATT_XX] = x[-1]
    wkv = np.empty_like(k)
    aa, bb, pp = s[ATT_AA], s[ATT_BB], s[ATT_PP]
    # the recurrence is the only token-by-token part
    for t in range(x.shape[0]):
        wkv[t], aa, bb, pp = wkv_step(k[t], v[t], aa, bb, pp, p)
    s[ATT_AA], s[ATT_BB], s[ATT_PP] = aa, bb, pp
    return (r * wkv) @ p["att_output"].T


def channel_mixing_seq(x: np.ndarray, s: np.ndarray, p: dict) -> np.ndarray:
    """x: ln2(x) of T consecutive tokens (T, n_embd); s: this layer's state (5, n_embd), updated in place."""
    out = channel_mixing_rows(x, _shifted(x, s[FFN_XX]), p)
    s[FFN_XX] = x[-1]
    return out


def time_mixing_batch(x: np.ndarray, s: np.ndarray, p: dict) -> np.ndarray:
    """x: ln1(x) of B sequences' next tokens (B, n_embd); s: their states for this layer (B, 5, n_embd), updated."""
    r, k, v = _time_mixing_projections(x, s[:, ATT_XX], p)
    s[:, ATT_XX] = x
    wkv, s[:, ATT_AA], s[:, ATT_BB], s[:, ATT_PP] = wkv_step(k, v, s[:, ATT_AA], s[:, ATT_BB], s[:, ATT_PP], p)
    return (r * wkv) @ p["att_output"].T


def channel_mixing_batch(x: np.ndarray, s: np.ndarray, p: dict) -> np.ndarray:
    """x: ln2(x) of B sequences' next tokens (B, n_embd); s: their states for this layer (B, 5, n_embd), updated."""
    out = channel_mixing_rows(x, s[:, FFN_XX], p)
    s[:, FFN_XX] = x
    return out


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
    """The float32 numpy model, with rwkvx.RWKV's forward() and forward_batch().

    chunk_size: tokens per pass over the weights when forward() gets several tokens;
    None (the default) puts the whole input in one chunk.
    """

    def __init__(self, weights: ModelWeights, chunk_size: int | None = None):
        self.weights = weights
        self.chunk_size = chunk_size
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

    def _embed(self, tokens) -> np.ndarray:
        # rows of the embedding as stored, widened to float32: (n_embd,) for an int, (T, n_embd) for a list
        return to_float32(self.emb[tokens])

    def forward(self, tokens: Iterable[int], state: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Logits float32 (n_vocab,) after the last token, and the new state (the one passed is not modified).

        One token runs matrix-vector products; several run chunk_size at a time as
        matrix-matrix products. tokens are trusted: this is a benchmark baseline, not an
        API boundary.
        """
        tokens = list(tokens)
        state = self.new_state() if state is None else state.copy()
        if len(tokens) == 1:
            x = layer_norm(self._embed(tokens[0]), *self.ln0)
            for p, s in zip(self.blocks, state):
                x = x + time_mixing(layer_norm(x, p["ln1_weight"], p["ln1_bias"]), s, p)
                x = x + channel_mixing(layer_norm(x, p["ln2_weight"], p["ln2_bias"]), s, p)
        else:
            chunk = len(tokens) if self.chunk_size is None else max(1, int(self.chunk_size))
            for begin in range(0, len(tokens), chunk):
                x = layer_norm(self._embed(tokens[begin:begin + chunk]), *self.ln0)
                for p, s in zip(self.blocks, state):
                    x = x + time_mixing_seq(layer_norm(x, p["ln1_weight"], p["ln1_bias"]), s, p)
                    x = x + channel_mixing_seq(layer_norm(x, p["ln2_weight"], p["ln2_bias"]), s, p)
            x = x[-1]
        # like rwkvx, only the last token's logits are computed
        return self.head @ layer_norm(x, *self.ln_out), state

    def forward_batch(self, tokens_per_sequence: Sequence[Sequence[int]],
                      states: Sequence[np.ndarray | None] | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
        """Advance B sequences by one token each; return logits float32 (B, n_vocab) and B new states.

        tokens_per_sequence: B lists of exactly one token. states: None or B entries (None
        = fresh); they are not modified.
        """
        if any(len(t) != 1 for t in tokens_per_sequence):
            raise ValueError("NumpyRWKV.forward_batch: expected exactly one token per sequence")
        n_seq = len(tokens_per_sequence)
        states = [None] * n_seq if states is None else states
        # (n_layer, B, 5, n_embd): one layer's states of every sequence are contiguous
        stacked = np.stack([self.new_state() if s is None else s for s in states], axis=1)
        x = layer_norm(self._embed([t[0] for t in tokens_per_sequence]), *self.ln0)
        for p, s in zip(self.blocks, stacked):
            x = x + time_mixing_batch(layer_norm(x, p["ln1_weight"], p["ln1_bias"]), s, p)
            x = x + channel_mixing_batch(layer_norm(x, p["ln2_weight"], p["ln2_bias"]), s, p)
        logits = layer_norm(x, *self.ln_out) @ self.head.T
        return logits, [np.ascontiguousarray(stacked[:, b]) for b in range(n_seq)]
