"""Start-up of `python -m rwkvx.run` on a long prompt, without and with --prompt-cache.

Each round runs, interleaved: the prompt with no cache; the prompt with a cache made by an
earlier run of the same prompt (all but its last token reused); and the prompt plus a new
sentence (the whole cached prompt reused). Each command generates one token, so its wall
time is start-up: Python, loading (mapped), reading the cache, the prompt, one token.
Medians over --rounds; the machine's CPU is printed with them.

    python scripts/bench_prompt_cache.py -m rwkv-430m-uint8.safetensors --dtype uint8 --tokens 2000
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
# scripts/ is first on sys.path when a script runs
from _args import add_model_args, cpu_name


def prompt_of(n_tokens: int, tokenizer) -> str:
    """English prose (this project's README, repeated) cut to about n_tokens tokens."""
    with open(os.path.join(HERE, "..", "README.md"), encoding="utf-8") as f:
        text = re.sub(r"\s+", " ", f.read())
    while len(tokenizer.encode(text)) < n_tokens:
        text += " " + text
    ids = tokenizer.encode(text)[:n_tokens]
    return tokenizer.decode(ids)


def run(args, prompt_file: str, cache: str | None) -> tuple[float, float, str]:
    cmd = [sys.executable, "-m", "rwkvx.run", "-m", args.model, "--dtype", args.dtype, "-f", prompt_file,
           "-n", "1", "-s", "1"]
    if args.threads:
        cmd += ["-t", str(args.threads)]
    if cache:
        cmd += ["--prompt-cache", cache]
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode:
        raise SystemExit(result.stderr)
    prompt_seconds = float(re.search(r"prompt \d+ tokens in ([\d.]+) s", result.stderr).group(1))
    reused = re.search(r"reused (\d+ of \d+)", result.stderr)
    return seconds, prompt_seconds, reused.group(1) if reused else "-"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(p)
    p.add_argument("--tokens", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()

    import rwkvx
    from rwkvx.loader import describe
    from rwkvx.tokenizer import default_tokenizer
    n_vocab = describe(args.model).n_vocab
    tokenizer = rwkvx.load_tokenizer(args.tokenizer or default_tokenizer(args.model, n_vocab), n_vocab)
    with tempfile.TemporaryDirectory() as tmp:
        prompt = os.path.join(tmp, "prompt.txt")
        longer = os.path.join(tmp, "longer.txt")
        text = prompt_of(args.tokens, tokenizer)
        with open(prompt, "w", encoding="utf-8") as f:
            f.write(text)
        with open(longer, "w", encoding="utf-8") as f:
            f.write(text + " And now, a question about all of that?")
        cache = os.path.join(tmp, "prompt.cache")
        run(args, prompt, cache)  # makes the cache
        rows: dict[str, list[tuple[float, float, str]]] = {"no cache": [], "same prompt, cached": [],
                                                            "prompt + a sentence, cached": []}
        for _ in range(args.rounds):
            rows["no cache"].append(run(args, prompt, None))
            rows["same prompt, cached"].append(run(args, prompt, cache))
            # a copy, so the longer prompt does not replace the cache the next round uses
            extended = os.path.join(tmp, "extended.cache")
            with open(cache, "rb") as src, open(extended, "wb") as dst:
                dst.write(src.read())
            rows["prompt + a sentence, cached"].append(run(args, longer, extended))
    cpu = cpu_name()
    print(f"# {args.model}, dtype {args.dtype}, {args.tokens}-token prompt, one token generated; {cpu}; "
          f"medians of {args.rounds} interleaved rounds")
    print("| run | wall time s | prompt s (stderr) | prompt tokens reused |")
    print("|---|---:|---:|---:|")
    for name, values in rows.items():
        print(f"| {name} | {statistics.median(v[0] for v in values):.2f} | "
              f"{statistics.median(v[1] for v in values):.3f} | {values[-1][2]} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
