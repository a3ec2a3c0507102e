"""Matrix-vector products: float32 and uint8-dequantising, parallel over output rows.

Over 90% of a decoded token's time is spent here, reading every weight once.
"""
from cython.parallel import prange
from libc.stdint cimport uint8_t
from libc.stdlib cimport malloc, free

import numpy as np

from rwkvx.errors import RwkvxError

cdef extern from "_simd.h" nogil:
    int rwkvx_detect_simd()
    int rwkvx_simd_level
    float rwkvx_dot_f32(const float* w, const float* x, Py_ssize_t n)
    float rwkvx_dot_u8(const uint8_t* q, const float* x, Py_ssize_t n)
    void rwkvx_dot4_f32(const float* w, Py_ssize_t stride, const float* x, Py_ssize_t n, float* out4)
    void rwkvx_dot4_u8(const uint8_t* q, Py_ssize_t stride, const float* x, Py_ssize_t n, float* out4)

rwkvx_detect_simd()


def simd_level() -> int:
    """0: portable loops; 1: AVX2 + FMA. Set RWKVX_SIMD=0 before import to force 0."""
    return rwkvx_simd_level


cdef inline void _rows_f32(float* out, const float* W, const float* x,
                           Py_ssize_t n_rows, Py_ssize_t n_cols, Py_ssize_t block) noexcept nogil:
    # rows 4*block .. 4*block+3; a partial last block goes row by row. Which kernel a row
    # gets depends only on its index, never on the thread running it.
    cdef Py_ssize_t i = 4 * block
    if i + 4 <= n_rows:
        rwkvx_dot4_f32(W + i * n_cols, n_cols, x, n_cols, out + i)
    else:
        while i < n_rows:
            out[i] = rwkvx_dot_f32(W + i * n_cols, x, n_cols)
            i += 1


cdef void _matvec_f32(float* out, const float* W, const float* x,
                      Py_ssize_t n_rows, Py_ssize_t n_cols, int n_threads) noexcept nogil:
    # out = W @ x, W (n_rows, n_cols) row-major, parallel over blocks of four rows. No shared
    # accumulator, so the result is bit-identical for every n_threads.
    cdef Py_ssize_t block
    for block in prange((n_rows + 3) // 4, schedule="static", num_threads=n_threads):
        _rows_f32(out, W, x, n_rows, n_cols, block)


cdef inline void _rows_u8(float* out, const Matrix* m, const float* xr, float half_xr,
                          float sum_x, float sum_mx, Py_ssize_t block) noexcept nogil:
    cdef Py_ssize_t i = 4 * block, r, n_cols = m.n_cols
    cdef Py_ssize_t end = i + 4
    if end <= m.n_rows:
        rwkvx_dot4_u8(m.q + i * n_cols, n_cols, xr, n_cols, out + i)
    else:
        end = m.n_rows
        for r in range(i, end):
            out[r] = rwkvx_dot_u8(m.q + r * n_cols, xr, n_cols)
    for r in range(i, end):
        out[r] = m.ry[r] * (out[r] + half_xr) + m.my[r] * sum_x + sum_mx


cdef void _matvec_u8(float* out, const Matrix* m, const float* x, float* xr,
                     int n_threads) noexcept nogil:
    # With W[i, j] = (q[i, j] + 0.5) ry[i] rx[j] + my[i] + mx[j] and xr = rx * x:
    #   y[i] = sum_j W[i, j] x[j]
    #        = ry[i] (sum_j q[i, j] xr[j] + 0.5 sum_j xr[j]) + my[i] sum_j x[j] + sum_j mx[j] x[j]
    # The three sums over j do not depend on i: compute them once per call, and the
    # parallel loop is a plain u8 * f32 dot product that never forms a float weight.
    # xr: scratch of n_cols floats.
    cdef Py_ssize_t i, j, n_cols = m.n_cols
    cdef double sum_xr = 0.0, sum_x = 0.0, sum_mx = 0.0
    for j in range(n_cols):
        xr[j] = m.rx[j] * x[j]
        sum_xr += xr[j]
        sum_x += x[j]
        sum_mx += m.mx[j] * x[j]
    cdef float half_xr = <float>(0.5 * sum_xr)
    cdef float fsum_x = <float>sum_x
    cdef float fsum_mx = <float>sum_mx
    cdef Py_ssize_t block
    for block in prange((m.n_rows + 3) // 4, schedule="static", num_threads=n_threads):
        _rows_u8(out, m, xr, half_xr, fsum_x, fsum_mx, block)


cdef void _matvec(float* out, const Matrix* m, const float* x, float* scratch,
                  int n_threads) noexcept nogil:
    # scratch: n_cols floats, used by the uint8 path only.
    if m.kind == MATRIX_F32:
        _matvec_f32(out, m.f32, x, m.n_rows, m.n_cols, n_threads)
    else:
        _matvec_u8(out, m, x, scratch, n_threads)


def _check_vector(name, const float[::1] v, Py_ssize_t n):
    if v.shape[0] != n:
        raise RwkvxError(f"{name}: expected ({n},) float32, got ({v.shape[0]},)")


cdef class Linear:
    """A weight matrix ready for the kernels: float32, or uint8 with its min/scale vectors.

    Holds references to the arrays it points into, which may be read-only (memory-mapped).
    """

    @staticmethod
    def f32(W) -> Linear:
        """W: (n_rows, n_cols) float32, C-contiguous."""
        cdef const float[:, ::1] w = W
        cdef Linear self = Linear.__new__(Linear)
        self.m.kind = MATRIX_F32
        self.m.n_rows = w.shape[0]
        self.m.n_cols = w.shape[1]
        self.m.f32 = &w[0, 0] if w.shape[0] > 0 and w.shape[1] > 0 else NULL
        self.arrays = (W,)
        return self

    @staticmethod
    def u8(q, mx, rx, my, ry) -> Linear:
        """q: (n_rows, n_cols) uint8; mx, rx: (n_cols,) float32; my, ry: (n_rows,) float32."""
        cdef const uint8_t[:, ::1] qv = q
        cdef const float[::1] mxv = mx, rxv = rx, myv = my, ryv = ry
        n_rows, n_cols = qv.shape[0], qv.shape[1]
        _check_vector("mx", mxv, n_cols)
        _check_vector("rx", rxv, n_cols)
        _check_vector("my", myv, n_rows)
        _check_vector("ry", ryv, n_rows)
        if n_rows == 0 or n_cols == 0:
            raise RwkvxError(f"q: expected a non-empty matrix, got ({n_rows}, {n_cols})")
        cdef Linear self = Linear.__new__(Linear)
        self.m.kind = MATRIX_U8
        self.m.n_rows = n_rows
        self.m.n_cols = n_cols
        self.m.q = &qv[0, 0]
        self.m.mx = &mxv[0]
        self.m.rx = &rxv[0]
        self.m.my = &myv[0]
        self.m.ry = &ryv[0]
        self.arrays = (q, mx, rx, my, ry)
        return self

    @property
    def shape(self):
        return (self.m.n_rows, self.m.n_cols)

    @property
    def dtype(self) -> str:
        return "float32" if self.m.kind == MATRIX_F32 else "uint8"

    @property
    def nbytes(self) -> int:
        """Bytes of weights read by one product."""
        return sum(a.nbytes for a in self.arrays)

    def __call__(self, x, out=None, *, int n_threads=1):
        """Return W @ x as float32 (n_rows,). x: (n_cols,) float32; out: optional (n_rows,)."""
        cdef const float[::1] xv = x
        if out is None:
            out = np.empty(self.m.n_rows, dtype=np.float32)
        cdef float[::1] outv = out
        if xv.shape[0] != self.m.n_cols or outv.shape[0] != self.m.n_rows:
            raise RwkvxError(f"matvec: W {self.shape}, x ({xv.shape[0]},), out ({outv.shape[0]},)")
        if n_threads < 1:
            raise RwkvxError(f"n_threads: expected >= 1, got {n_threads}")
        if self.m.n_rows == 0:
            return out
        if self.m.n_cols == 0:
            outv[:] = 0
            return out
        cdef float* scratch = <float*>malloc(self.m.n_cols * sizeof(float))
        if scratch == NULL:
            raise MemoryError()
        try:
            with nogil:
                _matvec(&outv[0], &self.m, &xv[0], scratch, n_threads)
        finally:
            free(scratch)
        return out


def set_simd_level(int level) -> int:
    """Choose the inner loops: 0 portable, 1 AVX2+FMA (only where the CPU has it). Returns the level set.

    For tests and measurements; the level is detected once at import.
    """
    if level not in (0, 1):
        raise RwkvxError(f"simd level: expected 0 or 1, got {level}")
    global rwkvx_simd_level
    cdef int detected = rwkvx_detect_simd()
    rwkvx_simd_level = min(level, detected)
    return rwkvx_simd_level
