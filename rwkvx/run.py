"""Command line: generate text from a prompt with an RWKV-4 model.

    python -m rwkvx.run -m model.safetensors --tokenizer 20B_tokenizer.json -p "The Eiffel tower is"

Flag names follow llama.cpp's where one exists. The continuation streams to stdout; the
load summary and final statistics go to stderr. Bad input of any kind prints one line
``rwkvx: error: ...`` and exits with status 2.
"""
from __future__ import annotations

import argparse
import os
import secrets
import sys
import time

from rwkvx import demo
from rwkvx._cli import EXIT_OK, Parser, run_main
from rwkvx.errors import RwkvxError


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value
    return parse


def _float_in(low: float, high: float = float("inf"), low_open: bool = False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        too_low = value <= low if low_open else value < low
        if too_low or value > high or value != value:
            bounds = f"in {'(' if low_open else '['}{low:g}, {high:g}]" if high != float("inf") else f">= {low:g}"
            raise argparse.ArgumentTypeError(f"expected a number {bounds}, got {text}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="python -m rwkvx.run",
        description="Generate text with an RWKV-4 model on the CPU. The continuation of the "
                    "prompt streams to stdout; statistics go to stderr.",
        epilog="Samplers apply in this order: presence/frequency penalties, temperature "
               "(0 = greedy), top-k, top-p, then a seeded draw. Threads: --threads, else "
               "OMP_NUM_THREADS, else one per core.",
    )
    p.add_argument("-m", "--model", default=demo.NAME, metavar="PATH",
                   help="checkpoint file or folder (safetensors, BlinkDL .pth, Hugging Face folder, rwkv.cpp "
                        ".bin), or 'demo' for the small model packaged with rwkvx (default: %(default)s)")
    p.add_argument("--tokenizer", metavar="PATH",
                   help="tokenizer: a Hugging Face tokenizer.json (RWKV-4 Pile/Raven: 20B_tokenizer.json), "
                        "an RWKV World vocabulary (rwkv_vocab_v20230424.txt), or 'bytes'. Default: bytes for "
                        "vocabulary-256 models, else tokenizer.json beside the model")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16", "uint8"),
                   help="format the weights are kept in (arithmetic is float32): float32; bfloat16 (half "
                        "the memory, lossless for BlinkDL's bf16 releases); float16; uint8 (a quarter, "
                        "quantised at load) (default: %(default)s)")
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("-p", "--prompt", help="prompt text")
    prompt.add_argument("-f", "--file", metavar="PATH", help="read the prompt from a file ('-' for stdin)")
    p.add_argument("-n", "--n-predict", type=_int_at_least(0), default=128, metavar="N",
                   help="number of tokens to generate (default: %(default)s)")
    p.add_argument("-t", "--threads", type=_int_at_least(1), metavar="N",
                   help="threads for the kernels (default: OMP_NUM_THREADS, else one per core)")
    p.add_argument("-s", "--seed", type=_int_at_least(0), metavar="N",
                   help="random seed; the same seed, model and options give the same text (default: random)")
    p.add_argument("--temp", type=_float_in(0.0), default=1.0, metavar="T",
                   help="temperature; 0 picks the most likely token every time (default: %(default)s)")
    p.add_argument("--top-k", type=_int_at_least(0), default=0, metavar="K",
                   help="sample among the K most likely tokens; 0 = off (default: %(default)s)")
    p.add_argument("--top-p", type=_float_in(0.0, 1.0, low_open=True), default=0.85, metavar="P",
                   help="nucleus sampling: the smallest set of tokens whose probability reaches P "
                        "(default: %(default)s)")
    p.add_argument("--presence-penalty", type=_float_in(float("-inf")), default=0.0, metavar="X",
                   help="subtract X from the logit of every token already generated (default: %(default)s)")
    p.add_argument("--frequency-penalty", type=_float_in(float("-inf")), default=0.0, metavar="X",
                   help="subtract X times a token's (decayed) count so far (default: %(default)s)")
    p.add_argument("--penalty-decay", type=_float_in(0.0, 1.0, low_open=True), default=0.996,
                   metavar="D", help="counts decay by D per generated token, as in ChatRWKV (default: %(default)s)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop before this text; may be repeated")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating after the end-of-text token")
    p.add_argument("--info", action="store_true",
                   help="print the model's format, architecture, shapes, stored dtype and the memory each "
                        "--dtype needs, reading only headers (no weights); then exit")
    p.add_argument("--no-mmap", action="store_true",
                   help="read the weights into memory (in 2 MB pages) instead of using the mapped file, "
                        "and drop the file from the page cache; decodes faster when the file is cached in "
                        "small pages")
    p.add_argument("-b", "--batch-size", type=_int_at_least(1), default=None, metavar="N",
                   help="prompt tokens processed per pass over the weights (default: 128)")
    return p


def _read_prompt(args, is_demo: bool) -> str:
    if args.prompt is not None:
        return args.prompt
    if args.file is None:
        # the demo runs with no input at all; other models need a prompt
        text = "" if sys.stdin is None or sys.stdin.isatty() else _read_stdin()
        if not text and is_demo:
            return demo.DEFAULT_PROMPT
        if not text and (sys.stdin is None or sys.stdin.isatty()):
            raise RwkvxError("no prompt: give -p TEXT, -f FILE, or pipe text to stdin")
        return text
    if args.file == "-":
        return _read_stdin()
    try:
        with open(args.file, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise RwkvxError(f"{args.file}: no such prompt file") from None
    except UnicodeDecodeError:
        raise RwkvxError(f"{args.file}: prompt file is not UTF-8 text") from None
    except OSError as e:
        raise RwkvxError(f"{args.file}: cannot read prompt file: {e.strerror or e}") from None


def _read_stdin() -> str:
    try:
        return sys.stdin.buffer.read().decode("utf-8")
    except UnicodeDecodeError:
        raise RwkvxError("the prompt on stdin is not UTF-8 text") from None


def _default_tokenizer(model_path: str, n_vocab: int):
    beside = os.path.join(os.path.dirname(os.path.abspath(model_path)), "tokenizer.json")
    if n_vocab != 256 and os.path.isfile(beside):
        return beside
    return None


def _peak_rss_mb() -> float:
    try:
        import resource
    except ImportError:  # Windows
        return float("nan")
    # ru_maxrss is in KiB on Linux, bytes on macOS
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024 if sys.platform == "darwin" else 1024)


def _log(message: str) -> None:
    print(f"rwkvx: {message}", file=sys.stderr, flush=True)


def _run(args) -> int:
    from rwkvx.generate import generate
    from rwkvx.model import load
    from rwkvx.sampling import Sampler
    from rwkvx.tokenizer import load_tokenizer

    if args.info:
        from rwkvx.loader import describe
        print(describe(args.model))
        return EXIT_OK
    is_demo = demo.resolve(args.model) != args.model
    prompt = _read_prompt(args, is_demo)
    if not prompt:
        raise RwkvxError("the prompt is empty")
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    sampler = Sampler(temperature=args.temp, top_p=args.top_p, top_k=args.top_k,
                      presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                      penalty_decay=args.penalty_decay, seed=seed)

    start = time.perf_counter()
    model = load(args.model, dtype=args.dtype, threads=args.threads, mmap=not args.no_mmap)
    if args.batch_size is not None:
        model.chunk_size = args.batch_size
    load_seconds = time.perf_counter() - start
    tokenizer_path = args.tokenizer or _default_tokenizer(args.model, model.n_vocab)
    tokenizer = load_tokenizer(tokenizer_path, model.n_vocab)
    _log(f"{args.model}: {model.n_layer} layers, {model.n_embd} wide, vocabulary {model.n_vocab}, "
         f"dtype {model.dtype}, {model.n_threads} threads, weights {model.nbytes / 1e6:.1f} MB, "
         f"peak RSS {_peak_rss_mb():.0f} MB, loaded in {load_seconds:.2f} s, seed {seed}")
    if is_demo:
        _log(f"this is rwkvx's small demo model, trained on Python's own documentation ({demo.CARD}); "
             "for real text run a real checkpoint: python -m rwkvx.run -m RWKV-4-Pile-169M.pth "
             "--tokenizer 20B_tokenizer.json -p \"...\"")
    if args.prompt is None and args.file is None and prompt == demo.DEFAULT_PROMPT:
        # show what the continuation continues
        sys.stdout.write(prompt)

    stream = generate(model, tokenizer, prompt, max_tokens=args.n_predict, sampler=sampler,
                      stop=args.stop, ignore_eos=args.ignore_eos)
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

    _log(f"load {load_seconds:.2f} s; prompt {stream.prompt_tokens} tokens in {stream.prompt_seconds:.2f} s "
         f"({rate(stream.prompt_tokens, stream.prompt_seconds)}); generated {stream.generated_tokens} tokens "
         f"in {stream.generate_seconds:.2f} s ({rate(stream.generated_tokens, stream.generate_seconds)}); "
         f"stop: {stream.stop_reason}; peak RSS {_peak_rss_mb():.0f} MB")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 failure, 2 bad input)."""
    return run_main(lambda: _run(build_parser().parse_args(argv)),
                    out_of_memory_hint=" (try --dtype uint8 or a smaller model)")


if __name__ == "__main__":
    raise SystemExit(main())
