"""The generation loop: prompt in, a lazy stream of text pieces out.

:func:`generate` wires three independent objects together: a model (anything with
``forward(tokens, state=None) -> (logits, new_state)`` and ``n_vocab``), a
:class:`~rwkvx.tokenizer.Tokenizer` and a :class:`~rwkvx.sampling.Sampler`. The returned
:class:`TextStream` does no work until it is iterated.
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import numpy as np

from rwkvx.errors import RwkvxError
from rwkvx.sampling import Sampler
from rwkvx.tokenizer import Tokenizer

__all__ = ["generate", "TextStream", "Model"]


class Model(Protocol):
    """What :func:`generate` needs from a model."""

    n_vocab: int

    def forward(self, tokens: list[int], state: Any = None) -> tuple[np.ndarray, Any]:
        """Feed tokens after state; return float32 logits (n_vocab,) and the new state."""
        ...


def _finite_logits(logits, fed: int) -> None:
    """Refuse logits holding NaN or +inf: sampling from them draws garbage. (-inf is a
    token the model rules out, as a logit bias bans one.)"""
    x = np.asarray(logits)
    # max is NaN when any value is, +inf when any is: one pass, no temporary
    if x.dtype.kind == "f" and x.size and not float(x.max()) < math.inf:
        raise RwkvxError(f"the model's logits hold NaN or infinite values after {fed} tokens: its weights are "
                         "probably damaged (load it with check_tensors=True, or --check-tensors, to find the "
                         "tensor), or the state passed in holds such values")


def _stop_strings(stop: str | Sequence[str]) -> tuple[str, ...]:
    """Return stop as a tuple of non-empty strings, or raise."""
    stops = (stop,) if isinstance(stop, str) else tuple(stop)
    for s in stops:
        if not isinstance(s, str):
            raise TypeError(f"stop: expected str or a sequence of str, got an item of type {type(s).__name__}")
        if not s:
            raise RwkvxError("stop: expected non-empty strings, got ''")
    return stops


def _find_stop(text: str, stops: tuple[str, ...]) -> int:
    """Return where the earliest stop string in text starts, or -1."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found, default=-1)


def _partial_stop_len(text: str, stops: tuple[str, ...]) -> int:
    """Return the length of the longest end of text that is the start of some stop string."""
    longest = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:k]):
                longest = k
                break
    return longest


class TextStream:
    """Iterator over the generated text, piece by piece (the continuation only, not the prompt).

    Tokens are generated lazily as the stream is iterated. Every piece is non-empty and ends on
    a character boundary; text that could still become a stop string is held back until it is
    known not to be one. After iteration these attributes describe the run:

    - ``prompt_tokens``, ``prompt_seconds``: the prompt's length and the time to feed it.
    - ``generated_tokens``, ``generate_seconds``: tokens sampled (an eos included) and the time
      spent sampling and feeding them (time the consumer spends between pieces is not counted).
    - ``stop_reason``: "length" (max_tokens reached), "eos" or "stop" (a stop string appeared);
      None until the stream is exhausted.
    - ``tokens``: the sampled ids, the eos included (so ``len(tokens) == generated_tokens``).
    - ``state``: the model state after the last token fed. Every generated token is fed except
      an eos and the token that completed a stop string, which are not.
    - ``text``: everything emitted so far.
    """

    def __init__(
        self,
        model: Model,
        tokenizer: Tokenizer,
        prompt_ids: list[int],
        max_tokens: int,
        sampler: Sampler,
        stops: tuple[str, ...],
        state: Any,
        ignore_eos: bool,
    ) -> None:
        self._model = model
        self._tokenizer = tokenizer
        self._prompt_ids = prompt_ids
        self._max_tokens = max_tokens
        self._sampler = sampler
        self._stops = stops
        self._eos_id = None if ignore_eos else tokenizer.eos_id
        self.prompt_tokens = len(prompt_ids)
        self.prompt_seconds = 0.0
        self.generated_tokens = 0
        self.generate_seconds = 0.0
        self.stop_reason: str | None = None
        self.tokens: list[int] = []
        self.state = state
        self.text = ""
        self._pieces = self._run()

    def __iter__(self) -> Iterator[str]:
        """Return self: a TextStream can be iterated once."""
        return self

    def __next__(self) -> str:
        """Generate until the next piece of text is ready and return it."""
        return next(self._pieces)

    def _emit(self, piece: str) -> str:
        """Record piece as emitted and return it."""
        self.text += piece
        return piece

    def _run(self) -> Iterator[str]:
        """Generate lazily; yields non-empty pieces and keeps the statistics up to date."""
        # The prompt counts towards the repeat penalty's window, as in llama.cpp.
        self._sampler.accept_prompt(self._prompt_ids)
        start = time.perf_counter()
        logits, self.state = self._model.forward(self._prompt_ids, self.state)
        self.prompt_seconds = time.perf_counter() - start
        _finite_logits(logits, len(self._prompt_ids))

        # The model may have more logits than the tokenizer has tokens (padded vocabularies);
        # ids the tokenizer cannot decode must never be drawn.
        n_tokens = self._tokenizer.vocab_size
        decoder = self._tokenizer.stream()
        # Decoded text not emitted yet, because it may be the start of a stop string.
        pending = ""
        start = time.perf_counter()
        while True:
            if self.generated_tokens >= self._max_tokens:
                self.stop_reason = "length"
                break
            if n_tokens < np.shape(logits)[0]:
                logits = np.array(logits, copy=True)
                logits[n_tokens:] = -np.inf
            token = self._sampler.sample(logits)
            self._sampler.accept(token)
            self.tokens.append(token)
            self.generated_tokens += 1
            if token == self._eos_id:
                self.stop_reason = "eos"
                break

            pending += decoder.push(token)
            cut = _find_stop(pending, self._stops)
            if cut >= 0:
                pending = pending[:cut]
                self.stop_reason = "stop"
                break
            hold = _partial_stop_len(pending, self._stops)
            if len(pending) > hold:
                piece, pending = pending[: len(pending) - hold], pending[len(pending) - hold :]
                self.generate_seconds += time.perf_counter() - start
                yield self._emit(piece)
                start = time.perf_counter()

            logits, self.state = self._model.forward([token], self.state)
            _finite_logits(logits, len(self._prompt_ids) + self.generated_tokens)

        if self.stop_reason != "stop":
            # Bytes of an unfinished character become U+FFFD, which could complete a stop string.
            pending += decoder.flush()
            cut = _find_stop(pending, self._stops)
            if cut >= 0:
                pending = pending[:cut]
                self.stop_reason = "stop"
        self.generate_seconds += time.perf_counter() - start
        if pending:
            yield self._emit(pending)


def generate(
    model: Model,
    tokenizer: Tokenizer,
    prompt: str | list[int],
    *,
    max_tokens: int = 128,
    sampler: Sampler | None = None,
    stop: str | Sequence[str] = (),
    state: Any = None,
    ignore_eos: bool = False,
) -> TextStream:
    """Return a lazy stream of the text the model writes after prompt.

    The prompt (text, or token ids) is fed in one ``model.forward`` call after ``state``
    (None: the model's initial state), which is not modified, and passed to
    ``sampler.accept_prompt`` (the repeat penalty's window; a caller resuming from a state, e.g.
    a prompt cache, passes the tokens behind that state to ``sampler.accept_prompt`` first, so
    the window is the same as without it). Then, until ``max_tokens``
    tokens were generated: sample a token, ``sampler.accept`` it, stop at the tokenizer's
    end-of-text token (not emitted; unless ``ignore_eos``), decode it, stop when the text
    contains one of ``stop`` (the output ends just before it), feed it to the model.

    Arguments are checked here, before any generation; the sampler defaults to ``Sampler()``
    (temperature 1, unseeded) and is used as is, its penalties included: pass a fresh one (or
    call ``reset``) per text. Raises RwkvxError for max_tokens < 0, an empty prompt, prompt ids
    outside the model's vocabulary or an empty stop string.
    """
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, numbers.Integral) or max_tokens < 0:
        raise RwkvxError(f"max_tokens: expected an integer >= 0, got {max_tokens!r}")
    if isinstance(prompt, (bytes, bytearray, memoryview)):
        # iterating bytes gives ints, which would pass as token ids
        raise RwkvxError("prompt: expected text (str) or a list of token ids, got bytes (decode them first)")
    if isinstance(prompt, str):
        prompt_ids = tokenizer.encode(prompt)
    else:
        prompt_ids = list(prompt)
    if not prompt_ids:
        raise RwkvxError("prompt: expected at least one token, got none")
    n_vocab = model.n_vocab
    for i, token in enumerate(prompt_ids):
        if isinstance(token, bool) or not isinstance(token, numbers.Integral) or not 0 <= token < n_vocab:
            raise RwkvxError(f"prompt token {i}: expected an id in 0..{n_vocab - 1}, got {token!r}")
    prompt_ids = [int(t) for t in prompt_ids]
    stops = _stop_strings(stop)
    if sampler is None:
        sampler = Sampler()
    return TextStream(model, tokenizer, prompt_ids, int(max_tokens), sampler, stops, state, bool(ignore_eos))
