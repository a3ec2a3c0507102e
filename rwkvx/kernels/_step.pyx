"""One decoded token per sequence through one RWKV-5.2, 6 or 7 layer, in C from end to end.

rwkvx.arch's Layer classes run any number of rows with numpy glue between the kernels; for
one token that glue (about fifteen calls from Python a layer) cost more than the layer's
arithmetic outside the big products (measured on RWKV-7's 0.4B shape, uint8, 2 threads: 25
ms a token against 15.5 ms of products), and a batched decoding step (one token for each of
several sequences) paid the same again: 9-11 ms a step of 24 layers whatever the width. The
steps here do the same work with the same row kernels (layer norm, token-shift mixes, the
fused product groups, the decay and gates, the WKV with its group norm), so a token gives
the same bits through a step as through the rows path, for one sequence or a batch.

A layer is a handful of parallel loops (the product groups, the heads' WKV); everything
between them is a few microseconds of serial work.
"""
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

import numpy as np

from rwkvx.kernels._parallel cimport kernel_threads  # fewer threads while other programs contend for the cores
from rwkvx.kernels._matvec cimport (Linear, LowrankJob, Matrix, MatmulJob, MatvecJob, U8Sums, _lowrank_jobs,
                                    _matmul, _matmul_jobs, _matvec_lowrank_jobs, wbuf_floats)
from rwkvx.kernels._wkv cimport _lora_act, _mix_rows, _v7_prepare, _wkv5, _wkv7
from rwkvx.kernels._matvec import STEP_SLOT, WBUF_SLOT, _product_scratch, _scratch, simd_level
from rwkvx.errors import RwkvxError

cdef extern from "_elementwise.h" nogil:
    void rwkvx_layer_norm(Py_ssize_t n, const float* x, const float* w, const float* b, double eps,
                          float* out)
    void rwkvx_relu_square(float* x, Py_ssize_t n)
    void rwkvx_silu(float* x, Py_ssize_t n)
    void rwkvx_v6_decay(float* w, const float* time_decay, Py_ssize_t n)
    void rwkvx_add_gated(Py_ssize_t n, float* x, const float* r, const float* y)

cdef enum:
    FFN_XX = 0
    ATT_XX = 1
    WKV = 2

# torch's layer_norm default (rwkvx.arch.common.LAYER_NORM_EPS)
cdef double LAYER_NORM_EPS = 1e-5


def _check_shape(name, lin, Py_ssize_t rows, Py_ssize_t cols):
    if tuple(lin.shape) != (rows, cols):
        raise RwkvxError(f"{name}: expected ({rows}, {cols}), got {tuple(lin.shape)}")


cdef const float* _vector(dict keep, name, value, Py_ssize_t n) except NULL:
    cdef const float[::1] v = np.ascontiguousarray(value, dtype=np.float32).reshape(-1)
    if v.shape[0] != n:
        raise RwkvxError(f"{name}: expected {n} values, got {v.shape[0]}")
    keep[name] = v
    return &v[0]


# One call's rows and scratch: B sequences, one token each. Every per-token quantity of a
# step is a (B, C) block of `rows` (the architecture's own layout), so B = 1 is the decoded
# token and B > 1 a batched step through the same code.
cdef struct _Rows:
    Py_ssize_t B
    float** state            # (B,) each sequence's layer state (2 + N, C), written
    const float** source     # (B,) the same before this token (may be the state itself)
    float** wkv_out          # (B,) state + WKV * C
    const float** wkv_in     # (B,) source + WKV * C
    const Py_ssize_t* starts # 0, 1, .., B: sequence b is row b
    float* rows              # the architecture's rows
    float* hidden            # (B, n_ffn) the feed-forward hidden rows
    float* prev              # (B, C) the previous token's rows of the sequences
    float* u8                # the matrix-vector products' scratch (B = 1)
    float* xr[4]             # the matrix-matrix products' scratch (B > 1), as _matmul_jobs takes it
    float* xpack[4]
    U8Sums* sums[4]
    float* wbuf


cdef inline int _row_threads(const _Rows* s, int n_threads) noexcept nogil:
    # the elementwise row kernels: a parallel loop's barrier costs more than one token's row
    return n_threads if s.B >= 4 else 1


cdef class _Step:
    """What every step holds: the layer norms, the output projection, the feed-forward
    matrices (with RWKV-5/6's receptance gate) and the sizes. Scratch comes from the calling
    thread's buffers (rwkvx.kernels._matvec._scratch), so steps may run in several threads."""
    cdef Linear o, fk, fv, fr
    cdef const float* ln1_w
    cdef const float* ln1_b
    cdef const float* ln2_w
    cdef const float* ln2_b
    cdef const float* ffn_mix      # (2, C) for k and r (RWKV-5/6), (C,) for k (RWKV-7)
    cdef readonly Py_ssize_t C, H, N, n_ffn
    cdef Py_ssize_t n_rows         # floats of the architecture's rows per token
    cdef bint needs_v_first        # RWKV-7's value residual
    cdef bint gated                # RWKV-5/6's feed-forward receptance gate
    cdef double eps
    cdef dict keep

    cdef _setup(self, dict p, dict lin, Py_ssize_t C, Py_ssize_t n_head, double eps, ffn_mix, Py_ssize_t n_rows):
        self.keep = {}
        if n_head < 1 or C % n_head:
            raise RwkvxError(f"{n_head} heads do not divide {C} channels")
        self.o, self.fk, self.fv = lin["att_output"], lin["ffn_key"], lin["ffn_value"]
        self.C, self.H, self.N, self.n_ffn, self.eps = C, n_head, C // n_head, self.fk.m.n_rows, eps
        for name, rows, cols in (("att_output", C, C), ("ffn_key", self.n_ffn, C), ("ffn_value", C, self.n_ffn)):
            _check_shape(name, lin[name], rows, cols)
        self.gated = "ffn_receptance" in lin
        if self.gated:
            self.fr = lin["ffn_receptance"]
            _check_shape("ffn_receptance", self.fr, C, C)
        self.ln1_w = _vector(self.keep, "ln1_weight", p["ln1_weight"], C)
        self.ln1_b = _vector(self.keep, "ln1_bias", p["ln1_bias"], C)
        self.ln2_w = _vector(self.keep, "ln2_weight", p["ln2_weight"], C)
        self.ln2_b = _vector(self.keep, "ln2_bias", p["ln2_bias"], C)
        self.ffn_mix = _vector(self.keep, "ffn_mix", ffn_mix, (2 if self.gated else 1) * C)
        self.n_rows = n_rows

    def __call__(self, float[::1] x, float[:, ::1] state, const float[:, ::1] source, float[::1] v_first=None,
                 int n_threads=1):
        """Move one token x (C,) through the layer in place: state (2 + N, C) is written from
        source (the layer's state before the token; may be the same array). RWKV-7: v_first
        (C,) is layer 0's value, written by layer 0 and read by the others."""
        name = type(self).__name__
        if x.shape[0] != self.C or (v_first is not None and v_first.shape[0] != self.C):
            raise RwkvxError(f"{name}: x and v_first: expected ({self.C},)")
        self._run(np.asarray(x).reshape(1, -1), [state], [source],
                  None if v_first is None else np.asarray(v_first).reshape(1, -1), n_threads)

    def batch(self, float[:, ::1] X, states, sources, float[:, ::1] v_first=None, int n_threads=1):
        """One token for each of B sequences: row b of X (B, C) is sequence b's, moved in
        place; states[b] (2 + N, C) is written from sources[b] (may be the same array).
        RWKV-7: v_first (B, C), layer 0's values. Each row gets the bits it gets alone when B
        = 1, and otherwise those of any other product of 2+ rows (the same bits in float32
        arithmetic: see rwkvx.load)."""
        name = type(self).__name__
        if len(states) != X.shape[0] or len(sources) != X.shape[0]:
            raise RwkvxError(f"{name}: expected {X.shape[0]} states and sources, got {len(states)} and {len(sources)}")
        if X.shape[1] != self.C or (v_first is not None and (v_first.shape[0] != X.shape[0] or v_first.shape[1] != self.C)):
            raise RwkvxError(f"{name}: X and v_first: expected ({X.shape[0]}, {self.C})")
        self._run(X, states, sources, v_first, n_threads)

    cdef _run(self, float[:, ::1] X, states, sources, float[:, ::1] v_first, int n_threads):
        cdef Py_ssize_t B = X.shape[0], C = self.C, wide = max(C, self.n_ffn), b, i
        name = type(self).__name__
        if v_first is None and self.needs_v_first:
            raise RwkvxError(f"{name}: x and v_first: RWKV-7 needs v_first")
        if B == 0:
            return
        cdef float[:, ::1] st
        cdef const float[:, ::1] src
        n_threads = kernel_threads(n_threads)
        cdef int level = simd_level()
        cdef float[::1] buf = _scratch(STEP_SLOT, B * (self.n_rows + self.n_ffn + C) + 4 * wide)
        cdef float[:, ::1] xr
        cdef float[::1] xpack, wbuf
        cdef unsigned char[::1] sums
        cdef _Rows rows
        rows.B = B
        rows.rows = &buf[0]
        rows.hidden = rows.rows + B * self.n_rows
        rows.prev = rows.hidden + B * self.n_ffn
        rows.u8 = rows.prev + B * C
        # what the pointers below point into, kept for the call
        kept = []
        if B > 1:
            for i in range(4):
                xr, xpack, sums = _product_scratch(i, B, wide)
                rows.xr[i], rows.xpack[i], rows.sums[i] = &xr[0, 0], &xpack[0], <U8Sums*>&sums[0]
                kept.append((xr, xpack, sums))
            wbuf = _scratch(WBUF_SLOT, n_threads * wbuf_floats(wide))
            rows.wbuf = &wbuf[0]
        cdef void** ptrs = <void**>malloc((4 * B + B + 1) * sizeof(void*))
        if ptrs == NULL:
            raise MemoryError()
        rows.state, rows.source = <float**>ptrs, <const float**>(ptrs + B)
        rows.wkv_out, rows.wkv_in = <float**>(ptrs + 2 * B), <const float**>(ptrs + 3 * B)
        cdef Py_ssize_t* starts = <Py_ssize_t*>(ptrs + 4 * B)
        try:
            for b in range(B):
                state, source = states[b], sources[b]
                kept += (state, source)
                try:
                    st = state
                except (TypeError, ValueError) as e:
                    raise RwkvxError(f"{name}: state {b}: expected a writable C-contiguous float32 array") from e
                try:
                    src = source
                except (TypeError, ValueError) as e:
                    raise RwkvxError(f"{name}: source {b}: expected a C-contiguous float32 array") from e
                for what, got_rows, got_cols in (("state", st.shape[0], st.shape[1]), ("source", src.shape[0], src.shape[1])):
                    if got_rows != WKV + self.N or got_cols != C:
                        raise RwkvxError(f"{name}: {what}: expected ({WKV + self.N}, {C}), got ({got_rows}, {got_cols})")
                rows.state[b], rows.source[b] = &st[0, 0], &src[0, 0]
                rows.wkv_out[b], rows.wkv_in[b] = &st[0, 0] + WKV * C, &src[0, 0] + WKV * C
                starts[b] = b
            starts[B] = B
            rows.starts = starts
            with nogil:
                self._step(&rows, &X[0, 0], NULL if v_first is None else &v_first[0, 0], n_threads, level)
        finally:
            free(ptrs)

    cdef void _step(self, const _Rows* s, float* x, float* v_first, int n_threads, int level) noexcept nogil:
        pass

    cdef void _products(self, const _Rows* s, int n, const Matrix** ms, const float** xs, float** outs,
                        const LowrankJob* low, int n_low, int n_threads) noexcept nogil:
        # outs[i] (B, n_rows) = xs[i] (B, n_cols) @ ms[i].T, and the low-rank products low:
        # for one token matrix-vector products (the memory-bound decode) sharing one parallel
        # loop with the low-rank ones, else the low-rank products, then one pass over each
        # matrix; rwkvx.arch.common's matmul, products and lowrank choose the same kernels
        # for the same bits
        cdef MatvecJob vj[4]
        cdef MatmulJob mj[4]
        cdef int i
        if s.B == 1:
            for i in range(n):
                vj[i] = MatvecJob(outs[i], ms[i], xs[i])
            _matvec_lowrank_jobs(vj, n, low, n_low, s.u8, n_threads)
            return
        if n_low:
            _lowrank_jobs(low, n_low, s.B, n_threads)
        if n == 1:
            _matmul(outs[0], ms[0].n_rows, ms[0], xs[0], s.B, s.xr[0], s.sums[0], s.xpack[0], s.wbuf, n_threads)
        else:
            for i in range(n):
                mj[i] = MatmulJob(outs[i], ms[i].n_rows, ms[i], xs[i], s.xr[i], s.sums[i], s.xpack[i])
            _matmul_jobs(mj, n, s.B, s.wbuf, n_threads)

    cdef void _product(self, const _Rows* s, const Matrix* m, const float* x, float* out,
                       int n_threads) noexcept nogil:
        self._products(s, 1, &m, &x, &out, NULL, 0, n_threads)

    cdef void _norm_and_shift(self, const _Rows* s, const float* x, const float* w, const float* b, Py_ssize_t row,
                              float* xn) noexcept nogil:
        # xn = layer norm of every row of x; s.prev = the sequences' previous normed rows
        # (state row `row`), which each state's row then replaces
        cdef Py_ssize_t C = self.C, i
        for i in range(s.B):
            rwkvx_layer_norm(C, x + i * C, w, b, LAYER_NORM_EPS, xn + i * C)
            memcpy(s.prev + i * C, s.source[i] + row * C, C * sizeof(float))
        for i in range(s.B):
            memcpy(s.state[i] + row * C, xn + i * C, C * sizeof(float))

    cdef void _time_mix_end(self, const _Rows* s, float* x, const float* r, const float* k, const float* v,
                            const float* w, Py_ssize_t w_step, const float* u, const float* lnx_w,
                            const float* lnx_b, const float* g, float* y, float* out, int n_threads,
                            int level) noexcept nogil:
        # RWKV-5/6: WKV, group norm and gate, output projection, residual
        cdef Py_ssize_t j
        _wkv5(level, s.starts, s.B, self.H, self.N, r, k, v, w, w_step, u, lnx_w, lnx_b, g, self.eps, s.wkv_in,
              s.wkv_out, y, out, n_threads)
        self._product(s, &self.o.m, out, y, n_threads)
        for j in range(s.B * self.C):
            x[j] = x[j] + y[j]

    cdef void _ffn(self, const _Rows* s, float* x, float* xn, float* mixed, float* r, float* y,
                   int n_threads) noexcept nogil:
        # channel mixing: x += value @ relu(key @ xk)^2, times sigmoid(receptance @ xr) in
        # RWKV-5/6 (RWKV-4's); RWKV-7 has no receptance (r unused). mixed: 2 B C floats
        cdef Py_ssize_t BC = s.B * self.C, j
        cdef const Matrix* ms[2]
        cdef const float* xs[2]
        cdef float* outs[2]
        self._norm_and_shift(s, x, self.ln2_w, self.ln2_b, FFN_XX, xn)
        _mix_rows(s.B, self.C, 2 if self.gated else 1, xn, s.prev, self.ffn_mix, mixed, _row_threads(s, n_threads))
        ms[0], xs[0], outs[0] = &self.fk.m, mixed, s.hidden
        if self.gated:
            ms[1], xs[1], outs[1] = &self.fr.m, mixed + BC, r
        self._products(s, 2 if self.gated else 1, ms, xs, outs, NULL, 0, n_threads)
        rwkvx_relu_square(s.hidden, s.B * self.n_ffn)
        self._product(s, &self.fv.m, s.hidden, y, n_threads)
        if self.gated:
            rwkvx_add_gated(BC, x, r, y)
        else:
            for j in range(BC):
                x[j] = x[j] + y[j]


cdef class V7Step(_Step):
    """An RWKV-7 layer: p is rwkvx.arch.v7's parameter dict, lin its Linear objects (the big
    matrices), low the low-rank matrices transposed (in, out), mixes (6, C) the token-shift
    mixes of r, w, k, v, a, g."""
    cdef Linear r, k, v
    # the low-rank pairs, transposed (in, out): w1 a1 g1 v1 (C, D), w2 a2 g2 v2 (D, C)
    cdef const float* low[8]
    cdef Py_ssize_t rank[4]
    cdef const float* mixes
    cdef const float* w0
    cdef const float* a0
    cdef const float* v0
    cdef const float* k_k
    cdef const float* k_a
    cdef const float* r_k
    cdef const float* lnx_w
    cdef const float* lnx_b
    cdef readonly bint layer0
    cdef float decay_scale

    def __init__(self, dict p, dict lin, dict low, mixes, Py_ssize_t n_head, float decay_scale, double eps):
        self.r, self.k, self.v = lin["att_receptance"], lin["att_key"], lin["att_value"]
        cdef Py_ssize_t C = self.r.m.n_cols, i
        self.layer0 = "att_v1" not in low
        self.needs_v_first = True
        for i in range(4):
            self.rank[i] = 0
        ranks = [low[f"att_{name}1"].shape[1] for name in ("wag" if self.layer0 else "wagv")]
        # 6 mixed inputs, r k v w a g v-lora kk b y (C each), the low-rank hidden rows
        self._setup(p, lin, C, n_head, eps, p["ffn_x_k"], 17 * C + sum(ranks))
        for name in ("att_receptance", "att_key", "att_value"):
            _check_shape(name, lin[name], C, C)
        cdef const float[:, ::1] first, second
        for i, name in enumerate("wagv"):
            if name == "v" and self.layer0:
                continue
            first, second = low[f"att_{name}1"], low[f"att_{name}2"]
            if first.shape[0] != C or second.shape[1] != C or second.shape[0] != first.shape[1] or first.shape[1] == 0:
                raise RwkvxError(f"V7Step: the {name} low-rank pair, transposed: expected ({C}, D) and (D, {C}), got "
                                 f"({first.shape[0]}, {first.shape[1]}) and ({second.shape[0]}, {second.shape[1]})")
            self.keep[f"low_{name}"] = (first, second)
            self.low[i], self.low[4 + i], self.rank[i] = &first[0, 0], &second[0, 0], first.shape[1]
        self.w0 = _vector(self.keep, "att_w0", p["att_w0"], C)
        self.a0 = _vector(self.keep, "att_a0", p["att_a0"], C)
        self.k_k = _vector(self.keep, "att_k_k", p["att_k_k"], C)
        self.k_a = _vector(self.keep, "att_k_a", p["att_k_a"], C)
        self.lnx_w = _vector(self.keep, "att_ln_x_weight", p["att_ln_x_weight"], C)
        self.lnx_b = _vector(self.keep, "att_ln_x_bias", p["att_ln_x_bias"], C)
        self.r_k = _vector(self.keep, "att_r_k", p["att_r_k"], C)
        self.mixes = _vector(self.keep, "mixes", mixes, 6 * C)
        self.v0 = NULL if self.layer0 else _vector(self.keep, "att_v0", p["att_v0"], C)
        self.decay_scale = decay_scale

    cdef void _step(self, const _Rows* s, float* x, float* v_first, int n_threads, int level) noexcept nogil:
        cdef Py_ssize_t C = self.C, B = s.B, BC = s.B * self.C
        cdef float* p = s.rows
        cdef float* xn = p
        cdef float* mixed = p + BC          # xr xw xk xv xa xg
        cdef float* r = p + 7 * BC
        cdef float* k = p + 8 * BC
        cdef float* v = p + 9 * BC
        cdef float* w = p + 10 * BC
        cdef float* a = p + 11 * BC
        cdef float* g = p + 12 * BC
        cdef float* v_lora = p + 13 * BC
        cdef float* kk = p + 14 * BC
        cdef float* b = p + 15 * BC
        cdef float* y = p + 16 * BC
        cdef float* w_h = p + 17 * BC         # the low-rank hidden rows: w a g v
        cdef float* a_h = w_h + B * self.rank[0]
        cdef float* g_h = a_h + B * self.rank[1]
        cdef float* v_h = g_h + B * self.rank[2]
        cdef float* out = mixed             # free once the first products have run
        cdef LowrankJob low[4]
        cdef int n_low = 3 if self.layer0 else 4
        cdef const Matrix* ms[3]
        cdef const float* xs[3]
        cdef float* outs[3]
        cdef Py_ssize_t j

        # time mixing
        self._norm_and_shift(s, x, self.ln1_w, self.ln1_b, ATT_XX, xn)
        _mix_rows(B, C, 6, xn, s.prev, self.mixes, mixed, _row_threads(s, n_threads))
        # the low-rank first halves of xw, xa, xg, xv, with r, k, v
        low[0] = LowrankJob(w_h, self.rank[0], self.low[0], C, self.rank[0], mixed + BC, C)
        low[1] = LowrankJob(a_h, self.rank[1], self.low[1], C, self.rank[1], mixed + 4 * BC, C)
        low[2] = LowrankJob(g_h, self.rank[2], self.low[2], C, self.rank[2], mixed + 5 * BC, C)
        low[3] = LowrankJob(v_h, self.rank[3], self.low[3], C, self.rank[3], mixed + 3 * BC, C)
        ms[0], xs[0], outs[0] = &self.r.m, mixed, r
        ms[1], xs[1], outs[1] = &self.k.m, mixed + 2 * BC, k
        ms[2], xs[2], outs[2] = &self.v.m, mixed + 3 * BC, v
        self._products(s, 3, ms, xs, outs, low, n_low, n_threads)
        _lora_act(B * self.rank[0], w_h, B * self.rank[2], g_h)
        low[0] = LowrankJob(w, C, self.low[4], self.rank[0], C, w_h, self.rank[0])
        low[1] = LowrankJob(a, C, self.low[5], self.rank[1], C, a_h, self.rank[1])
        low[2] = LowrankJob(g, C, self.low[6], self.rank[2], C, g_h, self.rank[2])
        low[3] = LowrankJob(v_lora, C, self.low[7], self.rank[3], C, v_h, self.rank[3])
        _lowrank_jobs(low, n_low, B, n_threads)
        _v7_prepare(B, self.H, self.N, w, k, v, a, NULL if self.layer0 else v_lora, v_first, self.w0, self.a0,
                    self.v0, self.k_k, self.k_a, self.decay_scale, kk, b, _row_threads(s, n_threads))
        if self.layer0:
            memcpy(v_first, v, BC * sizeof(float))
        _wkv7(level, s.starts, B, self.H, self.N, r, w, k, v, kk, b, self.r_k, self.lnx_w, self.lnx_b, g, self.eps,
              s.wkv_in, s.wkv_out, y, out, n_threads)
        self._product(s, &self.o.m, out, y, n_threads)
        for j in range(BC):
            x[j] = x[j] + y[j]

        self._ffn(s, x, xn, mixed, NULL, y, n_threads)


cdef class V5Step(_Step):
    """An RWKV-5.2 layer: p and lin as rwkvx.arch.v5's Layer holds them; mix (4, C) the
    previous token's shares for k, v, r, g, ffn_mix (2, C) for k and r; decay (C,) the
    decay factors, bonus (C,) u."""
    cdef Linear r, k, v, g
    cdef const float* mix
    cdef const float* decay
    cdef const float* bonus
    cdef const float* lnx_w
    cdef const float* lnx_b

    def __init__(self, dict p, dict lin, mix, ffn_mix, decay, bonus, Py_ssize_t n_head, double eps):
        self.r, self.k, self.v, self.g = lin["att_receptance"], lin["att_key"], lin["att_value"], lin["att_gate"]
        cdef Py_ssize_t C = self.r.m.n_cols
        # xn, 4 mixed inputs, r k v g y out (C each)
        self._setup(p, lin, C, n_head, eps, ffn_mix, 11 * C)
        for name in ("att_receptance", "att_key", "att_value", "att_gate"):
            _check_shape(name, lin[name], C, C)
        self.mix = _vector(self.keep, "mix", mix, 4 * C)
        self.decay = _vector(self.keep, "decay", decay, C)
        self.bonus = _vector(self.keep, "bonus", bonus, C)
        self.lnx_w = _vector(self.keep, "att_ln_x_weight", p["att_ln_x_weight"], C)
        self.lnx_b = _vector(self.keep, "att_ln_x_bias", p["att_ln_x_bias"], C)

    cdef void _step(self, const _Rows* s, float* x, float* v_first, int n_threads, int level) noexcept nogil:
        cdef Py_ssize_t C = self.C, BC = s.B * self.C
        cdef float* xn = s.rows
        cdef float* mixed = xn + BC         # xk xv xr xg
        cdef float* r = xn + 5 * BC
        cdef float* k = xn + 6 * BC
        cdef float* v = xn + 7 * BC
        cdef float* g = xn + 8 * BC
        cdef float* y = xn + 9 * BC
        cdef float* out = xn + 10 * BC
        cdef const Matrix* ms[4]
        cdef const float* xs[4]
        cdef float* outs[4]
        self._norm_and_shift(s, x, self.ln1_w, self.ln1_b, ATT_XX, xn)
        _mix_rows(s.B, C, 4, xn, s.prev, self.mix, mixed, _row_threads(s, n_threads))
        ms[0], xs[0], outs[0] = &self.r.m, mixed + 2 * BC, r
        ms[1], xs[1], outs[1] = &self.k.m, mixed, k
        ms[2], xs[2], outs[2] = &self.v.m, mixed + BC, v
        ms[3], xs[3], outs[3] = &self.g.m, mixed + 3 * BC, g
        self._products(s, 4, ms, xs, outs, NULL, 0, n_threads)
        rwkvx_silu(g, BC)
        self._time_mix_end(s, x, r, k, v, self.decay, 0, self.bonus, self.lnx_w, self.lnx_b, g, y, out,
                           n_threads, level)
        self._ffn(s, x, xn, mixed, r, y, n_threads)


cdef class V6Step(_Step):
    """An RWKV-6 layer: p and lin as rwkvx.arch.v6's Layer holds them, low its low-rank
    matrices transposed, (in, out) (see _lowrank.h): att_time_maa_w1 (C, 5 D), maa_w2_0 ..
    maa_w2_4 (D, C) the five halves of the mixes' correction, att_time_decay_w1 (C, Dw) and
    att_time_decay_w2 (Dw, C); ffn_mix (2, C), bonus (C,) u."""
    cdef Linear r, k, v, g
    cdef const float* maa_w1
    cdef const float* maa_w2[5]
    cdef const float* decay_w1
    cdef const float* decay_w2
    cdef const float* maa[6]        # time_maa_x, then w k v r g
    cdef const float* time_decay
    cdef const float* bonus
    cdef const float* lnx_w
    cdef const float* lnx_b
    cdef Py_ssize_t d_mix, d_decay

    def __init__(self, dict p, dict lin, dict low, ffn_mix, bonus, Py_ssize_t n_head, double eps):
        self.r, self.k, self.v, self.g = lin["att_receptance"], lin["att_key"], lin["att_value"], lin["att_gate"]
        cdef Py_ssize_t C = self.r.m.n_cols, i
        cdef const float[:, ::1] m
        for name in ("att_receptance", "att_key", "att_value", "att_gate"):
            _check_shape(name, lin[name], C, C)
        m = self._low(low, "att_time_maa_w1", C, -1)
        self.maa_w1, self.d_mix = &m[0, 0], m.shape[1] // 5
        if m.shape[1] % 5:
            raise RwkvxError(f"V6Step: att_time_maa_w1, transposed: expected ({C}, 5 D), got ({m.shape[0]}, {m.shape[1]})")
        for i in range(5):
            m = self._low(low, f"maa_w2_{i}", self.d_mix, C)
            self.maa_w2[i] = &m[0, 0]
        m = self._low(low, "att_time_decay_w1", C, -1)
        self.decay_w1, self.d_decay = &m[0, 0], m.shape[1]
        m = self._low(low, "att_time_decay_w2", self.d_decay, C)
        self.decay_w2 = &m[0, 0]
        # xn, sx, xx, 5 mixed inputs, 5 mix corrections, r k v g w y out (C each), the
        # mixes' low-rank row (5 D) and the decay's (Dw)
        self._setup(p, lin, C, n_head, eps, ffn_mix, 20 * C + 5 * self.d_mix + self.d_decay)
        self.keep["low"] = dict(low)  # the arrays behind the pointers above
        for i, c in enumerate("xwkvrg"):
            self.maa[i] = _vector(self.keep, f"att_time_maa_{c}", p[f"att_time_maa_{c}"], C)
        self.time_decay = _vector(self.keep, "att_time_decay", p["att_time_decay"], C)
        self.bonus = _vector(self.keep, "bonus", bonus, C)
        self.lnx_w = _vector(self.keep, "att_ln_x_weight", p["att_ln_x_weight"], C)
        self.lnx_b = _vector(self.keep, "att_ln_x_bias", p["att_ln_x_bias"], C)

    def _low(self, dict low, str name, Py_ssize_t n_in, Py_ssize_t n_out):
        # a low-rank matrix (n_in, n_out), checked; n_out -1: any width >= 1
        cdef const float[:, ::1] m = low[name]
        if m.shape[0] != n_in or m.shape[1] == 0 or (n_out >= 0 and m.shape[1] != n_out):
            raise RwkvxError(f"V6Step: {name}, transposed: expected ({n_in}, {n_out if n_out >= 0 else 'D'}), "
                             f"got ({m.shape[0]}, {m.shape[1]})")
        return m

    cdef void _step(self, const _Rows* s, float* x, float* v_first, int n_threads, int level) noexcept nogil:
        cdef Py_ssize_t C = self.C, D = self.d_mix, B = s.B, BC = s.B * self.C, i, j, t
        cdef float* xn = s.rows
        cdef float* sx = xn + BC
        cdef float* xx = xn + 2 * BC
        cdef float* mixed = xn + 3 * BC     # xw xk xv xr xg
        cdef float* corr = xn + 8 * BC      # the five mix corrections
        cdef float* r = xn + 13 * BC
        cdef float* k = xn + 14 * BC
        cdef float* v = xn + 15 * BC
        cdef float* g = xn + 16 * BC
        cdef float* w = xn + 17 * BC
        cdef float* y = xn + 18 * BC
        cdef float* out = xn + 19 * BC
        cdef float* lora = xn + 20 * BC
        cdef float* w_h = lora + B * 5 * D
        cdef const Matrix* ms[4]
        cdef const float* xs[4]
        cdef float* outs[4]
        cdef LowrankJob low[5]
        self._norm_and_shift(s, x, self.ln1_w, self.ln1_b, ATT_XX, xn)
        for j in range(BC):
            sx[j] = s.prev[j] - xn[j]
        _mix_rows(B, C, 1, xn, s.prev, self.maa[0], xx, _row_threads(s, n_threads))
        # the data-dependent token shift: five mixes corrected by one low-rank map of xx
        low[0] = LowrankJob(lora, 5 * D, self.maa_w1, C, 5 * D, xx, C)
        _lowrank_jobs(low, 1, B, n_threads)
        _lora_act(B * 5 * D, lora, 0, NULL)
        for i in range(5):
            low[i] = LowrankJob(corr + i * BC, C, self.maa_w2[i], D, C, lora + i * D, 5 * D)
        _lowrank_jobs(low, 5, B, n_threads)
        for i in range(5):
            for t in range(B):
                for j in range(C):
                    mixed[i * BC + t * C + j] = xn[t * C + j] + sx[t * C + j] * (self.maa[1 + i][j]
                                                                                 + corr[i * BC + t * C + j])
        low[0] = LowrankJob(w_h, self.d_decay, self.decay_w1, C, self.d_decay, mixed, C)
        ms[0], xs[0], outs[0] = &self.r.m, mixed + 3 * BC, r
        ms[1], xs[1], outs[1] = &self.k.m, mixed + BC, k
        ms[2], xs[2], outs[2] = &self.v.m, mixed + 2 * BC, v
        ms[3], xs[3], outs[3] = &self.g.m, mixed + 4 * BC, g
        self._products(s, 4, ms, xs, outs, low, 1, n_threads)
        rwkvx_silu(g, BC)
        # the data-dependent decay
        _lora_act(B * self.d_decay, w_h, 0, NULL)
        low[0] = LowrankJob(w, C, self.decay_w2, self.d_decay, C, w_h, self.d_decay)
        _lowrank_jobs(low, 1, B, n_threads)
        for t in range(B):
            rwkvx_v6_decay(w + t * C, self.time_decay, C)
        self._time_mix_end(s, x, r, k, v, w, C, self.bonus, self.lnx_w, self.lnx_b, g, y, out,
                           n_threads, level)
        self._ffn(s, x, xn, mixed, r, y, n_threads)
