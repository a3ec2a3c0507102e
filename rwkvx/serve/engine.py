"""The server's engine: one thread owns the model and advances every active sequence together.

Each step is one ``model.forward_batch`` call: every decoding sequence feeds its last
sampled token, and sequences still reading their prompts feed a slice of it, so the weights
are read once for all of them (continuous batching). New requests join between steps; a
long prompt is fed a slice per step while others decode (chunked prefill), so it does not
freeze their streams; a finished or cancelled sequence leaves at the next step.

After a prompt is read, its state and logits go into the state cache, and after a
sequence ends, the state after everything it fed: a request whose tokens start with a
cached sequence resumes from there (a chat client re-sending its history pays only for the
new turn).

The engine knows nothing of HTTP: a request comes in as token ids, a Sampler and limits,
and goes out as events passed to a callback, from the engine's thread.
"""
from __future__ import annotations

import itertools
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from rwkvx.errors import RwkvxError
from rwkvx.generate import _find_stop, _partial_stop_len
from rwkvx.serve.cache import StateCache

# The most prompt tokens fed per step while other sequences are decoding. How many are fed
# adapts (see _adapt_prefill) so that such a step takes at most PREFILL_SLOWDOWN times a
# step of decoding alone: streams slow down while a long prompt is read, but never stall.
DEFAULT_PREFILL_CHUNK = 64
PREFILL_SLOWDOWN = 2.5
# ... and when nobody is decoding, so a lone prompt runs at full matrix-matrix speed.
IDLE_PREFILL_CHUNK = 512


def _logprobs(logits: np.ndarray, token: int, k: int) -> tuple[int, float, list[tuple[int, float]]]:
    """token's log-probability under the model's distribution (the logits before sampling's
    penalties and temperature, as OpenAI reports them) and the k most likely tokens'."""
    # float32 exponentials summed in float64: one pass over the vocabulary, on the engine's
    # thread, so cheap enough not to slow the other sequences of its steps
    top = float(logits.max())
    log_total = top + math.log(float(np.exp(logits - np.float32(top)).sum(dtype=np.float64)))
    best = np.argpartition(logits, len(logits) - k)[len(logits) - k:] if 0 < k < len(logits) else \
        np.arange(len(logits) if k else 0)
    best = best[np.argsort(-logits[best], kind="stable")]
    return token, float(logits[token]) - log_total, [(int(t), float(logits[t]) - log_total) for t in best]


def _real(tokens: list[int]) -> int:
    """How many of tokens are the prompt's (not a start's marker)."""
    return len(tokens) - (1 if tokens and tokens[0] < 0 else 0)


def _extends(tokens: list[int], prefix: list[int]) -> bool:
    return len(prefix) <= len(tokens) and tokens[:len(prefix)] == prefix


class QueueFull(RwkvxError):
    """More requests are waiting than the server accepts."""


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


@dataclass
class Sequence:
    """One generation: its tokens, state, sampler and limits. Created by Engine.submit."""

    id: int
    prompt: list[int]
    sampler: object
    max_tokens: int
    stops: tuple[str, ...]
    eos_id: int | None
    on_event: Callable[[str, object], None]
    state: np.ndarray | None = None
    fed: list[int] = field(default_factory=list)  # tokens whose effect is in state
    logits: np.ndarray | None = None  # after fed, when known and not yet sampled from
    next_token: int | None = None
    generated: list[int] = field(default_factory=list)
    decoder: object = None  # the tokenizer's StreamDecoder, from the first generated token
    text_pending: str = ""
    finish_reason: str | None = None
    error: str | None = None
    cancelled: bool = False
    usage: Usage = field(default_factory=Usage)
    arrived: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    last_token_at: float | None = None
    warm_up: bool = False  # only caches its state (Engine.remember): no client waits for it
    stopped_by_text: bool = False  # a stop string ended it (its last tokens' text was cut)
    logprobs: int | None = None  # alternatives to record with each generated token; None: none
    # per generated token, with logprobs: (token, its log-probability, [(alternative, log-probability)])
    token_logprobs: list = field(default_factory=list)

    @property
    def prefilling(self) -> bool:
        return len(self.fed) < len(self.prompt)


class Engine:
    """Owns the model; runs the scheduling loop in its own thread (start/stop)."""

    def __init__(self, model, tokenizer, *, max_batch: int = 8, max_queue: int = 64,
                 state_cache_bytes: int = 512 << 20, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                 metrics=None):
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self._chunk = min(8, prefill_chunk)  # the adaptive share, starting small
        self._decode_seconds: float | None = None  # a recent decode-only step
        self.cache = StateCache(state_cache_bytes)
        self.metrics = metrics
        self._waiting: deque[Sequence] = deque()
        self._active: list[Sequence] = []
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._starts: list[np.ndarray] = []  # add_start's states; start k is _starts[k - 1]
        self.start_names: dict[str, int] = {}
        # ids the tokenizer cannot decode (a padded vocabulary) are never drawn
        self._mask_from = tokenizer.vocab_size if tokenizer.vocab_size < model.n_vocab else None

    # ---- called from other threads ----

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="rwkvx-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()

    def add_start(self, name: str, state: np.ndarray) -> int:
        """Register a state sequences may start from instead of the model's (a tuned state
        the server offers by name); returns its number for submit and remember
        (start_names[name] too). Call before start()."""
        if name in self.start_names:
            raise RwkvxError(f"start {name!r}: given twice")
        state = np.array(state, dtype=np.float32)
        if state.shape != tuple(self.model.state_shape):
            raise RwkvxError(f"start {name!r}: a state of shape {state.shape}, this model's are "
                             f"{tuple(self.model.state_shape)}")
        self._starts.append(state)
        self.start_names[name] = len(self._starts)
        return len(self._starts)

    def submit(self, prompt: list[int], sampler, *, max_tokens: int, stops: tuple[str, ...] = (),
               ignore_eos: bool = False, logprobs: int | None = None, start: int = 0,
               on_event: Callable[[str, object], None]) -> Sequence:
        """Queue a generation. on_event(kind, value) is called from the engine's thread with
        ("text", str) pieces and finally ("done", Sequence). logprobs: record each generated
        token's log-probability and this many alternatives' (Sequence.token_logprobs, filled
        before the text that holds the token is sent). start: 0 for the model's own start,
        else a number from add_start. Raises QueueFull."""
        if not prompt:
            raise RwkvxError("prompt: expected at least one token, got none")
        seq = Sequence(next(self._ids), self._marked(prompt, start), sampler, max_tokens, tuple(stops),
                       None if ignore_eos else self.tokenizer.eos_id, on_event, logprobs=logprobs)
        seq.usage.prompt_tokens = len(prompt)
        if hasattr(sampler, "accept_prompt"):
            sampler.accept_prompt(list(prompt))  # the repeat penalty's window starts in the prompt
        self._enqueue(seq)
        return seq

    def start_state(self, start: int) -> np.ndarray:
        """A fresh copy of the state start number `start` begins from (0: the model's own)."""
        return self._starts[start - 1].copy() if start else self.model.new_state()

    def masked(self, logits: np.ndarray) -> np.ndarray:
        """logits with the ids the tokenizer cannot decode (a padded vocabulary) at -inf."""
        if self._mask_from is None:
            return logits
        logits = logits.copy()
        logits[self._mask_from:] = -np.inf
        return logits

    def _marked(self, tokens: list[int], start: int) -> list[int]:
        """tokens as sequences and the cache hold them: after another start, behind a marker
        (-start, never a real token) whose effect is that start's state. So the cache, and
        sequences sharing a prompt, tell the starts apart with no more code than the tokens."""
        if not 0 <= start <= len(self._starts):
            raise RwkvxError(f"start: expected 0..{len(self._starts)}, got {start}")
        tokens = list(tokens)
        if any(not 0 <= t < self.model.n_vocab for t in tokens):  # a negative id would pass for a marker
            raise RwkvxError(f"prompt: token ids must be in 0..{self.model.n_vocab - 1}")
        return [-start] + tokens if start else tokens

    def _enqueue(self, seq: Sequence) -> None:
        with self._cond:
            free_slots = max(0, self.max_batch - len(self._active))
            if not seq.warm_up and len(self._waiting) >= self.max_queue + free_slots:
                raise QueueFull(f"the server is busy: {len(self._waiting)} requests are waiting")
            self._waiting.append(seq)
            self._cond.notify()

    def remember(self, tokens: list[int], start: int = 0) -> None:
        """Run tokens (from the longest cached prefix) only to cache their state, e.g. a chat's
        history with its reply written as the next request will send it. Not counted against
        the queue's limit (one per chat request, so bounded by them) nor in the metrics."""
        if tokens:
            self._enqueue(Sequence(next(self._ids), self._marked(tokens, start), None, 0, (), None,
                                   lambda kind, value: None, warm_up=True))

    def cancel(self, seq: Sequence) -> None:
        """Stop seq (e.g. its client went away); its slot is freed at the next step."""
        seq.cancelled = True
        with self._cond:
            self._cond.notify()

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def active(self) -> int:
        return len(self._active)

    # ---- the engine's thread ----

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._waiting and not self._active:
                    self._cond.wait()
                if self._stopping:
                    return
            try:
                with self._cond:
                    self._drop_cancelled()
                    self._admit_waiting()
                self._step()
            except Exception as e:  # a bug: fail these requests, keep serving the next ones
                for seq in self._active:
                    self._finish(seq, "error", error=f"{type(e).__name__}: {e}")
                self._active = []
            if self.metrics is not None:
                self.metrics.engine_state(len(self._waiting), len(self._active), self.cache.nbytes, len(self.cache))

    def _drop_cancelled(self) -> None:
        for seq in [s for s in self._active if s.cancelled]:
            self._finish(seq, "cancelled")
        self._active = [s for s in self._active if s.finish_reason is None]
        self._waiting = deque(s for s in self._waiting if not s.cancelled)

    def _admit_waiting(self) -> None:
        """Move waiting sequences into free slots, in order. One whose prompt starts with the
        prompt of a sequence still reading it (the n choices of one request, the same prompt
        sent twice) waits until that one has cached its state, and resumes there instead of
        reading the same tokens again. A warm-up (Engine.remember) is not waited for: the
        request that extends it takes over its state and goes on reading, and a warm-up that
        a request already covers is dropped -- the next turn of a chat then never waits."""
        reading = [s for s in self._active if s.prefilling]
        still_waiting = deque()
        while self._waiting:
            seq = self._waiting.popleft()
            if seq.warm_up and any(_extends(s.prompt, seq.prompt) for s in self._active):
                self._finish(seq, "length")
                continue
            leader = next((r for r in reading if _extends(seq.prompt, r.prompt)), None)
            if leader is not None and leader.warm_up:
                self._take_over(seq, leader)
                reading[reading.index(leader)] = seq
                continue
            if len(self._active) >= self.max_batch or leader is not None:
                still_waiting.append(seq)
                continue
            self._active.append(seq)
            self._admit(seq)
            if seq.prefilling:
                reading.append(seq)
        self._waiting = still_waiting

    def _take_over(self, seq: Sequence, warm_up: Sequence) -> None:
        """seq continues from where warm_up (whose prompt is a prefix of seq's) has got to, in
        its slot; the tokens warm_up has read count as cached."""
        seq.state, seq.fed = warm_up.state, list(warm_up.fed)
        seq.usage.cached_tokens = _real(seq.fed)
        warm_up.state = None
        self._finish(warm_up, "length")
        self._active[self._active.index(warm_up)] = seq

    def _admit(self, seq: Sequence) -> None:
        """Start seq from the longest cached prefix of its prompt."""
        entry = self.cache.longest_prefix(seq.prompt)
        if entry is not None:
            seq.state = entry.state.copy()
            seq.fed = entry.tokens.tolist()
            seq.logits = entry.logits
            seq.usage.cached_tokens = _real(seq.fed)
        else:
            start = -seq.prompt[0] if seq.prompt[0] < 0 else 0
            seq.state = self.start_state(start)
            seq.fed = seq.prompt[:1] if start else []  # a marker is "read" by taking its state

    def _step(self) -> None:
        # sequences whose next logits are known sample first (a whole prompt from the cache)
        for seq in self._active:
            if seq.logits is not None and not seq.prefilling:
                if seq.max_tokens == 0:
                    self._finish(seq, "length")
                else:
                    self._sample(seq, seq.logits)
        live = [s for s in self._active if s.finish_reason is None and not s.cancelled]
        decoding = [s for s in live if not s.prefilling]
        budget = self._chunk if decoding else IDLE_PREFILL_CHUNK
        batch, tokens = [], []
        for seq in live:
            if seq.prefilling:
                if budget <= 0:
                    continue
                part = seq.prompt[len(seq.fed):len(seq.fed) + budget]
                budget -= len(part)
            else:
                part = [seq.next_token]
            batch.append(seq)
            tokens.append(part)
        if batch:
            start = time.perf_counter()
            if len(batch) == 1:
                # one sequence: forward takes the matrix-vector path for a single token, which
                # reads the weights at the memory's speed (forward_batch's matrix products are
                # built for several rows: 18 against 13 ms a token on the 430M shape, uint8)
                row, state = self.model.forward(tokens[0], batch[0].state)
                logits, states = row[None], [state]
            else:
                logits, states = self.model.forward_batch(tokens, [s.state for s in batch])
            seconds = time.perf_counter() - start
            if decoding:
                self._adapt_prefill(seconds, prefilled=sum(map(len, tokens)) - len(decoding))
            if self.metrics is not None:
                self.metrics.step(len(batch), sum(map(len, tokens)), seconds)
            for seq, part, row, state in zip(batch, tokens, logits, states):
                seq.state = state
                seq.fed += part
                if seq.prefilling:
                    continue
                if len(seq.fed) == len(seq.prompt):
                    self.cache.put(seq.fed, state, row)
                    if seq.max_tokens == 0:
                        self._finish(seq, "length")
                        continue
                self._sample(seq, row)
        self._active = [s for s in self._active if s.finish_reason is None]

    def _adapt_prefill(self, seconds: float, prefilled: int) -> None:
        """Keep mixed steps within PREFILL_SLOWDOWN of decode-only ones: halve the prompt
        share when a step took longer, grow it by a quarter when it took well less.
        The cost of extra rows depends on the dtype and machine (uint8 at 8 rows costs 2x a
        row, float32 1.2x), so it is measured rather than assumed."""
        if prefilled == 0:
            last = self._decode_seconds
            self._decode_seconds = seconds if last is None else 0.8 * last + 0.2 * seconds
            return
        if self._decode_seconds is None:
            return
        ratio = seconds / self._decode_seconds
        if ratio > PREFILL_SLOWDOWN:
            self._chunk = max(1, self._chunk // 2)
        elif ratio < 0.75 * PREFILL_SLOWDOWN and prefilled >= self._chunk:
            self._chunk = min(self.prefill_chunk, self._chunk + max(1, self._chunk // 4))

    def _sample(self, seq: Sequence, logits: np.ndarray) -> None:
        try:
            self._sample_one(seq, logits)
        except RwkvxError as e:  # e.g. NaN logits from a broken checkpoint: this request fails
            self._finish(seq, "error", error=str(e))

    def _sample_one(self, seq: Sequence, logits: np.ndarray) -> None:
        seq.logits = None
        logits = self.masked(logits)
        token = seq.sampler.sample(logits)
        seq.sampler.accept(token)
        now = time.perf_counter()
        if seq.first_token_at is None:
            seq.first_token_at = now
            if self.metrics is not None:
                self.metrics.first_token(now - seq.arrived)
        elif self.metrics is not None:
            self.metrics.next_token(now - seq.last_token_at)
        seq.last_token_at = now
        if token == seq.eos_id:
            return self._finish(seq, "stop")
        if seq.logprobs is not None:
            seq.token_logprobs.append(_logprobs(logits, token, seq.logprobs))
        seq.generated.append(token)
        seq.usage.completion_tokens += 1
        if seq.decoder is None:
            seq.decoder = self.tokenizer.stream()
        seq.text_pending += seq.decoder.push(token)
        cut = _find_stop(seq.text_pending, seq.stops)
        if cut >= 0:
            seq.text_pending = seq.text_pending[:cut]
            return self._finish(seq, "stop", stopped_by_text=True)
        hold = _partial_stop_len(seq.text_pending, seq.stops)
        if len(seq.text_pending) > hold:
            piece = seq.text_pending[:len(seq.text_pending) - hold]
            seq.text_pending = seq.text_pending[len(seq.text_pending) - hold:]
            seq.on_event("text", piece)
        if seq.usage.completion_tokens >= seq.max_tokens:
            return self._finish(seq, "length")
        seq.next_token = token

    def _finish(self, seq: Sequence, reason: str, *, stopped_by_text: bool = False, error: str | None = None) -> None:
        if seq.finish_reason is not None:
            return
        if reason in ("stop", "length") and not stopped_by_text and seq.decoder is not None:
            seq.text_pending += seq.decoder.flush()
            cut = _find_stop(seq.text_pending, seq.stops)
            if cut >= 0:
                seq.text_pending = seq.text_pending[:cut]
                stopped_by_text = True
        if seq.text_pending and reason in ("stop", "length"):
            seq.on_event("text", seq.text_pending)
        seq.text_pending = ""
        seq.stopped_by_text = stopped_by_text
        seq.finish_reason = reason
        seq.error = error
        # what this sequence read and wrote, for the next turn of its conversation
        if seq.state is not None and len(seq.fed) > len(seq.prompt):
            self.cache.put(seq.fed, seq.state)
        if self.metrics is not None and not seq.warm_up:
            self.metrics.finished(seq.usage.prompt_tokens, seq.usage.cached_tokens, seq.usage.completion_tokens)
        try:
            seq.on_event("done", seq)
        except Exception:  # a listener that is gone (e.g. its event loop closed) is not our failure
            pass
