"""What rwkvx's command-line tools share: one-line errors and exit statuses.

Every bad input prints ``rwkvx: error: <message>`` and exits 2; a bug prints one line
saying so and exits 1 (RWKVX_DEBUG=1 shows the traceback instead).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable

from rwkvx.errors import RwkvxError

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        # one line, no usage dump: the same shape as every other rwkvx error
        raise RwkvxError(message)


def run_main(body: Callable[[], int], out_of_memory_hint: str = "") -> int:
    """Run a tool's body and turn every way it can fail into one line and an exit status."""
    try:
        return body()
    except RwkvxError as e:
        print(f"rwkvx: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # the reader went away (e.g. `| head`): stop quietly, without a second error on exit
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    except KeyboardInterrupt:
        print("rwkvx: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print(f"rwkvx: error: out of memory{out_of_memory_hint}", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as e:  # a bug, not the user's input: say so in one line
        if os.environ.get("RWKVX_DEBUG"):
            raise
        print(f"rwkvx: internal error: {type(e).__name__}: {e} (set RWKVX_DEBUG=1 for a traceback)",
              file=sys.stderr)
        return EXIT_FAILURE


# ---- flag types ------------------------------------------------------------------------


def int_at_least(low: int):
    """argparse type: an integer >= low."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value
    return parse


def float_in(low: float, high: float = float("inf"), low_open: bool = False):
    """argparse type: a number in [low, high] (or (low, high] with low_open)."""
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


# ---- the model flags every tool shares ---------------------------------------------------


def add_model_args(p: argparse.ArgumentParser) -> None:
    """-m, --tokenizer, --dtype, -t, --no-mmap, -b: how to load a model and its tokenizer."""
    from rwkvx import demo
    p.add_argument("-m", "--model", default=demo.NAME, metavar="PATH",
                   help="checkpoint file or folder (safetensors, BlinkDL .pth, Hugging Face folder, rwkv.cpp "
                        ".bin), or 'demo' for the small model packaged with rwkvx (default: %(default)s)")
    p.add_argument("--tokenizer", metavar="PATH",
                   help="tokenizer: a Hugging Face tokenizer.json (RWKV-4 Pile/Raven: 20B_tokenizer.json), "
                        "an RWKV World vocabulary (rwkv_vocab_v20230424.txt), or 'bytes'. Default: "
                        "tokenizer.json beside the model, else chosen by the model's vocabulary size")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16", "uint8"),
                   help="format the weights are kept in (arithmetic is float32): float32; bfloat16 (half "
                        "the memory, lossless for BlinkDL's bf16 releases); float16; uint8 (a quarter, "
                        "quantised at load) (default: %(default)s)")
    p.add_argument("-t", "--threads", type=int_at_least(1), metavar="N",
                   help="threads for the kernels (default: OMP_NUM_THREADS, else the CPUs this process may use)")
    p.add_argument("--no-mmap", action="store_true",
                   help="read the weights into memory (in 2 MB pages) instead of using the mapped file, "
                        "and drop the file from the page cache; decodes faster when the file is cached in "
                        "small pages")
    p.add_argument("-b", "--batch-size", type=int_at_least(1), default=None, metavar="N",
                   help="prompt tokens processed per pass over the weights (default: 128)")


def is_demo(args) -> bool:
    """True when -m names the packaged demo model."""
    from rwkvx import demo
    return demo.resolve(args.model) != args.model


def load_model(args):
    """Load the model and tokenizer that add_model_args' flags name: (model, tokenizer, seconds)."""
    from rwkvx.model import load
    from rwkvx.tokenizer import default_tokenizer, load_tokenizer

    start = time.perf_counter()
    model = load(args.model, dtype=args.dtype, threads=args.threads, mmap=not args.no_mmap)
    if args.batch_size is not None:
        model.chunk_size = args.batch_size
    seconds = time.perf_counter() - start
    tokenizer = load_tokenizer(args.tokenizer or default_tokenizer(args.model, model.n_vocab), model.n_vocab)
    return model, tokenizer, seconds


def model_summary(args, model, load_seconds: float) -> str:
    """The load line: shapes, dtype, threads, memory, load time."""
    return (f"{args.model}: {model.n_layer} layers, {model.n_embd} wide, vocabulary {model.n_vocab}, "
            f"dtype {model.dtype}, {model.n_threads} threads, weights {model.nbytes / 1e6:.1f} MB, "
            f"peak RSS {peak_rss_mb():.0f} MB, loaded in {load_seconds:.2f} s")


def peak_rss_mb() -> float:
    try:
        import resource
    except ImportError:  # Windows
        return float("nan")
    # ru_maxrss is in KiB on Linux, bytes on macOS
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024 if sys.platform == "darwin" else 1024)


def log(message: str) -> None:
    """One line on stderr, for everything that is not the tool's output."""
    print(f"rwkvx: {message}", file=sys.stderr, flush=True)


# ---- sampling flags ----------------------------------------------------------------------


def add_sampling_args(p: argparse.ArgumentParser, *, temp: float = 1.0, top_p: float = 0.85, top_k: int = 0,
                      presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                      penalty_decay: float = 0.996) -> None:
    """The Sampler's flags, with a tool's own defaults (chat's follow ChatRWKV's)."""
    p.add_argument("-s", "--seed", type=int_at_least(0), metavar="N",
                   help="random seed; the same seed, model and options give the same text (default: random)")
    p.add_argument("--temp", type=float_in(0.0), default=temp, metavar="T",
                   help="temperature; 0 picks the most likely token every time (default: %(default)s)")
    p.add_argument("--top-k", type=int_at_least(0), default=top_k, metavar="K",
                   help="sample among the K most likely tokens; 0 = off (default: %(default)s)")
    p.add_argument("--top-p", type=float_in(0.0, 1.0, low_open=True), default=top_p, metavar="P",
                   help="nucleus sampling: the smallest set of tokens whose probability reaches P "
                        "(default: %(default)s)")
    p.add_argument("--presence-penalty", type=float_in(float("-inf")), default=presence_penalty, metavar="X",
                   help="subtract X from the logit of every token already generated (default: %(default)s)")
    p.add_argument("--frequency-penalty", type=float_in(float("-inf")), default=frequency_penalty, metavar="X",
                   help="subtract X times a token's (decayed) count so far (default: %(default)s)")
    p.add_argument("--penalty-decay", type=float_in(0.0, 1.0, low_open=True), default=penalty_decay,
                   metavar="D", help="counts decay by D per generated token, as in ChatRWKV (default: %(default)s)")


def sampler_from_args(args):
    """A Sampler from add_sampling_args' flags; a missing seed is drawn and written back to args.seed."""
    import secrets

    from rwkvx.sampling import Sampler

    if args.seed is None:
        args.seed = secrets.randbelow(2**31)
    return Sampler(temperature=args.temp, top_p=args.top_p, top_k=args.top_k,
                   presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                   penalty_decay=args.penalty_decay, seed=args.seed)
