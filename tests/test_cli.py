"""python -m rwkvx.run end to end, and every bad input giving one line and exit status 2."""
import os
import subprocess
import sys

import numpy as np

import pytest

from rwkvx.model import DEFAULT_CHUNK_SIZE
from rwkvx.run import main

from conftest import TINY_MODEL, TOKENIZER_20B, save_random_model, shared_file


def run_cli(*args, stdin=None):
    # run outside the source tree, whose uncompiled rwkvx/ would shadow the installed package
    return subprocess.run([sys.executable, "-m", "rwkvx.run", *map(str, args)], input=stdin,
                          capture_output=True, text=True, timeout=120, cwd=os.path.dirname(__file__))


@pytest.fixture
def byte_model(tmp_path):
    """A random model with the byte vocabulary, so the CLI picks the byte tokenizer."""
    return save_random_model(tmp_path / "bytes.safetensors", 2, 32, 256)


def test_generates_and_reports(byte_model):
    result = run_cli("-m", byte_model, "-p", "Hello", "-n", "20", "-s", "7", "--temp", "0.8", "--top-k", "50")
    assert result.returncode == 0, result.stderr
    lines = result.stderr.strip().splitlines()
    assert "2 layers, 32 wide, vocabulary 256, dtype float32" in lines[0]
    assert "generated 20 tokens" in lines[-1] and "tokens/s" in lines[-1]
    assert "Traceback" not in result.stderr
    # same seed, same text
    again = run_cli("-m", byte_model, "-p", "Hello", "-n", "20", "-s", "7", "--temp", "0.8", "--top-k", "50")
    assert again.stdout == result.stdout


def test_prompt_from_file_and_stdin(byte_model, tmp_path):
    (tmp_path / "prompt.txt").write_text("Once upon a time")
    from_file = run_cli("-m", byte_model, "-f", tmp_path / "prompt.txt", "-n", "8", "--temp", "0")
    from_stdin = run_cli("-m", byte_model, "-n", "8", "--temp", "0", stdin="Once upon a time")
    from_arg = run_cli("-m", byte_model, "-p", "Once upon a time", "-n", "8", "--temp", "0")
    assert from_file.returncode == from_stdin.returncode == from_arg.returncode == 0
    assert from_file.stdout == from_stdin.stdout == from_arg.stdout


@pytest.mark.parametrize("dtype", ["uint8", "bfloat16", "float16"])
def test_dtypes_and_threads(byte_model, dtype):
    result = run_cli("-m", byte_model, "-p", "abc", "-n", "5", "--dtype", dtype, "-t", "1", "-s", "1")
    assert result.returncode == 0, result.stderr
    assert f"dtype {dtype}, 1 thread (--threads)" in result.stderr


def test_no_mmap_gives_the_same_text(byte_model, capsys):
    outs = []
    for extra in ([], ["--no-mmap"]):
        assert main(["-m", str(byte_model), "-p", "abc", "-n", "12", "--temp", "0", "--dtype", "float32",
                     *extra]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and outs[0]


def test_batch_size_does_not_change_the_text(capsys):
    path = str(shared_file(TINY_MODEL))
    outs = []
    for batch in ("1", "3", "64"):
        assert main(["-m", path, "-p", "A prompt of a few dozen bytes, fed in chunks.", "-n", "20",
                     "--temp", "0", "-b", batch]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] == outs[2]


def test_stop_string(capsys):
    path = shared_file(TINY_MODEL)
    assert main(["-m", str(path), "-p", "In the", "-n", "60", "--temp", "0"]) == 0
    full = capsys.readouterr().out
    stop = full[5:8]
    assert main(["-m", str(path), "-p", "In the", "-n", "60", "--temp", "0", "--stop", stop]) == 0
    assert capsys.readouterr().out == full[:full.index(stop)]


def test_trained_model_with_greedy_sampling_is_deterministic(capsys):
    path = str(shared_file(TINY_MODEL))
    outs = []
    for dtype in ("float32", "float32", "uint8"):
        assert main(["-m", path, "-p", "The ", "-n", "30", "--temp", "0", "--dtype", dtype]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and len(outs[0]) > 0
    # uint8 is close to float32 on this model, not equal: its greedy text may differ
    assert len(outs[2]) > 0


def test_help_documents_every_flag():
    result = run_cli("--help")
    assert result.returncode == 0
    for flag in ("--model", "--prompt", "--file", "--n-predict", "--threads", "--seed", "--temp", "--top-k",
                 "--top-p", "--presence-penalty", "--frequency-penalty", "--tokenizer", "--dtype", "--stop"):
        assert flag in result.stdout
    # the help states the model's real default chunk
    assert f"(default: {DEFAULT_CHUNK_SIZE})" in " ".join(result.stdout.split())


@pytest.mark.parametrize("args,match", [
    (["-n", "-1"], "n-predict"),
    (["--top-p", "0"], "top-p"),
    (["--top-p", "1.5"], "top-p"),
    (["--temp", "-0.5"], "temp"),
    (["--top-k", "-1"], "top-k"),
    (["-t", "0"], "threads"),
    (["--dtype", "int4"], "invalid choice: 'int4'"),
    (["--bogus"], "unrecognized arguments"),
    (["-s", "x"], "seed"),
    (["-b", "0"], "batch-size"),
    (["-t", "100000"], "threads"),
])
def test_bad_options(byte_model, capsys, args, match):
    assert main(["-m", str(byte_model), "-p", "x", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rwkvx: error: ") and match in err and err.count("\n") == 1


@pytest.mark.parametrize("model,match", [
    ("missing.safetensors", "no such file"),
    ("garbage.bin", "not a checkpoint"),
    ("truncated.safetensors", "truncated"),
])
def test_bad_model_files(tmp_path, byte_model, capsys, model, match):
    (tmp_path / "garbage.bin").write_bytes(b"garbage" * 10)
    (tmp_path / "truncated.safetensors").write_bytes(byte_model.read_bytes()[:5000])
    assert main(["-m", str(tmp_path / model), "-p", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rwkvx: error: ") and match in err and err.count("\n") == 1


def test_bad_tokenizers(tmp_path, byte_model, capsys):
    assert main(["-m", str(byte_model), "-p", "x", "--tokenizer", str(tmp_path / "nope.json")]) == 2
    assert "nope.json" in capsys.readouterr().err
    big_vocab = shared_file(TOKENIZER_20B)
    assert main(["-m", str(byte_model), "-p", "x", "--tokenizer", str(big_vocab)]) == 2
    assert "50277 tokens but the model's vocabulary has 256" in capsys.readouterr().err


def test_vocabulary_without_tokenizer(tmp_path, capsys):
    path = save_random_model(tmp_path / "m.safetensors", 1, 8, 300)
    assert main(["-m", str(path), "-p", "x"]) == 2
    assert "tokenizer" in capsys.readouterr().err


def test_missing_prompt_file(byte_model, tmp_path, capsys):
    assert main(["-m", str(byte_model), "-f", str(tmp_path / "nope.txt")]) == 2
    assert "nope.txt: no such prompt file" in capsys.readouterr().err


def test_empty_prompt(byte_model, capsys):
    assert main(["-m", str(byte_model), "-p", ""]) == 2
    assert capsys.readouterr().err.startswith("rwkvx: error: ")


def test_stdin_that_is_not_utf8(byte_model):
    result = subprocess.run([sys.executable, "-m", "rwkvx.run", "-m", str(byte_model), "-n", "2"],
                            input=b"ab\xff", capture_output=True, timeout=120, cwd=os.path.dirname(__file__))
    assert result.returncode == 2 and b"not UTF-8" in result.stderr


def test_stdout_that_cannot_encode_the_text(byte_model):
    env = {**os.environ, "PYTHONIOENCODING": "ascii"}
    result = subprocess.run([sys.executable, "-m", "rwkvx.run", "-m", str(byte_model), "-p", "hello", "-n", "40",
                             "-s", "3"], capture_output=True, text=True, timeout=120, env=env,
                            cwd=os.path.dirname(__file__))
    assert result.returncode == 0, result.stderr


def test_errors_have_no_traceback_in_a_real_process(tmp_path):
    (tmp_path / "garbage.bin").write_bytes(b"\x00" * 100)
    result = run_cli("-m", tmp_path / "garbage.bin", "-p", "x")
    assert result.returncode == 2
    assert result.stderr.startswith("rwkvx: error: ") and "Traceback" not in result.stderr


# ---- sampling flags: --min-p, --logit-bias, --repeat-penalty, --repeat-last-n

BAD_SAMPLING_FLAGS = [
    (["--min-p", "1.5"], "argument --min-p: expected a number in [0, 1], got 1.5"),
    (["--min-p", "-0.1"], "argument --min-p: expected a number in [0, 1]"),
    (["--min-p", "nan"], "argument --min-p: expected a finite number"),
    (["--min-p", "x"], "argument --min-p: expected a number"),
    (["--logit-bias", "15043"], "argument --logit-bias: expected TOKEN_ID+BIAS or TOKEN_ID-BIAS"),
    (["--logit-bias", "abc+1"], "argument --logit-bias: expected TOKEN_ID+BIAS"),
    (["--logit-bias", "5+"], "argument --logit-bias: expected TOKEN_ID+BIAS"),
    (["--logit-bias", "5--1"], "argument --logit-bias: expected TOKEN_ID+BIAS"),
    (["--logit-bias", "5+nan"], "argument --logit-bias: expected TOKEN_ID+BIAS"),
    (["--logit-bias", "-5+1"], "argument --logit-bias: expected one argument"),
    (["--logit-bias", "5+1x"], "argument --logit-bias: expected TOKEN_ID+BIAS"),
    (["--logit-bias", "99999999999+1"], "logit_bias: expected a token id"),
    (["--repeat-penalty", "0"], "argument --repeat-penalty: expected a number > 0, got 0"),
    (["--repeat-penalty", "-1.1"], "argument --repeat-penalty: expected a number > 0"),
    (["--repeat-penalty", "inf"], "argument --repeat-penalty: expected a finite number"),
    (["--repeat-last-n", "-2"], "argument --repeat-last-n: expected an integer >= -1, got -2"),
    (["--repeat-last-n", "1.5"], "argument --repeat-last-n: expected an integer"),
]


@pytest.mark.parametrize("args,match", BAD_SAMPLING_FLAGS)
def test_bad_sampling_flags(byte_model, capsys, args, match):
    assert main(["-m", str(byte_model), "-p", "x", "-n", "2", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rwkvx: error: ") and match in err and err.count("\n") == 1


def test_logit_bias_outside_the_models_vocabulary(byte_model, capsys):
    # Only the loaded model knows its vocabulary: checked right after loading, before any output
    assert main(["-m", str(byte_model), "-p", "x", "-n", "2", "--logit-bias", "300+1"]) == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines() == ["rwkvx: error: logit_bias: expected a token id in 0..255, got 300"]
    assert captured.out == ""
    assert "Traceback" not in captured.err and captured.out == ""


def test_bad_sampling_flags_in_a_real_process(byte_model):
    # one bad value per new flag, through a real interpreter
    by_flag = {args[0]: (args, match) for args, match in reversed(BAD_SAMPLING_FLAGS)}
    assert len(by_flag) == 4
    for args, match in by_flag.values():
        result = run_cli("-m", byte_model, "-p", "x", "-n", "2", *args)
        assert result.returncode == 2, args
        assert result.stderr.startswith("rwkvx: error: ") and match in result.stderr
        assert result.stderr.count("\n") == 1 and result.stdout == ""


def generated(capsys, byte_model, *args) -> str:
    assert main(["-m", str(byte_model), "-p", "Hello", "-n", "24", "-t", "1", *args]) == 0
    return capsys.readouterr().out


def test_min_p_1_is_greedy(byte_model, capsys):
    greedy = generated(capsys, byte_model, "--temp", "0")
    assert generated(capsys, byte_model, "--min-p", "1", "--temp", "1.5", "-s", "5") == greedy


def test_logit_bias_forces_and_bans(byte_model, capsys):
    assert generated(capsys, byte_model, "--logit-bias", "122+inf", "-s", "1") == "z" * 24
    greedy = generated(capsys, byte_model, "--temp", "0")
    char = next(c for c in greedy if c.isascii())
    banned = generated(capsys, byte_model, "--temp", "0", "--logit-bias", f"{ord(char)}-inf")
    assert char not in banned and banned != greedy
    # an id both forced and banned is banned, and repeated biases add up (-1 - inf)
    both = generated(capsys, byte_model, "--temp", "0", "--logit-bias", "122+inf", "--logit-bias", "122-inf",
                     "--logit-bias", f"{ord(char)} - 1", "--logit-bias", f"{ord(char)}-INF")
    assert "z" not in both and char not in both


def test_repeat_penalty_and_last_n(byte_model, capsys):
    greedy = generated(capsys, byte_model, "--temp", "0")
    penalised = generated(capsys, byte_model, "--temp", "0", "--repeat-penalty", "1.3")
    assert penalised != greedy
    assert generated(capsys, byte_model, "--temp", "0", "--repeat-penalty", "1.3", "--repeat-last-n", "0") == greedy
    # the prompt "Hello" counts too: a window of all tokens differs from a window of one
    assert (generated(capsys, byte_model, "--temp", "0", "--repeat-penalty", "1.3", "--repeat-last-n", "-1")
            != generated(capsys, byte_model, "--temp", "0", "--repeat-penalty", "1.3", "--repeat-last-n", "1"))


def test_help_documents_the_sampling_flags_and_their_order():
    from rwkvx.sampling import SAMPLER_ORDER

    result = run_cli("--help")
    text = " ".join(result.stdout.split())
    for flag in ("--min-p", "--logit-bias TOKEN_ID(+|-)BIAS", "--repeat-penalty", "--repeat-last-n"):
        assert flag in text
    assert SAMPLER_ORDER in text


def test_repeat_penalty_breaks_a_trained_models_greedy_loop(capsys):
    # The tiny trained model loops on " the" under greedy decoding; the penalty breaks the loop.
    path = str(shared_file(TINY_MODEL))
    args = ["-m", path, "-p", "The quick brown", "-n", "60", "--temp", "0", "-t", "1"]
    assert main(args) == 0
    greedy = capsys.readouterr().out
    assert main([*args, "--repeat-penalty", "1.3", "--repeat-last-n", "16"]) == 0
    penalised = capsys.readouterr().out
    assert greedy.count("the") >= 10 and penalised.count("the") <= greedy.count("the") // 2


@pytest.mark.parametrize("name, arch", [("tiny-rwkv-5v2-730K-FP32.bin", "RWKV-5 (x052)"), ("tiny-rwkv-7v0-834K-FP32.bin", "RWKV-7")])
def test_info_names_later_architectures(capsys, name, arch):
    path = shared_file(TINY_MODEL.parent / name)
    assert main(["-m", str(path), "--info"]) == 0
    out = capsys.readouterr().out
    assert f"architecture  {arch}" in out and "state" in out


def test_check_tensors_finds_nan_in_weights_used_in_place(tmp_path, capsys):
    from rwkvx.testing import random_tensors, write_safetensors
    tensors = random_tensors(2, 32, 256)
    tensors["blocks.1.ffn.value.weight"][3, 5] = np.nan
    path = tmp_path / "nan.safetensors"
    write_safetensors(path, tensors, dtype="bfloat16")
    # bfloat16 stored, run as bfloat16: mapped as is, so only --check-tensors reads it all
    assert main(["-m", str(path), "--dtype", "bfloat16", "-p", "x", "-n", "1", "--check-tensors"]) == 2
    err = capsys.readouterr().err
    assert "blocks.1.ffn.value.weight holds NaN values (first at index [3, 5])" in err and err.count("\n") == 1


def test_prompt_file_that_is_a_fifo_or_a_device_does_not_hang(byte_model, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    result = run_cli("-m", byte_model, "-f", fifo, "-n", "2")  # nobody writes: empty, not a hang
    assert result.returncode == 2 and result.stderr.strip().endswith("rwkvx: error: the prompt is empty")
    if os.path.exists("/dev/zero"):
        result = run_cli("-m", byte_model, "-f", "/dev/zero", "-n", "2")
        assert result.returncode == 2 and "/dev/zero: not a regular file or a pipe" in result.stderr


def test_prompt_from_a_pipe_as_a_file(byte_model):
    # what `-f <(cmd)` passes: a pipe with a writer
    read, write = os.pipe()
    os.write(write, b"Once upon a time")
    os.close(write)
    result = subprocess.run([sys.executable, "-m", "rwkvx.run", "-m", str(byte_model), "-f", f"/dev/fd/{read}",
                             "-n", "4", "--temp", "0"], capture_output=True, text=True, timeout=120,
                            cwd=os.path.dirname(__file__), pass_fds=(read,))
    os.close(read)
    plain = run_cli("-m", byte_model, "-p", "Once upon a time", "-n", "4", "--temp", "0")
    assert result.returncode == 0 and result.stdout == plain.stdout
