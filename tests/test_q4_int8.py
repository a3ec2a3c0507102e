"""q4 weights in int8 arithmetic (Linear.with_arithmetic("int8") on a q4 matrix,
load(dtype="q4", arithmetic="int8")): against a numpy model of _q4int8.h's definition, the
same bits for every thread count, SIMD level, batch composition and for one token (decoding
too goes this way), and close to the float32 products."""
import numpy as np
import pytest

from rwkvx.kernels import _matvec
from rwkvx.quant import quantize_q4

from conftest import arithmetic_error, assert_same_bits_everywhere, expected_int8_loops


def _q4(rng, n_rows, n_cols):
    w = (rng.standard_normal((n_rows, n_cols)) / np.sqrt(n_cols)).astype(np.float32)
    qm = quantize_q4(w)
    return qm, _matvec.Linear.q4(qm.q4, qm.sd, qm.sm, qm.D, qm.M, qm.n_cols)


def _fma(a, b, c):
    """fma in float32 through float64: exact while the operands' exponents are close (as
    here: products of 24 and 14 or 24 bits with sums of their own size)."""
    return (np.float64(a) * np.float64(b) + np.float64(c)).astype(np.float32)


def _tree(lanes: np.ndarray) -> np.float32:
    h = lanes[:8] + lanes[8:]
    h = h[:4] + h[4:]
    return (h[0] + h[2]) + (h[1] + h[3])


def _seq(v: np.ndarray) -> float:
    """A float64 sum in order, as the C loop adds."""
    return float(np.cumsum(v)[-1]) if len(v) else 0.0


def q4_int8_model(qm, X: np.ndarray) -> np.ndarray:
    n_rows, n = qm.shape
    G = (n + 63) // 64
    pairs, lanes = (G + 1) // 2, (G + 15) // 16 * 16
    nib = np.zeros((n_rows, 2 * pairs * 64), np.int64)
    # the nibbles in column order: dequantize's unpacking, without the scales
    packed = qm.q4.reshape(n_rows, G, 8, 4).transpose(0, 1, 3, 2)
    cols = np.empty((n_rows, G, 4, 2, 8), np.int64)
    cols[:, :, :, 0, :] = packed & 15
    cols[:, :, :, 1, :] = packed >> 4
    nib[:, :G * 64] = cols.reshape(n_rows, G * 64)
    d = np.zeros((n_rows, lanes), np.float32)
    m = np.zeros((n_rows, lanes), np.float32)
    d[:, :G] = qm.sd.astype(np.float32) * qm.D.astype(np.float32)[:, None]
    m[:, :G] = qm.sm.astype(np.float32) * qm.M.astype(np.float32)[:, None]
    out = np.empty((X.shape[0], n_rows), np.float32)
    for t, x in enumerate(X):
        amax = np.abs(x).max()
        if amax == 0:
            s, a = np.float32(0), np.zeros(n, np.int64)
        else:
            s = amax / np.float32(127)
            a = np.clip(np.rint(x * (np.float32(127) / amax)), -127, 127).astype(np.int64)
        a_pad = np.zeros(2 * pairs * 64, np.int64)
        a_pad[:n] = a
        CE = np.zeros(lanes, np.float32)
        Xg = np.zeros(lanes, np.float32)
        for g in range(G):
            j = slice(64 * g, min(64 * g + 64, n))
            CE[g] = np.float32(7.5 * _seq(x[j].astype(np.float64) - np.float64(s) * a[j]))
            Xg[g] = np.float32(_seq(x[j].astype(np.float64)))
        prod = (nib * a_pad).reshape(n_rows, 2 * pairs, 64)   # [row, group, column in group]
        for r in range(n_rows):
            acc = np.zeros(16, np.float32)
            for P in range(pairs):
                for L in range(16):
                    g, k = 2 * P + L // 8, L % 8
                    I = sum(prod[r, g, 16 * b + k] + prod[r, g, 16 * b + 8 + k] for b in range(4))
                    acc[L] = _fma(np.float32(I), d[r, g], acc[L])
            c = np.zeros(16, np.float32)
            for g in range(lanes):
                c[g % 16] = _fma(d[r, g], CE[g], c[g % 16])
                c[g % 16] = _fma(m[r, g], Xg[g], c[g % 16])
            out[t, r] = _fma(_tree(acc), s, _tree(c))
    return out


@pytest.mark.parametrize("n_cols", [1, 7, 63, 64, 65, 129, 1000, 2113])
@pytest.mark.parametrize("n_rows", [1, 4, 6])
def test_q4_int8_follows_the_definition(int8_loops, rng, n_rows, n_cols):
    qm, lin = _q4(rng, n_rows, n_cols)
    X = rng.standard_normal((3, n_cols)).astype(np.float32)
    X[1] *= 40
    X[2, : n_cols // 2] = 0
    got = lin.with_arithmetic("int8").matmul(X, n_threads=2)
    np.testing.assert_array_equal(got.view(np.uint32), q4_int8_model(qm, X).view(np.uint32))
    if n_rows == 4:  # one block: the loops the fixture chose ran
        assert _matvec.int8_last_loops() == expected_int8_loops()


def test_q4_int8_same_bits_everywhere(rng):
    # decoding (one row, the matrix-vector product) goes the same way
    _, lin = _q4(rng, 130, 300)
    assert_same_bits_everywhere(lin.with_arithmetic("int8"), rng.standard_normal((13, 300)).astype(np.float32),
                                one_row_too=True)


def test_q4_int8_close_to_float32(rng):
    # relative RMS error against the float32 product of the same q4 matrix: 0.0087 measured
    # (256 x 1024, conftest's seed 1234); int8 arithmetic of uint8 weights: 0.0089
    _, lin = _q4(rng, 256, 1024)
    X = rng.standard_normal((16, 1024)).astype(np.float32)
    assert arithmetic_error(lin, "int8", X) < 1.5 * 0.0087


def test_q4_int8_zero_and_nan_inputs(rng):
    _, lin = _q4(rng, 9, 100)
    X = np.zeros((2, 100), np.float32)
    y = lin.with_arithmetic("int8").matmul(X)
    np.testing.assert_array_equal(y, np.zeros_like(y))
    X[1, 3] = np.nan
    y = lin.with_arithmetic("int8").matmul(X)
    assert np.all(y[0] == 0) and np.isnan(y[1]).all()
    assert np.isnan(lin.with_arithmetic("int8")(X[1])).all()


# ---- load and the command line (whole models: test_arithmetic_models.py) ---------------


def test_cli_q4_int8(capsys):
    from rwkvx.run import main
    assert main(["-m", "demo", "--dtype", "q4", "--arithmetic", "int8", "-p", "def f(x):", "-n", "4",
                 "--seed", "1"]) == 0
    assert "dtype q4, int8 arithmetic" in capsys.readouterr().err
