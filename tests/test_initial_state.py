"""Initial states (load(initial_state=...), set_initial_state, --state): state-tuning files
of RWKV-5/6/7 and rwkvx state files as the state every sequence starts from."""
import os
import warnings

import numpy as np
import pytest

from safetensors.numpy import save_file

import rwkvx
from rwkvx.arch.common import WKV
from rwkvx.errors import CheckpointError, RwkvxError
from rwkvx.prompt_cache import PromptCache

from arch_random import random_checkpoint, write_safetensors
from conftest import save_random_model
from test_formats_pth import bf16_round, write_pth

N_LAYER, N_EMBD, HEAD_SIZE = 2, 64, 16
N_HEAD = N_EMBD // HEAD_SIZE
TOKENS = [5, 17, 0, 96, 33]


def _model_path(tmp_path, version, n_vocab=97):
    return write_safetensors(tmp_path / f"{version}.safetensors",
                             random_checkpoint(version, n_layer=N_LAYER, n_embd=N_EMBD, head_size=HEAD_SIZE,
                                               n_vocab=n_vocab))


def _time_states(seed=0, n_layer=N_LAYER):
    rng = np.random.default_rng(seed)
    return {f"blocks.{i}.att.time_state": (0.5 * rng.standard_normal((N_HEAD, HEAD_SIZE, HEAD_SIZE))).astype(np.float32)
            for i in range(n_layer)}


def _tuned_file(tmp_path, tensors, name="state.safetensors"):
    # as stored: float64 and int tensors too (rwkvx.testing's writer stores floats in one dtype)
    save_file(tensors, tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize("version", ["v5", "v6", "v7"])
def test_state_tuning_file_is_the_start_of_every_sequence(tmp_path, version):
    path = _model_path(tmp_path, version)
    tuned = _time_states()
    model = rwkvx.load(path, initial_state=_tuned_file(tmp_path, tuned))
    start = model.initial_state
    assert start.shape == model.state_shape and not start.flags.writeable
    # token shifts start at zero; each head's matrix as ChatRWKV and RWKV-Runner load it:
    # transposed for RWKV-5/6, as stored for RWKV-7
    assert not start[:, :WKV].any()
    for layer in range(N_LAYER):
        heads = tuned[f"blocks.{layer}.att.time_state"]
        expected = heads if version == "v7" else heads.transpose(0, 2, 1)
        np.testing.assert_array_equal(start[layer, WKV:].reshape(N_HEAD, HEAD_SIZE, HEAD_SIZE), expected)
    # no state given: the initial state, in forward, forward_batch and new_state alike
    plain = rwkvx.load(path)
    logits, state = model.forward(TOKENS)
    expected_logits, expected_state = plain.forward(TOKENS, start)
    np.testing.assert_array_equal(logits, expected_logits)
    np.testing.assert_array_equal(state, expected_state)
    batch, _ = model.forward_batch([TOKENS, TOKENS[:2]])
    np.testing.assert_array_equal(batch[0], logits)
    np.testing.assert_array_equal(batch[1], plain.forward(TOKENS[:2], start)[0])
    fresh = model.new_state()
    assert fresh.flags.writeable and np.array_equal(fresh, start)
    assert np.abs(logits - plain.forward(TOKENS)[0]).max() > 1e-3
    # the same checkpoint, another start; None is zeros again
    assert model.fingerprint == plain.fingerprint
    assert len(model.initial_state_digest) == 32 and plain.initial_state_digest == ""
    model.set_initial_state(None)
    assert model.initial_state is None and model.initial_state_digest == ""
    np.testing.assert_array_equal(model.forward(TOKENS)[0], plain.forward(TOKENS)[0])


def test_state_tuning_pth_in_bfloat16(tmp_path):
    path = _model_path(tmp_path, "v7")
    tuned = _time_states()
    model = rwkvx.load(path, dtype="bfloat16", initial_state=write_pth(tmp_path / "state.pth", tuned))
    for layer in range(N_LAYER):
        np.testing.assert_array_equal(model.initial_state[layer, WKV:].reshape(N_HEAD, HEAD_SIZE, HEAD_SIZE),
                                      bf16_round(tuned[f"blocks.{layer}.att.time_state"]))


def test_an_rwkvx_state_file_as_the_start(tmp_path):
    # a saved conversation as the start: its continuation is the conversation's
    model = rwkvx.load(save_random_model(tmp_path / "m4.safetensors"))
    _, state = model.forward(TOKENS[:3])
    model.save_state(tmp_path / "s.state", state, TOKENS[:3])
    started = rwkvx.load(tmp_path / "m4.safetensors", initial_state=tmp_path / "s.state")
    np.testing.assert_array_equal(started.forward(TOKENS[3:])[0], model.forward(TOKENS)[0])
    # states saved by either load in the other without a warning: a state does not depend
    # on where its sequence began
    started.save_state(tmp_path / "t.state", started.forward(TOKENS[3:])[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.load_state(tmp_path / "t.state")
        started.load_state(tmp_path / "s.state")
    # an array works as well
    started.set_initial_state(state.astype(np.float64))
    np.testing.assert_array_equal(started.forward(TOKENS[3:])[0], model.forward(TOKENS)[0])


def test_state_files_record_their_start(tmp_path):
    path = _model_path(tmp_path, "v6")
    tuned = rwkvx.load(path, initial_state=_tuned_file(tmp_path, _time_states()))
    plain = rwkvx.load(path)
    # a prompt cache made from the tuned start serves as a start (or a state) without a
    # warning: it belongs to this checkpoint
    PromptCache(tmp_path / "cache", tuned).prefill(TOKENS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state, tokens = plain.load_state(tmp_path / "cache")
        plain.set_initial_state(tmp_path / "cache")
    assert tokens == TOKENS
    np.testing.assert_array_equal(plain.initial_state, state)
    # a saved conversation's tokens ran from the tuned start: as a prompt cache it needs
    # that start
    tuned.save_state(tmp_path / "conv.state", tuned.forward(TOKENS)[1], TOKENS)
    with pytest.raises(CheckpointError, match="a prompt cache made from another initial state"):
        PromptCache(tmp_path / "conv.state", rwkvx.load(path))
    assert PromptCache(tmp_path / "conv.state", tuned).prefill(TOKENS + [7]).reused == len(TOKENS)


def test_rwkv4_batches_start_from_the_initial_state(tmp_path):
    model = rwkvx.load(save_random_model(tmp_path / "m4.safetensors"))
    _, start = model.forward(TOKENS[:2])
    model.set_initial_state(start)
    logits, states = model.forward_batch([TOKENS[2:], TOKENS[3:]], [None, start])
    np.testing.assert_array_equal(logits[0], model.forward(TOKENS[2:], start)[0])
    np.testing.assert_array_equal(logits[1], model.forward(TOKENS[3:])[0])


def test_prompt_cache_of_another_start_is_refused(tmp_path):
    path = _model_path(tmp_path, "v6")
    plain = rwkvx.load(path)
    PromptCache(tmp_path / "cache", plain).prefill(TOKENS)
    tuned = rwkvx.load(path, initial_state=_tuned_file(tmp_path, _time_states()))
    with pytest.raises(CheckpointError, match="from another initial state"):
        PromptCache(tmp_path / "cache", tuned)
    # its own cache serves it: the state after the prompt from the tuned start
    PromptCache(tmp_path / "tuned-cache", tuned).prefill(TOKENS)
    again = PromptCache(tmp_path / "tuned-cache", tuned).prefill(TOKENS)
    assert again.reused == len(TOKENS) - 1
    np.testing.assert_array_equal(again.state, tuned.forward(TOKENS[:-1])[1])


@pytest.mark.parametrize("change, match", [
    (lambda t: t.pop("blocks.1.att.time_state"), "without blocks.1.att.time_state: this model has 2 layers"),
    (lambda t: t.update({"blocks.2.att.time_state": t["blocks.0.att.time_state"]}),
     "it also has blocks.2.att.time_state"),
    (lambda t: t.update({"blocks.0.att.time_state": np.zeros((2, 16, 16), np.float32)}),
     r"blocks.0.att.time_state: expected \[4, 16, 16\]"),
    (lambda t: t["blocks.1.att.time_state"].__setitem__((0, 0, 0), np.nan), "holds NaN or infinite values"),
    (lambda t: t.clear() or t.update({"emb.weight": np.zeros((3, 4), np.float32)}),
     "neither an rwkvx state file nor a state-tuning file"),
    (lambda t: t.update({"blocks.1.att.time_state": np.zeros((4, 16, 16), np.int32)}),
     "tensor blocks.1.att.time_state: unsupported dtype I32"),
    (lambda t: t.update({"blocks.1.att.time_state": np.zeros((4, 16, 16), np.float64)}),
     "tensor blocks.1.att.time_state: unsupported dtype F64"),
])
def test_bad_state_tuning_files(tmp_path, change, match):
    tuned = _time_states()
    change(tuned)
    path = _tuned_file(tmp_path, tuned)
    with pytest.raises(CheckpointError, match=match):
        rwkvx.load(_model_path(tmp_path, "v7"), initial_state=path)


def test_bad_initial_states(tmp_path):
    v4 = rwkvx.load(save_random_model(tmp_path / "m4.safetensors"))
    with pytest.raises(CheckpointError, match="not an rwkvx state file"):
        v4.set_initial_state(_tuned_file(tmp_path, _time_states()))
    model = rwkvx.load(_model_path(tmp_path, "v5"))
    with pytest.raises(CheckpointError, match="no-such-file: no such file"):
        model.set_initial_state(tmp_path / "no-such-file")
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "fifo")
        with pytest.raises(CheckpointError, match="is a FIFO, not a regular file"):
            model.set_initial_state(tmp_path / "fifo")
    (tmp_path / "notes.txt").write_text("not a state")
    for path in (tmp_path / "notes.txt", tmp_path):
        with pytest.raises(CheckpointError, match="neither an rwkvx state file nor a state-tuning file"):
            model.set_initial_state(path)
    with pytest.raises(RwkvxError, match=r"state: expected a float32 array \(2, 18, 64\)"):
        model.set_initial_state(np.zeros((2, 5, 64), np.float32))
    bad = model.new_state()
    bad[0, 3, 1] = np.inf
    with pytest.raises(RwkvxError, match="initial state: holds NaN or infinite values"):
        model.set_initial_state(bad)
    # a state of another architecture
    _, state = v4.forward(TOKENS)
    v4.save_state(tmp_path / "v4.state", state)
    with pytest.raises(CheckpointError, match="a state of an RWKV-4 model; this model is RWKV-5"):
        model.set_initial_state(tmp_path / "v4.state")
    assert model.initial_state is None


def test_cli_state(tmp_path, capsys, monkeypatch):
    from rwkvx.run import main
    path = _model_path(tmp_path, "v7", n_vocab=256)
    state = _tuned_file(tmp_path, _time_states())
    args = ["-m", str(path), "--tokenizer", "bytes", "-p", "ab", "-n", "3", "--seed", "1", "--temp", "0"]
    assert main(args + ["--state", str(state)]) == 0
    tuned_text = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out != tuned_text
    # chat and perplexity take it as well
    from rwkvx.chat import main as chat
    from rwkvx.perplexity import main as perplexity
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("hello\n"))
    assert chat(["-m", str(path), "--tokenizer", "bytes", "-n", "4", "--seed", "1", "--state", str(state)]) == 0
    (tmp_path / "text.txt").write_text("some text to score " * 8)
    scored = []
    for extra in ([], ["--state", str(state)]):
        assert perplexity(["-m", str(path), "--tokenizer", "bytes", "-f", str(tmp_path / "text.txt")] + extra) == 0
        scored.append(capsys.readouterr().out)
    assert scored[0] != scored[1]
    # a state saved from another checkpoint of the same shape: one warning line
    other = rwkvx.load(write_safetensors(tmp_path / "other.safetensors", random_checkpoint(
        "v7", n_layer=N_LAYER, n_embd=N_EMBD, head_size=HEAD_SIZE, n_vocab=256, seed=1)))
    other.save_state(tmp_path / "other.state", other.forward([1, 2])[1])
    assert main(args + ["--state", str(tmp_path / "other.state")]) == 0
    err = capsys.readouterr().err
    assert "rwkvx: warning: " in err and "different checkpoint" in err and "Warning" not in err
    assert main(args + ["--state", str(tmp_path / "v7.safetensors")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "neither an rwkvx state file nor a state-tuning file" in err[-1] and "Traceback" not in "".join(err)


def test_state_tuned_checkpoint_starts_from_its_time_state(tmp_path, capsys):
    # the time_state tensors merged into the model file (RWKV-Runner reads such files)
    tensors = random_checkpoint("v6", n_layer=N_LAYER, n_embd=N_EMBD, head_size=HEAD_SIZE)
    tuned = _time_states()
    merged = write_safetensors(tmp_path / "merged.safetensors", {**tensors, **tuned})
    model = rwkvx.load(merged)
    apart = rwkvx.load(_model_path(tmp_path, "v6"), initial_state=_tuned_file(tmp_path, tuned))
    np.testing.assert_array_equal(model.initial_state, apart.initial_state)
    np.testing.assert_array_equal(model.forward(TOKENS)[0], apart.forward(TOKENS)[0])
    # convert keeps it
    from rwkvx.convert import main as convert
    assert convert([str(merged), str(tmp_path / "u8.safetensors"), "--dtype", "uint8"]) == 0
    np.testing.assert_array_equal(rwkvx.load(tmp_path / "u8.safetensors", dtype="uint8").initial_state,
                                  model.initial_state)
    # the float64 reference starts there too
    from rwkvx.arch import recognise_path
    from rwkvx.arch.common import Reference, read_weights
    arch, source = recognise_path(merged)
    ref_logits, _ = Reference(read_weights(source, arch)).forward(TOKENS)
    logits = model.forward(TOKENS)[0]
    assert np.abs(ref_logits - logits).max() <= 1e-5 * np.abs(ref_logits).max()
    # states saved with the merged file and with the base model plus the tuning file are one
    # checkpoint's
    assert model.fingerprint == apart.fingerprint
    from rwkvx.run import main as run
    assert run(["-m", str(merged), "--info"]) == 0
    assert "state-tuned   sequences start from the file's blocks.N.att.time_state" in capsys.readouterr().out


@pytest.mark.parametrize("change, match", [
    (lambda t: t.pop("blocks.1.att.time_state"), "missing blocks.1.att.time_state"),
    (lambda t: t.update({"blocks.0.att.time_state": np.zeros((4, 16, 8), np.float32)}),
     r"blocks.0.att.time_state: expected \[4, 16, 16\], got \[4, 16, 8\]"),
])
def test_bad_state_tuned_checkpoints(tmp_path, change, match):
    tensors = {**random_checkpoint("v7", n_layer=N_LAYER, n_embd=N_EMBD, head_size=HEAD_SIZE), **_time_states()}
    change(tensors)
    with pytest.raises(CheckpointError, match=match):
        rwkvx.load(write_safetensors(tmp_path / "m.safetensors", tensors))
