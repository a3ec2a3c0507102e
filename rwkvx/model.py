"""RWKV: owns the weights, scratch buffers and thread count; runs tokens through the layers."""
from __future__ import annotations

import os
import threading
from typing import Iterable

import numpy as np

from rwkvx import _layer, _matvec
from rwkvx._parallel import effective_n_threads
from rwkvx.errors import RwkvxError
from rwkvx.loader import load_weights
from rwkvx.quant import QuantizedMatrix
from rwkvx.weights import MATRIX_NAMES, VECTOR_NAMES, ModelWeights, new_state, to_float32


def _linear(m) -> _matvec.Linear:
    if isinstance(m, QuantizedMatrix):
        return _matvec.Linear.u8(m.q, m.mx, m.rx, m.my, m.ry)
    if m.dtype == np.uint16:
        return _matvec.Linear.bf16(m)
    if m.dtype == np.float16:
        return _matvec.Linear.f16(m)
    return _matvec.Linear.f32(m)


class RWKV:
    """An RWKV-4 model ready to run.

    forward() is safe to call from several Python threads (calls are serialised, since
    they share scratch buffers); the kernels release the GIL while they run.
    """

    def __init__(self, weights: ModelWeights, threads: int | None = None):
        self.weights = weights
        self.n_threads = effective_n_threads(threads)
        self.blocks = [
            _layer.Block({n: b[n] for n in VECTOR_NAMES}, {n: _linear(b[n]) for n in MATRIX_NAMES})
            for b in weights.blocks
        ]
        self.head = _linear(weights.head)
        self._workspace = _layer.Workspace(weights.n_embd, weights.n_ffn)
        self._x = np.empty(weights.n_embd, dtype=np.float32)
        self._x_norm = np.empty(weights.n_embd, dtype=np.float32)
        self._lock = threading.Lock()

    n_layer = property(lambda self: self.weights.n_layer)
    n_embd = property(lambda self: self.weights.n_embd)
    n_vocab = property(lambda self: self.weights.n_vocab)
    dtype = property(lambda self: self.weights.dtype)

    def new_state(self) -> np.ndarray:
        """A fresh state: float32 (n_layer, 5, n_embd)."""
        return new_state(self.n_layer, self.n_embd)

    def _check_tokens(self, tokens: Iterable[int]) -> list[int]:
        if isinstance(tokens, (str, bytes)):
            raise RwkvxError("tokens: expected a sequence of ints, got a string (encode it with a tokenizer)")
        try:
            tokens = [int(t) for t in tokens]
        except (TypeError, ValueError):
            raise RwkvxError("tokens: expected a sequence of ints") from None
        if not tokens:
            raise RwkvxError("tokens: expected at least one token, got none")
        bad = [t for t in tokens if not 0 <= t < self.n_vocab]
        if bad:
            raise RwkvxError(f"token id {bad[0]} out of range: the vocabulary has ids 0..{self.n_vocab - 1}")
        return tokens

    def _check_state(self, state) -> np.ndarray:
        expected = (self.n_layer, 5, self.n_embd)
        if not isinstance(state, np.ndarray) or state.shape != expected:
            got = state.shape if isinstance(state, np.ndarray) else type(state).__name__
            raise RwkvxError(f"state: expected a float32 array {expected}, got {got}")
        return np.array(state, dtype=np.float32, order="C")

    def forward(self, tokens: Iterable[int], state: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Feed tokens in order; return (logits after the last token, new state).

        tokens: ints with 0 <= token < n_vocab. state: None for a fresh start, or a state
        from an earlier call, which is NOT modified (a prompt's state can seed many
        continuations). logits: float32 (n_vocab,); new state: float32 (n_layer, 5, n_embd).
        """
        tokens = self._check_tokens(tokens)
        state = self.new_state() if state is None else self._check_state(state)
        logits = np.empty(self.n_vocab, dtype=np.float32)
        w = self.weights
        with self._lock:
            x, n = self._x, self.n_threads
            for token in tokens:
                _layer.layer_norm(to_float32(w.emb[token]), w.ln0_weight, w.ln0_bias, x)
                for block, layer_state in zip(self.blocks, state):
                    block.forward(x, layer_state, self._workspace, n)
            # the head is by far the largest matrix: only the last token needs logits
            _layer.layer_norm(x, w.ln_out_weight, w.ln_out_bias, self._x_norm)
            self.head(self._x_norm, logits, n_threads=n)
        return logits, state

    @property
    def nbytes(self) -> int:
        """Bytes of weights held (mapped or in memory)."""
        return self.weights.nbytes

    @property
    def bytes_per_token(self) -> int:
        """Weight bytes one decoded token reads."""
        return self.weights.bytes_per_token

    def __repr__(self) -> str:
        return (f"RWKV(n_layer={self.n_layer}, n_embd={self.n_embd}, n_vocab={self.n_vocab}, "
                f"dtype={self.dtype!r}, threads={self.n_threads})")


def load(path: str | os.PathLike, dtype: str = "float32", threads: int | None = None) -> RWKV:
    """Load an RWKV-4 checkpoint (safetensors or rwkv.cpp .bin) to run in `dtype`.

    dtype: the format weight matrices are kept and read in, all computed in float32:
    "float32"; "bfloat16" (half the bytes, exact for BlinkDL's bf16 releases); "float16";
    or "uint8" (a quarter, quantised at load). The embedding stays as stored. threads: kernel threads; None follows OMP_NUM_THREADS (else one per
    core). Raises CheckpointError for unreadable or inconsistent files, RwkvxError for
    bad arguments.
    """
    if threads is not None:
        effective_n_threads(threads)
    return RWKV(load_weights(path, dtype), threads=threads)
