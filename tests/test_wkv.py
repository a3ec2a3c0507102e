"""The compiled WKV kernels (rwkvx.kernels._wkv) against the float64 specification of rwkvx.arch,
and the grouped matrix-vector products (rwkvx.kernels._group) against one product at a time.

Tolerances: rtol 1e-5 / atol 1e-6 relative to the outputs' scale (house style for the
elementwise kernels); heads of awkward sizes; thread counts give the same bits."""
import numpy as np
import pytest

from rwkvx.kernels import _matvec
from rwkvx.kernels._group import matmul_group, matvec_group
from rwkvx.kernels._wkv import wkv5, wkv7
from rwkvx.arch import v5
from rwkvx.arch.common import group_norm, sigmoid
from rwkvx.errors import RwkvxError


def _starts(*lengths):
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.intp)


def _inputs(rng, T, H, N):
    C = H * N
    f = lambda *shape, lo=-1.0, hi=1.0: rng.uniform(lo, hi, shape).astype(np.float32)  # noqa: E731
    return C, f


@pytest.mark.parametrize("H,N,T,per_token", [(1, 1, 1, False), (3, 7, 5, True), (2, 17, 3, False), (4, 64, 2, True)])
def test_wkv5_matches_the_specification(H, N, T, per_token):
    rng = np.random.default_rng(H * 100 + N)
    C, f = _inputs(rng, T, H, N)
    r, k, v, g = f(T, C), f(T, C), f(T, C), f(T, C)
    w = f(T if per_token else 1, C, lo=0.05, hi=0.999)
    u, ln_w, ln_b = f(C), f(C, lo=0.5, hi=1.5), f(C, lo=-0.1, hi=0.1)
    S0 = f(H, N, N)
    S, out = S0.copy(), np.empty((T, C), np.float32)
    wkv5(r, k, v, w, u, ln_w, ln_b, g, [S], _starts(T), out, eps=64e-5, n_threads=2)
    S_ref = S0.astype(np.float64)
    for t in range(T):
        y = v5.wkv(*(a[t].reshape(H, N).astype(np.float64) for a in (r, k, v)),
                   w[t if per_token else 0].reshape(H, N).astype(np.float64), u.reshape(H, N).astype(np.float64), S_ref)
        expected = group_norm(y.reshape(-1), ln_w, ln_b, H) * g[t]
        np.testing.assert_allclose(out[t], expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())
    np.testing.assert_allclose(S, S_ref, rtol=1e-5, atol=1e-6 * np.abs(S_ref).max())


def _wkv7_spec(r, w, k, v, kk, a, r_k, ln_w, ln_b, g, S, H, N):
    # the recurrence and output of rwkvx.arch.v7.time_mixing, from its inputs on
    r, w, k, v, kk, a = (x.reshape(H, N).astype(np.float64) for x in (r, w, k, v, kk, a))
    S[:] = S * w[:, None, :] + (S @ -kk[:, :, None]) * (kk * a)[:, None, :] + v[:, :, None] * k[:, None, :]
    y = (S @ r[:, :, None])[:, :, 0]
    y = group_norm(y.reshape(-1), ln_w, ln_b, H) + ((r * k * r_k.reshape(H, N)).sum(1, keepdims=True) * v).reshape(-1)
    return y * g


@pytest.mark.parametrize("H,N,T", [(1, 1, 1), (3, 7, 5), (2, 17, 3), (4, 64, 2), (1, 33, 4)])
def test_wkv7_matches_the_specification(H, N, T):
    rng = np.random.default_rng(H * 100 + N)
    C, f = _inputs(rng, T, H, N)
    r, k, v, g = f(T, C), f(T, C), f(T, C), f(T, C)
    w = np.exp(-np.exp(-0.5) * sigmoid(f(T, C, lo=-4, hi=4))).astype(np.float32)
    a = sigmoid(f(T, C, lo=-3, hi=3)).astype(np.float32)
    kk = f(T, H, N)
    kk = (kk / np.linalg.norm(kk, axis=-1, keepdims=True)).reshape(T, C).astype(np.float32)
    r_k, ln_w, ln_b = f(C), f(C, lo=0.5, hi=1.5), f(C, lo=-0.1, hi=0.1)
    S0 = f(H, N, N)
    S, out = S0.copy(), np.empty((T, C), np.float32)
    wkv7(r, w, k, v, kk, np.ascontiguousarray(kk * a), r_k, ln_w, ln_b, g, [S], _starts(T), out, eps=64e-5,
         n_threads=2)
    S_ref = S0.astype(np.float64)
    for t in range(T):
        expected = _wkv7_spec(r[t], w[t], k[t], v[t], kk[t], a[t], r_k, ln_w, ln_b, g[t], S_ref, H, N)
        np.testing.assert_allclose(out[t], expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())
    np.testing.assert_allclose(S, S_ref, rtol=1e-5, atol=1e-6 * np.abs(S_ref).max())


def test_kernels_give_the_same_bits_for_any_thread_count_and_token_split():
    rng = np.random.default_rng(7)
    H, N, T = 5, 16, 6
    C, f = _inputs(rng, T, H, N)
    r, k, v, g, kk, bb = (f(T, C) for _ in range(6))
    w = np.abs(f(T, C))
    results = []
    for n_threads, split in ((1, T), (2, T), (3, 2)):
        S, outs = np.zeros((H, N, N), np.float32), []
        for s in range(0, T, split):
            part = slice(s, s + split)
            out = np.empty((len(range(T)[part]), C), np.float32)
            wkv7(r[part], w[part], k[part], v[part], kk[part], bb[part], np.full(C, 0.3, np.float32),
                 np.ones(C, np.float32), np.zeros(C, np.float32), g[part], [S], _starts(len(out)), out, eps=64e-5,
                 n_threads=n_threads)
            outs.append(out)
        results.append((np.concatenate(outs), S))
    for out, S in results[1:]:
        assert np.array_equal(out, results[0][0]) and np.array_equal(S, results[0][1])


@pytest.mark.parametrize("N", [64, 20])  # 20: no whole step of 16 columns at the end
def test_kernels_give_the_same_bits_at_every_simd_level(N):
    rng = np.random.default_rng(N)
    H, T = 3, 5
    C, f = _inputs(rng, T, H, N)
    r, k, v, g, kk, bb, u = (f(T, C) for _ in range(7))
    w = np.abs(f(T, C))
    ones, zeros = np.ones(C, np.float32), np.zeros(C, np.float32)
    S0 = f(H, N, N)
    results = {}
    saved = _matvec.simd_level()
    try:
        for level in range(_matvec.best_simd_level() + 1):
            _matvec.set_simd_level(level)
            S5, S7 = S0.copy(), S0.copy()
            out5, out7 = np.empty((T, C), np.float32), np.empty((T, C), np.float32)
            wkv5(r, k, v, w, u[0], ones, zeros, g, [S5], _starts(T), out5, eps=64e-5, n_threads=2)
            wkv7(r, w, k, v, kk, bb, u[0], ones, zeros, g, [S7], _starts(T), out7, eps=64e-5, n_threads=2)
            results[level] = (out5, S5, out7, S7)
    finally:
        _matvec.set_simd_level(saved)
    for level, arrays in results.items():
        assert all(np.array_equal(a, b) for a, b in zip(arrays, results[0])), level


def test_several_sequences_in_one_call_equal_each_alone():
    rng = np.random.default_rng(11)
    H, N, lengths = 3, 8, (2, 1, 4)
    R = sum(lengths)
    C, f = _inputs(rng, R, H, N)
    r, k, v, g, kk, bb = (f(R, C) for _ in range(6))
    w = np.abs(f(R, C))
    u, ln_w, ln_b = f(C), f(C, lo=0.5, hi=1.5), f(C)
    S0 = [f(H, N, N) for _ in lengths]
    starts = _starts(*lengths)
    for kernel in ("wkv5", "wkv7"):
        S, out = [s.copy() for s in S0], np.empty((R, C), np.float32)
        if kernel == "wkv5":
            wkv5(r, k, v, w, u, ln_w, ln_b, g, S, starts, out, eps=64e-5, n_threads=2)
        else:
            wkv7(r, w, k, v, kk, bb, u, ln_w, ln_b, g, S, starts, out, eps=64e-5, n_threads=2)
        for b, (lo, hi) in enumerate(zip(starts[:-1], starts[1:])):
            alone, one = S0[b].copy(), np.empty((hi - lo, C), np.float32)
            part = slice(lo, hi)
            if kernel == "wkv5":
                wkv5(r[part], k[part], v[part], w[part], u, ln_w, ln_b, g[part], [alone], _starts(hi - lo), one,
                     eps=64e-5)
            else:
                wkv7(r[part], w[part], k[part], v[part], kk[part], bb[part], u, ln_w, ln_b, g[part], [alone],
                     _starts(hi - lo), one, eps=64e-5)
            assert np.array_equal(out[part], one) and np.array_equal(S[b], alone)


def test_wkv_kernels_check_shapes():
    z = lambda *s: np.zeros(s, np.float32)  # noqa: E731
    with pytest.raises(RwkvxError, match="wkv5: w"):
        wkv5(z(2, 8), z(2, 8), z(2, 8), z(3, 8), z(8), z(8), z(8), z(2, 8), [z(2, 4, 4)], _starts(2), z(2, 8), eps=1e-5)
    with pytest.raises(RwkvxError, match="state 0"):
        wkv7(z(2, 8), z(2, 8), z(2, 8), z(2, 8), z(2, 8), z(2, 8), z(8), z(8), z(8), z(2, 8), [z(2, 4, 3)],
             _starts(2), z(2, 8), eps=1e-5)
    with pytest.raises(RwkvxError, match="kk"):
        wkv7(z(2, 8), z(2, 8), z(2, 8), z(2, 8), z(1, 8), z(2, 8), z(8), z(8), z(8), z(2, 8), [z(2, 4, 4)],
             _starts(2), z(2, 8), eps=1e-5)
    with pytest.raises(RwkvxError, match="starts"):
        wkv5(z(2, 8), z(2, 8), z(2, 8), z(1, 8), z(8), z(8), z(8), z(2, 8), [z(2, 4, 4)], _starts(3), z(2, 8), eps=1e-5)
    with pytest.raises(RwkvxError, match="starts"):
        wkv5(z(3, 8), z(3, 8), z(3, 8), z(1, 8), z(8), z(8), z(8), z(3, 8), [z(2, 4, 4)] * 2,
             np.array([0, 4, 3], np.intp), z(3, 8), eps=1e-5)
    with pytest.raises(ValueError):
        wkv5(z(2, 8)[:, ::2], z(2, 4), z(2, 4), z(1, 4), z(4), z(4), z(4), z(2, 4), [z(1, 4, 4)], _starts(2), z(2, 4),
             eps=1e-5)


@pytest.mark.parametrize("n_threads", [1, 2])
def test_matvec_group_equals_one_product_at_a_time(n_threads):
    rng = np.random.default_rng(3)
    shapes = [(33, 17), (7, 64), (128, 31), (1, 3)]
    linears = [_matvec.Linear.f32(rng.standard_normal(s).astype(np.float32)) for s in shapes]
    xs = [rng.standard_normal(s[1]).astype(np.float32) for s in shapes]
    outs = [np.empty(s[0], np.float32) for s in shapes]
    matvec_group(linears, xs, outs, n_threads)
    for lin, x, out in zip(linears, xs, outs):
        assert np.array_equal(out, lin(x, n_threads=1))
    with pytest.raises(RwkvxError, match="1 to 4"):
        matvec_group(linears + linears[:1], xs + xs[:1], outs + outs[:1])
    with pytest.raises(RwkvxError, match="product 1"):
        matvec_group(linears[:2], [xs[0], xs[0]], outs[:2])


@pytest.mark.parametrize("n_threads", [1, 2])
def test_matmul_group_equals_one_product_at_a_time(simd, n_threads):
    # a group may mix the few-token product and the tiles (7 tokens: uint8's tiles beside
    # bfloat16's and float32's few-token products at AVX-512)
    from rwkvx.quant import quantize_u8
    from rwkvx.weights import to_bfloat16
    rng = np.random.default_rng(4)
    mats = [rng.standard_normal(s).astype(np.float32) for s in [(33, 17), (7, 64), (128, 31), (5, 3)]]
    q = quantize_u8(mats[2])
    linears = [_matvec.Linear.f32(mats[0]), _matvec.Linear.bf16(to_bfloat16(mats[1])),
               _matvec.Linear.u8(q.q, q.mx, q.rx, q.my, q.ry), _matvec.Linear.f16(mats[3].astype(np.float16))]
    for n_tok in (1, 2, 7, 12):
        Xs = [rng.standard_normal((n_tok, m.shape[1])).astype(np.float32) for m in mats]
        outs = [np.empty((n_tok, m.shape[0]), np.float32) for m in mats]
        matmul_group(linears, Xs, outs, n_threads)
        for lin, X, out in zip(linears, Xs, outs):
            assert np.array_equal(out, lin.matmul(X, n_threads=1))
    with pytest.raises(RwkvxError, match="all products take 2 rows"):
        matmul_group(linears[:2], [np.zeros((2, 17), np.float32), np.zeros((3, 64), np.float32)],
                     [np.zeros((2, 33), np.float32), np.zeros((3, 7), np.float32)])


def test_mix_rows_and_v7_prepare_match_numpy():
    from rwkvx.kernels._wkv import mix_rows, v7_prepare
    rng = np.random.default_rng(5)
    T, H, N = 3, 4, 8
    C, f = _inputs(rng, T, H, N)
    x, prev, mix = f(T, C), f(T, C), f(6, C, lo=0, hi=1)
    out = np.empty((6, T, C), np.float32)
    for n_threads in (1, 2):
        # the same float32 operations in the same order as numpy's: the same bits
        mix_rows(x, prev, mix, out, n_threads)
        np.testing.assert_array_equal(out, x + (prev - x) * mix[:, None])

    w_raw, k, v, a_raw, v_raw, v_first = (f(T, C, lo=-3, hi=3) for _ in range(6))
    w0, a0, v0, k_k, k_a = f(C), f(C), f(C), f(C, lo=0.5, hi=1), f(C, lo=0, hi=1)
    for layer0 in (True, False):
        w, kw, vw, kk, b = w_raw.copy(), k.copy(), v.copy(), np.empty((T, C), np.float32), np.empty((T, C), np.float32)
        v7_prepare(w, kw, vw, a_raw, None if layer0 else v_raw, v_first, w0, a0, v0, k_k, k_a, kk, b,
                   n_head=H, decay_scale=float(np.exp(-0.5)))
        d = lambda a: a.astype(np.float64)  # noqa: E731
        a = sigmoid(d(a0) + d(a_raw))
        kk_ref = (d(k) * d(k_k)).reshape(T, H, N)
        kk_ref = (kk_ref / np.linalg.norm(kk_ref, axis=-1, keepdims=True)).reshape(T, C)
        expected = {"w": np.exp(-np.exp(-0.5) * sigmoid(d(w0) + d(w_raw))), "kk": kk_ref, "b": kk_ref * a,
                    "k": d(k) * (1 + (a - 1) * d(k_a)),
                    "v": d(v) if layer0 else d(v) + (d(v_first) - d(v)) * sigmoid(d(v0) + d(v_raw))}
        for name, got in (("w", w), ("kk", kk), ("b", b), ("k", kw), ("v", vw)):
            np.testing.assert_allclose(got, expected[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_sources_are_read_and_left_unchanged():
    rng = np.random.default_rng(9)
    H, N, T = 2, 8, 3
    C, f = _inputs(rng, T, H, N)
    r, k, v, g, kk, bb = (f(T, C) for _ in range(6))
    w = np.abs(f(T, C))
    u, ln_w, ln_b = f(C), f(C, lo=0.5, hi=1.5), f(C)
    S0 = f(H, N, N)
    for kernel in (wkv5, wkv7):
        def run(states, **kw):
            out = np.empty((T, C), np.float32)
            if kernel is wkv5:
                wkv5(r, k, v, w, u, ln_w, ln_b, g, states, _starts(T), out, eps=64e-5, **kw)
            else:
                wkv7(r, w, k, v, kk, bb, u, ln_w, ln_b, g, states, _starts(T), out, eps=64e-5, **kw)
            return out
        in_place = S0.copy()
        expected = run([in_place])
        source, fresh = S0.copy(), np.full_like(S0, np.nan)
        source.flags.writeable = False
        got = run([fresh], sources=[source])
        assert np.array_equal(got, expected) and np.array_equal(fresh, in_place) and np.array_equal(source, S0)
