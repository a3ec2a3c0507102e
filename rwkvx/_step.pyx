"""One decoded token through one RWKV-7 layer, in C from end to end.

rwkvx.arch.v7.Layer runs any number of rows with numpy glue between the kernels; for one
token that glue (about fifteen calls from Python a layer) cost more than the layer's
arithmetic outside the big products (measured on the 0.4B shape, uint8, 2 threads: 25 ms a
token against 15.5 ms of products). V7Step does the same work with the same row kernels
(layer norm, token-shift mixes, the fused product groups, the decay preparation, the WKV
with its group norm), so a token gives the same bits through either path.

Seven parallel loops a layer: the first low-rank halves, r, k and v, the second low-rank
halves, the heads' WKV, the output projection and the feed-forward pair; everything between
them is a few microseconds of serial work.
"""
from libc.string cimport memcpy

import numpy as np

from rwkvx._parallel cimport kernel_threads  # fewer threads while other programs contend for the cores
from rwkvx._matvec cimport Linear, LowrankJob, Matrix, MatvecJob, _lowrank_jobs, _matvec, _matvec_jobs
from rwkvx._wkv cimport _lora_act, _mix_rows, _v7_prepare, _wkv7
from rwkvx._matvec import _aligned_floats, simd_level
from rwkvx.errors import RwkvxError

cdef extern from "_elementwise.h" nogil:
    void rwkvx_layer_norm(Py_ssize_t n, const float* x, const float* w, const float* b, double eps,
                          float* out)
    void rwkvx_relu_square(float* x, Py_ssize_t n)

cdef enum:
    FFN_XX = 0
    ATT_XX = 1
    WKV = 2

# torch's layer_norm default (rwkvx.arch.common.LAYER_NORM_EPS)
cdef double LAYER_NORM_EPS = 1e-5


def _check_shape(name, lin, Py_ssize_t rows, Py_ssize_t cols):
    if tuple(lin.shape) != (rows, cols):
        raise RwkvxError(f"V7Step: {name}: expected ({rows}, {cols}), got {tuple(lin.shape)}")


cdef const float* _vector(dict keep, name, value, Py_ssize_t n) except NULL:
    cdef const float[::1] v = np.ascontiguousarray(value, dtype=np.float32).reshape(-1)
    if v.shape[0] != n:
        raise RwkvxError(f"V7Step: {name}: expected {n} values, got {v.shape[0]}")
    keep[name] = v
    return &v[0]


cdef class V7Step:
    """A layer's weights as the fused token step reads them: p is rwkvx.arch.v7's parameter
    dict, lin its Linear objects (the big matrices), low the low-rank matrices transposed, mixes (6, C) the
    token-shift mixes of r, w, k, v, a, g. Not thread-safe (one scratch per layer; the model
    runs one call at a time)."""
    cdef Linear r, k, v, o, fk, fv
    # the low-rank pairs, transposed (in, out): w1 a1 g1 v1 (C, D), w2 a2 g2 v2 (D, C)
    cdef const float* low[8]
    cdef Py_ssize_t rank[4]
    cdef const float* ln1_w
    cdef const float* ln1_b
    cdef const float* ln2_w
    cdef const float* ln2_b
    cdef const float* mixes
    cdef const float* ffn_mix
    cdef const float* w0
    cdef const float* a0
    cdef const float* v0
    cdef const float* k_k
    cdef const float* k_a
    cdef const float* r_k
    cdef const float* lnx_w
    cdef const float* lnx_b
    cdef readonly Py_ssize_t C, H, N, n_ffn
    cdef readonly bint layer0
    cdef float decay_scale
    cdef double eps
    cdef dict keep
    cdef object scratch_array
    cdef float* scratch

    def __init__(self, dict p, dict lin, dict low, mixes, Py_ssize_t n_head, float decay_scale, double eps):
        self.keep = {}
        self.r, self.k, self.v, self.o = lin["att_receptance"], lin["att_key"], lin["att_value"], lin["att_output"]
        self.fk, self.fv = lin["ffn_key"], lin["ffn_value"]
        self.layer0 = "att_v1" not in low
        cdef Py_ssize_t C = self.r.m.n_cols, i
        if n_head < 1 or C % n_head:
            raise RwkvxError(f"V7Step: {n_head} heads do not divide {C} channels")
        self.C, self.H, self.N, self.n_ffn = C, n_head, C // n_head, self.fk.m.n_rows
        for name, rows, cols in (("att_receptance", C, C), ("att_key", C, C), ("att_value", C, C),
                                 ("att_output", C, C), ("ffn_key", self.n_ffn, C), ("ffn_value", C, self.n_ffn)):
            _check_shape(name, lin[name], rows, cols)
        cdef const float[:, ::1] first, second
        for i, name in enumerate("wagv"):
            self.rank[i] = 0
            if name == "v" and self.layer0:
                continue
            first, second = low[f"att_{name}1"], low[f"att_{name}2"]
            if first.shape[0] != C or second.shape[1] != C or second.shape[0] != first.shape[1] or first.shape[1] == 0:
                raise RwkvxError(f"V7Step: the {name} low-rank pair, transposed: expected ({C}, D) and (D, {C}), got "
                                 f"({first.shape[0]}, {first.shape[1]}) and ({second.shape[0]}, {second.shape[1]})")
            self.keep[f"low_{name}"] = (first, second)
            self.low[i], self.low[4 + i], self.rank[i] = &first[0, 0], &second[0, 0], first.shape[1]
        self.ln1_w = _vector(self.keep, "ln1_weight", p["ln1_weight"], C)
        self.ln1_b = _vector(self.keep, "ln1_bias", p["ln1_bias"], C)
        self.ln2_w = _vector(self.keep, "ln2_weight", p["ln2_weight"], C)
        self.ln2_b = _vector(self.keep, "ln2_bias", p["ln2_bias"], C)
        self.w0 = _vector(self.keep, "att_w0", p["att_w0"], C)
        self.a0 = _vector(self.keep, "att_a0", p["att_a0"], C)
        self.k_k = _vector(self.keep, "att_k_k", p["att_k_k"], C)
        self.k_a = _vector(self.keep, "att_k_a", p["att_k_a"], C)
        self.lnx_w = _vector(self.keep, "att_ln_x_weight", p["att_ln_x_weight"], C)
        self.lnx_b = _vector(self.keep, "att_ln_x_bias", p["att_ln_x_bias"], C)
        self.ffn_mix = _vector(self.keep, "ffn_x_k", p["ffn_x_k"], C)
        self.r_k = _vector(self.keep, "att_r_k", p["att_r_k"], C)
        self.mixes = _vector(self.keep, "mixes", mixes, 6 * C)
        self.v0 = NULL if self.layer0 else _vector(self.keep, "att_v0", p["att_v0"], C)
        self.decay_scale = decay_scale
        self.eps = eps
        # 6 mixed inputs, r k v w a g v-lora kk b y out (C each), the low-rank hidden rows,
        # the feed-forward hidden row, and the uint8 products' scratch (3 inputs at most)
        rank = self.rank[0] + self.rank[1] + self.rank[2] + self.rank[3]
        self.scratch_array = _aligned_floats(17 * C + rank + self.n_ffn + 3 * max(C, self.n_ffn) + 64)
        cdef float[::1] sv = self.scratch_array
        self.scratch = &sv[0]

    def __call__(self, float[::1] x, float[:, ::1] state, const float[:, ::1] source, float[::1] v_first,
                 int n_threads=1):
        """Move one token x (C,) through the layer in place: state (2 + N, C) is written from
        source (the layer's state before the token; may be the same array); v_first (C,) is
        layer 0's value, written by layer 0 and read by the others."""
        cdef Py_ssize_t C = self.C
        if x.shape[0] != C or v_first.shape[0] != C:
            raise RwkvxError(f"V7Step: x and v_first: expected ({C},), got ({x.shape[0]},), ({v_first.shape[0]},)")
        for name, s in (("state", state), ("source", source)):
            if s.shape[0] != WKV + self.N or s.shape[1] != C:
                raise RwkvxError(f"V7Step: {name}: expected ({WKV + self.N}, {C}), got ({s.shape[0]}, {s.shape[1]})")
        n_threads = kernel_threads(n_threads)
        cdef int level = simd_level()
        with nogil:
            self._step(&x[0], &state[0, 0], &source[0, 0], &v_first[0], n_threads, level)

    cdef void _step(self, float* x, float* state, const float* source, float* v_first, int n_threads,
                    int level) noexcept nogil:
        cdef Py_ssize_t C = self.C, j
        cdef float* p = self.scratch
        cdef float* xn = p
        cdef float* mixed = p + C           # xr xw xk xv xa xg
        cdef float* r = p + 7 * C
        cdef float* k = p + 8 * C
        cdef float* v = p + 9 * C
        cdef float* w = p + 10 * C
        cdef float* a = p + 11 * C
        cdef float* g = p + 12 * C
        cdef float* v_lora = p + 13 * C
        cdef float* kk = p + 14 * C
        cdef float* b = p + 15 * C
        cdef float* y = p + 16 * C
        cdef float* hidden = p + 17 * C
        cdef float* w_h = hidden
        cdef float* a_h = w_h + self.rank[0]
        cdef float* g_h = a_h + self.rank[1]
        cdef float* v_h = g_h + self.rank[2]
        cdef float* f_h = v_h + self.rank[3]
        cdef float* u8 = f_h + self.n_ffn
        cdef float* out = mixed             # free once the first products have run
        cdef LowrankJob low[4]
        cdef int n_low = 3 if self.layer0 else 4
        cdef MatvecJob jobs[3]
        cdef int n_jobs
        cdef Py_ssize_t starts[2]
        cdef const float* s_in
        cdef float* s_out
        starts[0], starts[1] = 0, 1

        # time mixing
        rwkvx_layer_norm(C, x, self.ln1_w, self.ln1_b, LAYER_NORM_EPS, xn)
        _mix_rows(1, C, 6, xn, source + ATT_XX * C, self.mixes, mixed, 1)
        memcpy(state + ATT_XX * C, xn, C * sizeof(float))
        # the low-rank first halves of xw, xa, xg, xv, then r, k, v
        low[0] = LowrankJob(w_h, self.rank[0], self.low[0], C, self.rank[0], mixed + C, C)
        low[1] = LowrankJob(a_h, self.rank[1], self.low[1], C, self.rank[1], mixed + 4 * C, C)
        low[2] = LowrankJob(g_h, self.rank[2], self.low[2], C, self.rank[2], mixed + 5 * C, C)
        low[3] = LowrankJob(v_h, self.rank[3], self.low[3], C, self.rank[3], mixed + 3 * C, C)
        _lowrank_jobs(low, n_low, 1, n_threads)
        jobs[0] = MatvecJob(r, &self.r.m, mixed)
        jobs[1] = MatvecJob(k, &self.k.m, mixed + 2 * C)
        jobs[2] = MatvecJob(v, &self.v.m, mixed + 3 * C)
        _matvec_jobs(jobs, 3, u8, n_threads)
        _lora_act(self.rank[0], w_h, self.rank[2], g_h)
        low[0] = LowrankJob(w, C, self.low[4], self.rank[0], C, w_h, self.rank[0])
        low[1] = LowrankJob(a, C, self.low[5], self.rank[1], C, a_h, self.rank[1])
        low[2] = LowrankJob(g, C, self.low[6], self.rank[2], C, g_h, self.rank[2])
        low[3] = LowrankJob(v_lora, C, self.low[7], self.rank[3], C, v_h, self.rank[3])
        _lowrank_jobs(low, n_low, 1, n_threads)
        _v7_prepare(1, self.H, self.N, w, k, v, a, NULL if self.layer0 else v_lora, v_first, self.w0, self.a0,
                    self.v0, self.k_k, self.k_a, self.decay_scale, kk, b, 1)
        if self.layer0:
            memcpy(v_first, v, C * sizeof(float))
        s_in = source + WKV * C
        s_out = state + WKV * C
        _wkv7(level, starts, 1, self.H, self.N, r, w, k, v, kk, b, self.r_k, self.lnx_w, self.lnx_b, g, self.eps,
              &s_in, &s_out, y, out, n_threads)
        _matvec(y, &self.o.m, out, u8, n_threads)
        for j in range(C):
            x[j] = x[j] + y[j]

        # channel mixing
        rwkvx_layer_norm(C, x, self.ln2_w, self.ln2_b, LAYER_NORM_EPS, xn)
        _mix_rows(1, C, 1, xn, source + FFN_XX * C, self.ffn_mix, mixed, 1)
        memcpy(state + FFN_XX * C, xn, C * sizeof(float))
        _matvec(f_h, &self.fk.m, mixed, u8, n_threads)
        rwkvx_relu_square(f_h, self.n_ffn)
        _matvec(y, &self.fv.m, f_h, u8, n_threads)
        for j in range(C):
            x[j] = x[j] + y[j]

