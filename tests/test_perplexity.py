"""Perplexity: the number against the float64 reference, the chunking protocol, and the CLI.

Tolerance against the reference: the mean NLL within 1e-6 nats. The fast path's logits
are float32 (within 1e-5 * max |logit| of the reference, test_model) and its log-softmax
takes exp in float32 (token_nll); the mean NLL was measured within 4.4e-8 nats of the
reference on four random 3 x 48 models (both modes) and 3.0e-8 on the trained tiny model.
"""
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import rwkvx
from rwkvx.errors import RwkvxError
from rwkvx.loader import load_weights
from rwkvx.perplexity import PerplexityResult, byte_counter, chunk_bounds, main, perplexity, token_nll
from rwkvx.reference import Reference

from conftest import ENGLISH, SHARED, TINY_MODEL, TOKENIZER_20B, save_random_model, shared_file

TOKENIZER_WORLD = SHARED / "tokenizers" / "rwkv_vocab_v20230424.txt"

FINAL = re.compile(r"^Final estimate: PPL = (\d+\.\d{4}) \+/- (\d+\.\d{5})$")


def reference_nlls(ref: Reference, tokens: list[int], ctx: int, carry_state: bool) -> np.ndarray:
    """Every scored token's NLL by the protocol's definition, in float64 from end to end."""
    nlls, state = [], None
    for begin in range(0, len(tokens), ctx):
        chunk = tokens[begin:begin + ctx]
        if len(chunk) < 2:
            continue
        logits, end_state = ref.forward(chunk, state if carry_state else None, all_logits=True)
        state = end_state
        z = logits - logits.max(axis=1, keepdims=True)
        log_probs = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        nlls += [-log_probs[i, chunk[i + 1]] for i in range(len(chunk) - 1)]
    return np.array(nlls)


def run_cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "rwkvx.perplexity", *map(str, args)], input=stdin,
                          capture_output=True, text=True, timeout=120, cwd=os.path.dirname(__file__))


@pytest.fixture
def byte_model(tmp_path):
    """A random model with the byte vocabulary, so the CLI needs no tokenizer file."""
    return save_random_model(tmp_path / "bytes.safetensors", 2, 32, 256, seed=3)


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    # 3 x 20 + 8 bytes: chunks of 20 leave a last chunk of 8 (kept); "é" is two byte tokens
    path.write_bytes(("The quick brown fox " * 3 + "jumps é").encode())
    return path


# ---- the number ----------------------------------------------------------------------------


@pytest.mark.parametrize("carry_state", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_float64_reference(tmp_path, seed, carry_state):
    path = save_random_model(tmp_path / "m.safetensors", 3, 48, 300, seed=seed)
    tokens = np.random.default_rng(seed).integers(0, 300, 70).tolist()
    result = perplexity(rwkvx.load(path), tokens, ctx=16, carry_state=carry_state)
    expected = reference_nlls(Reference(load_weights(path)), tokens, 16, carry_state)

    assert result.count == len(expected) == 4 * 15 + 5 and result.n_chunks == 5
    assert abs(result.mean_nll - expected.mean()) <= 1e-6
    assert result.ppl == pytest.approx(math.exp(expected.mean()), rel=1e-6)
    # llama.cpp's standard error: sqrt((E[x^2] - E[x]^2) / (n - 1)), times PPL
    expected_se = expected.std() / math.sqrt(len(expected) - 1) * math.exp(expected.mean())
    assert result.stderr == pytest.approx(expected_se, rel=1e-5)


@pytest.mark.parametrize("carry_state", [False, True])
def test_trained_tiny_model_matches_reference(carry_state):
    path = shared_file(TINY_MODEL)
    tokens = list(ENGLISH)
    result = perplexity(rwkvx.load(path), tokens, ctx=32, carry_state=carry_state)
    expected = reference_nlls(Reference(load_weights(path)), tokens, 32, carry_state)
    assert result.count == len(expected) == 31 * 3 + 11
    assert abs(result.mean_nll - expected.mean()) <= 1e-6
    # a trained model is far better than chance (ppl 256) on English bytes
    assert result.ppl < 20


def test_token_nll_against_float64_log_softmax():
    rng = np.random.default_rng(0)
    logits = (3 * rng.standard_normal((37, 5003))).astype(np.float32)
    logits[5, :] = 0  # a flat row: NLL ln(5003)
    logits[6, 17] = 80  # a peaked row: NLL of the peak ~0, of others ~80
    targets = rng.integers(0, 5003, 37)
    targets[6] = 17
    z = logits.astype(np.float64)
    expected = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1) - z[np.arange(37), targets]
    got = token_nll(logits, targets)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    assert got[5] == pytest.approx(math.log(5003), abs=1e-6)


def test_standard_error_formula():
    nlls = np.array([1.0, 2.0, 3.0, 2.5])
    result = PerplexityResult(nll_sum=nlls.sum(), nll_sq_sum=(nlls ** 2).sum(), count=4)
    mean = nlls.mean()
    assert result.ppl == pytest.approx(math.exp(mean))
    assert result.nll_stderr == pytest.approx(np.std(nlls) / math.sqrt(3))
    assert result.stderr == pytest.approx(np.std(nlls) / math.sqrt(3) * math.exp(mean))
    one = PerplexityResult(nll_sum=2.0, nll_sq_sum=4.0, count=1)
    assert math.isnan(one.stderr)
    assert PerplexityResult(nll_sum=4.0, nll_sq_sum=8.0, count=2).stderr == 0.0  # equal NLLs


# ---- the protocol --------------------------------------------------------------------------


def test_chunk_bounds():
    assert chunk_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert chunk_bounds(9, 4) == [(0, 4), (4, 8)]  # a last chunk of 1 token scores nothing
    assert chunk_bounds(8, 4) == [(0, 4), (4, 8)]
    assert chunk_bounds(3, 4) == [(0, 3)]
    assert chunk_bounds(1, 4) == [] and chunk_bounds(2, 2) == [(0, 2)]


def _token_nlls_in_one_pass(model, tokens):
    logits, _ = model.forward(tokens, all_logits=True)
    return token_nll(logits[:-1], np.array(tokens[1:]))


def test_fresh_state_is_each_chunk_scored_alone(tiny_path):
    model = rwkvx.load(tiny_path)
    tokens = np.random.default_rng(1).integers(0, model.n_vocab, 43).tolist()
    result = perplexity(model, tokens, ctx=10)
    # chunks 10, 10, 10, 10, 3: each chunk as a text of its own
    alone = [_token_nlls_in_one_pass(model, tokens[b:b + 10]) for b in range(0, 43, 10)]
    assert result.n_chunks == 5 and result.count == 4 * 9 + 2 and result.n_tokens == 43
    assert result.nll_sum == pytest.approx(sum(a.sum() for a in alone), rel=1e-12)
    running = [math.exp(np.concatenate(alone[:i + 1]).mean()) for i in range(5)]
    assert result.running_ppl == pytest.approx(running, rel=1e-12)


def test_carry_state_is_one_pass_without_the_chunk_starts(tiny_path):
    model = rwkvx.load(tiny_path)
    tokens = np.random.default_rng(2).integers(0, model.n_vocab, 41).tolist()
    result = perplexity(model, tokens, ctx=10, carry_state=True)
    # one pass over the 40 tokens of the kept chunks; token j is scored unless it starts a chunk
    nlls = _token_nlls_in_one_pass(model, tokens[:40])  # nlls[j - 1] scores token j
    scored = [nlls[j - 1] for j in range(1, 40) if j % 10]
    assert result.count == len(scored) == 36 and result.n_tokens == 40
    assert result.nll_sum == pytest.approx(sum(scored), rel=1e-12)
    fresh = perplexity(model, tokens, ctx=10)
    assert fresh.running_ppl[0] == result.running_ppl[0]  # the first chunk starts fresh in both
    assert fresh.nll_sum != result.nll_sum


def test_last_short_chunk_kept_from_two_tokens(tiny_path):
    model = rwkvx.load(tiny_path)
    tokens = list(range(25))
    assert perplexity(model, tokens[:21], ctx=10).count == 18  # last chunk of 1 dropped
    assert perplexity(model, tokens[:22], ctx=10).count == 19  # last chunk of 2 kept: scores 1
    one_chunk = perplexity(model, tokens, ctx=100)
    assert one_chunk.n_chunks == 1 and one_chunk.count == 24
    assert perplexity(model, tokens, ctx=100, carry_state=True).nll_sum == one_chunk.nll_sum


def test_feeding_in_pieces_changes_nothing(tiny_path):
    model = rwkvx.load(tiny_path)
    tokens = np.random.default_rng(3).integers(0, model.n_vocab, 50).tolist()
    whole = perplexity(model, tokens, ctx=24, carry_state=True)
    model.chunk_size = 5  # each chunk of 24 fed as 5 + 5 + 5 + 5 + 4: logits bit-identical
    pieces = perplexity(model, tokens, ctx=24, carry_state=True)
    assert pieces.count == whole.count
    assert pieces.nll_sum == pytest.approx(whole.nll_sum, rel=1e-12)


def test_on_chunk_sees_the_running_result(tiny_path):
    seen = []
    result = perplexity(rwkvx.load(tiny_path), list(range(30)), ctx=8,
                        on_chunk=lambda r: seen.append((r.n_chunks, r.count, r.ppl)))
    assert [s[:2] for s in seen] == [(1, 7), (2, 14), (3, 21), (4, 26)]
    assert seen[-1][2] == result.ppl and [s[2] for s in seen] == result.running_ppl


@pytest.mark.parametrize("tokens, ctx, message", [
    ([5], 8, "at least 2 tokens"),
    ([], 8, "at least 2 tokens"),
    ([1, 2, 3], 1, "ctx"),
    ([1, 2, 97], 8, "token id 97 out of range"),
    ([1, -1, 2], 8, "token id -1 out of range"),
    ([1.5, 2.0], 8, "token ids"),
])
def test_bad_arguments_raise(tiny_path, tokens, ctx, message):
    with pytest.raises(RwkvxError, match=message):
        perplexity(rwkvx.load(tiny_path), tokens, ctx=ctx)


# ---- bytes -----------------------------------------------------------------------------------


def test_bits_per_byte_counts_the_scored_bytes(tiny_path):
    model = rwkvx.load(tiny_path)
    tokens = list(range(25))
    result = perplexity(model, tokens, ctx=10, count_bytes=lambda t: 2 * len(t))
    assert result.n_bytes == 2 * result.count
    assert result.bits_per_byte == pytest.approx(result.nll_sum / math.log(2) / (2 * result.count))
    assert perplexity(model, tokens, ctx=10).bits_per_byte is None


TEXT = "Perplexity, naïvely: 10 € per token\n"


def test_byte_counter_with_the_byte_tokenizer():
    count = byte_counter(rwkvx.ByteTokenizer())
    assert count(list(TEXT.encode())) == len(TEXT.encode())


@pytest.mark.parametrize("path, n_vocab", [(TOKENIZER_20B, 50277), (TOKENIZER_WORLD, 65536)])
def test_byte_counter_with_20b_and_world_tokenizers(path, n_vocab):
    tokenizer = rwkvx.load_tokenizer(str(shared_file(path)), n_vocab)
    tokens = tokenizer.encode(TEXT)
    assert len(tokens) < len(TEXT.encode())  # some tokens stand for several bytes
    count = byte_counter(tokenizer)
    assert count(tokens) == len(TEXT.encode())
    # the bytes of a chunk's scored tokens: every token's bytes but the first's
    assert count(tokens[1:]) == len(TEXT.encode()) - len(tokenizer.token_bytes(tokens[0]))


# ---- the command line --------------------------------------------------------------------


def test_cli_prints_running_values_and_the_final_estimate(byte_model, text_file):
    result = run_cli("-m", byte_model, "-f", text_file, "--ctx", "20")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert re.fullmatch(r"\[1\]\d+\.\d{4},\[2\]\d+\.\d{4},\[3\]\d+\.\d{4},\[4\]\d+\.\d{4},", lines[0])
    assert re.match(r"64 tokens scored in 4 chunks of 20: \d+\.\d{4} bits per byte \(64 bytes\), "
                    r"\d+\.\d tokens/s$", lines[1])
    ppl, se = map(float, FINAL.match(lines[-1]).groups())
    # the same numbers as the function's
    data = text_file.read_bytes()
    expected = perplexity(rwkvx.load(byte_model), list(data), ctx=20)
    assert ppl == round(expected.ppl, 4) and se == round(expected.stderr, 5)
    assert f"[4]{expected.ppl:.4f}," in lines[0]
    assert re.search(r"68 bytes, 68 tokens \(tokenized in \d+\.\d\d s\); 4 chunks of up to 20 tokens, "
                     r"each from a fresh state", result.stderr)
    assert "Traceback" not in result.stderr


def test_cli_json_and_stdin(byte_model, text_file):
    result = run_cli("-m", byte_model, "-f", "-", "--ctx", "20", "--carry-state", "--json",
                     stdin=text_file.read_text())
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)  # stdout is exactly one JSON object
    expected = perplexity(rwkvx.load(byte_model), list(text_file.read_bytes()), ctx=20, carry_state=True,
                          count_bytes=len)
    assert out["ppl"] == pytest.approx(expected.ppl, rel=1e-12)
    assert out["ppl_stderr"] == pytest.approx(expected.stderr, rel=1e-9)
    assert out["bits_per_byte"] == pytest.approx(expected.bits_per_byte, rel=1e-12)
    assert (out["n_tokens"], out["n_chunks"], out["n_scored"], out["n_bytes"]) == (68, 4, 64, 64)
    assert out["ctx"] == 20 and out["carry_state"] is True and out["file"] == "stdin"
    assert out["tokens_per_second"] > 0 and len(out["running_ppl"]) == 4
    assert out["running_ppl"][-1] == out["ppl"]
    assert "[1]" in result.stderr  # the running values are progress, on stderr


def test_cli_uint8_and_batch_size(byte_model, text_file, capsys):
    # -b splits each chunk differently; the scores stay the same
    assert main(["-m", str(byte_model), "-f", str(text_file), "--ctx", "20", "--json"]) == 0
    default = json.loads(capsys.readouterr().out)
    assert main(["-m", str(byte_model), "-f", str(text_file), "--ctx", "20", "--json", "-b", "3"]) == 0
    assert json.loads(capsys.readouterr().out)["ppl"] == pytest.approx(default["ppl"], rel=1e-12)
    assert main(["-m", str(byte_model), "-f", str(text_file), "--ctx", "20", "--json", "--dtype", "uint8"]) == 0
    quantised = json.loads(capsys.readouterr().out)
    assert quantised["dtype"] == "uint8" and quantised["ppl"] == pytest.approx(default["ppl"], rel=0.05)


@pytest.mark.parametrize("make, extra, message", [
    (lambda d: d / "missing.txt", [], "missing.txt: no such text file"),
    (lambda d: d, [], "is a directory"),
    (lambda d: _write(d / "latin1.txt", "café".encode("latin-1")), [], "the text is not UTF-8"),
    (lambda d: _write(d / "empty.txt", b""), [], "the text is empty"),
    (lambda d: _write(d / "one.txt", b"x"), [], "the text is 1 token long"),
    (lambda d: _write(d / "ok.txt", b"some text"), ["--ctx", "1"], "--ctx: expected an integer >= 2"),
    (lambda d: _write(d / "ok.txt", b"some text"), ["--ctx", "ten"], "--ctx: expected an integer"),
    (None, [], "the following arguments are required: -f/--file"),
])
def test_bad_input_is_one_line_and_exit_2(byte_model, tmp_path, capsys, make, extra, message):
    args = ["-m", str(byte_model), *extra] + (["-f", str(make(tmp_path))] if make else [])
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("rwkvx: error: ") and message in err, err


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def test_bad_input_in_a_subprocess_has_no_traceback(byte_model, tmp_path):
    result = run_cli("-m", byte_model, "-f", "-", stdin="")
    assert result.returncode == 2
    assert result.stderr.strip() == "rwkvx: error: stdin: the text is empty"
    assert result.stdout == ""
