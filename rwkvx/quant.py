"""The uint8 weight format: per-row and per-column min-max quantisation.

This is the format of ChatRWKV's ``i8`` strategy, in rwkvx's (out, in) orientation.
A float matrix W (n_rows, n_cols) becomes

    W[i, j] ~ (q[i, j] + 0.5) * ry[i] * rx[j] + my[i] + mx[j]

with q uint8 in 0..255, one (mx, rx) per input column j and one (my, ry) per output
row i, all float32. Quantising subtracts the minima (along the larger dimension
first, as ChatRWKV does), divides by the row maxima and then the column maxima, so
every entry lands in [0, 1], and keeps floor(256 * entry): each weight is off by at
most half a step of 1/256 of its row and column scale. The 1/256 is split as 1/16
into each of rx and ry, as in ChatRWKV.

The kernels never rebuild W: see _prepare_u8 in _matvec.pyx for the algebra they use instead.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rwkvx.errors import RwkvxError


@dataclass(frozen=True)
class QuantizedMatrix:
    """q (n_rows, n_cols) uint8; mx, rx (n_cols,) and my, ry (n_rows,) float32."""

    q: np.ndarray
    mx: np.ndarray
    rx: np.ndarray
    my: np.ndarray
    ry: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.q, self.mx, self.rx, self.my, self.ry))

    def dequantize(self, dtype=np.float32) -> np.ndarray:
        """Rebuild the float matrix the kernels compute with (for tests and the reference)."""
        q = self.q.astype(dtype)
        rx, ry, mx, my = (a.astype(dtype) for a in (self.rx, self.ry, self.mx, self.my))
        return (q + 0.5) * ry[:, None] * rx[None, :] + my[:, None] + mx[None, :]


def _safe_scale(r: np.ndarray) -> np.ndarray:
    # A row or column that is constant after removing minima has range 0; any positive
    # scale represents it exactly up to the half-step offset, and 1 avoids dividing by 0.
    return np.where(r > 0, r, np.float32(1.0)).astype(np.float32)


def quantize_u8(w: np.ndarray, *, overwrite: bool = False, q_out: np.ndarray | None = None,
                name: str = "the matrix") -> QuantizedMatrix:
    """Quantise a float matrix (n_rows, n_cols) to the uint8 format.

    The work is done in float32 in one buffer: a copy of w, or w itself when overwrite
    is True (the loader passes a temporary it owns, so no second float copy exists).
    q_out: where to write q (uint8, w's shape, C-contiguous), if given.
    name: what the matrix is called in errors (the loader passes the tensor's name).
    """
    if w.ndim != 2 or w.shape[0] == 0 or w.shape[1] == 0:
        raise RwkvxError(f"quantize_u8: expected a non-empty 2-D matrix, got shape {w.shape}")
    if overwrite and w.dtype == np.float32 and w.flags.writeable and w.flags.c_contiguous:
        work = w
    else:
        work = np.array(w, dtype=np.float32, order="C")
    if not np.isfinite(work).all():
        i, j = np.argwhere(~np.isfinite(work))[0]
        raise RwkvxError(f"quantize_u8: {name} has NaN or infinite entries (first at [{i}, {j}]: "
                         f"{work[i, j]}); uint8 cannot represent them")
    n_rows, n_cols = work.shape
    if n_cols > n_rows:
        mx = work.min(axis=0)
        work -= mx[None, :]
        my = work.min(axis=1)
        work -= my[:, None]
    else:
        my = work.min(axis=1)
        work -= my[:, None]
        mx = work.min(axis=0)
        work -= mx[None, :]
    ry = _safe_scale(work.max(axis=1))
    work /= ry[:, None]
    rx = _safe_scale(work.max(axis=0))
    work /= rx[None, :]
    work *= 256.0
    np.floor(work, out=work)
    np.clip(work, 0, 255, out=work)
    if q_out is None:
        q = work.astype(np.uint8)
    else:
        np.copyto(q_out, work, casting="unsafe")
        q = q_out
    return QuantizedMatrix(
        q=q,
        mx=np.ascontiguousarray(mx, dtype=np.float32),
        rx=(rx / 16).astype(np.float32),
        my=np.ascontiguousarray(my, dtype=np.float32),
        ry=(ry / 16).astype(np.float32),
    )
