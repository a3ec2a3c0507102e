"""The RWKV generations after RWKV-4, one module each (v5: x052, v6: x060, v7: x070).

Each module holds what differs: how its checkpoint names map to weights (read_block), its
layer math as the float64 specification (block) and its float32 runtime layer (Layer). What
they share (state layout, norms, weights, the reference model) is in common; the runtime
model in model.
"""
from __future__ import annotations

import os

from rwkvx.arch import v5, v6, v7

ARCHITECTURES = (v7, v6, v5)


def recognise(source):
    """The architecture module of a checkpoint's tensors, or None (RWKV-4 or not RWKV).

    Every v5+ layer has a group norm (att.ln_x); a file without one is left to the RWKV-4
    loader, which names what it looks like."""
    names = set(source.tensors)
    for arch in ARCHITECTURES:
        if arch.recognise(names):
            return arch
    return None


def recognise_path(path: str | os.PathLike):
    """recognise() for a checkpoint path, reading only its index; (module or None, source)."""
    from rwkvx.loader import open_checkpoint
    source = open_checkpoint(path)
    return recognise(source), source


_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


def describe(path: str | os.PathLike) -> str | None:
    """What `python -m rwkvx.run --info` prints for an RWKV-5.2/6/7 checkpoint (headers only),
    or None for any other file."""
    from rwkvx.loader import FORMAT_NAMES
    arch, source = recognise_path(path)
    if arch is None:
        return None
    emb = source.tensors.get("emb.weight")
    n_vocab, n_embd = emb.shape if emb is not None and len(emb.shape) == 2 else (0, 0)
    n_head, head_size = arch.heads(source)
    n_layer = len({k.split(".")[1] for k in source.tensors if k.startswith("blocks.")})
    key = source.tensors.get("blocks.0.ffn.key.weight")
    n_ffn = key.shape[0] if key is not None else 0
    # the big matrices (arch.LINEAR, the head) run in the chosen dtype; every other tensor,
    # the embedding included, is kept float32
    from rwkvx.arch.common import big_keys
    big = big_keys(arch, n_layer)
    big_elements = sum(t.size for k, t in source.tensors.items() if k in big)
    small_elements = sum(t.size for k, t in source.tensors.items() if k not in big)
    stored = sorted({str(t.dtype) for t in source.tensors.values()})
    lines = [
        f"file          {source.path} ({source.file_size / 1e6:.1f} MB)",
        f"format        {FORMAT_NAMES.get(source.format, source.format)}",
        f"architecture  {arch.NAME} ({arch.ID}): {n_layer} layers, n_embd {n_embd}, "
        f"{n_head} head{'s' * (n_head != 1)} of {head_size}, "
        f"vocabulary {n_vocab}, ffn {n_ffn} ({(big_elements + small_elements) / 1e6:.1f}M parameters)",
        f"stored        {', '.join(stored)}",
        f"kept float32  embedding, norms, token-shift mixes, decays and bonuses, low-rank matrices "
        f"({small_elements / 1e6:.2f}M values); state {n_layer} x {2 + head_size} x {n_embd} float32",
        "memory by --dtype (weights held; read into memory at load):",
    ]
    for dtype in ("float32", "bfloat16", "float16", "uint8"):
        nbytes = small_elements * 4 + (big_elements * _ITEMSIZE[dtype] if dtype in _ITEMSIZE else
                                       big_elements + 8 * (n_layer * len(arch.LINEAR) + 1) * (n_embd + n_ffn))
        lines.append(f"  {dtype:<9}  {nbytes / 1e6:>7.1f} MB")
    return "\n".join(lines)
