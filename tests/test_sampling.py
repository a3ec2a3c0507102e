"""Tests for rwkvx.sampling.Sampler: each step of the documented order, and every validation error."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rwkvx.errors import RwkvxError
from rwkvx.sampling import Sampler


def random_logits(seed: int, n_vocab: int = 1000) -> np.ndarray:
    """Seeded float32 logits with a spread like a real model's."""
    return (np.random.default_rng(seed).standard_normal(n_vocab) * 3).astype(np.float32)


def log_probs(*probs: float) -> np.ndarray:
    """Logits whose softmax is exactly probs."""
    return np.log(np.array(probs, dtype=np.float64)).astype(np.float32)


def draw(sampler: Sampler, logits: np.ndarray, n: int) -> np.ndarray:
    """Sample n times from the same logits (no accept, so no penalties build up)."""
    return np.array([sampler.sample(logits) for _ in range(n)])


# ---- greedy, top-k, top-p


def test_greedy_is_argmax() -> None:
    sampler = Sampler(temperature=0)
    for seed in range(20):
        logits = random_logits(seed)
        assert sampler.sample(logits) == int(np.argmax(logits))


def test_greedy_ties_pick_the_lowest_id() -> None:
    assert Sampler(temperature=0).sample(np.array([0.0, 5.0, 1.0, 5.0], dtype=np.float32)) == 1


@pytest.mark.parametrize("seed", range(10))
def test_top_k_1_equals_greedy(seed: int) -> None:
    logits = random_logits(seed)
    sampler = Sampler(temperature=1.5, top_k=1, seed=seed)
    assert set(draw(sampler, logits, 20)) == {int(np.argmax(logits))}


@pytest.mark.parametrize("seed", range(10))
def test_tiny_top_p_equals_greedy(seed: int) -> None:
    logits = random_logits(seed)
    sampler = Sampler(temperature=1.5, top_p=1e-9, seed=seed)
    assert set(draw(sampler, logits, 20)) == {int(np.argmax(logits))}


def test_top_k_keeps_the_k_most_probable() -> None:
    logits = random_logits(3, 50)
    expected = set(np.argsort(-logits)[:3].tolist())
    tokens = draw(Sampler(top_k=3, temperature=5.0, seed=0), logits, 300)
    assert set(tokens.tolist()) == expected


@pytest.mark.parametrize("top_p, expected", [(0.7, {0, 1}), (0.9, {0, 1, 2}), (1.0, {0, 1, 2, 3})])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p: float, expected: set[int]) -> None:
    logits = log_probs(0.5, 0.3, 0.15, 0.05)
    tokens = draw(Sampler(top_p=top_p, seed=0), logits, 2000)
    assert set(tokens.tolist()) == expected


@pytest.mark.parametrize("top_p, expected", [(0.55, {0}), (0.65, {0, 1}), (0.99, {0, 1})])
def test_top_p_is_applied_after_top_k(top_p: float, expected: set[int]) -> None:
    # Top-2 leaves 0.5/0.8 = 0.625 and 0.3/0.8 = 0.375: top-p sees the renormalised values,
    # so 0.55 is reached by token 0 alone (it would not be with the raw 0.5).
    logits = log_probs(0.5, 0.3, 0.15, 0.05)
    tokens = draw(Sampler(top_k=2, top_p=top_p, seed=0), logits, 500)
    assert set(tokens.tolist()) == expected


def test_top_p_over_a_flat_large_vocabulary() -> None:
    # 5000 equal logits: top-p 0.5 keeps half of them, the lowest ids (ties rank by id), which
    # is more than the first partial sort looks at.
    logits = np.zeros(5000, dtype=np.float32)
    tokens = draw(Sampler(top_p=0.5, seed=1), logits, 3000)
    assert tokens.max() <= 2501
    assert tokens.max() > 2000 and tokens.min() < 500


def test_draw_follows_the_probabilities() -> None:
    tokens = draw(Sampler(seed=5), log_probs(0.7, 0.3), 4000)
    assert abs(np.mean(tokens == 0) - 0.7) < 0.04


def test_temperature_flattens_and_sharpens() -> None:
    logits = log_probs(0.7, 0.3)
    cold = draw(Sampler(temperature=0.25, seed=5), logits, 2000)
    hot = draw(Sampler(temperature=4.0, seed=5), logits, 2000)
    assert np.mean(cold == 0) > 0.95
    assert 0.45 < np.mean(hot == 0) < 0.65


# ---- seeds


def test_same_seed_same_tokens() -> None:
    logits = [random_logits(s) for s in range(50)]
    a = [Sampler(top_p=0.9, top_k=40, seed=42).sample(x) for x in logits]
    b = [Sampler(top_p=0.9, top_k=40, seed=42).sample(x) for x in logits]
    assert a == b
    first, second = Sampler(seed=42), Sampler(seed=42)
    assert [first.sample(x) for x in logits] == [second.sample(x) for x in logits]


def test_different_seeds_differ() -> None:
    logits = np.zeros(1000, dtype=np.float32)
    assert draw(Sampler(seed=1), logits, 20).tolist() != draw(Sampler(seed=2), logits, 20).tolist()


def test_reset_restarts_the_generator_and_forgets_penalties() -> None:
    logits = np.zeros(100, dtype=np.float32)
    sampler = Sampler(seed=9, presence_penalty=1.0)
    first = draw(sampler, logits, 10)
    sampler.accept(3)
    sampler.reset()
    assert np.array_equal(draw(sampler, logits, 10), first)
    assert not sampler.occurrence.any()


def test_rng_is_a_numpy_generator() -> None:
    assert isinstance(Sampler(seed=0).rng, np.random.Generator)


# ---- penalties


def test_presence_penalty_changes_the_choice() -> None:
    logits = np.array([2.0, 1.5, 0.0], dtype=np.float32)
    sampler = Sampler(temperature=0, presence_penalty=1.0)
    assert sampler.sample(logits) == 0
    sampler.accept(0)
    # 2.0 - 1.0 < 1.5
    assert sampler.sample(logits) == 1


def test_frequency_penalty_counts_repetitions() -> None:
    logits = np.array([2.0, 1.5, 0.0], dtype=np.float32)
    sampler = Sampler(temperature=0, frequency_penalty=0.3)
    sampler.accept(0)
    # 2.0 - 0.3 * 1 = 1.7 > 1.5
    assert sampler.sample(logits) == 0
    sampler.accept(0)
    # 2.0 - 0.3 * (0.996 + 1) = 1.4012 < 1.5
    assert sampler.sample(logits) == 1


def test_penalties_are_off_by_default() -> None:
    logits = np.array([2.0, 1.5], dtype=np.float32)
    sampler = Sampler(temperature=0)
    for _ in range(5):
        sampler.accept(0)
    assert sampler.sample(logits) == 0


def test_decay_arithmetic() -> None:
    sampler = Sampler(penalty_decay=0.5)
    sampler.accept(3)
    sampler.accept(5)
    sampler.accept(3)
    # occurrence[3] = (1 * 0.5) * 0.5 + 1, occurrence[5] = 1 * 0.5
    assert sampler.occurrence[3] == pytest.approx(1.25)
    assert sampler.occurrence[5] == pytest.approx(0.5)
    assert sampler.occurrence[[0, 1, 2, 4]].tolist() == [0, 0, 0, 0]


def test_default_decay_is_chatrwkv() -> None:
    sampler = Sampler()
    sampler.accept(1)
    sampler.accept(2)
    assert sampler.occurrence[1] == pytest.approx(0.996)


def test_sample_does_not_count_tokens() -> None:
    sampler = Sampler(seed=0, presence_penalty=1.0)
    sampler.sample(random_logits(0))
    assert not sampler.occurrence.any()


def test_penalised_logits_match_the_formula() -> None:
    # With top_k=1 the draw is the argmax of the penalised logits, which we compute by hand.
    logits = random_logits(11, 20)
    sampler = Sampler(temperature=0.7, top_k=1, presence_penalty=0.4, frequency_penalty=0.9, penalty_decay=0.9, seed=0)
    occurrence = np.zeros(20)
    for token in [int(np.argmax(logits)), 4, 4, 17]:
        sampler.accept(token)
        occurrence *= 0.9
        occurrence[token] += 1
    penalised = logits.astype(np.float64) - np.where(occurrence > 0, 0.4 + 0.9 * occurrence, 0.0)
    assert sampler.sample(logits) == int(np.argmax(penalised))


def test_caller_logits_are_untouched() -> None:
    logits = random_logits(4)
    before = logits.copy()
    sampler = Sampler(temperature=0.8, top_k=10, top_p=0.9, presence_penalty=2.0, frequency_penalty=1.0, seed=0)
    for token in range(10):
        sampler.accept(token)
    sampler.sample(logits)
    assert np.array_equal(logits, before)
    logits.setflags(write=False)
    sampler.sample(logits)


def test_accepted_ids_beyond_the_vocabulary_are_ignored() -> None:
    sampler = Sampler(temperature=0, presence_penalty=5.0)
    sampler.accept(10)
    assert sampler.sample(np.array([0.0, 1.0], dtype=np.float32)) == 1


# ---- infinities and NaN


def test_minus_inf_is_never_drawn() -> None:
    logits = np.full(100, -np.inf, dtype=np.float32)
    logits[[7, 42]] = [0.0, 1.0]
    tokens = draw(Sampler(temperature=2.0, seed=0), logits, 500)
    assert set(tokens.tolist()) == {7, 42}
    assert Sampler(temperature=0).sample(logits) == 42
    assert set(draw(Sampler(top_k=50, top_p=0.999, seed=0), logits, 200).tolist()) <= {7, 42}


def test_plus_inf_takes_all_the_probability() -> None:
    logits = np.array([1.0, np.inf, 3.0, np.inf], dtype=np.float32)
    assert set(draw(Sampler(seed=0), logits, 200).tolist()) == {1, 3}
    assert Sampler(temperature=0).sample(logits) == 1


def test_tiny_temperature_does_not_overflow() -> None:
    logits = np.array([1.0, 3.0, 2.0], dtype=np.float32)
    assert set(draw(Sampler(temperature=1e-300, seed=0), logits, 50).tolist()) == {1}


@pytest.mark.parametrize(
    "logits, match",
    [
        (np.array([0.0, np.nan, 1.0], dtype=np.float32), "logits: expected no NaN"),
        (np.full(4, -np.inf, dtype=np.float32), "logits: expected at least one value above -inf"),
        (np.zeros((2, 3), dtype=np.float32), "logits: expected a non-empty 1-D float array"),
        (np.zeros(0, dtype=np.float32), "logits: expected a non-empty 1-D float array"),
        (np.zeros(3, dtype=np.int64), "logits: expected a non-empty 1-D float array"),
    ],
)
def test_bad_logits_raise(logits: np.ndarray, match: str) -> None:
    for temperature in (0.0, 1.0):
        with pytest.raises(RwkvxError, match=match):
            Sampler(temperature=temperature).sample(logits)


# ---- validation


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -0.1},
        {"temperature": math.nan},
        {"temperature": math.inf},
        {"temperature": "1"},
        {"top_p": 0.0},
        {"top_p": -0.5},
        {"top_p": 1.01},
        {"top_p": math.nan},
        {"top_k": -1},
        {"top_k": 1.5},
        {"top_k": True},
        {"presence_penalty": math.inf},
        {"presence_penalty": math.nan},
        {"frequency_penalty": -math.inf},
        {"penalty_decay": 0.0},
        {"penalty_decay": 1.5},
        {"penalty_decay": math.nan},
        {"seed": -1},
        {"seed": 1.5},
        {"seed": "abc"},
    ],
)
def test_invalid_options_raise(kwargs: dict) -> None:
    (name,) = kwargs
    with pytest.raises(RwkvxError, match=f"^{name}: expected") as info:
        Sampler(**kwargs)
    assert "\n" not in str(info.value)


def test_valid_edge_options() -> None:
    Sampler(temperature=0, top_p=1.0, top_k=0, penalty_decay=1.0, presence_penalty=-1.0, seed=0)
    Sampler(top_k=np.int64(5), temperature=np.float32(0.5))


def test_accept_rejects_bad_tokens() -> None:
    for bad in (-1, 1.0, "3", None):
        with pytest.raises(RwkvxError, match="token: expected"):
            Sampler().accept(bad)  # type: ignore[arg-type]
