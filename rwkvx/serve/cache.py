"""The server's state cache: token prefix -> the model state after it, in a bounded LRU.

An RWKV state after tokens t[0..n) is all the model needs to continue from there, whatever
n is, so a conversation re-sent with one more turn resumes from the state at the end of
the last one. Entries are keyed by their token sequence; a lookup finds the longest cached
sequence that is a prefix of the request's tokens. To make that one pass over the request,
each entry is also filed under a hash of its tokens, and the request's prefix hashes are
computed incrementally, once.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

_MOD = (1 << 61) - 1
_BASE = 1_000_003


def prefix_hashes(tokens: list[int]) -> list[int]:
    """h[k] = hash of tokens[:k], for k = 0..len(tokens) (polynomial, mod a Mersenne prime)."""
    h, out = 0, [0]
    for t in tokens:
        h = (h * _BASE + t + 1) % _MOD
        out.append(h)
    return out


@dataclass
class Entry:
    tokens: np.ndarray  # int32: a tuple of Python ints would take ~36 bytes a token
    state: np.ndarray
    logits: np.ndarray | None  # after the last token, when known

    @property
    def nbytes(self) -> int:
        return self.state.nbytes + (0 if self.logits is None else self.logits.nbytes) + self.tokens.nbytes


class StateCache:
    """LRU of states by token prefix, bounded by bytes. Thread-safe."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self.nbytes = 0
        self._entries: OrderedDict[tuple[int, int], Entry] = OrderedDict()  # (length, hash) -> entry
        self._lengths: dict[int, int] = {}  # cached length -> how many entries have it
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, tokens: list[int], state: np.ndarray, logits: np.ndarray | None = None) -> None:
        """Keep a copy of state (and logits) as the result of running tokens from the start."""
        if not tokens:
            return
        entry = Entry(np.asarray(tokens, dtype=np.int32), np.array(state, copy=True),
                      None if logits is None else np.array(logits, copy=True))
        if entry.nbytes > self.max_bytes:
            return
        key = (len(tokens), prefix_hashes(tokens)[-1])
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._forget(key, old)
            self._entries[key] = entry
            self._lengths[key[0]] = self._lengths.get(key[0], 0) + 1
            self.nbytes += entry.nbytes
            while self.nbytes > self.max_bytes:
                k, e = self._entries.popitem(last=False)
                self._forget(k, e)

    def _forget(self, key, entry: Entry) -> None:
        self.nbytes -= entry.nbytes
        self._lengths[key[0]] -= 1
        if not self._lengths[key[0]]:
            del self._lengths[key[0]]

    def longest_prefix(self, tokens: list[int], *, need_logits_at_end: bool = True) -> Entry | None:
        """The entry with the longest token sequence that is a prefix of tokens.

        An entry covering all of tokens is only returned if it has logits (or
        need_logits_at_end is False): without them the last token must run again.
        """
        hashes = prefix_hashes(tokens)
        n = len(tokens)
        wanted = np.asarray(tokens, dtype=np.int64)
        with self._lock:
            for length in sorted(self._lengths, reverse=True):
                if length > n:
                    continue
                entry = self._entries.get((length, hashes[length]))
                if entry is None or not np.array_equal(entry.tokens, wanted[:length]):
                    continue
                if length == n and need_logits_at_end and entry.logits is None:
                    continue
                self._entries.move_to_end((length, hashes[length]))
                return entry
        return None
