"""2 MB pages for weights: the arena converted matrices live in, and the advice on mappings."""
import mmap
import sys

import numpy as np
import pytest

from rwkvx.convert import convert
from rwkvx.hugepages import HUGE_PAGE, Arena, drop_from_page_cache
from rwkvx.loader import load_weights
from rwkvx.quant import QuantizedMatrix
from rwkvx.formats.tensorfile import MappedFile
from rwkvx.testing import random_tensors, write_safetensors


def test_arena_copies_arrays_aligned_and_falls_back_when_full():
    arena = Arena(1000)
    a = np.arange(10, dtype=np.float32).reshape(2, 5)
    kept = arena.keep(a)
    assert kept is not a and kept.dtype == a.dtype and kept.shape == a.shape
    np.testing.assert_array_equal(kept, a)
    # the first array starts on a 2 MB boundary, the next on a cache line
    assert kept.ctypes.data % HUGE_PAGE == 0
    b = arena.keep(np.ones(3, dtype=np.uint16))
    assert b.ctypes.data % 64 == 0 and b.ctypes.data > kept.ctypes.data
    a[:] = -1  # a copy, not a view of the original
    assert kept[0, 0] == 0
    too_big = np.zeros(1000, dtype=np.uint8)
    assert arena.keep(too_big) is too_big
    empty = Arena(0)
    assert empty.keep(a) is a


@pytest.mark.parametrize("dtype", ["float32", "float16", "uint8"])
def test_converted_matrices_share_one_block(tmp_path, dtype):
    tensors = random_tensors(2, 32, 50)
    path = tmp_path / "m.safetensors"
    write_safetensors(path, tensors, dtype="bfloat16")
    w = load_weights(path, dtype=dtype)
    matrices = [w.head] + [b[n] for b in w.blocks for n in ("att_key", "ffn_value")]
    arrays = [m.q if isinstance(m, QuantizedMatrix) else m for m in matrices]
    bases = set()
    for a in arrays:
        assert not a.flags.owndata and a.ctypes.data % 64 == 0
        base = a
        while isinstance(base, np.ndarray) and base.base is not None:
            base = base.base
        bases.add(id(base))
    assert len(bases) == 1


def _thp_mode():
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.index("[") + 1:text.index("]")] if "[" in text else None


@pytest.mark.skipif(not sys.platform.startswith("linux") or _thp_mode() in (None, "never"),
                    reason="needs Linux with transparent huge pages")
def test_mapped_files_are_advised_huge_pages(tmp_path):
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        pytest.skip("this Python has no MADV_HUGEPAGE")
    path = tmp_path / "f.bin"
    path.write_bytes(b"\0" * (4 << 20))
    drop_from_page_cache(path)
    mapped = MappedFile(path)  # how every checkpoint reader maps a file
    start = np.frombuffer(mapped.map, dtype=np.uint8).ctypes.data
    with open("/proc/self/smaps") as f:
        lines = f.read().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith(f"{start:x}-"))
    flags = next(line for line in lines[header:] if line.startswith("VmFlags:"))
    assert " hg" in flags


@pytest.mark.parametrize("dtype,stored", [("bfloat16", "bfloat16"), ("float32", "float32"), ("uint8", "uint8")])
def test_no_mmap_reads_what_mapping_would_use(tmp_path, dtype, stored):
    src = tmp_path / "m.safetensors"
    write_safetensors(src, random_tensors(2, 32, 50), dtype="bfloat16" if stored == "bfloat16" else "float32")
    if stored == "uint8":  # a converted uint8 file: its five parts are mapped as they are
        convert(src, tmp_path / "u8.safetensors", "uint8")
        src = tmp_path / "u8.safetensors"
    mapped, read = load_weights(src, dtype=dtype), load_weights(src, dtype=dtype, mmap=False)
    for name in ("att_key", "ffn_value"):
        a, b = mapped.blocks[1][name], read.blocks[1][name]
        if isinstance(a, QuantizedMatrix):
            a, b = a.q, b.q
        assert not a.flags.writeable  # a view of the file
        assert b.flags.writeable and b.ctypes.data % 64 == 0  # read into the arena
        np.testing.assert_array_equal(a, b)
    # nothing stays a view of the file
    assert read.emb.flags.writeable and read.blocks[0]["ln1_weight"].flags.writeable
    np.testing.assert_array_equal(mapped.emb, read.emb)
