"""bfloat16 arithmetic (Linear.with_arithmetic("bfloat16"), load(arithmetic="bfloat16")):
against a numpy model of vdpbf16ps's rules, the same bits for every thread count, SIMD level
and batch composition, and close to the float32 products."""
import numpy as np
import pytest

import rwkvx
from rwkvx.kernels import _matvec
from rwkvx.errors import RwkvxError
from rwkvx.weights import to_bfloat16

from conftest import arithmetic_error, assert_one_token_in_float32, assert_same_bits_everywhere

FLT_MIN = np.float32(np.finfo(np.float32).tiny)


def _bf16(rng, n_rows, n_cols):
    w = to_bfloat16((rng.standard_normal((n_rows, n_cols)) / np.sqrt(n_cols)).astype(np.float32))
    return w, _matvec.Linear.bf16(w)


def _read(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bits as the instruction reads them: float32, denormals as zero of their sign."""
    bits = bits.astype(np.uint32)
    bits = np.where(bits & 0x7F80, bits, bits & 0x8000)
    return (bits << 16).view(np.float32)


def _fma(acc: np.ndarray, p: np.ndarray) -> np.ndarray:
    """acc + p rounded once to float32, or zero of its sign if tiny: below FLT_MIN when
    rounded to 24 bits with no lower limit on the exponent (x86's rule; scaling by 2^64
    puts the rounding in float32's normal range). acc + p must be exact in float64."""
    exact = acc.astype(np.float64) + p
    r = exact.astype(np.float32)
    tiny = np.abs((exact * 2.0 ** 64).astype(np.float32)) < np.float32(2.0 ** -62)
    return np.where(tiny, np.copysign(np.float32(0), r), r).astype(np.float32)


def bf16_model(w: np.ndarray, X: np.ndarray) -> np.ndarray:
    """X @ W.T as _bf16dot.h defines it, in numpy. Lane k of a row's sixteen takes columns
    32 s + 2k + 1, then 32 s + 2k, of each step s as a fused multiply-add, flushing tiny
    results (_fma); then the lanes' fixed tree. A product of two bfloat16 values is exact in
    float64, and so is its sum with the accumulator while their exponents are less than 29
    apart (as here)."""
    n_rows, n = w.shape
    steps = (n + 31) // 32
    W = np.zeros((n_rows, 32 * steps), np.float32)
    W[:, :n] = _read(w)
    out = np.empty((X.shape[0], n_rows), np.float32)
    for t, x in enumerate(X):
        xb = np.zeros(32 * steps, np.float32)
        xb[:n] = _read(to_bfloat16(x))
        acc = np.zeros((n_rows, 16), np.float32)
        for s in range(steps):
            ws = W[:, 32 * s:32 * s + 32].reshape(n_rows, 16, 2).astype(np.float64)
            xs = xb[32 * s:32 * s + 32].reshape(16, 2).astype(np.float64)
            acc = _fma(acc, ws[:, :, 1] * xs[:, 1])
            acc = _fma(acc, ws[:, :, 0] * xs[:, 0])
        h = acc[:, :8] + acc[:, 8:]
        h = h[:, :4] + h[:, 4:]
        out[t] = (h[:, 0] + h[:, 2]) + (h[:, 1] + h[:, 3])
    return out


@pytest.mark.parametrize("n_cols", [1, 2, 3, 7, 31, 32, 33, 64, 65, 127, 1023])
@pytest.mark.parametrize("n_rows", [1, 4, 5, 17])
def test_bf16_matmul_follows_the_rules(simd, rng, n_rows, n_cols):
    w, lin = _bf16(rng, n_rows, n_cols)
    X = rng.standard_normal((7, n_cols)).astype(np.float32)
    X[2] *= 1e4
    X[4, : n_cols // 2] = 0
    got = lin.with_arithmetic("bfloat16").matmul(X, n_threads=2)
    np.testing.assert_array_equal(got.view(np.uint32), bf16_model(w, X).view(np.uint32))


def test_bf16_denormals_read_as_zero_and_results_flushed(rng):
    w, _ = _bf16(rng, 8, 70)
    w[0, :5] = 0x0001          # denormal weights
    w[1, 3] = 0x8003
    w[2] = to_bfloat16(rng.uniform(1, 2, 70).astype(np.float32) * np.float32(1e-10))
    lin = _matvec.Linear.bf16(w).with_arithmetic("bfloat16")
    X = rng.standard_normal((3, 70)).astype(np.float32)
    X[1] = 1e-39               # denormal inputs
    X[2] = 1e-30               # normal, but their products with row 2 are not
    got = lin.matmul(X, n_threads=2)
    np.testing.assert_array_equal(got.view(np.uint32), bf16_model(w, X).view(np.uint32))
    assert np.all(got[1] == 0) and got[2, 2] == 0 and _matvec.Linear.bf16(w).matmul(X)[2, 2] > 0


def test_bf16_tiny_at_the_boundary(simd):
    # x86's rule, which a Zen 4's vdpbf16ps follows: 2^-126 - 2^-150 is tiny (flushed to 0)
    # though float32 rounds it up to FLT_MIN; 2^-126 - 2^-152 is not (FLT_MIN). Four rows, so
    # that the tile runs at every level.
    w = to_bfloat16(np.array([[-2.0 ** -75, 2.0 ** -63], [-2.0 ** -76, 2.0 ** -63]] * 2, np.float32))
    X = np.array([[2.0 ** -75, 2.0 ** -63], [2.0 ** -76, 2.0 ** -63]], np.float32)
    got = _matvec.Linear.bf16(w).with_arithmetic("bfloat16").matmul(X)
    assert got[0, 0] == 0 and got[1, 1] == FLT_MIN
    np.testing.assert_array_equal(got.view(np.uint32), bf16_model(w, X).view(np.uint32))


def test_bf16_same_bits_for_threads_levels_and_batches(rng):
    _, lin = _bf16(rng, 130, 200)
    assert_same_bits_everywhere(lin.with_arithmetic("bfloat16"), rng.standard_normal((13, 200)).astype(np.float32))


def test_bf16_one_token_is_the_float32_product(rng):
    _, lin = _bf16(rng, 33, 100)
    x = rng.standard_normal((1, 100)).astype(np.float32)
    assert_one_token_in_float32(lin, "bfloat16", x)


def test_bf16_close_to_float32(rng):
    # relative RMS error of the products: 0.0017 measured (256 x 1024, conftest's seed
    # 1234): the inputs' rounding, 2^-9 at most, about 2^-10.5 in RMS
    _, lin = _bf16(rng, 256, 1024)
    X = rng.standard_normal((16, 1024)).astype(np.float32)
    assert arithmetic_error(lin, "bfloat16", X) < 1.5 * 0.0017


def test_bf16_nan_inputs(rng):
    _, lin = _bf16(rng, 9, 40)
    X = np.ones((2, 40), np.float32)
    X[1, 3] = np.nan
    y = lin.with_arithmetic("bfloat16").matmul(X)
    assert np.isfinite(y[0]).all() and np.isnan(y[1]).all()


def test_with_arithmetic_bfloat16_checks(rng):
    _, lin = _bf16(rng, 4, 8)
    assert lin.with_arithmetic("bfloat16").arithmetic == "bfloat16"
    assert lin.with_arithmetic("bfloat16").with_arithmetic("float32").arithmetic == "float32"
    with pytest.raises(RwkvxError, match="arithmetic bfloat16: needs bfloat16 weights, got float16"):
        _matvec.Linear.f16(np.ones((2, 3), np.float16)).with_arithmetic("bfloat16")
    with pytest.raises(RwkvxError, match="arithmetic int8: needs uint8 or q4 weights, got bfloat16"):
        lin.with_arithmetic("int8")
    assert _matvec.bf16_level() in (0, 1, 2)


# ---- load and the command line (whole models: test_arithmetic_models.py) ---------------


def test_load_refuses_bf16_arithmetic_without_bfloat16():
    with pytest.raises(RwkvxError, match="arithmetic bfloat16 needs dtype bfloat16.*got dtype uint8"):
        rwkvx.load("demo", "uint8", arithmetic="bfloat16")


def test_cli_bf16_arithmetic(capsys):
    from rwkvx.run import main
    assert main(["-m", "demo", "--arithmetic", "bfloat16", "-p", "x", "-n", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["rwkvx: error: arithmetic bfloat16 needs dtype bfloat16 (its products take the weights as "
                   "they are stored), got dtype float32"]
    assert main(["-m", "demo", "--dtype", "bfloat16", "--arithmetic", "bfloat16", "-p", "def f(x):", "-n", "4",
                 "--seed", "1"]) == 0
    assert "dtype bfloat16, bfloat16 arithmetic" in capsys.readouterr().err
