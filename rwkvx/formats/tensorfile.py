"""The pieces every checkpoint reader shares: an open file, its tensors, a progress bar.

A reader (safetensors_io, pth, ggml, hf) indexes a file's tensors without reading their
data: each becomes a Tensor that knows its stored dtype, shape and byte offset. The loader
then asks each tensor for one of two things:

- ``view()``: a read-only numpy view of the memory-mapped file. Nothing is copied; the OS
  pages the data in when it is first read and can drop it again under memory pressure.
- ``read()`` / ``float32()``: a private, writable array, read with ``pread`` rather than
  through the mapping, so converting a tensor never leaves the file's pages counted in
  this process's resident memory. float32() widens half-precision data in chunks, so
  converting a tensor needs its float32 result and a few MB, not a second full copy.
"""
from __future__ import annotations

import math
import mmap
import os
import stat
import sys
import time
import weakref
from typing import Optional

import numpy as np

from rwkvx.errors import CheckpointError
from rwkvx.hugepages import ask_for_huge_pages
from rwkvx.quant import Q4Matrix, QuantizedMatrix
from rwkvx.weights import widen

# stored dtype names (safetensors' spelling) -> the numpy dtype holding them; bfloat16 is
# kept as its uint16 bit patterns, since numpy has no bfloat16
NUMPY_DTYPES = {
    "F32": np.dtype(np.float32), "F16": np.dtype(np.float16), "BF16": np.dtype(np.uint16),
    "F64": np.dtype(np.float64), "U8": np.dtype(np.uint8), "I8": np.dtype(np.int8),
    "I16": np.dtype(np.int16), "I32": np.dtype(np.int32), "I64": np.dtype(np.int64),
    "BOOL": np.dtype(np.bool_),
}
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
# what a run dtype keeps its matrices in, as a stored dtype name
RUN_STORED = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "U8": "uint8"}

# elements converted per step when widening to float32: bounds the temporary to a few MB
_CHUNK = 1 << 22


# most tensors one file may declare: RWKV-4 14B has 40 x 18 + 6; a header listing millions
# of entries is refused before it costs seconds and gigabytes of Python objects
MAX_TENSORS = 100_000


def printable(text, limit: int = 200) -> str:
    """`text` (from a file, usually) safe for a one-line message: control and other
    non-printable characters escaped (no newlines, no terminal escape sequences), and cut
    to `limit` characters."""
    text = text if isinstance(text, str) else str(text)
    if len(text) > limit:
        text = text[:limit] + "..."
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def describe(value) -> str:
    """A short description of a value read from a file, for messages: strings and small
    numbers as themselves (escaped), anything else by its kind, never its (unbounded) repr."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return str(value) if value.bit_length() <= 64 else "a huge integer"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return repr(printable(value, 60))
    if isinstance(value, (list, tuple, dict)):
        return f"a {type(value).__name__} of {len(value)}"
    return f"a {type(value).__name__}"


def fail(path, message: str) -> CheckpointError:
    """The one-line error every reader raises: 'path: problem', with every character that
    is not printable (newlines, escape sequences from a hostile file) escaped."""
    return CheckpointError(printable(f"{os.fspath(path) if isinstance(path, os.PathLike) else path}: {message}",
                                     2000))


def open_regular(path: str, what: str = "") -> int:
    """Open `path` read-only without blocking and return the descriptor, or raise a
    CheckpointError: a FIFO, a device or a socket is refused (opening a FIFO would wait
    forever for a writer), as are paths with a NUL character."""
    path = os.fsdecode(path)
    if "\0" in path:
        raise fail(printable(path), "a path with a NUL character")
    flags = os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise fail(path, f"no such {what or 'file'}") from None
    except PermissionError:
        raise fail(path, "permission denied") from None
    except (OSError, ValueError) as e:
        raise fail(path, f"cannot read: {getattr(e, 'strerror', None) or e}") from None
    try:
        mode = os.fstat(fd).st_mode
    except OSError as e:  # pragma: no cover - fstat of an open descriptor
        os.close(fd)
        raise fail(path, f"cannot read: {e.strerror or e}") from None
    if not stat.S_ISREG(mode):
        os.close(fd)
        if stat.S_ISDIR(mode):
            raise fail(path, f"is a directory, not a {what or 'checkpoint file'}")
        kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
        raise fail(path, f"is {kind}, not a regular file: refused")
    if hasattr(os, "set_blocking"):
        os.set_blocking(fd, True)
    return fd


def read_regular(path: str, limit: int, what: str = "file") -> bytes:
    """The bytes of a regular file of at most `limit` bytes (see open_regular), or a CheckpointError."""
    fd = open_regular(path, what)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise fail(path, f"{size} bytes is too large for a {what} (at most {limit})")
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, max(limit + 1 - total, 1))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise fail(path, f"too large for a {what} (more than {limit} bytes)")
        return b"".join(chunks)
    except OSError as e:
        raise fail(path, f"cannot read: {e.strerror or e}") from None
    finally:
        os.close(fd)


def n_elements(shape) -> int:
    # Python ints: a crafted shape must not wrap around int64 and pass the size checks
    return math.prod(int(d) for d in shape)


class MappedFile:
    """A checkpoint file opened once: a read-only mapping for views, a descriptor for reads."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fsdecode(os.fspath(path))
        fd = open_regular(self.path)
        # the descriptor lives as long as this object (a plain fd: no ResourceWarning)
        weakref.finalize(self, os.close, fd)
        self._fd = fd
        self.size = os.fstat(fd).st_size
        if self.size == 0:
            raise fail(self.path, "file is empty")
        try:
            self.map = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise fail(self.path, f"cannot map: {e.strerror or e}") from None
        ask_for_huge_pages(self.map)

    def head(self, n: int) -> bytes:
        return bytes(self.map[:n])

    def view(self, dtype: np.dtype, offset: int, shape: tuple[int, ...]) -> np.ndarray:
        """A read-only array over the mapping: no copy."""
        return np.frombuffer(self.map, dtype=dtype, count=n_elements(shape), offset=offset).reshape(shape)

    def read_into(self, out: np.ndarray, offset: int) -> None:
        """Fill the C-contiguous array `out` with the bytes at `offset`, bypassing the mapping."""
        if out.size == 0:
            # nothing to read (and memoryview cannot cast a view with a zero in its shape)
            return
        buf = memoryview(out).cast("B")
        if offset + len(buf) > self.size:
            raise fail(self.path, f"truncated: {len(buf)} bytes at byte {offset} run past the end ({self.size})")
        if not hasattr(os, "preadv"):  # pragma: no cover - Windows: copy out of the mapping
            buf[:] = self.map[offset:offset + len(buf)]
            return
        done = 0
        while done < len(buf):
            n = os.preadv(self._fd, [buf[done:]], offset + done)
            if n <= 0:
                raise fail(self.path, f"truncated: the file ended at byte {offset + done} while reading")
            done += n


class Tensor:
    """One stored tensor: dtype name, shape, and where its elements are in a file.

    strides (in elements) is None for a C-contiguous tensor; PyTorch views can have others.
    """

    def __init__(self, name: str, file: MappedFile, dtype: str, shape: tuple[int, ...], offset: int,
                 strides: Optional[tuple[int, ...]] = None):
        self.name = name
        self.file = file
        self.dtype = dtype
        self.shape = tuple(int(d) for d in shape)
        self.offset = offset
        self.strides = strides

    @property
    def size(self) -> int:
        return n_elements(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor's elements in the file."""
        return self.size * NUMPY_DTYPES[self.dtype].itemsize

    def _np_dtype(self) -> np.dtype:
        return NUMPY_DTYPES[self.dtype]

    def view(self) -> Optional[np.ndarray]:
        """A read-only view of the file, or None where the stored layout cannot be one."""
        itemsize = self._np_dtype().itemsize
        if self.strides is not None or self.offset % itemsize:
            return None
        return self.file.view(self._np_dtype(), self.offset, self.shape)

    def read(self, out: Optional[np.ndarray] = None) -> np.ndarray:
        """A private, writable, C-contiguous copy in the stored numpy dtype (into `out`, if given)."""
        dtype = self._np_dtype()
        if self.strides is None:
            if out is None:
                out = np.empty(self.shape, dtype=dtype)
            self.file.read_into(out, self.offset)
            return out
        # a strided view: read the span of storage it touches, then gather
        span = 1 + sum((d - 1) * s for d, s in zip(self.shape, self.strides)) if self.size else 0
        buf = np.empty(span, dtype=dtype)
        self.file.read_into(buf, self.offset)
        strided = np.lib.stride_tricks.as_strided(
            buf, self.shape, tuple(s * dtype.itemsize for s in self.strides), writeable=False)
        if out is None:
            return np.ascontiguousarray(strided)
        out[...] = strided
        return out

    def float32(self, out: Optional[np.ndarray] = None) -> np.ndarray:
        """A private, writable float32 copy (into `out`, C-contiguous, if given), widened
        chunk by chunk from half precision."""
        if self.dtype not in FLOAT_DTYPES:
            raise fail(self.file.path, f"tensor {self.name}: stored as {self.dtype}, expected floating point")
        if out is None:
            out = np.empty(self.shape, dtype=np.float32)
        if self.dtype == "F32" and self.strides is None:
            self.file.read_into(out, self.offset)
            return out
        if self.strides is not None:
            out[...] = self.read()
            return out
        dtype = self._np_dtype()
        flat = out.reshape(-1)
        for start in range(0, self.size, _CHUNK):
            chunk = np.empty(min(_CHUNK, self.size - start), dtype=dtype)
            self.file.read_into(chunk, self.offset + start * dtype.itemsize)
            widen(chunk, out=flat[start:start + len(chunk)])
        return out


class _StoredParts:
    """A quantised matrix kept in a file as several stored tensors (parts)."""

    strides = None

    def __init__(self, name: str, parts: dict[str, Tensor], shape: tuple[int, ...]):
        self.name = name
        self.parts = parts
        self.shape = shape
        self.file = next(iter(parts.values())).file

    @property
    def size(self) -> int:
        return n_elements(self.shape)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.parts.values())

    def _viewed_parts(self) -> dict:
        # a part the mapping cannot view (misaligned) is read instead
        parts = {}
        for k, t in self.parts.items():
            v = t.view()
            parts[k] = v if v is not None else t.read()
        return parts


class QuantizedTensor(_StoredParts):
    """A uint8 matrix of an rwkvx file: five stored tensors q, mx, rx, my, ry (see quant.py)."""

    dtype = "RWKVX_U8"

    def __init__(self, name: str, parts: dict[str, Tensor]):
        super().__init__(name, parts, parts["q"].shape)

    def view(self) -> QuantizedMatrix:
        return QuantizedMatrix(**self._viewed_parts())

    def read(self, q_out: Optional[np.ndarray] = None) -> QuantizedMatrix:
        """A private copy (q into `q_out`, if given)."""
        return QuantizedMatrix(**{k: t.read(out=q_out if k == "q" else None) for k, t in self.parts.items()})


class Q4Tensor(_StoredParts):
    """A q4 matrix of an rwkvx file: stored tensors q4, sd, sm, D, M, and n_cols (one int64:
    the packed nibbles are padded to whole groups of 64 columns; see quant.Q4Matrix)."""

    dtype = "RWKVX_Q4"

    def __init__(self, name: str, parts: dict[str, Tensor], n_cols: int):
        super().__init__(name, parts, (parts["q4"].shape[0], n_cols))
        self.n_cols = n_cols

    def view(self) -> Q4Matrix:
        return Q4Matrix(**self._viewed_parts(), n_cols=self.n_cols)

    def read(self) -> Q4Matrix:
        """A private copy."""
        return Q4Matrix(**{k: t.read() for k, t in self.parts.items()}, n_cols=self.n_cols)


class TensorSource:
    """The named tensors of one checkpoint (a file, or a folder of shards).

    format: "safetensors", "rwkvx" (a file written by rwkvx.convert), "pth", "rwkv.cpp",
    "hf" (a Hugging Face folder). decay_is_transformed: att.time_decay already holds
    -exp(raw), as rwkv.cpp and rwkvx files store it.
    """

    def __init__(self, path: str, fmt: str, decay_is_transformed: bool = False):
        self.path = path
        self.format = fmt
        self.decay_is_transformed = decay_is_transformed
        self.tensors: dict[str, Tensor | QuantizedTensor | Q4Tensor] = {}
        self.metadata: dict[str, str] = {}
        self.config: dict = {}
        self.files: list[MappedFile] = []

    @property
    def file_size(self) -> int:
        return sum(f.size for f in self.files)


class Progress:
    """A one-line progress bar on stderr, for work measured in bytes.

    Drawn only when stderr is a terminal (or `enabled` is True) and only once the work has
    taken `delay` seconds, so quick loads and captured output stay silent.
    """

    def __init__(self, label: str, total: int, *, enabled: Optional[bool] = None, delay: float = 1.0,
                 stream=None):
        self.stream = stream if stream is not None else sys.stderr
        if enabled is None:
            isatty = getattr(self.stream, "isatty", None)
            enabled = bool(isatty and isatty())
        self.enabled = enabled
        self.label, self.total, self.done = label, max(total, 1), 0
        self.delay = delay
        self.start = time.monotonic()
        self._last = 0.0
        self._drawn = False

    def advance(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.start >= self.delay and (now - self._last >= 0.1 or self.done >= self.total):
            self._draw(now)

    def _draw(self, now: float) -> None:
        self._last = now
        self._drawn = True
        frac = min(self.done / self.total, 1.0)
        bar = "#" * int(frac * 30)
        self.stream.write(f"\rrwkvx: {self.label} [{bar:<30}] {frac:4.0%} "
                          f"{self.done / 1e6:,.0f}/{self.total / 1e6:,.0f} MB {now - self.start:5.1f} s")
        self.stream.flush()

    def close(self) -> None:
        if self._drawn:
            self._draw(time.monotonic())
            self.stream.write("\n")
            self.stream.flush()
