from libc.stdint cimport uint8_t, uint16_t

cdef enum MatrixKind:
    MATRIX_F32 = 0
    MATRIX_U8 = 1
    MATRIX_BF16 = 2
    MATRIX_F16 = 3
    MATRIX_Q4 = 4

# A weight matrix as the kernels see it: (n_rows, n_cols) row-major, the checkpoint's
# (out, in) orientation. For MATRIX_U8, W[i, j] ~ (q[i, j] + 0.5) * ry[i] * rx[j] + my[i] + mx[j];
# for MATRIX_Q4 see Q4Matrix in quant.py (q holds the packed nibbles).
cdef struct Matrix:
    int kind
    Py_ssize_t n_rows
    Py_ssize_t n_cols
    const float* f32      # (n_rows, n_cols), MATRIX_F32
    const uint16_t* h16   # (n_rows, n_cols), MATRIX_BF16 (bfloat16 bits) or MATRIX_F16
    const uint8_t* q      # (n_rows, n_cols), MATRIX_U8; (n_rows, 32 n_groups), MATRIX_Q4
    const float* mx       # (n_cols,)
    const float* rx       # (n_cols,)
    const float* my       # (n_rows,)
    const float* ry       # (n_rows,)
    const uint8_t* sd     # (n_rows, n_groups), MATRIX_Q4: group scales
    const signed char* sm # (n_rows, n_groups), MATRIX_Q4: group minima
    const uint16_t* q4_D  # (n_rows,) float16 bits, MATRIX_Q4: row scale of sd
    const uint16_t* q4_M  # (n_rows,) float16 bits, MATRIX_Q4: row scale of sm
    Py_ssize_t n_groups   # MATRIX_Q4
    bint int8             # int8 arithmetic: MATRIX_U8 in products of 2+ tokens (_int8.h), MATRIX_Q4 in all (_q4int8.h)
    bint bf16             # MATRIX_BF16: bfloat16 arithmetic (_bf16dot.h) in products of 2+ tokens

# Per-vector sums of the uint8 product (see _prepare_u8); the layout of rwkvx_u8_sums in
# _simd.h, which the kernels are given
cdef struct U8Sums:
    float half_xr
    float x
    float mx
    float scale     # int8 arithmetic only (see _prepare_i8)

# the most products _matvec_jobs fuses
cdef enum:
    MAX_JOBS = 8

# One matrix-vector product of a fused group: out (n_rows,) = m @ x (n_cols,)
cdef struct MatvecJob:
    float* out
    const Matrix* m
    const float* x

# out (n_rows,) = m @ x (n_cols,); scratch: n_cols floats (used by MATRIX_U8)
cdef void _matvec(float* out, const Matrix* m, const float* x, float* scratch,
                  int n_threads) noexcept nogil

# Up to MAX_JOBS independent products in one parallel loop (one barrier instead of several);
# scratch: the jobs' n_cols summed. Each result is bit-identical to _matvec's.
cdef void _matvec_jobs(MatvecJob* jobs, int n_jobs, float* scratch, int n_threads) noexcept nogil

# out[t, i] (row stride ldo) = sum_j m[i, j] X[t, j] for n_tok rows of X (n_tok, n_cols).
# Scratch: xr n_tok * n_cols floats and sums n_tok (MATRIX_U8); xpack xpack_floats(n_tok,
# n_cols); wbuf n_threads * wbuf_floats(n_cols). Scratch should start on a cache line (64 bytes)
# for speed: the products store whole vectors to it. Each out[t] is
# bit-identical to _matvec of X[t]; with int8 or bfloat16 arithmetic and n_tok >= 2, to out[t] of any
# other _matmul of 2+ rows that holds X[t].
cdef void _matmul(float* out, Py_ssize_t ldo, const Matrix* m, const float* X, Py_ssize_t n_tok,
                  float* xr, U8Sums* sums, float* xpack, float* wbuf, int n_threads) noexcept nogil

# One product of a fused group of matrix-matrix products: out[t, i] (row stride ldo) =
# sum_j m[i, j] x[t, j], with that product's own scratch (as _matmul's).
cdef struct MatmulJob:
    float* out
    Py_ssize_t ldo
    const Matrix* m
    const float* x
    float* xr
    U8Sums* sums
    float* xpack

# Up to 4 independent matrix-matrix products over the same n_tok tokens, in one parallel
# loop per step; wbuf: n_threads * wbuf_floats(the widest n_cols). Each result is
# bit-identical to _matmul's.
cdef void _matmul_jobs(MatmulJob* jobs, int n_jobs, Py_ssize_t n_tok, float* wbuf,
                       int n_threads) noexcept nogil

cpdef Py_ssize_t xpack_floats(Py_ssize_t n_tok, Py_ssize_t n_cols)
cpdef Py_ssize_t wbuf_floats(Py_ssize_t n_cols) noexcept nogil

cdef class Linear:
    cdef Matrix m
    # the numpy arrays behind m's pointers, kept alive as long as this object
    cdef readonly tuple arrays

# One product with a small float32 matrix stored transposed (_lowrank.h): out[t, i] (row
# stride ldo) = sum_j x[t, j] (row stride ldx) wt[j, i], wt (n_in, n_out) row-major
cdef struct LowrankJob:
    float* out
    Py_ssize_t ldo
    const float* wt
    Py_ssize_t n_in
    Py_ssize_t n_out
    const float* x
    Py_ssize_t ldx

# Up to MAX_JOBS such products over the same n_tok tokens in one parallel loop; any number of
# tokens, threads and any SIMD level give the same bits for a token
cdef void _lowrank_jobs(const LowrankJob* jobs, int n_jobs, Py_ssize_t n_tok, int n_threads) noexcept nogil

# _matvec_jobs with n_low low-rank products of one token (LowrankJobs of one row) in the same
# parallel loop: one barrier for both; each result is bit-identical to _matvec's or _lowrank_jobs's.
# n_jobs and n_low at most MAX_JOBS each
cdef void _matvec_lowrank_jobs(MatvecJob* jobs, int n_jobs, const LowrankJob* low, int n_low, float* scratch,
                               int n_threads) noexcept nogil
