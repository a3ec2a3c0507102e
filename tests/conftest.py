"""Shared fixtures: seeded random checkpoints, the third-party files in ../shared."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rwkvx.kernels import _matvec
from rwkvx.testing import random_tensors, write_safetensors

# every instruction set this CPU has: each must be right on its own
SIMD_LEVELS = list(range(_matvec.best_simd_level() + 1))
SIMD_LEVEL_NAMES = ["portable", "avx2", "avx512"]


@pytest.fixture(params=SIMD_LEVELS, ids=lambda level: SIMD_LEVEL_NAMES[level])
def simd(request):
    """Run the test at each SIMD level (set_simd_level), restoring the level after."""
    before = _matvec.simd_level()
    _matvec.set_simd_level(request.param)
    yield request.param
    _matvec.set_simd_level(before)


def _int8_vnni256_modes() -> list[int]:
    before = _matvec.int8_vnni256()
    try:
        return [mode for mode in (1, 2) if _matvec.set_int8_vnni256(mode) == mode]
    finally:
        _matvec.set_int8_vnni256(before)


# int8 arithmetic's loops: each SIMD level, and level 1 with each 256-bit vpdpbusd this CPU
# has (AVX-VNNI, or AVX-512's form of it running the same loops: _int8.h), as
# (SIMD level, int8_vnni256 mode)
INT8_LOOPS = [(level, 0) for level in SIMD_LEVELS] + [(1, mode) for mode in _int8_vnni256_modes()
                                                      if 1 in SIMD_LEVELS]
INT8_LOOP_NAMES = {(0, 0): "portable", (1, 0): "avx2", (2, 0): "avx512", (1, 1): "avx-vnni",
                   (1, 2): "avx-vnni-as-evex"}


def set_int8_loops(loops: tuple[int, int]) -> tuple[int, int]:
    """Choose int8 arithmetic's loops; returns the ones in use before."""
    before = (_matvec.simd_level(), _matvec.int8_vnni256())
    _matvec.set_simd_level(loops[0])
    _matvec.set_int8_vnni256(loops[1])
    return before


def expected_int8_loops() -> str:
    """The loops an int8 block of four rows runs now (_matvec.int8_last_loops' names)."""
    level = _matvec.int8_level()
    if level == 2:
        return "avx512-vnni"
    return ("avx2", "avx-vnni", "avx-vnni-as-evex")[_matvec.int8_vnni256()] if level == 1 else "portable"


@pytest.fixture(params=INT8_LOOPS, ids=INT8_LOOP_NAMES.get)
def int8_loops(request):
    """Run the test with each of int8 arithmetic's loops (INT8_LOOPS), restoring them after."""
    before = set_int8_loops(request.param)
    yield request.param
    set_int8_loops(before)


SHARED = Path(__file__).resolve().parents[2] / "shared"
TINY_MODEL = SHARED / "models" / "tiny-rwkv-660K-FP32.bin"
TINY_EXPECTED = SHARED / "models" / "expected_logits.bin"
TOKENIZER_20B = SHARED / "tokenizers" / "20B_tokenizer.json"

# 108 bytes of English text, the sample on which the uint8 format's quality is measured
ENGLISH = (b"The quick brown fox jumps over the lazy dog. In the beginning was the word, "
           b"and the word was with the model.")


def assert_same_bits_everywhere(lin, X: np.ndarray, one_row_too: bool = False) -> None:
    """An opt-in arithmetic's products of the rows X: the same bits at every SIMD level (and
    with each of int8's loops) and thread count, and for each row whichever rows share its
    product; with one_row_too, a row alone (the matrix-vector product, as decoding runs it)
    as well."""
    before = (_matvec.simd_level(), _matvec.int8_vnni256())
    try:
        results = []
        for loops in INT8_LOOPS:
            set_int8_loops(loops)
            results += [lin.matmul(X, n_threads=n) for n in (1, 2, 3)]
            if one_row_too:
                results.append(np.stack([lin(x, n_threads=2) for x in X]))
    finally:
        set_int8_loops(before)
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])
    for rows in ([3, 0], [12, 5, 7], [0, 1, 2, 3, 4, 5, 6, 7, 8], [6, 6]):
        np.testing.assert_array_equal(lin.matmul(X[rows]), results[0][rows])


def arithmetic_error(lin, arithmetic: str, X: np.ndarray) -> float:
    """Relative RMS error of lin's products of the rows X in an opt-in arithmetic, against
    its float32 products."""
    exact = lin.matmul(X)
    err = lin.with_arithmetic(arithmetic).matmul(X) - exact
    return float(np.sqrt(np.mean(err ** 2) / np.mean(exact ** 2)))


def assert_one_token_in_float32(lin, arithmetic: str, x: np.ndarray) -> None:
    """An arithmetic that leaves one-token products (decoding) to float32: the same bits for
    a one-row matmul and a matrix-vector product of x (1, n_cols)."""
    np.testing.assert_array_equal(lin.with_arithmetic(arithmetic).matmul(x), lin.matmul(x))
    np.testing.assert_array_equal(lin.with_arithmetic(arithmetic)(x[0]), lin(x[0]))


def shared_file(path: Path) -> Path:
    """Skip the test when ../shared (third-party test data) is not beside the project."""
    if not path.exists():
        pytest.skip(f"{path} not available")
    return path


def save_random_model(path: Path, n_layer=2, n_embd=64, n_vocab=97, n_ffn=None, seed=0,
                      dtype="float32", time_shape="blinkdl") -> Path:
    tensors = random_tensors(n_layer, n_embd, n_vocab, n_ffn=n_ffn, seed=seed, time_shape=time_shape)
    write_safetensors(path, tensors, dtype=dtype)
    return path


@pytest.fixture
def tiny_path(tmp_path) -> Path:
    """A seeded random model (2 layers, 64 wide, vocabulary 97) as float32 safetensors."""
    return save_random_model(tmp_path / "tiny.safetensors")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)
