"""Convert any checkpoint rwkvx reads into rwkvx's own layout, ready to map at load.

    python -m rwkvx.convert RWKV-4-Pile-430M-20220808-8066.pth rwkv-430m-uint8.safetensors --dtype uint8

The output is a safetensors file (see safetensors_io for the layout) whose matrices are
already in the run dtype, with every load-time transform applied, and a uint8 matrix is
stored as its five parts. RWKV-4: att.time_decay holds -exp(raw), time_* vectors are
(n_embd,) float32. RWKV-5.2/6/7: every tensor is what rwkvx.arch's loader keeps, under
BlinkDL's name (rwkvx.arch.common.converted_tensors): the big matrices (receptance, key,
value, gate, output, feed-forward, head) in the run dtype; norms, mixes, decays (5.2's as
exp(-exp(raw))), bonuses and the low-rank matrices float32 (RWKV-6 and 7's (in, out), as
BlinkDL stores them and their kernel reads them: format version 2). The embedding stays
as stored (float32, float16 or bfloat16; dequantised ggml embeddings become float32).
Loading it with the same dtype maps every array: no float copy and no quantisation work.
The header's metadata records format, format_version, architecture (and for 5.2/6/7 the
head size), dtype, the source file and the source's model fingerprint (so states saved
with the source load into the converted model).

Conversion streams tensor by tensor (RWKV-5/6/7: layer by layer, after checking every name
and shape from the file's index), each read, converted, written and dropped, with a
progress bar on stderr when stderr is a terminal; the output appears under its name only
once complete: it is written to a new temporary file in DST's folder, removed on any error,
Ctrl-C, SIGTERM or SIGHUP, and renamed over DST at the end. An existing DST is replaced
only with --force, and only if it is a regular file. It is then flushed to disk and evicted
from the page cache: the first load reads it from disk, into 2 MB pages, which decode faster
than the small pages a file just written sits in (see hugepages).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from rwkvx._cli import EXIT_OK, Parser, run_main
from rwkvx.errors import RwkvxError
from rwkvx.hugepages import drop_from_page_cache
from rwkvx.loader import DTYPES, check_dtype, check_mode, iter_weights, matrix_format, open_checkpoint, plan
from rwkvx.quant import Q4_GROUP, Q4Matrix, QuantizedMatrix
from rwkvx.formats.safetensors_io import (FORMAT_NAME, FORMAT_VERSION, Q4_PARTS, QUANT_PARTS, SafetensorsWriter,
                                  refuse_to_replace)
from rwkvx.states import checkpoint_fingerprint
from rwkvx.formats.tensorfile import NUMPY_DTYPES, RUN_STORED, Progress, n_elements, printable


def convert(src: str | os.PathLike, dst: str | os.PathLike, dtype: str, *, overwrite: bool = False,
            progress: bool | None = None, check_tensors: bool | None = None) -> dict:
    """Write `src` (any readable checkpoint) to `dst` in rwkvx's layout with matrices in `dtype`.

    Returns the metadata written. Raises CheckpointError for unreadable sources (NaN or
    infinite weights included: every tensor is read, so it is checked; check_tensors=False
    skips that), RwkvxError for bad arguments (unknown dtype, dst exists without overwrite,
    dst is src or not a regular file).
    """
    check = check_mode(check_tensors if check_tensors is not None else True)
    check_dtype(dtype)
    src, dst = os.fsdecode(os.fspath(src)), os.fsdecode(os.fspath(dst))
    if "\0" in dst:
        raise RwkvxError(f"{printable(dst)}: a path with a NUL character")
    if os.path.lexists(dst):
        if os.path.exists(src) and os.path.exists(dst) and os.path.samefile(src, dst):
            raise RwkvxError(f"{dst}: is the source; write the conversion to another file")
        if not overwrite:
            raise RwkvxError(f"{dst}: exists (pass --force to overwrite)")
        # only a regular file is replaced: a device, FIFO, directory or link is refused
        refuse_to_replace(dst)
    source = open_checkpoint(src)
    from rwkvx import arch
    later = arch.recognise(source)
    specs, metadata, tensors, total = (_layout_next(source, later, dtype, check) if later is not None
                                       else _layout_v4(source, dtype, check))
    metadata = {
        "format": FORMAT_NAME,
        # only what changed since version 1 says 2 (see FORMAT_VERSION), so that an older rwkvx
        # refuses those files by name and reads the rest
        "format_version": str(FORMAT_VERSION if "low_rank" in metadata else 1),
        **metadata,
        "dtype": dtype,
        "source": os.path.basename(os.path.normpath(source.path)),
        "source_format": source.format,
        # states saved with the source load into the converted model without a warning
        "model_fingerprint": checkpoint_fingerprint(source),
    }

    bar = Progress(f"converting to {dtype}", total, enabled=progress, delay=0.0)
    try:
        writer = SafetensorsWriter(dst, specs, metadata)
    except OSError as e:
        raise RwkvxError(f"{dst}: cannot write: {e.strerror or e}") from None
    try:
        with writer:
            for key, value, nbytes in tensors:
                if isinstance(value, QuantizedMatrix):
                    for part in QUANT_PARTS:
                        writer.write(f"{key}.{part}", getattr(value, part))
                elif isinstance(value, Q4Matrix):
                    for part in Q4_PARTS[:-1]:
                        writer.write(f"{key}.{part}", getattr(value, part))
                    writer.write(f"{key}.n_cols", np.array([value.n_cols], dtype=np.int64))
                else:
                    writer.write(key, value)
                del value
                bar.advance(nbytes)
        # flushed and evicted, so that loads read it back in 2 MB pages (hugepages)
        drop_from_page_cache(dst)
    except OSError as e:
        raise RwkvxError(f"{dst}: cannot write: {e.strerror or e}") from None
    finally:
        bar.close()
    return metadata


def _quantized_specs(key: str, shape: tuple[int, int]) -> list[tuple[str, str, tuple[int, ...]]]:
    n_rows, n_cols = shape
    return [(f"{key}.q", "U8", (n_rows, n_cols)), (f"{key}.mx", "F32", (n_cols,)), (f"{key}.rx", "F32", (n_cols,)),
            (f"{key}.my", "F32", (n_rows,)), (f"{key}.ry", "F32", (n_rows,))]


def _q4_specs(key: str, shape: tuple[int, int]) -> list[tuple[str, str, tuple[int, ...]]]:
    n_rows, n_cols = shape
    n_groups = -(-n_cols // Q4_GROUP)
    return [(f"{key}.q4", "U8", (n_rows, 32 * n_groups)), (f"{key}.sd", "U8", (n_rows, n_groups)),
            (f"{key}.sm", "I8", (n_rows, n_groups)), (f"{key}.D", "F16", (n_rows,)), (f"{key}.M", "F16", (n_rows,)),
            (f"{key}.n_cols", "I64", (1,))]


def _layout_v4(source, dtype: str, check: str):
    """RWKV-4: (specs, metadata, (key, value, source bytes) in order, total bytes)."""
    the_plan = plan(source)
    specs = []
    for key, kind, _, _ in the_plan.entries():
        tensor = source.tensors[key]
        shape = tensor.shape
        if kind == "emb":
            # the embedding stays as stored, as the loader keeps it
            specs.append((key, tensor.dtype if tensor.dtype in ("F32", "F16", "BF16") else "F32", shape))
        elif kind == "vector":
            specs.append((key, "F32", (the_plan.n_embd,)))
        elif matrix_format(dtype, key) == "uint8":
            specs += _quantized_specs(key, shape)
        elif dtype == "q4":
            specs += _q4_specs(key, shape)
        else:
            specs.append((key, RUN_STORED[dtype], shape))
    metadata = {"architecture": "RWKV-4", "n_layer": str(the_plan.n_layer), "n_embd": str(the_plan.n_embd),
                "n_vocab": str(the_plan.n_vocab), "n_ffn": str(the_plan.n_ffn), "time_decay": "-exp(raw)"}
    tensors = ((key, value, nbytes)
               for key, _, _, _, value, nbytes in iter_weights(source, the_plan, dtype, check=check))
    return specs, metadata, tensors, sum(source.tensors[key].nbytes for key, *_ in the_plan.entries())


def _layout_next(source, arch, dtype: str, check: str):
    """RWKV-5.2/6/7: the weights as rwkvx.arch reads them (rwkvx.arch.common.converted_tensors),
    planned from the file's index first (names and shapes checked before anything is
    written), then read a layer at a time."""
    from rwkvx.arch.common import Planned, converted_tensors, sizes
    n_layer, n_embd, n_vocab, n_head, head_size = sizes(source, arch)
    specs = []
    for key, value in converted_tensors(source, arch, dtype, shapes_only=True):
        if isinstance(value, Planned) and value.dtype == "uint8":
            specs += _quantized_specs(key, value.shape)
        elif isinstance(value, Planned) and value.dtype == "q4":
            specs += _q4_specs(key, value.shape)
        elif isinstance(value, Planned):
            specs.append((key, value.dtype, value.shape))
        else:
            # every other weight is float32 (norms, mixes, decays, low-rank matrices)
            specs.append((key, "F32", value.shape))
    # the plan has checked every name and shape
    n_ffn = source.tensors["blocks.0.ffn.key.weight"].shape[0]
    metadata = {"architecture": arch.NAME, "architecture_id": arch.ID, "head_size": str(head_size),
                "n_layer": str(n_layer), "n_embd": str(n_embd), "n_vocab": str(n_vocab), "n_ffn": str(n_ffn),
                "layout": "as rwkvx runs it: transforms applied, low-rank matrices (in, out), only the big "
                          "matrices in dtype"}
    if getattr(arch, "STORED_IN_OUT", ()):
        metadata["low_rank"] = "in,out"
    tensors = ((key, value, _nbytes(value)) for key, value in converted_tensors(source, arch, dtype, check=check))
    total = sum(n_elements(shape) * NUMPY_DTYPES[d].itemsize for _, d, shape in specs)
    return specs, metadata, tensors, total


def _nbytes(value) -> int:
    return value.nbytes


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="python -m rwkvx.convert",
        description="Convert an RWKV-4, 5.2, 6 or 7 checkpoint (safetensors, PyTorch .pth, rwkv.cpp .bin, Hugging Face "
                    "folder) into rwkvx's layout: weights already in the run dtype and transformed, so "
                    "loading maps the file with no conversion work.",
    )
    p.add_argument("src", metavar="SRC", help="the checkpoint to convert (file or Hugging Face folder)")
    p.add_argument("dst", metavar="DST", help="the .safetensors file to write")
    p.add_argument("--dtype", required=True, choices=DTYPES,
                   help="the run dtype the weight matrices are stored in; load the result with the same --dtype")
    p.add_argument("--force", action="store_true", help="overwrite DST if it exists")
    return p


def _convert_cli(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    meta = convert(args.src, args.dst, args.dtype, overwrite=args.force)
    size = os.path.getsize(args.dst)
    print(f"rwkvx: wrote {args.dst}: {meta['architecture']} {meta['n_layer']} layers x {meta['n_embd']}, vocabulary "
          f"{meta['n_vocab']}, {args.dtype}, {size / 1e6:.1f} MB in {time.perf_counter() - start:.1f} s",
          file=sys.stderr)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Run the converter; returns the exit status (0 ok, 1 failure, 2 bad input)."""
    return run_main(lambda: _convert_cli(argv))


if __name__ == "__main__":
    raise SystemExit(main())
