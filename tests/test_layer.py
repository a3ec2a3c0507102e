"""Layer kernels (layer norm, time mixing, channel mixing) against the float64 reference."""
import numpy as np
import pytest

from rwkvx import reference
from rwkvx.kernels import _layer, _matvec
from rwkvx.errors import RwkvxError
from rwkvx.loader import load_weights
from rwkvx.weights import MATRIX_NAMES, VECTOR_NAMES, new_state

from conftest import save_random_model


@pytest.mark.parametrize("n", [1, 2, 3, 7, 17, 64, 1023])
def test_layer_norm_against_reference(rng, n):
    x, w, b = (rng.standard_normal(n).astype(np.float32) for _ in range(3))
    out = np.empty(n, np.float32)
    _layer.layer_norm(x, w, b, out)
    ref = reference.layer_norm(x.astype(np.float64), w, b)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


def test_layer_norm_raises_on_length_mismatch(rng):
    x = rng.standard_normal(5).astype(np.float32)
    with pytest.raises(RwkvxError, match="layer_norm"):
        _layer.layer_norm(x, x[:4], x, np.empty(5, np.float32))


@pytest.mark.parametrize("n_rows, n", [(0, 7), (1, 5), (3, 16384), (8, 40000), (2, 0)])
@pytest.mark.parametrize("n_threads", [1, 2, 3])
def test_copy_rows(rng, n_rows, n, n_threads):
    rows = [rng.standard_normal(n).astype(np.float32) for _ in range(n_rows)]
    dst = np.full((n_rows, n), np.nan, dtype=np.float32)
    _layer.copy_rows(dst, rows, n_threads)
    assert np.array_equal(dst, np.array(rows, dtype=np.float32).reshape(n_rows, n))


def test_copy_rows_raises_on_wrong_count():
    dst = np.zeros((2, 4), dtype=np.float32)
    with pytest.raises(RwkvxError, match="expected 2 rows"):
        _layer.copy_rows(dst, [np.zeros(4, np.float32)])


def test_copy_rows_raises_on_wrong_length():
    dst = np.zeros((2, 4), dtype=np.float32)
    with pytest.raises(RwkvxError, match="row 1 has 3 values"):
        _layer.copy_rows(dst, [np.zeros(4, np.float32), np.zeros(3, np.float32)])


@pytest.mark.parametrize("row", [np.zeros(4), np.zeros(8, np.float32)[::2], np.zeros((2, 2), np.float32)],
                         ids=["float64", "strided", "2-d"])
def test_copy_rows_raises_on_wrong_layout(row):
    dst = np.zeros((1, 4), dtype=np.float32)
    with pytest.raises(RwkvxError, match="row 0: expected a C-contiguous float32 vector"):
        _layer.copy_rows(dst, [row])


def test_exp_within_two_ulp_of_float64():
    # every float32 from the smallest normal result to the largest finite one, thinned
    bits = np.arange(np.float32(-87.33).view(np.int32), np.float32(-1e-30).view(np.int32), 97, dtype=np.int32)
    x = np.concatenate([bits.view(np.float32), np.linspace(-1, 88.72, 200_001, dtype=np.float32), np.zeros(1, np.float32)])
    got = _layer.exp_f32(x).astype(np.float64)
    want = np.exp(x.astype(np.float64))
    ulp = np.spacing(want.astype(np.float32)).astype(np.float64)
    assert np.max(np.abs(got - want) / ulp) <= 2.0
    assert _layer.exp_f32(np.zeros(1, np.float32))[0] == 1.0  # the WKV's e^0 of the larger term


def test_exp_edges():
    x = np.array([-np.inf, -1e30, -88.0, 88.73, 1e30, np.inf, np.nan], dtype=np.float32)
    got = _layer.exp_f32(x)
    # below 2^-126 flushes to 0; overflow is infinite; NaN stays NaN
    np.testing.assert_array_equal(got[:6], [0, 0, 0, np.inf, np.inf, np.inf])
    assert np.isnan(got[6])


@pytest.mark.parametrize("n_embd,n_ffn", [(1, 3), (17, 33), (64, 256)])
def test_block_against_reference(tmp_path, rng, n_embd, n_ffn):
    weights = load_weights(save_random_model(tmp_path / "m.safetensors", 1, n_embd, 11, n_ffn=n_ffn))
    p = weights.blocks[0]
    block = _layer.Block({n: p[n] for n in VECTOR_NAMES}, {n: _matvec.Linear.f32(p[n]) for n in MATRIX_NAMES})
    ws = _layer.Workspace(n_embd, n_ffn)
    state = new_state(1, n_embd)[0]
    ref_state = state.astype(np.float64)
    p64 = {k: v.astype(np.float64) for k, v in p.items()}
    for _ in range(5):  # several steps, so the carried state is exercised
        x = rng.standard_normal(n_embd).astype(np.float32)
        ref = x.astype(np.float64)
        ref = ref + reference.time_mixing(reference.layer_norm(ref, p64["ln1_weight"], p64["ln1_bias"]), ref_state, p64)
        ref = ref + reference.channel_mixing(reference.layer_norm(ref, p64["ln2_weight"], p64["ln2_bias"]), ref_state, p64)
        block.forward(x, state, ws, 2)
        np.testing.assert_allclose(x, ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(state, ref_state, rtol=1e-5, atol=1e-5)


def test_block_raises_on_bad_shapes(tmp_path):
    weights = load_weights(save_random_model(tmp_path / "m.safetensors", 1, 8, 11))
    p = weights.blocks[0]
    linears = {n: _matvec.Linear.f32(p[n]) for n in MATRIX_NAMES}
    vectors = {n: p[n] for n in VECTOR_NAMES}
    with pytest.raises(RwkvxError, match="missing att_key"):
        _layer.Block(vectors, {k: v for k, v in linears.items() if k != "att_key"})
    with pytest.raises(RwkvxError, match="ln1_bias"):
        _layer.Block(dict(vectors, ln1_bias=np.zeros(7, np.float32)), linears)
    block = _layer.Block(vectors, linears)
    with pytest.raises(RwkvxError, match="Block.forward"):
        block.forward(np.zeros(7, np.float32), np.zeros((5, 8), np.float32), _layer.Workspace(8, 32), 1)
    with pytest.raises(RwkvxError, match="workspace"):
        block.forward(np.zeros(8, np.float32), np.zeros((5, 8), np.float32), _layer.Workspace(8, 16), 1)


def test_forward_rows_takes_states_a_whole_model_apart(tmp_path, rng):
    # forward_batch passes a layer's slice of a (B, n_layer, 5, n) block: sequences are a
    # whole model state apart; results must equal those on a contiguous (B, 5, n) array
    weights = load_weights(save_random_model(tmp_path / "m.safetensors", 1, 16, 11))
    p = weights.blocks[0]
    block = _layer.Block({n: p[n] for n in VECTOR_NAMES}, {n: _matvec.Linear.f32(p[n]) for n in MATRIX_NAMES})
    n_seq, n_layer = 3, 4
    whole = rng.standard_normal((n_seq, n_layer, 5, 16)).astype(np.float32)
    contiguous = np.ascontiguousarray(whole[:, 2])
    x1 = rng.standard_normal((n_seq, 16)).astype(np.float32)
    x2 = x1.copy()
    starts = np.arange(n_seq + 1, dtype=np.intp)
    ws = _layer.SeqWorkspace(n_seq, 16, 64, 2)
    block.forward_rows(x1, whole[:, 2], starts, ws, 2)
    block.forward_rows(x2, contiguous, starts, ws, 2)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(whole[:, 2], contiguous)
    with pytest.raises(RwkvxError, match="contiguous"):
        block.forward_rows(x1, whole[:, 2, ::-1], starts, ws, 2)
