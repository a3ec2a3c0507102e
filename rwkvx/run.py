"""Command line: generate text from a prompt with an RWKV model (RWKV-4, 5.2, 6 or 7).

    python -m rwkvx.run -m model.safetensors -p "The Eiffel tower is"

Flag names follow llama.cpp's where one exists. The continuation streams to stdout; the
load summary and final statistics go to stderr. Bad input of any kind prints one line
``rwkvx: error: ...`` and exits with status 2.
"""
from __future__ import annotations

import argparse
import sys
import time

from rwkvx import demo
from rwkvx._cli import (EXIT_OK, Parser, add_model_args, add_sampling_args, int_at_least, is_demo, load_model,
                        log, model_summary, peak_rss_mb, read_text, run_main, sampler_from_args)
from rwkvx.errors import RwkvxError


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="python -m rwkvx.run",
        description="Generate text with an RWKV model (RWKV-4, 5.2, 6 or 7) on the CPU. The continuation of the "
                    "prompt streams to stdout; statistics go to stderr.",
        epilog="Threads: --threads, else OMP_NUM_THREADS, else the CPUs this process may use.",
    )
    add_model_args(p)
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("-p", "--prompt", help="prompt text")
    prompt.add_argument("-f", "--file", metavar="PATH", help="read the prompt from a file ('-' for stdin)")
    p.add_argument("-n", "--n-predict", type=int_at_least(0), default=128, metavar="N",
                   help="number of tokens to generate (default: %(default)s)")
    add_sampling_args(p)
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop before this text; may be repeated")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating after the end-of-text token")
    p.add_argument("--prompt-cache", metavar="FILE",
                   help="reuse and save the prompt's state in FILE: a prompt that starts with the tokens "
                        "cached there runs only the rest; the whole prompt's state is saved back")
    p.add_argument("--prompt-cache-ro", action="store_true",
                   help="with --prompt-cache: read the cache, never write it")
    p.add_argument("--info", action="store_true",
                   help="print the model's format, architecture, shapes, stored dtype and the memory each "
                        "--dtype needs, reading only headers (no weights); then exit")
    return p


def _read_prompt(args, is_demo: bool) -> str:
    if args.prompt is not None:
        return args.prompt
    if args.file is None:
        # the demo runs with no input at all; other models need a prompt
        text = "" if sys.stdin is None or sys.stdin.isatty() else read_text("-", "prompt")
        if not text and is_demo:
            return demo.DEFAULT_PROMPT
        if not text and (sys.stdin is None or sys.stdin.isatty()):
            raise RwkvxError("no prompt: give -p TEXT, -f FILE, or pipe text to stdin")
        return text
    return read_text(args.file, "prompt")


def _run(args) -> int:
    from rwkvx.generate import generate

    if args.info:
        from rwkvx import arch
        from rwkvx.loader import describe
        from rwkvx.kernels._parallel import threads_info
        text = arch.describe(args.model)  # RWKV-5.2/6/7; None for RWKV-4 files
        print(text if text is not None else describe(args.model))
        print(f"{'threads':<14}{threads_info().removeprefix('threads ')}")
        return EXIT_OK
    demo_model = is_demo(args)
    prompt = _read_prompt(args, demo_model)
    if not prompt:
        raise RwkvxError("the prompt is empty")
    if args.prompt_cache_ro and not args.prompt_cache:
        raise RwkvxError("--prompt-cache-ro: needs --prompt-cache FILE")
    model, tokenizer, load_seconds = load_model(args)
    sampler = sampler_from_args(args, n_vocab=model.n_vocab)
    log(f"{model_summary(args, model, load_seconds)}, seed {args.seed}")
    if demo_model:
        log(f"this is rwkvx's small demo model, trained on Python's own documentation ({demo.CARD}); "
            "for real text run a real checkpoint: python -m rwkvx.run -m RWKV-4-Pile-169M.pth -p \"...\"")
    if args.prompt is None and args.file is None and prompt == demo.DEFAULT_PROMPT:
        # show what the continuation continues
        sys.stdout.write(prompt)

    state, prompt_ids, cache_seconds = None, prompt, 0.0
    if args.prompt_cache:
        state, prompt_ids, cache_seconds = _prefill_from_cache(args, model, tokenizer, prompt)
        # the repeat penalty's window starts in the prompt; generate adds the last token
        sampler.accept_prompt(args.prompt_ids[:-1])
    stream = generate(model, tokenizer, prompt_ids, max_tokens=args.n_predict, sampler=sampler,
                      stop=args.stop, ignore_eos=args.ignore_eos, state=state)
    out = sys.stdout
    # a terminal or pipe that cannot show a character gets a replacement, not a crash
    if hasattr(out, "reconfigure"):
        out.reconfigure(errors="replace")
    for piece in stream:
        out.write(piece)
        out.flush()
    if out.isatty():
        out.write("\n")
    out.flush()

    def rate(n, seconds):
        return f"{n / seconds:.1f} tokens/s" if seconds > 0 and n else "-"

    prompt_tokens, prompt_seconds = stream.prompt_tokens, stream.prompt_seconds
    if args.prompt_cache:
        prompt_tokens, prompt_seconds = len(args.prompt_ids), prompt_seconds + cache_seconds
    log(f"load {load_seconds:.2f} s; prompt {prompt_tokens} tokens in {prompt_seconds:.2f} s "
        f"({rate(prompt_tokens, prompt_seconds)}); generated {stream.generated_tokens} tokens "
        f"in {stream.generate_seconds:.2f} s ({rate(stream.generated_tokens, stream.generate_seconds)}); "
        f"stop: {stream.stop_reason}; peak RSS {peak_rss_mb():.0f} MB")
    return EXIT_OK


def _prefill_from_cache(args, model, tokenizer, prompt: str):
    """Run the prompt from --prompt-cache's best state: (state before the last prompt token,
    [last token], seconds). Generation feeds that token, so its text is what the whole prompt
    run from the start gives."""
    from rwkvx.prompt_cache import PromptCache

    start = time.perf_counter()
    tokens = tokenizer.encode(prompt)
    if not tokens:
        raise RwkvxError("the prompt is empty")
    cache = PromptCache(args.prompt_cache, model, read_only=args.prompt_cache_ro)
    result = cache.prefill(tokens)
    args.prompt_ids = tokens
    log(f"prompt cache {args.prompt_cache}: reused {result.reused} of {len(tokens)} prompt tokens"
        + (f", saved {len(tokens)}" if result.saved else ""))
    return result.state, tokens[-1:], time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 failure, 2 bad input)."""
    return run_main(lambda: _run(build_parser().parse_args(argv)),
                    out_of_memory_hint=" (try --dtype uint8 or a smaller model)")


if __name__ == "__main__":
    raise SystemExit(main())
