"""The quantised weight formats: uint8 (per-row and per-column min-max) and q4 (4-bit
groups of 64 along the input, further below).

uint8 is the format of ChatRWKV's ``i8`` strategy, in rwkvx's (out, in) orientation.
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


# ---- q4: 4-bit groups along the input dimension ---------------------------------------
#
# W[i, j] ~ q[i, j] * d[i, g] + m[i, g] for the group g = j // Q4_GROUP, with q in 0..15,
#   d[i, g] = sd[i, g] * D[i]      sd uint8 (1..255), D float16 per row
#   m[i, g] = sm[i, g] * M[i]      sm int8 (-127..127), M float16 per row
# (8-bit scales under a 16-bit row scale, as ggml's Q4_K keeps 6-bit ones under a 16-bit
# super-block scale). Every product there is exact in float32: sd * D and sm * M need 8 + 11
# significant bits, q * d another 4, at most 23 < 24; so W's float32 value is
# q * d + m rounded once, the same whether a kernel computes it with one fused multiply-add
# or a multiply then an add. dequantize() computes exactly that.
#
# Packing: row i's group g is 32 bytes, eight little-endian 32-bit words; bits 4p .. 4p + 3
# of word k hold column 64 g + 8 p + k (p, k = 0..7). So byte 32 g + 4 k + t holds column
# 64 g + 16 t + k in its low nibble and 64 g + 16 t + 8 + k in its high one. One vector load
# holds a group, and shifting its words by 4p puts eight consecutive columns in eight lanes
# (see _q4.h). A partial last group is padded with zero nibbles.
#
# Bits per weight: 4 + 16 / 64 for the scales = 4.25, plus 32 bits a row.
#
# Chosen by simulation (dequantise, run float32) on the demo model's held-out text, KL
# against float32 in nats per byte: groups of 32/64/128 with float16 scale and minimum
# (5.0/4.5/4.25 bits), min-max 1.76e-2/2.25e-2/2.65e-2, with the scale search 1.89e-2 at 64;
# 8-bit group scales under float16 row scales cost nothing measurable (1.93e-2 at 64, 4.25
# bits; 1.35e-2 at 32, 4.5 bits); a Hadamard rotation of each group 1.86e-2; weighting the
# search by the layer norms' weights no change. 4 bits in any such layout stay far from
# rwkv.cpp Q5_1's 3.6e-3 (5 bits in groups of 64: 4.6e-3; GPTQ with 3000 calibration
# tokens 1.49e-2 against 1.89e-2).

Q4_GROUP = 64
# scale candidates per group: the range divided by 15 + delta, each refitted by least squares
# (ggml's make_qkx2_quants searches the same way, with 21 candidates); see
# README's q4 section for what the search buys against min-max
_Q4_DELTAS = (-1.0, -0.5, 0.0, 0.5, 1.0, 1.5)
# the largest magnitude whose group minimum fits sm * M (float16's largest finite value * 127)
_Q4_LARGEST = 65504.0 * 127


@dataclass(frozen=True)
class Q4Matrix:
    """q4 (n_rows, n_groups * 32) uint8 packed nibbles; sd (n_rows, n_groups) uint8;
    sm (n_rows, n_groups) int8; D, M (n_rows,) float16; n_cols the unpadded width."""

    q4: np.ndarray
    sd: np.ndarray
    sm: np.ndarray
    D: np.ndarray
    M: np.ndarray
    n_cols: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.q4.shape[0], self.n_cols)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.q4, self.sd, self.sm, self.D, self.M))

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / (self.shape[0] * self.shape[1])

    def dequantize(self, dtype=np.float32) -> np.ndarray:
        """The float32 matrix the kernels compute with (as `dtype`), exactly (see above)."""
        n_rows, n_groups = self.sd.shape
        # packed[r, g, k, t]: columns 16 t + k (low nibble) and 16 t + 8 + k (high)
        nib = np.empty((n_rows, n_groups, 4, 2, 8), dtype=np.uint8)
        packed = self.q4.reshape(n_rows, n_groups, 8, 4).transpose(0, 1, 3, 2)
        nib[:, :, :, 0, :] = packed & 15
        nib[:, :, :, 1, :] = packed >> 4
        q = nib.reshape(n_rows, n_groups, Q4_GROUP).astype(np.float32)
        d = self.sd.astype(np.float32) * self.D.astype(np.float32)[:, None]
        m = self.sm.astype(np.float32) * self.M.astype(np.float32)[:, None]
        w = q * d[:, :, None] + m[:, :, None]
        return w.reshape(n_rows, n_groups * Q4_GROUP)[:, :self.n_cols].astype(dtype)


def _q4_fit(w: np.ndarray):
    """Per-group (d, m) with small squared error for groups w (rows, groups, 64) float32."""
    lo = w.min(axis=2)
    span = w.max(axis=2) - lo
    live = span > 0
    span = np.where(live, span, np.float32(1))
    sw = w.sum(axis=2)
    sww = np.einsum("rgk,rgk->rg", w, w)
    n = np.float32(Q4_GROUP)
    # min-max first: d = span / 15, m = lo
    best_d, best_m = span / 15, lo.copy()
    q = np.clip(np.rint((w - lo[..., None]) / best_d[..., None]), 0, 15)
    best_e = ((q * best_d[..., None] + lo[..., None] - w) ** 2).sum(axis=2)
    for delta in _Q4_DELTAS:
        q = np.clip(np.rint((w - lo[..., None]) * ((15 + delta) / span)[..., None]), 0, 15)
        sq = q.sum(axis=2)
        sqq = np.einsum("rgk,rgk->rg", q, q)
        sqw = np.einsum("rgk,rgk->rg", q, w)
        det = n * sqq - sq * sq
        ok = det > 0
        det = np.where(ok, det, np.float32(1))
        d = (n * sqw - sq * sw) / det
        m = (sqq * sw - sq * sqw) / det
        ok &= d > 0
        # the squared error of the least-squares fit, from the sums
        e = d * d * sqq + 2 * d * m * sq - 2 * d * sqw + n * m * m - 2 * m * sw + sww
        better = ok & (e < best_e)
        best_e = np.where(better, e, best_e)
        best_d = np.where(better, d, best_d)
        best_m = np.where(better, m, best_m)
    return np.where(live, best_d, np.float32(0)), best_m


def _row_scale(v: np.ndarray, top: int, what: str, name: str) -> np.ndarray:
    # float16 row scale with v / scale within +-top; a zero row gets 1 (any scale works)
    biggest = np.abs(v).max(axis=1)
    scale = (biggest / top).astype(np.float16)
    if not np.isfinite(scale).all():
        i = int(np.argmax(~np.isfinite(scale)))
        raise RwkvxError(f"quantize_q4: {name} row {i}: group {what}s up to {biggest[i]:g} do not fit "
                         f"q4's float16 row scale")
    tiny = np.float16(2.0 ** -24)
    return np.where(biggest > 0, np.maximum(scale, tiny), np.float16(1))


def quantize_q4(w: np.ndarray, *, name: str = "the matrix", rows_per_chunk: int | None = None) -> Q4Matrix:
    """Quantise a float matrix (n_rows, n_cols) to q4 (see Q4Matrix).

    Works row blocks at a time in float32 (a few MB of temporaries whatever the size).
    name: what the matrix is called in errors.
    """
    if w.ndim != 2 or w.shape[0] == 0 or w.shape[1] == 0:
        raise RwkvxError(f"quantize_q4: expected a non-empty 2-D matrix, got shape {w.shape}")
    n_rows, n_cols = w.shape
    n_groups = -(-n_cols // Q4_GROUP)
    width = n_groups * Q4_GROUP
    q4 = np.empty((n_rows, n_groups * 32), dtype=np.uint8)
    d_all = np.empty((n_rows, n_groups), dtype=np.float32)
    m_all = np.empty((n_rows, n_groups), dtype=np.float32)
    rows = rows_per_chunk or max(1, (1 << 18) // width)

    def groups(r0: int) -> np.ndarray:
        # rows r0 .. r0 + rows - 1 as (rows, n_groups, 64) float32, padded: the padding repeats
        # the row's last value, so it never widens the last group's range
        block = np.array(w[r0:r0 + rows], dtype=np.float32)
        if width != n_cols:
            block = np.concatenate([block, np.repeat(block[:, -1:], width - n_cols, axis=1)], axis=1)
        return block.reshape(block.shape[0], n_groups, Q4_GROUP)

    # two passes over row blocks: fit each group, then (once the row scales are known)
    # round; a block's float32 copy is all the temporary memory there is
    for r0 in range(0, n_rows, rows):
        block = np.array(w[r0:r0 + rows], dtype=np.float32)
        if not np.isfinite(block).all():
            i, j = np.argwhere(~np.isfinite(block))[0]
            raise RwkvxError(f"quantize_q4: {name} has NaN or infinite entries (first at "
                             f"[{r0 + i}, {j}]: {block[i, j]}); q4 cannot represent them")
        if np.abs(block).max() > _Q4_LARGEST:
            i, j = np.unravel_index(np.argmax(np.abs(block)), block.shape)
            raise RwkvxError(f"quantize_q4: {name}[{r0 + i}, {j}] = {block[i, j]:g} is beyond q4's "
                             f"range (+-{_Q4_LARGEST:g}: a float16 row scale of 8-bit group minima)")
        d_all[r0:r0 + rows], m_all[r0:r0 + rows] = _q4_fit(groups(r0))
    D = _row_scale(d_all, 255, "scale", name)
    M = _row_scale(m_all, 127, "minimum", name)
    Df, Mf = D.astype(np.float32)[:, None], M.astype(np.float32)[:, None]
    # a live group keeps a scale of at least one step of D
    sd = np.clip(np.rint(d_all / Df), np.where(d_all > 0, 1, 0), 255).astype(np.uint8)
    sm = np.clip(np.rint(m_all / Mf), -127, 127).astype(np.int8)
    d_q = sd.astype(np.float32) * Df
    m_q = sm.astype(np.float32) * Mf
    for r0 in range(0, n_rows, rows):
        g = groups(r0)
        d, m = d_q[r0:r0 + rows, :, None], m_q[r0:r0 + rows, :, None]
        safe = np.where(d > 0, d, np.float32(1))
        q = np.clip(np.rint((g - m) / safe), 0, 15).astype(np.uint8)
        q = q.reshape(q.shape[0], n_groups, 4, 2, 8)
        packed = (q[:, :, :, 0, :] | (q[:, :, :, 1, :] << 4)).transpose(0, 1, 3, 2)
        q4[r0:r0 + rows] = packed.reshape(q.shape[0], -1)
    if width != n_cols:
        # zero nibbles past the last column, so that a file's bytes depend only on the weights
        _zero_padding(q4, n_cols)
    return Q4Matrix(q4=q4, sd=sd, sm=sm, D=D.astype(np.float16), M=M.astype(np.float16), n_cols=n_cols)


def _zero_padding(q4: np.ndarray, n_cols: int) -> None:
    cols = np.arange(q4.shape[1] * 2)
    g, rest = divmod(cols, Q4_GROUP)
    p, k = divmod(rest, 8)
    t, high = divmod(p, 2)
    byte = 32 * g + 4 * k + t
    for c in range(n_cols, cols.size):
        q4[:, byte[c]] &= np.uint8(0x0F if high[c] else 0xF0)


def q4_part_nbytes(n_rows: int, n_cols: int) -> tuple[int, ...]:
    """Bytes of a q4 matrix's parts (q4, sd, sm, D, M) for its shape."""
    n_groups = -(-n_cols // Q4_GROUP)
    return (n_rows * 32 * n_groups, n_rows * n_groups, n_rows * n_groups, 2 * n_rows, 2 * n_rows)


def q4_bits_per_weight(shapes) -> float:
    """Bits a q4 model's matrices of these (n_rows, n_cols) shapes hold per weight."""
    shapes = list(shapes)
    return 8 * sum(sum(q4_part_nbytes(r, c)) for r, c in shapes) / max(1, sum(r * c for r, c in shapes))
