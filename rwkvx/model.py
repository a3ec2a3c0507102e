"""RWKV: owns the weights, scratch buffers and thread count; runs tokens through the layers."""
from __future__ import annotations

import hashlib
import operator
import os
import threading
from typing import Iterable, Sequence

import numpy as np

from rwkvx.kernels import _layer
from rwkvx.kernels._parallel import effective_n_threads
from rwkvx.errors import RwkvxError
from rwkvx.loader import DTYPES, load_weights
from rwkvx.states import (checkpoint_fingerprint, is_state_file, read_state_file, read_tuned_state, state_metadata,
                          write_state_file)
from rwkvx.weights import (ARITHMETIC_DTYPES, MATRIX_NAMES, VECTOR_NAMES, ModelWeights, head_arithmetic, linear,
                           new_state, to_float32)


def _token_id(value) -> int:
    # ints and numpy integers only: a float or a bool is never silently taken as an id
    if isinstance(value, (bool, np.bool_)):
        raise TypeError("a bool is not a token id")
    return operator.index(value)


# Tokens per matrix-matrix pass in sequence mode: enough to turn each weight read into
# many multiply-adds (the products split a chunk further so that their inputs stay in
# L2). Measured on the 430M shape, float32, 256-token prompt: 64 tokens 277, 128 300,
# 256 303 tokens/s; 128 needs half 256's scratch.
DEFAULT_CHUNK_SIZE = 128


# How products compute (load's `arithmetic`)
ARITHMETICS = ("float32",) + tuple(ARITHMETIC_DTYPES)


def check_arithmetic(arithmetic: str, dtype: str) -> None:
    """Raise RwkvxError (one line) unless `arithmetic` can run weights of `dtype`."""
    if arithmetic not in ARITHMETICS:
        raise RwkvxError(f"arithmetic: expected one of {', '.join(ARITHMETICS)}, got {arithmetic!r}")
    needs = ARITHMETIC_DTYPES.get(arithmetic)
    if needs is not None and dtype not in needs:
        raise RwkvxError(f"arithmetic {arithmetic} needs dtype {' or '.join(needs)} (its products take the "
                         f"weights as they are stored), got dtype {dtype}")


def split_format(name: str) -> tuple[str, str]:
    """A format as the scripts name it, "DTYPE" or "DTYPE:ARITHMETIC" (e.g. "q4:int8"), as load's
    (dtype, arithmetic), arithmetic "float32" when not given. Raises RwkvxError (one line,
    naming `name`) for a dtype load does not accept or an arithmetic that dtype cannot run."""
    dtype, _, arithmetic = name.partition(":")
    if dtype not in DTYPES:
        raise RwkvxError(f"{name!r} is not a dtype rwkvx.load accepts ({', '.join(DTYPES)})")
    try:
        check_arithmetic(arithmetic or "float32", dtype)
    except RwkvxError as e:
        raise RwkvxError(f"{name!r}: {e}") from None
    return dtype, arithmetic or "float32"


class RWKV:
    """An RWKV-4 model ready to run.

    forward() is safe to call from several Python threads (calls are serialised, since
    they share scratch buffers); the kernels release the GIL while they run.
    """

    def __init__(self, weights: ModelWeights, threads: int | None = None, arithmetic: str = "float32"):
        check_arithmetic(arithmetic, weights.dtype)
        self.weights = weights
        self.arithmetic = arithmetic
        self._n_threads = effective_n_threads(threads)
        self.blocks = [
            _layer.Block({n: b[n] for n in VECTOR_NAMES}, {n: linear(b[n], arithmetic) for n in MATRIX_NAMES})
            for b in weights.blocks
        ]
        self.head = linear(weights.head, head_arithmetic(arithmetic, weights.dtype))
        self._workspace = _layer.Workspace(weights.n_embd, weights.n_ffn)
        self._x = np.empty(weights.n_embd, dtype=np.float32)
        self._x_norm = np.empty(weights.n_embd, dtype=np.float32)
        self._seq_ws = None
        # tokens per pass over the weights in sequence mode (prompts, batches)
        self.chunk_size = DEFAULT_CHUNK_SIZE
        self._lock = threading.Lock()
        self._fingerprint = None

    @property
    def n_threads(self) -> int:
        """Kernel threads, fixed at load (scratch buffers are sized for them)."""
        return self._n_threads

    n_layer = property(lambda self: self.weights.n_layer)
    n_embd = property(lambda self: self.weights.n_embd)
    n_vocab = property(lambda self: self.weights.n_vocab)
    dtype = property(lambda self: self.weights.dtype)

    architecture = "RWKV-4"
    # set_initial_state's state (read-only), or None: sequences start from zeros
    _initial: np.ndarray | None = None
    _initial_digest = ""

    @property
    def state_shape(self) -> tuple[int, ...]:
        """The shape of a state: (n_layer, 5, n_embd) float32 for RWKV-4."""
        return (self.n_layer, 5, self.n_embd)

    def new_state(self) -> np.ndarray:
        """A fresh state: float32 of state_shape, zeros or a copy of the initial state."""
        if self._initial is not None:
            return self._initial.copy()
        return new_state(self.n_layer, self.n_embd)

    @property
    def initial_state(self) -> np.ndarray | None:
        """The state every sequence starts from (set_initial_state; read-only), or None for
        zeros."""
        return self._initial

    def set_initial_state(self, state) -> None:
        """Start every sequence from `state` instead of zeros: forward and forward_batch
        given no state, new_state, and so chat, the prompt cache, perplexity and the server.

        state: an array of state_shape; or a file: an rwkvx state file (save_state, chat's
        /save; its tokens are not replayed) or, for RWKV-5/6/7, a state-tuning file
        (blocks.N.att.time_state per layer, as RWKV-PEFT and RWKV-LM's state tuning save
        them); or None for zeros again. State files record the start
        (initial_state_digest), so that a prompt cache made from another start is refused;
        a saved state holds all its sequence needs and loads under any start.
        Raises RwkvxError (CheckpointError for a file) for anything else.
        """
        if state is None:
            self._initial, self._initial_digest = None, ""
            return
        if isinstance(state, (str, bytes, os.PathLike)):
            state = self.read_initial_state(state)
        else:
            state = self._check_state(state)
            if not np.isfinite(state).all():
                raise RwkvxError("initial state: holds NaN or infinite values")
        state.flags.writeable = False
        self._initial = state
        self._initial_digest = hashlib.sha256(state.tobytes()).hexdigest()[:32]

    def read_initial_state(self, path: str | os.PathLike) -> np.ndarray:
        """The state a file would start sequences from (set_initial_state's files: an rwkvx
        state file or a state-tuning file), checked for this model (its shape, finite
        values), without setting it: a private float32 array."""
        path = os.fsdecode(path)
        # state tuning exists for RWKV-5/6/7 only: RWKV-4 reads state files alone
        if is_state_file(path) or not hasattr(self, "n_head"):
            arrays, _ = read_state_file(path, architecture=self.architecture, state_shape=self.state_shape,
                                        fingerprint=self.fingerprint, n_vocab=self.n_vocab)
            return arrays["state"]
        return read_tuned_state(path, architecture=self.architecture, n_layer=self.n_layer, n_head=self.n_head,
                                head_size=self.head_size)

    @property
    def initial_state_digest(self) -> str:
        """A hash of the initial state (set_initial_state); "" for zeros. State files record it."""
        return self._initial_digest

    @property
    def fingerprint(self) -> str:
        """Tells checkpoints apart; the same for every dtype of one checkpoint (state files
        record it). load() takes it from the checkpoint file's bytes
        (rwkvx.states.checkpoint_fingerprint); a model built from weights in memory hashes
        their float32 vectors."""
        if self._fingerprint is None:
            self._fingerprint = self.weights.fingerprint()
        return self._fingerprint

    def save_state(self, path: str | os.PathLike, state: np.ndarray, tokens: Iterable[int] | None = None) -> None:
        """Write state (and optionally the tokens that produced it) to one file at path.

        The file is safetensors with metadata (format version, architecture, shape, this
        model's fingerprint); it replaces path atomically. load_state reads it back exactly.
        """
        tensors = self.state_tensors(state, tokens)
        n_tokens = len(tensors["tokens"]) if "tokens" in tensors else None
        write_state_file(path, tensors, state_metadata(self.architecture, self.state_shape, self.fingerprint,
                                                       n_tokens, self.initial_state_digest))

    def state_tensors(self, state, tokens=None) -> dict[str, np.ndarray]:
        """The checked arrays a state file holds: "state" and, given tokens, "tokens" (int32)."""
        tensors = {"state": self._check_state(state)}
        if tokens is not None:
            if isinstance(tokens, (str, bytes)):
                raise RwkvxError("tokens: expected a sequence of ints, got a string")
            tokens = list(tokens)
            tensors["tokens"] = np.asarray(self._check_tokens(tokens) if tokens else [], dtype=np.int32)
        return tensors

    def load_state(self, path: str | os.PathLike) -> tuple[np.ndarray, list[int] | None]:
        """Read a state file written by save_state: (state, tokens or None).

        Raises CheckpointError (one line naming the file and the reason) for a file that is
        not a state, is damaged, or belongs to a model of another architecture or shape;
        warns (rwkvx.RwkvxWarning) for a state of another checkpoint of the same shape.
        """
        arrays, _ = read_state_file(path, architecture=self.architecture, state_shape=self.state_shape,
                                    fingerprint=self.fingerprint, n_vocab=self.n_vocab)
        tokens = arrays.get("tokens")
        return arrays["state"], (None if tokens is None else tokens.tolist())

    def _check_tokens(self, tokens: Iterable[int]) -> list[int]:
        if isinstance(tokens, (str, bytes)):
            raise RwkvxError("tokens: expected a sequence of ints, got a string (encode it with a tokenizer)")
        try:
            tokens = [_token_id(t) for t in tokens]
        except TypeError:
            raise RwkvxError("tokens: expected a sequence of ints") from None
        if not tokens:
            raise RwkvxError("tokens: expected at least one token, got none")
        bad = [t for t in tokens if not 0 <= t < self.n_vocab]
        if bad:
            raise RwkvxError(f"token id {bad[0]} out of range: the vocabulary has ids 0..{self.n_vocab - 1}")
        return tokens

    def _check_state(self, state, copy: bool = True) -> np.ndarray:
        expected = self.state_shape
        if not isinstance(state, np.ndarray) or state.shape != expected:
            got = state.shape if isinstance(state, np.ndarray) else type(state).__name__
            raise RwkvxError(f"state: expected a float32 array {expected}, got {got}")
        # float64 and float16 states are converted; anything else (ints, complex, objects)
        # was never a state and is refused rather than silently cast
        if state.dtype.kind != "f":
            raise RwkvxError(f"state: expected a float32 array {expected}, got dtype {state.dtype}")
        if copy or state.dtype != np.float32:
            return np.array(state, dtype=np.float32, order="C")
        return state

    def forward(self, tokens: Iterable[int], state: np.ndarray | None = None, *,
                all_logits: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Feed tokens in order; return (logits, new state).

        tokens: ints with 0 <= token < n_vocab. state: None for a fresh start, or a state
        from an earlier call, which is NOT modified (a prompt's state can seed many
        continuations). logits: float32 (n_vocab,) after the last token, or
        (len(tokens), n_vocab) after every token with all_logits=True (for perplexity).
        new state: float32 (n_layer, 5, n_embd).

        Several tokens are processed chunk_size at a time as matrix-matrix products (only
        the WKV recurrence steps token by token); the results are bit-identical to feeding
        the tokens one by one.
        """
        tokens = self._check_tokens(tokens)
        state = self.new_state() if state is None else self._check_state(state)
        with self._lock:
            if len(tokens) == 1 and not all_logits:
                return self._decode(tokens[0], state), state
            stacked = state[:, None]  # (n_layer, 1, 5, n_embd): a batch of one, shares memory
            logits = self._run_rows([tokens], stacked, all_logits)
        return (logits if all_logits else logits[0]), state

    def forward_batch(self, tokens_per_sequence: Sequence[Iterable[int]],
                      states: Sequence[np.ndarray | None] | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
        """Advance several independent sequences in one pass over the weights.

        tokens_per_sequence: B lists of tokens (one each when decoding). states: None, or B
        entries that are None (fresh) or states from earlier calls; they are NOT modified.
        Returns logits float32 (B, n_vocab) after each sequence's last token and B new
        states. Each sequence's results are bit-identical to running it alone (with
        arithmetic "int8" or "bfloat16", to running it in any other batch of several
        sequences: see load).
        """
        if isinstance(tokens_per_sequence, (str, bytes)) or not isinstance(tokens_per_sequence, Sequence):
            raise RwkvxError("tokens_per_sequence: expected a list of token lists")
        if not tokens_per_sequence:
            raise RwkvxError("tokens_per_sequence: expected at least one sequence, got none")
        token_lists = [self._check_tokens(t) for t in tokens_per_sequence]
        n_seq = len(token_lists)
        if states is None:
            states = [None] * n_seq
        if isinstance(states, np.ndarray) or len(states) != n_seq:
            raise RwkvxError(f"states: expected a list of {n_seq} states (or None entries)")
        # the new states, one block: each sequence's state is a C-contiguous (n_layer, 5,
        # n_embd) part of it, returned as is (copying them out took 1.2 ms of a 44 ms
        # 8-sequence uint8 step on the 430M shape)
        block = np.empty((n_seq, self.n_layer, 5, self.n_embd), dtype=np.float32)
        sources = [self.new_state() if st is None else self._check_state(st, copy=False) for st in states]
        _layer.copy_rows(block.reshape(n_seq, -1),
                         [np.ascontiguousarray(st, dtype=np.float32).reshape(-1) for st in sources], self.n_threads)
        with self._lock:
            # per layer, the batch's states (n_seq, 5, n_embd), sequences a state apart
            logits = self._run_rows(token_lists, block.transpose(1, 0, 2, 3), all_logits=False)
        return logits, list(block)

    def _decode(self, token: int, state: np.ndarray) -> np.ndarray:
        # one token: matrix-vector products, the memory-bound path
        w, x, n = self.weights, self._x, self.n_threads
        _layer.layer_norm(to_float32(w.emb[token]), w.ln0_weight, w.ln0_bias, x)
        for block, layer_state in zip(self.blocks, state):
            block.forward(x, layer_state, self._workspace, n)
        _layer.layer_norm(x, w.ln_out_weight, w.ln_out_bias, self._x_norm)
        logits = np.empty(self.n_vocab, dtype=np.float32)
        self.head(self._x_norm, logits, n_threads=n)
        return logits

    def _seq_workspace(self, n_rows: int) -> _layer.SeqWorkspace:
        ws = self._seq_ws
        if ws is None or ws.n_max < n_rows:
            ws = self._seq_ws = _layer.SeqWorkspace(n_rows, self.n_embd, self.weights.n_ffn, self.n_threads)
        return ws

    def _run_rows(self, token_lists: list[list[int]], stacked: np.ndarray, all_logits: bool) -> np.ndarray:
        """Run B sequences (their states in stacked (n_layer, B, 5, n_embd), updated in place;
        each (5, n_embd) contiguous) through the model, at most chunk_size tokens per pass
        over the weights."""
        w, n = self.weights, self.n_threads
        rows = [(b, t) for b, toks in enumerate(token_lists) for t in toks]
        chunk = max(1, int(self.chunk_size))
        ws = self._seq_workspace(min(chunk, len(rows)))
        final = np.empty((len(token_lists), self.n_embd), dtype=np.float32)
        outputs = []
        for begin in range(0, len(rows), chunk):
            part = rows[begin:begin + chunk]
            seqs = [b for b, _ in part]
            first, last = seqs[0], seqs[-1]
            # starts[i] = first row of sequence first+i within this chunk
            starts = np.searchsorted(np.asarray(seqs), np.arange(first, last + 2)).astype(np.intp)
            x = to_float32(w.emb[np.fromiter((t for _, t in part), dtype=np.intp, count=len(part))])
            x = np.ascontiguousarray(x, dtype=np.float32)
            _layer.layer_norm_rows(x, w.ln0_weight, w.ln0_bias, x, n)
            for block, layer_states in zip(self.blocks, stacked):
                block.forward_rows(x, layer_states[first:last + 1], starts, ws, n)
            if all_logits:
                outputs.append(self._head_rows(x))
            # a sequence whose last token is in this chunk: keep that row for the head
            for b in range(first, last + 1):
                end = begin + starts[b - first + 1]
                if end == len(rows) or rows[end][0] != b:
                    final[b] = x[starts[b - first + 1] - 1]
        return np.concatenate(outputs) if all_logits else self._head_rows(final)

    def _head_rows(self, x: np.ndarray) -> np.ndarray:
        xn = np.empty_like(x)
        _layer.layer_norm_rows(x, self.weights.ln_out_weight, self.weights.ln_out_bias, xn, self.n_threads)
        return self.head.matmul(xn, n_threads=self.n_threads)

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
                f"dtype={self.dtype!r}{self._arithmetic_repr()}, threads={self.n_threads})")

    def _arithmetic_repr(self) -> str:
        return "" if self.arithmetic == "float32" else f", arithmetic={self.arithmetic!r}"


def load(path: str | os.PathLike, dtype: str = "float32", threads: int | None = None, *,
         mmap: bool = True, check_tensors: bool | None = None, arithmetic: str = "float32",
         initial_state=None) -> RWKV:
    """Load an RWKV-4, 5.2, 6 or 7 checkpoint to run in `dtype`.

    path: a checkpoint file or folder in any format rwkvx reads (see the README), or
    "demo" for the small model packaged with rwkvx.
    dtype: the format weight matrices are kept and read in, all computed in float32:
    "float32"; "bfloat16" (half the bytes, exact for BlinkDL's bf16 releases); "float16";
    "uint8" (a quarter, quantised at load); or "q4" (4.25 bits a weight in groups of 64,
    the head uint8; quantised at load; see rwkvx.quant). The embedding stays as stored.
    threads: kernel threads; None follows OMP_NUM_THREADS (else one per core).
    mmap: weights the file stores in `dtype` are used in place from the mapped file
    (shared with the page cache, paged in as first read). False reads them into private
    memory in 2 MB pages and drops the file from the page cache: a full read at load, and
    faster decoding where the page cache holds the file in small pages (see README, Huge
    pages).
    check_tensors: scan weights for NaN and infinite values, naming the first bad tensor:
    None (default) those the load reads or converts anyway, and every vector; True all,
    those used in place from the mapped file too (reads the whole file once); False none.
    arithmetic: how the weight matrices' products compute. "float32" (default): in
    float32, bit-identical for any batching, chunking and thread count. "int8" (dtype
    "uint8" or "q4"): with uint8, a product of two or more rows (prompt chunks, forward_batch) rounds each
    row's input to int8 with its own scale (max |rx x| / 127, half to even) and sums
    q x int8 exactly in integers (AVX-512 VNNI where the CPU has it, else plain loops
    giving the same bits), then finishes in float32; a product of one row (decoding one
    sequence) stays float32, which is as fast there. Prompts and batches run faster; the
    results are not float32's (the README has the measured cost in KL), but they are
    deterministic: the same bits for any thread count and CPU, and a row's result does
    not depend on which other rows share its products, only on whether it shares them
    with any (so forward_batch of several sequences can differ in the last bits from
    running each alone). With q4, every product of the q4 matrices, of one row too (a q4
    decode is bound by arithmetic, not memory), rounds each row's input to int8 the same way
    and sums the 4-bit codes times it exactly per group of 64 columns, then scales the
    groups' sums in float32 (rwkvx/kernels/_q4int8.h); the uint8 head stays float32, so a
    sequence gives the same bits alone and in any batch. "bfloat16" (dtype "bfloat16" only): a product of two or more rows
    rounds each row's input to bfloat16 (to nearest even) and multiplies it with the stored
    bfloat16 weights by the rules of AVX512-BF16's vdpbf16ps (32 multiply-adds an
    instruction, where float32's FMA does 16), using the instruction where the CPU has it
    (Intel Cooper Lake and Sapphire Rapids on, AMD Zen 4 on) and AVX2's FMA giving the same
    bits elsewhere (about 1.5 times float32's time there; plain C without AVX2);
    deterministic in the same way as "int8".
    initial_state: the state every sequence starts from (see RWKV.set_initial_state): an
    rwkvx state file, a state-tuning file (RWKV-5/6/7) or an array; None: zeros.
    Raises CheckpointError for unreadable or inconsistent files, RwkvxError for bad
    arguments.
    """
    check_arithmetic(arithmetic, dtype)
    if threads is not None:
        effective_n_threads(threads)
    # RWKV-5.2, 6 and 7 are recognised by their tensor names and run by rwkvx.arch
    from rwkvx import arch
    version, source = arch.recognise_path(path)
    if version is not None:
        from rwkvx.arch.model import load as load_next
        model = load_next(source, version, dtype, threads, mmap=mmap, check_tensors=check_tensors,
                          arithmetic=arithmetic)
    else:
        model = RWKV(load_weights(path, dtype, mmap=mmap, check_tensors=check_tensors, source=source), threads=threads,
                     arithmetic=arithmetic)
    # from the file, at load (a few KB; the file may be gone or replaced later), through
    # the index recognise_path opened
    model._fingerprint = checkpoint_fingerprint(source)
    if initial_state is not None:
        model.set_initial_state(initial_state)
    return model
