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


def describe(path: str | os.PathLike) -> str | None:
    """What `python -m rwkvx.run --info` prints for an RWKV-5.2/6/7 checkpoint (headers only),
    or None for any other file."""
    from rwkvx.arch.common import big_keys
    from rwkvx.loader import DTYPES, FORMAT_NAMES, dtype_summary, held_nbytes, matrix_format, size_text, stored_as_run
    from rwkvx.formats.safetensors_io import FORMAT_NAME
    from rwkvx.formats.tensorfile import Q4Tensor, QuantizedTensor
    arch, source = recognise_path(path)
    if arch is None:
        return None
    emb = source.tensors.get("emb.weight")
    n_vocab, n_embd = emb.shape if emb is not None and len(emb.shape) == 2 else (0, 0)
    n_head, head_size = arch.heads(source)
    n_layer = len({k.split(".")[1] for k in source.tensors if k.startswith("blocks.")})
    key = source.tensors.get("blocks.0.ffn.key.weight")
    n_ffn = key.shape[0] if key is not None else 0
    # the big matrices (arch.LINEAR, the head) run in the chosen dtype; the embedding stays
    # as stored; every other tensor is kept float32
    big_names = big_keys(arch, n_layer)
    big = [t for k, t in source.tensors.items() if k in big_names]
    small = [t for k, t in source.tensors.items() if k not in big_names and k != "emb.weight"
             and not k.endswith(".att.time_state")]
    big_elements = sum(t.size for t in big)
    small_elements = sum(t.size for t in small)
    emb_bytes = (emb.nbytes if emb.dtype in ("F32", "F16", "BF16") else emb.size * 4) if emb is not None else 0
    lines = [
        f"file          {source.path} ({size_text(source.file_size)})",
        f"format        {FORMAT_NAMES.get(source.format, source.format)}",
        f"architecture  {arch.NAME} ({arch.ID}): {n_layer} layers, n_embd {n_embd}, "
        f"{n_head} head{'s' * (n_head != 1)} of {head_size}, "
        f"vocabulary {n_vocab}, ffn {n_ffn} "
        f"({(big_elements + small_elements + (emb.size if emb is not None else 0)) / 1e6:.1f}M parameters)",
        f"stored        big matrices {dtype_summary(big)}; embedding {dtype_summary([emb])}; "
        f"others {dtype_summary(small)}",
    ]
    if source.format == FORMAT_NAME:
        m = source.metadata
        lines.append(f"converted     to {m.get('dtype')} from {m.get('source')} ({m.get('source_format')}), "
                     f"rwkvx file format version {m.get('format_version')}")
    lines += [
        f"kept float32  norms, token-shift mixes, per-head decays and bonuses, low-rank (LoRA) matrices "
        f"({small_elements / 1e6:.2f}M values), in every dtype; state {n_layer} x {2 + head_size} x {n_embd} float32",
    ]
    if "blocks.0.att.time_state" in source.tensors:
        lines.append("state-tuned   sequences start from the file's blocks.N.att.time_state (see --state), not zeros")
    lines += [
        "memory by --dtype (weights held):",
    ]
    big_keyed = [(k, t) for k, t in source.tensors.items() if k in big_names]
    for dtype in DTYPES:
        formats = {k: matrix_format(dtype, k) for k, _ in big_keyed}
        # a file of quantised matrices loads only in the formats it holds
        held = [t for k, t in big_keyed if isinstance(t, (QuantizedTensor, Q4Tensor))
                and ("q4" if isinstance(t, Q4Tensor) else "uint8") != formats[k]]
        if held:
            # name the file's main format (a q4 file keeps its head in uint8)
            kind = "q4" if any(isinstance(t, Q4Tensor) for _, t in big_keyed) else "uint8"
            lines.append(f"  {dtype:<9}  -          not loadable: the file holds {kind} weights")
            continue
        big_bytes = sum(held_nbytes(tuple(t.shape), formats[k]) for k, t in big_keyed)
        nbytes = small_elements * 4 + emb_bytes + big_bytes
        if big and all(stored_as_run(t, formats[k]) for k, t in big_keyed):
            how = "mapped from the file, no copy"
        else:
            how = "quantised at load" if dtype in ("uint8", "q4") else "converted at load"
        if dtype == "q4":
            how += f" ({8 * big_bytes / max(1, big_elements):.2f} bits/weight, head uint8)"
        lines.append(f"  {dtype:<9}  {size_text(nbytes):>9}  {how}")
    return "\n".join(lines)
