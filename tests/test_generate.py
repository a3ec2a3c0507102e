"""Tests for rwkvx.generate with a scripted fake model and the byte tokenizer."""

from __future__ import annotations

import numpy as np
import pytest

from rwkvx.errors import RwkvxError
from rwkvx.generate import TextStream, generate
from rwkvx.sampling import Sampler
from rwkvx.tokenizer import ByteTokenizer


class ScriptedModel:
    """A fake model whose logits make the next scripted token by far the most likely.

    The n-th forward call (the prompt is call 0) points at script[n]; past the end of the
    script it points at ``filler``. The state is the tuple of every token fed so far, so tests
    can see exactly what was fed; a new tuple is returned and the one passed in is untouched.
    """

    def __init__(self, script: bytes | list[int], n_vocab: int = 256, filler: int = ord(".")) -> None:
        self.script = list(script)
        self.n_vocab = n_vocab
        self.filler = filler
        self.calls: list[list[int]] = []

    def forward(self, tokens: list[int], state: tuple[int, ...] | None = None) -> tuple[np.ndarray, tuple[int, ...]]:
        step = len(self.calls)
        self.calls.append(list(tokens))
        target = self.script[step] if step < len(self.script) else self.filler
        logits = np.full(self.n_vocab, -10.0, dtype=np.float32)
        logits[target] = 10.0
        return logits, (state or ()) + tuple(tokens)


class RandomModel:
    """A fake model with seeded pseudo-random logits that depend on the tokens fed so far."""

    n_vocab = 256

    def forward(self, tokens: list[int], state: tuple[int, ...] | None = None) -> tuple[np.ndarray, tuple[int, ...]]:
        new_state = (state or ()) + tuple(tokens)
        rng = np.random.default_rng(sum(new_state) * 1000 + len(new_state))
        return rng.standard_normal(self.n_vocab).astype(np.float32), new_state


class EosByteTokenizer(ByteTokenizer):
    """ByteTokenizer where byte 0 ends the text, like <|endoftext|> in real vocabularies."""

    def __init__(self) -> None:
        super().__init__()
        self.eos_id = 0


def greedy() -> Sampler:
    """A fresh deterministic sampler."""
    return Sampler(temperature=0)


def run(stream: TextStream) -> list[str]:
    """Exhaust stream and return its pieces."""
    return list(stream)


def test_generates_the_continuation_only() -> None:
    model = ScriptedModel(b"Hello")
    stream = generate(model, ByteTokenizer(), "Hi", max_tokens=5, sampler=greedy())
    pieces = run(stream)
    assert "".join(pieces) == "Hello" == stream.text
    assert all(pieces)
    assert stream.tokens == list(b"Hello")
    assert stream.stop_reason == "length"


def test_prompt_is_fed_in_one_call_then_one_token_per_call() -> None:
    model = ScriptedModel(b"abc")
    stream = generate(model, ByteTokenizer(), "prompt", max_tokens=3, sampler=greedy())
    run(stream)
    assert model.calls == [list(b"prompt"), [ord("a")], [ord("b")], [ord("c")]]
    assert stream.state == tuple(b"promptabc")


def test_generation_is_lazy() -> None:
    model = ScriptedModel(b"abc")
    stream = generate(model, ByteTokenizer(), "p", max_tokens=3, sampler=greedy())
    assert model.calls == [] and stream.stop_reason is None
    assert next(stream) == "a"
    assert len(model.calls) == 1


@pytest.mark.parametrize("max_tokens", [0, 1, 4, 9])
def test_max_tokens_is_respected(max_tokens: int) -> None:
    model = ScriptedModel(b"abcdefghijklmnop")
    stream = generate(model, ByteTokenizer(), "p", max_tokens=max_tokens, sampler=greedy())
    text = "".join(stream)
    assert text == "abcdefghijklmnop"[:max_tokens]
    assert stream.generated_tokens == len(stream.tokens) == max_tokens
    assert stream.stop_reason == "length"
    assert len(model.calls) == 1 + max_tokens


def test_stats_fields() -> None:
    model = ScriptedModel(b"xyz")
    stream = generate(model, ByteTokenizer(), [1, 2, 3, 4], max_tokens=3, sampler=greedy())
    assert stream.prompt_tokens == 4
    run(stream)
    assert stream.prompt_tokens == 4
    assert stream.generated_tokens == 3
    assert stream.prompt_seconds >= 0 and stream.generate_seconds >= 0
    assert isinstance(stream.prompt_seconds, float) and isinstance(stream.generate_seconds, float)
    assert stream.tokens == list(b"xyz")
    assert stream.text == "xyz"


def test_eos_stops_and_is_not_emitted_or_fed() -> None:
    model = ScriptedModel(b"ab\x00cd")
    stream = generate(model, EosByteTokenizer(), "p", max_tokens=10, sampler=greedy())
    assert "".join(stream) == "ab"
    assert stream.stop_reason == "eos"
    assert stream.tokens == [ord("a"), ord("b"), 0]
    assert stream.generated_tokens == 3
    assert model.calls == [[ord("p")], [ord("a")], [ord("b")]]


def test_ignore_eos_keeps_going() -> None:
    model = ScriptedModel(b"ab\x00cd")
    stream = generate(model, EosByteTokenizer(), "p", max_tokens=5, ignore_eos=True, sampler=greedy())
    assert "".join(stream) == "ab\x00cd"
    assert stream.stop_reason == "length"


def test_no_eos_in_byte_tokenizer() -> None:
    stream = generate(ScriptedModel(b"a\x00b"), ByteTokenizer(), "p", max_tokens=3, sampler=greedy())
    assert "".join(stream) == "a\x00b"


def test_stop_string_spanning_several_tokens() -> None:
    model = ScriptedModel(b"Hello END world")
    stream = generate(model, ByteTokenizer(), "p", max_tokens=50, stop="END", sampler=greedy())
    pieces = run(stream)
    assert "".join(pieces) == "Hello " == stream.text
    assert stream.stop_reason == "stop"
    assert stream.tokens == list(b"Hello END")
    # The token that completed the stop string is not fed, nor is anything after it.
    assert model.calls[-1] == [ord("N")]


def test_partial_stop_prefix_is_held_back_then_emitted_in_full() -> None:
    model = ScriptedModel(b"a EN b END c")
    stream = generate(model, ByteTokenizer(), "p", max_tokens=50, stop=["END"], sampler=greedy())
    pieces = []
    for piece in stream:
        pieces.append(piece)
        # Nothing emitted may ever contain the start of the stop string that follows.
        assert "".join(pieces) in "a EN b "
    assert "".join(pieces) == "a EN b "
    # "E" and "EN" were held back until the space showed they were not "END".
    assert pieces == ["a", " ", "EN ", "b", " "]


def test_held_back_prefix_is_emitted_when_generation_ends() -> None:
    stream = generate(ScriptedModel(b"abcEN"), ByteTokenizer(), "p", max_tokens=5, stop="END", sampler=greedy())
    assert "".join(stream) == "abcEN"
    assert stream.stop_reason == "length"
    stream = generate(ScriptedModel(b"abE\x00"), EosByteTokenizer(), "p", max_tokens=9, stop="END", sampler=greedy())
    assert "".join(stream) == "abE"
    assert stream.stop_reason == "eos"


def test_earliest_of_several_stop_strings_wins() -> None:
    model = ScriptedModel(b"one\ntwo\n\nUser: three")
    stream = generate(model, ByteTokenizer(), "p", max_tokens=50, stop=("User:", "\n\n"), sampler=greedy())
    assert "".join(stream) == "one\ntwo"
    assert stream.stop_reason == "stop"


def test_stop_string_with_multibyte_characters() -> None:
    model = ScriptedModel("ok é 😀 after".encode("utf-8"))
    stream = generate(model, ByteTokenizer(), "p", max_tokens=50, stop="😀", sampler=greedy())
    pieces = run(stream)
    assert "".join(pieces) == "ok é "
    assert all("\ufffd" not in p for p in pieces)


def test_stop_at_the_very_start() -> None:
    stream = generate(ScriptedModel(b"STOP"), ByteTokenizer(), "p", max_tokens=50, stop="ST", sampler=greedy())
    assert run(stream) == []
    assert stream.text == "" and stream.stop_reason == "stop"


def test_streamed_pieces_never_split_characters() -> None:
    text = "héllo 😀 中文"
    stream = generate(ScriptedModel(text.encode("utf-8")), ByteTokenizer(), "p", max_tokens=len(text.encode()), sampler=greedy())
    pieces = run(stream)
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_budget_ending_mid_character_flushes_a_replacement() -> None:
    stream = generate(ScriptedModel("a😀".encode("utf-8")), ByteTokenizer(), "p", max_tokens=3, sampler=greedy())
    assert "".join(stream) == "a\ufffd" == ByteTokenizer().decode(stream.tokens)


def test_state_is_passed_to_the_model() -> None:
    model = ScriptedModel(b"xy")
    stream = generate(model, ByteTokenizer(), "p", max_tokens=2, state=(7, 8), sampler=greedy())
    run(stream)
    assert stream.state == (7, 8, ord("p"), ord("x"), ord("y"))


def test_prompt_as_token_ids() -> None:
    model = ScriptedModel(b"z")
    run(generate(model, ByteTokenizer(), [104, 105], max_tokens=1, sampler=greedy()))
    assert model.calls[0] == [104, 105]


def test_same_seed_same_text() -> None:
    def tokens(seed: int) -> list[int]:
        stream = generate(RandomModel(), ByteTokenizer(), "seed", max_tokens=30, sampler=Sampler(seed=seed))
        run(stream)
        return stream.tokens

    assert tokens(3) == tokens(3)
    assert tokens(3) != tokens(4)


def test_default_sampler() -> None:
    stream = generate(ScriptedModel(b"abc"), ByteTokenizer(), "p", max_tokens=3)
    # The scripted token is e^20 times likelier than the rest together; temperature 1 picks it.
    assert "".join(stream) == "abc"


def test_generated_tokens_are_accepted_by_the_sampler() -> None:
    class FlatModel:
        n_vocab = 256

        def forward(self, tokens: list[int], state: object = None) -> tuple[np.ndarray, None]:
            logits = np.full(256, -10.0, dtype=np.float32)
            logits[ord("a")] = 1.0
            logits[ord("b")] = 0.5
            return logits, None

    sampler = Sampler(temperature=0, presence_penalty=1.0)
    assert "".join(generate(FlatModel(), ByteTokenizer(), "p", max_tokens=2, sampler=sampler)) == "ab"


def test_ids_beyond_the_tokenizer_are_never_drawn() -> None:
    # The model's favourite id 300 does not exist for a 256-token tokenizer.
    model = ScriptedModel([300, 300, 300], n_vocab=512)
    stream = generate(model, ByteTokenizer(), "p", max_tokens=3, sampler=greedy())
    run(stream)
    assert all(t < 256 for t in stream.tokens)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"prompt": "p", "max_tokens": -1}, "max_tokens: expected an integer >= 0"),
        ({"prompt": "p", "max_tokens": 1.5}, "max_tokens: expected an integer >= 0"),
        ({"prompt": ""}, "prompt: expected at least one token"),
        ({"prompt": []}, "prompt: expected at least one token"),
        ({"prompt": [1, 256]}, r"prompt token 1: expected an id in 0\.\.255, got 256"),
        ({"prompt": [-1]}, r"prompt token 0: expected an id in 0\.\.255, got -1"),
        ({"prompt": "p", "stop": ""}, "stop: expected non-empty strings"),
        ({"prompt": "p", "stop": ["a", ""]}, "stop: expected non-empty strings"),
    ],
)
def test_invalid_arguments_raise_before_generation(kwargs: dict, match: str) -> None:
    model = ScriptedModel(b"abc")
    prompt = kwargs.pop("prompt")
    with pytest.raises(RwkvxError, match=match):
        generate(model, ByteTokenizer(), prompt, **kwargs)
    assert model.calls == []
