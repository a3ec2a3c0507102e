"""int8 arithmetic (Linear.with_arithmetic("int8"), load(arithmetic="int8")): against an exact
numpy model of its integer arithmetic, the same bits for every thread count, SIMD level and
batch composition, and close to the float32 products."""
import os
import platform

import numpy as np
import pytest

import rwkvx
from rwkvx.kernels import _matvec
from rwkvx.errors import RwkvxError
from rwkvx.quant import quantize_u8

from conftest import arithmetic_error, assert_one_token_in_float32, assert_same_bits_everywhere, expected_int8_loops


def _u8(rng, n_rows, n_cols):
    w = (rng.standard_normal((n_rows, n_cols)) / np.sqrt(n_cols)).astype(np.float32)
    qm = quantize_u8(w)
    return qm, _matvec.Linear.u8(qm.q, qm.mx, qm.rx, qm.my, qm.ry)


def _sum8(v: np.ndarray) -> float:
    """A float64 sum in rwkvx_prepare_u8's order: eight lanes over whole steps of eight, the
    lanes' fixed tree, then the rest in order."""
    n8 = len(v) // 8 * 8
    lanes = [float(np.cumsum(v[k:n8:8])[-1]) if n8 else 0.0 for k in range(8)]
    total = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]))
    for value in v[n8:]:
        total += float(value)
    return total


def int8_model(qm, X: np.ndarray) -> np.ndarray:
    """The int8 product X @ W.T as _int8.h and _matvec._prepare define it, in numpy: every
    float operation in float32 or float64 as the C code does it, the dot products in int64."""
    out = np.empty((X.shape[0], qm.q.shape[0]), np.float32)
    q = qm.q.astype(np.int64)
    for t, x in enumerate(X):
        xr = qm.rx * x
        amax = np.abs(xr).max()
        if amax == 0:
            scale, a = np.float32(0), np.zeros(len(x), np.int64)
        else:
            scale = amax / np.float32(127)
            a = np.clip(np.rint(xr * (np.float32(127) / amax)), -127, 127).astype(np.int64)
        s_xr = _sum8(xr.astype(np.float64))
        half_xr = np.float32(0.5 * s_xr + 127.5 * (s_xr - float(scale) * int(a.sum())))
        s_x = np.float32(_sum8(x.astype(np.float64)))
        s_mx = np.float32(_sum8(qm.mx.astype(np.float64) * x.astype(np.float64)))
        raw = (q @ a).astype(np.float32) * scale
        out[t] = qm.ry * (raw + half_xr) + qm.my * s_x + s_mx
    return out


@pytest.mark.parametrize("n_cols", [1, 2, 3, 7, 17, 31, 33, 64, 65, 127, 1023])
@pytest.mark.parametrize("n_rows", [1, 3, 4, 5, 17])
def test_int8_matmul_is_the_exact_integer_model(int8_loops, rng, n_rows, n_cols):
    qm, lin = _u8(rng, n_rows, n_cols)
    X = rng.standard_normal((7, n_cols)).astype(np.float32)
    X[2] *= 50       # a token with a larger scale than the others
    X[4, : n_cols // 2] = 0
    got = lin.with_arithmetic("int8").matmul(X, n_threads=2)
    np.testing.assert_array_equal(got, int8_model(qm, X))
    if n_rows == 4:  # one block: the loops the fixture chose ran
        assert _matvec.int8_last_loops() == expected_int8_loops()


def test_int8_wider_than_one_int32_chunk(rng):
    # 70,000 columns of 255 x -127 overflow int32 (255 * 127 * 70000 > 2^31): the sum goes
    # through int64 in chunks of 65,536 columns
    n = 70000
    qm, lin = _u8(rng, 3, n)
    q = qm.q.copy()
    q[0] = 255
    qm = type(qm)(q, qm.mx, qm.rx, qm.my, qm.ry)
    lin = _matvec.Linear.u8(q, qm.mx, qm.rx, qm.my, qm.ry).with_arithmetic("int8")
    X = np.stack([-1 / qm.rx, rng.standard_normal(n).astype(np.float32)]).astype(np.float32)
    np.testing.assert_array_equal(lin.matmul(X, n_threads=2), int8_model(qm, X))


def test_int8_same_bits_for_threads_levels_and_batches(rng):
    _, lin = _u8(rng, 130, 200)
    assert_same_bits_everywhere(lin.with_arithmetic("int8"), rng.standard_normal((13, 200)).astype(np.float32))


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or not os.path.exists("/proc/cpuinfo"),
                    reason="reads the x86 CPU's flags from /proc/cpuinfo")
def test_int8_vnni256_follows_the_cpu():
    # AVX-VNNI's loops are chosen where the CPU lists the instruction set, and a form the
    # CPU lacks is refused (0: AVX2's loops)
    flags = set(open("/proc/cpuinfo").read().split())
    vex = "avx_vnni" in flags and _matvec.AVX_VNNI_BUILT and _matvec.best_simd_level() >= 1
    evex = {"avx512_vnni", "avx512vl", "avx512bw"} <= flags
    before = _matvec.int8_vnni256()
    try:
        assert before == (1 if vex else 0)
        assert _matvec.set_int8_vnni256(1) == (1 if vex else 0)
        assert _matvec.set_int8_vnni256(2) == (2 if evex else 0)
        assert _matvec.set_int8_vnni256(0) == 0
        with pytest.raises(RwkvxError, match="int8 vnni256: expected 0, 1 or 2, got 3"):
            _matvec.set_int8_vnni256(3)
    finally:
        _matvec.set_int8_vnni256(before)


def test_int8_one_token_is_the_float32_product(rng):
    _, lin = _u8(rng, 33, 100)
    x = rng.standard_normal((1, 100)).astype(np.float32)
    assert_one_token_in_float32(lin, "int8", x)


def test_int8_close_to_float32(rng):
    # relative RMS error of the products: 0.0089 measured (256 x 1024, conftest's seed 1234)
    qm, lin = _u8(rng, 256, 1024)
    X = rng.standard_normal((16, 1024)).astype(np.float32)
    assert arithmetic_error(lin, "int8", X) < 1.5 * 0.0089


def test_int8_zero_and_nan_inputs(rng):
    _, lin = _u8(rng, 9, 40)
    X = np.zeros((2, 40), np.float32)
    # zero vectors: no rounding error, the float32 product's bits
    np.testing.assert_array_equal(lin.with_arithmetic("int8").matmul(X), lin.matmul(X))
    X[1, 3] = np.nan
    y = lin.with_arithmetic("int8").matmul(X)
    assert np.isfinite(y[0]).all() and np.isnan(y[1]).all()


def test_with_arithmetic_checks(rng):
    _, lin = _u8(rng, 4, 8)
    assert lin.arithmetic == "float32" and lin.with_arithmetic("int8").arithmetic == "int8"
    assert lin.with_arithmetic("int8").with_arithmetic("float32").arithmetic == "float32"
    with pytest.raises(RwkvxError, match="arithmetic: expected one of float32, int8, bfloat16, got 'int4'"):
        lin.with_arithmetic("int4")
    with pytest.raises(RwkvxError, match="needs uint8 or q4 weights, got float32"):
        _matvec.Linear.f32(np.ones((2, 3), np.float32)).with_arithmetic("int8")


# ---- load and the command line (whole models: test_arithmetic_models.py) ---------------


def test_load_refuses_int8_without_uint8():
    with pytest.raises(RwkvxError, match="arithmetic int8 needs dtype uint8.*got dtype float32"):
        rwkvx.load("demo", "float32", arithmetic="int8")
    with pytest.raises(RwkvxError, match="arithmetic: expected one of float32, int8, bfloat16, got 'fp8'"):
        rwkvx.load("demo", "uint8", arithmetic="fp8")


def test_cli_arithmetic(capsys):
    from rwkvx.run import main
    assert main(["-m", "demo", "--arithmetic", "int8", "-p", "x", "-n", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["rwkvx: error: arithmetic int8 needs dtype uint8 or q4 (its products take the weights as they "
                   "are stored), got dtype float32"]
    assert main(["-m", "demo", "--dtype", "uint8", "--arithmetic", "int8", "-p", "def f(x):", "-n", "4",
                 "--seed", "1"]) == 0
    assert "dtype uint8, int8 arithmetic" in capsys.readouterr().err
