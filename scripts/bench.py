"""llama-bench for rwkvx: prompt, decode and batched-decode speed per dtype, against the roofline.

    PYTHONPATH=. python scripts/bench.py --shape 430M [--arch v7] [--dtypes float32,bfloat16,float16,uint8,q4]
    PYTHONPATH=. python scripts/bench.py --shape 430M --dtypes bfloat16,bfloat16:bfloat16,uint8,uint8:int8
        [--threads 2 | --threads 4 --thread-sweep] [--pp 256] [--tg 32] [--batch 8] [--runs 5]
        [--chunk-size N] [--numpy-chunk-size N] [--no-baseline] [--no-mmap] [--schedule auto]
    PYTHONPATH=. python scripts/bench.py --model RWKV-4-Pile-430M.safetensors ...

--shape writes random weights of RWKV-4 169M (12 x 768), 430M (24 x 1024) or 1.5B
(24 x 2048), vocabulary 50277, or of RWKV-7 7B (32 x 4096, vocabulary 65536), once to a
temporary directory as bf16 safetensors (BlinkDL's releases are bf16), deleted at the end;
every dtype loads that one file. The file is written a tensor at a time, so writing needs
about one float32 tensor of memory (1 GB for 7B's head), not the model.

For each thread count (--threads, or 1..--threads with --thread-sweep) it runs child
processes, one per rwkvx dtype, so each dtype's peak RSS is its own, and one that measures
the machine's read bandwidth. Each child sets OPENBLAS_NUM_THREADS (and OMP_NUM_THREADS) to
the thread count before numpy is imported. The plain numpy/OpenBLAS float32 baseline
(scripts/numpy_rwkv.py: sgemv per token, one sgemm per projection per prompt chunk) runs in
the float32 child on the same weight arrays, interleaved with rwkvx float32.

Every child loads and warms up first; then --runs rounds go round-robin over the children
(schedule "interleaved"; the starting child rotates per round), so drift on a busy machine
hits every candidate alike. "sequential" runs one child at a time (less memory); "auto"
picks interleaved when all children fit comfortably in MemAvailable. In a round, a model
child times, per candidate (rotating), each measurement after a pause and one untimed call:

    pp      one forward(prompt) of --pp tokens from a fresh state            -> tokens/s
    tg      --tg calls of forward([token], state), carrying the state        -> ms/token, tokens/s
    batch   --tg calls of forward_batch(--batch sequences x one token)       -> tokens/s summed

Bandwidth: numpy sgemv (W @ x) on a float32 matrix of --bandwidth-mib (default 1 GiB, over
twice the 480 MB L3 reported here) and a sum of the same array split across the thread
count's Python threads (numpy releases the GIL), each 3 passes per round; "measured
bandwidth" is the larger of the two medians, "best" the fastest single round of either.
tg GB/s = weight bytes read per token / median time per token. The bandwidth target is
checked twice: median tg GB/s against measured bandwidth, and the fastest tg round against
the best bandwidth round; a round disturbed by another tenant moves the first, not both.

Output: a markdown table (median, [min-max] over rounds), the issue's target ratios, then
one JSON line per row and per bandwidth measurement. Progress goes to stderr. Speed is
measured, not asserted: the exit status does not depend on the targets.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

# scripts/ is first on sys.path when a script runs
from _args import cpu_name, positive_int

# name: (n_layer, n_embd, n_vocab); "tiny" is for smoke tests and not listed in --help
SHAPES = {
    "169M": (12, 768, 50277),
    "430M": (24, 1024, 50277),
    "1.5B": (24, 2048, 50277),
    "7B": (32, 4096, 65536),
    "tiny": (2, 64, 500),
}
PUBLIC_SHAPES = ("169M", "430M", "1.5B", "7B")
# the architecture a shape's random weights have when --arch is not given: models of 7B
# are run as RWKV-7 (BlinkDL's "G1" 7B is 32 x 4096); the smaller shapes stay RWKV-4
DEFAULT_ARCH = {"7B": "v7"}
DTYPES = ("float32", "bfloat16", "float16", "uint8", "q4")
# weight bytes per parameter held by a child of each dtype, for the memory estimate
BYTES_PER_PARAM = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0, "uint8": 1.2, "q4": 0.7}
CHILD_OVERHEAD = 300e6
WARMUP_TOKENS = 4
# OpenBLAS workers spin ~0.1 s and OpenMP workers a few ms after a call before sleeping;
# pausing before each measurement keeps one pool's spinning from stealing another's cores
PAUSE_S = 0.2
PROTOCOL = "@@bench "
# passes over the bandwidth array per round (one round's figure is their mean)
BANDWIDTH_PASSES = 3
# the targets (430M, 2 threads)
TARGET_BW_FRACTION = 0.90
TARGET_U8_VS_F32 = 0.35
TARGET_Q4_VS_U8 = 0.55
TARGET_PP_VS_NUMPY = 0.9
TARGET_PP_TOKENS_S = 120.0
TARGET_BATCH_VS_TG = 4.0
# issue 15: RWKV-5/6/7 against RWKV-4 of the same width and depth, same dtype
TARGET_ARCH_TG = 1.15
TARGET_ARCH_PP = 0.8


# ---- child processes: one JSON message per line on stdout ----

def _send(message: dict) -> None:
    sys.stdout.write(PROTOCOL + json.dumps(message) + "\n")
    sys.stdout.flush()


def _rss_mb() -> tuple[float, float]:
    """(peak, current) resident set size of this process in MB."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is KiB on Linux, bytes on macOS
    peak_mb = peak / 1e6 if sys.platform == "darwin" else peak * 1024 / 1e6
    try:
        with open("/proc/self/statm") as f:
            current_mb = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6
    except OSError:
        current_mb = float("nan")
    return round(peak_mb, 1), round(current_mb, 1)


def _huge_page_mb() -> float | None:
    """Resident memory of this process in 2 MB pages (anonymous and file-backed), in MB."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
    except OSError:
        return None
    kib = sum(int(fields.get(k, "0 kB").split()[0]) for k in ("AnonHugePages", "FilePmdMapped"))
    return round(kib * 1024 / 1e6, 1)


def _serve(rounds) -> None:
    """Answer the parent: 'round R' runs rounds(R) and sends its result; 'exit' sends the RSS and returns."""
    for line in sys.stdin:
        command = line.split()
        if command and command[0] == "round":
            _send({"event": "round", "results": rounds(int(command[1]))})
        elif command == ["exit"]:
            peak, current = _rss_mb()
            _send({"event": "done", "peak_rss_mb": peak, "rss_mb": current})
            return


def random_weights(shape: tuple[int, int, int], seed: int, arch: str = "v4") -> dict:
    """The random checkpoint of --shape as rwkvx.testing.LazyTensors: shapes now, values when written."""
    n_layer, n_embd, n_vocab = shape
    if arch == "v4":
        from rwkvx.testing import random_tensors

        return random_tensors(n_layer, n_embd, n_vocab, seed=seed, lazy=True)
    from rwkvx.arch.random_weights import random_checkpoint

    # BlinkDL's shapes: heads of 64, low-rank sizes of the 0.4B release (decay 64, a 64,
    # v 32, gate 128), feed-forward 4x
    return random_checkpoint(arch, n_layer=n_layer, n_embd=n_embd, head_size=64, n_vocab=n_vocab,
                             seed=seed, lora=64, lazy=True)


def _child_write(spec: dict) -> None:
    from rwkvx.hugepages import drop_from_page_cache
    from rwkvx.testing import write_safetensors

    # lazy: each tensor is drawn when its turn to be written comes, then dropped, so a 7B
    # model (28 GB in float32) is written with about one tensor in memory
    tensors = random_weights(tuple(spec["shape"]), spec["seed"], spec.get("arch", "v4"))
    # tensors on cache lines, as in BlinkDL's .pth files (torch aligns them to 64 bytes) and
    # rwkvx.convert's output; the reference safetensors writer aligns to 8 only
    write_safetensors(spec["path"], tensors, dtype="bfloat16", align=64)
    # loaded as a downloaded checkpoint would be after a reboot: read from disk into huge pages
    drop_from_page_cache(spec["path"])
    peak, _ = _rss_mb()
    _send({"event": "written", "path": spec["path"], "peak_rss_mb": peak})


def _blas_info(np) -> str:
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        return f"{blas.get('name')} {blas.get('version')}"
    except Exception:  # noqa: BLE001 - informational only; older numpy has no mode="dicts"
        return "unknown BLAS"


def _child_bandwidth(spec: dict) -> None:
    import gc
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    n_threads = spec["threads"]
    n_cols = 4096
    n_rows = max(1, spec["mib"] * 2**20 // (4 * n_cols))
    # written, not np.zeros: untouched calloc pages all map to one zero page and read from cache
    w = np.empty((n_rows, n_cols), dtype=np.float32)
    w.fill(1.0 / n_cols)
    x = np.ones(n_cols, dtype=np.float32)
    y = np.empty(n_rows, dtype=np.float32)
    flat = w.reshape(-1)
    parts = [flat[i * flat.size // n_threads:(i + 1) * flat.size // n_threads] for i in range(n_threads)]
    pool = ThreadPoolExecutor(max_workers=n_threads)

    def sgemv() -> None:
        np.matmul(w, x, out=y)

    def threaded_sum() -> None:
        list(pool.map(np.add.reduce, parts))

    def timed(fn) -> float:
        time.sleep(PAUSE_S)
        # one untimed pass over a small slice wakes the thread pool
        np.matmul(w[:256], x)
        start = time.perf_counter()
        for _ in range(BANDWIDTH_PASSES):
            fn()
        return BANDWIDTH_PASSES * w.nbytes / (time.perf_counter() - start) / 1e9

    for fn in (sgemv, threaded_sum):
        fn()

    def rounds(r: int) -> dict:
        gc.disable()
        try:
            kinds = [("sgemv", sgemv), ("sum", threaded_sum)]
            kinds = kinds[r % 2:] + kinds[:r % 2]
            return {name: timed(fn) for name, fn in kinds}
        finally:
            gc.enable()

    _send({"event": "ready", "bytes": w.nbytes, "numpy": np.__version__, "blas": _blas_info(np),
           "openblas_num_threads": os.environ.get("OPENBLAS_NUM_THREADS")})
    _serve(rounds)


class _Timed:
    """One candidate in a model child: its pp, tg and batch measurements (seconds)."""

    def __init__(self, name: str, model, ids: dict, batch: int):
        self.name, self.model, self.ids, self.batch = name, model, ids, batch
        self.tg_state = None
        self.batch_states = [None] * batch

    def pp(self) -> float:
        prompt = self.ids["prompt"]
        # two tokens wake the threads on the sequence-mode path
        self.model.forward(prompt[:2])
        start = time.perf_counter()
        self.model.forward(prompt)
        return time.perf_counter() - start

    def _decode(self, tokens) -> None:
        state = self.tg_state
        for token in tokens:
            _, state = self.model.forward([token], state)
        self.tg_state = state

    def tg(self) -> float:
        """Seconds per token."""
        tokens = self.ids["tg"]
        self._decode(tokens[:1])
        start = time.perf_counter()
        self._decode(tokens)
        return (time.perf_counter() - start) / len(tokens)

    def _batch_steps(self, steps) -> None:
        states = self.batch_states
        for step in steps:
            _, states = self.model.forward_batch([[t] for t in step], states)
        self.batch_states = states

    def batch_step(self) -> float:
        """Seconds per forward_batch call (one token for each of the B sequences)."""
        steps = self.ids["batch"]
        self._batch_steps(steps[:1])
        start = time.perf_counter()
        self._batch_steps(steps)
        return (time.perf_counter() - start) / len(steps)

    def warm_up(self) -> None:
        self.model.forward(self.ids["prompt"])
        self._decode(self.ids["tg"][:WARMUP_TOKENS])
        self._batch_steps(self.ids["batch"][:2])

    def round(self, r: int) -> dict:
        kinds = [("pp_s", self.pp), ("tg_s_per_token", self.tg), ("batch_s_per_step", self.batch_step)]
        kinds = kinds[r % 3:] + kinds[:r % 3]
        out = {}
        for key, fn in kinds:
            time.sleep(PAUSE_S)
            out[key] = fn()
        return out


def _sanity(model, baseline, ids: dict) -> dict:
    """Logit checks that keep the baseline honest: max |diff| / max |logit| (float32 child only)."""
    import numpy as np

    def rel(a, b) -> float:
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        return float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-30))

    prompt = ids["prompt"]
    few = prompt[:8]
    one_by_one, state = None, None
    for token in few:
        one_by_one, state = baseline.forward([token], state)
    chunk = baseline.chunk_size
    # chunks of 3 cross chunk boundaries inside 8 tokens
    baseline.chunk_size = 3
    seq_few, _ = baseline.forward(few)
    baseline.chunk_size = chunk
    step = [[t] for t in ids["batch"][0]]
    numpy_batch, _ = baseline.forward_batch(step)
    return {
        "numpy_vs_rwkvx_pp": rel(model.forward(prompt)[0], baseline.forward(prompt)[0]),
        "numpy_seq_vs_token_by_token": rel(one_by_one, seq_few),
        "numpy_batch_vs_rwkvx_batch": rel(model.forward_batch(step)[0], numpy_batch),
    }


def _child_model(spec: dict) -> None:
    import gc

    import numpy as np

    import rwkvx
    from rwkvx.kernels._matvec import simd_level
    from rwkvx.kernels._parallel import openmp_enabled

    start = time.perf_counter()
    from rwkvx.model import split_format

    dtype, arithmetic = split_format(spec["dtype"])
    model = rwkvx.load(spec["path"], dtype=dtype, threads=spec["threads"], mmap=spec["mmap"], arithmetic=arithmetic)
    if spec["chunk_size"] is not None:
        model.chunk_size = spec["chunk_size"]
    load_s = time.perf_counter() - start
    rng = np.random.default_rng(spec["seed"])
    n_vocab, batch, n_tg = model.n_vocab, spec["batch"], spec["tg"]
    ids = {
        "prompt": rng.integers(0, n_vocab, spec["pp"]).tolist(),
        "tg": rng.integers(0, n_vocab, n_tg).tolist(),
        "batch": rng.integers(0, n_vocab, (n_tg, batch)).tolist(),
    }
    candidates = []
    baseline = None
    if "numpy" in spec["candidates"]:
        # numpy_rwkv sits next to this script
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from numpy_rwkv import NumpyRWKV

        baseline = NumpyRWKV(model.weights, chunk_size=spec["numpy_chunk_size"])
        candidates.append(_Timed("numpy", baseline, ids, batch))
    if "rwkvx" in spec["candidates"]:
        candidates.append(_Timed("rwkvx", model, ids, batch))
    for c in candidates:
        c.warm_up()
    sanity = _sanity(model, baseline, ids) if baseline is not None else {}
    peak, current = _rss_mb()
    huge_mb = _huge_page_mb()

    def rounds(r: int) -> dict:
        gc.collect()
        gc.disable()
        try:
            shift = r % len(candidates)
            return {c.name: c.round(r) for c in candidates[shift:] + candidates[:shift]}
        finally:
            gc.enable()

    _send({"event": "ready", "load_s": round(load_s, 3), "rss_after_load_mb": current, "peak_rss_load_mb": peak,
           "huge_page_mb": huge_mb,
           "n_layer": model.n_layer, "n_embd": model.n_embd, "n_vocab": n_vocab, "n_ffn": model.weights.n_ffn,
           "n_threads": model.n_threads, "chunk_size": model.chunk_size, "nbytes": model.nbytes,
           "bytes_per_token": model.bytes_per_token, "rwkvx": rwkvx.__version__, "openmp": openmp_enabled(),
           "simd_level": simd_level(), "numpy": np.__version__, "blas": _blas_info(np), "sanity": sanity})
    _serve(rounds)


def child_main(spec_json: str) -> int:
    if "numpy" in sys.modules:
        raise RuntimeError("bench: numpy was imported before the child set its BLAS thread count")
    spec = json.loads(spec_json)
    {"write": _child_write, "bandwidth": _child_bandwidth, "model": _child_model}[spec["role"]](spec)
    return 0


# ---- the parent: starts children, schedules rounds, reports ----

class Child:
    """A running child process and the messages it sent."""

    def __init__(self, label: str, spec: dict, threads: int):
        self.label, self.spec = label, spec
        env = dict(os.environ)
        # OpenBLAS reads these once, when numpy loads it; rwkvx gets threads= explicitly
        env["OPENBLAS_NUM_THREADS"] = env["OMP_NUM_THREADS"] = str(threads)
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--_child", json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1, env=env)
        self.ready: dict = {}
        self.rounds: list[dict] = []
        self.done: dict = {}

    def receive(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(PROTOCOL):
                return json.loads(line[len(PROTOCOL):])
            # anything else a child prints is passed on, never mixed into the report
            sys.stderr.write(line)
        code = self.proc.wait()
        raise RuntimeError(f"{self.label}: child exited with status {code} (its traceback is above)")

    def command(self, text: str) -> dict:
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()
        return self.receive()

    def finish(self) -> None:
        self.done = self.command("exit")
        self.proc.stdin.close()
        self.proc.wait()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _progress(text: str) -> None:
    print(f"[bench] {text}", file=sys.stderr, flush=True)


def _start(child: Child) -> None:
    start = time.perf_counter()
    child.ready = child.receive()
    if child.ready.get("event") != "ready":
        raise RuntimeError(f"{child.label}: expected 'ready', got {child.ready}")
    extra = ""
    if "rss_after_load_mb" in child.ready:
        extra = f", load {child.ready['load_s']:.1f} s, RSS {child.ready['rss_after_load_mb']:.0f} MB"
    _progress(f"{child.label}: ready after {time.perf_counter() - start:.1f} s{extra}")


def run_group(labelled_specs: list[tuple[str, dict]], runs: int, threads: int) -> list[Child]:
    """Start the children one at a time (so loads do not compete), each loading and warming up;
    then run rounds round-robin, the starting child rotating; then collect each child's RSS."""
    children: list[Child] = []
    try:
        for label, spec in labelled_specs:
            children.append(Child(label, spec, threads))
            _start(children[-1])
        for r in range(runs):
            shift = r % len(children)
            for child in children[shift:] + children[:shift]:
                child.rounds.append(child.command(f"round {r}")["results"])
            _progress(f"round {r + 1}/{runs} done ({', '.join(c.label for c in children)})")
        for child in children:
            child.finish()
    finally:
        for child in children:
            child.kill()
    return children


def write_checkpoint(path: str, shape: tuple[int, int, int], seed: int, arch: str = "v4") -> dict:
    """Write random bf16 weights in a child process; returns its 'written' message (with peak_rss_mb)."""
    _progress(f"writing random bf16 {arch} weights {shape} to {path}")
    start = time.perf_counter()
    child = Child("write", {"role": "write", "path": path, "shape": list(shape), "seed": seed, "arch": arch}, 1)
    try:
        written = child.receive()
        child.proc.stdin.close()
        child.proc.wait()
    finally:
        child.kill()
    seconds = time.perf_counter() - start
    _progress(f"written in {seconds:.1f} s ({os.path.getsize(path) / 1e6:.1f} MB, "
              f"writer's peak RSS {written['peak_rss_mb']:.0f} MB)")
    return {**written, "seconds": seconds}


def count_params(path: str) -> int:
    """Parameters in a safetensors file, from its header; else a high guess (2 bytes each)."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if 0 < n < 100_000_000:
                header = json.loads(f.read(n))
                total = 0
                for key, value in header.items():
                    if key != "__metadata__":
                        count = 1
                        for d in value["shape"]:
                            count *= d
                        total += count
                return total
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return os.path.getsize(path) // 2


def proc_bytes(path: str, field: str) -> int | None:
    """Bytes of a "field: N kB" line of a /proc file (/proc/meminfo, /proc/self/status), or
    None where there is no such file or line."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def meminfo(field: str = "MemAvailable") -> float | None:
    """Bytes of a /proc/meminfo field (MemAvailable, MemTotal, ...), or None."""
    return proc_bytes("/proc/meminfo", field)


def mem_available() -> float | None:
    return meminfo("MemAvailable")


def plan_schedule(args, n_params: int) -> tuple[str, str]:
    """(schedule, note): interleaved when every child fits in 75% of MemAvailable, unless forced."""
    need = args.bandwidth_mib * 2**20 + CHILD_OVERHEAD
    need += sum(BYTES_PER_PARAM[d.partition(":")[0]] * n_params + CHILD_OVERHEAD for d in args.dtypes)
    if args.baseline and "float32" not in args.dtypes:
        need += BYTES_PER_PARAM["float32"] * n_params + CHILD_OVERHEAD
    avail = mem_available()
    note = f"children need ~{need / 1e9:.1f} GB at once" + (f", {avail / 1e9:.1f} GB available" if avail else "")
    if args.schedule != "auto":
        return args.schedule, note + " (schedule forced)"
    if avail is None or need <= 0.75 * avail:
        return "interleaved", note
    return "sequential", note + ": too much to hold at once"


def run_threads(args, paths: dict, threads: int, schedule: str) -> dict:
    """All measurements for one thread count: {'bandwidth': Child, 'models': {(arch, dtype): Child}}
    (paths: arch -> checkpoint; arch None for --model)."""
    common = {"threads": threads, "pp": args.pp, "tg": args.tg, "batch": args.batch,
              "chunk_size": args.chunk_size, "numpy_chunk_size": args.numpy_chunk_size, "seed": args.seed,
              "mmap": args.mmap}
    specs = []
    for arch, path in paths.items():
        prefix = f"{arch} " if len(paths) > 1 else ""
        for dtype in args.dtypes:
            candidates = ["rwkvx"] + (["numpy"] if args.baseline and dtype == "float32" else [])
            specs.append((prefix + dtype, {"role": "model", "dtype": dtype, "arch": arch, "path": path,
                                           "candidates": candidates, **common}))
        if args.baseline and "float32" not in args.dtypes:
            specs.append((prefix + "float32", {"role": "model", "dtype": "float32", "arch": arch, "path": path,
                                               "candidates": ["numpy"], **common}))
    bw_spec = {"role": "bandwidth", "threads": threads, "mib": args.bandwidth_mib}

    labelled = [(f"bandwidth t={threads}", bw_spec)] + [(f"{d} t={threads}", spec) for d, spec in specs]
    if schedule == "interleaved":
        children = run_group(labelled, args.runs, threads)
    else:
        children = [child for item in labelled for child in run_group([item], args.runs, threads)]
    return {"bandwidth": children[0], "models": {(c.spec["arch"], c.spec["dtype"]): c for c in children[1:]}}


# ---- statistics and the report ----

def _median_min_max(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def summarise(results: dict, args, threads: int) -> tuple[dict, list[dict]]:
    """(bandwidth summary, one row per candidate x dtype) for one thread count."""
    bw_child = results["bandwidth"]
    bw = {"threads": threads, "bytes": bw_child.ready["bytes"]}
    for kind in ("sgemv", "sum"):
        values = [r[kind] for r in bw_child.rounds]
        bw[f"{kind}_gb_s"], bw[f"{kind}_gb_s_min"], bw[f"{kind}_gb_s_max"] = _median_min_max(values)
        bw[f"{kind}_gb_s_runs"] = [round(v, 3) for v in values]
    bw["measured_gb_s"] = max(bw["sgemv_gb_s"], bw["sum_gb_s"])
    bw["best_gb_s"] = max(bw["sgemv_gb_s_max"], bw["sum_gb_s_max"])

    rows = []
    for (arch, dtype), child in results["models"].items():
        for name in child.spec["candidates"]:
            runs = [r[name] for r in child.rounds]
            pp_s = [r["pp_s"] for r in runs]
            tg_s = [r["tg_s_per_token"] for r in runs]
            batch_s = [r["batch_s_per_step"] for r in runs]
            pp_med, tg_med, batch_med = statistics.median(pp_s), statistics.median(tg_s), statistics.median(batch_s)
            bpt = child.ready["bytes_per_token"]
            gb_s = bpt / tg_med / 1e9
            rows.append({
                "candidate": name, "arch": arch, "dtype": dtype, "threads": threads,
                "n_layer": child.ready["n_layer"], "n_embd": child.ready["n_embd"], "n_vocab": child.ready["n_vocab"],
                "pp": args.pp, "tg": args.tg, "batch": args.batch, "runs": args.runs,
                "chunk_size": child.ready["chunk_size"] if name == "rwkvx" else (args.numpy_chunk_size or args.pp),
                "pp_tokens_s": args.pp / pp_med,
                "pp_tokens_s_min": args.pp / max(pp_s), "pp_tokens_s_max": args.pp / min(pp_s),
                "tg_ms_per_token": tg_med * 1e3,
                "tg_ms_per_token_min": min(tg_s) * 1e3, "tg_ms_per_token_max": max(tg_s) * 1e3,
                "tg_tokens_s": 1 / tg_med,
                "batch_tokens_s": args.batch / batch_med,
                "batch_tokens_s_min": args.batch / max(batch_s), "batch_tokens_s_max": args.batch / min(batch_s),
                "batch_vs_tg": (args.batch / batch_med) / (1 / tg_med),
                "bytes_per_token": bpt, "weight_nbytes": child.ready["nbytes"],
                "tg_gb_s": gb_s, "bandwidth_fraction": gb_s / bw["measured_gb_s"],
                "bandwidth_fraction_best": bpt / min(tg_s) / 1e9 / bw["best_gb_s"],
                "peak_rss_mb": child.done["peak_rss_mb"], "rss_mb": child.done["rss_mb"],
                "rss_shared_with": "rwkvx float32" if name == "numpy" and "rwkvx" in child.spec["candidates"] else None,
                "load_s": child.ready["load_s"],
                "huge_page_mb": child.ready["huge_page_mb"],
                "pp_s_runs": [round(v, 5) for v in pp_s],
                "tg_ms_per_token_runs": [round(v * 1e3, 4) for v in tg_s],
                "batch_s_per_step_runs": [round(v, 5) for v in batch_s],
                "sanity": child.ready["sanity"] if name == "numpy" else {},
            })
    # per architecture, the baseline first, then rwkvx in --dtypes order
    order = list(dict.fromkeys(arch for arch, _ in results["models"]))
    rows.sort(key=lambda r: (order.index(r["arch"]), r["candidate"] != "numpy"))
    return bw, rows


def _rng(med: float, lo: float, hi: float, fmt: str) -> str:
    return f"{med:{fmt}} [{lo:{fmt}}–{hi:{fmt}}]"


def table(rows: list[dict], batch: int) -> list[str]:
    archs = len({r["arch"] for r in rows}) > 1
    lines = [f"| threads | candidate |{' arch |' if archs else ''} dtype | pp t/s | tg t/s | tg ms/token "
             f"| batch-{batch} t/s | batch-{batch}/tg | weight MB/token | GB/s | % of bandwidth | peak RSS MB |",
             f"|---:|---|{'---|' if archs else ''}---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        label = "numpy (OpenBLAS)" if r["candidate"] == "numpy" else "rwkvx"
        rss = f"{r['peak_rss_mb']:.0f}" + (" †" if r["rss_shared_with"] else "")
        lines.append(
            f"| {r['threads']} | {label} |{' ' + r['arch'] + ' |' if archs else ''} {r['dtype']} "
            f"| {_rng(r['pp_tokens_s'], r['pp_tokens_s_min'], r['pp_tokens_s_max'], '.1f')} "
            f"| {r['tg_tokens_s']:.1f} "
            f"| {_rng(r['tg_ms_per_token'], r['tg_ms_per_token_min'], r['tg_ms_per_token_max'], '.2f')} "
            f"| {_rng(r['batch_tokens_s'], r['batch_tokens_s_min'], r['batch_tokens_s_max'], '.1f')} "
            f"| {r['batch_vs_tg']:.2f} | {r['bytes_per_token'] / 1e6:.1f} | {r['tg_gb_s']:.2f} "
            f"| {100 * r['bandwidth_fraction']:.0f}% | {rss} |")
    return lines


def _target(label: str, value: str, want: str, met: bool) -> str:
    return f"- {label}: **{value}** (want {want}: {'met' if met else 'NOT met'})"


def target_lines(rows: list[dict], bw: dict, args, shape_name: str | None) -> list[str]:
    """The issue's targets as ratio lines, for one thread count."""
    rwkvx = {r["dtype"]: r for r in rows if r["candidate"] == "rwkvx"}
    numpy_row = next((r for r in rows if r["candidate"] == "numpy"), None)
    lines = [f"threads={bw['threads']}, measured bandwidth {bw['measured_gb_s']:.2f} GB/s (best round "
             f"{bw['best_gb_s']:.2f}):"]
    for dtype in ("float32", "bfloat16", "float16"):
        if dtype in rwkvx:
            # met only if it holds both ways: median against median, and the fastest decode
            # round against the fastest bandwidth round (a disturbed bandwidth round lowers
            # the median and would flatter every ratio)
            frac, best = rwkvx[dtype]["bandwidth_fraction"], rwkvx[dtype]["bandwidth_fraction_best"]
            lines.append(_target(f"{dtype} tg reads weights at",
                                 f"{100 * frac:.0f}% of measured bandwidth, best vs best {100 * best:.0f}%",
                                 f"≥ {100 * TARGET_BW_FRACTION:.0f}% both", min(frac, best) >= TARGET_BW_FRACTION))
    if "uint8" in rwkvx:
        lines.append(f"- uint8 tg reads weights at {100 * rwkvx['uint8']['bandwidth_fraction']:.0f}% of measured "
                     f"bandwidth (info: its target is the time ratio below)")
    if "uint8" in rwkvx and "float32" in rwkvx:
        ratio = rwkvx["uint8"]["tg_ms_per_token"] / rwkvx["float32"]["tg_ms_per_token"]
        lines.append(_target("uint8 tg time / float32 tg time", f"{ratio:.3f}", f"≤ {TARGET_U8_VS_F32}",
                             ratio <= TARGET_U8_VS_F32))
    # issue 16: q4 (in any arithmetic) against uint8 in float32 arithmetic
    for q4 in (d for d in rwkvx if d.partition(":")[0] == "q4" and "uint8" in rwkvx):
        ratio = rwkvx[q4]["tg_ms_per_token"] / rwkvx["uint8"]["tg_ms_per_token"]
        lines.append(_target(f"{q4} tg time / uint8 tg time", f"{ratio:.3f}", f"≤ {TARGET_Q4_VS_U8}",
                             ratio <= TARGET_Q4_VS_U8))
        for kind in ("pp_tokens_s", "batch_tokens_s"):
            ratio = rwkvx[q4][kind] / rwkvx["uint8"][kind]
            lines.append(_target(f"{q4} {kind.split('_')[0]} tokens/s / uint8's", f"{ratio:.3f}", "≥ 1", ratio >= 1))
    if numpy_row is not None and "float32" in rwkvx:
        ratio = rwkvx["float32"]["pp_tokens_s"] / numpy_row["pp_tokens_s"]
        lines.append(_target(f"float32 pp / numpy GEMM pp ({args.pp} tokens)", f"{ratio:.3f}",
                             f"≥ {TARGET_PP_VS_NUMPY}", ratio >= TARGET_PP_VS_NUMPY))
        ratio = rwkvx["float32"]["tg_ms_per_token"] / numpy_row["tg_ms_per_token"]
        lines.append(f"- info: float32 tg time / numpy tg time: {ratio:.3f}")
    note = "" if shape_name == "430M" and bw["threads"] == 2 else " (target set for 430M, 2 threads)"
    for dtype in ("bfloat16", "uint8"):
        if dtype in rwkvx:
            value = rwkvx[dtype]["pp_tokens_s"]
            lines.append(_target(f"{dtype} pp", f"{value:.1f} tokens/s", f"≥ {TARGET_PP_TOKENS_S:.0f}{note}",
                                 value >= TARGET_PP_TOKENS_S))
    for dtype, r in rwkvx.items():
        lines.append(_target(f"{dtype} batch-{args.batch} / tg tokens/s", f"{r['batch_vs_tg']:.2f}×",
                             f"≥ {TARGET_BATCH_VS_TG:.0f}×", r["batch_vs_tg"] >= TARGET_BATCH_VS_TG))
    if numpy_row is not None and numpy_row["sanity"]:
        s = numpy_row["sanity"]
        lines.append(f"- sanity (max |logit diff| / max |logit|): rwkvx vs numpy pp {s['numpy_vs_rwkvx_pp']:.1e}, "
                     f"batch {s['numpy_batch_vs_rwkvx_batch']:.1e}; numpy sequence vs token-by-token "
                     f"{s['numpy_seq_vs_token_by_token']:.1e}")
    return lines


def arch_lines(rows: list[dict]) -> list[str]:
    """RWKV-5/6/7 against RWKV-4 of the same width and depth, measured in the same run."""
    base = {r["dtype"]: r for r in rows if r["candidate"] == "rwkvx" and r["arch"] == "v4"}
    lines = []
    for r in rows:
        if r["candidate"] != "rwkvx" or r["arch"] in ("v4", None) or r["dtype"] not in base:
            continue
        b = base[r["dtype"]]
        decode = r["tg_ms_per_token"] / b["tg_ms_per_token"]
        per_byte = (r["tg_ms_per_token"] / r["bytes_per_token"]) / (b["tg_ms_per_token"] / b["bytes_per_token"])
        prompt = r["pp_tokens_s"] / b["pp_tokens_s"]
        lines.append(_target(f"{r['arch']} / v4 {r['dtype']} tg time", f"{decode:.2f}× (per weight byte read "
                             f"{per_byte:.2f}×)", f"≤ {TARGET_ARCH_TG:.2f}×", decode <= TARGET_ARCH_TG))
        lines.append(_target(f"{r['arch']} / v4 {r['dtype']} pp tokens/s", f"{prompt:.2f}×",
                             f"≥ {TARGET_ARCH_PP:.1f}×", prompt >= TARGET_ARCH_PP))
    return lines


def _round_floats(d: dict) -> dict:
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in d.items()}


def report(args, source: str, shape_name: str | None, schedule: str, schedule_note: str,
           per_threads: list[tuple[dict, list[dict], dict]]) -> None:
    first = next(iter(per_threads[0][2]["models"].values()))
    first_ready = first.ready
    bw_ready = per_threads[0][2]["bandwidth"].ready
    dims = {}
    for (arch, _), child in per_threads[0][2]["models"].items():
        r = child.ready
        dims.setdefault(arch, f"n_layer={r['n_layer']} n_embd={r['n_embd']} n_vocab={r['n_vocab']} n_ffn={r['n_ffn']}")
    print(f"# rwkvx bench: {source}; " + "; ".join(d if a is None or len(dims) == 1 else f"{a}: {d}"
                                                  for a, d in dims.items()))
    print(f"rwkvx {first_ready['rwkvx']} (OpenMP {'on' if first_ready['openmp'] else 'OFF: serial build'}, "
          f"SIMD level {first_ready['simd_level']}); numpy {bw_ready['numpy']} with {bw_ready['blas']}; "
          f"{cpu_name()}, {os.cpu_count()} CPUs, {_l3_text()}")
    print(f"pp={args.pp} tokens (rwkvx chunk {first_ready['chunk_size']}, numpy chunk "
          f"{args.numpy_chunk_size or args.pp}), tg={args.tg} tokens, batch={args.batch} sequences x {args.tg} steps; "
          f"{args.runs} rounds after warm-up, median [min–max]; schedule {schedule} ({schedule_note}); "
          f"weights {'mapped' if args.mmap else 'read into memory (--no-mmap)'}")
    l3 = _l3_bytes()
    small = l3 is not None and bw_ready["bytes"] < 2 * l3
    for bw, _, _ in per_threads:
        print(f"bandwidth, {bw['threads']} thread(s), {bw['bytes'] / 2**20:.0f} MiB float32"
              f"{' (under twice the L3: may measure the cache)' if small else ''}: "
              f"sgemv {_rng(bw['sgemv_gb_s'], bw['sgemv_gb_s_min'], bw['sgemv_gb_s_max'], '.2f')} GB/s, "
              f"threaded sum {_rng(bw['sum_gb_s'], bw['sum_gb_s_min'], bw['sum_gb_s_max'], '.2f')} GB/s "
              f"-> measured {bw['measured_gb_s']:.2f} GB/s")
    print()
    all_rows = [r for _, rows, _ in per_threads for r in rows]
    print("\n".join(table(all_rows, args.batch)))
    if any(r["rss_shared_with"] for r in all_rows):
        print()
        print("† the numpy baseline runs in the rwkvx float32 process on the same weight arrays: one RSS for both")
    huge = [f"{r['dtype']} {r['huge_page_mb']:.0f} of {r['weight_nbytes'] / 1e6:.0f} MB" for r in all_rows
            if r["candidate"] == "rwkvx" and r["huge_page_mb"] is not None]
    if huge:
        print()
        print(f"resident in 2 MB pages after load (weights of 4 KB pages cost a TLB miss per page read): "
              f"{', '.join(huge)}")
    cached = sorted({r["dtype"] for r in all_rows if l3 is not None and r["bytes_per_token"] < l3})
    if cached:
        print(f"note: {', '.join(cached)} read less than the reported L3 ({l3 / 2**20:.0f} MiB) per token, so decode "
              f"may run partly from cache and exceed 100% of the measured (DRAM) bandwidth")
    for bw, rows, _ in per_threads:
        for arch in dict.fromkeys(r["arch"] for r in rows):
            print()
            if arch is not None and len(args.archs) > 1:
                print(f"{arch}:")
            print("\n".join(target_lines([r for r in rows if r["arch"] == arch], bw, args, shape_name)))
        compared = arch_lines(rows)
        if compared:
            print()
            print(f"threads={bw['threads']}, against RWKV-4 of the same width and depth (issue 15):")
            print("\n".join(compared))
    print()
    for bw, rows, _ in per_threads:
        print(json.dumps({"kind": "bandwidth", **_round_floats(bw)}))
        for r in rows:
            print(json.dumps({"kind": "result", **_round_floats(r)}))


def _l3_bytes() -> int | None:
    """The L3 size the OS reports (sysfs writes e.g. '491520K'), or None."""
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            text = f.read().strip()
    except OSError:
        return None
    scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:].upper(), 1)
    try:
        return int(text.rstrip("KkMmGg")) * scale
    except ValueError:
        return None


def _l3_text() -> str:
    l3 = _l3_bytes()
    return "L3 unknown" if l3 is None else f"L3 {l3 / 2**20:.0f} MiB"


# ---- command line ----

def _shape(text: str) -> str:
    if text not in SHAPES:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(PUBLIC_SHAPES)}, got {text!r}")
    return text


def _archs(text: str) -> list[str]:
    names = list(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    if not names or any(n not in ("v4", "v5", "v6", "v7") for n in names):
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of v4,v5,v6,v7, got {text!r}")
    return names


def _dtypes(text: str) -> list[str]:
    from rwkvx.errors import RwkvxError
    from rwkvx.model import split_format
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(DTYPES)} (each may be "
                                         f"DTYPE:ARITHMETIC, e.g. uint8:int8), got {text!r}")
    for name in names:
        try:
            split_format(name)
        except RwkvxError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return list(dict.fromkeys(names))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench", description="rwkvx prompt / decode / batched-decode speed per dtype, "
                                  "against measured memory bandwidth and a numpy/OpenBLAS baseline.")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", metavar="PATH", help="a checkpoint (safetensors or rwkv.cpp .bin)")
    which.add_argument("--shape", type=_shape, metavar="|".join(PUBLIC_SHAPES),
                       help="random bf16 weights of this shape (169M 12x768, 430M 24x1024, 1.5B 24x2048, "
                            "7B 32x4096)")
    parser.add_argument("--arch", type=_archs, default=None,
                        help="architecture(s) of the --shape weights, comma-separated: RWKV-4 (default; "
                             "RWKV-7 for 7B), RWKV-5.2/6/7 with heads of 64 and the World vocabulary (65536); "
                             "several (e.g. v4,v7) run interleaved in one run and are compared with RWKV-4; "
                             "the numpy baseline only for v4 alone")
    parser.add_argument("--dtypes", type=_dtypes, default=list(DTYPES),
                        help=f"comma-separated (default {','.join(DTYPES)}); DTYPE:ARITHMETIC loads with that "
                             "arithmetic, e.g. bfloat16:bfloat16 or uint8:int8")
    parser.add_argument("--threads", type=positive_int, default=2, help="threads (default 2)")
    parser.add_argument("--thread-sweep", action="store_true", help="run every thread count 1..--threads")
    parser.add_argument("--pp", type=positive_int, default=256, help="prompt tokens (default 256)")
    parser.add_argument("--tg", type=positive_int, default=32, help="decode tokens (and batch steps) per round (default 32)")
    parser.add_argument("--batch", type=positive_int, default=8, help="sequences in batched decoding (default 8)")
    parser.add_argument("--runs", type=positive_int, default=5, help="rounds; the median is reported (default 5)")
    parser.add_argument("--chunk-size", type=positive_int, default=None,
                        help="rwkvx tokens per sequence-mode pass (default: the model's)")
    parser.add_argument("--numpy-chunk-size", type=positive_int, default=None,
                        help="numpy baseline tokens per GEMM pass (default: the whole prompt)")
    parser.add_argument("--no-baseline", dest="baseline", action="store_false", help="skip the numpy baseline")
    parser.add_argument("--no-mmap", dest="mmap", action="store_false",
                        help="load with rwkvx.load(..., mmap=False): weights read into memory, not mapped")
    parser.add_argument("--bandwidth-mib", type=positive_int, default=1024,
                        help="size of the bandwidth test array (default 1024 MiB; keep it well above L3)")
    parser.add_argument("--schedule", choices=("auto", "interleaved", "sequential"), default="auto",
                        help="interleave rounds across child processes, or run them one at a time (default auto)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and token ids (default 0)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_child"]:
        return child_main(argv[1])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.model is not None and not os.path.isfile(args.model):
        parser.error(f"--model: no such file: {args.model}")
    thread_counts = list(range(1, args.threads + 1)) if args.thread_sweep else [args.threads]
    args.archs = args.arch or [DEFAULT_ARCH.get(args.shape, "v4")]
    if args.archs != ["v4"]:
        # scripts/numpy_rwkv.py is RWKV-4's math
        args.baseline = False

    try:
        with tempfile.TemporaryDirectory(prefix="rwkvx-bench-") as tmp:
            if args.model is not None:
                paths, source = {None: args.model}, f"checkpoint {args.model}"
            else:
                paths = {}
                for arch in args.archs:
                    paths[arch] = os.path.join(tmp, f"random-{arch}-{args.shape}.safetensors")
                    shape = SHAPES[args.shape]
                    if arch != "v4":
                        shape = (shape[0], shape[1], 65536)
                    write_checkpoint(paths[arch], shape, args.seed, arch)
                source = f"random {'+'.join(args.archs)} {args.shape} weights stored bf16 (seed {args.seed})"
            schedule, note = plan_schedule(args, sum(count_params(p) for p in paths.values()))
            per_threads = []
            for threads in thread_counts:
                results = run_threads(args, paths, threads, schedule)
                bw, rows = summarise(results, args, threads)
                per_threads.append((bw, rows, results))
        report(args, source, args.shape, schedule, note, per_threads)
    except RuntimeError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
