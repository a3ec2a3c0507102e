"""The RWKV-4 layer math: layer norm, time mixing (WKV), channel mixing.

One call of Block.forward moves one token through one layer and updates that layer's
state in place. Elementwise work over n_embd stays serial (starting threads would cost
more than it); the matrix-vector products inside run in parallel over output rows.

State rows per layer, as in ChatRWKV's state[5*i+k]: FFN_XX, ATT_XX, ATT_AA, ATT_BB, ATT_PP.
"""
from libc.math cimport expf, sqrt
from libc.stdlib cimport malloc, free

from rwkvx._matvec cimport Linear, Matrix, _matvec
from rwkvx.errors import RwkvxError

cdef enum:
    FFN_XX = 0
    ATT_XX = 1
    ATT_AA = 2
    ATT_BB = 3
    ATT_PP = 4

# torch.nn.functional.layer_norm's default, which the models were trained with
cdef double LAYER_NORM_EPS = 1e-5

VECTOR_NAMES = (
    "ln1_weight", "ln1_bias", "ln2_weight", "ln2_bias",
    "att_time_mix_k", "att_time_mix_v", "att_time_mix_r", "att_time_first", "att_time_decay",
    "ffn_time_mix_k", "ffn_time_mix_r",
)
LINEAR_NAMES = (
    "att_key", "att_value", "att_receptance", "att_output",
    "ffn_key", "ffn_receptance", "ffn_value",
)


cdef inline float _sigmoid(float x) noexcept nogil:
    return 1.0 / (1.0 + expf(-x))


cdef void _layer_norm(float* out, const float* x, const float* w, const float* b,
                      Py_ssize_t n) noexcept nogil:
    # out = (x - mean(x)) / sqrt(var(x) + eps) * w + b; statistics in double because
    # float32 sums of n_embd terms would lose digits the reference keeps.
    cdef Py_ssize_t j
    cdef double mean = 0.0, var = 0.0, d
    for j in range(n):
        mean += x[j]
    mean /= n
    for j in range(n):
        d = x[j] - mean
        var += d * d
    var /= n
    cdef double inv = 1.0 / sqrt(var + LAYER_NORM_EPS)
    for j in range(n):
        out[j] = <float>((x[j] - mean) * inv) * w[j] + b[j]


cdef inline void _token_shift(float* out, const float* xx, const float* sx, const float* mix,
                              Py_ssize_t n) noexcept nogil:
    # out = xx * mix + sx * (1 - mix): this token blended with the previous one
    cdef Py_ssize_t j
    for j in range(n):
        out[j] = xx[j] * mix[j] + sx[j] * (1.0 - mix[j])


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
    cdef float* scratch     # (max(n_embd, n_ffn),) for uint8 products
    cdef float* buffer
    cdef readonly Py_ssize_t n_embd, n_ffn

    def __cinit__(self, Py_ssize_t n_embd, Py_ssize_t n_ffn):
        if n_embd < 1 or n_ffn < 1:
            raise RwkvxError(f"Workspace: expected positive sizes, got n_embd={n_embd}, n_ffn={n_ffn}")
        self.n_embd = n_embd
        self.n_ffn = n_ffn
        cdef Py_ssize_t wide = max(n_embd, n_ffn)
        self.buffer = <float*>malloc((9 * n_embd + n_ffn + wide) * sizeof(float))
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

    def forward(self, float[::1] x, float[:, ::1] state, Workspace ws, int n_threads):
        """Move one token through this layer.

        x: (n_embd,) float32, the residual stream, updated in place.
        state: (5, n_embd) float32, this layer's state, updated in place.
        """
        if x.shape[0] != self.n_embd or state.shape[0] != 5 or state.shape[1] != self.n_embd:
            raise RwkvxError(f"Block.forward: expected x ({self.n_embd},) and state (5, {self.n_embd}), "
                             f"got ({x.shape[0]},) and ({state.shape[0]}, {state.shape[1]})")
        if ws.n_embd != self.n_embd or ws.n_ffn != self.n_ffn:
            raise RwkvxError("Block.forward: workspace sized for another model")
        if n_threads < 1:
            raise RwkvxError(f"n_threads: expected >= 1, got {n_threads}")
        with nogil:
            self._time_mixing(&x[0], &state[0, 0], ws, n_threads)
            self._channel_mixing(&x[0], &state[0, 0], ws, n_threads)

    cdef void _time_mixing(self, float* x, float* state, Workspace ws, int n_threads) noexcept nogil:
        cdef Py_ssize_t j, n = self.n_embd
        cdef float* sx = state + ATT_XX * n
        cdef float* aa = state + ATT_AA * n
        cdef float* bb = state + ATT_BB * n
        cdef float* pp = state + ATT_PP * n
        cdef float ww, p, e1, e2, kj, vj, wkv
        _layer_norm(ws.xx, x, self.ln1_w, self.ln1_b, n)
        _token_shift(ws.xk, ws.xx, sx, self.att_mix_k, n)
        _token_shift(ws.xv, ws.xx, sx, self.att_mix_v, n)
        _token_shift(ws.xr, ws.xx, sx, self.att_mix_r, n)
        for j in range(n):
            sx[j] = ws.xx[j]
        # k = kw @ xk; v = vw @ xv; r = sigmoid(rw @ xr)
        _matvec(ws.k, &self.att_key, ws.xk, ws.scratch, n_threads)
        _matvec(ws.v, &self.att_value, ws.xv, ws.scratch, n_threads)
        _matvec(ws.r, &self.att_receptance, ws.xr, ws.scratch, n_threads)
        for j in range(n):
            kj = ws.k[j]
            vj = ws.v[j]
            # wkv = (e^pp aa + e^(u+k) v) / (e^pp bb + e^(u+k)), scaled by e^-max to stay finite
            ww = self.att_first[j] + kj
            p = pp[j] if pp[j] > ww else ww
            e1 = expf(pp[j] - p)
            e2 = expf(ww - p)
            wkv = (e1 * aa[j] + e2 * vj) / (e1 * bb[j] + e2)
            # decay the state by e^w (w = -exp(time_decay)) and add this token
            ww = pp[j] + self.att_decay[j]
            p = ww if ww > kj else kj
            e1 = expf(ww - p)
            e2 = expf(kj - p)
            aa[j] = e1 * aa[j] + e2 * vj
            bb[j] = e1 * bb[j] + e2
            pp[j] = p
            ws.rwkv[j] = _sigmoid(ws.r[j]) * wkv
        # x += ow @ (r * wkv)
        _matvec(ws.out, &self.att_output, ws.rwkv, ws.scratch, n_threads)
        for j in range(n):
            x[j] += ws.out[j]

    cdef void _channel_mixing(self, float* x, float* state, Workspace ws, int n_threads) noexcept nogil:
        cdef Py_ssize_t j, n = self.n_embd
        cdef float* sx = state + FFN_XX * n
        cdef float kf
        _layer_norm(ws.xx, x, self.ln2_w, self.ln2_b, n)
        _token_shift(ws.xk, ws.xx, sx, self.ffn_mix_k, n)
        _token_shift(ws.xr, ws.xx, sx, self.ffn_mix_r, n)
        for j in range(n):
            sx[j] = ws.xx[j]
        # r = sigmoid(rw @ xr); k = relu(kw @ xk)^2; x += r * (vw @ k)
        _matvec(ws.r, &self.ffn_receptance, ws.xr, ws.scratch, n_threads)
        _matvec(ws.kf, &self.ffn_key, ws.xk, ws.scratch, n_threads)
        for j in range(self.n_ffn):
            kf = ws.kf[j] if ws.kf[j] > 0 else 0
            ws.kf[j] = kf * kf
        _matvec(ws.out, &self.ffn_value, ws.kf, ws.scratch, n_threads)
        for j in range(n):
            x[j] += _sigmoid(ws.r[j]) * ws.out[j]


def layer_norm(const float[::1] x, const float[::1] weight, const float[::1] bias, float[::1] out):
    """Write layer_norm(x) * weight + bias into out; all (n,) float32."""
    cdef Py_ssize_t n = x.shape[0]
    if weight.shape[0] != n or bias.shape[0] != n or out.shape[0] != n or n == 0:
        raise RwkvxError(f"layer_norm: expected four equal non-empty lengths, got x ({n},), "
                         f"weight ({weight.shape[0]},), bias ({bias.shape[0]},), out ({out.shape[0]},)")
    with nogil:
        _layer_norm(&out[0], &x[0], &weight[0], &bias[0], n)
