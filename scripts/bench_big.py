"""A big model on a small machine: load time, decode and prompt speed and memory, per format.

    PYTHONPATH=. python scripts/bench_big.py --shape 7B [--formats bfloat16,uint8,q4] [--dir DIR]
        [--threads 2] [--tg 8] [--warmup 2] [--pp 64] [--keep] [--seed 0]
    PYTHONPATH=. python scripts/bench_big.py --model rwkv7-g1-7.2b.pth --formats uint8

The numbers a laptop user needs before downloading a 7B model: how big the file is, how
long it takes to load, how fast it decodes and reads a prompt, and how much memory it
takes. --shape writes random weights of one of scripts/bench.py's shapes (7B: RWKV-7,
32 x 4096, vocabulary 65536) once as bf16 safetensors, as BlinkDL releases them, a tensor
at a time (about 1 GB of memory for 7B, not 28); --model uses a checkpoint instead.

Each format is made as a user makes it, ``python -m rwkvx.convert SRC DST --dtype F``
(matrices stored in the run dtype: loading maps the file, no conversion work), then run in
a fresh process with `threads` threads:

    load        rwkvx.load(DST, dtype=F)                                    -> seconds, RSS after
    1st token   one forward([token]): every weight read once, from disk (the file is evicted
                from the page cache first, as after a download and a reboot)
    decode      --warmup tokens, then --tg tokens one at a time, state carried -> median ms/token
    prompt      one forward of --pp tokens from a fresh state (after a 2-token call that
                wakes the threads)                                          -> tokens/s
    peak RSS    VmHWM at the end: the mapped file's pages count once touched (the
                embedding's unused rows never are)

The formats default to every rwkvx.loader.DTYPES entry except float32 (twice bf16's bytes:
a 7B model does not fit 23 GB) and float16 (bf16's bytes and speed); a format whose file
(or, before converting, its estimated size) does not fit in MemAvailable is not run, and
the table says so. Disk: the source plus the largest converted file at a time (each is
deleted after its run, unless --keep); the script says how much it needs before starting
and refuses if the folder has less free. With --keep a later run reuses the files.
The 7B shape (7.06 B parameters) needs about 29 GB of disk (45 GB with --keep), 1.3 GB of
memory to write and a bit more than each file to run.

Output: a Markdown table, then one JSON line per format. Progress goes to stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from rwkvx.hugepages import drop_from_page_cache

# scripts/ is first on sys.path when a script runs
from _args import cpu_name, positive_int
from bench import (DEFAULT_ARCH, PUBLIC_SHAPES, SHAPES, _shape, mem_available, meminfo, proc_bytes, random_weights,
                   write_checkpoint)

PROTOCOL = "@@bench_big "
GB = 1e9
# python, numpy, rwkvx and the scratch of a --pp prompt, beside the weights (1.5B shape, RWKV-7:
# peak RSS was the file less its untouched embedding rows plus about 220 MB; wider models
# need more scratch)
CHILD_OVERHEAD = 400e6
# converted bytes per parameter, for the estimates made before converting: a sub-8-bit
# format is counted as uint8 with its scales (an upper bound); the embedding stays as stored
EST_BYTES_PER_PARAM = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0}
EST_BYTES_LOW_BITS = 1.1
DISK_MARGIN = 1e9


class UsageError(RuntimeError):
    """Bad input found after parsing (an unreadable --model, too little disk): exit 2."""


# ---- child: one format, one fresh process ----

def _status_bytes(field: str) -> int | None:
    """A VmRSS/VmHWM line of /proc/self/status in bytes (None where there is no /proc)."""
    return proc_bytes("/proc/self/status", field)


def _peak_rss() -> int:
    hwm = _status_bytes("VmHWM")
    if hwm is not None:
        return hwm
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is KiB on Linux, bytes on macOS
    return peak if sys.platform == "darwin" else peak * 1024


def _mb(n: int | None) -> float | None:
    return None if n is None else n / 1e6


def child_main(spec: dict) -> None:
    import numpy as np

    import rwkvx
    from rwkvx.kernels._matvec import simd_level
    from rwkvx.kernels._parallel import openmp_enabled

    rss_before = _status_bytes("VmRSS")
    start = time.perf_counter()
    from rwkvx.model import split_format

    dtype, arithmetic = split_format(spec["dtype"])
    model = rwkvx.load(spec["path"], dtype=dtype, threads=spec["threads"], arithmetic=arithmetic)
    load_s = time.perf_counter() - start
    rss_after_load = _status_bytes("VmRSS")
    peak_after_load = _peak_rss()

    rng = np.random.default_rng(spec["seed"])
    ids = rng.integers(0, model.n_vocab, 1 + spec["warmup"] + spec["tg"] + spec["pp"]).tolist()
    start = time.perf_counter()
    _, state = model.forward(ids[:1])
    first_token_s = time.perf_counter() - start
    decode = ids[1:1 + spec["warmup"] + spec["tg"]]
    times = []
    for i, token in enumerate(decode):
        start = time.perf_counter()
        _, state = model.forward([token], state)
        if i >= spec["warmup"]:
            times.append(time.perf_counter() - start)
    prompt = ids[-spec["pp"]:]
    model.forward(prompt[:2])
    start = time.perf_counter()
    model.forward(prompt)
    pp_s = time.perf_counter() - start
    tg_s = statistics.median(times)
    result = {
        "load_s": load_s, "first_token_s": first_token_s,
        "tg_ms_per_token": tg_s * 1e3, "tg_ms_per_token_min": min(times) * 1e3,
        "tg_ms_per_token_max": max(times) * 1e3, "tg_gb_s": model.bytes_per_token / tg_s / GB,
        "pp_tokens_s": spec["pp"] / pp_s,
        "rss_before_load_mb": _mb(rss_before), "rss_after_load_mb": _mb(rss_after_load),
        "peak_rss_after_load_mb": peak_after_load / 1e6, "peak_rss_mb": _peak_rss() / 1e6,
        "weight_nbytes": model.nbytes, "bytes_per_token": model.bytes_per_token,
        "n_layer": model.n_layer, "n_embd": model.n_embd, "n_vocab": model.n_vocab, "n_threads": model.n_threads,
        "chunk_size": model.chunk_size, "rwkvx": rwkvx.__version__, "simd_level": simd_level(),
        "openmp": openmp_enabled(),
    }
    sys.stdout.write(PROTOCOL + json.dumps(result) + "\n")


# ---- the parent ----

def _progress(text: str) -> None:
    print(f"[bench_big] {text}", file=sys.stderr, flush=True)


def _run_child(spec: dict, threads: int) -> dict:
    env = dict(os.environ)
    # OpenBLAS reads these once, when numpy loads it; rwkvx gets threads= explicitly
    env["OPENBLAS_NUM_THREADS"] = env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--_child", json.dumps(spec)],
                          stdout=subprocess.PIPE, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith(PROTOCOL):
            return json.loads(line[len(PROTOCOL):])
        sys.stderr.write(line + "\n")
    raise RuntimeError(f"{spec['dtype']}: the measuring process exited with status {proc.returncode} "
                       f"(its traceback is above)")


def _convert(src: str, dst: str, dtype: str) -> tuple[float, float]:
    """Run python -m rwkvx.convert; (seconds, its peak RSS in bytes)."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "rwkvx.convert", src, dst, "--dtype", dtype, "--force"])
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"python -m rwkvx.convert ... --dtype {dtype} failed with status {proc.returncode}")
    # ru_maxrss of the waited-for child: KiB on Linux
    return time.perf_counter() - start, usage.ru_maxrss * 1024


def _tensor_sizes(args) -> tuple[int, int, int]:
    """(parameters, parameters of the embedding, bytes of the embedding) of the source."""
    if args.model is None:
        # shapes only: nothing is drawn until a tensor is written
        tensors = random_weights(args.shape_dims, args.seed, args.arch)
        sizes = {name: _n(t.shape) for name, t in tensors.items()}
        n_emb = sizes.get("emb.weight", 0)
        return sum(sizes.values()), n_emb, 2 * n_emb
    from rwkvx.errors import RwkvxError
    from rwkvx.loader import open_checkpoint

    try:
        tensors = open_checkpoint(args.model).tensors
    except RwkvxError as e:
        raise UsageError(str(e)) from None
    emb = tensors.get("emb.weight")
    return (sum(_n(t.shape) for t in tensors.values()), 0 if emb is None else _n(emb.shape),
            0 if emb is None else emb.nbytes)


def _n(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def estimated_bytes(dtype: str, sizes: tuple[int, int, int]) -> float:
    """Converted file size before converting: the rest at the format's bytes, the embedding as stored."""
    n_params, n_emb, emb_bytes = sizes
    return (n_params - n_emb) * EST_BYTES_PER_PARAM.get(dtype, EST_BYTES_LOW_BITS) + emb_bytes


def _gb(n: float | None) -> str:
    return "–" if n is None else f"{n / GB:.2f}"


def _gb_of_mb(mb: float | None) -> str:
    return _gb(None if mb is None else mb * 1e6)


def _ms(ms: float) -> str:
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}"


def table(rows: list[dict]) -> list[str]:
    lines = ["| format | file GB | convert s | load s | 1st token s (from disk) | decode ms/token | decode GB/s "
             "| prompt tokens/s | RSS after load GB | peak RSS GB | note |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        convert = "–" if r.get("convert_s") is None else f"{r['convert_s']:.0f}"
        if "tg_ms_per_token" not in r:
            dashes = " – |" * 7
            lines.append(f"| {r['dtype']} | {_gb(r.get('file_bytes'))} | {convert} |{dashes} {r['note']} |")
            continue
        lines.append(
            f"| {r['dtype']} | {_gb(r['file_bytes'])} | {convert} | {r['load_s']:.2f} "
            f"| {r['first_token_s']:.1f} "
            f"| {_ms(r['tg_ms_per_token'])} [{_ms(r['tg_ms_per_token_min'])}–{_ms(r['tg_ms_per_token_max'])}] "
            f"| {r['tg_gb_s']:.1f} | {r['pp_tokens_s']:.1f} | {_gb_of_mb(r['rss_after_load_mb'])} "
            f"| {_gb_of_mb(r['peak_rss_mb'])} | {r['note']} |")
    return lines


def build_parser() -> argparse.ArgumentParser:
    from rwkvx.loader import DTYPES

    default_formats = [d for d in DTYPES if d not in ("float32", "float16")]
    parser = argparse.ArgumentParser(
        prog="bench_big", description="Load time, decode and prompt speed and peak memory of a big model "
                                      "per format, each converted as a user would and run in a fresh process.")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--shape", type=_shape, metavar="|".join(PUBLIC_SHAPES), default=None,
                       help="random bf16 weights of this shape (default 7B: RWKV-7, 32 x 4096, vocabulary 65536)")
    which.add_argument("--model", metavar="PATH", help="a checkpoint to convert instead of random weights")
    parser.add_argument("--arch", choices=("v4", "v5", "v6", "v7"), default=None,
                        help="architecture of the --shape weights (default: RWKV-7 for 7B, else RWKV-4)")
    parser.add_argument("--formats", default=",".join(default_formats),
                        help=f"comma-separated, from {','.join(DTYPES)}, each may be DTYPE:ARITHMETIC (e.g. "
                             f"q4:int8: the q4 file run in int8 arithmetic) (default {','.join(default_formats)})")
    parser.add_argument("--dir", help="folder for the checkpoint and converted files (default: a new temporary "
                                      "folder, removed at the end unless --keep)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the source and converted files (a later run with the same --dir reuses them)")
    parser.add_argument("--threads", type=positive_int, default=2, help="threads (default 2)")
    parser.add_argument("--tg", type=positive_int, default=8, help="decode tokens timed (default 8)")
    parser.add_argument("--warmup", type=int, default=2, help="decode tokens after the first, untimed (default 2)")
    parser.add_argument("--pp", type=positive_int, default=64, help="prompt tokens (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and token ids (default 0)")
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    from rwkvx.loader import DTYPES

    parser = build_parser()
    args = parser.parse_args(argv)
    from rwkvx.errors import RwkvxError
    from rwkvx.model import split_format

    args.formats = list(dict.fromkeys(f.strip() for f in args.formats.split(",") if f.strip()))
    if not args.formats:
        parser.error(f"--formats: expected a comma-separated subset of {','.join(DTYPES)} (each may be "
                     f"DTYPE:ARITHMETIC), got none")
    for f in args.formats:
        try:
            split_format(f)
        except RwkvxError as e:
            parser.error(f"--formats: {e}")
    if args.warmup < 0:
        parser.error(f"--warmup: expected 0 or more, got {args.warmup}")
    if args.model is not None:
        if not os.path.isfile(args.model):
            parser.error(f"--model: no such file: {args.model}")
        if args.arch is not None:
            parser.error("--arch applies to --shape only (a checkpoint says what it is)")
    else:
        args.shape = args.shape or "7B"
        args.arch = args.arch or DEFAULT_ARCH.get(args.shape, "v4")
        n_layer, n_embd, n_vocab = SHAPES[args.shape]
        # RWKV-5/6/7 use the World vocabulary (as scripts/bench.py)
        args.shape_dims = (n_layer, n_embd, n_vocab if args.arch == "v4" else 65536)
    if args.dir is not None and not os.path.isdir(args.dir):
        parser.error(f"--dir: not a folder: {args.dir}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_child"]:
        child_main(json.loads(argv[1]))
        return 0
    args = parse_args(argv)
    try:
        return run(args)
    except RuntimeError as e:
        print(f"bench_big: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1


def run(args) -> int:
    sizes = _tensor_sizes(args)
    n_params = sizes[0]
    if args.model is not None:
        label = f"checkpoint {args.model}"
    else:
        label = (f"random {args.arch} {args.shape} weights ({args.shape_dims[0]} x {args.shape_dims[1]}, "
                 f"vocabulary {args.shape_dims[2]}) stored bf16 (seed {args.seed})")
    folder = args.dir or tempfile.mkdtemp(prefix="rwkvx-bench-big-")
    made: list[str] = []
    try:
        stem = (os.path.splitext(os.path.basename(args.model))[0] if args.model
                else f"random-{args.arch}-{args.shape}-seed{args.seed}")
        src = args.model or os.path.join(folder, f"{stem}-bf16.safetensors")
        # one converted file per dtype, whichever arithmetics run it
        converted = {d: os.path.join(folder, f"{stem}-{d.partition(':')[0]}.safetensors") for d in args.formats}

        # disk: what is still to be written; converted files one at a time unless kept
        to_write = 0.0 if os.path.exists(src) else n_params * 2.0
        pending = [estimated_bytes(d.partition(":")[0], sizes)
                   for d in dict.fromkeys(f.partition(":")[0] for f in args.formats)
                   if not os.path.exists(converted[d])]
        to_write += (sum(pending) if args.keep else max(pending, default=0.0)) + DISK_MARGIN
        free = shutil.disk_usage(folder).free
        source_text = "source present" if os.path.exists(src) else f"bf16 source {n_params * 2 / GB:.1f} GB"
        _progress(f"{label}: {n_params / 1e9:.2f} B parameters; needs ~{to_write / GB:.1f} GB free in {folder} "
                  f"({source_text} + {'every' if args.keep else 'the largest'} converted file not yet there "
                  f"+ 1 GB); {free / GB:.1f} GB free")
        if to_write > free:
            raise UsageError(f"needs ~{to_write / GB:.1f} GB free in {folder}, has {free / GB:.1f} GB "
                             f"(use --dir elsewhere, fewer --formats, or no --keep)")

        writer = None
        if not os.path.exists(src):
            partial = src + ".partial"
            made.append(partial)
            writer = write_checkpoint(partial, args.shape_dims, args.seed, args.arch)
            os.replace(partial, src)
            made[-1] = src
        else:
            _progress(f"reusing {src}")

        rows = []
        for k, dtype in enumerate(args.formats):
            row = {"dtype": dtype, "note": ""}
            rows.append(row)
            avail = mem_available()
            estimate = estimated_bytes(dtype.partition(":")[0], sizes)
            dst = converted[dtype]
            if avail is not None and not os.path.exists(dst) and estimate + CHILD_OVERHEAD > avail:
                row["note"] = (f"not run: ~{estimate / GB:.1f} GB file would not fit in MemAvailable "
                               f"{avail / GB:.1f} GB")
                _progress(f"{dtype}: {row['note']}")
                continue
            if os.path.exists(dst):
                _progress(f"{dtype}: reusing {dst}")
                row["convert_s"], row["convert_peak_rss_mb"] = None, None
            else:
                _progress(f"{dtype}: converting to {dst}")
                made.append(dst)
                seconds, rss = _convert(src, dst, dtype.partition(":")[0])
                row["convert_s"], row["convert_peak_rss_mb"] = seconds, rss / 1e6
                _progress(f"{dtype}: converted in {seconds:.0f} s, convert's peak RSS {rss / 1e6:.0f} MB")
            row["file_bytes"] = os.path.getsize(dst)
            avail = mem_available()
            if avail is not None and row["file_bytes"] + CHILD_OVERHEAD > avail:
                row["note"] = (f"not run: {row['file_bytes'] / GB:.1f} GB file + {CHILD_OVERHEAD / GB:.1f} GB "
                               f"would not fit in MemAvailable {avail / GB:.1f} GB")
                _progress(f"{dtype}: {row['note']}")
            else:
                _progress(f"{dtype}: measuring (load, 1 + {args.warmup} + {args.tg} tokens, {args.pp}-token prompt)")
                # a reused file may sit in the page cache: the first token should read it from disk
                drop_from_page_cache(dst)
                spec = {"path": dst, "dtype": dtype, "threads": args.threads, "tg": args.tg,
                        "warmup": args.warmup, "pp": args.pp, "seed": args.seed}
                row.update(_run_child(spec, args.threads))
                _progress(f"{dtype}: load {row['load_s']:.2f} s, decode {row['tg_ms_per_token']:.0f} ms/token, "
                          f"prompt {row['pp_tokens_s']:.1f} tokens/s, peak RSS {row['peak_rss_mb']:.0f} MB")
            later = [f for f in args.formats[k + 1:] if converted[f] == dst]
            if not args.keep and dst in made and not later:
                os.remove(dst)
                made.remove(dst)
        report(args, label, n_params, writer, rows)
    finally:
        # a half-written source is never kept (a later run would not know it is incomplete)
        for path in made:
            if os.path.exists(path) and (not args.keep or path.endswith(".partial")):
                os.remove(path)
        if args.keep:
            _progress(f"kept in {folder}: {', '.join(sorted(os.listdir(folder)))}")
        elif args.dir is None:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


def report(args, label: str, n_params: int, writer: dict | None, rows: list[dict]) -> None:
    ran = next((r for r in rows if "tg_ms_per_token" in r), None)
    total = meminfo("MemTotal")
    print(f"# rwkvx bench_big: {label}, {n_params / 1e9:.2f} B parameters")
    if ran is not None:
        print(f"rwkvx {ran['rwkvx']} (OpenMP {'on' if ran['openmp'] else 'OFF: serial build'}, SIMD level "
              f"{ran['simd_level']}), {ran['n_threads']} threads; {cpu_name()}, {os.cpu_count()} CPUs, "
              f"{_gb(total)} GB RAM")
    else:
        print(f"{cpu_name()}, {os.cpu_count()} CPUs, {_gb(total)} GB RAM")
    print(f"each format converted with python -m rwkvx.convert, then in a fresh process: load; 1st token "
          f"(reads the file from disk); decode: median [min–max] of {args.tg} tokens after {args.warmup} "
          f"untimed; prompt: one {args.pp}-token forward")
    if writer is not None:
        print(f"source written in {writer['seconds']:.0f} s, writer's peak RSS {writer['peak_rss_mb']:.0f} MB")
    print()
    print("\n".join(table(rows)))
    print()
    for r in rows:
        print(json.dumps({"kind": "result", "source": label, "n_params": n_params,
                          **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}}))


if __name__ == "__main__":
    raise SystemExit(main())
