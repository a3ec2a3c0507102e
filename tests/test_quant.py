"""The uint8 format: same quantisation as ChatRWKV's i8 strategy, bounded round-trip error."""
import numpy as np
import pytest

from rwkvx.errors import RwkvxError
from rwkvx.quant import quantize_u8


def chatrwkv_i8(w_out_in: np.ndarray):
    """ChatRWKV's fp32i8 quantisation (rwkv pip package), transliterated in numpy float32.

    It works on the transposed (in, out) matrix and names per-input vectors my/ry and
    per-output vectors mx/rx; returns them renamed to rwkvx's (out, in) convention.
    """
    w = w_out_in.T.astype(np.float32).copy()
    if w.shape[0] > w.shape[1]:
        my = w.min(axis=1, keepdims=True); w = w - my
        mx = w.min(axis=0); w = w - mx
    else:
        mx = w.min(axis=0); w = w - mx
        my = w.min(axis=1, keepdims=True); w = w - my
    rx = w.max(axis=0); w = w / rx
    ry = w.max(axis=1, keepdims=True); w = w / ry
    q = np.clip(np.floor(w * 256), 0, 255).astype(np.uint8)
    return {"q": q.T, "mx": my[:, 0], "rx": ry[:, 0] / 16, "my": mx, "ry": rx / 16}


@pytest.mark.parametrize("shape", [(7, 33), (33, 7), (64, 64), (256, 64), (17, 1023)])
def test_same_as_chatrwkv(rng, shape):
    w = (rng.standard_normal(shape) / np.sqrt(shape[1])).astype(np.float32)
    ours = quantize_u8(w)
    theirs = chatrwkv_i8(w)
    for name in ("q", "mx", "rx", "my", "ry"):
        np.testing.assert_array_equal(getattr(ours, name), theirs[name].astype(theirs[name].dtype), err_msg=name)


def test_round_trip_error(rng):
    w = (rng.standard_normal((512, 512)) / np.sqrt(512)).astype(np.float32)
    err = quantize_u8(w).dequantize() - w
    rel_rmse = np.sqrt((err ** 2).mean() / (w ** 2).mean())
    # measured once: 0.00672 for N(0, 1/n) weights (seed 1234); hold 1.5x that
    assert rel_rmse <= 1.5 * 0.00672
    # every weight lies within one step of its row and column scale
    qm = quantize_u8(w)
    step = 16 * qm.ry[:, None] * 16 * qm.rx[None, :] / 256
    assert (np.abs(err) <= step * 0.5 + 1e-6).all()


def test_format_invariants(rng):
    w = rng.standard_normal((40, 30)).astype(np.float32)
    qm = quantize_u8(w)
    assert qm.q.dtype == np.uint8 and qm.q.shape == (40, 30)
    assert qm.mx.shape == qm.rx.shape == (30,)
    assert qm.my.shape == qm.ry.shape == (40,)
    assert all(a.dtype == np.float32 for a in (qm.mx, qm.rx, qm.my, qm.ry))
    assert qm.nbytes == 40 * 30 + 4 * (2 * 30 + 2 * 40)


def test_input_untouched_unless_overwrite(rng):
    w = rng.standard_normal((8, 8)).astype(np.float32)
    keep = w.copy()
    quantize_u8(w)
    np.testing.assert_array_equal(w, keep)


def test_constant_rows_and_columns_are_finite():
    w = np.ones((4, 5), dtype=np.float32)
    w[2] = 3.0
    qm = quantize_u8(w)
    assert np.isfinite(qm.dequantize()).all()
    np.testing.assert_allclose(qm.dequantize(), w, atol=0.05)


def test_quantize_raises_on_non_finite_or_bad_shape():
    with pytest.raises(RwkvxError, match="NaN"):
        quantize_u8(np.array([[1.0, np.nan]], dtype=np.float32))
    with pytest.raises(RwkvxError, match="2-D"):
        quantize_u8(np.ones(5, dtype=np.float32))
