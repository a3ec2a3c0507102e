"""Chat turn latency: time to first token and per token at turns 1..20 of one conversation.

A conversation lives in the state, so turn 20 should cost what turn 1 does. Each turn sends
an 18-token message and lets the model write a reply of up to --reply tokens (the Raven
template, ChatRWKV's sampling); a bare decode step is timed beside turns 1 and 20, and at
the end the whole conversation is fed from scratch once, which is what a stateless runtime
pays per turn. Repeats --runs times and prints medians.

    python scripts/bench_chat.py -m rwkv-430m-uint8.safetensors --dtype uint8
"""
from __future__ import annotations

import argparse
import statistics
import time

import rwkvx
from rwkvx import templates
from rwkvx.chat import Conversation
from rwkvx.tokenizer import default_tokenizer

# scripts/ is first on sys.path when a script runs
from _args import add_model_args, cpu_name


def one_run(model, tokenizer, reply_tokens: int, seed: int) -> dict:
    sampler = rwkvx.Sampler(1.0, 0.3, 0, 0.5, 0.5, 0.996, seed=seed)
    chat = Conversation(model, tokenizer, templates.RAVEN, sampler, max_tokens=reply_tokens)

    def bare_ms(state, n=16):
        times = []
        for t in range(n):
            start = time.perf_counter()
            _, state = model.forward([(1000 + t) % model.n_vocab], state)
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e3

    turns = {}
    for turn in range(1, 21):
        reply = chat.say(f"This is message number {turn}. Tell me something about tea, please.")
        for _ in reply:
            pass
        if turn in (1, 20):
            turns[turn] = dict(ttft=reply.first_token_seconds * 1e3, per_token=reply.token_seconds * 1e3,
                               conversation=chat.n_tokens, bare=bare_ms(chat.state))
    start = time.perf_counter()
    model.forward(chat.tokens)
    turns["refeed"] = dict(seconds=time.perf_counter() - start, tokens=len(chat.tokens))
    return turns


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(p)
    p.add_argument("--reply", type=int, default=32)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    model = rwkvx.load(args.model, dtype=args.dtype, threads=args.threads)
    tokenizer = rwkvx.load_tokenizer(args.tokenizer or default_tokenizer(args.model, model.n_vocab), model.n_vocab)
    runs = [one_run(model, tokenizer, args.reply, seed) for seed in range(args.runs)]

    def med(turn, key):
        return statistics.median(r[turn][key] for r in runs)

    cpu = cpu_name()
    print(f"# {args.model}, dtype {args.dtype}, {model.n_threads} threads, {cpu}; medians of {args.runs} runs")
    print("| turn | conversation tokens | time to first token ms | per token ms | bare decode ms |")
    print("|---|---:|---:|---:|---:|")
    for turn in (1, 20):
        print(f"| {turn} | {med(turn, 'conversation'):.0f} | {med(turn, 'ttft'):.0f} | {med(turn, 'per_token'):.1f} | "
              f"{med(turn, 'bare'):.1f} |")
    print(f"feeding the whole {med('refeed', 'tokens'):.0f}-token conversation from scratch: "
          f"{med('refeed', 'seconds'):.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
