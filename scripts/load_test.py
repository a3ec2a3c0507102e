"""Load test for python -m rwkvx.serve, in the manner of vLLM's benchmark_serving.

Clients use the official openai package and stream, so time to first token (TTFT) and time
per output token (TPOT: the gaps between a request's tokens after the first) are measured
as a user sees them. Scenarios (--scenario, several allowed; default all):

  throughput    1 client, then C clients at once (--clients, default 8), each generating
                --max-tokens tokens (default 32): aggregate output tokens/s and the ratio
  interference  one client decoding alone, then again while another sends a long prompt
                (--long-prompt tokens, default 4000): its TPOT in both cases
  chat          a 20-turn conversation re-sending its history: TTFT per turn
  soak          --soak-requests requests (default 1000) from 16 clients with random
                parameters, 10% of them invalid: failures by kind, server RSS after the
                first 100 and at the end

The server is started by the script (--model, --dtype, --threads, --serve-arg), so that its
memory can be read, or an existing one is used (--url). Example, 430M-shaped random uint8:

    python scripts/load_test.py --shape 430M --dtype uint8
"""
from __future__ import annotations

import argparse
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

# scripts/ is first on sys.path when a script runs
from _args import cpu_name

WORDS = ("the of and to in is was for on that with as by at from his it an were are which this be or "
         "has had not first their its new after one also who but they two been her all there").split()


def text_of(n_words: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def percentiles(values: list[float]) -> str:
    if not values:
        return "-"
    v = sorted(values)

    def at(q):
        return v[min(len(v) - 1, int(q * len(v)))]
    return f"{at(0.5) * 1000:.1f} / {at(0.9) * 1000:.1f} / {at(0.99) * 1000:.1f}"


class Server:
    def __init__(self, args):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "rwkvx.serve", "-m", args.model, "--dtype", args.dtype, "--port",
               str(self.port), "--model-name", "m", *args.serve_arg]
        if args.threads:
            cmd += ["-t", str(args.threads)]
        if args.tokenizer:
            cmd += ["--tokenizer", args.tokenizer]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited: {self.proc.stderr.read()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise SystemExit("server did not start")

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(30)


def stream_one(client, prompt: str, max_tokens: int, **extra) -> dict:
    """One streamed completion: TTFT, the gaps between tokens, tokens generated."""
    start = time.perf_counter()
    times = []
    stream = client.completions.create(model="m", prompt=prompt, max_tokens=max_tokens, stream=True,
                                       stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True, **extra.pop("extra_body", {})}, **extra)
    tokens = 0
    for chunk in stream:
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].text:
            times.append(time.perf_counter())
    end = time.perf_counter()
    return {"ttft": times[0] - start if times else end - start,
            "gaps": [b - a for a, b in zip(times, times[1:])], "tokens": tokens, "seconds": end - start}


class HealthProbe:
    """GET /health every 20 ms in a thread while a scenario runs: how long the server's HTTP
    side takes to answer while its engine is busy (is it starved by the kernels?)."""

    def __init__(self, client):
        self.url = str(client.base_url).rstrip("/").removesuffix("/v1") + "/health"
        self.times: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.02):
            start = time.perf_counter()
            with urllib.request.urlopen(self.url, timeout=30) as r:
                r.read()
            self.times.append(time.perf_counter() - start)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def scenario_throughput(client, args) -> list[str]:
    prompt = text_of(20, 1)
    stream_one(client, prompt, 4)  # warm up
    health: list[float] = []

    def run(n):
        start = time.perf_counter()
        with ThreadPoolExecutor(n) as pool, HealthProbe(client) as probe:
            results = list(pool.map(lambda i: stream_one(client, text_of(20, i), args.max_tokens, seed=i), range(n)))
        seconds = time.perf_counter() - start
        if n > 1:
            health.extend(probe.times)
        return results, sum(r["tokens"] for r in results) / seconds, seconds

    rows, ratios = [], []
    for _ in range(args.rounds):
        one, one_rate, _ = run(1)
        many, many_rate, seconds = run(args.clients)
        ratios.append(many_rate / one_rate)
        rows.append((one_rate, many_rate, many))
    one_rate = statistics.median(r[0] for r in rows)
    many_rate = statistics.median(r[1] for r in rows)
    all_many = [r for row in rows for r in row[2]]
    return ["| clients | output tokens/s | TTFT p50/p90/p99 ms | TPOT p50/p90/p99 ms |", "|---|---:|---:|---:|",
            f"| 1 | {one_rate:.1f} | | |",
            f"| {args.clients} | {many_rate:.1f} | {percentiles([r['ttft'] for r in all_many])} | "
            f"{percentiles([g for r in all_many for g in r['gaps']])} |",
            "", f"aggregate {args.clients} clients / 1 client: median {statistics.median(ratios):.2f}x "
            f"(rounds: {', '.join(f'{x:.2f}' for x in ratios)}); GET /health while they stream, "
            f"p50/p90/p99 {percentiles(health)} ms"]


def scenario_interference(client, args) -> list[str]:
    long_prompt = text_of(args.long_prompt, 7)  # about one token a word
    alone = stream_one(client, text_of(10, 2), 64)
    result = {}

    def background():
        result["long"] = stream_one(client, long_prompt + " " + text_of(5, time.time_ns()), 4)

    thread = threading.Thread(target=background)
    thread.start()
    time.sleep(0.3)  # the long prompt is being prefilled
    during = stream_one(client, text_of(10, 3), 64)
    thread.join()
    a, d = statistics.median(alone["gaps"]), statistics.median(during["gaps"])
    return [f"TPOT alone {a * 1000:.1f} ms; while a {args.long_prompt}-word prompt is prefilled "
            f"{d * 1000:.1f} ms (ratio {d / a:.2f}x; p90 {percentiles(during['gaps'])} ms); the long "
            f"prompt's TTFT {result['long']['ttft']:.2f} s"]


def chat_ttfts(client, conversation: int) -> tuple[list[float], list[tuple[int, int]]]:
    """One 20-turn conversation (its words depend on `conversation`): TTFT and (cached,
    prompt) tokens per turn."""
    messages = [{"role": "system", "content": "You are a helpful assistant."}]
    ttfts, cached = [], []
    for turn in range(20):
        messages.append({"role": "user", "content": f"Question {turn}: " + text_of(12, 1000 * conversation + turn)})
        start = time.perf_counter()
        first = None
        reply = ""
        usage = None
        for chunk in client.chat.completions.create(model="m", messages=messages, max_tokens=24, stream=True,
                                                    seed=turn, stream_options={"include_usage": True}):
            if chunk.usage is not None:
                usage = chunk.usage
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter()
                reply += chunk.choices[0].delta.content
        ttfts.append((first or time.perf_counter()) - start)
        cached.append((usage.prompt_tokens_details.cached_tokens, usage.prompt_tokens) if usage else (0, 0))
        messages.append({"role": "assistant", "content": reply})
    return ttfts, cached


def scenario_chat(client, args) -> list[str]:
    # a first token that is only whitespace is held back from a chat reply, so one turn's
    # TTFT can include a decode step or two more than another's: medians over --rounds
    # conversations of different words
    runs = [chat_ttfts(client, r) for r in range(args.rounds)]
    first = statistics.median(t[0] for t, _ in runs)
    last = statistics.median(t[-1] for t, _ in runs)
    middle = statistics.median(x for t, _ in runs for x in t[1:])
    cached = runs[-1][1]
    return [f"TTFT turn 1 {first * 1000:.0f} ms, turn 20 {last * 1000:.0f} ms (ratio {last / first:.2f}x; "
            f"medians of {len(runs)} conversations; per conversation "
            f"{', '.join(f'{t[-1] / t[0]:.2f}' for t, _ in runs)}); turns 2-20 median {middle * 1000:.0f} ms; "
            f"turn 20 prompt {cached[-1][1]} tokens, {cached[-1][0]} from the cache"]


def cache_mb(client) -> float:
    """The server's state cache size, from /metrics."""
    url = str(client.base_url).rstrip("/").removesuffix("/v1") + "/metrics"
    with urllib.request.urlopen(url, timeout=30) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("rwkvx_state_cache_bytes "):
                return float(line.split()[1]) / 2**20
    return float("nan")


def scenario_soak(client, args, server) -> list[str]:
    import openai
    outcomes: dict[str, int] = {}
    rss = {}
    lock = threading.Lock()

    def one(i):
        r = random.Random(i)
        invalid = r.random() < 0.1
        kwargs = dict(model="m", prompt=text_of(r.randint(1, 60), i), max_tokens=r.randint(1, 24),
                      temperature=r.choice([0, 0.5, 1.0, 1.5]), top_p=r.choice([0.3, 0.9, 1.0]), seed=i,
                      stream=r.random() < 0.5)
        if invalid:
            field, value = r.choice([("temperature", -1), ("top_p", 0), ("top_p", 1.5), ("max_tokens", 0),
                                     ("max_tokens", 10**9), ("presence_penalty", 5)])
            kwargs[field] = value
        try:
            result = client.completions.create(**kwargs)
            if kwargs["stream"]:
                for _ in result:
                    pass
            kind = "ok" if not invalid else "ok (invalid accepted!)"
        except openai.BadRequestError:
            kind = "400 (expected)" if invalid else "400 (unexpected)"
        except openai.APIStatusError as e:
            kind = f"{e.status_code}"
        except Exception as e:  # connection errors: the server crashed or hung up
            kind = f"failure: {type(e).__name__}"
        with lock:
            outcomes[kind] = outcomes.get(kind, 0) + 1
            if server is not None and sum(outcomes.values()) == 100:
                rss["after 100"] = server.rss_mb()
                rss["cache 100"] = cache_mb(client)

    start = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, range(args.soak_requests)))
    seconds = time.perf_counter() - start
    lines = [f"{args.soak_requests} requests from 16 clients in {seconds:.1f} s: "
             + ", ".join(f"{k}: {v}" for k, v in sorted(outcomes.items()))]
    if server is not None:
        end = server.rss_mb()
        cache = cache_mb(client)
        lines.append(f"server RSS after 100 requests {rss['after 100']:.0f} MB (state cache {rss['cache 100']:.0f} MB), "
                     f"after {args.soak_requests} {end:.0f} MB (state cache {cache:.0f} MB, bounded by --state-cache-mb); "
                     f"RSS less the cache {(end - cache) / (rss['after 100'] - rss['cache 100']) * 100 - 100:+.1f}%")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="an already running server (default: start one)")
    p.add_argument("--model", help="checkpoint for the server (default: a random one of --shape)")
    p.add_argument("--shape", default="430M", help="random checkpoint shape from scripts/bench.py (default: 430M)")
    p.add_argument("--dtype", default="uint8")
    p.add_argument("--tokenizer")
    p.add_argument("--threads", type=int)
    p.add_argument("--serve-arg", action="append", default=[], help="extra argument for the server (repeatable)")
    p.add_argument("--scenario", action="append", choices=("throughput", "interference", "chat", "soak"))
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--long-prompt", type=int, default=4000)
    p.add_argument("--soak-requests", type=int, default=1000)
    args = p.parse_args()
    import openai

    server = None
    if args.url is None:
        if args.model is None:
            from bench import SHAPES, write_checkpoint
            path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"rwkvx-load-{args.shape}.safetensors")
            if not os.path.exists(path):
                write_checkpoint(path, SHAPES[args.shape], seed=0)
            args.model = path
        server = Server(args)
        url = server.url
    else:
        url = args.url
    client = openai.OpenAI(base_url=url + "/v1", api_key=os.environ.get("OPENAI_API_KEY", "none"), max_retries=0,
                           timeout=600)
    print(f"# rwkvx load test: {args.model or url}, dtype {args.dtype}, CPU {cpu_name()}, {os.cpu_count()} CPUs")
    try:
        for name in args.scenario or ("throughput", "interference", "chat", "soak"):
            print(f"\n## {name}")
            if name == "soak":
                lines = scenario_soak(client, args, server)
            else:
                lines = globals()[f"scenario_{name}"](client, args)
            print("\n".join(lines), flush=True)
    finally:
        if server is not None:
            server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
