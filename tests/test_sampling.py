"""Tests for rwkvx.sampling.Sampler: each step of the documented order, and every validation error.

Expected values are computed by hand in the comments; distributions are checked by drawing a
few thousand tokens (seeded, so a test that passes once passes always).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from rwkvx.errors import RwkvxError
from rwkvx.generate import generate
from rwkvx.sampling import MAX_N_VOCAB, SAMPLER_ORDER, Sampler
from rwkvx.tokenizer import ByteTokenizer


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
        {"min_p": -0.1},
        {"min_p": 1.5},
        {"min_p": math.nan},
        {"min_p": "0.1"},
        {"repeat_penalty": 0.0},
        {"repeat_penalty": -1.1},
        {"repeat_penalty": math.inf},
        {"repeat_penalty": math.nan},
        {"repeat_last_n": -2},
        {"repeat_last_n": 1.5},
        {"repeat_last_n": True},
        {"n_vocab": 0},
        {"n_vocab": 2.0},
        {"n_vocab": MAX_N_VOCAB + 1},
        {"logit_bias": [(1, 2.0)]},
        {"logit_bias": {-1: 1.0}},
        {"logit_bias": {1.5: 1.0}},
        {"logit_bias": {True: 1.0}},
        {"logit_bias": {10**10: 1.0}},
        {"logit_bias": {1: math.nan}},
        {"logit_bias": {1: "x"}},
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
    for bad in (-1, 1.0, "3", None, True, MAX_N_VOCAB, 10**10):
        with pytest.raises(RwkvxError, match="token: expected") as info:
            Sampler().accept(bad)  # type: ignore[arg-type]
        assert "\n" not in str(info.value)
    with pytest.raises(RwkvxError, match=r"token: expected a token id in 0\.\.99, got 100"):
        Sampler(n_vocab=100).accept(100)
    with pytest.raises(RwkvxError, match="token: expected"):
        Sampler().accept_prompt([1, 2, -3])


# ---- accept stays cheap


def test_accept_keeps_arrays_within_the_vocabulary() -> None:
    # The tracker's report: accept(10**10) tried to allocate 74 GiB for per-token counts.
    sampler = Sampler(n_vocab=1000)
    sampler.accept(999)
    sampler.accept(3)
    assert sampler.occurrence.shape == (1000,)
    unbounded = Sampler()
    unbounded.accept(MAX_N_VOCAB - 1)
    assert unbounded.occurrence.shape == (MAX_N_VOCAB,)
    small = Sampler()
    small.accept(5)
    assert small.occurrence.shape[0] <= 256


def test_logits_must_match_n_vocab() -> None:
    with pytest.raises(RwkvxError, match="logits: expected 10 values"):
        Sampler(n_vocab=10).sample(np.zeros(11, dtype=np.float32))
    assert Sampler(n_vocab=3, temperature=0).sample(np.array([0.0, 2.0, 1.0], dtype=np.float32)) == 1


# ---- the documented order


def test_sampler_order_line_names_every_step_in_the_docstring_order() -> None:
    from rwkvx import sampling

    steps = ["logit bias", "repeat penalty", "presence/frequency", "top-k", "top-p", "min-p", "temperature", "draw"]
    where = [SAMPLER_ORDER.lower().index(step) for step in steps]
    assert where == sorted(where)
    # the docstring's numbered steps are its bold headings
    doc = sampling.__doc__.lower()
    where = [doc.index(f"**{step}") for step in steps]
    assert where == sorted(where)


def test_temperature_applies_after_top_p() -> None:
    # Top-p 0.7 on (0.5, 0.3, 0.15, 0.05) keeps {0, 1} at temperature 1. Temperature 100 then
    # makes the survivors nearly equal (0.5^0.01 : 0.3^0.01 = 0.501 : 0.499) but cannot revive
    # tokens 2 and 3; with temperature first, top-p would have kept all four.
    tokens = draw(Sampler(temperature=100.0, top_p=0.7, seed=3), log_probs(0.5, 0.3, 0.15, 0.05), 4000)
    assert set(tokens.tolist()) == {0, 1}
    assert abs(np.mean(tokens == 0) - 0.501) < 0.03


def test_bias_applies_before_the_repeat_penalty() -> None:
    # Token 0: 1.0 + bias -2 = -1.0, then repeated: -1.0 * 1.5 = -1.5 < -1.4, so token 1 wins.
    # The other order would give 1.0 / 1.5 - 2 = -1.33 > -1.4 and pick token 0.
    sampler = Sampler(temperature=0, logit_bias={0: -2.0}, repeat_penalty=1.5)
    sampler.accept(0)
    assert sampler.sample(np.array([1.0, -1.4], dtype=np.float32)) == 1


def test_repeat_penalty_applies_before_presence_penalty() -> None:
    # llama.cpp scales first, then subtracts: 3.0 / 2 - 0.5 = 1.0 < 1.1, so token 1 wins.
    # Subtracting first would give (3.0 - 0.5) / 2 = 1.25 > 1.1 and pick token 0.
    sampler = Sampler(temperature=0, repeat_penalty=2.0, presence_penalty=0.5)
    sampler.accept(0)
    assert sampler.sample(np.array([3.0, 1.1], dtype=np.float32)) == 1


# ---- min-p


@pytest.mark.parametrize("min_p, expected", [(0.29, {0, 1, 2}), (0.35, {0, 1}), (0.61, {0}), (1.0, {0})])
def test_min_p_keeps_tokens_at_least_p_times_the_top(min_p: float, expected: set[int]) -> None:
    # Thresholds: 0.29 * 0.5 = 0.145 (0.15 passes), 0.35 * 0.5 = 0.175, 0.61 * 0.5 = 0.305.
    tokens = draw(Sampler(min_p=min_p, seed=0), log_probs(0.5, 0.3, 0.15, 0.05), 2000)
    assert set(tokens.tolist()) == expected


def test_min_p_renormalises_the_survivors() -> None:
    # min-p 0.35 keeps 0.5 and 0.3, drawn as 0.625 : 0.375.
    tokens = draw(Sampler(min_p=0.35, seed=1), log_probs(0.5, 0.3, 0.15, 0.05), 4000)
    assert abs(np.mean(tokens == 0) - 0.625) < 0.03


def test_min_p_judges_at_temperature_1() -> None:
    # At temperature 5 the probabilities flatten (0.5^0.2 ... 0.05^0.2), so judged after
    # temperature every token would pass 0.35; judged before, the survivors are {0, 1}.
    tokens = draw(Sampler(min_p=0.35, temperature=5.0, seed=2), log_probs(0.5, 0.3, 0.15, 0.05), 2000)
    assert set(tokens.tolist()) == {0, 1}


def test_min_p_of_1_keeps_the_tied_top_tokens() -> None:
    tokens = draw(Sampler(min_p=1.0, seed=0), np.array([1.0, 3.0, 3.0, 2.0], dtype=np.float32), 500)
    assert set(tokens.tolist()) == {1, 2}


def test_min_p_after_top_p_and_top_k() -> None:
    logits = log_probs(0.4, 0.3, 0.2, 0.1)
    # top-k 3 keeps {0, 1, 2}; min-p 0.6 keeps those >= 0.24 of them: {0, 1}
    assert set(draw(Sampler(top_k=3, min_p=0.6, seed=0), logits, 1000).tolist()) == {0, 1}
    # top-p 0.5 keeps {0, 1}; a min-p that would keep more keeps no more than that
    assert set(draw(Sampler(top_p=0.5, min_p=0.01, seed=0), logits, 1000).tolist()) == {0, 1}


@pytest.mark.parametrize("seed", range(5))
def test_min_p_below_every_ratio_changes_nothing(seed: int) -> None:
    # Logits within +-30 of each other: every ratio is above e^-60, far above 1e-30.
    logits = random_logits(seed)
    assert draw(Sampler(min_p=1e-30, seed=seed), logits, 50).tolist() == draw(Sampler(seed=seed), logits, 50).tolist()


# ---- logit bias


def test_logit_bias_adds_to_the_logit() -> None:
    # Two equal logits; +ln 3 on token 1 makes it three times as likely: 0.75.
    tokens = draw(Sampler(logit_bias={1: math.log(3)}, seed=4), np.zeros(2, dtype=np.float32), 4000)
    assert abs(np.mean(tokens == 1) - 0.75) < 0.03


def test_logit_bias_changes_the_greedy_choice() -> None:
    logits = np.array([2.0, 1.5, 0.0], dtype=np.float32)
    assert Sampler(temperature=0, logit_bias={0: -1.0}).sample(logits) == 1
    assert Sampler(temperature=0, logit_bias={2: 2.5}).sample(logits) == 2


def test_minus_inf_bias_bans_and_plus_inf_forces() -> None:
    logits = random_logits(5, 50)
    favourite = int(np.argmax(logits))
    banned = draw(Sampler(logit_bias={favourite: -math.inf}, temperature=3.0, seed=0), logits, 2000)
    assert favourite not in banned.tolist()
    assert Sampler(temperature=0, logit_bias={favourite: -math.inf}).sample(logits) != favourite
    forced = draw(Sampler(logit_bias={7: math.inf}, seed=0), logits, 100)
    assert set(forced.tolist()) == {7}


def test_a_ban_beats_an_infinite_logit_and_an_infinite_bias() -> None:
    logits = np.array([np.inf, 1.0, -np.inf, 0.0], dtype=np.float32)
    # token 0's +inf logit meets a -inf bias; token 2's -inf logit (masked) meets a +inf bias
    sampler = Sampler(logit_bias={0: -math.inf, 2: math.inf}, seed=0)
    assert set(draw(sampler, logits, 500).tolist()) == {1, 3}


def test_a_uniform_bias_changes_nothing() -> None:
    # softmax is shift-invariant, and adding 0.5 to float32 values is exact in float64
    logits = random_logits(6, 300)
    plain = draw(Sampler(top_p=0.9, min_p=0.01, seed=8), logits, 100)
    shifted = draw(Sampler(top_p=0.9, min_p=0.01, seed=8, logit_bias={i: 0.5 for i in range(300)}), logits, 100)
    assert plain.tolist() == shifted.tolist()


def test_logit_bias_outside_the_vocabulary_is_an_error_naming_it() -> None:
    with pytest.raises(RwkvxError, match="logit_bias: token 5 is outside the vocabulary of 3 tokens") as info:
        Sampler(logit_bias={1: 1.0, 5: 1.0}).sample(np.zeros(3, dtype=np.float32))
    assert "\n" not in str(info.value)
    with pytest.raises(RwkvxError, match=r"logit_bias: expected a token id in 0\.\.2, got 5"):
        Sampler(logit_bias={5: 1.0}, n_vocab=3)


# ---- repeat penalty (llama.cpp)


@pytest.mark.parametrize(
    "logits, penalty, expected",
    [
        # positive logits are divided: 2.0 / 1.5 = 1.33 < 1.5, but 2.0 / 1.3 = 1.54 > 1.5
        ([2.0, 1.5], 1.5, 1),
        ([2.0, 1.5], 1.3, 0),
        # negative logits are multiplied: -1.0 * 1.5 = -1.5 < -1.4, but -1.0 * 1.3 = -1.3 > -1.4
        ([-1.0, -1.4], 1.5, 1),
        ([-1.0, -1.4], 1.3, 0),
        # a penalty below 1 favours repeats: 1.0 / 0.5 = 2.0 > 1.5
        ([1.0, 1.5], 0.5, 0),
    ],
)
def test_repeat_penalty_divides_positive_and_multiplies_negative_logits(logits, penalty, expected) -> None:
    sampler = Sampler(temperature=0, repeat_penalty=penalty)
    sampler.accept(0)
    assert sampler.sample(np.array(logits, dtype=np.float32)) == expected


def test_repeat_penalty_value_in_the_distribution() -> None:
    # ln 4 / 2 = ln 2 against 0: token 0 drawn with probability 2/3.
    sampler = Sampler(repeat_penalty=2.0, seed=7)
    sampler.accept(0)
    tokens = draw(sampler, np.array([math.log(4), 0.0], dtype=np.float32), 6000)
    assert abs(np.mean(tokens == 0) - 2 / 3) < 0.03


def test_repeat_penalty_counts_distinct_tokens_once() -> None:
    # Three repeats still divide once: 2.0 / 1.5 = 1.33 > 1.2 (compounded it would be 0.59).
    sampler = Sampler(temperature=0, repeat_penalty=1.5)
    for _ in range(3):
        sampler.accept(0)
    assert sampler.sample(np.array([2.0, 1.2], dtype=np.float32)) == 0


def test_repeat_window_keeps_the_last_n() -> None:
    sampler = Sampler(repeat_last_n=3)
    for token in [5, 1, 5, 2, 7]:
        sampler.accept(token)
    # the last three are 5, 2, 7
    assert sampler.repeat_window == [2, 5, 7]
    sampler.accept(7)
    assert sampler.repeat_window == [2, 7]
    greedy = Sampler(temperature=0, repeat_penalty=10.0, repeat_last_n=1)
    greedy.accept(0)
    greedy.accept(1)
    # token 0 left the window: no penalty, 3.0 > 2.0 / 10
    assert greedy.sample(np.array([3.0, 2.0], dtype=np.float32)) == 0


def test_repeat_last_n_zero_disables_and_minus_one_keeps_all() -> None:
    off = Sampler(temperature=0, repeat_penalty=10.0, repeat_last_n=0)
    off.accept(0)
    off.accept_prompt([0, 0])
    assert off.repeat_window == []
    assert off.sample(np.array([3.0, 2.0], dtype=np.float32)) == 0
    every = Sampler(repeat_last_n=-1)
    every.accept_prompt(range(500))
    for token in range(500, 1000):
        every.accept(token)
    assert every.repeat_window == list(range(1000))


def test_repeat_penalty_of_1_changes_nothing() -> None:
    logits = random_logits(9)
    a, b = Sampler(seed=1, top_k=40), Sampler(seed=1, top_k=40, repeat_penalty=1.0, repeat_last_n=-1)
    for token in range(20):
        a.accept(token)
        b.accept(token)
    assert draw(a, logits, 50).tolist() == draw(b, logits, 50).tolist()


def test_prompt_counts_for_the_repeat_penalty_only() -> None:
    sampler = Sampler(repeat_last_n=4, presence_penalty=1.0)
    sampler.accept_prompt([9, 8, 7, 6, 5, 4])
    # only the last four are kept, and ChatRWKV's counts see none of them
    assert sampler.repeat_window == [4, 5, 6, 7]
    assert not sampler.occurrence.any()
    sampler.reset()
    assert sampler.repeat_window == []


def test_generate_puts_the_prompt_in_the_repeat_window() -> None:
    class Favourite:
        """Always prefers 'p' (2.0) over 'q' (1.5)."""

        n_vocab = 256

        def forward(self, tokens, state=None):
            logits = np.full(256, -10.0, dtype=np.float32)
            logits[ord("p")], logits[ord("q")] = 2.0, 1.5
            return logits, None

    def text(**kwargs) -> str:
        return "".join(generate(Favourite(), ByteTokenizer(), "p", max_tokens=1,
                                sampler=Sampler(temperature=0, **kwargs)))

    assert text() == "p"
    # 'p' was in the prompt: 2.0 / 2 = 1.0 < 1.5
    assert text(repeat_penalty=2.0) == "q"
    assert text(repeat_penalty=2.0, repeat_last_n=0) == "p"
