"""rwkvx speed when the cores are shared: decode, prompt and batched decoding, alone and next to
processes that keep cores busy, for several thread settings.

    PYTHONPATH=. python scripts/bench_contention.py [--quick] [--dtypes uint8,bfloat16]
        [--settings default,1,2,old] [--busy 0,1,2] [--runs 5] [--tg 16] [--pp 128] [--batch 8]
        [--extra "2 GOMP_SPINCOUNT=10000"] [--model PATH | --shape 430M]

Without --model it writes random RWKV-4 430M-shaped weights (24 x 1024, vocabulary 50277;
scripts/bench.py's writer) as bf16 safetensors to a temporary directory, deleted at the end.

Settings (one child process each, per dtype; the environment is set before rwkvx loads):

    default   threads=None and no OpenMP variables: what a user gets (rwkvx.kernels._parallel's
              thread_policy(), rwkvx's spin-then-sleep wait, fewer threads under contention)
    1, 2, N   threads=N, otherwise as default
    old       rwkvx before it handled shared cores: threads=None, GOMP_SPINCOUNT=300000
              (libgomp's own default spin) and RWKVX_ADAPTIVE_THREADS=0
    --extra "THREADS VAR=VALUE ..."   any other combination (THREADS: a count or "default"),
              e.g. --extra "2 OMP_WAIT_POLICY=passive" --extra "default RWKVX_ADAPTIVE_THREADS=0"

Busy levels: 0 (alone) and k processes that each spin a core (pure Python loops started by
this script and always stopped, also on Ctrl-C or when the script dies). In every round and
busy level each measurement runs for every child in turn, the starting child rotating, so
drift and other tenants hit every setting alike. Per measurement, after a pause and an
untimed warm call:

    tg      --tg calls of forward([token], state)                   -> ms/token
    pp      one forward(prompt) of --pp tokens from a fresh state   -> tokens/s
    batch   --tg calls of forward_batch(--batch x one token)        -> tokens/s, summed

(tg and batch stop after 3 s, with at least two calls, when a setting collapses.)

Output: the CPU and affinity, each setting's thread count and reason, a markdown table of
medians [min-max] over --runs rounds, the issue's target ratios (one core busy, default
settings, against one thread alone), then one JSON line per row. Progress goes to stderr.
Speed is measured, not asserted: the exit status does not depend on the targets.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

# scripts/ is first on sys.path when a script runs
from _args import cpu_name, positive_int
from bench import PROTOCOL, SHAPES, _send, _Timed, write_checkpoint

DTYPES = ("float32", "bfloat16", "float16", "uint8")
# libgomp's spin count when neither GOMP_SPINCOUNT nor OMP_WAIT_POLICY is set
LIBGOMP_DEFAULT_SPIN = "300000"
# an idle pool's OpenMP workers spin for a while after a call; the pause keeps one child's
# spinning out of the next child's measurement
PAUSE_S = 0.15
# after the busy processes start, before the first measurement: they are running by then
SETTLE_S = 0.3
# the most a decode or batch measurement runs (it stops early, after at least two steps)
BUDGET_S = 3.0
# the issue's targets: one core busy, default settings, against one thread on an idle machine
TARGET_BUSY_VS_ONE_THREAD = 1.3
KINDS = ("tg", "pp", "batch")
OPENMP_VARIABLES = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_SCHEDULE",
                    "OMP_DYNAMIC", "OMP_PROC_BIND", "OMP_PLACES", "GOMP_CPU_AFFINITY", "RWKVX_ADAPTIVE_THREADS")


# ---- child processes ----

def _child(spec: dict) -> None:
    import gc

    import numpy as np

    import rwkvx
    from rwkvx.kernels._parallel import adaptive_threads, thread_policy, wait_policy

    start = time.perf_counter()
    model = rwkvx.load(spec["path"], dtype=spec["dtype"], threads=spec["threads"])
    load_s = time.perf_counter() - start
    rng = np.random.default_rng(spec["seed"])
    ids = {
        "prompt": rng.integers(0, model.n_vocab, spec["pp"]).tolist(),
        "tg": rng.integers(0, model.n_vocab, spec["tg"]).tolist(),
        "batch": rng.integers(0, model.n_vocab, (spec["tg"], spec["batch"])).tolist(),
    }
    timed = _Timed(spec["dtype"], model, ids, spec["batch"])
    timed.warm_up()
    state, states = None, None

    def budgeted(step, items) -> float:
        # seconds per item; a setting that collapses under contention stops after
        # BUDGET_S (at least two items), or one round would take minutes
        step(items[0])
        start = time.perf_counter()
        done = 0
        for item in items:
            step(item)
            done += 1
            if done >= 2 and time.perf_counter() - start > BUDGET_S:
                break
        return (time.perf_counter() - start) / done

    def decode_step(token) -> None:
        nonlocal state
        _, state = model.forward([token], state)

    def batch_step(tokens) -> None:
        nonlocal states
        _, states = model.forward_batch([[t] for t in tokens], states)

    measure = {"tg": lambda: budgeted(decode_step, ids["tg"]), "pp": timed.pp,
               "batch": lambda: budgeted(batch_step, ids["batch"])}
    _, reason = thread_policy()
    _send({"event": "ready", "load_s": round(load_s, 2), "n_threads": model.n_threads,
           "policy": reason if spec["threads"] is None else f"{spec['threads']} (threads=)",
           "wait": wait_policy(), "adaptive": adaptive_threads(),
           "env": {k: os.environ[k] for k in OPENMP_VARIABLES if k in os.environ}})
    for line in sys.stdin:
        command = line.split()
        if len(command) == 2 and command[0] == "measure":
            time.sleep(PAUSE_S)
            gc.collect()
            gc.disable()
            try:
                seconds = measure[command[1]]()
            finally:
                gc.enable()
            _send({"event": "measured", "seconds": seconds})
        elif command == ["exit"]:
            return


# niceness of the children and busy processes (--nice); None leaves it unchanged
NICE: int | None = None


def _child_setup() -> None:
    # children must not outlive the script, even when it is killed with SIGKILL
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)    # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if NICE is not None:
        os.setpriority(os.PRIO_PROCESS, 0, NICE)


class Child:
    """One model process: a dtype under one thread setting."""

    def __init__(self, label: str, spec: dict, env: dict):
        self.label, self.spec = label, spec
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--_child", json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
                                     env=env, preexec_fn=_child_setup)
        self.ready: dict = {}

    def receive(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(PROTOCOL):
                return json.loads(line[len(PROTOCOL):])
            sys.stderr.write(line)
        code = self.proc.wait()
        raise RuntimeError(f"{self.label}: child exited with status {code} (its traceback is above)")

    def measure(self, kind: str) -> float:
        self.proc.stdin.write(f"measure {kind}\n")
        self.proc.stdin.flush()
        return self.receive()["seconds"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("exit\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


class BusyCores:
    """k processes that each keep one core busy while the block runs."""

    def __init__(self, k: int):
        self.k = k
        self.procs: list[subprocess.Popen] = []

    def __enter__(self):
        for _ in range(self.k):
            self.procs.append(subprocess.Popen([sys.executable, "-c", "while True: pass"],
                                               stdin=subprocess.DEVNULL, preexec_fn=_child_setup))
        if self.k:
            time.sleep(SETTLE_S)
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait()
        self.procs = []
        return False


# ---- settings ----

def _parse_setting(text: str) -> tuple[str, int | None, dict]:
    """(label, threads, environment) from "default", "old", a count, or "THREADS VAR=VALUE ..."."""
    words = text.split()
    if text == "old":
        return "old", None, {"GOMP_SPINCOUNT": LIBGOMP_DEFAULT_SPIN, "RWKVX_ADAPTIVE_THREADS": "0"}
    if not words:
        raise argparse.ArgumentTypeError("empty setting")
    head, assignments = words[0], words[1:]
    if head == "default":
        threads = None
    else:
        try:
            threads = positive_int(head)
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"expected default, old, a thread count or \"THREADS VAR=VALUE ...\", "
                                             f"got {text!r}") from None
    env = {}
    for a in assignments:
        name, sep, value = a.partition("=")
        if not sep or not name:
            raise argparse.ArgumentTypeError(f"expected VAR=VALUE, got {a!r} in {text!r}")
        env[name] = value
    label = head if not env else f"{head} {' '.join(assignments)}"
    return label, threads, env


def _settings(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected at least one setting")
    for n in names:
        _parse_setting(n)
    return names


def _dtypes(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in names if t not in DTYPES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(DTYPES)}, got {text!r}")
    return list(dict.fromkeys(names))


def _busy(text: str) -> list[int]:
    try:
        levels = sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated counts such as 0,1,2, got {text!r}") from None
    if not levels or levels[0] < 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated counts >= 0, got {text!r}")
    return levels


def child_env(env: dict) -> dict:
    out = {k: v for k, v in os.environ.items() if k not in OPENMP_VARIABLES}
    # numpy's BLAS plays no part in forward(); one thread keeps its pool from spinning
    out["OPENBLAS_NUM_THREADS"] = "1"
    out.update(env)
    return out


# ---- the parent ----

def _progress(text: str) -> None:
    print(f"[bench_contention] {text}", file=sys.stderr, flush=True)


def _load_average() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "unknown"


def run(args, path: str) -> tuple[list[Child], dict]:
    """Start every child, then the rounds; returns the children and {(child, busy, kind): [seconds]}."""
    children: list[Child] = []
    times: dict = {}
    try:
        for dtype in args.dtypes:
            for text in args.settings + args.extra:
                label, threads, env = _parse_setting(text)
                spec = {"path": path, "dtype": dtype, "threads": threads, "pp": args.pp, "tg": args.tg,
                        "batch": args.batch, "seed": args.seed}
                child = Child(f"{dtype} {label}", spec, child_env(env))
                child.setting = label
                child.ready = child.receive()
                children.append(child)
                _progress(f"{child.label}: {child.ready['n_threads']} thread(s), loaded in {child.ready['load_s']} s")
        for r in range(args.runs):
            start = time.perf_counter()
            levels = args.busy[r % len(args.busy):] + args.busy[:r % len(args.busy)]
            for k in levels:
                with BusyCores(k):
                    for i, kind in enumerate(args.kinds):
                        shift = (r + i) % len(children)
                        for child in children[shift:] + children[:shift]:
                            times.setdefault((child.label, k, kind), []).append(child.measure(kind))
            _progress(f"round {r + 1}/{args.runs} done in {time.perf_counter() - start:.0f} s")
    finally:
        for child in children:
            child.stop()
    return children, times


def _affinity_text() -> str:
    try:
        return f"{len(os.sched_getaffinity(0))} usable"
    except AttributeError:
        return "affinity unknown"


def _cell(values: list[float] | None, per: float, fmt: str, invert: bool) -> str:
    """Median [min-max] of per/seconds (a rate) or seconds*per (a time)."""
    if not values:
        return "—"
    conv = [(per / v) if invert else (v * per) for v in values]
    return f"{statistics.median(conv):{fmt}} [{min(conv):{fmt}}–{max(conv):{fmt}}]"


def report(args, source: str, children: list[Child], times: dict) -> None:
    print(f"# rwkvx under contention: {source}")
    print(f"{cpu_name()}, {os.cpu_count()} CPUs ({_affinity_text()}); tg={args.tg} tokens, pp={args.pp} tokens, "
          f"batch={args.batch} x {args.tg} steps; {args.runs} interleaved rounds, median [min–max]; "
          f"busy = processes spinning one core each"
          f"{'' if args.nice is None else f'; model and busy processes at niceness {args.nice}'}")
    print(f"{args.load_text} (1, 5, 15 min; above the busy processes' count, other programs ran too "
          f"and 'busy 0' was not alone)")
    print()
    seen = set()
    for child in children:
        if child.setting not in seen:
            seen.add(child.setting)
            print(f"- {child.setting}: threads {child.ready['policy']}; waiting: {child.ready['wait']}; "
                  f"fewer threads under contention: {'on' if child.ready['adaptive'] else 'off'}")
    print()
    print("| dtype | setting | threads (why) | busy | decode ms/token | prompt tokens/s | "
          f"batch-{args.batch} tokens/s |")
    print("|---|---|---|---:|---:|---:|---:|")
    rows = []
    for child in children:
        for k in args.busy:
            tg, pp, batch = (times.get((child.label, k, kind)) for kind in KINDS)
            print(f"| {child.spec['dtype']} | {child.setting} | {child.ready['policy']} | {k} "
                  f"| {_cell(tg, 1e3, '.1f', False)} | {_cell(pp, args.pp, '.1f', True)} "
                  f"| {_cell(batch, args.batch, '.1f', True)} |")
            rows.append({"dtype": child.spec["dtype"], "setting": child.setting, "threads": child.ready["n_threads"],
                         "policy": child.ready["policy"], "wait": child.ready["wait"],
                         "adaptive": child.ready["adaptive"], "env": child.ready["env"], "busy": k,
                         "tg_ms_runs": [round(v * 1e3, 3) for v in tg or []],
                         "pp_s_runs": [round(v, 4) for v in pp or []],
                         "batch_s_runs": [round(v, 4) for v in batch or []]})
    print()
    print("\n".join(target_lines(args, children, times)))
    print()
    for row in rows:
        print(json.dumps({"kind": "contention", "cpu": cpu_name(), "tg": args.tg, "pp": args.pp,
                          "batch": args.batch, **row}))


def target_lines(args, children: list[Child], times: dict) -> list[str]:
    """Default settings with one core busy against one thread alone, and default alone against old alone."""
    lines = []
    by = {(c.spec["dtype"], c.setting): c.label for c in children}
    med = statistics.median
    for dtype in args.dtypes:
        default, one, old = by.get((dtype, "default")), by.get((dtype, "1")), by.get((dtype, "old"))
        for kind, name, rate in (("tg", "decode time", False), ("pp", "prompt time", False),
                                 ("batch", "batch time", False)):
            busy1 = times.get((default, 1, kind)) if default else None
            alone1 = times.get((one, 0, kind)) if one else None
            if busy1 and alone1:
                ratio = med(busy1) / med(alone1)
                met = "met" if ratio <= TARGET_BUSY_VS_ONE_THREAD else "NOT met"
                lines.append(f"- {dtype} {name}, default with one core busy / 1 thread alone: **{ratio:.2f}×** "
                             f"(want ≤ {TARGET_BUSY_VS_ONE_THREAD}: {met})")
        for kind, name in (("tg", "decode"), ("pp", "prompt"), ("batch", "batch")):
            now = times.get((default, 0, kind)) if default else None
            then = times.get((old, 0, kind)) if old else None
            if now and then:
                lines.append(f"- {dtype} {name} alone, default / old: {med(now) / med(then):.3f}× time "
                             f"(want ≤ 1.03)")
    return lines


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench_contention", description="rwkvx decode / prompt / batch speed alone and next to busy processes.")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--model", metavar="PATH", help="a checkpoint (safetensors or rwkv.cpp .bin)")
    which.add_argument("--shape", choices=("169M", "430M", "1.5B"), default="430M",
                       help="random bf16 weights of this RWKV-4 shape (default 430M: 24 x 1024)")
    parser.add_argument("--quick", action="store_true",
                        help="about a minute: uint8, settings default,1,old, busy 0,1, 3 rounds, short runs")
    parser.add_argument("--dtypes", type=_dtypes, default=None, help="comma-separated (default uint8,bfloat16)")
    parser.add_argument("--settings", type=_settings, default=None,
                        help="comma-separated: default, old, or a thread count (default default,1,2,old)")
    parser.add_argument("--extra", action="append", default=[], metavar='"THREADS VAR=VALUE ..."',
                        help="one more setting with its own environment, e.g. \"2 OMP_WAIT_POLICY=passive\"")
    parser.add_argument("--busy", type=_busy, default=None,
                        help=f"busy-process counts (default 0..{os.cpu_count()}, this machine's CPU count)")
    parser.add_argument("--runs", type=positive_int, default=None, help="rounds; medians reported (default 5)")
    parser.add_argument("--tg", type=positive_int, default=None, help="decode tokens and batch steps (default 16)")
    parser.add_argument("--pp", type=positive_int, default=None, help="prompt tokens (default 128)")
    parser.add_argument("--batch", type=positive_int, default=8, help="sequences in batched decoding (default 8)")
    parser.add_argument("--kinds", default=None, help="comma-separated subset of tg,pp,batch (default all)")
    parser.add_argument("--nice", type=int, default=None,
                        help="niceness of the model and busy processes alike, e.g. -10 (as root) so other "
                             "tenants of a shared machine disturb less (default: unchanged)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and token ids (default 0)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_child"]:
        _child(json.loads(argv[1]))
        return 0
    parser = build_parser()
    args = parser.parse_args(argv)
    for extra in args.extra:
        try:
            _parse_setting(extra)
        except argparse.ArgumentTypeError as e:
            parser.error(f"--extra: {e}")
    quick = {"dtypes": ["uint8"], "settings": ["default", "1", "old"], "busy": [0, 1], "runs": 3, "tg": 8, "pp": 32}
    full = {"dtypes": ["uint8", "bfloat16"], "settings": ["default", "1", "2", "old"],
            "busy": list(range(0, (os.cpu_count() or 1) + 1)), "runs": 5, "tg": 16, "pp": 128}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    kinds = [k.strip() for k in (args.kinds or ",".join(KINDS)).split(",") if k.strip()]
    if not kinds or any(k not in KINDS for k in kinds):
        parser.error(f"--kinds: expected a comma-separated subset of {','.join(KINDS)}, got {args.kinds!r}")
    args.kinds = kinds
    if args.model is not None and not os.path.isfile(args.model):
        parser.error(f"--model: no such file: {args.model}")
    if args.nice is not None:
        if args.nice < os.getpriority(os.PRIO_PROCESS, 0) and os.geteuid() != 0:
            parser.error(f"--nice {args.nice}: a niceness below the current one needs root")
        global NICE
        NICE = args.nice
    try:
        with tempfile.TemporaryDirectory(prefix="rwkvx-contention-") as tmp:
            if args.model is not None:
                path, source = args.model, f"checkpoint {args.model}"
            else:
                path = os.path.join(tmp, f"random-{args.shape}.safetensors")
                write_checkpoint(path, SHAPES[args.shape], args.seed)
                n_layer, n_embd, n_vocab = SHAPES[args.shape]
                source = (f"random {args.shape}-shaped weights ({n_layer} x {n_embd}, vocabulary {n_vocab}, "
                          f"seed {args.seed})")
            load_before = _load_average()
            children, times = run(args, path)
            args.load_text = f"load average before {load_before}, after {_load_average()}"
        report(args, source, children, times)
    except RuntimeError as e:
        print(f"bench_contention: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench_contention: interrupted; busy processes and children stopped", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
