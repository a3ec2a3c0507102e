"""python -m rwkvx.serve over real sockets, driven by the official openai client."""
import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
openai = pytest.importorskip("openai")

HERE = os.path.dirname(__file__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, *args):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "rwkvx.serve", "--port", str(self.port), *args],
                                     cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("server did not become healthy")

    def client(self, **kwargs) -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kwargs.pop("api_key", "none"), max_retries=0,
                             **kwargs)

    def get(self, path, headers=None):
        request = urllib.request.Request(self.url + path, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def post(self, path, body: bytes, headers=None):
        request = urllib.request.Request(self.url + path, data=body, method="POST",
                                         headers={"content-type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()
        self.proc.stderr.close()


@pytest.fixture(scope="module")
def server():
    s = Server("-m", "demo", "--model-name", "demo")
    yield s
    s.stop()


def metric(server, name, labels=None) -> float:
    from prometheus_client.parser import text_string_to_metric_families
    _, text = server.get("/metrics")
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                total += sample.value
    return total


def test_models_and_health(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["demo"]
    assert server.get("/health")[0] == 200


def test_completion_and_its_stream_agree(server):
    client = server.client()
    whole = client.completions.create(model="demo", prompt="The built-in function", max_tokens=24, seed=3,
                                      temperature=0.8)
    assert whole.object == "text_completion" and whole.choices[0].finish_reason == "length"
    assert whole.usage.prompt_tokens == len("The built-in function".encode())
    assert whole.usage.completion_tokens == 24
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 24
    pieces = list(client.completions.create(model="demo", prompt="The built-in function", max_tokens=24, seed=3,
                                            temperature=0.8, stream=True))
    assert "".join(p.choices[0].text for p in pieces) == whole.choices[0].text
    assert pieces[-1].choices[0].finish_reason == "length"


def test_a_prompt_of_token_ids_is_the_same_prompt(server):
    client = server.client()
    text = client.completions.create(model="demo", prompt="The built-in function", max_tokens=10, temperature=0)
    ids = list("The built-in function".encode())
    for prompt in (ids, [ids]):
        got = client.completions.create(model="demo", prompt=prompt, max_tokens=10, temperature=0)
        assert got.choices[0].text == text.choices[0].text and got.usage.prompt_tokens == len(ids)


def test_stop_strings_and_n(server):
    client = server.client()
    result = client.completions.create(model="demo", prompt="def f(x):\n", max_tokens=64, temperature=0, stop=["\n"],
                                       n=3)
    assert len(result.choices) == 3
    for choice in result.choices:
        assert "\n" not in choice.text
    # greedy: every choice is the same text
    assert len({c.text for c in result.choices}) == 1


def test_chat_stream_and_cached_second_turn(server):
    client = server.client()
    messages = [{"role": "system", "content": "You answer questions about Python."},
                {"role": "user", "content": "What does the built-in function len do?"}]
    first = client.chat.completions.create(model="demo", messages=messages, max_tokens=32, seed=1)
    reply = first.choices[0].message
    assert reply.role == "assistant" and first.object == "chat.completion"
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    streamed = list(client.chat.completions.create(model="demo", messages=messages, max_tokens=32, seed=1,
                                                   stream=True))
    assert streamed[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == reply.content
    # the next turn re-sends the history: everything up to it comes from the cache
    messages += [{"role": "assistant", "content": reply.content}, {"role": "user", "content": "And sorted?"}]
    second = client.chat.completions.create(model="demo", messages=messages, max_tokens=8, seed=1)
    cached = second.usage.prompt_tokens_details.cached_tokens
    # all but the new message: "User: And sorted?\n\nAssistant:" (the byte tokenizer: 1 token a byte)
    assert cached == second.usage.prompt_tokens - len(b"User: And sorted?\n\nAssistant:")


def test_sixteen_concurrent_requests(server):
    client = server.client()

    def one(i):
        return client.completions.create(model="demo", prompt=f"Example {i}: ", max_tokens=16, seed=i)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(16)))
    assert all(r.usage.completion_tokens == 16 for r in results)
    # each seeded request gives what it gives alone
    again = one(5)
    assert again.choices[0].text == results[5].choices[0].text


def wait_idle(server, timeout=10.0):
    deadline = time.monotonic() + timeout
    while metric(server, "rwkvx_active_sequences") > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    return metric(server, "rwkvx_active_sequences") == 0


def test_disconnect_of_a_stream_frees_the_slot(server):
    before = metric(server, "rwkvx_generated_tokens_total")
    stream = server.client().completions.create(model="demo", prompt="Once", max_tokens=4096, stream=True, seed=1,
                                                extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    assert wait_idle(server)
    # cancelled, not run to its end
    assert metric(server, "rwkvx_generated_tokens_total") - before < 3000


def test_disconnect_of_a_whole_response_frees_the_slot(server):
    before = metric(server, "rwkvx_generated_tokens_total")
    body = json.dumps({"prompt": "Once", "max_tokens": 4096, "ignore_eos": True}).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        deadline = time.monotonic() + 10
        while metric(server, "rwkvx_active_sequences") == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert wait_idle(server)
    assert metric(server, "rwkvx_generated_tokens_total") - before < 3000


def test_n_choices_read_their_prompt_once(server):
    prompt = "A prompt read once for all the choices: " + "x" * 200
    before = metric(server, "rwkvx_prompt_tokens_total")
    result = server.client().completions.create(model="demo", prompt=prompt, max_tokens=2, n=4, seed=1)
    assert len(result.choices) == 4
    assert metric(server, "rwkvx_prompt_tokens_total") - before == len(prompt.encode())


def test_streamed_and_whole_chat_replies_are_the_same(server):
    client = server.client()
    messages = [{"role": "user", "content": "Tell me about dictionaries."}]
    for seed in range(8):
        whole = client.chat.completions.create(model="demo", messages=messages, max_tokens=40, seed=seed)
        pieces = client.chat.completions.create(model="demo", messages=messages, max_tokens=40, seed=seed,
                                                stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in pieces) == whole.choices[0].message.content


@pytest.mark.parametrize("method, path, status", [("GET", "/v2/nothing", 404), ("GET", "/v1/completions", 405)])
def test_unknown_routes_get_openai_errors(server, method, path, status):
    request = urllib.request.Request(server.url + path, method=method)
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=10)
    assert info.value.code == status
    assert set(json.loads(info.value.read())["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (json.dumps({"prompt": "x", "temperature": -1}).encode(), 400, "temperature"),
    (json.dumps({"prompt": "x", "top_p": 0}).encode(), 400, "top_p"),
    (json.dumps({"prompt": "x", "top_p": 1.5}).encode(), 400, "top_p"),
    (json.dumps({"prompt": "x", "max_tokens": 0}).encode(), 400, "max_tokens"),
    (json.dumps({"prompt": "x", "max_tokens": 100000}).encode(), 400, "max_tokens"),
    (json.dumps({"prompt": "x", "max_tokens": "many"}).encode(), 400, "max_tokens"),
    (json.dumps({"prompt": 5}).encode(), 400, "prompt"),
    (json.dumps({"prompt": ""}).encode(), 400, "prompt"),
    (json.dumps({"prompt": []}).encode(), 400, "prompt"),
    (json.dumps({"prompt": [1, 256]}).encode(), 400, "prompt"),
    (json.dumps({"prompt": [1, True]}).encode(), 400, "prompt"),
    (json.dumps({"prompt": ["a", "b"]}).encode(), 400, "prompt"),
    (json.dumps({"prompt": [[1], [2]]}).encode(), 400, "prompt"),
    (json.dumps({"prompt": "x", "stop": [""]}).encode(), 400, "stop"),
    (json.dumps({"prompt": "x", "logit_bias": {"999999": 1}}).encode(), 400, "logit_bias"),
    (json.dumps({"prompt": "x", "n": 100}).encode(), 400, "n"),
    (json.dumps({"prompt": "x", "model": "gpt-4"}).encode(), 404, "model"),
])
def test_bad_completion_requests(server, body, status, param):
    code, error = server.post("/v1/completions", body)
    assert code == status
    assert set(error["error"]) == {"message", "type", "param", "code"}
    assert error["error"]["param"] == param


@pytest.mark.parametrize("messages", [[], [{"role": "wizard", "content": "x"}], [{"role": "user"}],
                                      [{"role": "user", "content": 3}], "hello"])
def test_bad_chat_messages(server, messages):
    code, error = server.post("/v1/chat/completions", json.dumps({"messages": messages}).encode())
    assert code == 400 and "messages" in error["error"]["param"]


def test_openai_client_raises_on_errors(server):
    client = server.client()
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="demo", prompt="x", temperature=-3)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])


def test_metrics_parse(server):
    server.client().completions.create(model="demo", prompt="x", max_tokens=2)
    assert metric(server, "rwkvx_requests_total", {"route": "completions", "status": "200"}) >= 1
    assert metric(server, "rwkvx_time_to_first_token_seconds_count") >= 1
    assert metric(server, "rwkvx_batch_size_count") >= 1
    assert metric(server, "rwkvx_prompt_tokens_total") >= 1


def test_chat_page_is_served(server):
    status, text = server.get("/")
    assert status == 200 and "<html" in text.lower()


def test_api_key_and_a_full_queue():
    s = Server("-m", "demo", "--api-key", "sekret", "--max-batch", "1", "--max-queue", "0")
    try:
        assert s.get("/health")[0] == 200
        assert s.get("/v1/models")[0] == 401
        assert s.post("/tokenize", b'{"content": "x"}')[0] == 401
        with pytest.raises(openai.AuthenticationError):
            s.client(api_key="wrong").models.list()
        client = s.client(api_key="sekret")
        assert client.models.list().data[0].id == "demo"
        # one long request holds the only slot; the next finds no room in the queue
        holder = client.completions.create(prompt="Once", max_tokens=4096, stream=True, model="demo",
                                           extra_body={"ignore_eos": True})
        next(iter(holder))
        with pytest.raises(openai.RateLimitError):
            client.completions.create(prompt="x", max_tokens=1, model="demo")
        holder.close()
    finally:
        s.stop()


def _log_softmax(logits):
    x = logits.astype(np.float64)
    return x - (x.max() + np.log(np.exp(x - x.max()).sum()))


def _piece(token: int) -> str:
    """A byte token's text as completions' logprobs name it."""
    return chr(token) if token < 0x80 else f"bytes:\\x{token:02x}"


def test_completion_logprobs_are_the_model_s(server):
    # greedy: each token is the most likely, and its log-probability is the model's own
    import rwkvx
    client = server.client()
    whole = client.completions.create(model="demo", prompt="def f(x):", max_tokens=12, temperature=0, logprobs=3)
    lp = whole.choices[0].logprobs
    assert "".join(lp.tokens) == whole.choices[0].text and len(lp.tokens) == whole.usage.completion_tokens
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(len(lp.tokens))]
    model = rwkvx.load("demo")
    ids = rwkvx.load_tokenizer("bytes", 256).encode("def f(x):")
    logits, state = model.forward(ids)
    for token_text, token_lp, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        expected = _log_softmax(logits)
        token = int(np.argmax(expected))
        assert token_text == _piece(token) and abs(token_lp - expected[token]) < 1e-6
        # the three most likely (the chosen one among them)
        assert sorted(top) == sorted(_piece(t) for t in np.argsort(-expected)[:3])
        assert all(abs(top[_piece(t)] - expected[t]) < 1e-6 for t in np.argsort(-expected)[:3])
        logits, state = model.forward([token], state)
    # streamed: the same tokens, each with the text that holds it
    pieces = list(client.completions.create(model="demo", prompt="def f(x):", max_tokens=12, temperature=0,
                                            logprobs=3, stream=True))
    streamed = [p.choices[0].logprobs for p in pieces if p.choices[0].logprobs is not None]
    assert sum((p.tokens for p in streamed), []) == lp.tokens
    assert sum((p.token_logprobs for p in streamed), []) == lp.token_logprobs
    assert sum((p.text_offset for p in streamed), []) == lp.text_offset
    # without the parameter: none
    assert client.completions.create(model="demo", prompt="x", max_tokens=2).choices[0].logprobs is None


def test_echo_gives_the_prompt_and_its_logprobs_back(server):
    # as lm-eval-harness scores a text: echo, logprobs 1, one token
    import rwkvx
    client = server.client()
    prompt = "def f(x):"
    plain = client.completions.create(model="demo", prompt=prompt, max_tokens=3, temperature=0)
    echoed = client.completions.create(model="demo", prompt=prompt, max_tokens=3, temperature=0, echo=True)
    assert echoed.choices[0].text == prompt + plain.choices[0].text
    got = client.completions.create(model="demo", prompt=prompt, max_tokens=1, temperature=0, echo=True, logprobs=1)
    lp = got.choices[0].logprobs
    assert "".join(lp.tokens) == got.choices[0].text and lp.text_offset == list(range(len(prompt) + 1))
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    # each prompt token's log-probability after the ones before it: the model's own
    model = rwkvx.load("demo")
    ids = list(prompt.encode())
    logits, state = model.forward(ids[:1])
    for i in range(1, len(ids) + 1):
        expected = _log_softmax(logits)
        token = ids[i] if i < len(ids) else int(np.argmax(expected))
        assert abs(lp.token_logprobs[i] - expected[token]) < 1e-6
        assert _piece(token) in lp.top_logprobs[i] and len(lp.top_logprobs[i]) <= 2
        if i < len(ids):
            logits, state = model.forward([ids[i]], state)
    # streamed: the prompt first, then the completion
    pieces = list(client.completions.create(model="demo", prompt=prompt, max_tokens=3, temperature=0, echo=True,
                                            logprobs=1, stream=True))
    assert "".join(p.choices[0].text for p in pieces) == echoed.choices[0].text
    assert pieces[0].choices[0].text == prompt
    assert sum((p.choices[0].logprobs.tokens for p in pieces if p.choices[0].logprobs), []) == \
        list(echoed.choices[0].text)


def test_logprobs_of_several_choices_and_of_a_stop_string(server):
    client = server.client()
    several = client.completions.create(model="demo", prompt="class A:", max_tokens=10, seed=2, n=3, logprobs=1)
    for choice in several.choices:
        assert "".join(choice.logprobs.tokens) == choice.text
        # the most likely alternative, and the chosen one when another
        assert all(1 <= len(top) <= 2 for top in choice.logprobs.top_logprobs)
    # tokens past a stop string are not reported, whole or streamed; logprobs 0: the chosen one
    prompt = "The built-in function"
    text = client.completions.create(model="demo", prompt=prompt, max_tokens=16, temperature=0).choices[0].text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    kwargs = dict(model="demo", prompt=prompt, max_tokens=16, temperature=0, logprobs=0, stop=[stop])
    cut = client.completions.create(**kwargs)
    assert cut.choices[0].text == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"
    tokens = cut.choices[0].logprobs.tokens
    assert "".join(tokens) == cut.choices[0].text
    assert cut.choices[0].logprobs.top_logprobs == [{t: p} for t, p in zip(tokens, cut.choices[0].logprobs.token_logprobs)]
    streamed = list(client.completions.create(stream=True, **kwargs))
    assert sum((p.choices[0].logprobs.tokens for p in streamed if p.choices[0].logprobs), []) == tokens


def test_chat_logprobs(server):
    client = server.client()
    messages = [{"role": "user", "content": "What is a list?"}]
    reply = client.chat.completions.create(model="demo", messages=messages, max_tokens=24, seed=5, logprobs=True,
                                           top_logprobs=2)
    content = reply.choices[0].logprobs.content
    text = b"".join(bytes(e.bytes) for e in content).decode("utf-8", "replace")
    # the reply is the generated text trimmed (a stop string ends it, or the length)
    assert text.strip() == reply.choices[0].message.content
    if reply.choices[0].finish_reason == "length":
        assert len(content) == reply.usage.completion_tokens
    assert all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in content)
    streamed = list(client.chat.completions.create(model="demo", messages=messages, max_tokens=24, seed=5,
                                                   logprobs=True, top_logprobs=2, stream=True))
    entries = sum((p.choices[0].logprobs.content for p in streamed if p.choices and p.choices[0].logprobs), [])
    assert [(e.token, e.logprob) for e in entries] == [(e.token, e.logprob) for e in content]


def test_token_log_counts_characters_as_the_text_does():
    # invalid UTF-8 becomes one U+FFFD in the text: a stop string after it still cuts off
    # the tokens behind it, and a character's bytes go out together
    from types import SimpleNamespace
    from rwkvx.serve.app import _TokenLog
    from rwkvx.tokenizer import ByteTokenizer
    tokens = [0x80, ord("X"), ord("Y")] + list("é".encode())
    seq = SimpleNamespace(token_logprobs=[(t, -1.0, []) for t in tokens])
    log = _TokenLog(ByteTokenizer(), seq, chat=False)
    first = log.take(len("\ufffdX"))  # the text before the stop string "Y"
    assert first["tokens"] == ["bytes:\\x80", "X"] and first["text_offset"] == [0, 1]
    assert log.take(len("\ufffdX")) is None
    rest = log.take(len("\ufffdXYé"))
    assert rest["tokens"] == ["Y", "bytes:\\xc3", "bytes:\\xa9"] and rest["text_offset"] == [2, 3, 3]


def test_token_bytes_are_needed_for_pieces_and_logprobs():
    from types import SimpleNamespace
    from rwkvx.serve.app import needs_token_bytes
    from rwkvx.serve.protocol import ApiError
    with pytest.raises(ApiError, match="logprobs: not available with this tokenizer"):
        needs_token_bytes(SimpleNamespace(tokenizer=SimpleNamespace(byte_level=False)), "logprobs")
    needs_token_bytes(SimpleNamespace(tokenizer=SimpleNamespace(byte_level=True)), "logprobs")


@pytest.mark.parametrize("route, body, param", [
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, "logprobs"),
    ("/v1/completions", {"prompt": "x", "logprobs": True}, "logprobs"),
    ("/v1/completions", {"prompt": "x", "echo": "yes"}, "echo"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": True,
                              "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": 3}, "logprobs"),
])
def test_bad_logprobs_requests(server, route, body, param):
    status, error = server.post(route, json.dumps(body).encode())
    assert status == 400 and error["error"]["param"] == param


def test_tokenize_and_detokenize_as_llama_server(server):
    text = "What is a list? 媽 and 🤗"
    status, body = server.post("/tokenize", json.dumps({"content": text}).encode())
    assert status == 200
    ids = body["tokens"]
    assert ids == rwkvx_tokenizer_ids(text)
    status, body = server.post("/detokenize", json.dumps({"tokens": ids}).encode())
    assert status == 200 and body["content"] == text
    # with pieces: a token's text, or its bytes where they are not whole characters
    status, body = server.post("/tokenize", json.dumps({"content": text, "with_pieces": True,
                                                        "add_special": True}).encode())
    assert status == 200 and [t["id"] for t in body["tokens"]] == ids
    joined = b"".join(p.encode() if isinstance(p, str) else bytes(p) for p in (t["piece"] for t in body["tokens"]))
    assert joined == text.encode()
    assert any(isinstance(t["piece"], list) for t in body["tokens"])  # the demo's tokens are bytes
    assert server.post("/tokenize", json.dumps({"content": ""}).encode()) == (200, {"tokens": []})
    assert server.post("/detokenize", json.dumps({"tokens": []}).encode()) == (200, {"content": ""})


@pytest.mark.parametrize("path, body, param", [
    ("/tokenize", {}, "content"),
    ("/tokenize", {"content": 5}, "content"),
    ("/tokenize", {"content": "x", "with_pieces": "yes"}, "with_pieces"),
    ("/tokenize", {"content": "x", "add_special": 1}, "add_special"),
    ("/detokenize", {"tokens": "abc"}, "tokens"),
    ("/detokenize", {"tokens": [1, 2, 256]}, "tokens"),
    ("/detokenize", {"tokens": [1, True]}, "tokens"),
    ("/detokenize", {"tokens": [-1]}, "tokens"),
])
def test_bad_token_requests(server, path, body, param):
    status, error = server.post(path, json.dumps(body).encode())
    assert status == 400 and error["error"]["param"] == param and error["error"]["type"] == "invalid_request_error"


def rwkvx_tokenizer_ids(text):
    import rwkvx
    return rwkvx.load_tokenizer("bytes", 256).encode(text)


def test_initial_state_serves_every_request(tmp_path):
    # --state: requests start from the saved state, as the API's generate does from it
    import rwkvx
    model = rwkvx.load("demo")
    tokenizer = rwkvx.load_tokenizer("bytes", model.n_vocab)
    ids = tokenizer.encode("def fibonacci(n):\n    ")
    model.save_state(tmp_path / "start.state", model.forward(ids)[1], ids)
    from_zeros = "".join(rwkvx.generate(model, tokenizer, "if", max_tokens=16, sampler=rwkvx.Sampler(temperature=0)))
    model.set_initial_state(tmp_path / "start.state")
    expected = "".join(rwkvx.generate(model, tokenizer, "if", max_tokens=16, sampler=rwkvx.Sampler(temperature=0)))
    assert expected != from_zeros
    s = Server("-m", "demo", "--model-name", "demo", "--state", str(tmp_path / "start.state"))
    try:
        got = s.client().completions.create(model="demo", prompt="if", max_tokens=16, temperature=0)
        assert got.choices[0].text == expected
    finally:
        s.stop()
    # a file that is no state is refused before the server listens: one line, exit 2
    done = subprocess.run([sys.executable, "-m", "rwkvx.serve", "-m", "demo", "--port", str(free_port()),
                           "--state", os.path.join(HERE, "conftest.py")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().endswith("neither an rwkvx state file nor a state-tuning file (.pth or safetensors)")


def test_named_states_are_models_of_their_own(tmp_path):
    # --named-state NAME=FILE: requests for MODEL:NAME start from FILE's state, the others
    # from the model's own; the state cache keeps the two apart
    import rwkvx
    model = rwkvx.load("demo")
    tokenizer = rwkvx.load_tokenizer("bytes", model.n_vocab)
    ids = tokenizer.encode("def fibonacci(n):\n    ")
    model.save_state(tmp_path / "fib.state", model.forward(ids)[1], ids)

    def greedy(prompt):
        return "".join(rwkvx.generate(model, tokenizer, prompt, max_tokens=12, sampler=rwkvx.Sampler(temperature=0)))
    plain = {p: greedy(p) for p in ("if", "return")}
    model.set_initial_state(tmp_path / "fib.state")
    tuned = {p: greedy(p) for p in ("if", "return")}
    assert all(plain[p] != tuned[p] for p in plain)
    s = Server("-m", "demo", "--model-name", "demo", "--named-state", f"fib={tmp_path / 'fib.state'}")
    try:
        client = s.client()
        assert [m.id for m in client.models.list().data] == ["demo", "demo:fib"]
        for round in range(2):  # the second round finds both prompts' states in the cache
            for prompt in ("if", "return"):
                for name, expected in (("demo", plain), ("demo:fib", tuned)):
                    got = client.completions.create(model=name, prompt=prompt, max_tokens=12, temperature=0)
                    assert got.choices[0].text == expected[prompt] and got.model == name
                    assert got.usage.prompt_tokens == len(prompt)
                    assert got.usage.prompt_tokens_details.cached_tokens == (len(prompt) if round else 0)
        # a chat's second turn resumes from its first under the same start
        messages = [{"role": "user", "content": "What is a list?"}]
        first = client.chat.completions.create(model="demo:fib", messages=messages, max_tokens=8, seed=1)
        messages += [{"role": "assistant", "content": first.choices[0].message.content},
                     {"role": "user", "content": "And a tuple?"}]
        # the first turn's history with its reply is cached (a warm-up) under this start:
        # longer than what the first turn itself read and wrote (the reply's separator too)
        entries, deadline = metric(s, "rwkvx_state_cache_entries"), time.monotonic() + 2
        while metric(s, "rwkvx_state_cache_entries") <= entries and time.monotonic() < deadline:
            time.sleep(0.05)
        second = client.chat.completions.create(model="demo:fib", messages=messages, max_tokens=8, seed=1)
        assert second.usage.prompt_tokens_details.cached_tokens > first.usage.prompt_tokens + first.usage.completion_tokens
        # an echoed prompt is scored from the request's start
        scored = [client.completions.create(model=name, prompt="return x", max_tokens=1, temperature=0, echo=True,
                                            logprobs=0).choices[0].logprobs.token_logprobs for name in ("demo", "demo:fib")]
        assert scored[0][0] is None and scored[1][0] is None and scored[0][1:] != scored[1][1:]
        with pytest.raises(openai.NotFoundError, match="'demo', 'demo:fib'"):
            client.completions.create(model="demo:other", prompt="x", max_tokens=1)
    finally:
        s.stop()
    for flag, message in ((["--named-state", "a b=x"], "expected NAME=FILE"),
                          (["--named-state", f"a={tmp_path / 'fib.state'}", "--named-state",
                            f"a={tmp_path / 'fib.state'}"], "the name 'a' is given twice"),
                          (["--named-state", f"a={tmp_path}"], "is a directory")):
        done = subprocess.run([sys.executable, "-m", "rwkvx.serve", "-m", "demo", "--port", str(free_port()), *flag],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and message in done.stderr, done.stderr


def test_without_the_extra_it_says_what_to_install(tmp_path):
    # hide starlette from a child process: one line, exit 2
    (tmp_path / "starlette.py").write_text("raise ImportError('hidden')\n")
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text("import sys\nsys.modules['starlette'] = None\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "rwkvx.serve", "-m", "demo"], cwd=HERE, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("rwkvx: error: the server needs starlette: pip install")


def test_bad_flags_exit_2():
    for args in (["-m", "/no/such/model"], ["-m", "demo", "--port", "-1"], ["-m", "demo", "--max-batch", "0"]):
        result = subprocess.run([sys.executable, "-m", "rwkvx.serve", *args], cwd=HERE, capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_port_in_use_is_one_line():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "rwkvx.serve", "-m", "demo", "--port", str(port)], cwd=HERE,
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "cannot listen on 127.0.0.1" in result.stderr


def test_health_is_503_while_loading():
    from starlette.testclient import TestClient

    from rwkvx.serve.app import Settings, create_app
    from rwkvx.serve.protocol import Limits

    release = threading.Event()

    def slow_engine():
        release.wait(30)
        raise RuntimeError("never mind")

    app = create_app(Settings("m"), Limits(), build_engine=slow_engine)
    with TestClient(app) as client:
        assert client.get("/health").status_code == 503
        r = client.post("/v1/completions", json={"prompt": "x"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"
        release.set()
        time.sleep(0.2)
        assert client.get("/health").status_code == 503
        assert client.post("/v1/completions", json={"prompt": "x"}).status_code == 500


def test_ray_serve_replicas():
    pytest.importorskip("ray.serve")
    s = Server("-m", "demo", "--replicas", "2", "-t", "1", "--model-name", "demo")
    try:
        seen = set()
        # the router sends requests only to replicas that have started: on a busy machine
        # the second can take seconds longer than the first
        deadline = time.monotonic() + 60
        while len(seen) < 2 and time.monotonic() < deadline:
            status, _ = s.get("/v1/models")
            assert status == 200
            with urllib.request.urlopen(s.url + "/v1/models", timeout=30) as r:
                seen.add(r.headers["x-rwkvx-replica"])
            time.sleep(0.05)
        assert len(seen) == 2, seen
        client = s.client()
        result = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=8, seed=1)
        assert result.usage.completion_tokens >= 1
        pieces = list(client.completions.create(model="demo", prompt="The", max_tokens=5, stream=True, seed=1))
        assert pieces[-1].choices[0].finish_reason == "length"
    finally:
        s.stop()
