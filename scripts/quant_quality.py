"""What each weight format costs in quality: KL divergence from the float32 run, top-1
agreement with it, and held-out loss, as a Markdown table.

    python scripts/quant_quality.py                      (the demo model on its held-out text)
    python scripts/quant_quality.py -m tiny-rwkv-660K-FP32.bin --dtypes float32,uint8 --simulate int8:32,uint8:64

Protocol. The text is tokenized once and read as one sequence from a fresh state, in pieces
of -b tokens with the state carried (sequence mode, as rwkvx.perplexity with a --ctx as long
as the text); the logits after token i score token i+1, so every token but the first is
scored. For each format the float32 model and the format's model read the text side by side,
piece by piece, so no float32 logits are stored: memory is the two models and two pieces of
logits. Per scored token, with p the float32 model's next-token distribution and q the
format's (log-softmax in float64):

    KL(p || q) = sum_v p(v) (ln p(v) - ln q(v))   in nats, averaged per scored token, and
                                                  summed and divided by the scored bytes
    top-1      = argmax p == argmax q             (fraction of scored tokens)
    bits/byte  = -sum ln q(next token) / ln 2 / the UTF-8 bytes of the scored tokens
    PPL        = exp(mean -ln q(next token))

bits/weight: the bytes of the matrices the format converts (every layer's big matrices
and the head; not the embedding, which stays as stored, nor the float32 vectors and
low-rank matrices), times 8, over their number of weights.

Formats: every dtype rwkvx.load accepts (rwkvx.loader.DTYPES), and DTYPE:ARITHMETIC for the
other arithmetics load offers (rwkvx.model.ARITHMETICS: uint8:int8 rounds the inputs of
products of 2+ rows, which is what this runs, to int8); all of them are the default list. With
--simulate candidate formats that have no kernel: their weights are quantised and
dequantised in numpy, and the float32 model runs with the dequantised matrices (the error
is the format's; the arithmetic is float32's). Simulated specs are
KIND:GROUP[:SCALE][:head=f32|f16]:

    intB:G     B-bit codes (B = 2..8), symmetric absmax in groups of G weights along the
               input dimension (a row's G consecutive entries): q = round(w / d) in
               -k..k, d = max|w| / k, k = 2^(B-1) - 1 (127 for int8); int8:32 is ggml's
               Q8_0 weights (ggml's kernels also round the input vector to 8 bits, which
               this does not simulate)
    uintB:G    asymmetric min-max per group: q = round((w - m) / d) in 0..k, m = min w,
               d = (max w - m) / k, k = 2^B - 1 (255 for uint8); uint4:32 is ggml's Q4_1
    G          a group size >= 1, or "row" for one group per row
    SCALE      f16 (default) or f32: how d (and m) are stored; f16 values are rounded away
               from the group's values (d up, m down), so no weight is clipped
    uint8:rowcol   rwkvx's uint8 format itself (rwkvx.quant), to check the simulation
               against the real uint8 kernels
    q4         rwkvx's q4 format (rwkvx.quant.quantize_q4), before the loader reads it
    :head=f32, :head=f16   appended to any spec: the head matrix is kept in that precision
               instead (rwkv.cpp never quantises the head)
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

import rwkvx
from rwkvx._cli import EXIT_OK, Parser, int_at_least, log, read_text, run_main
from rwkvx.errors import RwkvxError
from rwkvx.loader import DTYPES
from rwkvx.model import ARITHMETICS, check_arithmetic, split_format
from rwkvx.perplexity import PerplexityResult, byte_counter
from rwkvx.quant import quantize_u8
from rwkvx.tokenizer import default_tokenizer, load_tokenizer
from rwkvx.weights import MATRIX_NAMES

# log-softmax in float64 on row blocks of about this many bytes per model
_BLOCK_BYTES = 1 << 21


# ---- the matrices a format converts ---------------------------------------------------


def matrix_names(weights) -> tuple[str, ...]:
    """Names of the block matrices that run in the model's dtype: RWKV-4's MATRIX_NAMES, or
    the architecture's LINEAR for RWKV-5.2/6/7 (their low-rank matrices stay float32)."""
    arch = getattr(weights, "arch", None)
    return tuple(arch.LINEAR) if arch is not None else MATRIX_NAMES


def converted_matrices(weights) -> list:
    """Every matrix the dtype converts, in order: each block's, then the head."""
    names = matrix_names(weights)
    return [block[name] for block in weights.blocks for name in names] + [weights.head]


def bits_per_weight(model, reference) -> float:
    """8 x the bytes of model's converted matrices (quantised: codes and scales) / their
    weights, counted on the float32 reference (which holds the same matrices unpacked)."""
    n_weights = sum(m.size for m in converted_matrices(reference.weights))
    n_bytes = sum(m.nbytes for m in converted_matrices(model.weights))
    return 8 * n_bytes / n_weights


# ---- simulated formats ------------------------------------------------------------------


def _stored(x: np.ndarray, scale: str, direction: float) -> np.ndarray:
    """x (float32) as stored in `scale` precision, rounded toward `direction` (+inf: up, -inf:
    down) where rounding to nearest went the other way, back in float32."""
    if scale == "f32":
        return x.astype(np.float32)
    h = x.astype(np.float16)
    wrong = h.astype(np.float32) < x if direction > 0 else h.astype(np.float32) > x
    h[wrong] = np.nextafter(h[wrong], np.float16(direction))
    return h.astype(np.float32)


_NATIVE_LABELS = {"uint8": "uint8 row/col min-max", "q4": "q4"}


def _native_quantizer(name: str):
    import rwkvx.quant
    return {"uint8": quantize_u8, "q4": getattr(rwkvx.quant, "quantize_q4", None)}[name]


@dataclass(frozen=True)
class SimFormat:
    """A candidate format simulated in numpy (see the module docstring for the specs)."""

    kind: str            # "int" (symmetric absmax) or "uint" (asymmetric min-max)
    bits: int            # code width, 2..8
    group: Optional[int]  # weights per group along a row; None: the whole row
    scale: str = "f16"   # "f16" or "f32"
    native: Optional[str] = None  # "uint8" or "q4": rwkvx's own format, by rwkvx.quant's quantiser
    head: Optional[str] = None  # "f32" or "f16": the head kept in that precision; None: quantised

    @property
    def label(self) -> str:
        """Short name for the table, e.g. 'int8 absmax g32 f16 (sim)'."""
        head = f", head {self.head}" if self.head else ""
        if self.native:
            return f"{_NATIVE_LABELS[self.native]}{head} (sim)"
        rule = "absmax" if self.kind == "int" else "min-max"
        group = "row" if self.group is None else f"g{self.group}"
        return f"{self.kind}{self.bits} {rule} {group} {self.scale}{head} (sim)"

    def _grouped(self, w: np.ndarray) -> np.ndarray:
        """w (n_rows, n_cols) as (n_rows, n_groups, g); a last partial group is padded with
        copies of its last weight, which changes neither its min, max nor absmax."""
        n_rows, n_cols = w.shape
        g = n_cols if self.group is None else min(self.group, n_cols)
        n_groups = -(-n_cols // g)
        padded = np.pad(w, ((0, 0), (0, n_groups * g - n_cols)), mode="edge")
        return padded.reshape(n_rows, n_groups, g)

    def apply(self, w: np.ndarray) -> tuple[np.ndarray, int]:
        """(the float32 matrix a kernel of this format would compute with, the format's bytes)
        for float32 w."""
        if self.native:
            m = _native_quantizer(self.native)(np.ascontiguousarray(w, dtype=np.float32))
            return m.dequantize(), m.nbytes
        return self.dequantize(w), self.nbytes(w.shape)

    def dequantize(self, w: np.ndarray) -> np.ndarray:
        """The float32 matrix of a group format (not native) from float32 w."""
        w = np.ascontiguousarray(w, dtype=np.float32)
        out = np.empty_like(w)
        # rows in blocks of about 4M weights: the temporaries are a few times the block
        rows = max(1, (1 << 22) // w.shape[1])
        for a in range(0, w.shape[0], rows):
            out[a:a + rows] = self._dequantize_rows(w[a:a + rows])
        return out

    def _dequantize_rows(self, w: np.ndarray) -> np.ndarray:
        x = self._grouped(w)
        if self.kind == "int":
            k = 2 ** (self.bits - 1) - 1
            d = _stored(np.abs(x).max(axis=2, keepdims=True) / np.float32(k), self.scale, math.inf)
            q = np.clip(np.rint(x / np.where(d > 0, d, 1)), -k, k)
            out = q * d
        else:
            m = _stored(x.min(axis=2, keepdims=True), self.scale, -math.inf)
            k = 2 ** self.bits - 1
            d = _stored((x.max(axis=2, keepdims=True) - m) / np.float32(k), self.scale, math.inf)
            q = np.clip(np.rint((x - m) / np.where(d > 0, d, 1)), 0, k)
            out = q * d + m
        return out.reshape(w.shape[0], -1)[:, :w.shape[1]]

    def nbytes(self, shape: tuple[int, int]) -> int:
        """Bytes a (n_rows, n_cols) matrix takes in a group format: bits/8 bytes a weight
        (rows padded to whole bytes) plus the groups' scales (and minima, for uint)."""
        n_rows, n_cols = shape
        g = n_cols if self.group is None else min(self.group, n_cols)
        per_group = (2 if self.scale == "f16" else 4) * (1 if self.kind == "int" else 2)
        return n_rows * -(-n_cols * self.bits // 8) + n_rows * -(-n_cols // g) * per_group


def parse_sim_format(spec: str) -> SimFormat:
    """A --simulate spec (KIND:GROUP[:SCALE], uint8:rowcol or q4; then :head=f32|f16 if
    wanted) as a SimFormat; RwkvxError if bad."""
    usage = (f"--simulate: expected KIND:GROUP[:SCALE][:head=f32|f16] (int8:32, uint8:64:f32, int8:row, "
             f"uint4:32, uint8:rowcol:head=f16, q4), got {spec!r}")
    parts = spec.strip().split(":")
    head = None
    if parts and parts[-1].startswith("head="):
        head = parts.pop()[len("head="):]
        if head not in ("f32", "f16"):
            raise RwkvxError(f"--simulate: head={head} in {spec!r}: expected head=f32 or head=f16")
    if parts == ["q4"]:
        if _native_quantizer("q4") is None:
            raise RwkvxError("--simulate: this rwkvx has no q4 format (rwkvx.quant.quantize_q4)")
        return SimFormat("uint", 4, None, "f16", native="q4", head=head)
    kind = re.fullmatch(r"(u?int)([2-8])", parts[0]) if parts else None
    if len(parts) not in (2, 3) or kind is None:
        raise RwkvxError(usage)
    group_text = parts[1]
    scale = parts[2] if len(parts) == 3 else "f16"
    if scale not in ("f16", "f32"):
        raise RwkvxError(f"--simulate: scale {scale!r} in {spec!r}: expected f16 or f32")
    if group_text == "rowcol":
        if parts[0] != "uint8" or len(parts) != 2:
            raise RwkvxError(f"--simulate: 'rowcol' is rwkvx's uint8 format: write uint8:rowcol, got {spec!r}")
        return SimFormat("uint", 8, None, "f32", native="uint8", head=head)
    if group_text == "row":
        return SimFormat(kind[1], int(kind[2]), None, scale, head=head)
    if not group_text.isdigit() or int(group_text) < 1:
        raise RwkvxError(f"--simulate: group {group_text!r} in {spec!r}: expected an integer >= 1 or 'row'")
    return SimFormat(kind[1], int(kind[2]), int(group_text), scale, head=head)


@dataclass
class SimulatedWeights:
    """Stands in for a quantised matrix in bits_per_weight: its size and the format's bytes."""

    size: int
    nbytes: int


def simulated_model(reference, fmt: SimFormat, only: Optional[Sequence[str]] = None):
    """A float32 model like reference (sharing its vectors and embedding) whose converted
    matrices are fmt's dequantised ones, and the sizes of fmt's matrices (SimulatedWeights).

    only: the matrix names (matrix_names(), and "head") fmt converts; the others stay
    float32 (and count 4 bytes a weight). None: all of them.
    """
    w = reference.weights
    names = matrix_names(w)
    chosen = set(names) | {"head"} if only is None else set(only)
    sizes = []

    def convert(m, name):
        if name not in chosen:
            sizes.append(SimulatedWeights(m.size, 4 * m.size))
            return m
        value, nbytes = fmt.apply(m)
        sizes.append(SimulatedWeights(m.size, nbytes))
        return value

    blocks = [{name: (convert(value, name) if name in names else value) for name, value in block.items()}
              for block in w.blocks]
    if fmt.head == "f32":
        head = w.head
        sizes.append(SimulatedWeights(w.head.size, 4 * w.head.size))
    elif fmt.head == "f16":
        head = w.head.astype(np.float16).astype(np.float32)
        sizes.append(SimulatedWeights(w.head.size, 2 * w.head.size))
    else:
        head = convert(w.head, "head")
    weights = dataclasses.replace(w, blocks=blocks, head=head)
    model = type(reference)(weights, threads=reference.n_threads)
    model.chunk_size = reference.chunk_size
    return model, sizes


# ---- the comparison ---------------------------------------------------------------------


@dataclass
class Comparison:
    """What :func:`compare` measured. loss: the model's own NLL, scored tokens and bytes
    (rwkvx.perplexity's accounting: ppl, bits_per_byte); kl_sum: sum over scored tokens of
    KL(reference || model) in nats; n_agree: scored tokens where both models' most likely
    next token is the same."""

    loss: PerplexityResult = field(default_factory=PerplexityResult)
    kl_sum: float = 0.0
    n_agree: int = 0

    @property
    def count(self) -> int:
        return self.loss.count

    @property
    def kl_per_token(self) -> float:
        return self.kl_sum / self.count if self.count else float("nan")

    @property
    def kl_per_byte(self) -> Optional[float]:
        return self.kl_sum / self.loss.n_bytes if self.loss.n_bytes else None

    @property
    def top1(self) -> float:
        return self.n_agree / self.count if self.count else float("nan")


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    z -= np.log(np.exp(z).sum(axis=1, keepdims=True))
    return z


def score_rows(ref_logits: Optional[np.ndarray], logits: np.ndarray, targets: np.ndarray,
               result: Comparison) -> None:
    """Add rows of logits (float32 (n, n_vocab), the next tokens `targets` (n,)) to result,
    compared with the reference's rows ref_logits (None: the same model)."""
    n, n_vocab = logits.shape
    rows = max(1, _BLOCK_BYTES // (8 * n_vocab))
    same = ref_logits is None
    for a in range(0, n, rows):
        lq = _log_softmax(logits[a:a + rows])
        nll = -lq[np.arange(len(lq)), targets[a:a + rows]]
        result.loss.nll_sum += float(nll.sum())
        result.loss.nll_sq_sum += float(np.dot(nll, nll))
        if same:
            result.n_agree += len(lq)
            continue
        lp = _log_softmax(ref_logits[a:a + rows])
        result.kl_sum += float((np.exp(lp) * (lp - lq)).sum())
        result.n_agree += int((ref_logits[a:a + rows].argmax(axis=1) == logits[a:a + rows].argmax(axis=1)).sum())
    result.loss.count += n


def compare(reference, model, tokens: Sequence[int], *,
            count_bytes: Optional[Callable[[Sequence[int]], int]] = None) -> Comparison:
    """KL(reference || model), top-1 agreement and model's loss over tokens read as one sequence.

    Both models read the tokens from a fresh state in pieces of reference.chunk_size, state
    carried, side by side; every token after the first is scored. model may be reference
    itself (then it runs once; KL 0 and agreement 1). count_bytes: as in
    rwkvx.perplexity.perplexity, called once with the scored tokens. Raises RwkvxError when
    the vocabularies differ or there are fewer than 2 tokens.
    """
    if model.n_vocab != reference.n_vocab:
        raise RwkvxError(f"the models' vocabularies differ: {reference.n_vocab} and {model.n_vocab} tokens")
    ids = np.asarray(tokens, dtype=np.int64)
    if ids.ndim != 1 or len(ids) < 2:
        raise RwkvxError(f"tokens: expected at least 2 token ids, got {len(ids)}")
    result = Comparison()
    step = max(1, int(reference.chunk_size))
    ref_state = state = None
    start = time.perf_counter()
    for a in range(0, len(ids) - 1, step):
        piece = ids[a:a + step].tolist()
        targets = ids[a + 1:a + 1 + len(piece)]
        ref_logits, ref_state = reference.forward(piece, ref_state, all_logits=True)
        if model is reference:
            score_rows(None, ref_logits[:len(targets)], targets, result)
        else:
            logits, state = model.forward(piece, state, all_logits=True)
            score_rows(ref_logits[:len(targets)], logits[:len(targets)], targets, result)
    result.loss.n_tokens = len(ids)
    result.loss.n_chunks = 1
    if count_bytes is not None:
        result.loss.n_bytes = int(count_bytes(ids[1:].tolist()))
    result.loss.seconds = time.perf_counter() - start
    return result


# ---- command line -----------------------------------------------------------------------


def default_text() -> str:
    """The demo model's held-out text (scripts/demo_corpus.py beside this file): never trained on."""
    module = sys.modules.get("demo_corpus")
    if module is None:
        import importlib.util
        spec = importlib.util.spec_from_file_location("demo_corpus", Path(__file__).with_name("demo_corpus.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
    return module.build_corpus().heldout.decode("utf-8")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python scripts/quant_quality.py",
               description="KL divergence from float32, top-1 agreement and held-out loss of each weight format.",
               epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", default="demo", metavar="PATH",
                   help="checkpoint, or 'demo' for the packaged demo model (default: %(default)s)")
    p.add_argument("-f", "--file", metavar="PATH",
                   help="the text, UTF-8 ('-' for stdin) (default: the demo model's held-out text)")
    p.add_argument("--dtypes", metavar="LIST",
                   help="comma-separated dtypes rwkvx.load accepts, DTYPE or DTYPE:ARITHMETIC, measured as "
                        f"loaded (default: {','.join(_all_dtypes())}, leaving out any this model cannot be "
                        "loaded in)")
    p.add_argument("--simulate", default="", metavar="LIST",
                   help="comma-separated simulated formats, KIND:GROUP[:SCALE] (see below)")
    p.add_argument("--matrices", metavar="LIST",
                   help="simulated formats convert only these matrices (e.g. att_output,head: which matrices "
                        "cost the most); the others stay float32 (default: all)")
    p.add_argument("--tokenizer", metavar="PATH",
                   help="tokenizer as in python -m rwkvx.run (default: by the model's vocabulary)")
    p.add_argument("-t", "--threads", type=int_at_least(1), metavar="N", help="kernel threads")
    p.add_argument("-b", "--batch-size", type=int_at_least(1), default=128, metavar="N",
                   help="tokens per piece (default: %(default)s)")
    return p


def _all_dtypes() -> list[str]:
    """Every dtype, then every dtype:arithmetic load accepts besides float32 arithmetic."""
    out = list(DTYPES)
    for arithmetic in ARITHMETICS[1:]:
        for dtype in DTYPES:
            try:
                check_arithmetic(arithmetic, dtype)
            except RwkvxError:
                continue
            out.append(f"{dtype}:{arithmetic}")
    return out


def _formats(args) -> list:
    dtypes = _all_dtypes() if args.dtypes is None else [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for d in dtypes:
        try:
            split_format(d)
        except RwkvxError as e:
            raise RwkvxError(f"--dtypes: {e}") from None
    sims = [parse_sim_format(s) for s in args.simulate.split(",") if s.strip()]
    if not dtypes and not sims:
        raise RwkvxError("nothing to measure: --dtypes and --simulate are both empty")
    return list(dict.fromkeys(dtypes)) + list(dict.fromkeys(sims))


def _number(x: Optional[float], digits: int) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    return f"{x:.{digits}f}"


def _kl(x: Optional[float]) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    return "0" if x == 0 else f"{x:.2e}"


def _run(args) -> int:
    formats = _formats(args)
    text = default_text() if args.file is None else read_text(args.file)
    name = "the demo's held-out text" if args.file is None else ("stdin" if args.file == "-" else args.file)
    if not text:
        raise RwkvxError(f"{name}: the text is empty")
    reference = rwkvx.load(args.model, "float32", args.threads)
    reference.chunk_size = args.batch_size
    tokenizer = load_tokenizer(args.tokenizer or default_tokenizer(args.model, reference.n_vocab), reference.n_vocab)
    tokens = tokenizer.encode(text)
    if len(tokens) < 2:
        raise RwkvxError(f"{name}: {len(tokens)} token{'s' * (len(tokens) != 1)}; the comparison needs at least 2")
    count_bytes = byte_counter(tokenizer)
    only = None
    if args.matrices is not None:
        known = (*matrix_names(reference.weights), "head")
        only = [m.strip() for m in args.matrices.split(",") if m.strip()]
        unknown = [m for m in only if m not in known]
        if unknown or not only:
            raise RwkvxError(f"--matrices: {', '.join(map(repr, unknown)) or 'none given'}: expected names among "
                             f"{', '.join(known)}")
    log(f"{args.model}: {reference.architecture}, {reference.n_layer} layers, {reference.n_embd} wide, "
        f"vocabulary {reference.n_vocab}; {name}: {len(text.encode('utf-8'))} bytes, {len(tokens)} tokens")

    rows = []
    for fmt in formats:
        start = time.perf_counter()
        if isinstance(fmt, SimFormat):
            model, sizes = simulated_model(reference, fmt, only)
            n_weights = sum(s.size for s in sizes)
            bits = 8 * sum(s.nbytes for s in sizes) / n_weights
            label = fmt.label if only is None else f"{fmt.label} on {','.join(only)}"
        elif fmt == "float32":
            model, bits, label = reference, bits_per_weight(reference, reference), "float32"
        else:
            dtype, arithmetic = split_format(fmt)
            try:
                model = rwkvx.load(args.model, dtype, args.threads, arithmetic=arithmetic)
            except RwkvxError as e:
                if args.dtypes is not None:
                    raise
                log(f"{fmt}: left out: {e}")
                continue
            model.chunk_size = args.batch_size
            bits = bits_per_weight(model, reference)
            label = dtype if arithmetic == "float32" else f"{dtype}, {arithmetic} arithmetic"
        result = compare(reference, model, tokens, count_bytes=count_bytes)
        del model
        log(f"{label}: {time.perf_counter() - start:.1f} s")
        rows.append((label, bits, result))

    if not rows:
        raise RwkvxError(f"none of the formats asked for loads {args.model}")
    n_weights = sum(m.size for m in converted_matrices(reference.weights))
    n_bytes = rows[0][2].loss.n_bytes
    print(f"{args.model} on {name}: {rows[0][2].count} tokens scored ({n_bytes} bytes), state carried; "
          f"KL(float32 || format) in nats; bits/weight over the {n_weights:,} weights of the converted matrices\n")
    print("| format | bits/weight | KL per token | KL per byte | top-1 agreement | bits/byte | PPL |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, bits, r in rows:
        print(f"| {label} | {bits:.3f} | {_kl(r.kl_per_token)} | {_kl(r.kl_per_byte)} | {r.top1:.4f} | "
              f"{_number(r.loss.bits_per_byte, 4)} | {_number(r.loss.ppl, 4)} |")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 failure, 2 bad input)."""
    return run_main(lambda: _run(build_parser().parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
