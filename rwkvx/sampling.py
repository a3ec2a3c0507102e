"""Choosing the next token from the model's logits.

:class:`Sampler` turns one vector of logits into one token id. ``sample(logits)`` applies,
in this order (llama.cpp's order for the steps both have, ChatRWKV's penalties where llama.cpp
has its own):

1. **Logit bias** (llama.cpp): ``logits[t] += logit_bias[t]``. A bias of ``-inf`` bans a token
   and ``+inf`` forces it; where ``-inf`` meets ``+inf`` (a banned token the model also
   forces, or a forced token the caller masked out) the token is banned.
2. **Repeat penalty** (llama.cpp's multiplicative one): for every *distinct* token among the
   last ``repeat_last_n`` tokens seen, a positive logit is divided by ``repeat_penalty`` and a
   negative one multiplied by it, so ``repeat_penalty > 1`` always makes a repeat less likely.
   "Seen" means the prompt (``accept_prompt``, which :func:`rwkvx.generate.generate` calls, as
   llama.cpp counts the prompt) followed by the generated tokens (``accept``).
   ``repeat_last_n = 0`` turns the penalty off (llama.cpp's 0); ``-1`` means every token seen
   (llama.cpp's -1 is "the context size"; an RWKV has no context window, so: all of them).
3. **Presence/frequency penalties** (ChatRWKV): for every token ``t`` generated so far,
   ``logits[t] -= presence_penalty + frequency_penalty * occurrence[t]``. ``occurrence`` is a
   decayed count kept by ``accept(token)``: before counting a new token every count is
   multiplied by ``penalty_decay``, so old repetitions weigh less. Only generated tokens count
   (``accept``), not the prompt, as in ChatRWKV.
4. **Greedy**: with ``temperature == 0`` the token with the largest logit is returned (on a
   tie, the lowest id). Steps 5-9 are skipped; they could not change that answer anyway.
5. **Top-k** (``top_k > 0``): keep the ``top_k`` most probable tokens.
6. **Top-p** (``top_p < 1``): of those, keep the smallest set of most probable tokens whose
   probabilities (renormalised after top-k) add up to at least ``top_p``.
7. **Min-p** (``min_p > 0``): of those, keep the tokens whose probability is at least
   ``min_p`` times the most probable token's.
8. **Temperature**: the kept tokens get probabilities ``softmax(logits / temperature)``.
   Steps 5-7 judge the distribution at temperature 1, before this step (llama.cpp's default
   order and ChatRWKV's), so temperature changes how the survivors are weighted, not which
   tokens survive.
9. **Draw** one token with the sampler's own ``numpy.random.Generator``: the same ``seed``
   gives the same tokens.

At least one token (the most probable) always survives steps 5-7. Equal probabilities are
ranked by token id (lower first). ``-inf`` logits are never drawn; ``+inf`` logits share all
the probability; NaN logits are an error. ``sample`` never changes the caller's array and
never updates the penalties itself: call ``accept`` for that. Exponentials are computed in
float32 (as llama.cpp's samplers do), everything else in float64.
"""

from __future__ import annotations

import collections
import math
import numbers
from collections.abc import Iterable, Mapping

import numpy as np

from rwkvx.errors import RwkvxError

__all__ = ["Sampler", "SAMPLER_ORDER", "MAX_N_VOCAB"]

# One line for --help and the README: the order of the module docstring.
SAMPLER_ORDER = (
    "Samplers apply in this order: logit bias, repeat penalty, presence/frequency penalties; "
    "then with --temp 0 the most likely token, else top-k, top-p, min-p (these three on the "
    "probabilities at temperature 1), temperature, and a seeded draw."
)

# Without n_vocab the sampler cannot know the vocabulary when a token is accepted, so it keeps
# per-token arrays as long as the largest id seen. This bounds them (8 MiB of counts); real
# vocabularies are far smaller (RWKV's largest is 65536).
MAX_N_VOCAB = 1 << 20

# First guess at how many of the most probable tokens hold top_p of the mass. A partial sort
# of that many is far cheaper than sorting a 50k-65k vocabulary; the guess grows if it is short.
_TOP_P_FIRST_GUESS = 256


def _check_finite(name: str, value: object) -> float:
    """Return value as a float if it is a finite real number, else raise RwkvxError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise RwkvxError(f"{name}: expected a finite number, got {value!r}")
    return float(value)


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _exp(x: np.ndarray) -> np.ndarray:
    """exp of values <= 0, computed in float32 and returned as float64 for the sums.

    float32 is what the logits are and what llama.cpp's samplers use; numpy's float32 exp
    is vectorised, its float64 one often is not: 0.05 against 0.43 ms on 50k tokens, which
    a server pays per sequence per step.
    """
    # values below float32's range are -inf there, and exp(-inf) = 0, as in float64
    with np.errstate(over="ignore"):
        small = x.astype(np.float32)
    return np.exp(small).astype(np.float64)


def _most_probable(p: np.ndarray, m: int) -> np.ndarray:
    """Return the ids of at least the m most probable tokens, sorted by probability, descending.

    Every token tied with the m-th is included, and ties are ordered by id, so the result does
    not depend on how argpartition happens to break ties.
    """
    n = p.shape[0]
    if m >= n:
        candidates = np.arange(n)
    else:
        threshold = p[np.argpartition(p, n - m)[n - m]]
        candidates = np.flatnonzero(p >= threshold)
    # flatnonzero/arange give ascending ids and the sort is stable, so ties stay in id order.
    return candidates[np.argsort(-p[candidates], kind="stable")]


class Sampler:
    """Picks the next token from logits: bias, penalties, top-k, top-p, min-p, temperature, draw.

    See the module docstring for the exact order. Construct one per generation (or call
    :meth:`reset`) so penalties from an earlier text do not carry over.

    Args:
        temperature: >= 0; 0 means greedy (argmax).
        top_p: in (0, 1]; 1 disables top-p.
        top_k: integer >= 0; 0 disables top-k.
        presence_penalty: subtracted once from the logit of every token generated so far.
        frequency_penalty: subtracted per (decayed) occurrence of a generated token.
        penalty_decay: in (0, 1]; occurrence counts are multiplied by it at each accepted token.
        seed: seed of the random generator, or None for a fresh unpredictable one.
        min_p: in [0, 1]; 0 disables min-p.
        logit_bias: mapping token id -> bias added to its logit (finite, or +-inf), or None.
        repeat_penalty: > 0; 1 disables it, above 1 discourages repeats, below 1 favours them.
        repeat_last_n: integer >= -1: how many of the latest tokens the repeat penalty looks
            at; 0 disables it, -1 means all.
        n_vocab: the vocabulary size, if known: token ids and logit-bias ids must be below
            it, and ``sample`` checks that the logits have that length. Without it ids must be
            below :data:`MAX_N_VOCAB`, and a logit-bias id is checked against each logits array.
    """

    def __init__(
        self,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        penalty_decay: float = 0.996,
        seed: int | None = None,
        *,
        min_p: float = 0.0,
        logit_bias: Mapping[int, float] | None = None,
        repeat_penalty: float = 1.0,
        repeat_last_n: int = 64,
        n_vocab: int | None = None,
    ) -> None:
        self.temperature = _check_finite("temperature", temperature)
        if self.temperature < 0:
            raise RwkvxError(f"temperature: expected a number >= 0, got {temperature!r}")
        self.top_p = _check_finite("top_p", top_p)
        if not 0 < self.top_p <= 1:
            raise RwkvxError(f"top_p: expected a number in (0, 1], got {top_p!r}")
        if not _is_int(top_k) or top_k < 0:
            raise RwkvxError(f"top_k: expected an integer >= 0, got {top_k!r}")
        self.top_k = int(top_k)
        self.presence_penalty = _check_finite("presence_penalty", presence_penalty)
        self.frequency_penalty = _check_finite("frequency_penalty", frequency_penalty)
        self.penalty_decay = _check_finite("penalty_decay", penalty_decay)
        if not 0 < self.penalty_decay <= 1:
            raise RwkvxError(f"penalty_decay: expected a number in (0, 1], got {penalty_decay!r}")
        if seed is not None and (not _is_int(seed) or seed < 0):
            raise RwkvxError(f"seed: expected an integer >= 0 or None, got {seed!r}")
        self.seed = None if seed is None else int(seed)
        self.min_p = _check_finite("min_p", min_p)
        if not 0 <= self.min_p <= 1:
            raise RwkvxError(f"min_p: expected a number in [0, 1], got {min_p!r}")
        self.repeat_penalty = _check_finite("repeat_penalty", repeat_penalty)
        if self.repeat_penalty <= 0:
            raise RwkvxError(f"repeat_penalty: expected a number > 0, got {repeat_penalty!r}")
        if not _is_int(repeat_last_n) or repeat_last_n < -1:
            raise RwkvxError(f"repeat_last_n: expected an integer >= -1 (-1 = all tokens), got {repeat_last_n!r}")
        self.repeat_last_n = int(repeat_last_n)
        if n_vocab is not None and (not _is_int(n_vocab) or not 1 <= n_vocab <= MAX_N_VOCAB):
            raise RwkvxError(f"n_vocab: expected an integer in 1..{MAX_N_VOCAB} or None, got {n_vocab!r}")
        self.n_vocab = None if n_vocab is None else int(n_vocab)
        self.logit_bias = self._check_bias(logit_bias)
        # The same biases as arrays, for one vectorised add per sample.
        self._bias_ids = np.fromiter(self.logit_bias.keys(), dtype=np.int64, count=len(self.logit_bias))
        self._bias_values = np.fromiter(self.logit_bias.values(), dtype=np.float64, count=len(self.logit_bias))
        self.reset()

    def _check_bias(self, logit_bias: Mapping[int, float] | None) -> dict[int, float]:
        """Return logit_bias as a plain {id: bias} dict, or raise naming the first bad entry."""
        if logit_bias is None:
            return {}
        if not isinstance(logit_bias, Mapping):
            raise RwkvxError(f"logit_bias: expected a mapping of token id to bias, got {type(logit_bias).__name__}")
        checked: dict[int, float] = {}
        for token, bias in logit_bias.items():
            token = self._check_token(token, "logit_bias")
            if isinstance(bias, bool) or not isinstance(bias, numbers.Real) or math.isnan(bias):
                raise RwkvxError(f"logit_bias: expected a number or +-inf for token {token}, got {bias!r}")
            checked[token] = float(bias)
        return checked

    def _check_token(self, token: object, name: str = "token") -> int:
        """Return token as an int if it is a valid id for this sampler, else raise RwkvxError."""
        limit = MAX_N_VOCAB if self.n_vocab is None else self.n_vocab
        if not _is_int(token) or not 0 <= token < limit:
            raise RwkvxError(f"{name}: expected a token id in 0..{limit - 1}, got {token!r}")
        return int(token)

    def __repr__(self) -> str:
        return (
            f"Sampler(temperature={self.temperature}, top_p={self.top_p}, top_k={self.top_k}, "
            f"presence_penalty={self.presence_penalty}, frequency_penalty={self.frequency_penalty}, "
            f"penalty_decay={self.penalty_decay}, seed={self.seed}, min_p={self.min_p}, "
            f"logit_bias={self.logit_bias}, repeat_penalty={self.repeat_penalty}, "
            f"repeat_last_n={self.repeat_last_n}, n_vocab={self.n_vocab})"
        )

    def reset(self) -> None:
        """Forget the accepted tokens and restart the random generator from the seed."""
        self.rng = np.random.default_rng(self.seed)
        # ChatRWKV's decayed count per token id, and which ids were ever generated; grown to
        # the largest id accepted (or n_vocab), so accept costs O(vocabulary) at most.
        self.occurrence = np.zeros(0, dtype=np.float64)
        self._seen = np.zeros(0, dtype=bool)
        # The repeat penalty's window: the latest tokens in order (only when it has a length),
        # and how often each id occurs in it.
        self._window: collections.deque[int] = collections.deque()
        self._window_count: dict[int, int] = {}

    def _remember(self, token: int) -> None:
        """Add token to the repeat penalty's window, dropping the oldest one when it is full."""
        n = self.repeat_last_n
        if n == 0:
            return
        if n > 0:
            if len(self._window) == n:
                old = self._window.popleft()
                left = self._window_count[old] - 1
                if left:
                    self._window_count[old] = left
                else:
                    del self._window_count[old]
            self._window.append(token)
        self._window_count[token] = self._window_count.get(token, 0) + 1

    def accept(self, token: int) -> None:
        """Count a generated token: ChatRWKV's ``occurrence *= penalty_decay;
        occurrence[token] += 1``, and the repeat penalty's window.

        Cost: O(1) plus one multiply over the ids seen so far (at most the vocabulary).
        """
        token = self._check_token(token)
        size = self.occurrence.shape[0]
        if token >= size:
            # Grow geometrically, so a stream of rising ids does not copy the arrays each time.
            new_size = self.n_vocab or min(MAX_N_VOCAB, max(token + 1, 2 * size, 256))
            self.occurrence = np.concatenate([self.occurrence, np.zeros(new_size - size)])
            self._seen = np.concatenate([self._seen, np.zeros(new_size - size, dtype=bool)])
        self.occurrence *= self.penalty_decay
        self.occurrence[token] += 1.0
        self._seen[token] = True
        self._remember(token)

    def accept_prompt(self, tokens: Iterable[int]) -> None:
        """Count prompt tokens for the repeat penalty only (llama.cpp counts the prompt;
        ChatRWKV's presence/frequency penalties do not).

        Call it with the prompt before generating; :func:`rwkvx.generate.generate` does. A
        caller that feeds a prompt in parts (a cached prefix, then the rest) calls it with each
        part in order. Only the last ``repeat_last_n`` tokens are kept.
        """
        ids = [self._check_token(token) for token in tokens]
        if self.repeat_last_n > 0:
            # older ones would be pushed out of the window anyway
            ids = ids[-self.repeat_last_n:]
        for token in ids:
            self._remember(token)

    @property
    def repeat_window(self) -> list[int]:
        """The distinct token ids the repeat penalty currently applies to, ascending."""
        return sorted(self._window_count)

    def sample(self, logits: np.ndarray) -> int:
        """Return one token id drawn from logits, a float array of shape (n_vocab,).

        The caller's array is not modified, and the penalties are not updated: call
        :meth:`accept` with the token that is kept.
        """
        x = np.asarray(logits)
        if x.ndim != 1 or x.shape[0] == 0 or not np.issubdtype(x.dtype, np.floating):
            raise RwkvxError(f"logits: expected a non-empty 1-D float array, got {x.dtype} {x.shape}")
        n = x.shape[0]
        if self.n_vocab is not None and n != self.n_vocab:
            raise RwkvxError(f"logits: expected {self.n_vocab} values (the sampler's n_vocab), got {n}")
        # float64 copy: the caller's array is left alone and the arithmetic below stays exact
        # enough for ranking tokens.
        x = x.astype(np.float64)
        if math.isnan(x.max()):  # max is NaN iff some value is: one cheap pass
            raise RwkvxError(f"logits: expected no NaN, got NaN at index {int(np.flatnonzero(np.isnan(x))[0])}")

        # 1. logit bias
        if self._bias_ids.shape[0]:
            outside = self._bias_ids[self._bias_ids >= n]
            if outside.shape[0]:
                raise RwkvxError(f"logit_bias: token {int(outside[0])} is outside the vocabulary of {n} tokens")
            with np.errstate(invalid="ignore"):
                biased = x[self._bias_ids] + self._bias_values
            # -inf + inf: the ban wins (see the module docstring)
            x[self._bias_ids] = np.where(np.isnan(biased), -np.inf, biased)

        # 2. repeat penalty, on the distinct ids in the window that exist in this vocabulary
        if self.repeat_penalty != 1 and self._window_count:
            ids = np.fromiter(self._window_count, dtype=np.int64, count=len(self._window_count))
            ids = ids[ids < n]
            v = x[ids]
            x[ids] = np.where(v <= 0, v * self.repeat_penalty, v / self.repeat_penalty)

        # 3. ChatRWKV's penalties, on tokens generated so far that exist in this vocabulary
        m = min(n, self._seen.shape[0])
        if m and (self.presence_penalty or self.frequency_penalty):
            seen = np.flatnonzero(self._seen[:m])
            x[seen] -= self.presence_penalty + self.frequency_penalty * self.occurrence[seen]

        # +inf logits would give inf - inf = NaN below; they take all the probability instead.
        top = float(x.max())
        if top == np.inf:
            x = np.where(np.isposinf(x), 0.0, -np.inf)
            top = 0.0
        if top == -np.inf:
            raise RwkvxError("logits: expected at least one value above -inf, got none")

        # 4. greedy; argmax returns the first maximum, i.e. the lowest id
        if self.temperature == 0:
            return int(np.argmax(x))

        # 5-7 judge the probabilities at temperature 1; shifted by the max so nothing overflows
        p = _exp(x - top)
        p /= p.sum()
        # ids sorted by probability, or None for "all ids, in id order"
        kept: np.ndarray | None = None
        if 0 < self.top_k < n:
            kept = _most_probable(p, self.top_k)[: self.top_k]
        if self.top_p < 1:
            kept = self._nucleus(p, kept)
        if self.min_p > 0:
            # p[i] >= min_p * p[top]  <=>  x[i] - top >= log(min_p): exact on the logits, as
            # llama.cpp compares, and the top token (x - top == 0) always passes.
            floor = math.log(self.min_p)
            kept = np.flatnonzero(x - top >= floor) if kept is None else kept[x[kept] - top >= floor]

        # 8. temperature, over the survivors only
        if kept is None:
            # the whole vocabulary: no gather (at 50k tokens, index arrays cost more than the draw)
            weights = p if self.temperature == 1 else _exp((x - top) / self.temperature)
            cdf = np.cumsum(weights)
            u = self.rng.random() * cdf[-1]
            # side="right" never lands on a zero-weight token, except past the end by rounding
            i = int(np.searchsorted(cdf, u, side="right"))
            return i if i < n else int(np.flatnonzero(weights)[-1])
        ids = kept
        if self.temperature == 1:
            weights = p[ids]
        else:
            weights = _exp((x[ids] - top) / self.temperature)

        # 9. draw. Inverse CDF over the kept tokens, renormalised by their total; zero-weight
        # tokens are dropped first so rounding can never land on one.
        nonzero = weights > 0
        ids, weights = ids[nonzero], weights[nonzero]
        cdf = np.cumsum(weights)
        u = self.rng.random() * cdf[-1]
        i = min(int(np.searchsorted(cdf, u, side="right")), ids.shape[0] - 1)
        return int(ids[i])

    def _nucleus(self, p: np.ndarray, kept: np.ndarray | None) -> np.ndarray:
        """Return the smallest most-probable prefix of kept (or of all ids) with mass >= top_p."""
        if kept is not None:
            total = p[kept].sum()
            cum = np.cumsum(p[kept])
            return kept[: self._cut(cum, total)]
        m = _TOP_P_FIRST_GUESS
        while True:
            order = _most_probable(p, m)
            cum = np.cumsum(p[order])
            # p sums to 1; the partial sort is enough once its mass reaches top_p.
            if cum[-1] >= self.top_p or order.shape[0] == p.shape[0]:
                return order[: self._cut(cum, 1.0)]
            m *= 8

    def _cut(self, cum: np.ndarray, total: float) -> int:
        """Return how many of the sorted tokens reach top_p of total (at least 1, at most all)."""
        k = int(np.searchsorted(cum, self.top_p * total, side="left")) + 1
        return min(k, cum.shape[0])
