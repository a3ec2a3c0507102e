"""The HTTP side of the server: OpenAI's routes on Starlette, a chat page, Prometheus metrics.

Requests are checked here (protocol.py), rendered to token ids (chat templates), and handed
to the engine, whose events come back through an asyncio queue per request. The model loads
in a background thread after the server starts listening, so /health says 503 until then.
"""
from __future__ import annotations

import asyncio
import codecs
import hmac
import json
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from rwkvx import templates
from rwkvx.errors import RwkvxError
from rwkvx.serve.engine import Engine, QueueFull
from rwkvx.serve.metrics import Metrics
from rwkvx.serve.protocol import (ApiError, Limits, _flag, bad, new_id, now, parse_messages, parse_params,
                                  parse_prompt, usage_body)

PAGE = Path(__file__).resolve().parent / "static" / "chat.html"
# the most bytes a request body may have: a 32k-token prompt is ~150 KB of text
MAX_BODY = 4 << 20
# how often a non-streamed request checks that its client is still there
DISCONNECT_POLL_SECONDS = 0.25


@dataclass
class Settings:
    model_name: str
    api_key: str | None = None
    template: str | None = None  # None: by the tokenizer
    replica: str | None = None  # set by Ray Serve deployments


class Server:
    """State shared by the routes: the engine once loaded, settings, metrics."""

    def __init__(self, settings: Settings, limits: Limits, metrics: Metrics):
        self.settings = settings
        self.limits = limits
        self.metrics = metrics
        self.engine: Engine | None = None
        self.template = None
        self.load_error: str | None = None

    def attach(self, engine: Engine) -> None:
        tokenizer = engine.tokenizer
        name = self.settings.template
        if name:
            self.template = templates.TEMPLATES[name]
        else:
            from rwkvx.tokenizer import HFTokenizer
            # Raven's Bob/Alice for the 20B tokenizer (RWKV-4 Pile/Raven), World's otherwise
            self.template = templates.RAVEN if isinstance(tokenizer, HFTokenizer) else templates.WORLD
        self.limits.n_vocab = engine.model.n_vocab
        self.engine = engine

    def load_in_background(self, build_engine, on_failure=None) -> threading.Thread:
        """Load in a thread; a failure is reported by /health and every route, and passed to
        on_failure (the command line prints it and stops the server)."""
        def run():
            try:
                engine = build_engine()
                engine.metrics = self.metrics
                engine.start()
                self.attach(engine)
            except Exception as e:
                self.load_error = str(e) if isinstance(e, RwkvxError) else f"{type(e).__name__}: {e}"
                if on_failure is not None:
                    on_failure(self.load_error)
        thread = threading.Thread(target=run, name="rwkvx-load", daemon=True)
        thread.start()
        return thread


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def build_app(server: Server) -> Starlette:
    settings, metrics = server.settings, server.metrics

    def headers() -> dict:
        return {"x-rwkvx-replica": settings.replica} if settings.replica else {}

    def ready() -> Engine:
        if server.engine is None:
            if server.load_error:
                raise ApiError(500, f"the model failed to load: {server.load_error}", type="server_error")
            raise ApiError(503, "the model is loading", type="unavailable", code="model_loading")
        return server.engine

    def authorise(request: Request) -> None:
        if settings.api_key is None:
            return
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, f"Bearer {settings.api_key}".encode()):
            raise ApiError(401, "invalid or missing API key (Authorization: Bearer KEY)",
                           type="authentication_error", code="invalid_api_key")

    async def read_json(request: Request) -> dict:
        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > MAX_BODY):
            raise ApiError(413, f"the request body is larger than {MAX_BODY} bytes", code="request_too_large")
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > MAX_BODY:
                raise ApiError(413, f"the request body is larger than {MAX_BODY} bytes", code="request_too_large")
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except (ValueError, RecursionError):
            raise ApiError(400, "the request body is not valid JSON", code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
        return body

    def route(path, methods, name):
        """Wraps a handler: auth, errors as OpenAI objects, request counting."""
        def wrap(handler):
            async def endpoint(request: Request) -> Response:
                try:
                    if name not in ("health", "page"):
                        authorise(request)
                    response = await handler(request)
                except ApiError as e:
                    response = error_response(e)
                response.headers.update(headers())
                metrics.request(name, response.status_code)
                return response
            return Route(path, endpoint, methods=methods)
        return wrap

    async def health(request: Request) -> Response:
        if server.engine is None:
            status = "error" if server.load_error else "loading"
            return JSONResponse({"status": status, "error": server.load_error}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def page(request: Request) -> Response:
        return FileResponse(PAGE, media_type="text/html")

    async def models(request: Request) -> Response:
        engine = ready()
        names = [settings.model_name] + [f"{settings.model_name}:{name}" for name in engine.start_names]
        return JSONResponse({"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "rwkvx"} for name in names]})

    async def metrics_route(request: Request) -> Response:
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    def check_request(params, engine: Engine) -> int:
        """The start the request's model name asks for: 0 for the model's own, else the
        number of a named state ("MODEL:NAME", --named-state); and that its logprobs, if
        asked for, can be shown."""
        prefix = settings.model_name + ":"  # the model's name may hold ":" itself
        if params.model is None or params.model == settings.model_name:
            start = 0
        elif params.model.startswith(prefix) and params.model[len(prefix):] in engine.start_names:
            start = engine.start_names[params.model[len(prefix):]]
        else:
            names = ", ".join(repr(n) for n in [settings.model_name] +
                              [f"{settings.model_name}:{n}" for n in engine.start_names])
            raise ApiError(404, f"model {params.model[:80]!r} does not exist; this server has {names[:400]}",
                           param="model", code="model_not_found")
        if params.logprobs is not None:
            needs_token_bytes(engine, "logprobs")
        return start

    async def completions(request: Request) -> Response:
        engine = ready()
        body = await read_json(request)
        params = parse_params(body, server.limits, default_max_tokens=16)
        start = check_request(params, engine)
        prompt = parse_prompt(body, server.limits)
        ids = prompt if isinstance(prompt, list) else await asyncio.to_thread(encode, engine, prompt, server.limits)
        echo = None
        if params.echo:
            echo = engine.tokenizer.decode(ids) if isinstance(prompt, list) else prompt
        return await respond(request, engine, ids, params, chat=False, start=start, echo=echo)

    async def chat_completions(request: Request) -> Response:
        engine = ready()
        body = await read_json(request)
        params = parse_params(body, server.limits, default_max_tokens=min(1024, server.limits.max_tokens), chat=True)
        start = check_request(params, engine)
        messages = parse_messages(body)
        if messages[-1]["role"] == "assistant":
            raise bad("messages", "the last message must not be the assistant's: there is nothing to reply to")
        try:
            text = templates.render(server.template, messages)
        except RwkvxError as e:
            raise bad("messages", str(e)) from None
        params.stop = tuple(templates.stop_strings(server.template)) + params.stop
        ids = await asyncio.to_thread(encode, engine, text, server.limits, "messages")

        def tokens_of_history(reply: str) -> list[int]:
            history = templates.render(server.template, messages + [{"role": "assistant", "content": reply}])
            history = history[:-len(templates.assistant_prefix(server.template))]
            return templates.encode_segment(engine.tokenizer.encode, history, f"{server.template.user}:")

        def remember(reply: str) -> None:
            # the history as the next turn will send it: its state, cached now, makes the
            # next turn pay only for its new message (tokenized off the event loop)
            task = asyncio.get_running_loop().run_in_executor(None, tokens_of_history, reply)
            task.add_done_callback(lambda t: t.exception() is None and engine.remember(t.result(), start))
        return await respond(request, engine, ids, params, chat=True, on_reply=remember, start=start)

    # llama-server's token routes (editors and chat front ends count tokens with them)
    async def tokenize(request: Request) -> Response:
        engine = ready()
        body = await read_json(request)
        content = body.get("content")
        if not isinstance(content, str):
            raise bad("content", "expected a string")
        _flag(body, "add_special")  # RWKV adds no special tokens: accepted, changes nothing
        with_pieces = _flag(body, "with_pieces")
        if with_pieces:
            needs_token_bytes(engine, "with_pieces")
        ids = await asyncio.to_thread(encode, engine, content, server.limits, "content", allow_empty=True)
        if not with_pieces:
            return JSONResponse({"tokens": ids})
        return JSONResponse({"tokens": [{"id": i, "piece": piece(engine.tokenizer, i)} for i in ids]})

    async def detokenize(request: Request) -> Response:
        engine = ready()
        body = await read_json(request)
        ids = body.get("tokens")
        if not isinstance(ids, list) or len(ids) > server.limits.max_prompt_tokens + server.limits.max_tokens:
            raise bad("tokens", "expected a list of at most "
                                f"{server.limits.max_prompt_tokens + server.limits.max_tokens} token ids")
        n_vocab = engine.tokenizer.vocab_size
        if not all(type(i) is int and 0 <= i < n_vocab for i in ids):
            raise bad("tokens", f"expected token ids in 0..{n_vocab - 1}")
        return JSONResponse({"content": engine.tokenizer.decode(ids)})

    async def not_found(request: Request, exc) -> Response:
        status = getattr(exc, "status_code", 404)
        message = "no such route" if status == 404 else f"{request.method} is not allowed here"
        metrics.request("other", status)
        return error_response(ApiError(status, f"{message}: {request.url.path[:200]}", code="not_found"
                                       if status == 404 else "method_not_allowed"))

    async def internal(request: Request, exc: Exception) -> Response:
        metrics.request("other", 500)
        return error_response(ApiError(500, f"internal error: {type(exc).__name__}", type="server_error"))

    return Starlette(exception_handlers={404: not_found, 405: not_found, Exception: internal}, routes=[
        route("/health", ["GET"], "health")(health),
        route("/", ["GET"], "page")(page),
        route("/v1/models", ["GET"], "models")(models),
        route("/metrics", ["GET"], "metrics")(metrics_route),
        route("/v1/completions", ["POST"], "completions")(completions),
        route("/v1/chat/completions", ["POST"], "chat_completions")(chat_completions),
        route("/tokenize", ["POST"], "tokenize")(tokenize),
        route("/detokenize", ["POST"], "detokenize")(detokenize),
    ])


def needs_token_bytes(engine: Engine, param: str) -> None:
    """Pieces and logprobs show each token's bytes: a tokenizer.json that is not byte-level
    BPE has none to show."""
    if not getattr(engine.tokenizer, "byte_level", True):
        raise bad(param, "not available with this tokenizer (its tokens are not byte strings)")


def piece(tokenizer, token_id: int):
    """A token's text, as llama-server gives it: a string, or its bytes as a list of ints
    where they are not whole UTF-8 characters."""
    raw = tokenizer.token_bytes(token_id)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return list(raw)


def encode(engine: Engine, text: str, limits: Limits, param: str = "prompt", allow_empty: bool = False) -> list[int]:
    # text that must hold more tokens than allowed is refused before the work of encoding it
    longest = getattr(engine.tokenizer, "max_token_bytes", None)
    if longest and len(text) > limits.max_prompt_tokens and \
            len(text.encode("utf-8", "replace")) > limits.max_prompt_tokens * longest:
        raise bad(param, f"more than the {limits.max_prompt_tokens} tokens this server accepts")
    try:
        ids = engine.tokenizer.encode(text)
    except RwkvxError as e:
        raise bad(param, str(e)) from None
    if not ids and not allow_empty:
        raise bad(param, "the prompt has no tokens")
    if len(ids) > limits.max_prompt_tokens:
        raise bad(param, f"{len(ids)} tokens, more than this server accepts ({limits.max_prompt_tokens})")
    return ids


def make_sampler(params, seed):
    from rwkvx.sampling import Sampler
    kwargs = dict(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                  presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty,
                  penalty_decay=params.penalty_decay, seed=seed)
    if params.min_p:
        kwargs["min_p"] = params.min_p
    if params.logit_bias:
        kwargs["logit_bias"] = params.logit_bias
    return Sampler(**kwargs)


class _ChatText:
    """A chat reply as shown: without the space it starts with and the white space it ends
    with (templates.clean_reply), streamed piece by piece. Trailing white space is held back
    until more text follows, so the streamed pieces join to what a whole response has."""

    def __init__(self):
        self.started = False
        self.held = ""

    def push(self, piece: str) -> str:
        text = self.held + piece
        if not self.started:
            text = text.lstrip()
            if not text:
                return ""
            self.started = True
        body = text.rstrip()
        self.held = text[len(body):]
        return body


async def _wait_for_events(request: Request, events: asyncio.Queue, n: int, texts: list[str]) -> None:
    """Collect n sequences' text until all are done; CancelledError when the client leaves."""
    done, last_check = 0, time.monotonic()
    while done < n:
        try:
            index, what, value = await asyncio.wait_for(events.get(), DISCONNECT_POLL_SECONDS)
        except asyncio.TimeoutError:
            pass
        else:
            if what == "text":
                texts[index] += value
            else:
                done += 1
        # checked by the clock: a generating sequence sends events far more often than the poll
        if time.monotonic() - last_check >= DISCONNECT_POLL_SECONDS:
            last_check = time.monotonic()
            if await request.is_disconnected():
                raise asyncio.CancelledError


class _TokenLog:
    """A sequence's generated tokens with their log-probabilities (Sequence.token_logprobs),
    handed out with the text that holds them: a token goes with the first text that reaches
    the character its bytes begin, so tokens a stop string cut off are never shown.
    Positions are counted in characters of the text as the tokenizer's stream decoder gives
    it (invalid UTF-8 as U+FFFD), decoding the tokens' bytes the same way."""

    def __init__(self, tokenizer, seq, chat: bool, base: int = 0):
        self.tokenizer, self.seq, self.chat = tokenizer, seq, chat
        self.sent = 0  # tokens handed out
        self.chars = codecs.getincrementaldecoder("utf-8")("replace")
        self.offset = 0  # characters completed before the next token (its text_offset - base)
        self.base = base  # characters in front of the generated text (an echoed prompt)

    def take(self, text_chars: float) -> dict | None:
        """The tokens not handed out yet that begin within the first text_chars characters
        of the generated text (math.inf: all), in the route's logprobs format; None when
        there are none."""
        records = self.seq.token_logprobs
        items = []
        while self.sent < len(records) and self.offset < text_chars:
            token, logprob, top = records[self.sent]
            items.append((token, logprob, top, self.offset))
            self.sent += 1
            self.offset += len(self.chars.decode(self.tokenizer.token_bytes(token)))
        if not items:
            return None
        if self.chat:
            return {"content": [dict(self._chat_entry(token, lp), top_logprobs=[
                self._chat_entry(t, l) for t, l in top]) for token, lp, top, _ in items], "refusal": None}
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token, lp, top, offset in items:
            out["tokens"].append(self._text(token))
            out["token_logprobs"].append(lp)
            # the k most likely and the chosen one, as OpenAI's completions give them
            out["top_logprobs"].append({self._text(t): l for t, l in top + [(token, lp)]})
            out["text_offset"].append(self.base + offset)
        return out

    def _text(self, token: int) -> str:
        return _token_text(self.tokenizer, token)

    def _chat_entry(self, token: int, logprob: float) -> dict:
        raw = self.tokenizer.token_bytes(token)
        return {"token": raw.decode("utf-8", "replace"), "logprob": logprob, "bytes": list(raw)}


def _token_text(tokenizer, token: int) -> str:
    """A token's text; OpenAI's "bytes:\\xe5\\xaa" where its bytes are not whole characters."""
    raw = tokenizer.token_bytes(token)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


# prompt tokens scored per pass for an echoed prompt's logprobs: 64 x 65536 float32 logits
PROMPT_LOGPROBS_CHUNK = 64


def _prompt_logprobs(engine: Engine, ids: list[int], start: int, k: int) -> dict:
    """An echoed prompt's logprobs in completions' format: each token's log-probability
    after the ones before it, from the request's start (the first has none, as OpenAI
    gives it). The prompt runs through the model once more, beside the engine's reading of
    it, a chunk at a time (the model serialises the two)."""
    from rwkvx.serve.engine import _logprobs
    tokenizer = engine.tokenizer
    out = {"tokens": [], "token_logprobs": [None], "top_logprobs": [None], "text_offset": []}
    chars, offset = codecs.getincrementaldecoder("utf-8")("replace"), 0
    for token in ids:
        out["tokens"].append(_token_text(tokenizer, token))
        out["text_offset"].append(offset)
        offset += len(chars.decode(tokenizer.token_bytes(token)))
    state = engine.start_state(start)
    for i in range(0, len(ids) - 1, PROMPT_LOGPROBS_CHUNK):
        part = ids[i:min(i + PROMPT_LOGPROBS_CHUNK, len(ids) - 1)]
        rows, state = engine.model.forward(part, state, all_logits=True)
        for j, row in enumerate(rows):
            token, lp, top = _logprobs(engine.masked(row), ids[i + j + 1], k)
            out["token_logprobs"].append(lp)
            out["top_logprobs"].append({_token_text(tokenizer, t): l for t, l in top + [(token, lp)]})
    return out


def _joined(first: dict | None, then: dict | None) -> dict | None:
    """Two parts of completions' logprobs as one."""
    if first is None or then is None:
        return first or then
    return {key: first[key] + then[key] for key in first}


def _failure(sequences) -> str:
    failed = next(s for s in sequences if s.finish_reason == "error")
    return f"generation failed: {failed.error}"


async def respond(request: Request, engine: Engine, ids: list[int], params, *, chat: bool,
                  on_reply=None, start: int = 0, echo: str | None = None) -> Response:
    """Submit n sequences and answer with their text, streamed as server-sent events or whole.
    echo: the prompt's text, to come back in front of each choice's (completions' echo)."""
    loop = asyncio.get_running_loop()
    echoed = None  # the echoed prompt's logprobs
    if echo is not None and params.logprobs is not None:
        echoed = await asyncio.to_thread(_prompt_logprobs, engine, ids, start, params.logprobs)
    base = len(echo) if echo is not None else 0
    events: asyncio.Queue = asyncio.Queue()
    sequences = []
    try:
        for index in range(params.n):
            seed = None if params.seed is None else params.seed + index

            def on_event(kind, value, index=index):
                loop.call_soon_threadsafe(events.put_nowait, (index, kind, value))
            sequences.append(engine.submit(ids, make_sampler(params, seed), max_tokens=params.max_tokens,
                                           stops=params.stop, ignore_eos=params.ignore_eos,
                                           logprobs=params.logprobs, start=start, on_event=on_event))
    except QueueFull as e:
        for seq in sequences:
            engine.cancel(seq)
        raise ApiError(429, str(e), type="rate_limit_exceeded", code="queue_full") from None
    except RwkvxError as e:
        for seq in sequences:
            engine.cancel(seq)
        raise bad("request", str(e)) from None
    rid = new_id("chatcmpl" if chat else "cmpl")
    created = now()
    model = params.model or request.app.state.model_name  # checked: this model or one of its starts
    kind = "chat.completion" if chat else "text_completion"

    def usage():
        completion = sum(s.usage.completion_tokens for s in sequences)
        return usage_body(len(ids), completion, sequences[0].usage.cached_tokens)

    def finish_reason(seq):
        return "length" if seq.finish_reason == "length" else "stop"

    def cancel_unfinished():
        for seq in sequences:
            if seq.finish_reason is None:
                engine.cancel(seq)

    if not params.stream:
        texts = [""] * params.n
        try:
            await _wait_for_events(request, events, params.n, texts)
        finally:
            cancel_unfinished()
        if any(s.finish_reason == "error" for s in sequences):
            raise ApiError(500, _failure(sequences), type="server_error")
        if on_reply is not None:
            on_reply(texts[0])
        choices = []
        for i, seq in enumerate(sequences):
            logprobs = None
            if params.logprobs is not None:
                logprobs = _joined(echoed, _TokenLog(engine.tokenizer, seq, chat, base).take(
                    len(texts[i]) if seq.stopped_by_text else math.inf)) or \
                    ({"content": [], "refusal": None} if chat else
                     {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []})
            if echo is not None:
                texts[i] = echo + texts[i]
            if chat:
                text = templates.clean_reply(texts[i])
                choices.append({"index": i, "message": {"role": "assistant", "content": text},
                                "finish_reason": finish_reason(seq), "logprobs": logprobs})
            else:
                choices.append({"index": i, "text": texts[i], "finish_reason": finish_reason(seq),
                                "logprobs": logprobs})
        return JSONResponse({"id": rid, "object": kind, "created": created, "model": model,
                             "choices": choices, "usage": usage()})

    chunk_kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(index, text=None, finish=None, role=False, logprobs=None):
        if chat:
            delta = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}
        else:
            choice = {"index": index, "text": text or "", "finish_reason": finish, "logprobs": logprobs}
        return {"id": rid, "object": chunk_kind, "created": created, "model": model, "choices": [choice]}

    def sse(obj) -> bytes:
        return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"

    async def stream():
        shown = [_ChatText() for _ in range(params.n)]
        logs = [_TokenLog(engine.tokenizer, seq, chat, base) for seq in sequences]
        text_chars = [0] * params.n  # of the generated text, before a chat reply's trimming
        done = 0
        first_text = []
        try:
            if chat:
                for i in range(params.n):
                    yield sse(chunk(i, "", role=True))
            if echo is not None:
                for i in range(params.n):
                    yield sse(chunk(i, echo, logprobs=echoed))
            while done < params.n:
                index, what, value = await events.get()
                if what == "text":
                    if index == 0:
                        first_text.append(value)
                    text_chars[index] += len(value)
                    if chat:
                        value = shown[index].push(value)
                        if not value:
                            continue
                    logprobs = logs[index].take(text_chars[index]) if params.logprobs is not None else None
                    yield sse(chunk(index, value, logprobs=logprobs))
                elif value.finish_reason == "error":
                    # OpenAI's way to fail mid-stream: the client raises APIError with this message
                    error = ApiError(500, _failure([value]), type="server_error")
                    yield sse(error.body())
                    return
                else:
                    done += 1
                    # the rest: tokens whose text a chat reply's trimming held back, or that
                    # have none; not those a stop string cut off
                    logprobs = None
                    if params.logprobs is not None:
                        logprobs = logs[index].take(text_chars[index] if value.stopped_by_text else math.inf)
                    yield sse(chunk(index, finish=finish_reason(value), logprobs=logprobs))
            if params.include_usage:
                yield sse({"id": rid, "object": chunk_kind, "created": created, "model": model, "choices": [],
                           "usage": usage()})
            yield b"data: [DONE]\n\n"
            if on_reply is not None:
                on_reply("".join(first_text))
        finally:
            # the client went away (or we are done): free the slots at the next step
            cancel_unfinished()

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"cache-control": "no-cache", "x-accel-buffering": "no"})


def create_app(settings: Settings, limits: Limits, build_engine=None, engine: Engine | None = None,
               on_load_failure=None) -> Starlette:
    """The ASGI app; the model loads in the background (build_engine) or is given (engine)."""
    metrics = Metrics()
    server = Server(settings, limits, metrics)
    app = build_app(server)
    app.state.model_name = settings.model_name
    app.state.server = server
    if engine is not None:
        engine.metrics = metrics
        if engine._thread is None:
            engine.start()
        server.attach(engine)
    elif build_engine is not None:
        server.load_in_background(build_engine, on_load_failure)
    return app

