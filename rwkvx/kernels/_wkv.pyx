"""The WKV recurrences of RWKV-5.2/6 and RWKV-7, fused with what follows them in a layer:
the group norm over heads (ln_x), RWKV-7's bonus term and the gate.

Heads are independent: the kernels run a prange over heads and step each head's tokens in
order on one thread, with no shared accumulator, so the results are the same bits for every
thread count and for any split of the tokens into calls. float32 arithmetic; the group
norm's mean and variance are accumulated in double (N values per head).

Shapes: C = H * N. Rows r, k, v, ... are (R, C) float32 C-contiguous: the tokens of one or
more sequences (forward_batch), sequence b being rows starts[b]..starts[b+1]. Each sequence's
state S is the (H, N, N) block of its layer state (rows WKV.. of rwkvx.arch.common), updated
in place.
"""
from cython.parallel import prange
from libc.math cimport expf, sqrt, tanhf
from libc.stdlib cimport free, malloc
from rwkvx.kernels._parallel cimport kernel_threads  # fewer threads while other programs contend for the cores

from rwkvx.kernels._matvec import simd_level
from rwkvx.errors import RwkvxError

cdef extern from "_elementwise.h" nogil:
    void rwkvx_silu(float* x, Py_ssize_t n)
    void rwkvx_v6_decay(float* w, const float* time_decay, Py_ssize_t n)
    void rwkvx_add_gated(Py_ssize_t n, float* x, const float* r, const float* y)
    void rwkvx_v7_gates(Py_ssize_t n, float* w, float* k, float* v, const float* a_lora, const float* v_lora,
                        const float* v_first, const float* w0, const float* a0, const float* v0, const float* k_a,
                        float decay_scale, const float* kk, float* b)

cdef extern from "_wkv.h":
    void rwkvx_wkv5_token(int level, Py_ssize_t N, const float* src, float* s, const float* r, const float* k,
                          const float* v, const float* w, const float* u, float* y) noexcept nogil
    void rwkvx_wkv7_token(int level, Py_ssize_t N, const float* src, float* s, const float* r, const float* w,
                          const float* k, const float* v, const float* kk, const float* b, float* y) noexcept nogil


cdef inline void _group_norm_gate(float* out, const float* y, const float* w, const float* b,
                                  const float* g, Py_ssize_t n, double eps) noexcept nogil:
    # out = ((y - mean) / sqrt(var + eps) * w + b) * g over one head's n channels
    cdef double mean = 0.0, var = 0.0, d, inv
    cdef Py_ssize_t i
    for i in range(n):
        mean += y[i]
    mean /= n
    for i in range(n):
        d = y[i] - mean
        var += d * d
    inv = 1.0 / sqrt(var / n + eps)
    for i in range(n):
        out[i] = (<float>((y[i] - mean) * inv) * w[i] + b[i]) * g[i]


cdef void _wkv5_head(int level, Py_ssize_t h, Py_ssize_t T, Py_ssize_t H, Py_ssize_t N,
                     const float* r, const float* k, const float* v, const float* w, Py_ssize_t w_step,
                     const float* u, const float* ln_w, const float* ln_b, const float* g,
                     double eps, const float* S_in, float* S, float* y, float* out) noexcept nogil:
    # per token, for keys i and values j of head h (rwkvx_wkv5_token in _wkv.h):
    #   y[j] = sum_i r[i] (u[i] k[i] v[j] + S[i, j]);  S[i, j] = w[i] S[i, j] + k[i] v[j]
    # The first token reads S_in and writes S (the state passed in stays as it was; they may
    # be the same memory), later tokens update S.
    cdef Py_ssize_t C = H * N, t, row
    cdef float* s = S + h * N * N
    cdef const float* src = S_in + h * N * N
    for t in range(T):
        row = t * C + h * N
        rwkvx_wkv5_token(level, N, src, s, r + row, k + row, v + row, w + t * w_step + h * N, u + h * N, y + row)
        src = s
        _group_norm_gate(out + row, y + row, ln_w + h * N, ln_b + h * N, g + row, N, eps)


cdef void _wkv7_head(int level, Py_ssize_t h, Py_ssize_t T, Py_ssize_t H, Py_ssize_t N,
                     const float* r, const float* w, const float* k, const float* v,
                     const float* kk, const float* b, const float* r_k,
                     const float* ln_w, const float* ln_b, const float* g,
                     double eps, const float* S_in, float* S, float* y, float* out) noexcept nogil:
    # per token, for values i and keys j of head h (S = S diag(w) + (S (-kk)) b^T + v k^T;
    # rwkvx_wkv7_token in _wkv.h):
    #   S[i, j] = S[i, j] w[j] - (S[i, :] . kk) b[j] + v[i] k[j];  y[i] = S[i, :] . r
    # then out = (group_norm(y) + (r . (k * r_k)) v) * g. The first token reads S_in (as wkv5).
    cdef Py_ssize_t C = H * N, t, i, j, row
    cdef float* s = S + h * N * N
    cdef const float* src = S_in + h * N * N
    cdef float bonus
    for t in range(T):
        row = t * C + h * N
        rwkvx_wkv7_token(level, N, src, s, r + row, w + row, k + row, v + row, kk + row, b + row, y + row)
        src = s
        bonus = 0.0
        for j in range(N):
            bonus = bonus + r[row + j] * k[row + j] * r_k[h * N + j]
        _group_norm_gate(out + row, y + row, ln_w + h * N, ln_b + h * N, g + row, N, eps)
        for i in range(N):
            out[row + i] = out[row + i] + bonus * v[row + i] * g[row + i]


cdef void _wkv5(int level, const Py_ssize_t* starts, Py_ssize_t B, Py_ssize_t H, Py_ssize_t N, const float* r,
                const float* k, const float* v, const float* w, Py_ssize_t w_step, const float* u,
                const float* ln_w, const float* ln_b, const float* g, double eps, const float** S_in, float** S,
                float* y, float* out, int n_threads) noexcept nogil:
    # sequence b is rows starts[b]..starts[b+1] with state S[b]; one task per (sequence, head)
    cdef Py_ssize_t task, b, C = H * N, row
    for task in prange(B * H, schedule="static", num_threads=n_threads):
        b = task // H
        row = starts[b] * C
        _wkv5_head(level, task % H, starts[b + 1] - starts[b], H, N, r + row, k + row, v + row,
                   w + starts[b] * w_step, w_step, u, ln_w, ln_b, g + row, eps, S_in[b], S[b], y + row, out + row)


cdef void _wkv7(int level, const Py_ssize_t* starts, Py_ssize_t B, Py_ssize_t H, Py_ssize_t N, const float* r,
                const float* w, const float* k, const float* v, const float* kk, const float* b,
                const float* r_k, const float* ln_w, const float* ln_b, const float* g, double eps,
                const float** S_in, float** S, float* y, float* out, int n_threads) noexcept nogil:
    cdef Py_ssize_t task, seq, C = H * N, row
    for task in prange(B * H, schedule="static", num_threads=n_threads):
        seq = task // H
        row = starts[seq] * C
        _wkv7_head(level, task % H, starts[seq + 1] - starts[seq], H, N, r + row, w + row, k + row, v + row,
                   kk + row, b + row, r_k, ln_w, ln_b, g + row, eps, S_in[seq], S[seq], y + row, out + row)


def _check(name, Py_ssize_t rows, Py_ssize_t cols, Py_ssize_t T, Py_ssize_t C):
    if rows != T or cols != C:
        raise RwkvxError(f"{name}: expected ({T}, {C}), got ({rows}, {cols})")


cdef float** _state_pointers(list states, list sources, Py_ssize_t H, Py_ssize_t N, views) except NULL:
    # each sequence's (H, N, N) state block, C-contiguous, written (first B pointers) and read
    # at the first token (the next B: sources, or the states themselves); views keeps them alive
    cdef Py_ssize_t B = len(states), b
    cdef float[:, :, ::1] S
    cdef const float[:, :, ::1] S_in
    if sources is not None and len(sources) != B:
        raise RwkvxError(f"sources: expected {B} states, got {len(sources)}")
    cdef float** ptrs = <float**>malloc(max(2 * B, 1) * sizeof(float*))
    if ptrs == NULL:
        raise MemoryError()
    for b in range(B):
        try:
            S = states[b]
            S_in = states[b] if sources is None else sources[b]
        except (TypeError, ValueError):
            free(ptrs)
            raise RwkvxError(f"state {b}: expected a C-contiguous float32 ({H}, {N}, {N}) array") from None
        for shape in ((S.shape[0], S.shape[1], S.shape[2]), (S_in.shape[0], S_in.shape[1], S_in.shape[2])):
            if shape != (H, N, N):
                free(ptrs)
                raise RwkvxError(f"state {b}: expected ({H}, {N}, {N}), got {shape}")
        views.append((S, S_in))
        ptrs[b] = &S[0, 0, 0]
        ptrs[B + b] = <float*>&S_in[0, 0, 0]
    return ptrs


def _check_starts(const Py_ssize_t[::1] starts, Py_ssize_t n_states, Py_ssize_t n_rows):
    cdef Py_ssize_t b
    if starts.shape[0] != n_states + 1 or starts[0] != 0 or starts[n_states] != n_rows:
        raise RwkvxError(f"starts: expected {n_states + 1} offsets from 0 to {n_rows}")
    for b in range(n_states):
        if starts[b + 1] < starts[b]:
            raise RwkvxError("starts: offsets must not decrease")


def wkv5(const float[:, ::1] r, const float[:, ::1] k, const float[:, ::1] v, const float[:, ::1] w,
         const float[::1] u, const float[::1] ln_w, const float[::1] ln_b, const float[:, ::1] g,
         list states, const Py_ssize_t[::1] starts, float[:, ::1] out, *, double eps, int n_threads=1,
         list sources=None):
    """RWKV-5.2/6 WKV for the rows of several sequences, then out = group_norm(y) * g.

    Sequence b is rows starts[b]..starts[b+1] (tokens in order), its state states[b]: (H, N, N)
    keys x values, updated; with sources, the state before the first token is read from
    sources[b] instead (which is left unchanged: no separate copy of the state is needed).
    r, k, v, g, out: (R, C); w: the decay factors, (R, C) per token (RWKV-6) or (1, C) for
    every token (RWKV-5.2); u (bonus), ln_w, ln_b: (C,).
    """
    cdef Py_ssize_t R = r.shape[0], C = r.shape[1], B = len(states)
    cdef Py_ssize_t H = states[0].shape[0] if B else 1
    cdef Py_ssize_t N = C // H if H else 0
    if H * N != C or N == 0:
        raise RwkvxError(f"wkv5: {H} heads do not divide r's {C} columns")
    for name, a in (("k", k), ("v", v), ("g", g), ("out", out)):
        _check(name, a.shape[0], a.shape[1], R, C)
    if w.shape[1] != C or w.shape[0] not in (1, R):
        raise RwkvxError(f"wkv5: w: expected (1, {C}) or ({R}, {C}), got ({w.shape[0]}, {w.shape[1]})")
    if u.shape[0] != C or ln_w.shape[0] != C or ln_b.shape[0] != C:
        raise RwkvxError(f"wkv5: u, ln_w, ln_b: expected ({C},)")
    n_threads = kernel_threads(n_threads)
    cdef int level = simd_level()
    _check_starts(starts, B, R)
    if R == 0:
        return
    views = []
    cdef float** S = _state_pointers(states, sources, H, N, views)
    cdef float[:, ::1] y = out.copy()
    cdef Py_ssize_t w_step = 0 if w.shape[0] == 1 else C
    try:
        with nogil:
            _wkv5(level, &starts[0], B, H, N, &r[0, 0], &k[0, 0], &v[0, 0], &w[0, 0], w_step, &u[0], &ln_w[0],
                  &ln_b[0], &g[0, 0], eps, <const float**>(S + B), S, &y[0, 0], &out[0, 0], n_threads)
    finally:
        free(S)


def wkv7(const float[:, ::1] r, const float[:, ::1] w, const float[:, ::1] k, const float[:, ::1] v,
         const float[:, ::1] kk, const float[:, ::1] b, const float[::1] r_k, const float[::1] ln_w,
         const float[::1] ln_b, const float[:, ::1] g, list states, const Py_ssize_t[::1] starts,
         float[:, ::1] out, *, double eps, int n_threads=1, list sources=None):
    """RWKV-7 WKV for the rows of several sequences, then out = (group_norm(y) + (r . k r_k) v) * g
    per head.

    Sequence b is rows starts[b]..starts[b+1], its state states[b]: (H, N, N) values x keys,
    updated; sources as for wkv5. r, w (decay factors), k, v, kk (normalised removal key), b (kk * a), g, out:
    (R, C); r_k, ln_w, ln_b: (C,).
    """
    cdef Py_ssize_t R = r.shape[0], C = r.shape[1], B = len(states)
    cdef Py_ssize_t H = states[0].shape[0] if B else 1
    cdef Py_ssize_t N = C // H if H else 0
    if H * N != C or N == 0:
        raise RwkvxError(f"wkv7: {H} heads do not divide r's {C} columns")
    for name, a in (("w", w), ("k", k), ("v", v), ("kk", kk), ("b", b), ("g", g), ("out", out)):
        _check(name, a.shape[0], a.shape[1], R, C)
    if r_k.shape[0] != C or ln_w.shape[0] != C or ln_b.shape[0] != C:
        raise RwkvxError(f"wkv7: r_k, ln_w, ln_b: expected ({C},)")
    n_threads = kernel_threads(n_threads)
    cdef int level = simd_level()
    _check_starts(starts, B, R)
    if R == 0:
        return
    views = []
    cdef float** S = _state_pointers(states, sources, H, N, views)
    cdef float[:, ::1] y = out.copy()
    try:
        with nogil:
            _wkv7(level, &starts[0], B, H, N, &r[0, 0], &w[0, 0], &k[0, 0], &v[0, 0], &kk[0, 0], &b[0, 0], &r_k[0],
                  &ln_w[0], &ln_b[0], &g[0, 0], eps, <const float**>(S + B), S, &y[0, 0], &out[0, 0], n_threads)
    finally:
        free(S)


# ---- the elementwise work around the recurrence (row by row: any split of rows gives the
# same bits) ----

cdef void _mix_rows(Py_ssize_t T, Py_ssize_t C, Py_ssize_t M, const float* x, const float* prev,
                    const float* mix, float* out, int n_threads) noexcept nogil:
    # out[m, t] = x[t] + (prev[t] - x[t]) * mix[m]; columns innermost, so the loop vectorises
    # (with the mixes innermost it ran a float at a time: 1.5% of an RWKV-7 prompt)
    cdef Py_ssize_t m, t, j
    cdef const float* xt
    cdef const float* pt
    cdef const float* mm
    cdef float* o
    for t in prange(T, schedule="static", num_threads=n_threads):
        xt = x + t * C
        pt = prev + t * C
        for m in range(M):
            o = out + (m * T + t) * C
            mm = mix + m * C
            for j in range(C):
                o[j] = xt[j] + (pt[j] - xt[j]) * mm[j]


def mix_rows(const float[:, ::1] x, const float[:, ::1] prev, const float[:, ::1] mix, float[:, :, ::1] out,
             int n_threads=1):
    """Token-shift mixes: out[m, t] = x[t] + (prev[t] - x[t]) * mix[m].

    x, prev: (T, C); mix: (M, C); out: (M, T, C).
    """
    cdef Py_ssize_t T = x.shape[0], C = x.shape[1], M = mix.shape[0]
    if prev.shape[0] != T or prev.shape[1] != C or mix.shape[1] != C or out.shape[0] != M \
            or out.shape[1] != T or out.shape[2] != C:
        raise RwkvxError(f"mix_rows: x ({T}, {C}), prev ({prev.shape[0]}, {prev.shape[1]}), mix ({M}, "
                         f"{mix.shape[1]}), out ({out.shape[0]}, {out.shape[1]}, {out.shape[2]})")
    n_threads = kernel_threads(n_threads) if T > 1 else 1
    if T == 0 or C == 0 or M == 0:
        return
    with nogil:
        _mix_rows(T, C, M, &x[0, 0], &prev[0, 0], &mix[0, 0], &out[0, 0, 0], n_threads)


cdef inline float _sigmoid(float x) noexcept nogil:
    return 1.0 / (1.0 + expf(-x))


cdef void _lora_act(Py_ssize_t n_tanh, float* t, Py_ssize_t n_sigmoid, float* s) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n_tanh):
        t[i] = tanhf(t[i])
    for i in range(n_sigmoid):
        s[i] = _sigmoid(s[i])


def lora_act(float[:, ::1] t, float[:, ::1] s):
    """RWKV-7's low-rank activations in place: t = tanh(t) (the decay's), s = sigmoid(s) (the
    gate's); in C so that one token (rwkvx.kernels._step) and many get the same bits."""
    with nogil:
        if t.shape[0] and t.shape[1]:
            _lora_act(t.shape[0] * t.shape[1], &t[0, 0], 0, NULL)
        if s.shape[0] and s.shape[1]:
            _lora_act(0, NULL, s.shape[0] * s.shape[1], &s[0, 0])


def silu_rows(float[:, ::1] x):
    """x = x * sigmoid(x) in place, row by row (RWKV-5/6's gate)."""
    cdef Py_ssize_t t
    with nogil:
        for t in range(x.shape[0]):
            rwkvx_silu(&x[t, 0], x.shape[1])


def add_gated_rows(float[:, ::1] x, const float[:, ::1] r, const float[:, ::1] y):
    """x += sigmoid(r) * y in place, row by row (the channel mixing's gated residual)."""
    cdef Py_ssize_t t
    if r.shape[0] != x.shape[0] or y.shape[0] != x.shape[0] or r.shape[1] != x.shape[1] or y.shape[1] != x.shape[1]:
        raise RwkvxError(f"add_gated_rows: x, r, y: expected the same shape, got ({x.shape[0]}, {x.shape[1]}), "
                         f"({r.shape[0]}, {r.shape[1]}), ({y.shape[0]}, {y.shape[1]})")
    with nogil:
        for t in range(x.shape[0]):
            rwkvx_add_gated(x.shape[1], &x[t, 0], &r[t, 0], &y[t, 0])


def v6_decay_rows(float[:, ::1] w, const float[::1] time_decay):
    """RWKV-6's decay factors in place, row by row: w = exp(-exp(time_decay + w))."""
    cdef Py_ssize_t t
    if time_decay.shape[0] != w.shape[1]:
        raise RwkvxError(f"v6_decay_rows: time_decay: expected ({w.shape[1]},), got ({time_decay.shape[0]},)")
    with nogil:
        for t in range(w.shape[0]):
            rwkvx_v6_decay(&w[t, 0], &time_decay[0], w.shape[1])


cdef void _v7_prepare_row(Py_ssize_t t, Py_ssize_t H, Py_ssize_t N, float* w, float* k, float* v,
                          const float* a_lora, const float* v_lora, const float* v_first, const float* w0,
                          const float* a0, const float* v0, const float* k_k, const float* k_a, float decay_scale,
                          float* kk, float* b) noexcept nogil:
    cdef Py_ssize_t C = H * N, h, j, i
    cdef double ss
    cdef float a, norm
    for h in range(H):
        # kk = normalize(k * k_k) within the head (as F.normalize: / max(|.|, 1e-12))
        ss = 0.0
        for j in range(N):
            i = t * C + h * N + j
            kk[i] = k[i] * k_k[h * N + j]
            ss += <double>kk[i] * kk[i]
        norm = <float>sqrt(ss)
        if norm < 1e-12:
            norm = 1e-12
        for j in range(N):
            kk[t * C + h * N + j] = kk[t * C + h * N + j] / norm
    rwkvx_v7_gates(C, w + t * C, k + t * C, v + t * C, a_lora + t * C, NULL if v_lora == NULL else v_lora + t * C,
                   NULL if v_lora == NULL else v_first + t * C, w0, a0, v0, k_a, decay_scale, kk + t * C, b + t * C)


cdef void _v7_prepare(Py_ssize_t T, Py_ssize_t H, Py_ssize_t N, float* w, float* k, float* v, const float* a_lora,
                      const float* v_lora, const float* v_first, const float* w0, const float* a0, const float* v0,
                      const float* k_k, const float* k_a, float decay_scale, float* kk, float* b,
                      int n_threads) noexcept nogil:
    # row by row: any split of the rows between threads gives the same bits
    cdef Py_ssize_t t
    for t in prange(T, schedule="static", num_threads=n_threads):
        _v7_prepare_row(t, H, N, w, k, v, a_lora, v_lora, v_first, w0, a0, v0, k_k, k_a, decay_scale, kk, b)


def v7_prepare(float[:, ::1] w, float[:, ::1] k, float[:, ::1] v, const float[:, ::1] a_lora, v_lora, v_first,
               const float[::1] w0, const float[::1] a0, v0, const float[::1] k_k, const float[::1] k_a,
               float[:, ::1] kk, float[:, ::1] b, *, int n_head, float decay_scale, int n_threads=1):
    """RWKV-7's inputs to the recurrence from its projections, row by row, in place:

        a = sigmoid(a0 + a_lora);  w = exp(-decay_scale * sigmoid(w0 + w))
        kk = normalize(k * k_k) per head;  b = kk * a;  k = k * (1 + (a - 1) * k_a)
        v = v + (v_first - v) * sigmoid(v0 + v_lora)     (not in layer 0: v_lora None)

    w, k, v, a_lora, v_lora, v_first, kk, b: (T, C); w0, a0, v0, k_k, k_a: (C,).
    """
    cdef Py_ssize_t T = w.shape[0], C = w.shape[1], H = n_head
    cdef const float[:, ::1] vl, vf
    cdef const float[::1] v0v
    cdef const float* vl_p = NULL
    cdef const float* vf_p = NULL
    cdef const float* v0_p = NULL
    if H < 1 or C % H:
        raise RwkvxError(f"v7_prepare: {H} heads do not divide {C} channels")
    for name, a in (("k", k), ("v", v), ("a_lora", a_lora), ("kk", kk), ("b", b)):
        _check(name, a.shape[0], a.shape[1], T, C)
    for name, a in (("w0", w0), ("a0", a0), ("k_k", k_k), ("k_a", k_a)):
        if a.shape[0] != C:
            raise RwkvxError(f"v7_prepare: {name}: expected ({C},), got ({a.shape[0]},)")
    if v_lora is not None:
        vl, vf, v0v = v_lora, v_first, v0
        _check("v_lora", vl.shape[0], vl.shape[1], T, C)
        _check("v_first", vf.shape[0], vf.shape[1], T, C)
        if v0v.shape[0] != C:
            raise RwkvxError(f"v7_prepare: v0: expected ({C},), got ({v0v.shape[0]},)")
        if T:
            vl_p, vf_p, v0_p = &vl[0, 0], &vf[0, 0], &v0v[0]
    n_threads = kernel_threads(n_threads) if T > 1 else 1
    if T == 0 or C == 0:
        return
    with nogil:
        _v7_prepare(T, H, C // H, &w[0, 0], &k[0, 0], &v[0, 0], &a_lora[0, 0], vl_p, vf_p, &w0[0], &a0[0], v0_p,
                    &k_k[0], &k_a[0], decay_scale, &kk[0, 0], &b[0, 0], n_threads)
