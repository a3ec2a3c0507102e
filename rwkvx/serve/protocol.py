"""OpenAI's request and response shapes: checking what a client sent, building what it gets.

Every check raises :class:`ApiError`, which the app turns into OpenAI's error object
``{"error": {"message", "type", "param", "code"}}`` with the right HTTP status. Field names,
defaults and ranges follow the ``openai`` package's types (CompletionCreateParams,
ChatCompletionCreateParams); unknown fields are ignored, as OpenAI's own API does with
fields it has retired.
"""
from __future__ import annotations

import math
import numbers
import time
import uuid
from dataclasses import dataclass, field


class ApiError(Exception):
    """An error a client sees: HTTP status, OpenAI error type, the parameter, a code."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}", param=param, code="invalid_value")


def _number(body: dict, name: str, default: float, low: float, high: float, *, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise bad(name, f"expected a number, got {value!r}"[:200])
    if (value <= low if low_open else value < low) or value > high:
        raise bad(name, f"expected a number in {'(' if low_open else '['}{low:g}, {high:g}], got {value!r}")
    return float(value)


def _integer(body: dict, name: str, default: int | None, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(name, f"expected an integer, got {value!r}"[:200])
    if not low <= value <= high:
        raise bad(name, f"expected an integer in [{low}, {high}], got {value}")
    return value


@dataclass
class Limits:
    """What the server accepts: set from its command line."""

    max_tokens: int = 4096  # the largest max_tokens
    max_n: int = 8
    max_prompt_tokens: int = 32768
    n_vocab: int = 0


@dataclass
class Params:
    """A checked request, ready for the engine."""

    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    presence_penalty: float
    frequency_penalty: float
    penalty_decay: float
    seed: int | None
    n: int
    stop: tuple[str, ...]
    logit_bias: dict[int, float]
    stream: bool
    include_usage: bool
    ignore_eos: bool
    model: str | None
    logprobs: int | None = None  # alternatives per generated token's log-probability; None: off
    echo: bool = False  # completions: the prompt comes back in front of the text (and its logprobs)
    extra: dict = field(default_factory=dict)


# most alternatives a token's logprobs list (OpenAI's chat limit)
MAX_TOP_LOGPROBS = 20


def parse_params(body: dict, limits: Limits, *, default_max_tokens: int, chat: bool = False) -> Params:
    """The sampling and length parameters both routes share (logprobs as each route asks
    for them: completions' "logprobs": k, chat's "logprobs": true with "top_logprobs": k)."""
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("model", "expected a string")
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 16:
        stops = tuple(stop)
    else:
        raise bad("stop", "expected a string or a list of at most 16 strings")
    if any(not s for s in stops):
        raise bad("stop", "expected non-empty strings")
    bias = body.get("logit_bias")
    logit_bias: dict[int, float] = {}
    if bias is not None:
        if not isinstance(bias, dict) or len(bias) > 1024:
            raise bad("logit_bias", "expected an object mapping token ids to numbers")
        for key, value in bias.items():
            try:
                token = int(key)
            except (TypeError, ValueError):
                raise bad("logit_bias", f"expected token ids as keys, got {str(key)[:40]!r}") from None
            if not 0 <= token < limits.n_vocab:
                raise bad("logit_bias", f"token id {token} is outside the vocabulary (0..{limits.n_vocab - 1})")
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not -100 <= value <= 100:
                raise bad("logit_bias", f"expected biases in [-100, 100], got {value!r}"[:200])
            logit_bias[token] = float(value)
    stream = _flag(body, "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad("stream_options", "expected an object")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise bad("seed", f"expected an integer in [0, 2^63), got {seed!r}"[:200])
    if chat:
        logprobs = _integer(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS) if _flag(body, "logprobs") else None
        if logprobs is None and body.get("top_logprobs") is not None:
            raise bad("top_logprobs", "needs logprobs: true")
    else:
        logprobs = _integer(body, "logprobs", None, 0, MAX_TOP_LOGPROBS)

    return Params(
        max_tokens=_integer(body, "max_tokens", None, 1, limits.max_tokens)
        or _integer(body, "max_completion_tokens", default_max_tokens, 1, limits.max_tokens),
        temperature=_number(body, "temperature", 1.0, 0.0, 100.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        top_k=_integer(body, "top_k", 0, 0, 1 << 30),
        min_p=_number(body, "min_p", 0.0, 0.0, 1.0),
        presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        penalty_decay=_number(body, "penalty_decay", 0.996, 0.0, 1.0, low_open=True),
        seed=seed,
        n=_integer(body, "n", 1, 1, limits.max_n),
        stop=stops,
        logit_bias=logit_bias,
        stream=bool(stream),
        include_usage=bool(options.get("include_usage", False)),
        ignore_eos=_flag(body, "ignore_eos"),
        model=model,
        logprobs=logprobs,
        echo=not chat and _flag(body, "echo"),
    )


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool) and value is not None:
        raise bad(name, "expected true or false")
    return bool(value)


def parse_prompt(body: dict, limits: Limits) -> str | list[int]:
    """One prompt: text, or token ids (OpenAI's list of ints; a list holding one of either)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, list):
        if not prompt:
            raise bad("prompt", "expected at least one token")
        if len(prompt) > limits.max_prompt_tokens:
            raise bad("prompt", f"{len(prompt)} tokens, more than this server accepts ({limits.max_prompt_tokens})")
        if not all(type(t) is int and 0 <= t < limits.n_vocab for t in prompt):
            raise bad("prompt", f"expected text, or token ids in 0..{limits.n_vocab - 1}; "
                                "one prompt a request")
        return prompt
    if not isinstance(prompt, str):
        raise bad("prompt", "expected a string or a list of token ids (one prompt a request)")
    if not prompt:
        raise bad("prompt", "expected a non-empty string")
    return prompt


def parse_messages(body: dict) -> list[dict]:
    """messages as [{"role", "content"}] with text content; system, developer, user, assistant."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "expected a non-empty list of messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}]", "expected an object with role and content")
        role = m.get("role")
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise bad(f"messages[{i}].role", f"expected system, user or assistant, got {str(role)[:40]!r}")
        content = m.get("content")
        if isinstance(content, list):
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise bad(f"messages[{i}].content", "expected text parts only")
                texts.append(part["text"])
            content = "".join(texts)
        if content is None and role == "assistant":
            content = ""
        if not isinstance(content, str):
            raise bad(f"messages[{i}].content", "expected a string")
        out.append({"role": role, "content": content})
    return out


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage_body(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def now() -> int:
    return int(time.time())
