"""Per-token decode speed: rwkvx float32 and uint8 against a plain numpy/OpenBLAS baseline.

    python scripts/bench_decode.py [--layers 12 --embd 768 --vocab 50277] [--threads 2]
                                   [--tokens 32] [--runs 5] [--model PATH]

Without --model it writes a random checkpoint of the given shape (default: RWKV-4 169M's)
to a temporary directory, deleted at the end. It loads rwkvx float32 and uint8 models and
builds the numpy baseline (scripts/numpy_rwkv.py) on the float32 model's own arrays.
Every candidate is warmed up, then each of --runs rounds decodes --tokens tokens with each
candidate in turn (round-robin, the starting candidate rotating per round), one forward()
per token. Reported: median ms/token over rounds [min-max], tokens/s, and effective weight
bandwidth (weight bytes read per token / median time), a markdown table, the ratios the
issue asks for, a logits sanity check, one JSON line per candidate, and peak RSS.

Speed is measured, not asserted: the exit status does not depend on the ratios.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time

# scripts/ is first on sys.path when a script runs
from _args import positive_int

# RWKV-4 169M (RWKV-4-Pile-169M): 12 layers, n_embd 768, GPT-NeoX vocabulary
DEFAULT_SHAPE = {"layers": 12, "embd": 768, "vocab": 50277}
WARMUP_TOKENS = 4
# OpenBLAS workers spin ~0.1 s and OpenMP workers a few ms after a call before sleeping;
# pausing between candidates keeps one pool's spinning from stealing the other's cores
PAUSE_S = 0.2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench_decode",
        description="Per-token decode: rwkvx float32 and uint8 vs numpy (OpenBLAS W @ x), interleaved.")
    shape = parser.add_argument_group("random model shape (default RWKV-4 169M; not with --model)")
    shape.add_argument("--layers", type=positive_int, default=None, help=f"n_layer (default {DEFAULT_SHAPE['layers']})")
    shape.add_argument("--embd", type=positive_int, default=None, help=f"n_embd (default {DEFAULT_SHAPE['embd']})")
    shape.add_argument("--vocab", type=positive_int, default=None, help=f"n_vocab (default {DEFAULT_SHAPE['vocab']})")
    parser.add_argument("--model", metavar="PATH", default=None,
                        help="benchmark this checkpoint (safetensors or rwkv.cpp .bin) instead of a random one")
    parser.add_argument("--threads", type=positive_int, default=2,
                        help="threads for rwkvx and for OpenBLAS (default 2)")
    parser.add_argument("--tokens", type=positive_int, default=32, help="decode tokens per round (default 32)")
    parser.add_argument("--runs", type=positive_int, default=5, help="rounds; the median is reported (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and token ids (default 0)")
    return parser


def _limit_blas_threads(n_threads: int) -> None:
    # OpenBLAS reads these once, when numpy loads it: this must run before `import numpy`.
    # OMP_NUM_THREADS also covers an OpenMP-built OpenBLAS; rwkvx gets threads= explicitly.
    if "numpy" in sys.modules:
        raise RuntimeError("bench_decode: numpy was imported before the BLAS thread limit was set")
    os.environ["OPENBLAS_NUM_THREADS"] = str(n_threads)
    os.environ["OMP_NUM_THREADS"] = str(n_threads)


def _threadpool_limit(n_threads: int) -> str:
    """Also limit the BLAS through threadpoolctl if it is installed; return a one-line note."""
    try:
        from threadpoolctl import threadpool_info, threadpool_limits
    except ImportError:
        return f"threadpoolctl not installed; OPENBLAS_NUM_THREADS={os.environ['OPENBLAS_NUM_THREADS']}"
    # the limit stays in force until restored, which this script never does
    threadpool_limits(limits=n_threads, user_api="blas")
    blas = [f"{p.get('internal_api')} {p.get('version')} num_threads={p.get('num_threads')}"
            for p in threadpool_info() if p.get("user_api") == "blas"]
    return "threadpoolctl: " + ("; ".join(blas) or "no BLAS found")


class Candidate:
    """One thing to time: a name, a dtype, a model with forward(tokens, state), and its bytes per token."""

    def __init__(self, name: str, dtype: str, model, bytes_per_token: int):
        self.name, self.dtype, self.model, self.bytes_per_token = name, dtype, model, bytes_per_token
        self.state = None
        self.ms_per_token: list[float] = []

    def decode(self, tokens) -> None:
        # one forward() per token, as in generation; the state carries over between rounds
        state = self.state
        for token in tokens:
            _, state = self.model.forward([token], state)
        self.state = state

    @property
    def median_ms(self) -> float:
        return statistics.median(self.ms_per_token)

    def summary(self, shape: dict, args: argparse.Namespace, ratios: dict) -> dict:
        median_s = self.median_ms / 1e3
        return {
            "candidate": self.name, "dtype": self.dtype, **shape,
            "threads": args.threads, "tokens": args.tokens, "runs": args.runs,
            "bytes_per_token": self.bytes_per_token,
            "ms_per_token_median": round(self.median_ms, 4),
            "ms_per_token_min": round(min(self.ms_per_token), 4),
            "ms_per_token_max": round(max(self.ms_per_token), 4),
            "ms_per_token_runs": [round(t, 4) for t in self.ms_per_token],
            "tokens_per_s": round(1 / median_s, 3),
            "effective_gb_s": round(self.bytes_per_token / median_s / 1e9, 4),
            **ratios,
        }


def _measure(candidates: list[Candidate], token_ids: list[int], runs: int) -> None:
    """Append one ms/token per round to each candidate; rounds interleave the candidates."""
    gc.collect()
    gc.disable()
    try:
        for r in range(runs):
            shift = r % len(candidates)
            for c in candidates[shift:] + candidates[:shift]:
                time.sleep(PAUSE_S)
                # one untimed token wakes this candidate's own worker threads
                c.decode(token_ids[:1])
                start = time.perf_counter()
                c.decode(token_ids)
                c.ms_per_token.append((time.perf_counter() - start) * 1e3 / len(token_ids))
    finally:
        gc.enable()


def _logit_check(reference, other, token_ids: list[int]):
    """Decode token_ids one at a time with both from a fresh state.

    Returns (max over steps of max|logits diff| / max|reference logit|, steps with equal argmax).
    """
    import numpy as np

    worst, same, s_ref, s_other = 0.0, 0, None, None
    for token in token_ids:
        a, s_ref = reference.forward([token], s_ref)
        b, s_other = other.forward([token], s_other)
        diff = np.max(np.abs(a.astype(np.float64) - b)) / max(np.max(np.abs(a)), np.finfo(np.float32).tiny)
        worst = max(worst, float(diff))
        same += int(np.argmax(a) == np.argmax(b))
    return worst, same


def _peak_rss_mb() -> float:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is KiB on Linux, bytes on macOS
    return peak / 1e6 if sys.platform == "darwin" else peak * 1024 / 1e6


def _table(candidates: list[Candidate]) -> list[str]:
    lines = ["| candidate | dtype | weight MB read/token | ms/token median [min–max] | tokens/s | effective GB/s |",
             "|---|---|---:|---:|---:|---:|"]
    for c in candidates:
        median_s = c.median_ms / 1e3
        lines.append(f"| {c.name} | {c.dtype} | {c.bytes_per_token / 1e6:.2f} | "
                     f"{c.median_ms:.3f} [{min(c.ms_per_token):.3f}–{max(c.ms_per_token):.3f}] | "
                     f"{1 / median_s:.1f} | {c.bytes_per_token / median_s / 1e9:.2f} |")
    return lines


def _ratio_line(label: str, value: float, target: str, met: bool) -> str:
    return f"- {label}: **{value:.3f}** (want {target}: {'met' if met else 'NOT met'})"


def run(args: argparse.Namespace, checkpoint: str, shape_note: str) -> int:
    import numpy as np

    import rwkvx
    from rwkvx.kernels._parallel import openmp_enabled
    from numpy_rwkv import NumpyRWKV

    blas_note = _threadpool_limit(args.threads)
    f32 = rwkvx.load(checkpoint, dtype="float32", threads=args.threads)
    u8 = rwkvx.load(checkpoint, dtype="uint8", threads=args.threads)
    baseline = NumpyRWKV(f32.weights)
    shape = {"n_layer": f32.n_layer, "n_embd": f32.n_embd, "n_vocab": f32.n_vocab}

    numpy_c = Candidate("numpy (OpenBLAS W @ x)", "float32", baseline, f32.bytes_per_token)
    f32_c = Candidate("rwkvx", "float32", f32, f32.bytes_per_token)
    u8_c = Candidate("rwkvx", "uint8", u8, u8.bytes_per_token)
    candidates = [numpy_c, f32_c, u8_c]

    rng = np.random.default_rng(args.seed)
    warmup_ids = rng.integers(0, f32.n_vocab, WARMUP_TOKENS).tolist()
    token_ids = rng.integers(0, f32.n_vocab, args.tokens).tolist()
    for c in candidates:
        c.decode(warmup_ids)
    _measure(candidates, token_ids, args.runs)

    print(f"# decode benchmark: {shape_note}; n_layer={f32.n_layer} n_embd={f32.n_embd} "
          f"n_vocab={f32.n_vocab} n_ffn={f32.weights.n_ffn}")
    print(f"threads={args.threads} (rwkvx OpenMP {'on' if openmp_enabled() else 'OFF: serial build'}; "
          f"{blas_note}); numpy {np.__version__}; {os.cpu_count()} CPUs")
    print(f"{WARMUP_TOKENS} warm-up tokens, then {args.runs} rounds x {args.tokens} tokens per candidate, "
          f"interleaved, each after a {PAUSE_S} s pause and 1 untimed token; one forward() per token")
    print()
    print("\n".join(_table(candidates)))
    print()
    f32_vs_numpy = f32_c.median_ms / numpy_c.median_ms
    u8_vs_f32 = u8_c.median_ms / f32_c.median_ms
    print(_ratio_line("rwkvx float32 / numpy ms/token", f32_vs_numpy, "≤ 1.0", f32_vs_numpy <= 1.0))
    print(_ratio_line("rwkvx uint8 / rwkvx float32 ms/token", u8_vs_f32, "≤ 0.5", u8_vs_f32 <= 0.5))

    check_ids = warmup_ids + token_ids
    rel, same = _logit_check(baseline, f32, check_ids)
    print(f"- sanity: rwkvx float32 vs numpy over {len(check_ids)} tokens: max |logits diff| / max |logit| = "
          f"{rel:.2e}, argmax equal at {same}/{len(check_ids)} steps")
    rel, same = _logit_check(f32, u8, check_ids)
    print(f"- info: rwkvx uint8 vs rwkvx float32 (quantisation error): {rel:.2e}, "
          f"argmax equal at {same}/{len(check_ids)} steps")
    print()

    ratios = {numpy_c: {}, f32_c: {"ratio_vs_numpy": round(f32_vs_numpy, 4)},
              u8_c: {"ratio_vs_rwkvx_float32": round(u8_vs_f32, 4)}}
    for c in candidates:
        print(json.dumps(c.summary(shape, args, ratios[c])))
    print()
    print(f"peak RSS: {_peak_rss_mb():.1f} MB (includes building the random checkpoint)"
          if args.model is None else f"peak RSS: {_peak_rss_mb():.1f} MB")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    shape_given = [f"--{k}" for k in DEFAULT_SHAPE if getattr(args, k) is not None]
    if args.model is not None and shape_given:
        parser.error(f"{', '.join(shape_given)} cannot be used with --model (the checkpoint fixes the shape)")
    for key, value in DEFAULT_SHAPE.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.model is not None and not os.path.isfile(args.model):
        parser.error(f"--model: no such file: {args.model}")

    _limit_blas_threads(args.threads)
    # numpy_rwkv sits next to this script
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from rwkvx.errors import RwkvxError

    try:
        if args.model is not None:
            return run(args, args.model, f"checkpoint {args.model}")
        from rwkvx.hugepages import drop_from_page_cache
        from rwkvx.testing import random_tensors, write_safetensors

        with tempfile.TemporaryDirectory(prefix="rwkvx-bench-") as tmp:
            path = os.path.join(tmp, "random.safetensors")
            tensors = random_tensors(args.layers, args.embd, args.vocab, seed=args.seed)
            write_safetensors(path, tensors)
            del tensors
            # loaded as after a reboot: read back from disk into 2 MB pages (rwkvx.hugepages)
            drop_from_page_cache(path)
            # the models map the file, so it stays until they are gone
            return run(args, path, f"random weights (seed {args.seed})")
    except RwkvxError as e:
        print(f"bench_decode: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
