"""Random RWKV-5.2/6/7 checkpoints with BlinkDL's names and shapes (tests, benchmarks).

Values are scaled like trained models (mixes in [0, 1], decays spread over fast and slow
channels, matrices N(0, 1/n_in)), so every path of the layer math is exercised.
"""
from __future__ import annotations

import numpy as np

from rwkvx.testing import LazyTensor, draw_normal, materialise


def random_checkpoint(version: str, n_layer=3, n_embd=64, head_size=16, n_vocab=97, n_ffn=None,
                      seed=0, lora=8, lazy=False) -> dict:
    """BlinkDL's tensors of a random model; version "v5", "v6" or "v7".

    lazy=True returns rwkvx.testing.LazyTensors (shapes now, values made in order on demand)
    with the same values, so a model bigger than memory can be written one tensor at a time.
    """
    rng = np.random.default_rng(seed)
    c, h = n_embd, n_embd // head_size
    f = n_ffn or 4 * n_embd

    def normal(shape, scale=1.0, divisor=1.0) -> LazyTensor:
        return LazyTensor(shape, lambda: draw_normal(rng, shape, scale, divisor))

    def mat(rows, cols, scale=1.0) -> LazyTensor:
        return normal((rows, cols), scale, np.sqrt(cols))

    def vec(lo=0.0, hi=1.0, shape=(1, 1, c)) -> LazyTensor:
        return LazyTensor(shape, lambda: rng.uniform(lo, hi, shape).astype(np.float32))

    t = {"emb.weight": normal((n_vocab, c)),
         "blocks.0.ln0.weight": vec(0.8, 1.2, (c,)), "blocks.0.ln0.bias": vec(-0.1, 0.1, (c,))}
    for layer in range(n_layer):
        b, att, ffn = f"blocks.{layer}.", f"blocks.{layer}.att.", f"blocks.{layer}.ffn."
        for ln in ("ln1", "ln2"):
            t[f"{b}{ln}.weight"] = vec(0.8, 1.2, (c,))
            t[f"{b}{ln}.bias"] = vec(-0.1, 0.1, (c,))
        if version == "v5":
            # ln_x and gate before time_decay: the rwkv package detects 5.2 in key order
            t[att + "ln_x.weight"] = vec(0.5, 1.5, (c,))
            t[att + "ln_x.bias"] = vec(-0.1, 0.1, (c,))
            t[att + "gate.weight"] = mat(c, c)
            for m in "kvrg":
                t[att + f"time_mix_{m}"] = vec()
            t[att + "time_decay"] = vec(-5, 1, (h, head_size))
            t[att + "time_faaaa"] = vec(-1, 1, (h, head_size))
            for m in ("receptance", "key", "value", "output"):
                t[f"{att}{m}.weight"] = mat(c, c)
            t[ffn + "time_mix_k"] = vec()
            t[ffn + "time_mix_r"] = vec()
        elif version == "v6":
            for m in "xwkvrg":
                t[att + f"time_maa_{m}"] = vec()
            t[att + "time_maa_w1"] = normal((c, 5 * lora), 0.5, np.sqrt(c))
            t[att + "time_maa_w2"] = normal((5, lora, c), 0.5, np.sqrt(lora))
            t[att + "time_decay"] = vec(-5, 1)
            t[att + "time_decay_w1"] = normal((c, 2 * lora), 0.5, np.sqrt(c))
            t[att + "time_decay_w2"] = normal((2 * lora, c), 0.5, np.sqrt(2 * lora))
            t[att + "time_faaaa"] = vec(-1, 1, (h, head_size))
            for m in ("receptance", "key", "value", "output", "gate"):
                t[f"{att}{m}.weight"] = mat(c, c)
            t[att + "ln_x.weight"] = vec(0.5, 1.5, (c,))
            t[att + "ln_x.bias"] = vec(-0.1, 0.1, (c,))
            t[ffn + "time_maa_k"] = vec()
            t[ffn + "time_maa_r"] = vec()
        else:
            for m in "rwkvag":
                t[att + f"x_{m}"] = vec()
            ranks = {"w": lora, "a": lora, "v": lora // 2, "g": 2 * lora}
            for name, rank in ranks.items():
                if name == "v" and layer == 0:
                    continue
                if name != "g":
                    t[att + f"{name}0"] = vec(-1, 1) if name != "w" else vec(-4, 1)
                t[att + f"{name}1"] = normal((c, rank), 1.0, np.sqrt(c))
                t[att + f"{name}2"] = normal((rank, c), 0.5, np.sqrt(rank))
            t[att + "k_k"] = vec(0.5, 1.0)
            t[att + "k_a"] = vec(0.0, 1.0)
            t[att + "r_k"] = vec(-0.5, 0.5, (h, head_size))
            for m in ("receptance", "key", "value", "output"):
                t[f"{att}{m}.weight"] = mat(c, c)
            t[att + "ln_x.weight"] = vec(0.5, 1.5, (c,))
            t[att + "ln_x.bias"] = vec(-0.1, 0.1, (c,))
            t[ffn + "x_k"] = vec()
        t[ffn + "key.weight"] = mat(f, c)
        if version != "v7":
            t[ffn + "receptance.weight"] = mat(c, c)
        t[ffn + "value.weight"] = mat(c, f)
    t["ln_out.weight"] = vec(0.8, 1.2, (c,))
    t["ln_out.bias"] = vec(-0.1, 0.1, (c,))
    t["head.weight"] = mat(n_vocab, c)
    return t if lazy else materialise(t)
