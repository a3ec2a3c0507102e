"""Perplexity of a model on a text, printed as llama.cpp's llama-perplexity prints it.

    python -m rwkvx.perplexity -m RWKV-4-Pile-169M.pth -f wiki.test.raw

The output and the error estimate follow llama-perplexity; the scored tokens do not:
llama-perplexity scores only the second half of each chunk (a transformer's first tokens
see too little context) and drops a partial last chunk, while an RNN is scored on every
token after a chunk's first. Numbers from the two tools are therefore not comparable.

Protocol: the whole text is tokenized once (no token is added before it) and split into
consecutive chunks of ``ctx`` tokens; a last, shorter chunk is kept when it has at least 2
tokens. Each chunk starts from a fresh state, or with ``carry_state`` from the state the
previous chunk left (RWKV's natural mode: the model has read the whole text so far). Inside
a chunk the logits after token i score token i+1, so a chunk of n tokens scores n - 1 (in
both modes, so that the two measure the same tokens and differ only in what the model has
read). PPL = exp(mean negative log-likelihood over every scored token).

:func:`perplexity` does the scoring for any model and token list; ``main`` is the CLI.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

from rwkvx._cli import (EXIT_OK, Parser, add_model_args, int_at_least, load_model, log, model_summary, peak_rss_mb,
                        read_text, run_main)
from rwkvx.errors import RwkvxError, TokenizerError

DEFAULT_CTX = 1024

# log-softmax works on row blocks of about this size, so that its passes over a row (max,
# subtract, exp, sum) hit L2 instead of memory: 6.8 ms instead of 9.7 ms for 128 rows of a
# 50277-token vocabulary
_BLOCK_BYTES = 1 << 20


@dataclass
class PerplexityResult:
    """What :func:`perplexity` measured, over the chunks scored so far.

    nll_sum: sum of -ln p(token) over the scored tokens, in nats (float64).
    nll_sq_sum: the sum of its squares (for the standard error).
    count: tokens scored (each chunk's tokens after its first).
    n_tokens: tokens fed through the model (every token of the chunks kept).
    n_chunks: chunks scored.
    n_bytes: UTF-8 bytes the scored tokens stand for, or None when not counted.
    seconds: wall time of the scoring (model and log-softmax), excluding tokenization.
    running_ppl: PPL over all chunks up to and including each chunk (llama.cpp's [i] values).
    """

    nll_sum: float = 0.0
    nll_sq_sum: float = 0.0
    count: int = 0
    n_tokens: int = 0
    n_chunks: int = 0
    n_bytes: Optional[int] = None
    seconds: float = 0.0
    running_ppl: list[float] = field(default_factory=list)

    @property
    def mean_nll(self) -> float:
        """Mean negative log-likelihood per scored token, in nats."""
        return self.nll_sum / self.count if self.count else float("nan")

    @property
    def ppl(self) -> float:
        """Perplexity: exp(mean NLL)."""
        return math.exp(self.mean_nll) if self.count else float("nan")

    @property
    def nll_stderr(self) -> float:
        """Standard error of the mean NLL: sqrt((E[nll^2] - E[nll]^2) / (count - 1)) (nan below 2 tokens)."""
        if self.count < 2:
            return float("nan")
        mean = self.nll_sum / self.count
        # E[x^2] - E[x]^2 can come out a rounding error below zero when every NLL is equal
        variance = max(self.nll_sq_sum / self.count - mean * mean, 0.0)
        return math.sqrt(variance / (self.count - 1))

    @property
    def stderr(self) -> float:
        """Standard error of the PPL: the mean NLL's carried through exp to first order
        (d exp(x) = exp(x) dx), as llama-perplexity prints after ``+/-``."""
        return self.nll_stderr * self.ppl

    @property
    def bits_per_byte(self) -> Optional[float]:
        """nll_sum / ln 2 / n_bytes: the text's code length per byte, comparable across
        tokenizers (None when bytes were not counted)."""
        if not self.n_bytes:
            return None
        return self.nll_sum / math.log(2) / self.n_bytes

    @property
    def tokens_per_second(self) -> float:
        """Tokens fed through the model per second of scoring."""
        return self.n_tokens / self.seconds if self.seconds > 0 else float("nan")


def chunk_bounds(n_tokens: int, ctx: int) -> list[tuple[int, int]]:
    """[begin, end) of each chunk: consecutive runs of ctx tokens, the last kept only with >= 2 tokens."""
    bounds = [(begin, min(begin + ctx, n_tokens)) for begin in range(0, n_tokens, ctx)]
    return [(begin, end) for begin, end in bounds if end - begin >= 2]


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-ln softmax(logits[i])[targets[i]] for each row, float64 (n,).

    logits: float32 (n, n_vocab). As llama.cpp: exp of (logit - row max) in float32, its
    sum, the log and the NLL in float64. Against an all-float64 log-softmax of the same
    logits it differs by ~1e-8 (measured on 128 rows of 50277 random logits, sd 3), at
    a third less time.
    """
    n, n_vocab = logits.shape
    rows = max(1, _BLOCK_BYTES // (4 * n_vocab))
    lse = np.empty(n, dtype=np.float64)
    buf = np.empty((min(rows, n), n_vocab), dtype=np.float32)
    for a in range(0, n, rows):
        block = logits[a:a + rows]
        top = block.max(axis=1)
        e = buf[:len(block)]
        np.subtract(block, top[:, None], out=e)
        np.exp(e, out=e)
        lse[a:a + len(block)] = np.log(e.sum(axis=1, dtype=np.float64)) + top
    return lse - logits[np.arange(n), targets]


def byte_counter(tokenizer) -> Callable[[Sequence[int]], int]:
    """A function giving the number of UTF-8 bytes a list of tokens stands for.

    Tokenizers with a byte per id (bytes, World, byte-level BPE such as the 20B tokenizer)
    count each token's own bytes, exactly; any other decodes the tokens and counts the
    bytes of that text.
    """
    token_bytes = getattr(tokenizer, "token_bytes", None)
    if token_bytes is not None:
        try:
            token_bytes(0)
        except TokenizerError:  # an HF tokenizer that is not byte-level
            token_bytes = None
    if token_bytes is None:
        return lambda tokens: len(tokenizer.decode(list(tokens)).encode("utf-8"))
    lengths: dict[int, int] = {}

    def count(tokens: Sequence[int]) -> int:
        ids, counts = np.unique(np.asarray(tokens, dtype=np.int64), return_counts=True)
        total = 0
        for token, times in zip(ids.tolist(), counts.tolist()):
            if token not in lengths:
                lengths[token] = len(token_bytes(token))
            total += lengths[token] * times
        return total
    return count


def perplexity(model, tokens: Sequence[int], ctx: int = DEFAULT_CTX, carry_state: bool = False, *,
               count_bytes: Optional[Callable[[Sequence[int]], int]] = None,
               on_chunk: Optional[Callable[[PerplexityResult], None]] = None) -> PerplexityResult:
    """Score tokens with model by the protocol in this module's docstring.

    model: an :class:`rwkvx.RWKV` (anything with n_vocab, chunk_size and forward(tokens,
    state, all_logits=True)). tokens: the text's token ids. ctx: tokens per chunk, >= 2.
    carry_state: start each chunk from the previous chunk's state instead of a fresh one.
    count_bytes: called with each chunk's scored tokens (all but its first), returns the
    UTF-8 bytes they stand for (see :func:`byte_counter`); these are the bytes of
    bits_per_byte, so that it measures exactly the text that was scored. None: not counted.
    on_chunk: called after each chunk with the result so far.

    Memory: the logits of at most model.chunk_size tokens at a time (the chunk is fed in
    pieces of that size; a state carries across pieces, which gives the same logits as one
    call). Raises RwkvxError for ctx < 2, fewer than 2 tokens, or a token id out of range.
    """
    if isinstance(ctx, bool) or not isinstance(ctx, (int, np.integer)) or ctx < 2:
        raise RwkvxError(f"ctx: expected an integer >= 2, got {ctx!r}")
    ids = np.asarray(tokens)
    if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
        raise RwkvxError("tokens: expected a sequence of token ids")
    if ids.size < 2:
        raise RwkvxError(f"tokens: perplexity needs at least 2 tokens, got {ids.size}")
    if ids.min() < 0 or ids.max() >= model.n_vocab:
        bad = int(ids[(ids < 0) | (ids >= model.n_vocab)][0])
        raise RwkvxError(f"token id {bad} out of range: the vocabulary has ids 0..{model.n_vocab - 1}")
    ids = ids.astype(np.int64)
    step = max(1, int(model.chunk_size))

    result = PerplexityResult(n_bytes=0 if count_bytes is not None else None)
    state = None
    start = time.perf_counter()
    for begin, end in chunk_bounds(len(ids), ctx):
        chunk = ids[begin:end]
        if not carry_state:
            state = None
        for a in range(0, len(chunk), step):
            piece = chunk[a:a + step]
            logits, state = model.forward(piece.tolist(), state, all_logits=True)
            # row i (chunk position a + i) scores chunk[a + i + 1]; the chunk's last row has nothing to score
            targets = chunk[a + 1:a + 1 + len(piece)]
            if len(targets):
                nll = token_nll(logits[:len(targets)], targets)
                result.nll_sum += float(nll.sum())
                result.nll_sq_sum += float(np.dot(nll, nll))
                result.count += len(targets)
        result.n_tokens += len(chunk)
        result.n_chunks += 1
        if count_bytes is not None:
            result.n_bytes += int(count_bytes(chunk[1:].tolist()))
        result.running_ppl.append(result.ppl)
        result.seconds = time.perf_counter() - start
        if on_chunk is not None:
            on_chunk(result)
    return result


# ---- command line -----------------------------------------------------------------------

_PROTOCOL = """\
protocol (llama-perplexity's output, but every token after a chunk's first is scored,
where llama-perplexity scores each chunk's second half: the numbers are not comparable):
  The text is tokenized once and split into consecutive chunks of --ctx tokens; a last,
  shorter chunk is kept when it has at least 2 tokens. Each chunk starts from a fresh
  state (--carry-state: from the previous chunk's state). Inside a chunk the logits after
  token i score token i+1, so a chunk of n tokens scores n-1 tokens (in both modes).
  PPL = exp(mean negative log-likelihood over all scored tokens); the +/- is the standard
  error of the mean NLL carried through exp (SE * PPL), as llama-perplexity prints it.
  Bits per byte = total NLL in nats / ln 2 / the UTF-8 bytes of the scored tokens (each
  chunk's first token is not scored, so its bytes are not counted either; with a
  tokenizer that is not byte-level, the bytes of the scored tokens' decoded text).

output:
  stdout: the running PPL after each chunk ([1]x,[2]y,...), a line with the tokens
  scored, bits per byte and tokens/s, and last 'Final estimate: PPL = x +/- y'.
  --json prints one JSON object instead (running values then go to stderr).
  stderr: the load line, the text's size and the chunking, the time per chunk.

memory: the model's weights and state, and the logits of at most -b tokens (default 128)
at a time: a chunk is fed in pieces of -b tokens, never the whole text's logits."""


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="python -m rwkvx.perplexity",
        description="Measure a model's perplexity on a text; output as llama.cpp's llama-perplexity prints it.",
        epilog=_PROTOCOL,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(p)
    p.add_argument("-f", "--file", required=True, metavar="PATH",
                   help="the text to score, UTF-8 ('-' for stdin)")
    p.add_argument("--ctx", type=int_at_least(2), default=DEFAULT_CTX, metavar="N",
                   help="tokens per chunk (default: %(default)s)")
    p.add_argument("--carry-state", action="store_true",
                   help="start each chunk from the state the previous one left, instead of a fresh state")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    return p


def _read_text(path: str) -> bytes:
    text = read_text(path)
    if not text:
        raise RwkvxError(f"{'stdin' if path == '-' else path}: the text is empty")
    return text.encode("utf-8")


def _finite(x: Optional[float]) -> Optional[float]:
    # JSON has no NaN: a value that could not be computed is null
    return x if x is not None and math.isfinite(x) else None


def _run(args) -> int:
    data = _read_text(args.file)
    name = "stdin" if args.file == "-" else args.file
    model, tokenizer, load_seconds = load_model(args)
    start = time.perf_counter()
    tokens = tokenizer.encode(data.decode("utf-8"))
    tokenize_seconds = time.perf_counter() - start
    if len(tokens) < 2:
        raise RwkvxError(f"{name}: the text is {len(tokens)} token{'s' * (len(tokens) != 1)} long; "
                         "perplexity needs at least 2 tokens")
    log(model_summary(args, model, load_seconds))
    bounds = chunk_bounds(len(tokens), args.ctx)
    n_chunks = len(bounds)
    dropped = len(tokens) - bounds[-1][1]
    mode = "each from the previous chunk's state" if args.carry_state else "each from a fresh state"
    log(f"{name}: {len(data)} bytes, {len(tokens)} tokens (tokenized in {tokenize_seconds:.2f} s); "
        f"{n_chunks} chunk{'s' * (n_chunks != 1)} of up to {args.ctx} tokens, {mode}; "
        f"scoring {bounds[-1][1] - n_chunks} tokens"
        + (" (the last token, alone in its chunk, is not fed)" if dropped else ""))

    progress = sys.stderr if args.json else sys.stdout

    def on_chunk(result: PerplexityResult) -> None:
        if result.n_chunks == 1 and n_chunks > 1:
            log(f"{result.seconds:.2f} seconds per chunk, ETA {result.seconds * (n_chunks - 1) / 60:.2f} minutes")
        progress.write(f"[{result.n_chunks}]{result.running_ppl[-1]:.4f},")
        progress.flush()

    result = perplexity(model, tokens, args.ctx, args.carry_state, count_bytes=byte_counter(tokenizer),
                        on_chunk=on_chunk)
    progress.write("\n")
    progress.flush()
    bpb = result.bits_per_byte
    if args.json:
        print(json.dumps({
            "model": str(args.model), "file": name, "dtype": model.dtype, "threads": model.n_threads,
            "ctx": args.ctx, "carry_state": args.carry_state,
            "n_tokens": len(tokens), "n_chunks": result.n_chunks, "n_scored": result.count,
            "n_bytes": result.n_bytes,
            "ppl": _finite(result.ppl), "ppl_stderr": _finite(result.stderr),
            "nll_mean": _finite(result.mean_nll), "nll_stderr": _finite(result.nll_stderr),
            "nll_sum": _finite(result.nll_sum), "bits_per_byte": _finite(bpb),
            "seconds": result.seconds, "tokens_per_second": _finite(result.tokens_per_second),
            "running_ppl": [_finite(x) for x in result.running_ppl],
        }))
    else:
        bpb_text = f"{bpb:.4f} bits per byte ({result.n_bytes} bytes)" if bpb is not None else "bits per byte -"
        print(f"{result.count} tokens scored in {result.n_chunks} chunk{'s' * (result.n_chunks != 1)} "
              f"of {args.ctx}: {bpb_text}, {result.tokens_per_second:.1f} tokens/s")
        print(f"Final estimate: PPL = {result.ppl:.4f} +/- {result.stderr:.5f}")
    sys.stdout.flush()
    log(f"{result.n_tokens} tokens through the model in {result.seconds:.2f} s "
        f"({result.tokens_per_second:.1f} tokens/s); peak RSS {peak_rss_mb():.0f} MB")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 failure, 2 bad input)."""
    return run_main(lambda: _run(build_parser().parse_args(argv)),
                    out_of_memory_hint=" (try --dtype uint8, a smaller --ctx or -b)")


if __name__ == "__main__":
    raise SystemExit(main())
