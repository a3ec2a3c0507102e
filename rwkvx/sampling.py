"""Choosing the next token from the model's logits.

:class:`Sampler` turns one vector of logits into one token id. ``sample(logits)`` applies,
in this order:

1. **Repetition penalties** (as in ChatRWKV): for every token ``t`` generated so far,
   ``logits[t] -= presence_penalty + frequency_penalty * occurrence[t]``. ``occurrence`` is
   a decayed count kept by ``accept(token)``: before counting a new token every count is
   multiplied by ``penalty_decay``, so old repetitions weigh less. Only tokens passed to
   ``accept`` count (the generation loop passes the generated ones, not the prompt).
2. **Greedy**: with ``temperature == 0`` the token with the largest penalised logit is
   returned (on a tie, the lowest id). Steps 3-6 are skipped.
3. **Temperature**: ``probabilities = softmax(logits / temperature)``, in float64.
4. **Top-k** (``top_k > 0``): keep the ``top_k`` most probable tokens.
5. **Top-p** (``top_p < 1``): of those, keep the smallest set of most probable tokens whose
   probabilities (renormalised after top-k) add up to at least ``top_p``. At least one token
   is always kept.
6. **Draw** one token from the kept probabilities, renormalised, with the sampler's own
   ``numpy.random.Generator``: the same ``seed`` gives the same tokens.

Equal probabilities are ranked by token id (lower first). ``-inf`` logits are never drawn;
``+inf`` logits share all the probability; NaN logits are an error. ``sample`` never changes
the caller's array and never updates the penalties itself: call ``accept`` for that.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from rwkvx.errors import RwkvxError

__all__ = ["Sampler"]

# First guess at how many of the most probable tokens hold top_p of the mass. A partial sort
# of that many is far cheaper than sorting a 50k-65k vocabulary; the guess grows if it is short.
_TOP_P_FIRST_GUESS = 256


def _check_finite(name: str, value: object) -> float:
    """Return value as a float if it is a finite real number, else raise RwkvxError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise RwkvxError(f"{name}: expected a finite number, got {value!r}")
    return float(value)


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
    """Picks the next token from logits: penalties, temperature, top-k, top-p, then a draw.

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
    ) -> None:
        self.temperature = _check_finite("temperature", temperature)
        if self.temperature < 0:
            raise RwkvxError(f"temperature: expected a number >= 0, got {temperature!r}")
        self.top_p = _check_finite("top_p", top_p)
        if not 0 < self.top_p <= 1:
            raise RwkvxError(f"top_p: expected a number in (0, 1], got {top_p!r}")
        if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 0:
            raise RwkvxError(f"top_k: expected an integer >= 0, got {top_k!r}")
        self.top_k = int(top_k)
        self.presence_penalty = _check_finite("presence_penalty", presence_penalty)
        self.frequency_penalty = _check_finite("frequency_penalty", frequency_penalty)
        self.penalty_decay = _check_finite("penalty_decay", penalty_decay)
        if not 0 < self.penalty_decay <= 1:
            raise RwkvxError(f"penalty_decay: expected a number in (0, 1], got {penalty_decay!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0):
            raise RwkvxError(f"seed: expected an integer >= 0 or None, got {seed!r}")
        self.seed = None if seed is None else int(seed)
        self.rng = np.random.default_rng(self.seed)
        # Decayed count per token id, and which ids were ever accepted; grown on demand
        # because the vocabulary size is only known from the logits.
        self.occurrence = np.zeros(0, dtype=np.float64)
        self._seen = np.zeros(0, dtype=bool)

    def __repr__(self) -> str:
        return (
            f"Sampler(temperature={self.temperature}, top_p={self.top_p}, top_k={self.top_k}, "
            f"presence_penalty={self.presence_penalty}, frequency_penalty={self.frequency_penalty}, "
            f"penalty_decay={self.penalty_decay}, seed={self.seed})"
        )

    def reset(self) -> None:
        """Forget the accepted tokens and restart the random generator from the seed."""
        self.occurrence = np.zeros(0, dtype=np.float64)
        self._seen = np.zeros(0, dtype=bool)
        self.rng = np.random.default_rng(self.seed)

    def accept(self, token: int) -> None:
        """Count token as generated: ``occurrence *= penalty_decay; occurrence[token] += 1``."""
        if isinstance(token, bool) or not isinstance(token, numbers.Integral) or token < 0:
            raise RwkvxError(f"token: expected an integer >= 0, got {token!r}")
        token = int(token)
        if token >= self.occurrence.shape[0]:
            grow = token + 1 - self.occurrence.shape[0]
            self.occurrence = np.concatenate([self.occurrence, np.zeros(grow)])
            self._seen = np.concatenate([self._seen, np.zeros(grow, dtype=bool)])
        self.occurrence *= self.penalty_decay
        self.occurrence[token] += 1.0
        self._seen[token] = True

    def sample(self, logits: np.ndarray) -> int:
        """Return one token id drawn from logits, a float array of shape (n_vocab,).

        The caller's array is not modified, and the penalties are not updated: call
        :meth:`accept` with the token that is kept.
        """
        x = np.asarray(logits)
        if x.ndim != 1 or x.shape[0] == 0 or not np.issubdtype(x.dtype, np.floating):
            raise RwkvxError(f"logits: expected a non-empty 1-D float array, got {x.dtype} {x.shape}")
        # float64 copy: the caller's array is left alone and the arithmetic below stays exact
        # enough for ranking tokens.
        x = x.astype(np.float64)
        if np.isnan(x).any():
            raise RwkvxError(f"logits: expected no NaN, got NaN at index {int(np.flatnonzero(np.isnan(x))[0])}")

        # 1. penalties, on tokens accepted so far that exist in this vocabulary
        n = min(x.shape[0], self._seen.shape[0])
        if n and (self.presence_penalty or self.frequency_penalty):
            seen = np.flatnonzero(self._seen[:n])
            x[seen] -= self.presence_penalty + self.frequency_penalty * self.occurrence[seen]

        # +inf logits would give inf - inf = NaN below; they take all the probability instead.
        pos_inf = np.isposinf(x)
        if pos_inf.any():
            x = np.where(pos_inf, 0.0, -np.inf)
        top = float(x.max())
        if top == -np.inf:
            raise RwkvxError("logits: expected at least one value above -inf, got none")

        # 2. greedy; argmax returns the first maximum, i.e. the lowest id
        if self.temperature == 0:
            return int(np.argmax(x))

        # 3. softmax(x / T), shifted by the max first so nothing overflows even for tiny T
        p = np.exp((x - top) / self.temperature)
        p /= p.sum()

        # 4-5. top-k then top-p, on ids sorted by probability; None means "all ids, in id order"
        kept: np.ndarray | None = None
        if 0 < self.top_k < p.shape[0]:
            kept = _most_probable(p, self.top_k)[: self.top_k]
        if self.top_p < 1:
            kept = self._nucleus(p, kept)

        # 6. draw. Inverse CDF over the kept tokens, renormalised by their total; zero-probability
        # tokens are dropped first so rounding can never land on one.
        ids = np.arange(p.shape[0]) if kept is None else kept
        ids = ids[p[ids] > 0]
        cdf = np.cumsum(p[ids])
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
