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
from libc.math cimport sqrt
from libc.stdlib cimport free, malloc

from rwkvx.errors import RwkvxError


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


cdef void _wkv5_head(Py_ssize_t h, Py_ssize_t T, Py_ssize_t H, Py_ssize_t N,
                     const float* r, const float* k, const float* v, const float* w, Py_ssize_t w_step,
                     const float* u, const float* ln_w, const float* ln_b, const float* g,
                     double eps, float* S, float* y, float* out) noexcept nogil:
    # per token, for keys i and values j of head h:
    #   y[j] = sum_i r[i] (u[i] k[i] v[j] + S[i, j]);  S[i, j] = w[i] S[i, j] + k[i] v[j]
    cdef Py_ssize_t C = H * N, t, i, j, row
    cdef float* s = S + h * N * N
    cdef float* yt
    cdef const float* vt
    cdef float ri, ki, wi, ui, kv
    for t in range(T):
        row = t * C + h * N
        yt = y + row
        vt = v + row
        for j in range(N):
            yt[j] = 0.0
        for i in range(N):
            ri = r[row + i]
            ki = k[row + i]
            wi = w[t * w_step + h * N + i]
            ui = u[h * N + i]
            for j in range(N):
                kv = ki * vt[j]
                yt[j] = yt[j] + ri * (ui * kv + s[i * N + j])
                s[i * N + j] = s[i * N + j] * wi + kv
        _group_norm_gate(out + row, yt, ln_w + h * N, ln_b + h * N, g + row, N, eps)


cdef inline float _dot(const float* a, const float* b, Py_ssize_t n) noexcept nogil:
    # four partial sums: breaks the add chain (no -ffast-math to reassociate for us)
    cdef float s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0
    cdef Py_ssize_t j = 0
    while j + 4 <= n:
        s0 = s0 + a[j] * b[j]
        s1 = s1 + a[j + 1] * b[j + 1]
        s2 = s2 + a[j + 2] * b[j + 2]
        s3 = s3 + a[j + 3] * b[j + 3]
        j += 4
    while j < n:
        s0 = s0 + a[j] * b[j]
        j += 1
    return (s0 + s1) + (s2 + s3)


cdef void _wkv7_head(Py_ssize_t h, Py_ssize_t T, Py_ssize_t H, Py_ssize_t N,
                     const float* r, const float* w, const float* k, const float* v,
                     const float* kk, const float* b, const float* r_k,
                     const float* ln_w, const float* ln_b, const float* g,
                     double eps, float* S, float* y, float* out) noexcept nogil:
    # per token, for values i and keys j of head h (S = S diag(w) + (S (-kk)) b^T + v k^T):
    #   S[i, j] = S[i, j] w[j] - (S[i, :] . kk) b[j] + v[i] k[j];  y[i] = S[i, :] . r
    # then out = (group_norm(y) + (r . (k * r_k)) v) * g
    cdef Py_ssize_t C = H * N, t, i, j, row
    cdef float* s = S + h * N * N
    cdef float* si
    cdef float sa, vi, bonus
    for t in range(T):
        row = t * C + h * N
        for i in range(N):
            si = s + i * N
            sa = _dot(si, kk + row, N)
            vi = v[row + i]
            for j in range(N):
                si[j] = si[j] * w[row + j] - sa * b[row + j] + vi * k[row + j]
            y[row + i] = _dot(si, r + row, N)
        bonus = 0.0
        for j in range(N):
            bonus = bonus + r[row + j] * k[row + j] * r_k[h * N + j]
        _group_norm_gate(out + row, y + row, ln_w + h * N, ln_b + h * N, g + row, N, eps)
        for i in range(N):
            out[row + i] = out[row + i] + bonus * v[row + i] * g[row + i]


cdef void _wkv5(const Py_ssize_t* starts, Py_ssize_t B, Py_ssize_t H, Py_ssize_t N, const float* r,
                const float* k, const float* v, const float* w, Py_ssize_t w_step, const float* u,
                const float* ln_w, const float* ln_b, const float* g, double eps, float** S, float* y,
                float* out, int n_threads) noexcept nogil:
    # sequence b is rows starts[b]..starts[b+1] with state S[b]; one task per (sequence, head)
    cdef Py_ssize_t task, b, C = H * N, row
    for task in prange(B * H, schedule="static", num_threads=n_threads):
        b = task // H
        row = starts[b] * C
        _wkv5_head(task % H, starts[b + 1] - starts[b], H, N, r + row, k + row, v + row,
                   w + starts[b] * w_step, w_step, u, ln_w, ln_b, g + row, eps, S[b], y + row, out + row)


cdef void _wkv7(const Py_ssize_t* starts, Py_ssize_t B, Py_ssize_t H, Py_ssize_t N, const float* r,
                const float* w, const float* k, const float* v, const float* kk, const float* b,
                const float* r_k, const float* ln_w, const float* ln_b, const float* g, double eps,
                float** S, float* y, float* out, int n_threads) noexcept nogil:
    cdef Py_ssize_t task, seq, C = H * N, row
    for task in prange(B * H, schedule="static", num_threads=n_threads):
        seq = task // H
        row = starts[seq] * C
        _wkv7_head(task % H, starts[seq + 1] - starts[seq], H, N, r + row, w + row, k + row, v + row,
                   kk + row, b + row, r_k, ln_w, ln_b, g + row, eps, S[seq], y + row, out + row)


def _check(name, Py_ssize_t rows, Py_ssize_t cols, Py_ssize_t T, Py_ssize_t C):
    if rows != T or cols != C:
        raise RwkvxError(f"{name}: expected ({T}, {C}), got ({rows}, {cols})")


cdef float** _state_pointers(list states, Py_ssize_t H, Py_ssize_t N, views) except NULL:
    # each sequence's (H, N, N) state block, C-contiguous; views keeps them alive
    cdef Py_ssize_t B = len(states), b
    cdef float[:, :, ::1] S
    cdef float** ptrs = <float**>malloc(max(B, 1) * sizeof(float*))
    if ptrs == NULL:
        raise MemoryError()
    for b in range(B):
        try:
            S = states[b]
        except (TypeError, ValueError):
            free(ptrs)
            raise RwkvxError(f"state {b}: expected a C-contiguous float32 ({H}, {N}, {N}) array") from None
        if S.shape[0] != H or S.shape[1] != N or S.shape[2] != N:
            free(ptrs)
            raise RwkvxError(f"state {b}: expected ({H}, {N}, {N}), got ({S.shape[0]}, {S.shape[1]}, {S.shape[2]})")
        views.append(S)
        ptrs[b] = &S[0, 0, 0]
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
         list states, const Py_ssize_t[::1] starts, float[:, ::1] out, *, double eps, int n_threads=1):
    """RWKV-5.2/6 WKV for the rows of several sequences, then out = group_norm(y) * g.

    Sequence b is rows starts[b]..starts[b+1] (tokens in order), its state states[b]: (H, N, N)
    keys x values, updated. r, k, v, g, out: (R, C); w: the decay factors, (R, C) per token
    (RWKV-6) or (1, C) for every token (RWKV-5.2); u (bonus), ln_w, ln_b: (C,).
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
    if n_threads < 1:
        raise RwkvxError(f"n_threads: expected >= 1, got {n_threads}")
    _check_starts(starts, B, R)
    if R == 0:
        return
    views = []
    cdef float** S = _state_pointers(states, H, N, views)
    cdef float[:, ::1] y = out.copy()
    cdef Py_ssize_t w_step = 0 if w.shape[0] == 1 else C
    try:
        with nogil:
            _wkv5(&starts[0], B, H, N, &r[0, 0], &k[0, 0], &v[0, 0], &w[0, 0], w_step, &u[0], &ln_w[0],
                  &ln_b[0], &g[0, 0], eps, S, &y[0, 0], &out[0, 0], n_threads)
    finally:
        free(S)


def wkv7(const float[:, ::1] r, const float[:, ::1] w, const float[:, ::1] k, const float[:, ::1] v,
         const float[:, ::1] kk, const float[:, ::1] b, const float[::1] r_k, const float[::1] ln_w,
         const float[::1] ln_b, const float[:, ::1] g, list states, const Py_ssize_t[::1] starts,
         float[:, ::1] out, *, double eps, int n_threads=1):
    """RWKV-7 WKV for the rows of several sequences, then out = (group_norm(y) + (r . k r_k) v) * g
    per head.

    Sequence b is rows starts[b]..starts[b+1], its state states[b]: (H, N, N) values x keys,
    updated. r, w (decay factors), k, v, kk (normalised removal key), b (kk * a), g, out:
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
    if n_threads < 1:
        raise RwkvxError(f"n_threads: expected >= 1, got {n_threads}")
    _check_starts(starts, B, R)
    if R == 0:
        return
    views = []
    cdef float** S = _state_pointers(states, H, N, views)
    cdef float[:, ::1] y = out.copy()
    try:
        with nogil:
            _wkv7(&starts[0], B, H, N, &r[0, 0], &w[0, 0], &k[0, 0], &v[0, 0], &kk[0, 0], &b[0, 0], &r_k[0],
                  &ln_w[0], &ln_b[0], &g[0, 0], eps, S, &y[0, 0], &out[0, 0], n_threads)
    finally:
        free(S)
