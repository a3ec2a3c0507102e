"""Matrix-vector products over float32, bfloat16, float16, uint8 and q4 weights.

Over 90% of a decoded token's time is spent here, reading every weight once. Work is
split over blocks of four output rows; no row is ever shared between threads.
"""
from cython.parallel import prange, threadid
from libc.stdint cimport uint8_t, uint16_t
from libc.stdlib cimport malloc, free

import threading

import numpy as np

from rwkvx.kernels._parallel cimport kernel_threads  # fewer threads while other programs contend for the cores
from rwkvx.errors import RwkvxError

cdef extern from "_simd.h" nogil:
    int rwkvx_detect_simd()
    int rwkvx_best_simd()
    int rwkvx_simd_level
    int rwkvx_have_vl
    float rwkvx_dot_f32(const float* w, const float* x, Py_ssize_t n)
    float rwkvx_dot_bf16(const uint16_t* w, const float* x, Py_ssize_t n)
    float rwkvx_dot_f16(const uint16_t* w, const float* x, Py_ssize_t n)
    float rwkvx_dot_u8(const uint8_t* w, const float* x, Py_ssize_t n)
    void rwkvx_dot4_f32(const float* w, Py_ssize_t stride, const float* x, Py_ssize_t n, float* out4)
    void rwkvx_dot4_bf16(const uint16_t* w, Py_ssize_t stride, const float* x, Py_ssize_t n, float* out4)
    void rwkvx_dot4_f16(const uint16_t* w, Py_ssize_t stride, const float* x, Py_ssize_t n, float* out4)
    void rwkvx_dot4_u8(const uint8_t* w, Py_ssize_t stride, const float* x, Py_ssize_t n, float* out4)
    void rwkvx_dot4x_f32(const float* w, Py_ssize_t stride, const float* X, Py_ssize_t ldx, int T, Py_ssize_t n,
                         float* out, Py_ssize_t ldo)
    void rwkvx_dot4x_bf16(const uint16_t* w, Py_ssize_t stride, const float* X, Py_ssize_t ldx, int T,
                          Py_ssize_t n, float* out, Py_ssize_t ldo)
    void rwkvx_dot4x_f16(const uint16_t* w, Py_ssize_t stride, const float* X, Py_ssize_t ldx, int T,
                         Py_ssize_t n, float* out, Py_ssize_t ldo)
    void rwkvx_dot4x_u8(const uint8_t* w, Py_ssize_t stride, const float* X, Py_ssize_t ldx, int T,
                        Py_ssize_t n, float* out, Py_ssize_t ldo)
    enum: RWKVX_FEW_TOKENS
    void rwkvx_prepare_u8(const float* rx, const float* mx, const float* x, float* xr, Py_ssize_t n,
                          double* sums)
    Py_ssize_t rwkvx_pack_stride(Py_ssize_t n)
    enum:
        RWKVX_WIDEN_BF16
        RWKVX_WIDEN_F16
        RWKVX_WIDEN_U8
    ctypedef struct rwkvx_widen_job:
        int kind
        const void* src
        float* dst
        Py_ssize_t count
    void rwkvx_widen_rest(const rwkvx_widen_job* job, Py_ssize_t start)
    void rwkvx_pack_pair(const float* X, Py_ssize_t ldx, Py_ssize_t n_tok, Py_ssize_t p,
                         Py_ssize_t n, float* P)
    ctypedef struct rwkvx_u8_sums:
        pass
    ctypedef struct rwkvx_u8_affine:
        const float* ry
        const float* my
        const rwkvx_u8_sums* sums
    void rwkvx_u8_finish(float* y, const float* ry, const float* my, const rwkvx_u8_sums* s,
                         Py_ssize_t count)
    void rwkvx_gemm4_f32(const float* w, Py_ssize_t ldw, const float* X, Py_ssize_t ldx,
                         const float* P, Py_ssize_t n_tok, Py_ssize_t n, float* Y, Py_ssize_t ldy,
                         const rwkvx_widen_job* job, const rwkvx_u8_affine* u8)
    int rwkvx_gemm4_stored(int kind, const void* src, const void* next, const float* X,
                           const float* P, Py_ssize_t n_tok, Py_ssize_t n, float* Y, Py_ssize_t ldy,
                           const rwkvx_u8_affine* u8)

cdef extern from "_q4.h" nogil:
    ctypedef struct rwkvx_q4:
        const uint8_t* q
        const uint8_t* sd
        const signed char* sm
        const uint16_t* D
        const uint16_t* M
        Py_ssize_t n_cols
        Py_ssize_t n_groups
    float rwkvx_dot_q4(const rwkvx_q4* m, Py_ssize_t i, const float* x)
    void rwkvx_dot4_q4(const rwkvx_q4* m, Py_ssize_t i, const float* x, float* out4, int prefetch)
    void rwkvx_dot4x_q4(const rwkvx_q4* m, Py_ssize_t i, const float* X, Py_ssize_t ldx, int T, float* out,
                        Py_ssize_t ldo, int prefetch)
    void rwkvx_widen_q4(const rwkvx_q4* m, Py_ssize_t i, Py_ssize_t n_rows, float* out)
    int rwkvx_gemm4_q4(const rwkvx_q4* m, Py_ssize_t i, const float* X, const float* P, Py_ssize_t n_tok,
                       float* Y, Py_ssize_t ldy, int prefetch)

cdef extern from "_lowrank.h" nogil:
    enum:
        RWKVX_LOWRANK_BLOCK
    void rwkvx_lowrank_block(int level, Py_ssize_t n_in, Py_ssize_t width, const float* x0, const float* x1,
                             const float* wt, Py_ssize_t ldw, float* out0, float* out1)

cdef extern from "_int8.h" nogil:
    int rwkvx_i8_has_vnni
    int rwkvx_i8_vnni256
    int rwkvx_i8_last_loops
    enum:
        RWKVX_HAVE_AVXVNNI
    void rwkvx_i8_detect()
    int rwkvx_i8_level()
    Py_ssize_t rwkvx_i8_stride(Py_ssize_t n)
    int rwkvx_i8_quantize(const float* xr, Py_ssize_t n, signed char* a, float* scale)
    void rwkvx_i8_block(const uint8_t* q, Py_ssize_t n, int n_r, const signed char* A, Py_ssize_t lda,
                        Py_ssize_t n_tok, const float* ry, const float* my, const rwkvx_u8_sums* sums,
                        float* Y, Py_ssize_t ldy, const uint8_t* next)

cdef extern from "_bf16dot.h" nogil:
    void rwkvx_bd_detect()
    int rwkvx_bd_level()
    Py_ssize_t rwkvx_bd_stride(Py_ssize_t n)
    void rwkvx_bd_round(const float* x, Py_ssize_t n, uint16_t* out)
    void rwkvx_bd_block(const uint16_t* w, Py_ssize_t n, int n_r, const uint16_t* X, Py_ssize_t ldx,
                        Py_ssize_t n_tok, float* Y, Py_ssize_t ldy, const uint16_t* next)

cdef extern from "_q4int8.h" nogil:
    Py_ssize_t rwkvx_q4i8_stride(Py_ssize_t n)
    void rwkvx_q4i8_prepare(const float* x, Py_ssize_t n, uint8_t* out)
    void rwkvx_q4i8_block(const rwkvx_q4* m, Py_ssize_t i, int n_r, const uint8_t* P, Py_ssize_t ldp,
                          Py_ssize_t n_tok, float* Y, Py_ssize_t ldy, int prefetch)

rwkvx_detect_simd()
rwkvx_i8_detect()
rwkvx_bd_detect()
_HAVE_VL = bool(rwkvx_have_vl)
# the 256-bit vpdpbusd each form needs: 1 AVX-VNNI, 2 AVX-512 VNNI + VL (see _int8.h)
_VNNI256 = {0: True, 1: rwkvx_i8_vnni256 == 1, 2: bool(rwkvx_i8_has_vnni and rwkvx_have_vl)}

ARITHMETICS = ("float32", "int8", "bfloat16")

DTYPES = {MATRIX_F32: "float32", MATRIX_U8: "uint8", MATRIX_BF16: "bfloat16", MATRIX_F16: "float16",
          MATRIX_Q4: "q4"}


def simd_level() -> int:
    """The inner loops in use: 0 portable; 1 AVX2 + FMA; 2 AVX2 + FMA with AVX-512
    matrix-matrix products. The default is the best the CPU has (RWKVX_SIMD=0|1|2 before
    import chooses); levels 1 and 2 give bit-identical results."""
    return rwkvx_simd_level


def best_simd_level() -> int:
    """The highest level this CPU supports."""
    return rwkvx_best_simd()


def int8_level() -> int:
    """The loops of int8 arithmetic (Linear.with_arithmetic) in use: 2 AVX-512 VNNI, 1 C
    loops built for AVX2 (with AVX-VNNI where the CPU has it: int8_vnni256), 0 portable C.
    They follow the SIMD level (set_simd_level) and all give the same bits."""
    return rwkvx_i8_level()


def int8_vnni256() -> int:
    """Which 256-bit vpdpbusd int8_level 1 multiplies with: 1 AVX-VNNI's (Intel's client
    cores since Alder Lake, detected at import), 0 none (AVX2's vpmaddwd), 2 AVX-512's form
    of the same instruction (set by tests). All give the same bits."""
    return rwkvx_i8_vnni256


# whether this build has the AVX-VNNI loops (a compiler that knows the instructions)
AVX_VNNI_BUILT = bool(RWKVX_HAVE_AVXVNNI)
_INT8_LOOPS = ("portable", "avx2", "avx512-vnni", "avx-vnni", "avx-vnni-as-evex")


def int8_last_loops() -> str | None:
    """Which loops the last int8 block product ran (for tests): "portable", "avx2",
    "avx512-vnni", "avx-vnni" or "avx-vnni-as-evex"; None before any."""
    return _INT8_LOOPS[rwkvx_i8_last_loops] if rwkvx_i8_last_loops >= 0 else None


def set_int8_vnni256(int mode) -> int:
    """Choose int8_level 1's multiply: 0 AVX2's, 1 AVX-VNNI's, 2 AVX-512 VNNI + VL's (the
    same loop as 1 in the instruction's other encoding), each only where the CPU has it
    (else 0). Returns the mode set.

    For tests: mode 2 runs the AVX-VNNI loops on CPUs with AVX-512 but not AVX-VNNI.
    """
    if mode not in (0, 1, 2):
        raise RwkvxError(f"int8 vnni256: expected 0, 1 or 2, got {mode}")
    global rwkvx_i8_vnni256
    rwkvx_i8_vnni256 = mode if _VNNI256[mode] else 0
    return rwkvx_i8_vnni256


def bf16_level() -> int:
    """The loops of bfloat16 arithmetic (Linear.with_arithmetic) in use: 2 AVX512-BF16's
    vdpbf16ps (SIMD level 2 on a CPU that has it), 1 AVX2's FMA following its rules (about
    1.5 times the float32 product's time), 0 plain C (a hundred times). All give the same
    bits."""
    return rwkvx_bd_level()


def set_simd_level(int level) -> int:
    """Choose the inner loops: 0 portable, 1 AVX2+FMA, 2 AVX-512 (capped at what the CPU has).
    Returns the level set.

    For tests and measurements; the level is detected once at import.
    """
    if level not in (0, 1, 2):
        raise RwkvxError(f"simd level: expected 0, 1 or 2, got {level}")
    global rwkvx_simd_level
    rwkvx_simd_level = min(level, rwkvx_best_simd())
    return rwkvx_simd_level


def set_avx512vl(bint enabled) -> bool:
    """Whether level 2 may use the loops built for AVX-512VL (the few-token products, q4's
    loops): only where the CPU has it. Returns whether they are used.

    For tests: off, this CPU runs what one with AVX-512F but not VL would (the same bits).
    """
    global rwkvx_have_vl
    rwkvx_have_vl = enabled and _HAVE_VL
    return bool(rwkvx_have_vl)


cdef inline bint _q4_int8(const Matrix* m) noexcept nogil:
    # a q4 matrix in int8 arithmetic: every product, one token too, takes prepared inputs
    return m.int8 and m.kind == MATRIX_Q4


cdef inline rwkvx_q4 _q4(const Matrix* m) noexcept nogil:
    cdef rwkvx_q4 q4
    q4.q = m.q
    q4.sd = m.sd
    q4.sm = m.sm
    q4.D = m.q4_D
    q4.M = m.q4_M
    q4.n_cols = m.n_cols
    q4.n_groups = m.n_groups
    return q4


cdef inline void _dot4(const Matrix* m, Py_ssize_t i, const float* x, float* out) noexcept nogil:
    # out[0..3] = rows i..i+3 of the stored matrix (q itself for uint8) times x
    cdef Py_ssize_t n = m.n_cols
    cdef rwkvx_q4 q4
    if m.kind == MATRIX_Q4:
        q4 = _q4(m)
        rwkvx_dot4_q4(&q4, i, x, out, i + 8 <= m.n_rows)
    elif m.kind == MATRIX_F32:
        rwkvx_dot4_f32(m.f32 + i * n, n, x, n, out)
    elif m.kind == MATRIX_BF16:
        rwkvx_dot4_bf16(m.h16 + i * n, n, x, n, out)
    elif m.kind == MATRIX_F16:
        rwkvx_dot4_f16(m.h16 + i * n, n, x, n, out)
    else:
        rwkvx_dot4_u8(m.q + i * n, n, x, n, out)


cdef inline void _dot4x(const Matrix* m, Py_ssize_t i, const float* X, int T, float* out,
                       Py_ssize_t ldo) noexcept nogil:
    # _dot4 of T (at most RWKVX_FEW_TOKENS) tokens X + t n_cols into out + t ldo (the same
    # bits), the rows read once
    cdef Py_ssize_t n = m.n_cols
    cdef rwkvx_q4 q4
    if m.kind == MATRIX_Q4:
        q4 = _q4(m)
        rwkvx_dot4x_q4(&q4, i, X, n, T, out, ldo, i + 8 <= m.n_rows)
    elif m.kind == MATRIX_F32:
        rwkvx_dot4x_f32(m.f32 + i * n, n, X, n, T, n, out, ldo)
    elif m.kind == MATRIX_BF16:
        rwkvx_dot4x_bf16(m.h16 + i * n, n, X, n, T, n, out, ldo)
    elif m.kind == MATRIX_F16:
        rwkvx_dot4x_f16(m.h16 + i * n, n, X, n, T, n, out, ldo)
    else:
        rwkvx_dot4x_u8(m.q + i * n, n, X, n, T, n, out, ldo)


cdef inline Py_ssize_t _few_tokens(const Matrix* m) noexcept nogil:
    # Up to how many tokens a product runs as matrix-vector products (_dot4x, four tokens
    # at a time) rather than in the matrix-matrix tiles, which widen every block of rows
    # into memory and read it back: for a few tokens that, not the multiply-adds, set the
    # pace (bfloat16 RWKV-7 0.4B, 2 sequences, Zen 4: 46.0 -> 33.2 ms a step). Beyond these
    # counts the tiles were as fast or faster (uint8 rows are widened again for every four
    # tokens; q4's tile beat four-token chunks at 8); measured per dtype and level in the
    # README's Speed section. q4's loop needs AVX-512VL; the portable level is unchanged.
    if m.kind == MATRIX_Q4:
        return 4 if rwkvx_simd_level >= 2 and rwkvx_have_vl else 0
    if rwkvx_simd_level == 0:
        return 0
    if rwkvx_simd_level == 1 or m.kind == MATRIX_F32:
        return 16
    return 4 if m.kind == MATRIX_U8 else 8


cdef inline float _dot1(const Matrix* m, Py_ssize_t i, const float* x) noexcept nogil:
    cdef Py_ssize_t n = m.n_cols
    cdef rwkvx_q4 q4
    if m.kind == MATRIX_Q4:
        q4 = _q4(m)
        return rwkvx_dot_q4(&q4, i, x)
    if m.kind == MATRIX_F32:
        return rwkvx_dot_f32(m.f32 + i * n, x, n)
    elif m.kind == MATRIX_BF16:
        return rwkvx_dot_bf16(m.h16 + i * n, x, n)
    elif m.kind == MATRIX_F16:
        return rwkvx_dot_f16(m.h16 + i * n, x, n)
    return rwkvx_dot_u8(m.q + i * n, x, n)


cdef void _prepare_u8(const Matrix* m, const float* x, float* xr, U8Sums* sums) noexcept nogil:
    # With W[i, j] = (q[i, j] + 0.5) ry[i] rx[j] + my[i] + mx[j] and xr = rx * x:
    #   y[i] = sum_j W[i, j] x[j]
    #        = ry[i] (sum_j q[i, j] xr[j] + 0.5 sum_j xr[j]) + my[i] sum_j x[j] + sum_j mx[j] x[j]
    # The three sums over j do not depend on i: compute them once per product (in double,
    # they are few), and the parallel loop is a plain u8 * f32 dot product that never
    # forms a float weight. xr: n_cols floats.
    cdef double s[3]
    rwkvx_prepare_u8(m.rx, m.mx, x, xr, m.n_cols, s)
    sums.half_xr = <float>(0.5 * s[0])
    sums.x = <float>s[1]
    sums.mx = <float>s[2]


cdef void _prepare(const Matrix* m, const float* x, float* xr, signed char* a, U8Sums* sums) noexcept nogil:
    # A uint8 product's input (_prepare_u8); with int8 arithmetic, xr is also rounded to
    # int8 in a (n_cols bytes) with its scale, so that
    #   sum_j q[i, j] xr[j] = scale sum_j q[i, j] a[j] + sum_j q[i, j] e[j],  e = xr - scale a,
    # the first sum exact in integers (_int8.h). Of the rounding error's sum, the part
    # 127.5 sum_j e[j] (127.5 the middle of the codes 0..255) is known and goes into
    # half_xr; what is left, sum_j (q[i, j] - 127.5) e[j], is about a third of the whole in
    # RMS (codes spread around their middle with a standard deviation near 50). Measured on
    # the demo model: KL against float32 1.7e-3 without this term.
    cdef double s[3]
    cdef int total
    if not m.int8:
        _prepare_u8(m, x, xr, sums)
        return
    rwkvx_prepare_u8(m.rx, m.mx, x, xr, m.n_cols, s)
    total = rwkvx_i8_quantize(xr, m.n_cols, a, &sums.scale)
    sums.half_xr = <float>(0.5 * s[0] + 127.5 * (s[0] - <double>sums.scale * total))
    sums.x = <float>s[1]
    sums.mx = <float>s[2]


cdef inline void _rows(float* out, const Matrix* m, const float* x, const U8Sums* sums,
                       Py_ssize_t block) noexcept nogil:
    # rows 4*block .. 4*block+3; a partial last block goes row by row. Which kernel a row
    # gets depends only on its index, never on the thread running it.
    cdef Py_ssize_t i = 4 * block, r
    cdef Py_ssize_t end = i + 4
    cdef rwkvx_q4 q4
    if _q4_int8(m):
        # x: the input prepared by _q4_int8_inputs
        q4 = _q4(m)
        rwkvx_q4i8_block(&q4, i, min(end, m.n_rows) - i, <const uint8_t*>x, 0, 1, out + i, 1, end + 8 <= m.n_rows)
        return
    if end <= m.n_rows:
        _dot4(m, i, x, out + i)
    else:
        end = m.n_rows
        for r in range(i, end):
            out[r] = _dot1(m, r, x)
    if m.kind == MATRIX_U8:
        rwkvx_u8_finish(out + i, m.ry + i, m.my + i, <const rwkvx_u8_sums*>sums, end - i)


cdef uint8_t* _q4_int8_inputs(MatvecJob* jobs, int n_jobs, Matrix* plain) noexcept nogil:
    # The prepared inputs of the jobs' q4 matrices in int8 arithmetic, in one block the
    # caller frees, each job's x pointing at its own (NULL: none needed). Should even a few
    # kilobytes be refused, those jobs get the float32 product (plain: their copies).
    cdef Py_ssize_t total = 0, at = 0
    cdef int k
    cdef uint8_t* block
    for k in range(n_jobs):
        if _q4_int8(jobs[k].m):
            total += rwkvx_q4i8_stride(jobs[k].m.n_cols)
    if total == 0:
        return NULL
    block = <uint8_t*>malloc(total)
    for k in range(n_jobs):
        if _q4_int8(jobs[k].m):
            if block == NULL:
                plain[k] = jobs[k].m[0]
                plain[k].int8 = False
                jobs[k].m = &plain[k]
                continue
            rwkvx_q4i8_prepare(jobs[k].x, jobs[k].m.n_cols, block + at)
            jobs[k].x = <const float*>(block + at)
            at += rwkvx_q4i8_stride(jobs[k].m.n_cols)
    return block


cdef void _matvec(float* out, const Matrix* m, const float* x, float* scratch,
                  int n_threads) noexcept nogil:
    cdef MatvecJob job = MatvecJob(out, m, x)
    _matvec_jobs(&job, 1, scratch, n_threads)


cdef inline double _bytes_per_weight(const Matrix* m) noexcept nogil:
    if m.kind == MATRIX_F32:
        return 4.0
    if m.kind == MATRIX_U8:
        return 1.0
    if m.kind == MATRIX_Q4:
        return 0.55    # 4.25 bits and the row scales
    return 2.0


cdef inline Py_ssize_t _block_at(double target, const double* cost, const Py_ssize_t* first,
                                 int n_jobs) noexcept nogil:
    # the first block whose weights start at or after `target` bytes into the group
    cdef int k = 0
    cdef Py_ssize_t block
    while k < n_jobs - 1 and target >= cost[k + 1]:
        k += 1
    if cost[k + 1] <= cost[k]:
        return first[k + 1]
    block = first[k] + <Py_ssize_t>((target - cost[k]) / (cost[k + 1] - cost[k]) * (first[k + 1] - first[k]) + 0.5)
    return min(max(block, first[k]), first[k + 1])


cdef inline Py_ssize_t _share_start(int tid, int n_threads, const double* cost, const Py_ssize_t* first,
                                   int n_jobs) noexcept nogil:
    # where thread tid's contiguous run of blocks begins (tid == n_threads: the end); the
    # runs hold equal shares of the work cost[n_jobs]
    if tid >= n_threads:
        return first[n_jobs]
    return _block_at(cost[n_jobs] * tid / n_threads, cost, first, n_jobs)


cdef void _matvec_jobs(MatvecJob* jobs, int n_jobs, float* scratch, int n_threads) noexcept nogil:
    _matvec_lowrank_jobs(jobs, n_jobs, NULL, 0, scratch, n_threads)


cdef void _matvec_lowrank_jobs(MatvecJob* jobs, int n_jobs, const LowrankJob* low, int n_low, float* scratch,
                               int n_threads) noexcept nogil:
    # the blocks of all jobs form one index space (the low-rank products' blocks first), so no
    # thread waits at a barrier between the products of a fused group; each thread takes a
    # contiguous run of blocks holding an equal share of the group's weight bytes (float32
    # low-rank matrices beside a uint8 projection: equal numbers of blocks would give one
    # thread far more to read)
    cdef U8Sums sums[MAX_JOBS]
    cdef const float* xin[MAX_JOBS]
    cdef Py_ssize_t first[2 * MAX_JOBS + 1]
    cdef double cost[2 * MAX_JOBS + 1]
    cdef Py_ssize_t block, local, lo, hi
    cdef int k, job, tid, n_all = n_low + n_jobs
    cdef int level = rwkvx_simd_level
    cdef MatvecJob own[MAX_JOBS]
    cdef Matrix plain[MAX_JOBS]
    for k in range(n_jobs):
        own[k] = jobs[k]
    jobs = own
    cdef uint8_t* prepared = _q4_int8_inputs(jobs, n_jobs, plain)
    first[0] = 0
    cost[0] = 0.0
    for k in range(n_low):
        first[k + 1] = first[k] + (low[k].n_out + RWKVX_LOWRANK_BLOCK - 1) // RWKVX_LOWRANK_BLOCK
        cost[k + 1] = cost[k] + <double>low[k].n_in * low[k].n_out * 4.0
    for k in range(n_jobs):
        xin[k] = jobs[k].x
        if jobs[k].m.kind == MATRIX_U8:
            _prepare_u8(jobs[k].m, jobs[k].x, scratch, &sums[k])
            xin[k] = scratch
            scratch += jobs[k].m.n_cols
        first[n_low + k + 1] = first[n_low + k] + (jobs[k].m.n_rows + 3) // 4
        cost[n_low + k + 1] = cost[n_low + k] + <double>jobs[k].m.n_rows * jobs[k].m.n_cols * _bytes_per_weight(jobs[k].m)
    if n_threads > first[n_all]:
        n_threads = <int>first[n_all]
    for tid in prange(n_threads, schedule="static", num_threads=n_threads):
        lo = _share_start(tid, n_threads, cost, first, n_all)
        hi = _share_start(tid + 1, n_threads, cost, first, n_all)
        job = 0
        for block in range(lo, hi):
            while block >= first[job + 1]:
                job = job + 1
            local = block - first[job]
            if job < n_low:
                _lowrank_item(&low[job], local, 1, 1, level)
            else:
                _rows(jobs[job - n_low].out, jobs[job - n_low].m, xin[job - n_low], &sums[job - n_low], local)
    free(prepared)


cdef inline void _lowrank_item(const LowrankJob* job, Py_ssize_t local, Py_ssize_t n_pairs, Py_ssize_t n_tok,
                               int level) noexcept nogil:
    # item `local` of a low-rank product: a block of RWKVX_LOWRANK_BLOCK outputs for a pair of tokens
    cdef Py_ssize_t block = local // n_pairs
    cdef Py_ssize_t t = 2 * (local - block * n_pairs)
    cdef Py_ssize_t i0 = block * RWKVX_LOWRANK_BLOCK
    cdef Py_ssize_t width = min(<Py_ssize_t>RWKVX_LOWRANK_BLOCK, job.n_out - i0)
    rwkvx_lowrank_block(level, job.n_in, width, job.x + t * job.ldx,
                        job.x + (t + 1) * job.ldx if t + 1 < n_tok else NULL,
                        job.wt + i0, job.n_out, job.out + t * job.ldo + i0,
                        job.out + (t + 1) * job.ldo + i0 if t + 1 < n_tok else NULL)


cdef void _lowrank_jobs(const LowrankJob* jobs, int n_jobs, Py_ssize_t n_tok, int n_threads) noexcept nogil:
    # items (job, block of RWKVX_LOWRANK_BLOCK outputs, pair of tokens), in that order, so a
    # thread's run of items reuses one block of the matrix for many tokens; threads split
    # them by work
    cdef Py_ssize_t first[MAX_JOBS + 1]
    cdef double cost[MAX_JOBS + 1]
    cdef Py_ssize_t item, lo, hi
    cdef Py_ssize_t n_pairs = (n_tok + 1) // 2
    cdef int k, job, tid
    cdef int level = rwkvx_simd_level
    first[0] = 0
    cost[0] = 0.0
    for k in range(n_jobs):
        first[k + 1] = first[k] + (jobs[k].n_out + RWKVX_LOWRANK_BLOCK - 1) // RWKVX_LOWRANK_BLOCK * n_pairs
        cost[k + 1] = cost[k] + <double>jobs[k].n_in * jobs[k].n_out * n_tok
    if first[n_jobs] == 0:
        return
    if n_threads > first[n_jobs]:
        n_threads = <int>first[n_jobs]
    for tid in prange(n_threads, schedule="static", num_threads=n_threads):
        lo = _share_start(tid, n_threads, cost, first, n_jobs)
        hi = _share_start(tid + 1, n_threads, cost, first, n_jobs)
        job = 0
        for item in range(lo, hi):
            while item >= first[job + 1]:
                job = job + 1
            _lowrank_item(&jobs[job], item - first[job], n_pairs, n_tok, level)


def lowrank_group(list wts, list Xs, list outs, int n_threads=1):
    """outs[i] = Xs[i] @ wts[i] for up to 8 products in one parallel loop: small float32
    matrices stored transposed, wts[i] (n_in, n_out) C-contiguous (see _lowrank.h); Xs[i]
    (n_tok, n_in), outs[i] (n_tok, n_out), the same n_tok for all. A row's result does not
    depend on the other rows, the number of threads or the SIMD level."""
    cdef int n = len(wts), i
    if not 1 <= n <= MAX_JOBS or len(Xs) != n or len(outs) != n:
        raise RwkvxError(f"lowrank_group: expected 1 to {MAX_JOBS} products with as many inputs and outputs, "
                         f"got {n}, {len(Xs)}, {len(outs)}")
    n_threads = kernel_threads(n_threads)
    cdef LowrankJob jobs[MAX_JOBS]
    cdef const float[:, ::1] wv, xv
    cdef float[:, ::1] ov
    cdef Py_ssize_t n_tok = -1
    keep = []
    for i in range(n):
        wv, xv, ov = wts[i], Xs[i], outs[i]
        if n_tok < 0:
            n_tok = xv.shape[0]
        if xv.shape[0] != n_tok or xv.shape[1] != wv.shape[0] or ov.shape[0] != n_tok or ov.shape[1] != wv.shape[1] \
                or wv.shape[0] == 0 or wv.shape[1] == 0:
            raise RwkvxError(f"lowrank_group: product {i}: W^T ({wv.shape[0]}, {wv.shape[1]}), X ({xv.shape[0]}, "
                             f"{xv.shape[1]}), out ({ov.shape[0]}, {ov.shape[1]}); all products take {n_tok} rows")
        if n_tok == 0:
            return
        jobs[i] = LowrankJob(&ov[0, 0], ov.shape[1], &wv[0, 0], wv.shape[0], wv.shape[1], &xv[0, 0], xv.shape[1])
        keep.append((wv, xv, ov))
    with nogil:
        _lowrank_jobs(jobs, n, n_tok, n_threads)


cdef Linear _new_linear(int kind, Py_ssize_t n_rows, Py_ssize_t n_cols, tuple arrays):
    if n_rows == 0 or n_cols == 0:
        raise RwkvxError(f"Linear: expected a non-empty matrix, got ({n_rows}, {n_cols})")
    cdef Linear self = Linear.__new__(Linear)
    self.m.kind = kind
    self.m.n_rows = n_rows
    self.m.n_cols = n_cols
    self.arrays = arrays
    return self


cdef inline const void* _stored_rows(const Matrix* m, Py_ssize_t i) noexcept nogil:
    # where row i of a bf16, f16 or uint8 matrix is stored
    if m.kind == MATRIX_U8:
        return m.q + i * m.n_cols
    return m.h16 + i * m.n_cols


cdef inline rwkvx_widen_job _widen_job(const Matrix* m, Py_ssize_t i, float* out) noexcept nogil:
    # rows i .. i+3 of a bf16, f16 or uint8 matrix, to be widened to float32 (exact) in
    # out, one after another: they are contiguous, so one job covers them all
    cdef rwkvx_widen_job job
    job.dst = out
    job.count = 4 * m.n_cols
    job.src = _stored_rows(m, i)
    if m.kind == MATRIX_U8:
        job.kind = RWKVX_WIDEN_U8
    else:
        job.kind = RWKVX_WIDEN_BF16 if m.kind == MATRIX_BF16 else RWKVX_WIDEN_F16
    return job


cdef inline void _gemm_rows(float* out, Py_ssize_t ldo, const Matrix* m, const float* X,
                            const float* xpack, Py_ssize_t n_tok, const U8Sums* sums,
                            float* wbuf, Py_ssize_t* ahead, Py_ssize_t block, Py_ssize_t key,
                            bint few) noexcept nogil:
    # out[:, 4*block .. 4*block+3] for every token; the same kernels as _rows, so each
    # token's result equals the matrix-vector product's. wbuf: this thread's two buffers of
    # four widened rows (8 n_cols floats), the block with key k's in buffer k % 2; ahead:
    # this thread's key of the block whose rows were widened ahead (keys number a parallel
    # loop's blocks, so that a thread's next block has the next key).
    cdef Py_ssize_t i = 4 * block, r, t, n = m.n_cols
    cdef Py_ssize_t end = i + 4
    cdef const float* w
    cdef float* widened
    cdef rwkvx_widen_job job
    cdef rwkvx_widen_job* next_job = NULL
    cdef rwkvx_u8_affine u8
    cdef rwkvx_u8_affine* finish = NULL
    cdef rwkvx_q4 q4
    if m.bf16:
        # xpack: the tokens' inputs rounded to bfloat16 (_matmul_jobs, _packed_from)
        rwkvx_bd_block(m.h16 + i * n, n, min(end, m.n_rows) - i, <const uint16_t*>xpack, rwkvx_bd_stride(n),
                       n_tok, out + i, ldo, m.h16 + end * n if end + 4 <= m.n_rows else NULL)
        return
    if _q4_int8(m):
        # xpack: the tokens' prepared inputs (_matmul_jobs, _packed_from)
        q4 = _q4(m)
        rwkvx_q4i8_block(&q4, i, min(end, m.n_rows) - i, <const uint8_t*>xpack, rwkvx_q4i8_stride(n), n_tok,
                         out + i, ldo, end + 8 <= m.n_rows)
        return
    if m.int8:
        # xpack: the tokens' int8 inputs (_prepare, _packed_from)
        rwkvx_i8_block(m.q + i * n, n, min(end, m.n_rows) - i, <const signed char*>xpack,
                       rwkvx_i8_stride(n), n_tok, m.ry + i, m.my + i, <const rwkvx_u8_sums*>sums, out + i, ldo,
                       m.q + end * n if end + 4 <= m.n_rows else NULL)
        return
    if m.kind == MATRIX_U8:
        u8.ry = m.ry + i
        u8.my = m.my + i
        u8.sums = <const rwkvx_u8_sums*>sums
        finish = &u8
    if end <= m.n_rows and few:
        t = 0
        while t < n_tok:
            _dot4x(m, i, X + t * n, <int>min(RWKVX_FEW_TOKENS, n_tok - t), out + t * ldo + i, ldo)
            t += RWKVX_FEW_TOKENS
        if finish != NULL:
            for t in range(n_tok):
                rwkvx_u8_finish(out + t * ldo + i, u8.ry, u8.my, u8.sums + t, 4)
        return
    if end <= m.n_rows and m.kind == MATRIX_Q4:
        # a few tokens: widened in the tile, a group at a time; else dequantised into
        # this thread's buffer (exactly the values the matrix-vector product computes
        # with), then the float32 product
        q4 = _q4(m)
        if rwkvx_gemm4_q4(&q4, i, X, xpack, n_tok, out + i, ldo, end + 4 <= m.n_rows):
            return
        widened = wbuf + (key % 2) * 4 * n
        rwkvx_widen_q4(&q4, i, 4, widened)
        rwkvx_gemm4_f32(widened, n, X, n, xpack, n_tok, n, out + i, ldo, NULL, NULL)
    elif end <= m.n_rows:
        if m.kind != MATRIX_F32:
            # a few tokens (batched decoding): widened in the tile, in small spans
            job = _widen_job(m, i, NULL)
            if rwkvx_gemm4_stored(job.kind, job.src, _stored_rows(m, end) if end + 4 <= m.n_rows else NULL,
                                  X, xpack, n_tok, n, out + i, ldo, finish):
                return
        if m.kind == MATRIX_F32:
            w = m.f32 + i * n
        else:
            # widened once, used for every token; the next block is widened while this
            # one is multiplied (a thread's blocks come in order)
            widened = wbuf + (key % 2) * 4 * n
            if ahead[0] != key:
                job = _widen_job(m, i, widened)
                rwkvx_widen_rest(&job, 0)
            w = widened
            if end + 4 <= m.n_rows:
                job = _widen_job(m, end, wbuf + ((key + 1) % 2) * 4 * n)
                next_job = &job
                ahead[0] = key + 1
        rwkvx_gemm4_f32(w, n, X, n, xpack, n_tok, n, out + i, ldo, next_job, finish)
    else:
        end = m.n_rows
        for t in range(n_tok):
            for r in range(i, end):
                out[t * ldo + r] = _dot1(m, r, X + t * n)
            if finish != NULL:
                rwkvx_u8_finish(out + t * ldo + i, u8.ry, u8.my, u8.sums + t, end - i)


cdef void _matmul(float* out, Py_ssize_t ldo, const Matrix* m, const float* X, Py_ssize_t n_tok,
                  float* xr, U8Sums* sums, float* xpack, float* wbuf, int n_threads) noexcept nogil:
    cdef MatmulJob job = MatmulJob(out, ldo, m, X, xr, sums, xpack)
    _matmul_jobs(&job, 1, n_tok, wbuf, n_threads)


cdef void _matmul_jobs(MatmulJob* jobs, int n_jobs, Py_ssize_t n_tok, float* wbuf,
                       int n_threads) noexcept nogil:
    # As _matvec_jobs: one parallel loop prepares every job's inputs, and the blocks of
    # all jobs form one index space, so threads meet at two barriers, not two per job.
    cdef Py_ssize_t t, jp, block, local, t0, n_sub, n, wide = 0
    cdef Py_ssize_t n_pairs = (n_tok + 1) // 2
    cdef const float* xin[4]
    cdef Py_ssize_t first[5]
    cdef int k, j
    cdef const Matrix* m
    cdef Matrix plain[4]
    cdef MatmulJob one_token[4]
    # whether a job's products take the few-token path (_few_tokens): decided for the whole
    # call, so that its inputs are packed for the tiles exactly when the tiles run
    cdef bint few[4]
    if n_tok == 1:
        # one token: the float32 product even with int8 (uint8 weights) or bfloat16
        # arithmetic, bit-identical to the matrix-vector product that decodes a token
        # (memory-bound: they would gain nothing); q4 in int8 arithmetic decodes in int8
        for k in range(n_jobs):
            plain[k] = jobs[k].m[0]
            plain[k].int8 = plain[k].int8 and plain[k].kind == MATRIX_Q4   # as q4 decodes
            plain[k].bf16 = False
            one_token[k] = jobs[k]
            one_token[k].m = &plain[k]
        jobs = one_token
    first[0] = 0
    for k in range(n_jobs):
        few[k] = n_tok <= _few_tokens(jobs[k].m)
        xin[k] = jobs[k].x
        if jobs[k].m.kind == MATRIX_U8:
            xin[k] = jobs[k].xr
        first[k + 1] = first[k] + (jobs[k].m.n_rows + 3) // 4
        wide = max(wide, jobs[k].m.n_cols)
    for jp in prange(n_jobs * n_pairs, schedule="static", num_threads=n_threads):
        j = jp // n_pairs
        m = jobs[j].m
        if m.kind == MATRIX_U8:
            for t in range(2 * (jp % n_pairs), min(2 * (jp % n_pairs) + 2, n_tok)):
                _prepare(m, jobs[j].x + t * m.n_cols, jobs[j].xr + t * m.n_cols,
                            <signed char*>jobs[j].xpack + t * rwkvx_i8_stride(m.n_cols), &jobs[j].sums[t])
        if _q4_int8(m):
            for t in range(2 * (jp % n_pairs), min(2 * (jp % n_pairs) + 2, n_tok)):
                rwkvx_q4i8_prepare(xin[j] + t * m.n_cols, m.n_cols,
                                   <uint8_t*>jobs[j].xpack + t * rwkvx_q4i8_stride(m.n_cols))
        if m.bf16:
            for t in range(2 * (jp % n_pairs), min(2 * (jp % n_pairs) + 2, n_tok)):
                rwkvx_bd_round(xin[j] + t * m.n_cols, m.n_cols,
                               <uint16_t*>jobs[j].xpack + t * rwkvx_bd_stride(m.n_cols))
        elif rwkvx_simd_level >= 2 and not m.int8 and not few[j]:
            rwkvx_pack_pair(xin[j], m.n_cols, n_tok, jp % n_pairs, m.n_cols, jobs[j].xpack)
    # tokens per pass over the rows: every block of rows reads all of a pass's inputs, so
    # they must stay in L2; passes are independent, results do not change. Measured on
    # the 430M shape, 256-token float32 prompts, scratch on 4 KiB pages: 512 KB of inputs
    # per pass 280-296 tokens/s; 1 MB 240-300 (how many pages meet in one L2 set is
    # chance); 256 KB 270-280. On huge pages (SeqWorkspace) 512 KB and 1 MB are even:
    # medians of four runs 293 and 299.
    cdef Py_ssize_t per_pass = max(8, (1 << 17) // wide // 2 * 2)
    # per thread: two buffers of four widened rows, then the key of the block widened ahead
    cdef Py_ssize_t per_thread = wbuf_floats(wide)
    t0 = 0
    while t0 < n_tok:
        n_sub = min(per_pass, n_tok - t0)
        for t in range(n_threads):
            (<Py_ssize_t*>(wbuf + t * per_thread + 8 * wide))[0] = -1    # nothing widened ahead
        for block in prange(first[n_jobs], schedule="static", num_threads=n_threads):
            j = 0
            while block >= first[j + 1]:
                j = j + 1
            local = block - first[j]
            n = jobs[j].m.n_cols
            _gemm_rows(jobs[j].out + t0 * jobs[j].ldo, jobs[j].ldo, jobs[j].m, xin[j] + t0 * n,
                       _packed_from(&jobs[j], t0), n_sub, jobs[j].sums + t0,
                       wbuf + per_thread * threadid(),
                       <Py_ssize_t*>(wbuf + per_thread * threadid() + 8 * wide), local, block, few[j])
        t0 += n_sub


cdef inline const float* _packed_from(const MatmulJob* job, Py_ssize_t t0) noexcept nogil:
    # a job's packed inputs from token t0 (even) on: pairs of tokens for the float products,
    # one token's int8 input per rwkvx_i8_stride bytes with int8 arithmetic, or one token's
    # bfloat16 input per rwkvx_bd_stride values with bfloat16 arithmetic
    if job.m.bf16:
        return <const float*>(<const uint16_t*>job.xpack + t0 * rwkvx_bd_stride(job.m.n_cols))
    if _q4_int8(job.m):
        return <const float*>(<const uint8_t*>job.xpack + t0 * rwkvx_q4i8_stride(job.m.n_cols))
    if job.m.int8:
        return <const float*>(<const signed char*>job.xpack + t0 * rwkvx_i8_stride(job.m.n_cols))
    return job.xpack + t0 // 2 * rwkvx_pack_stride(job.m.n_cols)


cpdef Py_ssize_t wbuf_floats(Py_ssize_t n_cols) noexcept nogil:
    """Size of _matmul's widened-rows scratch per thread (see _gemm_rows); a multiple of
    16 floats, so each thread's part keeps the buffer's alignment."""
    return 8 * n_cols + 16


cpdef Py_ssize_t xpack_floats(Py_ssize_t n_tok, Py_ssize_t n_cols):
    """Size of _matmul's packed-input scratch for n_tok rows of n_cols (at least 1): pairs of
    rows for the float products, int8 rows for int8 arithmetic or bfloat16 rows for bfloat16
    arithmetic, whichever is largest."""
    return max((n_tok + 1) // 2 * rwkvx_pack_stride(n_cols), (n_tok * rwkvx_i8_stride(n_cols) + 3) // 4,
               (n_tok * rwkvx_bd_stride(n_cols) + 1) // 2, (n_tok * rwkvx_q4i8_stride(n_cols) + 3) // 4)


def _aligned_floats(Py_ssize_t n):
    # n float32 starting on a cache line: the products store whole 64-byte vectors to
    # their scratch, and one that splits two lines costs two
    raw = np.empty(n + 16, dtype=np.float32)
    start = (-raw.ctypes.data % 64) // 4
    return raw[start:start + n]


_local = threading.local()
# the slots of _scratch: three per product of a group (rows, packed rows, sums), then wbuf,
# then the rows of a fused layer step (rwkvx.kernels._step)
WBUF_SLOT = 12
STEP_SLOT = 13
# the largest buffer a thread keeps (floats): a 128-token chunk of a 16384-wide product; a
# thread keeps at most 14 such (112 MB), typically a few MB
SCRATCH_KEPT = 128 * 16384


def _scratch(int slot, Py_ssize_t n):
    """n aligned floats of this thread's scratch buffer `slot` for one product call, kept
    between calls (grown up to SCRATCH_KEPT, never shrunk; calls in one thread never nest).
    Allocating and freeing megabytes per product makes glibc give the heap's top back to
    the OS and fault its pages in again: a fifth of an RWKV-5/6 prompt's time (0.4B shape,
    2 threads)."""
    if n > SCRATCH_KEPT:
        return _aligned_floats(n)
    cache = getattr(_local, "buffers", None)
    if cache is None:
        cache = _local.buffers = {}
    buf = cache.get(slot)
    if buf is None or buf.shape[0] < n:
        buf = cache[slot] = _aligned_floats(n)
    return buf[:n]


def _product_scratch(int i, Py_ssize_t n_tok, Py_ssize_t n_cols):
    """Product i's scratch for one call (_scratch slots 3 i .. 3 i + 2): its rows as the
    kernel reads them (n_tok, n_cols), its packed inputs, its uint8 sums (as bytes)."""
    return (_scratch(3 * i, n_tok * n_cols).reshape(n_tok, n_cols), _scratch(3 * i + 1, xpack_floats(n_tok, n_cols)),
            _scratch(3 * i + 2, (n_tok * sizeof(U8Sums) + 3) // 4).view(np.uint8))


def _check_vector(name, const float[::1] v, Py_ssize_t n):
    if v.shape[0] != n:
        raise RwkvxError(f"{name}: expected ({n},) float32, got ({v.shape[0]},)")


def _check_vector_u16(name, const uint16_t[::1] v, Py_ssize_t n):
    if v.shape[0] != n:
        raise RwkvxError(f"{name}: expected ({n},) float16, got ({v.shape[0]},)")


cdef class Linear:
    """A weight matrix ready for the kernels: float32, bfloat16, float16, uint8 with its
    min/scale vectors, or q4 with its group scales. Build one with Linear.f32/bf16/f16/u8/q4.

    Holds references to the arrays it points into, which may be read-only (memory-mapped).
    """

    @staticmethod
    def f32(W) -> Linear:
        """W: (n_rows, n_cols) float32, C-contiguous, non-empty."""
        cdef const float[:, ::1] w = W
        cdef Linear self = _new_linear(MATRIX_F32, w.shape[0], w.shape[1], (W,))
        self.m.f32 = &w[0, 0]
        return self

    @staticmethod
    def bf16(W) -> Linear:
        """W: (n_rows, n_cols) uint16 holding bfloat16 bit patterns, C-contiguous, non-empty."""
        cdef const uint16_t[:, ::1] w = W
        cdef Linear self = _new_linear(MATRIX_BF16, w.shape[0], w.shape[1], (W,))
        self.m.h16 = &w[0, 0]
        return self

    @staticmethod
    def f16(W) -> Linear:
        """W: (n_rows, n_cols) float16, C-contiguous, non-empty."""
        cdef const uint16_t[:, ::1] w = W.view(np.uint16)
        cdef Linear self = _new_linear(MATRIX_F16, w.shape[0], w.shape[1], (W,))
        self.m.h16 = &w[0, 0]
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
        cdef Linear self = _new_linear(MATRIX_U8, n_rows, n_cols, (q, mx, rx, my, ry))
        self.m.q = &qv[0, 0]
        self.m.mx = &mxv[0]
        self.m.rx = &rxv[0]
        self.m.my = &myv[0]
        self.m.ry = &ryv[0]
        return self

    @staticmethod
    def q4(q4, sd, sm, D, M, Py_ssize_t n_cols) -> Linear:
        """q4: (n_rows, 32 n_groups) uint8 packed nibbles, n_groups = ceil(n_cols / 64);
        sd: (n_rows, n_groups) uint8; sm: (n_rows, n_groups) int8; D, M: (n_rows,) float16
        (see Q4Matrix in quant.py)."""
        cdef const uint8_t[:, ::1] qv = q4
        cdef const uint8_t[:, ::1] sdv = sd
        cdef const signed char[:, ::1] smv = sm
        cdef const uint16_t[::1] Dv = D.view(np.uint16) if D.dtype == np.float16 else D
        cdef const uint16_t[::1] Mv = M.view(np.uint16) if M.dtype == np.float16 else M
        n_rows = qv.shape[0]
        n_groups = (n_cols + 63) // 64
        if n_cols < 1 or qv.shape[1] != 32 * n_groups:
            raise RwkvxError(f"Linear.q4: q4 ({n_rows}, {qv.shape[1]}) does not hold {n_cols} columns "
                             f"(expected ({n_rows}, {32 * n_groups}))")
        for name, v in (("sd", sdv), ("sm", smv)):
            if v.shape[0] != n_rows or v.shape[1] != n_groups:
                raise RwkvxError(f"Linear.q4: {name}: expected ({n_rows}, {n_groups}), got ({v.shape[0]}, {v.shape[1]})")
        _check_vector_u16("D", Dv, n_rows)
        _check_vector_u16("M", Mv, n_rows)
        cdef Linear self = _new_linear(MATRIX_Q4, n_rows, n_cols, (q4, sd, sm, D, M))
        self.m.q = &qv[0, 0]
        self.m.sd = &sdv[0, 0]
        self.m.sm = &smv[0, 0]
        self.m.q4_D = &Dv[0]
        self.m.q4_M = &Mv[0]
        self.m.n_groups = n_groups
        return self

    def with_arithmetic(self, str arithmetic) -> Linear:
        """This matrix (the same arrays) computing in `arithmetic`: "float32"; "int8" for
        uint8 matrices: their products of two or more vectors (matmul) then round each
        vector to int8 with its own scale and sum exactly in integers (AVX-512 VNNI where the
        CPU has it; the same bits at every SIMD level, thread count and batch composition,
        see _int8.h and _prepare), while one vector (__call__, or matmul of one row) keeps
        the float32 product, which is memory-bound; "int8" for q4 matrices: every product,
        of one vector too, rounds each vector to int8 and sums the 4-bit codes times it
        exactly per group (_q4int8.h); or "bfloat16" for bfloat16 matrices: their products
        of two or more vectors round each vector to bfloat16 and sum by vdpbf16ps's rules
        (AVX512-BF16 where the CPU has it; the same bits everywhere, see _bf16dot.h), one
        vector keeping the float32 product."""
        if arithmetic not in ARITHMETICS:
            raise RwkvxError(f"arithmetic: expected one of {', '.join(ARITHMETICS)}, got {arithmetic!r}")
        if arithmetic == "int8" and self.m.kind not in (MATRIX_U8, MATRIX_Q4):
            raise RwkvxError(f"arithmetic int8: needs uint8 or q4 weights, got {self.dtype}")
        if arithmetic == "bfloat16" and self.m.kind != MATRIX_BF16:
            raise RwkvxError(f"arithmetic bfloat16: needs bfloat16 weights, got {self.dtype}")
        cdef Linear other = Linear.__new__(Linear)
        other.m = self.m
        other.m.int8 = arithmetic == "int8"
        other.m.bf16 = arithmetic == "bfloat16"
        other.arrays = self.arrays
        return other

    @property
    def arithmetic(self) -> str:
        """"float32", "int8" or "bfloat16" (see with_arithmetic)."""
        return "int8" if self.m.int8 else "bfloat16" if self.m.bf16 else "float32"

    @property
    def shape(self):
        return (self.m.n_rows, self.m.n_cols)

    @property
    def dtype(self) -> str:
        return DTYPES[self.m.kind]

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
        n_threads = kernel_threads(n_threads)
        cdef float* scratch = <float*>malloc(self.m.n_cols * sizeof(float))
        if scratch == NULL:
            raise MemoryError()
        try:
            with nogil:
                _matvec(&outv[0], &self.m, &xv[0], scratch, n_threads)
        finally:
            free(scratch)
        return out

    def matmul(self, X, out=None, *, int n_threads=1):
        """Return X @ W.T as float32 (n_tok, n_rows): row t equals self(X[t]) bit for bit.

        X: (n_tok, n_cols) float32 C-contiguous; out: optional (n_tok, n_rows).
        """
        cdef const float[:, ::1] xv = X
        cdef Py_ssize_t n_tok = xv.shape[0], n_cols = self.m.n_cols
        if out is None:
            out = np.empty((n_tok, self.m.n_rows), dtype=np.float32)
        cdef float[:, ::1] outv = out
        if xv.shape[1] != n_cols or outv.shape[0] != n_tok or outv.shape[1] != self.m.n_rows:
            raise RwkvxError(f"matmul: W {self.shape}, X ({n_tok}, {xv.shape[1]}), "
                             f"out ({outv.shape[0]}, {outv.shape[1]})")
        n_threads = kernel_threads(n_threads)
        if n_tok == 0:
            return out
        xr, xpack, sums = _product_scratch(0, n_tok, n_cols)
        wbuf = _scratch(WBUF_SLOT, n_threads * wbuf_floats(n_cols))
        cdef float[:, ::1] xrv = xr
        cdef unsigned char[::1] sumsv = sums
        cdef float[::1] wbufv = wbuf, xpackv = xpack
        with nogil:
            _matmul(&outv[0, 0], self.m.n_rows, &self.m, &xv[0, 0], n_tok, &xrv[0, 0],
                    <U8Sums*>&sumsv[0], &xpackv[0], &wbufv[0], n_threads)
        return out
