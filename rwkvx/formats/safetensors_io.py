"""safetensors: the reader (any writer's files, and rwkvx's own layout) and a streaming writer.

The format is an 8-byte little-endian header length, a JSON header mapping each tensor
name to {dtype, shape, data_offsets} (plus an optional "__metadata__" of strings), then
the raw data. Every offset in the header is checked against the file before use.

rwkvx's own layout (written by ``python -m rwkvx.convert``) is a safetensors file whose
metadata has ``format = "rwkvx"``. Its tensors are already what the model runs on: matrices
in the run dtype, time_* vectors squeezed to (n_embd,) float32, att.time_decay holding
-exp(raw), a uint8 matrix ``K`` stored as ``K.q`` (uint8), ``K.mx``, ``K.rx``, ``K.my``,
``K.ry`` (float32; see quant.py), and a q4 matrix as ``K.q4`` (uint8 nibbles), ``K.sd`` (uint8),
``K.sm`` (int8), ``K.D``, ``K.M`` (float16) and ``K.n_cols`` (one int64; see quant.Q4Matrix).
Loading it maps every array: nothing is converted.
"""
from __future__ import annotations

import json
import os
import stat
import struct
import tempfile

import numpy as np

from rwkvx.errors import RwkvxError
from rwkvx.formats.tensorfile import (MAX_TENSORS, NUMPY_DTYPES, MappedFile, Q4Tensor, QuantizedTensor, Tensor,
                              TensorSource, describe, fail, n_elements, printable)

# what rwkvx's own files say about themselves
FORMAT_NAME = "rwkvx"
# 2: RWKV-6 and 7's low-rank matrices stored (in, out) (metadata low_rank = "in,out"); files of
# other versions are unchanged and still say 1, so older rwkvx releases read them
FORMAT_VERSION = 2
# what rwkvx's state files (rwkvx.states) say about themselves
STATE_FORMAT_NAME = "rwkvx-state"
QUANT_PARTS = ("q", "mx", "rx", "my", "ry")
# a q4 matrix's stored tensors, n_cols last (not an array of the matrix: its true width)
Q4_PARTS = ("q4", "sd", "sm", "D", "M", "n_cols")

_READ_DTYPES = ("F32", "F16", "BF16", "U8")
# and in rwkvx's own files: a q4 matrix's group minima and true width (Q4_PARTS)
_RWKVX_DTYPES = ("I8", "I64")
# safetensors' own limit, for recognising the format
_MAX_HEADER = 100_000_000
# what rwkvx parses: a header of 730 tensors (RWKV-4 14B) is ~70 KB, while 100 MB of JSON
# like [{},{},...] would build 2 GB of Python objects
MAX_PARSED_HEADER = 16 << 20


def looks_like_safetensors(head: bytes) -> bool:
    if len(head) < 9:
        return False
    (header_len,) = struct.unpack("<Q", head[:8])
    return 2 <= header_len <= _MAX_HEADER and head[8:9] == b"{"


def source_is_state(metadata: dict) -> bool:
    return metadata.get("format") == STATE_FORMAT_NAME


def open_safetensors(file: MappedFile, dtypes: tuple[str, ...] = _READ_DTYPES) -> TensorSource:
    """Parse and check a safetensors header; tensors stay in the file until asked for.

    dtypes: the stored dtypes accepted (checkpoints: floats and U8; state files: F32, I32).
    """
    path, size = file.path, file.size
    if size < 8:
        raise fail(path, "truncated: the safetensors header length is 8 bytes")
    (header_len,) = struct.unpack("<Q", file.head(8))
    if 8 + header_len > size:
        raise fail(path, f"truncated: the header needs {8 + header_len} bytes, the file has {size}")
    if header_len > MAX_PARSED_HEADER:
        raise fail(path, f"a safetensors header of {header_len} bytes: more than rwkvx reads "
                         f"({MAX_PARSED_HEADER}; a checkpoint's is well under 1 MB)")
    header = load_json(path, bytes(file.map[8:8 + header_len]), "safetensors header is not valid JSON")
    if not isinstance(header, dict):
        raise fail(path, "safetensors header is not a JSON object")
    if len(header) > MAX_TENSORS:
        raise fail(path, f"safetensors header lists {len(header)} tensors, more than a checkpoint has")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise fail(path, "safetensors __metadata__ is not a JSON object of strings")
    if source_is_state(metadata) and "I32" not in dtypes:
        raise fail(path, "is a saved model state (an rwkvx state file), not a checkpoint: "
                         "load the model, then the state with model.load_state")
    if metadata.get("format") == FORMAT_NAME:
        dtypes = dtypes + _RWKVX_DTYPES
    data_start = 8 + header_len
    data_size = size - data_start
    source = TensorSource(path, "safetensors")
    source.files.append(file)
    source.metadata = {str(k): v for k, v in metadata.items()}
    spans = []
    for name, entry in header.items():
        shown = printable(name, 120)
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            if not isinstance(shape, list) or len(shape) > 16:
                raise ValueError
            shape = tuple(shape)
            if not all(type(d) is int and d >= 0 for d in shape + (begin, end)):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise fail(path, f"tensor {shown}: malformed header entry ({describe(entry)}; expected dtype, "
                             "shape and data_offsets)") from None
        if not isinstance(dtype, str) or dtype not in dtypes:
            raise fail(path, f"tensor {shown}: unsupported dtype {printable(dtype, 40) if isinstance(dtype, str) else describe(dtype)} (expected {', '.join(dtypes)})")
        nbytes = n_elements(shape) * NUMPY_DTYPES[dtype].itemsize
        if end - begin != nbytes:
            raise fail(path, f"tensor {shown}: shape {list(shape)} {dtype} needs {nbytes} bytes, "
                             f"its offsets span {end - begin}")
        if end > data_size:
            raise fail(path, f"truncated: tensor {shown} ends at byte {data_start + end}, the file has {size}")
        spans.append((begin, end, name))
        source.tensors[name] = Tensor(name, file, dtype, shape, data_start + begin)
    spans.sort()
    for (_, end_a, name_a), (begin_b, _, name_b) in zip(spans, spans[1:]):
        if begin_b < end_a:
            raise fail(path, f"tensors {printable(name_a, 120)} and {printable(name_b, 120)} overlap in the file")
    if source.metadata.get("format") == FORMAT_NAME:
        _read_rwkvx_layout(source)
    return source


def load_json(path: str, data: bytes, problem: str):
    """Parse JSON from a file; every way it can be bad is a one-line CheckpointError
    'path: problem (why)'."""
    try:
        return json.loads(data)
    except RecursionError:
        raise fail(path, f"{problem} (it nests too deeply)") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise fail(path, f"{problem} ({printable(e, 200)})") from None


def _read_rwkvx_layout(source: TensorSource) -> None:
    """Check an rwkvx file's metadata and group each uint8 matrix's five parts."""
    meta, path = source.metadata, source.path
    try:
        version = int(meta.get("format_version", ""))
    except ValueError:
        raise fail(path, f"rwkvx file with a malformed format_version {describe(meta.get('format_version'))}") from None
    if version > FORMAT_VERSION:
        raise fail(path, f"written by a newer rwkvx (file format version {version}); "
                         f"this rwkvx reads version {FORMAT_VERSION} and older")
    source.format = FORMAT_NAME
    source.decay_is_transformed = True
    for name in [n for n in source.tensors if n.endswith(".q")]:
        base = name[:-2]
        parts = _matrix_parts(path, source, base, "uint8", QUANT_PARTS)
        q = parts["q"]
        n_rows, n_cols = q.shape if len(q.shape) == 2 else (-1, -1)
        _check_parts(path, base, parts, {"q": ("U8", (n_rows, n_cols)), "mx": ("F32", (n_cols,)),
                                         "rx": ("F32", (n_cols,)), "my": ("F32", (n_rows,)),
                                         "ry": ("F32", (n_rows,))})
        source.tensors[base] = QuantizedTensor(base, parts)
    for name in [n for n in source.tensors if n.endswith(".q4")]:
        base = name[:-3]
        source.tensors[base] = _q4_tensor(path, _matrix_parts(path, source, base, "q4", Q4_PARTS), base)


def _matrix_parts(path: str, source: TensorSource, base: str, kind: str, names) -> dict:
    """A quantised matrix's stored parts BASE.NAME, taken out of source.tensors (all or none)."""
    parts = {p: source.tensors.get(f"{base}.{p}") for p in names}
    missing = [p for p, t in parts.items() if t is None]
    if missing:
        raise fail(path, f"{kind} matrix {printable(base, 120)}: missing "
                         f"{', '.join(printable(base, 120) + '.' + p for p in missing)}")
    for p in names:
        del source.tensors[f"{base}.{p}"]
    return parts


def _check_parts(path: str, base: str, parts: dict, expected: dict) -> None:
    """Each part's stored dtype and shape against expected {part: (dtype, shape)}."""
    for p, (dtype, shape) in expected.items():
        if (parts[p].dtype, parts[p].shape) != (dtype, shape):
            raise fail(path, f"{printable(base, 120)}.{p}: expected {list(shape)} {dtype}, "
                             f"got {list(parts[p].shape)} {parts[p].dtype}")


def _q4_tensor(path: str, parts: dict, base: str) -> Q4Tensor:
    size = parts["n_cols"]
    if (size.dtype, size.shape) != ("I64", (1,)):
        raise fail(path, f"{printable(base, 120)}.n_cols: expected [1] I64, got {list(size.shape)} {size.dtype}")
    n_cols = int(size.read()[0])
    q4 = parts["q4"]
    n_rows = q4.shape[0] if len(q4.shape) == 2 else -1
    n_groups = (n_cols + 63) // 64
    if n_cols < 1 or n_rows < 1:
        raise fail(path, f"{printable(base, 120)}: a q4 matrix of {n_rows} rows and {n_cols} columns")
    _check_parts(path, base, parts, {"q4": ("U8", (n_rows, 32 * n_groups)), "sd": ("U8", (n_rows, n_groups)),
                                     "sm": ("I8", (n_rows, n_groups)), "D": ("F16", (n_rows,)),
                                     "M": ("F16", (n_rows,))})
    del parts["n_cols"]
    return Q4Tensor(base, parts, n_cols)


def refuse_to_replace(path: str) -> None:
    """Raise RwkvxError when `path` exists and is not a regular file: a writer renames a new
    file over it, which would turn a device or FIFO into a plain file, or a symbolic link
    into a file beside its target."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except (OSError, ValueError) as e:
        raise RwkvxError(f"{printable(path)}: cannot write: {getattr(e, 'strerror', None) or e}") from None
    if stat.S_ISREG(mode):
        return
    kind = ("a directory" if stat.S_ISDIR(mode) else "a symbolic link" if stat.S_ISLNK(mode)
            else "a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
    raise RwkvxError(f"{printable(path)}: is {kind}, not a regular file: refusing to replace it")


class SafetensorsWriter:
    """Write a safetensors file tensor by tensor, without holding more than one in memory.

    The header (names, dtypes, shapes, hence every offset) is fixed up front, so tensors
    can be written in any order, each straight to its place. Tensors are laid out by
    decreasing item size after an aligned header, so every one starts aligned for its
    dtype and can be mapped as a numpy array. The file appears under its name only when
    close() finds every tensor written; abort() (or an exception inside ``with``)
    removes the partial file.

    The partial file is a new one created exclusively in the destination's folder
    (``.NAME.XXXXXXXX.rwkvx-tmp``), never a name a user's file may already have, and is
    renamed over the destination at the end; a destination that exists and is not a
    regular file (a device, a FIFO, a directory, a symbolic link) is refused.
    """

    def __init__(self, path: str | os.PathLike, specs: list[tuple[str, str, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.path = os.fspath(path)
        refuse_to_replace(self.path)
        order = sorted(specs, key=lambda s: -NUMPY_DTYPES[s[1]].itemsize)
        header, offset = {}, 0
        self._layout = {}
        for name, dtype, shape in order:
            if name in self._layout:
                raise ValueError(f"SafetensorsWriter: duplicate tensor name {name}")
            nbytes = n_elements(shape) * NUMPY_DTYPES[dtype].itemsize
            header[name] = {"dtype": dtype, "shape": [int(d) for d in shape], "data_offsets": [offset, offset + nbytes]}
            self._layout[name] = (dtype, tuple(int(d) for d in shape), offset, nbytes)
            offset += nbytes
        if metadata:
            header = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}, **header}
        text = json.dumps(header, separators=(",", ":")).encode()
        # pad with spaces so tensor data starts 64-byte aligned
        text += b" " * (-(8 + len(text)) % 64)
        self._data_start = 8 + len(text)
        self.size = self._data_start + offset
        self._written: set[str] = set()
        folder, base = os.path.split(os.path.abspath(self.path))
        fd, self._tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=".rwkvx-tmp", dir=folder)
        try:
            # mkstemp makes the file private (0600); the result gets a new file's usual mode
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(fd, 0o666 & ~umask)
            self._f = os.fdopen(fd, "wb")
        except BaseException:
            os.close(fd)
            os.remove(self._tmp)
            raise
        try:
            self._f.write(struct.pack("<Q", len(text)))
            self._f.write(text)
            self._f.truncate(self.size)
        except BaseException:
            self.abort()
            raise

    def write(self, name: str, array: np.ndarray) -> None:
        dtype, shape, offset, nbytes = self._layout[name]
        expected = NUMPY_DTYPES[dtype]
        if array.dtype != expected or tuple(array.shape) != shape:
            raise ValueError(f"SafetensorsWriter: {name}: expected {list(shape)} {dtype}, "
                             f"got {list(array.shape)} {array.dtype}")
        self._f.seek(self._data_start + offset)
        self._f.write(memoryview(np.ascontiguousarray(array)).cast("B"))
        self._written.add(name)

    def close(self) -> None:
        missing = [n for n in self._layout if n not in self._written]
        if missing:
            self.abort()
            raise ValueError(f"SafetensorsWriter: {len(missing)} tensor(s) never written: {', '.join(missing[:5])}")
        try:
            self._f.close()
            refuse_to_replace(self.path)
            os.replace(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Remove the partial file (safe to call more than once)."""
        try:
            if not self._f.closed:
                self._f.close()
        except OSError:
            pass
        try:
            os.remove(self._tmp)
        except FileNotFoundError:
            pass

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
