"""Load time and peak memory for an RWKV-4 430M-shaped checkpoint in each format.

    python scripts/bench_load.py [--dir /tmp/rwkvx-bench] [--torch-python /path/to/python]

Makes (once) a random model of RWKV-4 430M's shape (24 layers x 1024, vocabulary 50277)
saved as a bf16 .pth by torch.save, as BlinkDL releases them, then converts it with
``python -m rwkvx.convert`` to float32 and uint8. torch is needed only to write the .pth:
if this interpreter has none, pass one that has (--torch-python).

Each case runs in a fresh process, which reports its peak resident memory (VmHWM from
/proc/self/status, which counts mapped file pages once touched) after the load and again
after one decoded token, when every weight has been read once:

  (a) .pth -> float32      (b) .pth -> uint8      (c) converted float32      (d) converted uint8
  (e) .pth -> bfloat16 (maps the file, no copy)

Targets (issue 3): (c) and (d) peak RSS within 1.1x the file size + 100 MB and load under
1 s plus page-in; (b) peak RSS within the uint8 weights + the largest float tensor + 100 MB.
The .pth is read from the page cache (warm) after the first run. rwkvx.convert evicts what
it writes (see rwkvx.hugepages), so the converted files' first token reads them from disk.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

N_LAYER, N_EMBD, N_VOCAB = 24, 1024, 50277
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs under an interpreter with torch: random weights with BlinkDL's names and shapes, bf16.
MAKE_PTH = r"""
import collections, sys, torch
n_layer, c, vocab, path = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
g = torch.Generator().manual_seed(0)
def mat(r, k):
    return (torch.randn(r, k, generator=g) / k ** 0.5).to(torch.bfloat16)
def vec(lo, hi, shape):
    return (torch.rand(shape, generator=g) * (hi - lo) + lo).to(torch.bfloat16)
sd = collections.OrderedDict()
sd["emb.weight"] = torch.randn(vocab, c, generator=g).to(torch.bfloat16)
sd["blocks.0.ln0.weight"] = vec(0.9, 1.1, (c,)); sd["blocks.0.ln0.bias"] = vec(-0.1, 0.1, (c,))
for i in range(n_layer):
    p = f"blocks.{i}."
    for ln in ("ln1", "ln2"):
        sd[p + ln + ".weight"] = vec(0.9, 1.1, (c,)); sd[p + ln + ".bias"] = vec(-0.1, 0.1, (c,))
    sd[p + "att.time_decay"] = vec(-6, 1, (c,))
    sd[p + "att.time_first"] = vec(-2.2, -0.2, (c,))
    for name in ("att.time_mix_k", "att.time_mix_v", "att.time_mix_r"):
        sd[p + name] = vec(0, 1, (1, 1, c))
    for name in ("att.key", "att.value", "att.receptance", "att.output"):
        sd[p + name + ".weight"] = mat(c, c)
    for name in ("ffn.time_mix_k", "ffn.time_mix_r"):
        sd[p + name] = vec(0, 1, (1, 1, c))
    sd[p + "ffn.key.weight"] = mat(4 * c, c)
    sd[p + "ffn.receptance.weight"] = mat(c, c)
    sd[p + "ffn.value.weight"] = mat(c, 4 * c)
sd["ln_out.weight"] = vec(0.9, 1.1, (c,)); sd["ln_out.bias"] = vec(-0.1, 0.1, (c,))
sd["head.weight"] = mat(vocab, c)
torch.save(sd, path)
"""

# Runs in a fresh process per case: load, then one token; peak RSS after each.
CASE = r"""
import json, resource, sys, time
def hwm():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
import rwkvx
path, dtype = sys.argv[1], sys.argv[2]
base = hwm()
t0 = time.perf_counter()
model = rwkvx.load(path, dtype=dtype, threads=1)
t1 = time.perf_counter()
after_load = hwm()
model.forward([187])
t2 = time.perf_counter()
w = model.weights
matrices = [b[n] for b in w.blocks for n in ("ffn_key", "ffn_value")] + [w.head]
largest = max(m.shape[0] * m.shape[1] for m in matrices) * 4
print(json.dumps({"base": base, "load_s": t1 - t0, "rss_load": after_load, "token_s": t2 - t1,
                  "rss_token": hwm(), "weights": model.nbytes, "largest_f32": largest}))
"""


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if result.returncode:
        raise SystemExit(f"{cmd[0]} {cmd[1] if cmd[1] != '-c' else '-c ...'} failed:\n{result.stderr.strip()}")
    return result


def timed_child_rss(cmd: list[str]) -> tuple[float, int]:
    """Wall time and peak RSS of a child process (ru_maxrss of the waited-for child)."""
    start = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed: {err.strip()}")
    return time.perf_counter() - start, usage.ru_maxrss * 1024


def mb(n: float) -> str:
    return f"{n / 1e6:,.0f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/tmp/rwkvx-bench", help="where the checkpoints are made (about 3 GB)")
    ap.add_argument("--torch-python", default=sys.executable, help="an interpreter with torch, to write the .pth")
    ap.add_argument("--repeat", type=int, default=1, help="runs per case; the table shows the fastest load")
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    pth = os.path.join(args.dir, "rwkv4-430m-shape-bf16.pth")
    f32 = os.path.join(args.dir, "rwkv4-430m-shape-float32.safetensors")
    u8 = os.path.join(args.dir, "rwkv4-430m-shape-uint8.safetensors")

    if not os.path.exists(pth):
        print(f"writing {pth} with torch.save ...", file=sys.stderr)
        run([args.torch_python, "-c", MAKE_PTH, str(N_LAYER), str(N_EMBD), str(N_VOCAB), pth])
    conversions = {}
    for dst, dtype in ((f32, "float32"), (u8, "uint8")):
        seconds, rss = timed_child_rss([sys.executable, "-m", "rwkvx.convert", pth, dst, "--dtype", dtype, "--force"])
        conversions[dtype] = (seconds, rss)

    cases = [("(a) .pth -> float32", pth, "float32"), ("(b) .pth -> uint8", pth, "uint8"),
             ("(c) converted float32", f32, "float32"), ("(d) converted uint8", u8, "uint8"),
             ("(e) .pth -> bfloat16", pth, "bfloat16")]
    rows = []
    for label, path, dtype in cases:
        results = [json.loads(run([sys.executable, "-c", CASE, path, dtype]).stdout) for _ in range(args.repeat)]
        r = min(results, key=lambda x: x["load_s"])
        size = os.path.getsize(path)
        if label.startswith("(c)") or label.startswith("(d)"):
            target = 1.1 * size + 100e6
            target_text = f"<= {mb(target)} (1.1 x file + 100 MB), load < 1 s"
            ok = r["rss_load"] <= target and r["rss_token"] <= target and r["load_s"] < 1.0
        elif label.startswith("(b)"):
            target = r["weights"] + r["largest_f32"] + 100e6
            target_text = f"<= {mb(target)} (uint8 weights + largest f32 tensor + 100 MB)"
            ok = r["rss_load"] <= target and r["rss_token"] <= target
        else:
            target_text, ok = "-", None
        rows.append((label, size, r, target_text, ok))

    print(f"RWKV-4 430M shape ({N_LAYER} x {N_EMBD}, vocabulary {N_VOCAB}); peak RSS in MB (VmHWM), "
          f"python + numpy + rwkvx imported: {mb(rows[0][2]['base'])} MB\n")
    print("| case | file MB | weights MB | load s | 1st token s (page-in) | peak RSS after load | "
          "peak RSS after 1st token | target | met |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---|")
    for label, size, r, target_text, ok in rows:
        met = "-" if ok is None else ("yes" if ok else "NO")
        print(f"| {label} | {mb(size)} | {mb(r['weights'])} | {r['load_s']:.2f} | {r['token_s']:.2f} | "
              f"{mb(r['rss_load'])} | {mb(r['rss_token'])} | {target_text} | {met} |")
    print()
    for dtype, (seconds, rss) in conversions.items():
        print(f"convert .pth -> {dtype}: {seconds:.1f} s, peak RSS {mb(rss)} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
