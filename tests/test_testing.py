"""rwkvx.testing: random checkpoints written one tensor at a time hold the same values as in memory."""
from __future__ import annotations

import numpy as np
import pytest

import rwkvx.testing as testing
from rwkvx.arch.random_weights import random_checkpoint
from rwkvx.testing import LazyTensor, draw_normal, random_tensors, write_safetensors


@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (17, 33), (5, 4, 3), (31,)])
def test_draw_normal_in_blocks_matches_one_draw(monkeypatch, shape):
    # blocks of a few rows: the draw crosses many block boundaries
    monkeypatch.setattr(testing, "_BLOCK_BYTES", 40)
    want = (np.random.default_rng(7).standard_normal(shape) * 0.5 / np.sqrt(3)).astype(np.float32)
    got = draw_normal(np.random.default_rng(7), shape, 0.5, np.sqrt(3))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("arch", ["v4", "v6", "v7"])
def test_lazy_write_is_the_in_memory_write(tmp_path, monkeypatch, dtype, arch):
    # small blocks, so draws and writes of every matrix are split
    monkeypatch.setattr(testing, "_BLOCK_BYTES", 256)

    def make(lazy):
        if arch == "v4":
            return random_tensors(2, 32, 61, seed=3, lazy=lazy)
        return random_checkpoint(arch, n_layer=2, n_embd=32, head_size=16, n_vocab=61, seed=3, lazy=lazy)

    lazy = make(True)
    assert all(isinstance(v, LazyTensor) for v in lazy.values())
    eager = make(False)
    assert {k: v.shape for k, v in lazy.items()} == {k: v.shape for k, v in eager.items()}
    write_safetensors(tmp_path / "lazy.st", lazy, dtype=dtype, metadata={"seed": "3"})
    write_safetensors(tmp_path / "eager.st", eager, dtype=dtype, metadata={"seed": "3"})
    assert (tmp_path / "lazy.st").read_bytes() == (tmp_path / "eager.st").read_bytes()


def test_lazy_tensors_are_made_in_order_when_written(tmp_path):
    made = []

    def tensor(name, shape):
        return LazyTensor(shape, lambda: made.append(name) or np.full(shape, len(made), np.float32))

    write_safetensors(tmp_path / "m.st", {"b": tensor("b", (2, 3)), "a": tensor("a", (4,))})
    assert made == ["b", "a"]
    data = (tmp_path / "m.st").read_bytes()
    assert np.frombuffer(data[-16:], np.float32).tolist() == [2.0] * 4


def test_lazy_tensor_of_the_wrong_shape_is_refused(tmp_path):
    bad = LazyTensor((2, 3), lambda: np.zeros((3, 2), np.float32))
    with pytest.raises(ValueError, match=r"w: expected shape \(2, 3\), got \(3, 2\)"):
        write_safetensors(tmp_path / "m.st", {"w": bad})


@pytest.mark.parametrize("align", [8, 64])
def test_write_safetensors_aligns_the_data(tmp_path, align):
    path = tmp_path / "a.safetensors"
    write_safetensors(path, {"a": np.ones(3, np.float32), "b": np.zeros((2, 16), np.float32)}, align=align)
    raw = path.read_bytes()
    start = 8 + int.from_bytes(raw[:8], "little")
    assert start % align == 0 and len(raw) == start + 4 * (3 + 32)
    assert np.array_equal(np.frombuffer(raw[start:start + 12], np.float32), np.ones(3, np.float32))
