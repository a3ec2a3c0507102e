"""The RWKV-4 layer math: layer norm, time mixing (WKV), channel mixing.

One call of Block.forward moves one token through one layer and updates that layer's
state in place. Its elementwise work over n_embd stays serial (starting threads would
cost more than it); the matrix-vector products inside run in parallel over output rows.
Block.forward_rows does the same for many tokens at once, where layer norm and the WKV
recurrence (over channels) are worth running in parallel too.

State rows per layer, as in ChatRWKV's state[5*i+k]: FFN_XX, ATT_XX, ATT_AA, ATT_BB, ATT_PP.
"""
from cython.parallel import prange
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy

import numpy as np

from rwkvx.kernels._parallel cimport kernel_threads  # fewer threads while other programs contend for the cores
from rwkvx.kernels._matvec cimport (Linear, Matrix, MatmulJob, MatvecJob, U8Sums, _matmul_jobs, _matvec,
                            _matvec_jobs, wbuf_floats, xpack_floats)
from rwkvx.errors import RwkvxError

cdef enum:
    FFN_XX = 0
    ATT_XX = 1
    ATT_AA = 2
    ATT_BB = 3
    ATT_PP = 4

# floats per task of copy_rows (64 KiB), so that a few rows still keep every thread busy
cdef Py_ssize_t COPY_PART = 16384

# torch.nn.functional.layer_norm's default, which the models were trained with
cdef double LAYER_NORM_EPS = 1e-5

# a Block's weights by name: the vectors, and the matrices as Linear objects
from rwkvx.weights import MATRIX_NAMES as LINEAR_NAMES, VECTOR_NAMES


cdef extern from "_elementwise.h" nogil:
    void rwkvx_wkv(Py_ssize_t n, const float* k, const float* v, const float* r, const float* first,
                   const float* decay, float* aa, float* bb, float* pp, float* out)
    void rwkvx_add_gated(Py_ssize_t n, float* x, const float* r, const float* y)
    void rwkvx_relu_square(float* x, Py_ssize_t n)
    void rwkvx_prefetch_span(const float* x, Py_ssize_t n)
    void rwkvx_token_shift(Py_ssize_t n, const float* xx, const float* sx, const float* mix, float* out)
    void rwkvx_layer_norm(Py_ssize_t n, const float* x, const float* w, const float* b, double eps,
                          float* out)
    float rwkvx_expf(float x)


cdef inline void _layer_norm(float* out, const float* x, const float* w, const float* b,
                             Py_ssize_t n) noexcept nogil:
    rwkvx_layer_norm(n, x, w, b, LAYER_NORM_EPS, out)


cdef inline void _add_and_norm(float* out, float* x, const float* add, const float* w, const float* b,
                               Py_ssize_t n) noexcept nogil:
    # x += add (unless NULL); out = layer_norm(x)
    cdef Py_ssize_t j
    if add != NULL:
        for j in range(n):
            x[j] += add[j]
    _layer_norm(out, x, w, b, n)


cdef inline void _token_shift(float* out, const float* xx, const float* sx, const float* mix,
                              Py_ssize_t n) noexcept nogil:
    rwkvx_token_shift(n, xx, sx, mix, out)


cdef inline void _shift_row(Py_ssize_t t, Py_ssize_t n, const float* xx, const float* states,
                            Py_ssize_t ss, Py_ssize_t xx_row, const Py_ssize_t* starts, Py_ssize_t n_seq,
                            float* out1, const float* mix1, float* out2, const float* mix2,
                            float* out3, const float* mix3) noexcept nogil:
    # token shift of row t: its previous token is row t-1, or for the first row of sequence
    # b, that sequence's state row
    cdef Py_ssize_t b = 0
    while starts[b + 1] <= t:
        b += 1
    cdef const float* prev = states + b * ss + xx_row * n if t == starts[b] else xx + (t - 1) * n
    _token_shift(out1 + t * n, xx + t * n, prev, mix1, n)
    _token_shift(out2 + t * n, xx + t * n, prev, mix2, n)
    if out3 != NULL:
        _token_shift(out3 + t * n, xx + t * n, prev, mix3, n)


cdef inline void _wkv_rows(const float* k, const float* v, const float* r, float* rwkv, const float* first,
                           const float* decay, float* states, Py_ssize_t ss, const Py_ssize_t* starts,
                           Py_ssize_t n_seq, Py_ssize_t n, Py_ssize_t j0, Py_ssize_t j1) noexcept nogil:
    # rwkv[t, j] = sigmoid(r[t, j]) * wkv for channels j0..j1-1 of every row, in token order
    cdef Py_ssize_t b, t, o, row
    cdef float* s
    for b in range(n_seq):
        s = states + b * ss + j0
        if b + 1 < n_seq:
            # the next sequence's state and first row while this one's are computed:
            # measured on 8-sequence uint8 batches (430M), the recurrence's share of a step
            # went from 1.16-1.27 to 0.77-0.82 ms
            o = starts[b + 1] * n + j0
            for row in range(ATT_AA, ATT_PP + 1):
                rwkvx_prefetch_span(s + ss + row * n, j1 - j0)
            rwkvx_prefetch_span(k + o, j1 - j0)
            rwkvx_prefetch_span(v + o, j1 - j0)
            rwkvx_prefetch_span(r + o, j1 - j0)
        for t in range(starts[b], starts[b + 1]):
            o = t * n + j0
            rwkvx_wkv(j1 - j0, k + o, v + o, r + o, first + j0, decay + j0, s + ATT_AA * n,
                      s + ATT_BB * n, s + ATT_PP * n, rwkv + o)


cdef class Workspace:
    """Scratch buffers for Block.forward, allocated once per model (not thread-safe)."""
    cdef float* xx          # (n_embd,) normalised input
    cdef float* xk          # (n_embd,) token-shifted inputs
    cdef float* xv
    cdef float* xr
    cdef float* k           # (n_embd,) projections
    cdef float* v
    cdef float* r
    cdef float* rwkv        # (n_embd,) sigmoid(r) * wkv
    cdef float* out         # (n_embd,) output projection
    cdef float* kf          # (n_ffn,) channel-mix hidden
    cdef float* scratch     # (3 * max(n_embd, n_ffn),) for uint8 products, up to 3 fused
    cdef float* buffer
    cdef readonly Py_ssize_t n_embd, n_ffn

    def __cinit__(self, Py_ssize_t n_embd, Py_ssize_t n_ffn):
        if n_embd < 1 or n_ffn < 1:
            raise RwkvxError(f"Workspace: expected positive sizes, got n_embd={n_embd}, n_ffn={n_ffn}")
        self.n_embd = n_embd
        self.n_ffn = n_ffn
        cdef Py_ssize_t wide = max(n_embd, n_ffn)
        self.buffer = <float*>malloc((9 * n_embd + n_ffn + 3 * wide) * sizeof(float))
        if self.buffer == NULL:
            raise MemoryError()
        cdef float* p = self.buffer
        self.xx = p; p += n_embd
        self.xk = p; p += n_embd
        self.xv = p; p += n_embd
        self.xr = p; p += n_embd
        self.k = p; p += n_embd
        self.v = p; p += n_embd
        self.r = p; p += n_embd
        self.rwkv = p; p += n_embd
        self.out = p; p += n_embd
        self.kf = p; p += n_ffn
        self.scratch = p

    def __dealloc__(self):
        free(self.buffer)


cdef extern from "_alloc.h" nogil:
    void* rwkvx_alloc_huge(size_t size)
    void rwkvx_free_huge(void* p)


cdef enum:
    STAGGER = 16    # floats: one cache line


cdef inline float* _take(float** p, Py_ssize_t n) noexcept:
    # the next buffer of n floats from p[0]: cache-line aligned (a 64-byte store that
    # splits two lines costs two: measured 8% on 8-token uint8 products, whose widened rows
    # are stored to wbuf), and one line past the end of the previous buffer
    cdef float* start = p[0] + STAGGER
    p[0] = start + (n + STAGGER - 1) // STAGGER * STAGGER
    return start


cdef class SeqWorkspace:
    """Scratch for Block.forward_rows: room for up to n_max rows (tokens) per call."""
    cdef float* xx          # (n_max, n_embd) normalised inputs
    cdef float* xk          # (n_max, n_embd) token-shifted inputs
    cdef float* xv
    cdef float* xr
    cdef float* k           # (n_max, n_embd) projections
    cdef float* v
    cdef float* r
    cdef float* rwkv        # (n_max, n_embd) sigmoid(r) * wkv
    cdef float* out         # (n_max, n_embd) output projection
    cdef float* kf          # (n_max, n_ffn) channel-mix hidden
    # per product of a fused group (up to three, the first as wide as the widest input):
    cdef float* u8_x[3]     # (n_max, n_cols) rx * x for uint8 products
    cdef U8Sums* u8_sums[3] # (n_max,)
    cdef float* xpack[3]    # xpack_floats(n_max, n_cols) inputs packed for AVX-512
    cdef float* wbuf        # n_threads * wbuf_floats(max(n_embd, n_ffn)) widened weight rows
    cdef void* buffer
    cdef readonly Py_ssize_t n_max, n_embd, n_ffn, n_threads

    def __cinit__(self, Py_ssize_t n_max, Py_ssize_t n_embd, Py_ssize_t n_ffn, int n_threads):
        if n_max < 1 or n_embd < 1 or n_ffn < 1 or n_threads < 1:
            raise RwkvxError(f"SeqWorkspace: expected positive sizes, got n_max={n_max}, n_embd={n_embd}, "
                             f"n_ffn={n_ffn}, n_threads={n_threads}")
        self.n_max, self.n_embd, self.n_ffn, self.n_threads = n_max, n_embd, n_ffn, n_threads
        cdef Py_ssize_t wide = max(n_embd, n_ffn)
        cdef Py_ssize_t packed = xpack_floats(n_max, wide)
        # a cache line between buffers, so that row t of each -- rows are often 4 KiB,
        # and a product reads and writes row t of several at once -- falls in a different
        # L1 set. Measured on the 430M shape, 256-token float32 prompt, medians of four
        # interleaved runs: 301 tokens/s with the gaps, 293 without (near the noise).
        cdef Py_ssize_t packed_narrow = xpack_floats(n_max, n_embd)
        cdef Py_ssize_t floats = (n_max * (11 * n_embd + n_ffn + wide) + n_threads * wbuf_floats(wide) + packed
                                  + 2 * packed_narrow + 34 * STAGGER)
        self.buffer = rwkvx_alloc_huge(floats * sizeof(float) + 3 * n_max * sizeof(U8Sums))
        if self.buffer == NULL:
            raise MemoryError()
        cdef float* p = <float*>self.buffer
        self.xx = _take(&p, n_max * n_embd)
        self.xk = _take(&p, n_max * n_embd)
        self.xv = _take(&p, n_max * n_embd)
        self.xr = _take(&p, n_max * n_embd)
        self.k = _take(&p, n_max * n_embd)
        self.v = _take(&p, n_max * n_embd)
        self.r = _take(&p, n_max * n_embd)
        self.rwkv = _take(&p, n_max * n_embd)
        self.out = _take(&p, n_max * n_embd)
        self.kf = _take(&p, n_max * n_ffn)
        self.u8_x[0] = _take(&p, n_max * wide)
        self.u8_x[1] = _take(&p, n_max * n_embd)
        self.u8_x[2] = _take(&p, n_max * n_embd)
        self.wbuf = _take(&p, n_threads * wbuf_floats(wide))
        self.xpack[0] = _take(&p, packed)
        self.xpack[1] = _take(&p, packed_narrow)
        self.xpack[2] = _take(&p, packed_narrow)
        self.u8_sums[0] = <U8Sums*>p
        self.u8_sums[1] = self.u8_sums[0] + n_max
        self.u8_sums[2] = self.u8_sums[1] + n_max

    cdef inline MatmulJob job(self, Py_ssize_t slot, float* out, Py_ssize_t ldo, const Matrix* m,
                              const float* x) noexcept nogil:
        # a product of a fused group, with slot's scratch (slot 0 for inputs wider than n_embd)
        return MatmulJob(out, ldo, m, x, self.u8_x[slot], self.u8_sums[slot], self.xpack[slot])

    def __dealloc__(self):
        rwkvx_free_huge(self.buffer)


cdef class Block:
    """One RWKV-4 layer's weights, as pointers the kernels use without the GIL.

    vectors: the VECTOR_NAMES, each (n_embd,) float32 C-contiguous, att_time_decay already
    transformed to -exp(raw) by the loader. linears: the LINEAR_NAMES as Linear objects,
    (n_embd, n_embd) except ffn_key (n_ffn, n_embd) and ffn_value (n_embd, n_ffn).
    """
    cdef readonly Py_ssize_t n_embd, n_ffn
    cdef readonly dict vectors, linears
    cdef const float* ln1_w
    cdef const float* ln1_b
    cdef const float* ln2_w
    cdef const float* ln2_b
    cdef const float* att_mix_k
    cdef const float* att_mix_v
    cdef const float* att_mix_r
    cdef const float* att_first
    cdef const float* att_decay
    cdef const float* ffn_mix_k
    cdef const float* ffn_mix_r
    cdef Matrix att_key, att_value, att_receptance, att_output
    cdef Matrix ffn_key, ffn_receptance, ffn_value

    def __init__(self, dict vectors, dict linears):
        missing = [n for n in VECTOR_NAMES if n not in vectors] + [n for n in LINEAR_NAMES if n not in linears]
        if missing:
            raise RwkvxError(f"Block: missing {', '.join(missing)}")
        for name in LINEAR_NAMES:
            if not isinstance(linears[name], Linear):
                raise RwkvxError(f"{name}: expected a Linear, got {type(linears[name]).__name__}")
        cdef Linear key = linears["ffn_key"]
        self.n_embd = key.m.n_cols
        self.n_ffn = key.m.n_rows
        shapes = {"ffn_key": (self.n_ffn, self.n_embd), "ffn_value": (self.n_embd, self.n_ffn)}
        cdef Linear lin
        for name in LINEAR_NAMES:
            lin = linears[name]
            expected = shapes.get(name, (self.n_embd, self.n_embd))
            if lin.shape != expected:
                raise RwkvxError(f"{name}: expected {expected}, got {lin.shape}")
        self.vectors = dict(vectors)
        self.linears = dict(linears)
        self.ln1_w = self._vector("ln1_weight")
        self.ln1_b = self._vector("ln1_bias")
        self.ln2_w = self._vector("ln2_weight")
        self.ln2_b = self._vector("ln2_bias")
        self.att_mix_k = self._vector("att_time_mix_k")
        self.att_mix_v = self._vector("att_time_mix_v")
        self.att_mix_r = self._vector("att_time_mix_r")
        self.att_first = self._vector("att_time_first")
        self.att_decay = self._vector("att_time_decay")
        self.ffn_mix_k = self._vector("ffn_time_mix_k")
        self.ffn_mix_r = self._vector("ffn_time_mix_r")
        self.att_key = (<Linear>linears["att_key"]).m
        self.att_value = (<Linear>linears["att_value"]).m
        self.att_receptance = (<Linear>linears["att_receptance"]).m
        self.att_output = (<Linear>linears["att_output"]).m
        self.ffn_key = (<Linear>linears["ffn_key"]).m
        self.ffn_receptance = (<Linear>linears["ffn_receptance"]).m
        self.ffn_value = (<Linear>linears["ffn_value"]).m

    cdef const float* _vector(self, str name) except NULL:
        cdef const float[::1] v = self.vectors[name]
        if v.shape[0] != self.n_embd:
            raise RwkvxError(f"{name}: expected ({self.n_embd},) float32, got ({v.shape[0]},)")
        return &v[0]

    def forward(self, float[::1] x, float[:, ::1] state, Workspace ws not None, int n_threads):
        """Move one token through this layer.

        x: (n_embd,) float32, the residual stream, updated in place.
        state: (5, n_embd) float32, this layer's state, updated in place.
        """
        if x.shape[0] != self.n_embd or state.shape[0] != 5 or state.shape[1] != self.n_embd:
            raise RwkvxError(f"Block.forward: expected x ({self.n_embd},) and state (5, {self.n_embd}), "
                             f"got ({x.shape[0]},) and ({state.shape[0]}, {state.shape[1]})")
        if ws.n_embd != self.n_embd or ws.n_ffn != self.n_ffn:
            raise RwkvxError("Block.forward: workspace sized for another model")
        n_threads = kernel_threads(n_threads)
        with nogil:
            self._time_mixing(&x[0], &state[0, 0], ws, n_threads)
            self._channel_mixing(&x[0], &state[0, 0], ws, n_threads)

    def forward_rows(self, float[:, ::1] X, float[:, :, :] states, const Py_ssize_t[::1] starts,
                     SeqWorkspace ws not None, int n_threads):
        """Move many tokens through this layer at once: one sequence's chunk, or one token
        of each of several sequences, or any mix.

        X: (n_rows, n_embd) float32, the residual streams, updated in place. Rows
        starts[b] .. starts[b+1]-1 are consecutive tokens of sequence b, whose layer state
        is states[b] (5, n_embd), updated in place; its rows must be contiguous, while
        sequences may lie any whole number of floats apart (a layer's slice of a batch of
        whole-model states). Every projection is one matrix-matrix product over all rows;
        only the WKV recurrence steps token by token. Each row's result is bit-identical to
        feeding its tokens one at a time through forward().
        """
        cdef Py_ssize_t n_rows = X.shape[0], n_seq = states.shape[0], b
        # floats from one sequence's state to the next
        cdef Py_ssize_t ss = states.strides[0] // <Py_ssize_t>sizeof(float)
        if X.shape[1] != self.n_embd or states.shape[1] != 5 or states.shape[2] != self.n_embd:
            raise RwkvxError(f"Block.forward_rows: expected X (n, {self.n_embd}) and states (b, 5, {self.n_embd}), "
                             f"got ({X.shape[0]}, {X.shape[1]}) and ({states.shape[0]}, {states.shape[1]}, "
                             f"{states.shape[2]})")
        if (states.strides[2] != sizeof(float) or states.strides[1] != self.n_embd * <Py_ssize_t>sizeof(float)
                or states.strides[0] % sizeof(float)):
            raise RwkvxError("Block.forward_rows: each sequence's state rows must be contiguous")
        if starts.shape[0] != n_seq + 1 or starts[0] != 0 or starts[n_seq] != n_rows:
            raise RwkvxError(f"Block.forward_rows: starts must run from 0 to {n_rows} over {n_seq + 1} entries")
        for b in range(n_seq):
            if starts[b + 1] < starts[b]:
                raise RwkvxError("Block.forward_rows: starts must not decrease")
        if ws.n_embd != self.n_embd or ws.n_ffn != self.n_ffn or n_rows > ws.n_max or n_threads > ws.n_threads:
            raise RwkvxError("Block.forward_rows: workspace too small for this call")
        n_threads = kernel_threads(n_threads)
        if n_rows == 0:
            return
        with nogil:
            self._time_mixing_rows(&X[0, 0], n_rows, &states[0, 0, 0], ss, &starts[0], n_seq, ws, n_threads)
            self._channel_mixing_rows(&X[0, 0], n_rows, &states[0, 0, 0], ss, &starts[0], n_seq, ws, n_threads)

    cdef void _norm_and_shift(self, float* X, Py_ssize_t n_rows, float* states, Py_ssize_t ss,
                              Py_ssize_t xx_row, const Py_ssize_t* starts, Py_ssize_t n_seq,
                              const float* add, const float* ln_w, const float* ln_b, float* xx,
                              float* out1, const float* mix1, float* out2, const float* mix2,
                              float* out3, const float* mix3, int n_threads) noexcept nogil:
        # X += add (unless NULL); xx = layer_norm(X); out_i = xx * mix_i + previous token's
        # xx * (1 - mix_i), where the previous token of a sequence's first row is its state
        # row xx_row; that state row then becomes the sequence's last xx
        cdef Py_ssize_t n = self.n_embd, b, t
        for t in prange(n_rows, schedule="static", num_threads=n_threads):
            _add_and_norm(xx + t * n, X + t * n, add + t * n if add != NULL else NULL, ln_w, ln_b, n)
        for t in prange(n_rows, schedule="static", num_threads=n_threads):
            _shift_row(t, n, xx, states, ss, xx_row, starts, n_seq, out1, mix1, out2, mix2, out3, mix3)
        for b in range(n_seq):
            if starts[b + 1] > starts[b]:
                for t in range(n):
                    states[b * ss + xx_row * n + t] = xx[(starts[b + 1] - 1) * n + t]

    cdef void _time_mixing_rows(self, float* X, Py_ssize_t n_rows, float* states, Py_ssize_t ss,
                                const Py_ssize_t* starts,
                                Py_ssize_t n_seq, SeqWorkspace ws, int n_threads) noexcept nogil:
        # leaves the attention output in ws.out, NOT yet added to X: _channel_mixing_rows,
        # which always follows, adds it in its first loop
        cdef Py_ssize_t n = self.n_embd, block, t
        self._norm_and_shift(X, n_rows, states, ss, ATT_XX, starts, n_seq, NULL, self.ln1_w, self.ln1_b, ws.xx,
                             ws.xk, self.att_mix_k, ws.xv, self.att_mix_v, ws.xr, self.att_mix_r, n_threads)
        # K = XK kw^T; V = XV vw^T; R = XR rw^T, in one parallel loop
        cdef MatmulJob jobs[3]
        jobs[0] = ws.job(0, ws.k, n, &self.att_key, ws.xk)
        jobs[1] = ws.job(1, ws.v, n, &self.att_value, ws.xv)
        jobs[2] = ws.job(2, ws.r, n, &self.att_receptance, ws.xr)
        _matmul_jobs(jobs, 3, n_rows, ws.wbuf, n_threads)
        # the recurrence: token by token within a sequence, channels independent; 64
        # channels (four cache lines of each row, whole vectors) per task
        for block in prange((n + 63) // 64, schedule="static", num_threads=n_threads):
            _wkv_rows(ws.k, ws.v, ws.r, ws.rwkv, self.att_first, self.att_decay, states, ss, starts, n_seq, n,
                      block * 64, min(block * 64 + 64, n))
        # X += (R * WKV) ow^T: the sum is taken by channel mixing's first loop
        jobs[0] = ws.job(0, ws.out, n, &self.att_output, ws.rwkv)
        _matmul_jobs(jobs, 1, n_rows, ws.wbuf, n_threads)

    cdef void _channel_mixing_rows(self, float* X, Py_ssize_t n_rows, float* states, Py_ssize_t ss,
                                   const Py_ssize_t* starts,
                                   Py_ssize_t n_seq, SeqWorkspace ws, int n_threads) noexcept nogil:
        # first X += the attention output _time_mixing_rows left in ws.out
        cdef Py_ssize_t n = self.n_embd, t
        self._norm_and_shift(X, n_rows, states, ss, FFN_XX, starts, n_seq, ws.out, self.ln2_w, self.ln2_b, ws.xx,
                             ws.xk, self.ffn_mix_k, ws.xr, self.ffn_mix_r, NULL, NULL, n_threads)
        # R = XR rw^T; KF = relu(XK kw^T)^2 (one parallel loop); X += sigmoid(R) * (KF vw^T)
        cdef MatmulJob jobs[2]
        jobs[0] = ws.job(1, ws.r, n, &self.ffn_receptance, ws.xr)
        jobs[1] = ws.job(2, ws.kf, self.n_ffn, &self.ffn_key, ws.xk)
        _matmul_jobs(jobs, 2, n_rows, ws.wbuf, n_threads)
        for t in prange(n_rows, schedule="static", num_threads=n_threads):
            rwkvx_relu_square(ws.kf + t * self.n_ffn, self.n_ffn)
        jobs[0] = ws.job(0, ws.out, n, &self.ffn_value, ws.kf)
        _matmul_jobs(jobs, 1, n_rows, ws.wbuf, n_threads)
        for t in prange(n_rows, schedule="static", num_threads=n_threads):
            rwkvx_add_gated(n, X + t * n, ws.r + t * n, ws.out + t * n)

    cdef void _time_mixing(self, float* x, float* state, Workspace ws, int n_threads) noexcept nogil:
        cdef Py_ssize_t j, n = self.n_embd
        cdef float* sx = state + ATT_XX * n
        cdef float* aa = state + ATT_AA * n
        cdef float* bb = state + ATT_BB * n
        cdef float* pp = state + ATT_PP * n
        _layer_norm(ws.xx, x, self.ln1_w, self.ln1_b, n)
        _token_shift(ws.xk, ws.xx, sx, self.att_mix_k, n)
        _token_shift(ws.xv, ws.xx, sx, self.att_mix_v, n)
        _token_shift(ws.xr, ws.xx, sx, self.att_mix_r, n)
        for j in range(n):
            sx[j] = ws.xx[j]
        # k = kw @ xk; v = vw @ xv; r = sigmoid(rw @ xr), in one parallel loop
        cdef MatvecJob jobs[3]
        jobs[0] = MatvecJob(ws.k, &self.att_key, ws.xk)
        jobs[1] = MatvecJob(ws.v, &self.att_value, ws.xv)
        jobs[2] = MatvecJob(ws.r, &self.att_receptance, ws.xr)
        _matvec_jobs(jobs, 3, ws.scratch, n_threads)
        rwkvx_wkv(n, ws.k, ws.v, ws.r, self.att_first, self.att_decay, aa, bb, pp, ws.rwkv)
        # x += ow @ (r * wkv)
        _matvec(ws.out, &self.att_output, ws.rwkv, ws.scratch, n_threads)
        for j in range(n):
            x[j] += ws.out[j]

    cdef void _channel_mixing(self, float* x, float* state, Workspace ws, int n_threads) noexcept nogil:
        cdef Py_ssize_t j, n = self.n_embd
        cdef float* sx = state + FFN_XX * n
        _layer_norm(ws.xx, x, self.ln2_w, self.ln2_b, n)
        _token_shift(ws.xk, ws.xx, sx, self.ffn_mix_k, n)
        _token_shift(ws.xr, ws.xx, sx, self.ffn_mix_r, n)
        for j in range(n):
            sx[j] = ws.xx[j]
        # r = sigmoid(rw @ xr); k = relu(kw @ xk)^2; x += r * (vw @ k)
        cdef MatvecJob jobs[2]
        jobs[0] = MatvecJob(ws.r, &self.ffn_receptance, ws.xr)
        jobs[1] = MatvecJob(ws.kf, &self.ffn_key, ws.xk)
        _matvec_jobs(jobs, 2, ws.scratch, n_threads)
        rwkvx_relu_square(ws.kf, self.n_ffn)
        _matvec(ws.out, &self.ffn_value, ws.kf, ws.scratch, n_threads)
        rwkvx_add_gated(n, x, ws.r, ws.out)


def layer_norm_rows(const float[:, ::1] X, const float[::1] weight, const float[::1] bias,
                    float[:, ::1] out, int n_threads=1):
    """Write layer_norm(X[t]) * weight + bias into out[t] for every row; X, out (n_rows, n)."""
    cdef Py_ssize_t n_rows = X.shape[0], n = X.shape[1], t
    if weight.shape[0] != n or bias.shape[0] != n or out.shape[0] != n_rows or out.shape[1] != n or n == 0:
        raise RwkvxError(f"layer_norm_rows: expected X and out ({n_rows}, {n}) and weight, bias ({n},)")
    n_threads = kernel_threads(n_threads)
    if n_rows == 0:
        return
    with nogil:
        for t in prange(n_rows, schedule="static", num_threads=n_threads):
            _layer_norm(&out[t, 0], &X[t, 0], &weight[0], &bias[0], n)


cdef inline void _copy_part(float* dst, const float** src, Py_ssize_t n, Py_ssize_t part) noexcept nogil:
    # part k of row i of copy_rows: COPY_PART floats from i * n + k * COPY_PART
    cdef Py_ssize_t n_parts = (n + COPY_PART - 1) // COPY_PART
    cdef Py_ssize_t i = part // n_parts, start = (part % n_parts) * COPY_PART
    memcpy(dst + i * n + start, src[i] + start, min(COPY_PART, n - start) * sizeof(float))


cdef void _copy_rows(float* dst, const float** src, Py_ssize_t n_rows, Py_ssize_t n,
                     int n_threads) noexcept nogil:
    cdef Py_ssize_t part
    for part in prange(n_rows * ((n + COPY_PART - 1) // COPY_PART), schedule="static",
                       num_threads=n_threads):
        _copy_part(dst, src, n, part)


def copy_rows(float[:, ::1] dst, list rows, int n_threads=1):
    """dst[b] = rows[b] for every b, in parallel: rows are C-contiguous float32 vectors of
    dst.shape[1] values (batched decoding's states gathered into one block: numpy copied
    eight 430M states in 0.31 ms, two threads here take 0.17)."""
    cdef Py_ssize_t n_rows = dst.shape[0], n = dst.shape[1], i
    if len(rows) != n_rows:
        raise RwkvxError(f"copy_rows: expected {n_rows} rows, got {len(rows)}")
    n_threads = kernel_threads(n_threads)
    # the views hold the rows' buffers until the copy is done
    views = []
    cdef const float[::1] row
    for i in range(n_rows):
        try:
            row = rows[i]
        except (TypeError, ValueError):
            raise RwkvxError(f"copy_rows: row {i}: expected a C-contiguous float32 vector, "
                             f"got {type(rows[i]).__name__}") from None
        if row.shape[0] != n:
            raise RwkvxError(f"copy_rows: row {i} has {row.shape[0]} values, expected {n}")
        views.append(row)
    if n_rows == 0 or n == 0:
        return
    cdef const float** src = <const float**>malloc(n_rows * sizeof(float*))
    if src == NULL:
        raise MemoryError()
    try:
        for i in range(n_rows):
            row = views[i]
            src[i] = &row[0]
        with nogil:
            _copy_rows(&dst[0, 0], src, n_rows, n, n_threads)
    finally:
        free(src)


def layer_norm(const float[::1] x, const float[::1] weight, const float[::1] bias, float[::1] out):
    """Write layer_norm(x) * weight + bias into out; all (n,) float32."""
    cdef Py_ssize_t n = x.shape[0]
    if weight.shape[0] != n or bias.shape[0] != n or out.shape[0] != n or n == 0:
        raise RwkvxError(f"layer_norm: expected four equal non-empty lengths, got x ({n},), "
                         f"weight ({weight.shape[0]},), bias ({bias.shape[0]},), out ({out.shape[0]},)")
    with nogil:
        _layer_norm(&out[0], &x[0], &weight[0], &bias[0], n)


def exp_f32(const float[::1] x):
    """e^x as the layer kernels compute it (_elementwise.h), for checking against float64."""
    out = np.empty(x.shape[0], dtype=np.float32)
    cdef float[::1] o = out
    cdef Py_ssize_t j
    for j in range(x.shape[0]):
        o[j] = rwkvx_expf(x[j])
    return out
