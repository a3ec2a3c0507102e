"""The server's engine and state cache, without HTTP: batching never changes what a request gets."""
import threading
import time

import numpy as np
import pytest

import rwkvx
from rwkvx.serve.cache import StateCache, prefix_hashes
from rwkvx.serve.engine import Engine, QueueFull
from rwkvx.tokenizer import ByteTokenizer

from conftest import save_random_model


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return rwkvx.load(save_random_model(tmp_path_factory.mktemp("m") / "m.safetensors", 2, 32, 256))


def run_requests(engine, requests):
    """Submit (prompt, sampler, max_tokens, stops) at once; return each one's text and reason."""
    done = {}
    texts = {i: "" for i in range(len(requests))}
    finished = threading.Event()

    def on_event(i):
        def handle(kind, value):
            if kind == "text":
                texts[i] += value
            else:
                done[i] = value
                if len(done) == len(requests):
                    finished.set()
        return handle

    for i, (prompt, sampler, max_tokens, stops) in enumerate(requests):
        engine.submit(prompt, sampler, max_tokens=max_tokens, stops=stops, on_event=on_event(i))
    assert finished.wait(60)
    return [(texts[i], done[i]) for i in range(len(requests))]


def test_each_request_gets_what_generate_gives_alone(model):
    tok = ByteTokenizer()
    prompts = [b"Hello there", b"x" * 300, b"a", b"The quick brown fox " * 20, b"abc"]
    settings = [dict(temperature=0.9, top_p=0.8), dict(temperature=0), dict(top_k=5),
                dict(temperature=1.2, presence_penalty=0.5), dict(min_p=0.1)]
    lengths = [20, 7, 33, 12, 1]
    engine = Engine(model, tok, max_batch=3, prefill_chunk=16)
    engine.start()
    try:
        results = run_requests(engine, [(list(p), rwkvx.Sampler(seed=i, **s), n, ("zz",))
                                        for i, (p, s, n) in enumerate(zip(prompts, settings, lengths))])
    finally:
        engine.stop()
    for i, (p, s, n) in enumerate(zip(prompts, settings, lengths)):
        stream = rwkvx.generate(model, tok, list(p), max_tokens=n, sampler=rwkvx.Sampler(seed=i, **s), stop=["zz"])
        text = "".join(stream)
        assert results[i][0] == text, i
        assert results[i][1].finish_reason == ("length" if stream.stop_reason == "length" else "stop")


def test_second_request_resumes_from_the_cache(model):
    tok = ByteTokenizer()
    engine = Engine(model, tok)
    engine.start()
    try:
        prompt = list(b"A long shared beginning. " * 10)
        (_, first), = run_requests(engine, [(prompt, rwkvx.Sampler(temperature=0), 5, ())])
        (text, second), = run_requests(engine, [(prompt + list(b"More."), rwkvx.Sampler(temperature=0), 5, ())])
        (text_again, third), = run_requests(engine, [(prompt, rwkvx.Sampler(temperature=0), 5, ())])
    finally:
        engine.stop()
    assert first.usage.cached_tokens == 0
    assert second.usage.cached_tokens == len(prompt)
    # the same prompt again: everything, logits included, from the cache
    assert third.usage.cached_tokens == len(prompt)
    expected = "".join(rwkvx.generate(model, tok, prompt + list(b"More."), max_tokens=5,
                                      sampler=rwkvx.Sampler(temperature=0)))
    assert text == expected


def test_a_failing_request_does_not_take_others_down(model):
    class Broken(rwkvx.Sampler):
        def sample(self, logits):
            raise rwkvx.RwkvxError("logits: NaN")

    engine = Engine(model, ByteTokenizer())
    engine.start()
    try:
        results = run_requests(engine, [(list(b"ok"), rwkvx.Sampler(seed=1), 5, ()),
                                        (list(b"bad"), Broken(), 5, ())])
    finally:
        engine.stop()
    assert results[0][1].finish_reason == "length" and len(results[0][0]) > 0
    assert results[1][1].finish_reason == "error" and "NaN" in results[1][1].error


def test_queue_limit(model):
    engine = Engine(model, ByteTokenizer(), max_batch=1, max_queue=1)  # not started: nothing leaves the queue
    engine.submit([1], rwkvx.Sampler(), max_tokens=1, on_event=lambda *a: None)  # takes the free slot
    engine.submit([1], rwkvx.Sampler(), max_tokens=1, on_event=lambda *a: None)  # waits
    with pytest.raises(QueueFull):
        engine.submit([1], rwkvx.Sampler(), max_tokens=1, on_event=lambda *a: None)


def test_state_cache_longest_prefix_and_bound():
    state = np.zeros((2, 5, 8), np.float32)
    per_entry = state.nbytes + 4 * 3
    cache = StateCache(max_bytes=3 * per_entry)
    cache.put([1, 2, 3], state + 1)
    cache.put([1, 2, 4], state + 2)
    cache.put([5, 6, 7], state + 3, logits=None)
    assert cache.longest_prefix([1, 2, 3, 9]).state[0, 0, 0] == 1
    assert cache.longest_prefix([1, 2, 4]) is None  # whole prompt, but no logits to sample from
    assert cache.longest_prefix([1, 2, 4], need_logits_at_end=False).state[0, 0, 0] == 2
    assert cache.longest_prefix([9, 9]) is None
    cache.put([8, 8, 8], state + 4)  # over the bound: the least recently used goes
    assert cache.longest_prefix([5, 6, 7, 0]) is None
    assert cache.longest_prefix([1, 2, 3, 0]) is not None
    assert cache.nbytes <= cache.max_bytes and len(cache) == 3


def test_prefix_hashes_tell_sequences_apart():
    assert prefix_hashes([1, 2])[2] != prefix_hashes([2, 1])[2]
    assert prefix_hashes([0])[1] != prefix_hashes([])[0]
    assert prefix_hashes([1, 2, 3])[:3] == prefix_hashes([1, 2])


def drive(engine, until):
    """Run the engine's steps in this thread (it is not started) until until() holds."""
    for _ in range(1000):
        if until():
            return
        with engine._cond:
            engine._drop_cancelled()
            engine._admit_waiting()
        engine._step()
    raise AssertionError("the engine did not get there in 1000 steps")


def test_a_request_takes_over_the_warm_up_of_its_history_instead_of_waiting(model):
    tok = ByteTokenizer()
    engine = Engine(model, tok)
    history = list(b"An old conversation, remembered. " * 20)  # longer than one step reads
    engine.remember(history)
    drive(engine, lambda: engine.active and 0 < len(engine._active[0].fed))
    read = len(engine._active[0].fed)
    assert read < len(history)
    prompt = history + list(b"The next turn.")
    out = []
    seq = engine.submit(prompt, rwkvx.Sampler(temperature=0), max_tokens=6,
                        on_event=lambda kind, value: out.append(value) if kind == "text" else None)
    with engine._cond:
        engine._admit_waiting()
    # admitted at once, in the warm-up's slot, from where the warm-up had got to
    assert engine._active == [seq] and len(seq.fed) == read and not engine._waiting
    drive(engine, lambda: seq.finish_reason is not None)
    assert seq.usage.cached_tokens == read
    assert "".join(out) == "".join(rwkvx.generate(model, tok, prompt, max_tokens=6,
                                                  sampler=rwkvx.Sampler(temperature=0)))


def test_a_warm_up_that_a_request_already_covers_is_dropped(model):
    engine = Engine(model, ByteTokenizer())
    history = list(b"Some history. " * 5)
    seq = engine.submit(history + list(b"More."), rwkvx.Sampler(temperature=0), max_tokens=20,
                        on_event=lambda kind, value: None)
    drive(engine, lambda: engine.active)
    engine.remember(history)
    with engine._cond:
        engine._admit_waiting()
    assert engine._active == [seq] and not engine._waiting


def test_starts_keep_their_prompts_apart(model):
    # the same prompt from the model's start and from another, and two choices of each: each
    # gets what generate gives from its start, and states are shared only within a start
    tok = ByteTokenizer()
    _, other = model.forward(list(b"Once upon a time"))
    engine = Engine(model, tok, max_batch=8)
    assert engine.add_start("tale", other) == 1
    with pytest.raises(rwkvx.RwkvxError, match="'tale': given twice"):
        engine.add_start("tale", other)
    with pytest.raises(rwkvx.RwkvxError, match=r"a state of shape \(2, 5\)"):
        engine.add_start("bad", np.zeros((2, 5), np.float32))
    prompt = list(b"The end")
    texts = [[] for _ in range(4)]
    seqs = [engine.submit(prompt, rwkvx.Sampler(temperature=0), max_tokens=8, start=start,
                          on_event=lambda kind, value, i=i: texts[i].append(value) if kind == "text" else None)
            for i, start in enumerate((0, 1, 0, 1))]
    engine.start()
    try:
        deadline = time.monotonic() + 60
        while any(s.finish_reason is None for s in seqs) and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        engine.stop()
    greedy = rwkvx.Sampler(temperature=0)
    plain = "".join(rwkvx.generate(model, tok, prompt, max_tokens=8, sampler=greedy))
    model.set_initial_state(other)
    try:
        tuned = "".join(rwkvx.generate(model, tok, prompt, max_tokens=8, sampler=rwkvx.Sampler(temperature=0)))
    finally:
        model.set_initial_state(None)
    assert plain != tuned
    assert ["".join(t) for t in texts] == [plain, tuned, plain, tuned]
    assert all(s.usage.prompt_tokens == len(prompt) for s in seqs)
    assert all(s.usage.cached_tokens in (0, len(prompt)) for s in seqs)
    # a warm-up of the other start is cached under its marker, not as the model's own start
    history = list(b"A history")
    engine.remember(history, 1)
    drive(engine, lambda: engine.cache.longest_prefix([-1] + history, need_logits_at_end=False) is not None)
    assert engine.cache.longest_prefix(history, need_logits_at_end=False) is None
    with pytest.raises(rwkvx.RwkvxError, match="token ids must be in"):
        engine.submit([-1, 5], rwkvx.Sampler(), max_tokens=1, on_event=lambda kind, value: None)
