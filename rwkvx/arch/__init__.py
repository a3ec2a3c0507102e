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
