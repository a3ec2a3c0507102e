"""Matrix-vector kernels against float64 numpy, at awkward sizes, in both instruction sets."""
import os

import numpy as np
import pytest

from rwkvx.kernels import _matvec
from rwkvx.kernels._parallel import openmp_enabled
from rwkvx.errors import RwkvxError
from rwkvx.quant import quantize_u8
from rwkvx.weights import to_bfloat16, to_float32

from conftest import SIMD_LEVELS

SIZES = [1, 2, 3, 7, 17, 31, 33, 64, 127, 1023]
LEVELS = SIMD_LEVELS
DEFAULT_LEVEL = _matvec.simd_level()


def test_default_level_is_the_best_the_cpu_has():
    assert DEFAULT_LEVEL == _matvec.best_simd_level() or "RWKVX_SIMD" in os.environ


def _data(rng, n_rows, n_cols):
    w = (rng.standard_normal((n_rows, n_cols)) / np.sqrt(n_cols)).astype(np.float32)
    x = rng.standard_normal(n_cols).astype(np.float32)
    return w, x


@pytest.mark.parametrize("n_cols", SIZES)
@pytest.mark.parametrize("n_rows", [1, 3, 17, 64])
def test_matvec_f32_against_numpy(simd, rng, n_rows, n_cols):
    w, x = _data(rng, n_rows, n_cols)
    y = _matvec.Linear.f32(w)(x, n_threads=2)
    np.testing.assert_allclose(y, w.astype(np.float64) @ x, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n_cols", SIZES)
@pytest.mark.parametrize("n_rows", [1, 3, 17, 64])
def test_matvec_u8_against_dequantized(simd, rng, n_rows, n_cols):
    w, x = _data(rng, n_rows, n_cols)
    qm = quantize_u8(w)
    y = _matvec.Linear.u8(qm.q, qm.mx, qm.rx, qm.my, qm.ry)(x, n_threads=2)
    np.testing.assert_allclose(y, qm.dequantize(np.float64) @ x, rtol=1e-4, atol=1e-5)


def _half(w, kind):
    """(Linear, float32 values it holds) for a bfloat16 or float16 copy of w."""
    if kind == "bfloat16":
        bits = to_bfloat16(w)
        return _matvec.Linear.bf16(bits), to_float32(bits)
    half = w.astype(np.float16)
    return _matvec.Linear.f16(half), half.astype(np.float32)


@pytest.mark.parametrize("kind", ["bfloat16", "float16"])
@pytest.mark.parametrize("n_cols", SIZES)
@pytest.mark.parametrize("n_rows", [1, 3, 17, 64])
def test_matvec_half_against_numpy(simd, rng, kind, n_rows, n_cols):
    w, x = _data(rng, n_rows, n_cols)
    lin, values = _half(w, kind)
    assert lin.dtype == kind
    np.testing.assert_allclose(lin(x, n_threads=2), values.astype(np.float64) @ x, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["bfloat16", "float16"])
@pytest.mark.parametrize("n_cols", SIZES)
def test_half_is_bit_identical_to_float32_of_the_same_values(simd, rng, kind, n_cols):
    # same loops, same summation order: only the load differs
    w, x = _data(rng, 67, n_cols)
    lin, values = _half(w, kind)
    assert np.array_equal(lin(x, n_threads=2), _matvec.Linear.f32(values)(x, n_threads=2))


def test_half_conversions_of_special_values():
    # each row repeats one value 16 times; x = 1/16 makes every product and sum exact
    values = np.array([0.0, -0.0, 1.0, -2.5, 65504.0, 6e-5, 6e-8, np.inf, -np.inf, 1e-40], np.float32)
    w = np.repeat(values[:, None], 16, axis=1)
    x = np.full(16, 1 / 16, np.float32)
    try:
        for kind in ("bfloat16", "float16"):
            for level in LEVELS:
                _matvec.set_simd_level(level)
                lin, held = _half(w, kind)
                np.testing.assert_array_equal(lin(x), held[:, 0], err_msg=f"{kind}, simd level {level}")
    finally:
        _matvec.set_simd_level(DEFAULT_LEVEL)


def _all_kinds(w):
    qm = quantize_u8(w)
    return [_matvec.Linear.f32(w), _half(w, "bfloat16")[0], _half(w, "float16")[0],
            _matvec.Linear.u8(qm.q, qm.mx, qm.rx, qm.my, qm.ry)]


def _assert_rows_equal_matvec(lin, X, n_threads=2, note=None):
    """Each row of the product of rows X is the matrix-vector product of that row, bit for bit."""
    Y = lin.matmul(X, n_threads=n_threads)
    for t in range(len(X)):
        assert np.array_equal(Y[t], lin(X[t])), (lin.dtype, note)


# around the few-token product's limits (4, 8 and 16 tokens by kind and level: _few_tokens)
# and the stored tile's (12)
@pytest.mark.parametrize("n_tok", [1, 2, 3, 4, 5, 7, 8, 9, 12, 13, 16, 17])
@pytest.mark.parametrize("n_cols", [1, 7, 17, 33, 64, 127])
@pytest.mark.parametrize("n_rows", [1, 3, 5, 17])
def test_matmul_rows_equal_matvec(simd, rng, n_rows, n_cols, n_tok):
    w, _ = _data(rng, n_rows, n_cols)
    X = rng.standard_normal((n_tok, n_cols)).astype(np.float32)
    for lin in _all_kinds(w):
        for n_threads in (1, 2, 3):
            _assert_rows_equal_matvec(lin, X, n_threads, note=n_threads)


@pytest.mark.skipif(_matvec.best_simd_level() < 2, reason="needs AVX-512")
def test_avx512_without_vl_gives_the_same_bits(rng):
    # a CPU with AVX-512F but not VL runs the few-token products in AVX2's registers and
    # q4 without its AVX-512 loops
    from rwkvx.quant import quantize_q4
    from rwkvx.weights import linear
    w, _ = _data(rng, 17, 200)
    lins = _all_kinds(w) + [linear(quantize_q4(w))]
    X = rng.standard_normal((13, 200)).astype(np.float32)
    expected = [[lin(x) for x in X] for lin in lins]
    _matvec.set_simd_level(2)
    try:
        for vl in (False, True):
            _matvec.set_avx512vl(vl)
            for lin, want in zip(lins, expected):
                assert np.array_equal(np.stack([lin(x) for x in X]), np.stack(want)), (lin.dtype, vl)
                for n_tok in (2, 3, 4, 7, 8, 13):
                    Y = lin.matmul(X[:n_tok], n_threads=2)
                    assert np.array_equal(Y, np.stack(want[:n_tok])), (lin.dtype, vl, n_tok)
    finally:
        _matvec.set_avx512vl(True)
        _matvec.set_simd_level(DEFAULT_LEVEL)


def test_wide_products_in_passes_of_a_few_tokens_equal_matvec(simd, rng):
    # 16384 columns: the product takes 8 tokens a pass, as many as bfloat16's few-token
    # limit, while the call has 12; whether the tiles or the few-token product run is
    # decided for the whole call (the tiles read inputs packed for them)
    w, _ = _data(rng, 9, 16384)
    for n_tok in (8, 12):
        X = rng.standard_normal((n_tok, 16384)).astype(np.float32)
        for lin in _all_kinds(w):
            _assert_rows_equal_matvec(lin, X, note=n_tok)


def test_matmul_in_several_passes_equals_matvec(simd, rng):
    # wide rows: the product takes the tokens a few at a time (inputs kept to L2's size),
    # and widens each block of rows ahead, once per pass
    w, _ = _data(rng, 21, 8201)
    X = rng.standard_normal((37, 8201)).astype(np.float32)
    for lin in _all_kinds(w):
        _assert_rows_equal_matvec(lin, X)


def test_products_past_the_kept_scratch_and_after_a_smaller_one_equal_matvec(rng):
    # the products keep their scratch per thread up to SCRATCH_KEPT floats a buffer: a
    # larger call gets a buffer of its own, and a smaller call after it reuses the kept ones
    n_cols = 20000
    n_tok = _matvec.SCRATCH_KEPT // n_cols + 3
    w, _ = _data(rng, 6, n_cols)
    X = rng.standard_normal((n_tok, n_cols)).astype(np.float32)
    for lin in _all_kinds(w):
        for rows in (X[:5], X, X[:9]):
            Y = lin.matmul(rows, n_threads=2)
            for t in (0, len(rows) - 1):
                assert np.array_equal(Y[t], lin(rows[t])), lin.dtype


@pytest.mark.parametrize("n_cols", [1030, 2100, 2112])
def test_matmul_of_long_rows_equals_matvec(simd, rng, n_cols):
    # rows of 2 KiB and more, which the stored tile (9 to 12 tokens of bfloat16/float16, 5
    # to 12 of uint8, at AVX-512) walks with a row-by-row prefetch (bfloat16/float16 at
    # every size, uint8 from 2100): prefetching cannot change results, so this guards the
    # walk around it, and at 2112 (whole steps of eight) uint8's finish in registers on
    # such rows; 3 tokens take the few-token product, which prefetches the next block
    # into L2 at these sizes
    w, _ = _data(rng, 29, n_cols)
    for n_tok in (3, 10):
        X = rng.standard_normal((n_tok, n_cols)).astype(np.float32)
        for lin in _all_kinds(w):
            _assert_rows_equal_matvec(lin, X, note=n_tok)


def test_matmul_raises_on_shape_mismatch(rng):
    w, _ = _data(rng, 5, 9)
    with pytest.raises(RwkvxError, match="matmul"):
        _matvec.Linear.f32(w).matmul(np.zeros((3, 8), np.float32))


def test_instruction_sets_agree(rng):
    if len(LEVELS) == 1:
        pytest.skip("no vector instruction set on this CPU")
    # every storage kind: uint8 also has its own input sums per level (rwkvx_prepare_u8)
    w, x = _data(rng, 300, 1023)
    for lin in _all_kinds(w):
        results = []
        try:
            for level in LEVELS:
                _matvec.set_simd_level(level)
                results.append(lin(x))
        finally:
            _matvec.set_simd_level(DEFAULT_LEVEL)
        for r in results[1:]:
            np.testing.assert_allclose(r, results[0], rtol=1e-5, atol=1e-5, err_msg=lin.dtype)


@pytest.mark.parametrize("n_cols", [8, 15, 16, 24, 31, 33, 100, 1023])
def test_avx2_and_avx512_are_bit_identical(rng, n_cols):
    # one summation order for both, so decoding (AVX2) and prompts (AVX-512) agree exactly
    if len(LEVELS) < 3:
        pytest.skip("no AVX-512 on this CPU")
    w, _ = _data(rng, 23, n_cols)
    X = rng.standard_normal((13, n_cols)).astype(np.float32)
    try:
        for lin in _all_kinds(w):
            out = {}
            for level in (1, 2):
                _matvec.set_simd_level(level)
                out[level] = lin.matmul(X, n_threads=2), lin(X[0], n_threads=2)
            assert np.array_equal(out[1][0], out[2][0]), lin.dtype
            assert np.array_equal(out[1][1], out[2][1]), lin.dtype
            assert np.array_equal(out[2][0][0], out[1][1]), lin.dtype
    finally:
        _matvec.set_simd_level(DEFAULT_LEVEL)


@pytest.mark.skipif(not openmp_enabled(), reason="built without OpenMP")
def test_thread_counts_are_bit_identical(rng):
    w, x = _data(rng, 1023, 257)
    qm = quantize_u8(w)
    for lin in (_matvec.Linear.f32(w), _matvec.Linear.u8(qm.q, qm.mx, qm.rx, qm.my, qm.ry)):
        results = [lin(x, n_threads=n) for n in (1, 2, 3, 4)]
        for r in results[1:]:
            assert np.array_equal(results[0], r)


def test_read_only_inputs_are_accepted(rng):
    w, x = _data(rng, 5, 9)
    w.flags.writeable = False
    x.flags.writeable = False
    np.testing.assert_allclose(_matvec.Linear.f32(w)(x), w @ x, rtol=1e-5)


def test_matvec_raises_on_shape_mismatch(rng):
    w, x = _data(rng, 5, 9)
    with pytest.raises(RwkvxError, match="matvec"):
        _matvec.Linear.f32(w)(x[:8])
    with pytest.raises(RwkvxError, match="matvec"):
        _matvec.Linear.f32(w)(x, np.empty(4, np.float32))


def test_matvec_raises_on_wrong_dtype_or_layout(rng):
    w, x = _data(rng, 5, 9)
    with pytest.raises(ValueError):
        _matvec.Linear.f32(w.astype(np.float64))
    with pytest.raises(ValueError):
        _matvec.Linear.f32(np.asfortranarray(w))
    with pytest.raises(ValueError):
        _matvec.Linear.f32(w)(x.astype(np.float64))


def test_u8_raises_on_wrong_vector_length(rng):
    qm = quantize_u8(_data(rng, 5, 9)[0])
    with pytest.raises(RwkvxError, match="mx"):
        _matvec.Linear.u8(qm.q, qm.mx[:8], qm.rx, qm.my, qm.ry)
    with pytest.raises(RwkvxError, match="ry"):
        _matvec.Linear.u8(qm.q, qm.mx, qm.rx, qm.my, qm.ry[:4])


def test_n_threads_must_be_positive(rng):
    w, x = _data(rng, 5, 9)
    with pytest.raises(RwkvxError, match="n_threads"):
        _matvec.Linear.f32(w)(x, n_threads=0)


# ---- products with small matrices stored transposed (RWKV-6/7's low-rank paths, _lowrank.h) ----

LOWRANK_SHAPES = [(1024, 64), (64, 1024), (1024, 160), (256, 32), (100, 70), (3, 5), (96, 300), (40, 129)]  # (n_in, n_out): full, partial blocks


def _lowrank(wts, Xs, threads=1):
    outs = [np.empty((X.shape[0], wt.shape[1]), np.float32) for wt, X in zip(wts, Xs)]
    _matvec.lowrank_group(wts, Xs, outs, threads)
    return outs


@pytest.mark.parametrize("n_in,n_out", LOWRANK_SHAPES)
def test_lowrank_matches_float64(simd, n_in, n_out):
    # float32 sums of n_in products in order: within n_in float32 roundings of the float64 sum
    rng = np.random.default_rng(n_in * 7 + n_out)
    wt = rng.standard_normal((n_in, n_out)).astype(np.float32)
    X = rng.standard_normal((5, n_in)).astype(np.float32)
    (out,) = _lowrank([wt], [X])
    exact = X.astype(np.float64) @ wt.astype(np.float64)
    bound = n_in * np.finfo(np.float32).eps * (np.abs(X).astype(np.float64) @ np.abs(wt).astype(np.float64))
    assert np.all(np.abs(out - exact) <= bound)


@pytest.mark.parametrize("n_in,n_out", LOWRANK_SHAPES)
def test_lowrank_gives_the_same_bits_for_any_tokens_threads_and_level(n_in, n_out):
    rng = np.random.default_rng(n_out)
    wts = [rng.standard_normal((n_in, n_out)).astype(np.float32), rng.standard_normal((n_in, 17)).astype(np.float32)]
    Xs = [rng.standard_normal((9, n_in)).astype(np.float32) for _ in wts]
    before = _matvec.simd_level()
    try:
        _matvec.set_simd_level(0)
        first = _lowrank(wts, Xs)
        for level in SIMD_LEVELS:
            _matvec.set_simd_level(level)
            for threads in (1, 2, 3):
                assert all(np.array_equal(a, b) for a, b in zip(_lowrank(wts, Xs, threads), first))
            # one token alone, and an odd token out of a pair
            for t in (0, 4, 8):
                alone = _lowrank(wts, [X[t:t + 1].copy() for X in Xs])
                assert all(np.array_equal(a[0], b[t]) for a, b in zip(alone, first))
    finally:
        _matvec.set_simd_level(before)


def test_lowrank_refuses_mismatched_shapes():
    wt = np.zeros((8, 4), np.float32)
    with pytest.raises(RwkvxError, match="lowrank_group: product 0"):
        _matvec.lowrank_group([wt], [np.zeros((2, 9), np.float32)], [np.zeros((2, 4), np.float32)])
    with pytest.raises(RwkvxError, match="1 to 8 products"):
        _matvec.lowrank_group([wt] * 9, [np.zeros((2, 8), np.float32)] * 9, [np.zeros((2, 4), np.float32)] * 9)
