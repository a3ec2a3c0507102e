"""RWKV-5.2, 6 and 7 (rwkvx.arch): the float32 runtime against the float64 reference on random
models with several heads and layers, in every dtype and layout; the guarantees of sequence
mode, batching and threads; states; bad files.

Tolerance: logits and states within 1e-5 x their largest magnitude of the float64 reference
(the issue's target; measured 3-5e-7 here: float32 rounding through 3 layers)."""
from __future__ import annotations

import numpy as np
import pytest

import rwkvx
from rwkvx.arch import recognise_path
from rwkvx.arch.common import Reference, read_weights
from rwkvx.arch.model import RWKVNext
from rwkvx.errors import CheckpointError, RwkvxError

from arch_random import random_checkpoint, write_rwkv_cpp, write_safetensors
from conftest import save_random_model

VERSIONS = ["v5", "v6", "v7"]
NAMES = {"v5": "RWKV-5", "v6": "RWKV-6", "v7": "RWKV-7"}
REL = 1e-5
TOKENS = [5, 17, 0, 96, 33, 33, 2, 64, 7, 81, 12, 40, 3, 55, 90, 1, 28, 61, 9, 70]


def _close(actual, expected, rel=REL):
    err = np.abs(np.asarray(actual, np.float64) - expected).max()
    assert err <= rel * np.abs(expected).max(), f"max abs diff {err:.3g} vs max {np.abs(expected).max():.3g}"


def _model(path, dtype="float32", threads=1):
    arch, source = recognise_path(path)
    weights = read_weights(source, arch, dtype)
    return RWKVNext(weights, threads=threads), Reference(weights)


@pytest.fixture(params=VERSIONS)
def version(request):
    return request.param


@pytest.fixture
def checkpoint(tmp_path, version):
    return write_safetensors(tmp_path / f"{version}.safetensors", random_checkpoint(version))


def test_recognised_from_names_alone(checkpoint, version):
    model = rwkvx.load(checkpoint)
    assert model.architecture == NAMES[version]
    assert (model.n_layer, model.n_embd, model.n_head, model.head_size) == (3, 64, 4, 16)
    assert model.state_shape == (3, 2 + 16, 64)
    assert model.new_state().shape == model.state_shape and model.new_state().dtype == np.float32


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "uint8"])
def test_runtime_matches_reference(checkpoint, dtype):
    # the reference takes the matrices as each dtype holds them (uint8 dequantised)
    model, ref = _model(checkpoint, dtype)
    logits, state = model.forward(TOKENS, all_logits=True)
    ref_logits, ref_state = ref.forward(TOKENS, all_logits=True)
    assert logits.dtype == np.float32 and logits.shape == (len(TOKENS), 97)
    _close(logits, ref_logits)
    _close(state, ref_state)


@pytest.mark.parametrize("head_size", [16, 64])
def test_rwkv_cpp_layout_reads_as_blinkdl(tmp_path, version, head_size):
    # rwkv.cpp's converter squeezes, transposes, packs and pre-transforms; undone on load.
    # One head of 64 too: squeezing leaves its per-head tensors without the head axis
    tensors = random_checkpoint(version, seed=3, head_size=head_size)
    a = rwkvx.load(write_safetensors(tmp_path / "a.safetensors", tensors))
    b = rwkvx.load(write_rwkv_cpp(tmp_path / "b.bin", version, tensors))
    assert b.architecture == NAMES[version]
    assert (a.n_head, a.head_size) == (b.n_head, b.head_size) == (64 // head_size, head_size)
    la, _ = a.forward(TOKENS)
    lb, _ = b.forward(TOKENS)
    # v5's decay factor is exp(-exp(x)) in float64 here, in float32 in the converter
    np.testing.assert_allclose(lb, la, rtol=0, atol=1e-5 * np.abs(la).max())


def _token_by_token(model, tokens):
    """(logits after each token, final state), feeding one token per call."""
    s, rows = None, []
    for t in tokens:
        one, s = model.forward([t], s)
        rows.append(one)
    return np.stack(rows), s


def test_sequence_mode_is_bit_identical_to_token_by_token(checkpoint):
    model = rwkvx.load(checkpoint)
    logits, state = model.forward(TOKENS, all_logits=True)
    rows, s = _token_by_token(model, TOKENS)
    assert np.array_equal(rows, logits) and np.array_equal(s, state)
    for chunk in (1, 3, 7):
        model.chunk_size = chunk
        again, again_state = model.forward(TOKENS, all_logits=True)
        assert np.array_equal(again, logits) and np.array_equal(again_state, state)
    last, _ = model.forward(TOKENS)
    assert np.array_equal(last, logits[-1])


def test_forward_leaves_the_state_passed_in_unchanged(checkpoint):
    model = rwkvx.load(checkpoint)
    _, state = model.forward(TOKENS[:5])
    kept = state.copy()
    a, _ = model.forward(TOKENS[5:], state)
    b, _ = model.forward(TOKENS[5:], state)
    assert np.array_equal(state, kept) and np.array_equal(a, b)


def test_forward_batch_matches_each_sequence_alone(checkpoint):
    model = rwkvx.load(checkpoint)
    _, start = model.forward(TOKENS[:4])
    seqs = [TOKENS[4:9], [3], TOKENS[::-1]]
    logits, states = model.forward_batch(seqs, [start, None, start])
    for i, (toks, st) in enumerate(zip(seqs, [start, None, start])):
        alone, alone_state = model.forward(toks, st)
        assert np.array_equal(logits[i], alone) and np.array_equal(states[i], alone_state)
    # chunks that split sequences, and one token per sequence (batched decoding)
    for chunk in (2, 5):
        model.chunk_size = chunk
        again, again_states = model.forward_batch(seqs, [start, None, start])
        assert np.array_equal(again, logits) and all(np.array_equal(a, b) for a, b in zip(again_states, states))
    model.chunk_size = 128
    step, step_states = model.forward_batch([[t] for t in seqs[2][:4]], [states[0], start, None, states[2]])
    for i, st in enumerate([states[0], start, None, states[2]]):
        alone, alone_state = model.forward([seqs[2][i]], st)
        assert np.array_equal(step[i], alone) and np.array_equal(step_states[i], alone_state)


def test_bfloat16_storage_is_bit_identical_to_float32_of_a_bf16_checkpoint(tmp_path, version):
    path = write_safetensors(tmp_path / "bf16.safetensors", random_checkpoint(version), dtype="bfloat16")
    a, _ = rwkvx.load(path, dtype="float32").forward(TOKENS, all_logits=True)
    b, _ = rwkvx.load(path, dtype="bfloat16").forward(TOKENS, all_logits=True)
    assert np.array_equal(a, b)


def test_threads_give_the_same_bits(tmp_path, version):
    # wide enough that the feed-forward products run on both threads
    path = write_safetensors(tmp_path / "w.safetensors",
                             random_checkpoint(version, n_layer=1, n_embd=128, head_size=32))
    one, s1 = rwkvx.load(path, threads=1).forward(TOKENS, all_logits=True)
    two, s2 = rwkvx.load(path, threads=2).forward(TOKENS, all_logits=True)
    assert np.array_equal(one, two) and np.array_equal(s1, s2)


def test_models_run_from_several_python_threads_at_once_give_the_same_bits(tmp_path):
    # the products keep their scratch per Python thread between calls (_matvec._scratch):
    # models of different widths prompted at the same time from four threads (the kernels
    # release the GIL) must give what each gives alone, in every dtype's product loop
    from concurrent.futures import ThreadPoolExecutor
    cases = []
    for i, version in enumerate(VERSIONS + ["v6"]):
        path = write_safetensors(tmp_path / f"{i}.safetensors",
                                 random_checkpoint(version, n_layer=2, n_embd=64 * (i + 1), head_size=16, seed=i))
        dtype = ["float32", "bfloat16", "uint8", "q4"][i]
        cases.append((rwkvx.load(path, dtype=dtype, threads=2), TOKENS * (i + 1)))
    alone = [model.forward(tokens, all_logits=True) for model, tokens in cases]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(3):
            together = list(pool.map(lambda case: case[0].forward(case[1], all_logits=True), cases))
            for (a, sa), (b, sb) in zip(alone, together):
                assert np.array_equal(a, b) and np.array_equal(sa, sb)


def test_state_file_round_trip(tmp_path, checkpoint):
    model = rwkvx.load(checkpoint)
    _, state = model.forward(TOKENS[:8])
    model.save_state(tmp_path / "s.state", state, TOKENS[:8])
    loaded, tokens = model.load_state(tmp_path / "s.state")
    assert np.array_equal(loaded, state) and tokens == TOKENS[:8]
    a, _ = model.forward(TOKENS[8:], state)
    b, _ = model.forward(TOKENS[8:], loaded)
    assert np.array_equal(a, b)


def test_a_state_of_another_architecture_is_refused(tmp_path):
    models = {v: rwkvx.load(write_safetensors(tmp_path / f"{v}.safetensors", random_checkpoint(v)))
              for v in VERSIONS}
    models["v4"] = rwkvx.load(save_random_model(tmp_path / "v4.safetensors"))
    for name, model in models.items():
        _, state = model.forward([1, 2])
        model.save_state(tmp_path / f"{name}.state", state)
    for name, model in models.items():
        for other in models:
            if other != name:
                with pytest.raises(CheckpointError, match="a state of an RWKV-"):
                    model.load_state(tmp_path / f"{other}.state")
    with pytest.raises(RwkvxError, match="state: expected a float32 array"):
        models["v7"].forward([1], models["v6"].new_state()[:, :4])
    # same shape (v5 and v6 here), other architecture: refused by the file, run if passed as an array
    assert models["v5"].state_shape == models["v6"].state_shape


def test_fingerprint_is_the_same_for_every_dtype(checkpoint):
    prints = {rwkvx.load(checkpoint, dtype=d).fingerprint for d in ("float32", "bfloat16", "uint8")}
    assert len(prints) == 1


def test_bad_tokens_are_refused(checkpoint):
    model = rwkvx.load(checkpoint)
    with pytest.raises(RwkvxError, match="out of range"):
        model.forward([97])
    with pytest.raises(RwkvxError, match="at least one token"):
        model.forward([])


def test_missing_and_misshaped_tensors_are_named_in_one_error(tmp_path, version):
    tensors = random_checkpoint(version)
    del tensors["blocks.1.att.key.weight"]
    tensors["blocks.2.ffn.value.weight"] = tensors["blocks.2.ffn.value.weight"][:, :10]
    path = write_safetensors(tmp_path / "bad.safetensors", tensors)
    with pytest.raises(CheckpointError) as e:
        rwkvx.load(path)
    message = str(e.value)
    assert "missing blocks.1.att.key.weight" in message and "blocks.2.ffn.value.weight" in message
    assert "\n" not in message


def test_unknown_dtype_is_refused(checkpoint):
    with pytest.raises(RwkvxError, match="dtype"):
        rwkvx.load(checkpoint, dtype="int4")


def test_info_reads_headers_only(checkpoint, version):
    from rwkvx.arch import describe
    text = describe(checkpoint)
    assert f"{NAMES[version]} (x0" in text and "3 layers, n_embd 64, 4 heads of 16, vocabulary 97" in text
    assert "kept float32" in text and "uint8" in text


def test_info_of_an_rwkv_4_file_is_left_to_the_rwkv_4_loader(tmp_path):
    from rwkvx.arch import describe
    assert describe(save_random_model(tmp_path / "v4.safetensors")) is None


def test_simd_levels_1_and_2_give_the_same_bits(checkpoint):
    # the shared matrix kernels promise it for AVX2 vs AVX-512; the v5+ kernels have one path
    from rwkvx.kernels import _matvec
    if _matvec.best_simd_level() < 2:
        pytest.skip("needs a CPU with AVX-512")
    model = rwkvx.load(checkpoint, dtype="bfloat16")
    before = _matvec.simd_level()
    try:
        results = []
        for level in (1, 2):
            _matvec.set_simd_level(level)
            results.append(model.forward(TOKENS, all_logits=True))
    finally:
        _matvec.set_simd_level(before)
    assert np.array_equal(results[0][0], results[1][0]) and np.array_equal(results[0][1], results[1][1])


def test_states_still_held_are_never_reused(checkpoint):
    # new states come from a pool of arrays the model handed out before; an array is
    # reused only once nothing refers to it (a view of it counts)
    model = rwkvx.load(checkpoint)
    _, kept = model.forward(TOKENS[:3])
    _, other = model.forward(TOKENS[3:6])
    view = other[1]
    del other
    copies = kept.copy(), view.copy()
    s = None
    for t in TOKENS:
        _, s = model.forward([t], s)
        model.forward_batch([[t], [TOKENS[0]]], [s, None])
    assert np.array_equal(kept, copies[0]) and np.array_equal(view, copies[1])


def test_a_state_let_go_is_reused(checkpoint):
    model = rwkvx.load(checkpoint)
    _, state = model.forward(TOKENS[:3])
    address = state.ctypes.data
    del state
    _, again = model.forward(TOKENS[:3])
    assert again.ctypes.data == address


# ---- the fused token steps (rwkvx.kernels._step): one decoded token, one call a layer ----

STEP_TOKENS = [5, 17, 0, 96, 33, 2, 64, 7]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "uint8", "q4"])
@pytest.mark.parametrize("threads", [1, 2])
def test_decoding_token_by_token_is_bit_identical_to_a_prompt(tmp_path, version, dtype, threads):
    # wide enough that every product group runs on both threads; the token step and the rows
    # path share their kernels, so one token gives the same bits through either
    path = write_safetensors(tmp_path / "m.safetensors",
                             random_checkpoint(version, n_layer=3, n_embd=128, head_size=32))
    model = rwkvx.load(path, dtype=dtype, threads=threads)
    logits, state = model.forward(STEP_TOKENS, all_logits=True)
    rows, s = _token_by_token(model, STEP_TOKENS)
    assert np.array_equal(rows, logits) and np.array_equal(s, state)


@pytest.mark.parametrize("dtype,arithmetic", [("float32", "float32"), ("bfloat16", "float32"),
                                              ("float16", "float32"), ("uint8", "float32"), ("q4", "float32"),
                                              ("uint8", "int8"), ("bfloat16", "bfloat16"), ("q4", "int8")])
@pytest.mark.parametrize("threads", [1, 2])
def test_a_batched_decoding_step_gives_the_rows_paths_bits(tmp_path, version, dtype, arithmetic, threads):
    # one token for each sequence runs the fused step (rwkvx.kernels._step, _Step.batch); a
    # fourth row for one sequence sends the same rows through the numpy-glued rows path
    path = write_safetensors(tmp_path / "m.safetensors",
                             random_checkpoint(version, n_layer=3, n_embd=128, head_size=32))
    model = rwkvx.load(path, dtype=dtype, threads=threads, arithmetic=arithmetic)
    _, states = model.forward_batch([STEP_TOKENS[:3], STEP_TOKENS[2:7], STEP_TOKENS[1:2], STEP_TOKENS[4:6]])
    # three sequences, and four (the row kernels then run on the product threads too)
    for n in (3, 4):
        steps = [[40 + i] for i in range(n)]
        fused, fused_states = model.forward_batch(steps, states[:n])
        rows, rows_states = model.forward_batch(steps[:-1] + [steps[-1] + [50]], states[:n])
        for i in range(n - 1):
            assert np.array_equal(fused[i], rows[i]) and np.array_equal(fused_states[i], rows_states[i])
        # the states passed in are left as they were, and the step is repeatable
        again, _ = model.forward_batch(steps, states[:n])
        assert np.array_equal(again, fused)


def test_the_batched_step_may_update_its_states_in_place(tmp_path, version):
    path = write_safetensors(tmp_path / "m.safetensors", random_checkpoint(version, n_layer=2))
    model = rwkvx.load(path)
    layer = model.layers[1]
    _, states = model.forward_batch([STEP_TOKENS[:3], STEP_TOKENS[3:5]])
    rng = np.random.default_rng(0)
    X = rng.standard_normal((2, model.n_embd)).astype(np.float32)
    v_first = rng.standard_normal((2, model.n_embd)).astype(np.float32)
    apart, X_apart = [np.empty_like(s[1]) for s in states], X.copy()
    layer.step.batch(X_apart, apart, [s[1] for s in states], v_first, 2)
    inplace, X_inplace = [s[1].copy() for s in states], X.copy()
    layer.step.batch(X_inplace, inplace, inplace, v_first, 2)
    assert all(np.array_equal(a, b) for a, b in zip(apart, inplace)) and np.array_equal(X_apart, X_inplace)
    # row b of a batch is what one token of sequence b gives alone
    for b in range(2):
        alone, x = states[b][1].copy(), X[b].copy()
        layer.step(x, alone, alone, v_first[b].copy(), 1)
        assert np.array_equal(alone, inplace[b]) and np.array_equal(x, X_inplace[b])


def test_the_token_step_may_update_its_state_in_place(tmp_path, version):
    path = write_safetensors(tmp_path / "m.safetensors", random_checkpoint(version, n_layer=2))
    model = rwkvx.load(path)
    layer = model.layers[1]
    _, state = model.forward(STEP_TOKENS[:3])
    x = np.random.default_rng(0).standard_normal(model.n_embd).astype(np.float32)
    v_first = np.random.default_rng(1).standard_normal(model.n_embd).astype(np.float32)
    apart, x_apart = np.empty_like(state[1]), x.copy()
    layer.step(x_apart, apart, state[1], v_first, 1)
    inplace, x_inplace = state[1].copy(), x.copy()
    layer.step(x_inplace, inplace, inplace, v_first, 1)
    assert np.array_equal(apart, inplace) and np.array_equal(x_apart, x_inplace)


def test_the_token_step_refuses_wrong_shapes(tmp_path, version):
    path = write_safetensors(tmp_path / "m.safetensors", random_checkpoint(version, n_layer=1))
    model = rwkvx.load(path)
    C = model.n_embd
    state = model.new_state()[0]
    with pytest.raises(rwkvx.RwkvxError, match="x and v_first"):
        model.layers[0].step(np.zeros(C + 1, np.float32), state, state, np.zeros(C, np.float32))
    with pytest.raises(rwkvx.RwkvxError, match="state: expected"):
        model.layers[0].step(np.zeros(C, np.float32), state[1:], state, np.zeros(C, np.float32))
    X = np.zeros((2, C), np.float32)
    with pytest.raises(rwkvx.RwkvxError, match="expected 2 states and sources"):
        model.layers[0].step.batch(X, [state], [state], X)
    with pytest.raises(rwkvx.RwkvxError, match="source: expected"):
        model.layers[0].step.batch(X, [state, state], [state, state[1:]], X)
    with pytest.raises(rwkvx.RwkvxError, match="X and v_first"):
        model.layers[0].step.batch(X, [state, state], [state, state], X[:1])
    frozen = state.copy()
    frozen.flags.writeable = False
    with pytest.raises(rwkvx.RwkvxError, match="state 1: expected a writable"):
        model.layers[0].step.batch(X, [state, frozen], [state, state], X)


def test_only_one_row_for_each_sequence_takes_the_fused_step():
    from rwkvx.arch.common import one_row_each
    assert one_row_each(np.arange(4), 3) and one_row_each(np.arange(2), 1)
    # as many rows as sequences, but one sequence empty and another with two
    assert not one_row_each(np.array([0, 0, 2]), 2) and not one_row_each(np.array([0, 2]), 2)


def test_the_rwkv_7_token_step_needs_v_first(tmp_path):
    path = write_safetensors(tmp_path / "m.safetensors", random_checkpoint("v7", n_layer=1))
    model = rwkvx.load(path)
    state = model.new_state()[0]
    with pytest.raises(rwkvx.RwkvxError, match="RWKV-7 needs v_first"):
        model.layers[0].step(np.zeros(model.n_embd, np.float32), state, state)
