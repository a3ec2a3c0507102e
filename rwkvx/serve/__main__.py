"""python -m rwkvx.serve: an OpenAI-compatible HTTP server for an RWKV model.

    pip install ".[server]"
    python -m rwkvx.serve -m demo --port 8000

The file, the tokenizer and every flag are checked before the server starts (bad input:
one line, exit 2); the weights then load while the server already answers /health (503
until they are in).
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import sys

from rwkvx._cli import EXIT_FAILURE, EXIT_OK, Parser, add_model_args, int_at_least, log, run_main

EXTRAS = ("starlette", "uvicorn", "prometheus_client")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m rwkvx.serve",
               description="Serve an RWKV model over OpenAI's HTTP API (/v1/completions, /v1/chat/completions, "
                           "/v1/models), with a chat page at / and Prometheus metrics at /metrics.")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int_at_least(0), default=8000, help="port (default: %(default)s; 0: any free one)")
    p.add_argument("--model-name", metavar="NAME",
                   help="the model's name in the API (default: the checkpoint's file name)")
    p.add_argument("--max-batch", type=int_at_least(1), default=8, metavar="N",
                   help="sequences generated together, one pass over the weights per token (default: %(default)s)")
    p.add_argument("--max-queue", type=int_at_least(0), default=64, metavar="N",
                   help="requests that may wait for a slot; more get HTTP 429 (default: %(default)s)")
    p.add_argument("--api-key", metavar="KEY", default=os.environ.get("RWKVX_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every route but /health and the chat page "
                        "(default: $RWKVX_API_KEY, else none)")
    p.add_argument("--state-cache-mb", type=int_at_least(0), default=512, metavar="MB",
                   help="memory for states of earlier prompts and conversations, reused by requests that "
                        "start with the same tokens (default: %(default)s)")
    p.add_argument("--named-state", action="append", default=[], metavar="NAME=FILE", type=named_state,
                   help="also offer the model starting from FILE's state (a state-tuning file, or an rwkvx state "
                        "file) as the model MODEL:NAME; repeatable")
    p.add_argument("--template", choices=("world", "raven"),
                   help="chat template (default: raven for the 20B tokenizer, else world)")
    p.add_argument("--max-tokens", type=int_at_least(1), default=4096, metavar="N",
                   help="the largest max_tokens a request may ask for (default: %(default)s)")
    p.add_argument("--max-prompt-tokens", type=int_at_least(1), default=32768, metavar="N",
                   help="the longest prompt accepted, in tokens (default: %(default)s)")
    p.add_argument("--prefill-chunk", type=int_at_least(1), default=None, metavar="N",
                   help="the most prompt tokens fed per step while other requests are generating; fewer are "
                        "fed when a step would take over 2.5x a decode step (default: 64)")
    p.add_argument("--replicas", type=int_at_least(1), default=None, metavar="N",
                   help="run N replicas behind Ray Serve (needs pip install \".[ray]\")")
    return p


def _missing_extras() -> list[str]:
    import importlib.util
    return [name for name in EXTRAS if importlib.util.find_spec(name) is None]


def _check_port(host: str, port: int) -> None:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        from rwkvx.errors import RwkvxError
        raise RwkvxError(f"--host {host}: cannot resolve it ({e.strerror})") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            from rwkvx.errors import RwkvxError
            raise RwkvxError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def _vocabulary(path: str) -> int:
    """The checkpoint's vocabulary size, from its headers (the file is checked, not loaded)."""
    from rwkvx import arch
    from rwkvx.loader import describe
    version, source = arch.recognise_path(path)
    if version is None:
        return describe(path).n_vocab
    return source.tensors["emb.weight"].shape[0]


def named_state(text: str) -> tuple[str, str]:
    """--named-state's NAME=FILE."""
    name, sep, path = text.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", name) or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=FILE with a NAME of letters, digits, '.', '_' or '-', "
                                         f"got {text[:80]!r}")
    return name, path


def default_model_name(model: str) -> str:
    return os.path.splitext(os.path.basename(os.path.normpath(model)))[0] or "rwkv"


def _serve(args) -> int:
    from rwkvx.errors import RwkvxError
    missing = _missing_extras()
    if missing:
        raise RwkvxError(f"the server needs {', '.join(missing)}: pip install \"rwkvx[server]\" "
                         "(or pip install \".[server]\" from the source tree)")
    from rwkvx.tokenizer import default_tokenizer, load_tokenizer

    n_vocab = _vocabulary(args.model)
    tokenizer = load_tokenizer(args.tokenizer or default_tokenizer(args.model, n_vocab), n_vocab)
    name = args.model_name or default_model_name(args.model)
    names = [name for name, _ in args.named_state]
    if len(set(names)) < len(names):
        raise RwkvxError(f"--named-state: the name {next(n for n in names if names.count(n) > 1)!r} is given twice")
    # a wrong file is refused before the server listens; its fit to the model is checked as
    # the model loads
    from rwkvx.states import open_state_source
    for path in ([args.state] if args.state else []) + [path for _, path in args.named_state]:
        open_state_source(path)
    if args.replicas:
        from rwkvx.serve.replicas import serve_replicas
        return serve_replicas(args, name)
    _check_port(args.host, args.port)

    import uvicorn

    failed = []

    def on_load_failure(message: str) -> None:
        # the weights could not be loaded after all (memory, a damaged file): say so and stop
        failed.append(message)
        log(f"error: {message}")
        os.kill(os.getpid(), signal.SIGTERM)

    app = make_app(args, name, tokenizer, on_load_failure)
    log(f"serving {name} on http://{args.host}:{args.port} (chat page at /, API at /v1); loading the model")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    return EXIT_FAILURE if failed else EXIT_OK


def make_app(args, name: str, tokenizer=None, on_load_failure=None):
    """The ASGI app for these flags; the model loads in a background thread."""
    from rwkvx._cli import load_model, model_summary, with_warnings
    from rwkvx.serve.app import Settings, create_app
    from rwkvx.serve.engine import DEFAULT_PREFILL_CHUNK, Engine
    from rwkvx.serve.protocol import Limits

    def build_engine():
        if os.environ.get("RWKVX_ADAPTIVE_THREADS") is None:
            # The server's own HTTP thread (and, on a small machine, its clients) preempt the
            # kernels' threads all the time, so the contention governor kept dropping to one
            # thread: 430M uint8, 2 cores, one streaming client 23 against 18 ms a token, eight
            # 60 against 48 ms. The short spin alone keeps other programs from collapsing it.
            from rwkvx.kernels._parallel import set_adaptive_threads
            set_adaptive_threads(False)
        model, loaded_tokenizer, seconds = load_model(args)
        log(model_summary(args, model, seconds))
        engine = Engine(model, tokenizer or loaded_tokenizer, max_batch=args.max_batch, max_queue=args.max_queue,
                        state_cache_bytes=args.state_cache_mb << 20,
                        prefill_chunk=args.prefill_chunk or DEFAULT_PREFILL_CHUNK)
        for state_name, path in args.named_state:
            engine.add_start(state_name, with_warnings(lambda: model.read_initial_state(path)))
            log(f"{name}:{state_name} starts from {path}")
        return engine

    settings = Settings(model_name=name, api_key=args.api_key, template=args.template,
                        replica=os.environ.get("RWKVX_REPLICA"))
    limits = Limits(max_tokens=args.max_tokens, max_prompt_tokens=args.max_prompt_tokens)
    return create_app(settings, limits, build_engine=build_engine, on_load_failure=on_load_failure)


def main(argv: list[str] | None = None) -> int:
    return run_main(lambda: _serve(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
