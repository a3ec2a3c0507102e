"""RWKV-5.2, 6 and 7 files: python -m rwkvx.convert, memory mapping, --check-tensors and --info.

A converted file must load to the same bits as its source in every dtype, with every array a
view of the file; weights stored in the run dtype are views of the mapped file, and
mmap=False copies them once."""
from __future__ import annotations

import json
import os
import struct
import sys
import warnings

import numpy as np
import pytest

import rwkvx
from rwkvx.convert import convert, main as convert_main
from rwkvx.errors import CheckpointError
from rwkvx.loader import DTYPES
from rwkvx.quant import QuantizedMatrix
from rwkvx.run import main as run_main
from rwkvx.states import checkpoint_fingerprint

from arch_random import random_checkpoint, write_safetensors
from conftest import SHARED, shared_file

VERSIONS = ["v5", "v6", "v7"]
NAMES = {"v5": "RWKV-5", "v6": "RWKV-6", "v7": "RWKV-7"}
TOKENS = [5, 17, 0, 96, 33, 33, 2, 64, 7, 81]
RWKV_CPP = ["tiny-rwkv-5v2-730K-FP32.bin", "tiny-rwkv-6v0-3m-Q5_1.bin", "tiny-rwkv-7v0-834K-FP32.bin"]
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Random v5/v6/v7 models stored bfloat16, as BlinkDL releases them."""
    folder = tmp_path_factory.mktemp("src")
    return {v: write_safetensors(folder / f"{v}.safetensors", random_checkpoint(v), dtype="bfloat16")
            for v in VERSIONS}


def header(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def mapped_from(array: np.ndarray) -> str:
    """The file the memory of `array` is mapped from ("" or "[heap]" for private memory)."""
    address = array.ctypes.data
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if lo <= address < hi:
                return fields[5].strip() if len(fields) > 5 else ""
    raise AssertionError(f"no mapping holds {address:#x}")


def arrays(model) -> list[np.ndarray]:
    return model.weights.arrays()


def logits(model) -> np.ndarray:
    return model.forward(TOKENS, all_logits=True)[0]


# ---- convert ----

@linux_only
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("version", VERSIONS)
def test_converted_file_is_mapped_and_runs_exactly_like_its_source(sources, tmp_path, version, dtype):
    dst = tmp_path / "c.safetensors"
    meta = convert(sources[version], dst, dtype)
    model, source = rwkvx.load(dst, dtype=dtype), rwkvx.load(sources[version], dtype=dtype)
    assert (model.architecture, model.head_size, model.n_head) == (NAMES[version], 16, 4)
    np.testing.assert_array_equal(logits(model), logits(source))
    # every array is a view of the converted file: no copy, no conversion, no quantisation
    for array in arrays(model):
        assert not array.flags.writeable and mapped_from(array) == os.path.realpath(dst)
    if dtype == "uint8":
        assert isinstance(model.weights.head, QuantizedMatrix)
    assert header(dst)["__metadata__"] == meta
    assert (meta["format"], meta["architecture"], meta["head_size"], meta["dtype"], meta["source"]) == \
        ("rwkvx", NAMES[version], "16", dtype, f"{version}.safetensors")
    # states saved with the source belong to the converted file too
    assert meta["model_fingerprint"] == model.fingerprint == source.fingerprint


def test_states_of_the_source_load_into_the_converted_file_without_a_warning(sources, tmp_path):
    source = rwkvx.load(sources["v7"])
    _, state = source.forward(TOKENS)
    source.save_state(tmp_path / "s", state)
    convert(sources["v7"], tmp_path / "c.safetensors", "uint8")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded, _ = rwkvx.load(tmp_path / "c.safetensors", dtype="uint8").load_state(tmp_path / "s")
    np.testing.assert_array_equal(loaded, state)


@pytest.mark.parametrize("name", RWKV_CPP)
def test_rwkv_cpp_files_convert_exactly(tmp_path, name):
    # their converter squeezes, transposes, packs and pre-transforms; a Q5_1 file is dequantised
    src = shared_file(SHARED / "models" / name)
    for dtype in ("float32", "uint8"):
        convert(src, tmp_path / f"{dtype}.safetensors", dtype)
        np.testing.assert_array_equal(logits(rwkvx.load(tmp_path / f"{dtype}.safetensors", dtype=dtype)),
                                      logits(rwkvx.load(src, dtype=dtype)))


def test_a_converted_float_file_loads_and_converts_in_other_dtypes(sources, tmp_path):
    convert(sources["v6"], tmp_path / "f.safetensors", "float32")
    convert(tmp_path / "f.safetensors", tmp_path / "b.safetensors", "bfloat16")
    assert header(tmp_path / "b.safetensors")["__metadata__"]["model_fingerprint"] == \
        checkpoint_fingerprint(rwkvx.loader.open_checkpoint(sources["v6"]))
    for dtype in ("bfloat16", "uint8"):
        np.testing.assert_array_equal(logits(rwkvx.load(tmp_path / "f.safetensors", dtype=dtype)),
                                      logits(rwkvx.load(sources["v6"], dtype=dtype)))
    np.testing.assert_array_equal(logits(rwkvx.load(tmp_path / "b.safetensors", dtype="bfloat16")),
                                  logits(rwkvx.load(sources["v6"], dtype="bfloat16")))


def test_uint8_file_as_float_says_what_to_do(sources, tmp_path):
    convert(sources["v5"], tmp_path / "u.safetensors", "uint8")
    with pytest.raises(CheckpointError, match="holds uint8 weights.*load it with dtype uint8"):
        rwkvx.load(tmp_path / "u.safetensors", dtype="float32")
    with pytest.raises(CheckpointError):
        convert(tmp_path / "u.safetensors", tmp_path / "f.safetensors", "float32")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["u.safetensors"]


def test_a_damaged_converted_file_names_every_problem(sources, tmp_path):
    path = tmp_path / "c.safetensors"
    convert(sources["v7"], path, "bfloat16")
    data = path.read_bytes()
    path.write_bytes(data.replace(b'"blocks.1.att.w1"', b'"blocks.1.att.w9"', 1))
    problems = r"missing blocks\.1\.att\.w1.*unexpected tensor\(s\): blocks\.1\.att\.w9"
    with pytest.raises(CheckpointError, match=problems):
        rwkvx.load(path, dtype="bfloat16")
    # the names and shapes are checked before anything is written
    with pytest.raises(CheckpointError, match=r"missing blocks\.1\.att\.w1"):
        convert(path, tmp_path / "again.safetensors", "float32")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.safetensors"]


def test_cli_converts_and_reports(sources, tmp_path, capsys):
    assert convert_main([str(sources["v7"]), str(tmp_path / "c.safetensors"), "--dtype", "uint8"]) == 0
    err = capsys.readouterr().err
    assert err.startswith(f"rwkvx: wrote {tmp_path / 'c.safetensors'}: RWKV-7 3 layers x 64, vocabulary 97, uint8")


# ---- memory mapping ----

@linux_only
@pytest.mark.parametrize("version", VERSIONS)
def test_matrices_stored_in_the_run_dtype_are_views_of_the_file(sources, version):
    src = os.path.realpath(sources[version])
    mapped, read = rwkvx.load(src, dtype="bfloat16"), rwkvx.load(src, dtype="bfloat16", mmap=False)
    big = [b[name] for b in mapped.weights.blocks for name in mapped.arch.LINEAR] + [mapped.weights.head]
    assert all(not m.flags.writeable and mapped_from(m) == src for m in big)
    # the small tensors are stored bfloat16 and kept float32: read into memory
    assert mapped_from(mapped.weights.blocks[0]["ln1_weight"]) != src
    # mmap=False: nothing is a view of the file
    assert all(a.flags.writeable and mapped_from(a) != src for a in arrays(read))
    np.testing.assert_array_equal(logits(mapped), logits(read))


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


@linux_only
@pytest.mark.parametrize("mmap", [True, False])
def test_a_load_holds_at_most_one_copy_of_the_weights(tmp_path, mmap):
    # a model of 25 MB in float32, converted, so every array could be a view
    convert(write_safetensors(tmp_path / "m.safetensors", random_checkpoint("v7", n_layer=2, n_embd=512,
                                                                            head_size=64, n_vocab=256)),
            tmp_path / "c.safetensors", "float32")
    nbytes = os.path.getsize(tmp_path / "c.safetensors")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak resident set (VmHWM)
    except OSError:
        pytest.skip("cannot reset the peak resident set size here")
    before, anon_before = _rss_kb("VmRSS"), _rss_kb("RssAnon")
    model = rwkvx.load(tmp_path / "c.safetensors", mmap=mmap)
    peak, anon = (_rss_kb("VmHWM") - before) * 1024, (_rss_kb("RssAnon") - anon_before) * 1024
    shown = f"peak {peak / 1e6:.1f} MB, private {anon / 1e6:.1f} MB for {nbytes / 1e6:.1f} MB of weights"
    if mmap:
        # no private copy: the weights are paged in from the file as read (the fingerprint and
        # the small tensors' finiteness check touch some pages; measured 9.3 MB of 2 MB pages
        # of the file, 40 KB private)
        assert anon < 0.05 * nbytes and peak < 0.5 * nbytes, shown
    else:
        # one private copy, never two (measured: 26.7 MB private, peak 28.7 MB for 26.6 MB)
        assert 0.9 * nbytes < anon and peak < 1.4 * nbytes, shown
    assert model.weights.nbytes > 0.95 * nbytes


# ---- --check-tensors ----

def test_nan_in_a_mapped_matrix_is_found_by_check_tensors(tmp_path):
    tensors = random_checkpoint("v7")
    tensors["blocks.1.att.key.weight"][3, 5] = np.nan
    path = write_safetensors(tmp_path / "nan.safetensors", tensors, dtype="bfloat16")
    # run as stored: mapped as is, scanned only when asked
    rwkvx.load(path, dtype="bfloat16")
    message = r"blocks\.1\.att\.key\.weight holds NaN values \(first at index \[3, 5\]\)"
    with pytest.raises(CheckpointError, match=message):
        rwkvx.load(path, dtype="bfloat16", check_tensors=True)
    # converted at load (its data passes through the CPU anyway): always scanned
    with pytest.raises(CheckpointError, match=message):
        rwkvx.load(path, dtype="uint8")
    with pytest.raises(CheckpointError, match=message):
        convert(path, tmp_path / "c.safetensors", "bfloat16")
    assert not (tmp_path / "c.safetensors").exists()


def test_inf_in_a_small_tensor_is_found_unless_checks_are_off(tmp_path):
    tensors = random_checkpoint("v6")
    tensors["blocks.2.att.time_decay_w1"][7, 1] = np.inf
    path = write_safetensors(tmp_path / "inf.safetensors", tensors)
    with pytest.raises(CheckpointError, match=r"blocks\.2\.att\.time_decay_w1 holds infinite values \(first at "
                                              r"index \[7, 1\]\)"):
        rwkvx.load(path)
    rwkvx.load(path, check_tensors=False)


def test_cli_check_tensors_is_one_line(tmp_path, capsys):
    tensors = random_checkpoint("v5", n_vocab=256)
    tensors["head.weight"][0, 0] = np.nan
    path = write_safetensors(tmp_path / "nan.safetensors", tensors, dtype="bfloat16")
    assert run_main(["-m", str(path), "--dtype", "bfloat16", "-p", "x", "-n", "1", "--check-tensors"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rwkvx: error: ") and err.count("\n") == 1
    assert "head.weight holds NaN values (first at index [0, 0])" in err


# ---- --info ----

def test_info_of_a_converted_file(sources, tmp_path, capsys):
    convert(sources["v6"], tmp_path / "u.safetensors", "uint8")
    assert run_main(["-m", str(tmp_path / "u.safetensors"), "--info"]) == 0
    out = capsys.readouterr().out
    assert "architecture  RWKV-6 (x060): 3 layers, n_embd 64, 4 heads of 16, vocabulary 97" in out
    assert "converted     to uint8 from v6.safetensors (safetensors)" in out
    assert "stored        big matrices uint8 (rwkvx); embedding bfloat16; others float32" in out
    assert "kept float32  norms, token-shift mixes, per-head decays and bonuses, low-rank (LoRA) matrices" in out
    assert "mapped from the file, no copy" in out.split("uint8  ")[-1]
    assert "not loadable: the file holds uint8 weights" in out.split("float32  ")[-1].splitlines()[0]


# the low-rank matrices rwkvx.convert once wrote (out, in) and now writes (in, out)
LOW_RANK_KEYS = {"v6": ("time_maa_w1", "time_maa_w2", "time_decay_w1", "time_decay_w2"),
                 "v7": ("w1", "w2", "a1", "a2", "g1", "g2", "v1", "v2")}


@pytest.mark.parametrize("version", sorted(LOW_RANK_KEYS))
def test_files_converted_before_the_low_rank_change_still_load(sources, tmp_path, version):
    # rwkvx.convert wrote RWKV-6/7's low-rank matrices (out, in) before it wrote them (in, out)
    # and said so (metadata low_rank = "in,out"); a file without that flag is read as before
    new = tmp_path / "new.safetensors"
    convert(sources[version], new, "float32")
    head = header(new)
    assert head["__metadata__"].pop("low_rank") == "in,out"
    # version 2 marks the change, so that an older rwkvx refuses the file by name
    assert head["__metadata__"]["format_version"] == "2"
    head["__metadata__"]["format_version"] = "1"
    data = bytearray(new.read_bytes()[8 + struct.unpack("<Q", new.read_bytes()[:8])[0]:])
    low = [k for k in head if k.split(".")[-1] in LOW_RANK_KEYS[version]]
    assert len(low) >= len(LOW_RANK_KEYS[version])
    for key in low:
        (start, end), shape = head[key]["data_offsets"], head[key]["shape"]
        assert head[key]["dtype"] == "F32"
        # RWKV-6's time_maa_w2 is a stack of five: each is transposed
        data[start:end] = np.swapaxes(np.frombuffer(data[start:end], np.float32).reshape(shape), -1, -2).tobytes()
        head[key]["shape"] = shape[:-2] + shape[-2:][::-1]
    text = json.dumps(head).encode()
    text += b" " * (-(8 + len(text)) % 64)
    old = tmp_path / "old.safetensors"
    old.write_bytes(struct.pack("<Q", len(text)) + text + bytes(data))
    np.testing.assert_array_equal(logits(rwkvx.load(old)), logits(rwkvx.load(new)))
    np.testing.assert_array_equal(logits(rwkvx.load(new)), logits(rwkvx.load(sources[version])))


def test_files_whose_layout_did_not_change_keep_format_version_1(sources, tmp_path):
    for version in ("v5",):
        convert(sources[version], tmp_path / f"{version}.safetensors", "float32")
        meta = header(tmp_path / f"{version}.safetensors")["__metadata__"]
        assert meta["format_version"] == "1" and "low_rank" not in meta
