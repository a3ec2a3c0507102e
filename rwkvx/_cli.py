"""What rwkvx's command-line tools share: one-line errors and exit statuses.

Every bad input prints ``rwkvx: error: <message>`` and exits 2; a bug prints one line
saying so and exits 1 (RWKVX_DEBUG=1 shows the traceback instead).
"""
from __future__ import annotations

import argparse
import math
import os
import re
import stat
import sys
import time
import warnings
from typing import Callable

from rwkvx.errors import RwkvxError, RwkvxWarning
from rwkvx.formats.tensorfile import printable

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        # one line, no usage dump: the same shape as every other rwkvx error
        raise RwkvxError(message)


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived: unwind like Ctrl-C (temporary files removed, one line),
    but not as a KeyboardInterrupt, which a tool may catch to stop one reply and go on."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class OutputError(Exception):
    """Writing to stdout failed (closed, disk full, I/O error): not a bug in the tool."""


class _Stdout:
    """sys.stdout while a tool runs: the same stream, but a failed write raises OutputError
    (a broken pipe stays a BrokenPipeError), and a closed stdout (None) fails on first use
    instead of print() silently writing nowhere."""

    def __init__(self, stream, binary: bool = False):
        self._stream = stream
        self._binary = binary

    def _call(self, name: str, *args):
        if self._stream is None:
            raise OutputError("standard output is closed")
        try:
            return getattr(self._stream, name)(*args)
        except BrokenPipeError:
            raise
        except OSError as e:
            raise OutputError(f"cannot write to standard output: {e.strerror or e}") from None
        except ValueError as e:  # "I/O operation on closed file"
            raise OutputError(f"cannot write to standard output: {e}") from None

    def write(self, data):
        return self._call("write", data)

    def writelines(self, lines):
        return self._call("writelines", lines)

    def flush(self):
        return None if self._stream is None else self._call("flush")

    def isatty(self) -> bool:
        try:
            return self._stream is not None and self._stream.isatty()
        except (OSError, ValueError):
            return False

    @property
    def buffer(self):
        if self._binary:
            raise AttributeError("buffer")
        return _Stdout(None if self._stream is None else getattr(self._stream, "buffer", None), binary=True)

    def __getattr__(self, name: str):
        if self._stream is None:
            raise AttributeError(name)
        return getattr(self._stream, name)


def _silence_stdout() -> None:
    # whatever is still buffered would fail again when Python flushes stdout at exit,
    # printing a second error: point the descriptor at /dev/null
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.close(devnull)
    except OSError:
        pass


def _on_terminate(signum, frame):
    raise Terminated(signum)


def run_main(body: Callable[[], int], out_of_memory_hint: str = "") -> int:
    """Run a tool's body and turn every way it can fail into one line and an exit status.

    Also, for the body's duration: SIGTERM and SIGHUP unwind it like Ctrl-C (so files
    being written are removed) and end with one line and status 128 + signal; a stdout
    that is closed or cannot be written (disk full) ends with one line and status 1, a
    broken pipe silently.
    """
    import signal
    previous = {}
    for signum in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)):
        try:
            if signum is not None and signal.getsignal(signum) in (signal.SIG_DFL, None):
                previous[signum] = signal.signal(signum, _on_terminate)
        except (ValueError, OSError):  # not the main thread: leave signals alone
            pass
    real_stdout = sys.stdout
    sys.stdout = _Stdout(real_stdout)
    try:
        status = body()
        # what is still buffered fails here, not at exit after the status was decided
        sys.stdout.flush()
        return status
    except RwkvxError as e:
        print(f"rwkvx: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # the reader went away (e.g. `| head`): stop quietly, without a second error on exit
        _silence_stdout()
        return EXIT_OK
    except OutputError as e:
        _silence_stdout()
        print(f"rwkvx: error: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("rwkvx: interrupted", file=sys.stderr)
        return 130
    except Terminated as e:
        name = {getattr(signal, "SIGTERM", -1): "SIGTERM", getattr(signal, "SIGHUP", -1): "SIGHUP"}[e.signum]
        print(f"rwkvx: terminated ({name})", file=sys.stderr)
        return 128 + e.signum
    except MemoryError:
        print(f"rwkvx: error: out of memory{out_of_memory_hint}", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as e:  # a bug, not the user's input: say so in one line
        if os.environ.get("RWKVX_DEBUG"):
            raise
        print(f"rwkvx: internal error: {type(e).__name__}: {e} (set RWKVX_DEBUG=1 for a traceback)",
              file=sys.stderr)
        return EXIT_FAILURE
    finally:
        if sys.stdout.__class__ is _Stdout:
            sys.stdout = real_stdout
        for signum, handler in previous.items():
            signal.signal(signum, handler)


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
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text}")
        too_low = value <= low if low_open else value < low
        if too_low or value > high:
            bounds = (f"in {'(' if low_open else '['}{low:g}, {high:g}]" if high != float("inf")
                      else f"{'>' if low_open else '>='} {low:g}")
            raise argparse.ArgumentTypeError(f"expected a number {bounds}, got {text}")
        return value
    return parse


# ---- input text -------------------------------------------------------------------------


# the longest text a tool reads (a prompt, a perplexity corpus): beyond, memory, not text
MAX_TEXT_BYTES = 1 << 30


def read_text(path: str, what: str = "text") -> str:
    """The UTF-8 text of a file, or of stdin for "-"; every failure one RwkvxError line.

    A regular file or a pipe (`-f <(cmd)`); a FIFO nobody writes to reads as empty instead
    of waiting, and devices are refused (/dev/zero would never end).
    """
    if path == "-":
        if sys.stdin is None:
            raise RwkvxError(f"no standard input to read the {what} from (it is closed)")
        data, name = sys.stdin.buffer.read(MAX_TEXT_BYTES + 1), "stdin"
    else:
        name = printable(path)
        try:
            # without blocking: opening a FIFO for reading waits for a writer
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise RwkvxError(f"{name}: no such {what} file") from None
        except IsADirectoryError:
            raise RwkvxError(f"{name}: is a directory, expected a {what} file") from None
        except (OSError, ValueError) as e:
            raise RwkvxError(f"{name}: cannot read the {what} file: {getattr(e, 'strerror', None) or e}") from None
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode)):
            os.close(fd)
            if stat.S_ISDIR(mode):
                raise RwkvxError(f"{name}: is a directory, expected a {what} file")
            raise RwkvxError(f"{name}: not a regular file or a pipe")
        with os.fdopen(fd, "rb") as f:
            if stat.S_ISFIFO(mode) and hasattr(os, "set_blocking"):
                # a writer is there (a pipe from a command) or the read ends at once
                os.set_blocking(fd, True)
            try:
                data = f.read(MAX_TEXT_BYTES + 1)
            except OSError as e:
                raise RwkvxError(f"{name}: cannot read the {what} file: {e.strerror or e}") from None
    if len(data) > MAX_TEXT_BYTES:
        raise RwkvxError(f"{name}: the {what} is larger than {MAX_TEXT_BYTES >> 30} GB")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RwkvxError(f"{name}: the {what} is not UTF-8 (an invalid byte at offset {e.start})") from None


# ---- the model flags every tool shares ---------------------------------------------------


def add_model_args(p: argparse.ArgumentParser) -> None:
    """-m, --tokenizer, --dtype, -t, --no-mmap, -b, --state: how to load a model and its tokenizer."""
    from rwkvx import demo
    p.add_argument("-m", "--model", default=demo.NAME, metavar="PATH",
                   help="checkpoint file or folder (safetensors, BlinkDL .pth, Hugging Face folder, rwkv.cpp "
                        ".bin), or 'demo' for the small model packaged with rwkvx (default: %(default)s)")
    p.add_argument("--tokenizer", metavar="PATH",
                   help="tokenizer: a Hugging Face tokenizer.json, an RWKV World vocabulary (.txt), 'bytes', "
                        "or one of the two packaged with rwkvx: '20B' (20B_tokenizer.json, RWKV-4 Pile/Raven) "
                        "and 'world' (rwkv_vocab_v20230424.txt, World models). Default: tokenizer.json beside "
                        "the model, else by the model's vocabulary: 256 bytes, 50277 20B, 65536 world")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16", "uint8", "q4"),
                   help="format the weights are kept in (arithmetic is float32): float32; bfloat16 (half "
                        "the memory, lossless for BlinkDL's bf16 releases); float16; uint8 (a quarter, "
                        "quantised at load); q4 (4.3 bits a weight, quantised at load: faster decoding, "
                        "lower quality) (default: %(default)s)")
    p.add_argument("--arithmetic", default="float32", choices=("float32", "int8", "bfloat16"),
                   help="int8 (with --dtype uint8 or q4): products round their inputs to int8 per token and "
                        "sum exactly in integers (AVX-512 VNNI where the CPU has it; with q4 decoding too, "
                        "which it makes faster); bfloat16 (with --dtype "
                        "bfloat16): products round their inputs to bfloat16 and use AVX512-BF16 where the "
                        "CPU has it (elsewhere slower than float32). Either: faster prompts and batches, "
                        "deterministic, slightly less exact than float32 (default: %(default)s)")
    p.add_argument("-t", "--threads", type=int_at_least(1), metavar="N",
                   help="threads for the kernels (default: OMP_NUM_THREADS, else the CPUs this process may use)")
    p.add_argument("--no-mmap", action="store_true",
                   help="read the weights into memory (in 2 MB pages) instead of using the mapped file, "
                        "and drop the file from the page cache; decodes faster when the file is cached in "
                        "small pages")
    p.add_argument("--check-tensors", action="store_true",
                   help="scan every weight for NaN and infinite values, also those used in place from the "
                        "mapped file (reads it once); weights read or converted at load are always checked")
    p.add_argument("-b", "--batch-size", type=int_at_least(1), default=None, metavar="N",
                   help="prompt tokens processed per pass over the weights (default: 128)")
    p.add_argument("--state", metavar="FILE",
                   help="start every sequence from this state instead of zeros: an rwkvx state file "
                        "(save_state, chat's /save) or, for RWKV-5/6/7, a state-tuning file "
                        "(blocks.N.att.time_state, .pth or safetensors)")


def is_demo(args) -> bool:
    """True when -m names the packaged demo model."""
    from rwkvx import demo
    return demo.resolve(args.model) != args.model


def load_model(args):
    """Load the model and tokenizer that add_model_args' flags name: (model, tokenizer, seconds)."""
    from rwkvx.model import load
    from rwkvx.tokenizer import default_tokenizer, load_tokenizer

    start = time.perf_counter()
    # a --state file saved from another checkpoint of the same shape warns
    model = with_warnings(lambda: load(args.model, dtype=args.dtype, threads=args.threads, mmap=not args.no_mmap,
                                       check_tensors=True if args.check_tensors else None,
                                       arithmetic=args.arithmetic, initial_state=args.state))
    if args.batch_size is not None:
        model.chunk_size = args.batch_size
    seconds = time.perf_counter() - start
    tokenizer = load_tokenizer(args.tokenizer or default_tokenizer(args.model, model.n_vocab), model.n_vocab)
    return model, tokenizer, seconds


def _arithmetic_caveat(arithmetic: str) -> str:
    from rwkvx.kernels._matvec import bf16_level
    if arithmetic == "bfloat16" and bf16_level() < 2:
        return " (AVX512-BF16 not in use: emulated, slower than float32)"
    return ""


def model_summary(args, model, load_seconds: float) -> str:
    """The load line: shapes, dtype, threads and why that many, memory, load time."""
    from rwkvx.kernels._parallel import thread_policy
    why = "--threads" if args.threads is not None else thread_policy()[1].split(" ", 1)[-1].strip("()")
    arithmetic = getattr(model, "arithmetic", "float32")
    arithmetic = "" if arithmetic == "float32" else f", {arithmetic} arithmetic{_arithmetic_caveat(arithmetic)}"
    return (f"{args.model}: {model.n_layer} layers, {model.n_embd} wide, vocabulary {model.n_vocab}, "
            f"dtype {model.dtype}{arithmetic}, {model.n_threads} thread{'s' * (model.n_threads != 1)} ({why}), weights {model.nbytes / 1e6:.1f} MB, "
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


def with_warnings(action):
    """Return action(), showing its warnings (a state of another checkpoint) as one line each."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RwkvxWarning)
        result = action()
    for w in caught:
        log(f"warning: {w.message}")
    return result


# ---- sampling flags ----------------------------------------------------------------------


# TOKEN_ID, a sign, then a magnitude: llama.cpp's --logit-bias syntax (15043+1, 15043-1,
# 15043-inf). llama.cpp reads the magnitude with stof, which also takes a second sign or
# trailing junk; here those are errors.
_LOGIT_BIAS = re.compile(r"\s*(\d+)\s*([+-])\s*((?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|inf|infinity)\s*",
                         re.IGNORECASE)


def logit_bias_arg(text: str) -> tuple[int, float]:
    """argparse type for --logit-bias: 'TOKEN_ID+BIAS' or 'TOKEN_ID-BIAS' -> (id, signed bias)."""
    m = _LOGIT_BIAS.fullmatch(text)
    if not m:
        raise argparse.ArgumentTypeError(
            f"expected TOKEN_ID+BIAS or TOKEN_ID-BIAS (e.g. 15043+1, 15043-inf), got {text!r}")
    magnitude = float(m[3])
    return int(m[1]), -magnitude if m[2] == "-" else magnitude


def add_sampling_args(p: argparse.ArgumentParser, *, temp: float = 1.0, top_p: float = 0.85, top_k: int = 0,
                      presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                      penalty_decay: float = 0.996, min_p: float = 0.0, repeat_penalty: float = 1.0,
                      repeat_last_n: int = 64) -> None:
    """The Sampler's flags, with a tool's own defaults (chat's follow ChatRWKV's), in one help
    group that states the order they apply in."""
    from rwkvx.sampling import SAMPLER_ORDER

    g = p.add_argument_group("sampling", SAMPLER_ORDER)
    g.add_argument("-s", "--seed", type=int_at_least(0), metavar="N",
                   help="random seed; the same seed, model and options give the same text (default: random)")
    g.add_argument("--temp", type=float_in(0.0), default=temp, metavar="T",
                   help="temperature; 0 picks the most likely token every time (default: %(default)s)")
    g.add_argument("--top-k", type=int_at_least(0), default=top_k, metavar="K",
                   help="sample among the K most likely tokens; 0 = off (default: %(default)s)")
    g.add_argument("--top-p", type=float_in(0.0, 1.0, low_open=True), default=top_p, metavar="P",
                   help="nucleus sampling: the smallest set of tokens whose probability reaches P "
                        "(default: %(default)s)")
    g.add_argument("--min-p", type=float_in(0.0, 1.0), default=min_p, metavar="P",
                   help="drop tokens less than P times as likely as the most likely one; 0 = off "
                        "(default: %(default)s)")
    g.add_argument("--logit-bias", type=logit_bias_arg, action="append", default=[],
                   metavar="TOKEN_ID(+|-)BIAS",
                   help="add BIAS to a token's logit, as llama.cpp: 15043+1 makes token 15043 likelier, "
                        "15043-1 less likely, 15043-inf bans it; may be repeated (biases of one id add up)")
    g.add_argument("--repeat-penalty", type=float_in(0.0, low_open=True), default=repeat_penalty, metavar="X",
                   help="llama.cpp's repeat penalty: divide the positive logits (multiply the negative ones) "
                        "of tokens among the last --repeat-last-n by X; 1 = off (default: %(default)s)")
    g.add_argument("--repeat-last-n", type=int_at_least(-1), default=repeat_last_n, metavar="N",
                   help="how many of the latest tokens (prompt included) the repeat penalty looks at; "
                        "0 = off, -1 = all (default: %(default)s)")
    g.add_argument("--presence-penalty", type=float_in(float("-inf")), default=presence_penalty, metavar="X",
                   help="subtract X from the logit of every token already generated (default: %(default)s)")
    g.add_argument("--frequency-penalty", type=float_in(float("-inf")), default=frequency_penalty, metavar="X",
                   help="subtract X times a token's (decayed) count so far (default: %(default)s)")
    g.add_argument("--penalty-decay", type=float_in(0.0, 1.0, low_open=True), default=penalty_decay,
                   metavar="D", help="counts decay by D per generated token, as in ChatRWKV (default: %(default)s)")


def sampler_from_args(args, *, n_vocab: int | None = None):
    """A Sampler from add_sampling_args' flags; a missing seed is drawn and written back to args.seed.

    n_vocab (the model's, if loaded already) lets the Sampler refuse a --logit-bias id outside
    the vocabulary at once; without it the first token sampled does.
    """
    import secrets

    from rwkvx.sampling import Sampler

    if args.seed is None:
        args.seed = secrets.randbelow(2**31)
    logit_bias: dict[int, float] = {}
    for token, bias in args.logit_bias:
        total = logit_bias.get(token, 0.0) + bias
        # +inf and -inf for one id: the ban wins, as in Sampler
        logit_bias[token] = -math.inf if math.isnan(total) else total
    return Sampler(temperature=args.temp, top_p=args.top_p, top_k=args.top_k,
                   presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                   penalty_decay=args.penalty_decay, seed=args.seed, min_p=args.min_p,
                   logit_bias=logit_bias, repeat_penalty=args.repeat_penalty,
                   repeat_last_n=args.repeat_last_n, n_vocab=n_vocab)
