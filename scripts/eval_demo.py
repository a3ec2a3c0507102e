"""Held-out bits per byte of a demo checkpoint in every dtype, and seeded samples.

    python scripts/eval_demo.py [CHECKPOINT]     (default: the packaged demo model)

The held-out text is rebuilt by scripts/demo_corpus.py from this Python's documentation;
it is never trained on. The numbers go into rwkvx/demo/CARD.md.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_corpus import build_corpus  # noqa: E402

import rwkvx  # noqa: E402

PROMPTS = ["The built-in function ", "def ", "A list is "]


def bits_per_byte(model, data: bytes, window: int = 4096) -> float:
    """Mean -log2 p(byte | all bytes before it in its window), windows carried in state."""
    total, count, state = 0.0, 0, None
    for begin in range(0, len(data) - 1, window):
        chunk = data[begin:begin + window + 1]
        logits, state = model.forward(list(chunk[:-1]), state, all_logits=True)
        z = logits.astype(np.float64)
        z -= z.max(axis=1, keepdims=True)
        log_probs = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        total -= log_probs[np.arange(len(chunk) - 1), list(chunk[1:])].sum()
        count += len(chunk) - 1
    return total / count / math.log(2)


def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 else "demo"
    heldout = build_corpus().heldout
    print(f"held-out text: {len(heldout)} bytes")
    for dtype in ("float32", "bfloat16", "float16", "uint8"):
        print(f"{dtype:>9}: {bits_per_byte(rwkvx.load(path, dtype=dtype), heldout):.4f} bits per byte")
    model = rwkvx.load(path)
    tokenizer = rwkvx.ByteTokenizer()
    for seed, prompt in enumerate(PROMPTS, start=1):
        sampler = rwkvx.Sampler(temperature=1.0, top_p=0.85, seed=seed)
        text = "".join(rwkvx.generate(model, tokenizer, prompt, max_tokens=200, sampler=sampler))
        print(f"\n--- seed {seed}, prompt {prompt!r}:\n{prompt}{text}")


if __name__ == "__main__":
    main()
