"""--prompt-cache: the reused work is exact, the right prefix is reused, bad files are refused."""
import os
import subprocess
import sys

import numpy as np
import pytest

import rwkvx
from rwkvx.prompt_cache import PromptCache, checkpoint_positions

from conftest import save_random_model


@pytest.fixture
def byte_model_path(tmp_path):
    return save_random_model(tmp_path / "bytes.safetensors", 2, 32, 256)


@pytest.fixture
def model(byte_model_path):
    return rwkvx.load(byte_model_path)


def tokens_of(text: str) -> list[int]:
    return list(text.encode())


def test_checkpoint_positions():
    assert checkpoint_positions(1) == [1]
    assert checkpoint_positions(5) == [4, 5]
    assert checkpoint_positions(600) == [256, 512, 592, 599, 600]
    many = checkpoint_positions(100_000)
    assert len(many) <= 16 + 3 and many[-3:] == [99_992, 99_999, 100_000]


@pytest.mark.parametrize("first, second, reused", [
    ("a" * 300, "a" * 300, 299),                  # same prompt: all but the last token
    ("a" * 300, "a" * 300 + "bcd", 300),          # extended: the whole cached prompt
    ("x" * 300 + "yz", "x" * 300 + "yQ", 301),    # last token differs: 1 before the cached end
    ("x" * 300 + "yz", "x" * 300 + "Qz", 294),    # two differ: 8 before the cached end
    ("x" * 300 + "yz", "x" * 293 + "Q", 256),     # more: the spaced checkpoint
    ("a" * 600, "a" * 400, 256),                  # shorter: the latest checkpoint inside it
    ("abc" * 100, "zzz", 0),                      # unrelated: nothing
])
def test_resumes_from_the_latest_state_inside_the_common_prefix(model, tmp_path, first, second, reused):
    path = tmp_path / "cache"
    PromptCache(path, model).prefill(tokens_of(first))
    tokens = tokens_of(second)
    result = PromptCache(path, model).prefill(tokens)
    assert result.reused == reused
    _, expected = model.forward(tokens[:-1]) if len(tokens) > 1 else (None, model.new_state())
    np.testing.assert_array_equal(result.state, expected)
    # what was saved is the new prompt's, and exact
    state, saved_tokens = model.load_state(path)
    assert saved_tokens == tokens
    np.testing.assert_array_equal(state, model.forward(tokens)[1])


def test_a_plain_state_file_serves_as_a_cache(model, tmp_path):
    prompt = tokens_of("hello there")
    _, state = model.forward(prompt)
    model.save_state(tmp_path / "s", state, prompt)
    longer = prompt + tokens_of(", general")
    result = PromptCache(tmp_path / "s", model, read_only=True).prefill(longer)
    assert result.reused == len(prompt) and not result.saved
    np.testing.assert_array_equal(result.state, model.forward(longer[:-1])[1])
    # the same prompt again: only its final state is there, so it falls back to the start
    result = PromptCache(tmp_path / "s", model, read_only=True).prefill(prompt)
    assert result.reused == 0
    np.testing.assert_array_equal(result.state, model.forward(prompt[:-1])[1])


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "rwkvx.run", *map(str, args)], capture_output=True, text=True,
                          timeout=120, cwd=os.path.dirname(__file__))


def test_cli_text_is_identical_with_and_without_the_cache(byte_model_path, tmp_path):
    cache = tmp_path / "prompt.cache"
    args = ["-m", byte_model_path, "-n", "24", "-s", "5", "--temp", "0.9", "--repeat-penalty", "1.3",
            "-p", "Once upon a time, " * 30]
    plain = run_cli(*args)
    first = run_cli(*args, "--prompt-cache", cache)
    second = run_cli(*args, "--prompt-cache", cache)
    assert plain.returncode == first.returncode == second.returncode == 0, first.stderr + second.stderr
    assert plain.stdout == first.stdout == second.stdout and plain.stdout
    assert "reused 0 of 540 prompt tokens, saved 540" in first.stderr
    assert "reused 539 of 540 prompt tokens" in second.stderr and "saved" not in second.stderr.split("reused")[1]
    longer = run_cli(*args[:-1], args[-1] + "and then", "--prompt-cache", cache, "--prompt-cache-ro")
    assert longer.returncode == 0 and "reused 540 of 548 prompt tokens" in longer.stderr
    assert model_tokens(cache) == 540  # read-only: not rewritten
    reference = run_cli(*args[:-1], args[-1] + "and then")
    assert longer.stdout == reference.stdout


def model_tokens(path) -> int:
    from rwkvx.formats.safetensors_io import open_safetensors
    from rwkvx.formats.tensorfile import MappedFile
    return int(open_safetensors(MappedFile(path), dtypes=("F32", "I32")).metadata["n_tokens"])


@pytest.mark.parametrize("case, message", [
    ("other model", "a prompt cache made by another model"),
    ("other shape", "a state of shape (2, 5, 16), this model's states are (2, 5, 32)"),
    ("garbage", "not an rwkvx state file"),
    ("ro missing", "no such prompt cache"),
    ("ro alone", "--prompt-cache-ro: needs --prompt-cache FILE"),
    ("no folder", "cannot create the prompt cache: no such directory"),
])
def test_cli_refuses_bad_caches_in_one_line(byte_model_path, tmp_path, case, message):
    cache = tmp_path / "c"
    extra = ["--prompt-cache", cache]
    if case == "other model":
        other = rwkvx.load(save_random_model(tmp_path / "other.safetensors", 2, 32, 256, seed=3))
        other.save_state(cache, other.forward([1, 2])[1], [1, 2])
    elif case == "other shape":
        other = rwkvx.load(save_random_model(tmp_path / "other.safetensors", 2, 16, 256))
        other.save_state(cache, other.new_state(), [1])
    elif case == "garbage":
        cache.write_bytes(b"\x00" * 100)
    elif case == "ro missing":
        extra.append("--prompt-cache-ro")
    elif case == "ro alone":
        extra = ["--prompt-cache-ro"]
    elif case == "no folder":
        extra = ["--prompt-cache", tmp_path / "nope" / "c"]
    before = cache.read_bytes() if cache.exists() else None
    result = run_cli("-m", byte_model_path, "-p", "hello", "-n", "3", *extra)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("rwkvx: error: ") and message in lines[-1], result.stderr
    assert "Traceback" not in result.stderr
    assert (cache.read_bytes() if cache.exists() else None) == before
