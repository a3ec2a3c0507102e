"""The runtime model for RWKV-5.2, 6 and 7: rwkvx.RWKV's API over an architecture's layers.

The matrices go through the shared kernels (rwkvx.kernels._matvec.Linear: the big ones in the run
dtype, the low-rank ones float32), the per-head recurrence with its group norm through
rwkvx.kernels._wkv, and the elementwise glue is float32 numpy in each architecture's Layer. Tokens
run chunk_size rows at a time, the rows of all sequences of a forward_batch together: every
projection is one pass over its matrix for the whole chunk, and only the recurrence steps
token by token. Every op works row by row, so chunking, the number of tokens per call and
batching give the same bits as feeding the tokens one at a time.
"""
from __future__ import annotations

import os
import sys
import threading
from typing import Iterable, Sequence

import numpy as np

from rwkvx.kernels._parallel import effective_n_threads
from rwkvx.arch.common import LayerStates, Weights, matmul, new_state, norm_rows, read_weights
from rwkvx.errors import RwkvxError
from rwkvx.model import DEFAULT_CHUNK_SIZE, RWKV, check_arithmetic
from rwkvx.states import tuned_state
from rwkvx.weights import head_arithmetic, linear, to_float32


def _references(pool: list, i: int) -> int:
    return sys.getrefcount(pool[i])


# what _references counts for an array the pool alone holds: 2 (the list and getrefcount's
# argument) up to Python 3.13; measured rather than assumed, since newer interpreters may
# borrow the argument's reference and count one less
_POOL_ONLY = _references([object()], 0)


class RWKVNext(RWKV):
    """An RWKV-5.2, 6 or 7 model ready to run; the same API as RWKV (RWKV-4).

    State: float32 (n_layer, 2 + head_size, n_embd) per sequence (see rwkvx.arch.common).
    """

    def __init__(self, weights: Weights, threads: int | None = None, arithmetic: str = "float32"):
        check_arithmetic(arithmetic, weights.dtype)
        self.weights = weights
        self.arch = weights.arch
        self.arithmetic = arithmetic
        self._n_threads = effective_n_threads(threads)
        self.layers = [weights.arch.Layer(b, weights.n_head, arithmetic) for b in weights.blocks]
        self.head = linear(weights.head, head_arithmetic(arithmetic, weights.dtype))
        self.chunk_size = DEFAULT_CHUNK_SIZE
        self._lock = threading.Lock()
        # arrays for new states, reused once their holders let go (see _take_states): enough
        # for a server's batch, its previous step and what it keeps, bounded in memory
        self._state_pool: list[np.ndarray] = []
        self._state_pool_size = max(4, min(64, (256 << 20) // (4 * int(np.prod(self.state_shape)))))
        self._fingerprint = None
        if weights.time_state is not None:
            self.set_initial_state(tuned_state(weights.time_state, self.architecture))

    @property
    def architecture(self) -> str:
        return self.arch.NAME

    head_size = property(lambda self: self.weights.head_size)
    n_head = property(lambda self: self.weights.n_head)

    @property
    def state_shape(self) -> tuple[int, ...]:
        """(n_layer, 2 + head_size, n_embd): two token-shift rows and the heads' WKV matrices."""
        return (self.n_layer, 2 + self.head_size, self.n_embd)

    def new_state(self) -> np.ndarray:
        if self._initial is not None:
            return self._initial.copy()
        return new_state(self.n_layer, self.n_embd, self.head_size)

    def forward(self, tokens: Iterable[int], state: np.ndarray | None = None, *,
                all_logits: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Feed tokens in order; return (logits, new state), as RWKV.forward does: the state
        passed in is not modified; logits float32 (n_vocab,), or (len(tokens), n_vocab) with
        all_logits. Several tokens run chunk_size at a time as matrix-matrix products; the
        results are bit-identical to feeding them one by one."""
        tokens = self._check_tokens(tokens)
        with self._lock:
            new, sources = self._new_states([state])
            logits = self._run([tokens], new, sources, all_logits)
        return (logits if all_logits else logits[0]), new[0]

    def _new_states(self, states: list) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """(new states to fill, checked states to read): a new state is written by the layers
        from the old one (no copy first: a v5+ state is 6.5 MB at 24 x 1024); None is fresh.
        Called under the lock (the state pool is shared)."""
        sources = []
        fresh = None
        for st in states:
            if st is None:
                fresh = self.new_state() if fresh is None else fresh
                sources.append(fresh)
            else:
                sources.append(np.ascontiguousarray(self._check_state(st, copy=False)))
        return self._take_states(len(states)), sources

    def _take_states(self, n: int) -> list[np.ndarray]:
        """n arrays for new states: ones this model handed out before and nobody holds any
        more (their only reference is the pool's), else new ones. Without the pool every
        batched step wrote its states (52 MB for 8 at 24 x 1024) to pages the allocator had
        just returned to the kernel and got back zeroed: measured 4-8% of a bfloat16 step."""
        pool, taken = self._state_pool, []
        for i in range(len(pool)):
            if len(taken) == n:
                break
            # a view of the array counts as a holder too
            if _references(pool, i) == _POOL_ONLY:
                taken.append(pool[i])
        while len(taken) < n:
            a = np.empty(self.state_shape, dtype=np.float32)
            if len(pool) < self._state_pool_size:
                pool.append(a)
            taken.append(a)
        return taken

    def forward_batch(self, tokens_per_sequence: Sequence[Iterable[int]],
                      states: Sequence[np.ndarray | None] | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
        """Advance several independent sequences in one pass over the weights: (logits
        (B, n_vocab) after each sequence's last token, B new states), each bit-identical to
        running that sequence alone (with arithmetic "int8" or "bfloat16", to running it in
        any other batch of several: see rwkvx.load); the states passed in are not modified."""
        if isinstance(tokens_per_sequence, (str, bytes)) or not isinstance(tokens_per_sequence, Sequence):
            raise RwkvxError("tokens_per_sequence: expected a list of token lists")
        if not tokens_per_sequence:
            raise RwkvxError("tokens_per_sequence: expected at least one sequence, got none")
        token_lists = [self._check_tokens(t) for t in tokens_per_sequence]
        if states is None:
            states = [None] * len(token_lists)
        if isinstance(states, np.ndarray) or len(states) != len(token_lists):
            raise RwkvxError(f"states: expected a list of {len(token_lists)} states (or None entries)")
        with self._lock:
            new, sources = self._new_states(list(states))
            logits = self._run(token_lists, new, sources, all_logits=False)
        return logits, new

    def _run(self, token_lists: list[list[int]], states: list[np.ndarray], sources: list[np.ndarray],
             all_logits: bool) -> np.ndarray:
        """Run B sequences from states `sources` (read only) into `states` (every value
        written), chunk_size rows per pass over the weights; logits after every row
        (all_logits) or after each sequence's last (B, n_vocab)."""
        w, n = self.weights, self.n_threads
        rows = [(b, t) for b, toks in enumerate(token_lists) for t in toks]
        chunk = max(1, int(self.chunk_size))
        final = [None] * len(token_lists)
        outputs = []
        started = set()
        for begin in range(0, len(rows), chunk):
            part = rows[begin:begin + chunk]
            first, last = part[0][0], part[-1][0]
            # the sequences in this chunk are contiguous runs of rows: starts[i] is where
            # sequence first + i begins
            starts = np.searchsorted(np.fromiter((b for b, _ in part), np.intp, len(part)),
                                     np.arange(first, last + 2)).astype(np.intp)
            ids = np.fromiter((t for _, t in part), np.intp, len(part))
            x = norm_rows(np.ascontiguousarray(to_float32(w.emb[ids])), w.ln0_weight, w.ln0_bias, n)
            carry = None
            # a sequence begun in an earlier chunk continues from its new state
            reads = [sources[b] if b not in started else states[b] for b in range(first, last + 1)]
            started.update(range(first, last + 1))
            for layer_id, layer in enumerate(self.layers):
                layer_states = LayerStates([states[b][layer_id] for b in range(first, last + 1)],
                                           [read[layer_id] for read in reads])
                carry = layer.forward(x, layer_states, starts, carry, n)
            if all_logits:
                outputs.append(self._logits(x))
            for b in range(first, last + 1):
                end = starts[b - first + 1]
                if begin + end == len(rows) or rows[begin + end][0] != b:
                    final[b] = x[end - 1]
        if all_logits:
            return np.concatenate(outputs)
        return self._logits(np.stack(final))

    def _logits(self, x: np.ndarray) -> np.ndarray:
        w = self.weights
        return matmul(self.head, norm_rows(x, w.ln_out_weight, w.ln_out_bias, self.n_threads), self.n_threads)

    def __repr__(self) -> str:
        return (f"RWKVNext({self.architecture}, n_layer={self.n_layer}, n_embd={self.n_embd}, "
                f"heads={self.n_head}x{self.head_size}, n_vocab={self.n_vocab}, dtype={self.dtype!r}"
                f"{self._arithmetic_repr()}, threads={self.n_threads})")


def load(source, arch, dtype: str = "float32", threads: int | None = None, *, mmap: bool = True,
         check_tensors: bool | None = None, arithmetic: str = "float32") -> RWKVNext:
    """An opened checkpoint (rwkvx.loader.open_checkpoint) of architecture module `arch`;
    mmap, check_tensors and arithmetic as rwkvx.load takes them."""
    from rwkvx.loader import check_dtype, check_mode
    check_dtype(dtype)
    check = check_mode(check_tensors)
    if threads is not None:
        effective_n_threads(threads)
    check_arithmetic(arithmetic, dtype)
    return RWKVNext(read_weights(source, arch, dtype, mmap=mmap, check=check), threads=threads, arithmetic=arithmetic)


def load_path(path: str | os.PathLike, dtype: str = "float32", threads: int | None = None) -> RWKVNext:
    from rwkvx.arch import recognise_path
    arch, source = recognise_path(path)
    if arch is None:
        raise RwkvxError(f"{os.fspath(path)}: not an RWKV-5.2, 6 or 7 checkpoint")
    return load(source, arch, dtype, threads)
