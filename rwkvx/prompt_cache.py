"""A prompt cache on disk (``python -m rwkvx.run --prompt-cache FILE``), like llama.cpp's.

An RWKV model cannot rewind: a state after tokens t[0..n) is useful for a new prompt only if
t[0..n) is a prefix of it. A longer prompt often re-tokenises the end of the shorter one
(" world" + "!" may become one token), so the file keeps, besides the state after the whole
prompt, states at a few earlier positions: a dozen or so spread over the prompt, and 8 and 1
tokens before its end. A new prompt resumes from the latest stored position inside the
longest common token prefix, and always leaves at least its last token to run, which gives
the logits the first generated token is drawn from. Results are bit-identical to running
the prompt from the start, since rwkvx's results do not depend on how tokens are grouped.

The file is a state file (see :mod:`rwkvx.states`: ``model.load_state`` reads its final
state and tokens) with two more tensors: ``checkpoint_positions`` (int32) and
``checkpoint_states`` (float32, one state per position).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from rwkvx.errors import CheckpointError, RwkvxError
from rwkvx.states import read_state_file, state_metadata, write_state_file

# Most states kept besides the final one: their spacing grows with the prompt, so a
# 100,000-token prompt of a 7B model keeps ~16 states (~40 MB), not one per chunk.
MAX_CHECKPOINTS = 16
MIN_SPACING = 256
# states this many tokens before the end, for prompts that re-tokenise the last word
TAIL_POSITIONS = (8, 1)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    x, y = np.asarray(a[:n]), np.asarray(b[:n])
    return int(np.argmin(x == y))


def checkpoint_positions(n: int) -> list[int]:
    """The positions (tokens fed so far) whose states a prompt of n tokens keeps, ascending."""
    spacing = max(MIN_SPACING, math.ceil(n / MAX_CHECKPOINTS))
    spaced = range(spacing, n, spacing)
    return sorted({*spaced, *(n - k for k in TAIL_POSITIONS if n - k > 0), n})


@dataclass
class Prefill:
    """A prompt run through the model up to (not including) its last token."""

    state: np.ndarray  # after tokens[:len(tokens) - 1]
    reused: int  # prompt tokens whose work came from the cache
    saved: bool  # whether the file was (re)written


class PromptCache:
    """The cache file for one model. Reading checks it belongs to this model: a cache made
    by another checkpoint is refused (CheckpointError), never used."""

    def __init__(self, path: str | os.PathLike, model, read_only: bool = False):
        self.path = os.fspath(path)
        self.model = model
        self.read_only = read_only
        self.tokens: list[int] = []
        self.states: dict[int, np.ndarray] = {}
        if os.path.exists(self.path) or os.path.islink(self.path):
            self._read()
        elif read_only:
            raise RwkvxError(f"{self.path}: no such prompt cache (--prompt-cache-ro only reads one)")
        elif not os.path.isdir(os.path.dirname(os.path.abspath(self.path))):
            raise RwkvxError(f"{self.path}: cannot create the prompt cache: no such directory")

    def _read(self) -> None:
        m = self.model
        arrays, meta = read_state_file(self.path, architecture=m.architecture, state_shape=m.state_shape,
                                       fingerprint=None, n_vocab=m.n_vocab)
        if meta.get("model_fingerprint") != m.fingerprint:
            raise CheckpointError(f"{self.path}: a prompt cache made by another model "
                                  "(delete it or give another file)")
        # its tokens ran from the model's start then (files from before initial states: zeros)
        if meta.get("initial_state", "") != m.initial_state_digest:
            raise CheckpointError(f"{self.path}: a prompt cache made from another initial state (--state); "
                                  "delete it or give another file")
        if "tokens" not in arrays:
            raise CheckpointError(f"{self.path}: a state without its tokens cannot serve as a prompt cache")
        self.tokens = arrays["tokens"].tolist()
        self.states = {len(self.tokens): arrays["state"]}
        positions, states = arrays.get("checkpoint_positions"), arrays.get("checkpoint_states")
        if positions is not None or states is not None:
            if (positions is None or states is None or positions.ndim != 1 or positions.dtype != np.int32
                    or states.shape != (len(positions), *m.state_shape) or states.dtype != np.float32
                    or not np.isfinite(states).all()
                    or (len(positions) and not 0 < positions.min() <= positions.max() <= len(self.tokens))):
                raise CheckpointError(f"{self.path}: damaged prompt cache (its checkpoint states do not fit)")
            self.states.update({int(p): s for p, s in zip(positions, states)})

    def prefill(self, tokens: list[int]) -> Prefill:
        """Run tokens[:-1] from the best stored state, saving the cache for tokens unless
        read-only or unchanged. The caller feeds tokens[-1] (and generates) from the result."""
        if not tokens:
            raise RwkvxError("prompt: expected at least one token, got none")
        n = len(tokens)
        common = _common_prefix(self.tokens, tokens)
        resume = max((p for p in self.states if p <= min(common, n - 1)), default=0)
        start = resume
        state = self.states[start] if start else self.model.new_state()
        keep = checkpoint_positions(n)
        kept = {p: s for p, s in self.states.items() if p <= start and p in keep}
        if start in keep:
            kept[start] = state
        # run up to each position to keep in turn (the same work as one call), then to n
        for stop in [p for p in keep if p > start]:
            if stop == n:
                # the final state needs the last token too; generation then repeats it from
                # the state before it, one decode step
                _, kept[n] = self.model.forward(tokens[start:n], state)
                break
            _, state = self.model.forward(tokens[start:stop], state)
            kept[stop] = state
            start = stop
        before_last = kept[n - 1] if n > 1 else self.model.new_state()
        saved = False
        if not self.read_only and tokens != self.tokens:
            self._write(tokens, kept)
            saved = True
        return Prefill(before_last, resume, saved)

    def _write(self, tokens: list[int], kept: dict[int, np.ndarray]) -> None:
        m, n = self.model, len(tokens)
        positions = sorted(p for p in kept if p != n)
        tensors = m.state_tensors(kept[n], tokens)
        tensors["checkpoint_positions"] = np.asarray(positions, dtype=np.int32)
        tensors["checkpoint_states"] = (np.stack([kept[p] for p in positions]) if positions
                                        else np.zeros((0, *m.state_shape), np.float32))
        write_state_file(self.path, tensors, state_metadata(m.architecture, m.state_shape, m.fingerprint, n,
                                                            m.initial_state_digest))
        self.tokens, self.states = list(tokens), dict(kept)
