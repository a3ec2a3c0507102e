"""Hostile and broken inputs (issue 14): every file ends in a model or one clear line, within
bounded time and memory, and nothing a file holds changes how later files are read.

Each section is one class of the issue; the files are built here, byte by byte.
"""
import contextlib
import json
import os
import signal
import stat
import struct
import subprocess
import sys
import time
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest

import rwkvx
from rwkvx.convert import convert
from rwkvx.convert import main as convert_main
from rwkvx.errors import CheckpointError, RwkvxError
from rwkvx.generate import generate
from rwkvx.loader import load_weights, open_checkpoint
from rwkvx.model import RWKV
from rwkvx.sampling import Sampler
from rwkvx.testing import random_tensors, write_safetensors
from rwkvx.tokenizer import ByteTokenizer
from rwkvx.weights import to_bfloat16

from conftest import save_random_model

TESTS = Path(__file__).resolve().parent


def one_line_error(call, match=None, kind=CheckpointError):
    """The error `call` raises: of `kind`, one printable line (no control characters)."""
    with pytest.raises(kind, match=match) as info:
        call()
    message = str(info.value)
    assert message.isprintable(), repr(message)
    return message


@contextlib.contextmanager
def deadline(seconds):
    """Fail instead of hanging: SIGALRM raises in the main thread after `seconds`."""
    def expired(*_):
        raise AssertionError(f"still running after {seconds} s")
    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ---- building .pth files by hand ----

def pth_with_pickle(path, pkl, storages=None, prefix="archive"):
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr(f"{prefix}/data.pkl", pkl)
        z.writestr(f"{prefix}/byteorder", "little")
        for key, data in (storages or {}).items():
            z.writestr(f"{prefix}/data/{key}", data)
    return path


def tensor_pickle(entries):
    """data.pkl of an OrderedDict of tensors: (name, storage class, key, numel, offset, size, stride)."""
    out = bytearray(b"\x80\x02ccollections\nOrderedDict\n)R(")

    def text(s):
        b = s.encode()
        return b"X" + struct.pack("<I", len(b)) + b

    def ints(values):
        return b"(" + b"".join(b"J" + struct.pack("<i", v) for v in values) + b"t"

    for name, cls, key, numel, offset, size, stride in entries:
        out += text(name) + b"ctorch._utils\n_rebuild_tensor_v2\n("
        out += b"(" + text("storage") + f"ctorch\n{cls}\n".encode() + text(key) + text("cpu")
        out += b"J" + struct.pack("<i", numel) + b"tQ"
        out += b"J" + struct.pack("<i", offset) + ints(size) + ints(stride)
        out += b"\x89ccollections\nOrderedDict\n)RtR"
    return bytes(out + b"u.")


def write_pth(path, tensors, cls="BFloat16Storage"):
    entries, storages = [], {}
    for i, (name, value) in enumerate(tensors.items()):
        raw = to_bfloat16(value) if cls == "BFloat16Storage" else np.ascontiguousarray(value, np.float32)
        stride = [int(np.prod(value.shape[d + 1:])) for d in range(value.ndim)]
        entries.append((name, cls, str(i), raw.size, 0, value.shape, stride))
        storages[str(i)] = raw.tobytes()
    return pth_with_pickle(path, tensor_pickle(entries), storages)


def bomb(levels, pair=b"\x86"):
    """Pickle opcodes leaving x_levels on the stack, x_0 = (), x_{k+1} = (x_k, x_k): 2^levels
    leaves in 6 bytes a level (the "billion laughs" pattern)."""
    out = bytearray(b")q\x00")
    for k in range(levels):
        out += b"h" + bytes([k]) + b"h" + bytes([k]) + pair + b"q" + bytes([k + 1])
    return bytes(out)


# ---- 1. pickle bombs: shared references multiplied ----

@pytest.mark.parametrize("body", [
    pytest.param(b"}" + bomb(60) + b"K\x01s.", id="dict-key"),
    pytest.param(b"ctorch._utils\n_rebuild_tensor_v2\n(" + b"N" + b"K\x00" + bomb(60) + b")tR.", id="tensor-size"),
    pytest.param(b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\n" + bomb(60) + b"X\x03\x00\x00\x00cpuK\x01tQ.",
                 id="persistent-id"),
    pytest.param(b"]" + bomb(60, pair=b"]") + b".", id="lists"),
])
def test_pickle_bomb_is_refused_at_once(tmp_path, body):
    path = pth_with_pickle(tmp_path / "bomb.pth", b"\x80\x02" + body)
    start = time.perf_counter()
    with deadline(20):
        one_line_error(lambda: load_weights(path), "data.pkl")
    assert time.perf_counter() - start < 2


def test_convert_of_a_pickle_bomb_ends_at_once(tmp_path):
    path = pth_with_pickle(tmp_path / "bomb.pth", b"\x80\x02}" + bomb(60) + b"K\x01s.")
    with deadline(20):
        one_line_error(lambda: convert(path, tmp_path / "out.safetensors", "float32"), "pickle bomb")
    assert os.listdir(tmp_path) == ["bomb.pth"]


def test_a_deep_pickle_is_refused(tmp_path):
    path = pth_with_pickle(tmp_path / "deep.pth", b"\x80\x02" + b"(" * 100_000 + b"t" * 100_000 + b".")
    one_line_error(lambda: load_weights(path), "nests structures more than")


# ---- 2. huge memo indices ----

@pytest.mark.parametrize("put", [b"r\x00\xe1\xf5\x05", b"r\xff\xff\xff\xff"], ids=["1e8", "2^32-1"])
def test_huge_memo_index_allocates_nothing(tmp_path, put):
    path = pth_with_pickle(tmp_path / "memo.pth", b"\x80\x02}" + put + b".")
    tracemalloc.start()
    try:
        one_line_error(lambda: load_weights(path), "memo index")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 << 20


# ---- 3. small files declaring huge tensors ----

def test_stride_0_view_larger_than_its_storage_is_refused(tmp_path):
    entries = [("emb.weight", "FloatStorage", "0", 1, 0, (1 << 20, 1 << 10), (0, 0))]
    path = pth_with_pickle(tmp_path / "m.pth", tensor_pickle(entries), {"0": b"\0" * 4})
    message = one_line_error(lambda: open_checkpoint(path), "repeated elements")
    assert "emb.weight" in message


def test_view_reaching_past_a_small_storage_is_refused(tmp_path):
    entries = [("emb.weight", "FloatStorage", "0", 16, 0, (4, 1 << 28), (4, 1))]
    path = pth_with_pickle(tmp_path / "m.pth", tensor_pickle(entries), {"0": b"\0" * 64})
    one_line_error(lambda: open_checkpoint(path), "reaches element")


def test_tensors_overlapping_in_one_storage_cannot_multiply_the_file(tmp_path):
    # every tensor of a model is a view of the same storage: each fits, all together are
    # (2 x 18 + 5) times the file
    t = random_tensors(2, 64, 97)
    big = max(v.size for v in t.values())
    entries = [(name, "FloatStorage", "0", big, 0, v.shape,
                [int(np.prod(v.shape[d + 1:])) for d in range(v.ndim)]) for name, v in t.items()]
    path = pth_with_pickle(tmp_path / "m.pth", tensor_pickle(entries), {"0": b"\0" * (4 * big)})
    one_line_error(lambda: load_weights(path), "tensors overlap one another")


def test_a_huge_layer_number_sizes_nothing(tmp_path):
    t = random_tensors(1, 8, 13)
    t["blocks.99999999999.ln1.weight"] = np.ones(8, np.float32)
    t["blocks.999999.ln1.weight"] = np.ones(8, np.float32)
    write_safetensors(tmp_path / "m.safetensors", t)
    message = one_line_error(lambda: load_weights(tmp_path / "m.safetensors"), "blocks 1-999998 are missing")
    assert len(message) < 2000


def test_safetensors_header_declaring_huge_shapes(tmp_path):
    header = json.dumps({"emb.weight": {"dtype": "F32", "shape": [1 << 40, 1 << 40], "data_offsets": [0, 16]}})
    (tmp_path / "m.safetensors").write_bytes(struct.pack("<Q", len(header)) + header.encode() + b"\0" * 16)
    one_line_error(lambda: load_weights(tmp_path / "m.safetensors"), "needs")


# ---- 4. exceptions of other types that used to leak ----

def test_deeply_nested_safetensors_header(tmp_path):
    header = b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    (tmp_path / "m.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    one_line_error(lambda: load_weights(tmp_path / "m.safetensors"), "nests too deeply")


def hf_folder(folder, config=None, index=None):
    folder.mkdir()
    t = {("rwkv.embeddings.weight" if k == "emb.weight" else k if k == "head.weight" else "rwkv." + k): v
         for k, v in random_tensors(1, 8, 13).items()}
    # with an index, the weights are a shard it may name (model.safetensors would win)
    write_safetensors(folder / ("model-1.safetensors" if index is not None else "model.safetensors"), t)
    (folder / "config.json").write_text(config if config is not None else json.dumps({"model_type": "rwkv"}))
    if index is not None:
        (folder / "model.safetensors.index.json").write_text(index)
    return folder


def test_deeply_nested_config_and_index(tmp_path):
    deep = '{"a":' + "[" * 100_000 + "]" * 100_000 + "}"
    one_line_error(lambda: load_weights(hf_folder(tmp_path / "a", config=deep)), "nests too deeply")
    one_line_error(lambda: load_weights(hf_folder(tmp_path / "b", index=deep)), "nests too deeply")
    index = json.dumps({"weight_map": {"x": [[["model.safetensors"]]]}})
    one_line_error(lambda: load_weights(hf_folder(tmp_path / "c", index=index)), "weight_map is not a map")


def test_zip_end_record_pointing_before_the_start(tmp_path):
    path = write_pth(tmp_path / "m.pth", random_tensors(1, 8, 13))
    data = bytearray(path.read_bytes())
    end = data.rindex(b"PK\x05\x06")
    # the central directory's size, grown past the start of the file
    struct.pack_into("<I", data, end + 12, len(data) + 1000)
    path.write_bytes(bytes(data))
    one_line_error(lambda: load_weights(path), "truncated or corrupt zip")


def test_zip_of_an_unknown_version(tmp_path):
    path = write_pth(tmp_path / "m.pth", random_tensors(1, 8, 13))
    data = bytearray(path.read_bytes())
    entry = data.index(b"PK\x01\x02")
    struct.pack_into("<H", data, entry + 6, 0xFF)  # version needed to extract: 25.5
    path.write_bytes(bytes(data))
    one_line_error(lambda: load_weights(path), "truncated or corrupt zip")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "uint8"])
def test_zero_sized_dimensions(tmp_path, dtype):
    t = random_tensors(1, 8, 13)
    t["emb.weight"] = np.zeros((13, 0), np.float32)
    write_safetensors(tmp_path / "e.safetensors", t)
    message = one_line_error(lambda: load_weights(tmp_path / "e.safetensors", dtype), "zero-sized dimension")
    assert "e.safetensors" in message and "emb.weight" in message
    t = random_tensors(1, 8, 13, n_ffn=0)
    write_safetensors(tmp_path / "f.safetensors", t)
    message = one_line_error(lambda: load_weights(tmp_path / "f.safetensors", dtype), "zero-sized dimension")
    assert "ffn.key.weight" in message


def test_zero_sized_tensors_in_a_state_file_are_read(tiny_path, tmp_path):
    # found by scripts/fuzz.py --entry load --seed 2 (case state 3482): an empty tensor is valid
    model = RWKV(load_weights(tiny_path))
    _, state = model.forward([1, 2])
    model.save_state(tmp_path / "s.state", state, tokens=[])
    loaded, tokens = model.load_state(tmp_path / "s.state")
    np.testing.assert_array_equal(loaded, state)
    assert not tokens


# ---- 5. a file cannot change how later files are read ----

def test_build_on_the_readers_own_stand_ins_is_refused_and_changes_nothing(tmp_path):
    t = random_tensors(1, 8, 13)
    good = write_pth(tmp_path / "good.pth", t)
    before = load_weights(good, "float32").head.copy()
    # BUILD {"dtype": "F16"} on torch.BFloat16Storage, then on the OrderedDict stand-in
    for target in (b"ctorch\nBFloat16Storage\n", b"ccollections\nOrderedDict\n", b"ctorch\nTensor\n"):
        evil = pth_with_pickle(tmp_path / "evil.pth",
                               b"\x80\x02" + target + b"}X\x05\x00\x00\x00dtypeX\x03\x00\x00\x00F16sb.")
        one_line_error(lambda: load_weights(evil), "refused")
    np.testing.assert_array_equal(load_weights(good, "float32").head, before)
    np.testing.assert_array_equal(before, (to_bfloat16(t["head.weight"]).astype(np.uint32) << 16).view(np.float32))


def test_the_stand_ins_are_immutable():
    from rwkvx.formats import pth
    for value in pth._GLOBALS.values():
        if isinstance(value, pth._Frozen):
            with pytest.raises(Exception):
                value.dtype = "F16"


# ---- 6. FIFOs, devices and other files that are not regular ----

@pytest.fixture
def fifo(tmp_path):
    if not hasattr(os, "mkfifo"):
        pytest.skip("needs os.mkfifo")
    path = tmp_path / "fifo"
    os.mkfifo(path)
    return path


def test_fifo_as_the_model_path(fifo, tmp_path):
    with deadline(10):
        one_line_error(lambda: load_weights(fifo), "is a FIFO, not a regular file")
        one_line_error(lambda: rwkvx.load(fifo), "is a FIFO")
        one_line_error(lambda: convert(fifo, tmp_path / "out.safetensors", "float32"), "is a FIFO")


def test_fifo_as_a_shard_or_config_of_a_folder(tmp_path):
    index = json.dumps({"weight_map": {"rwkv.embeddings.weight": "shard.safetensors"}})
    folder = hf_folder(tmp_path / "hf", index=index)
    os.mkfifo(folder / "shard.safetensors")
    with deadline(10):
        one_line_error(lambda: load_weights(folder), "shard.safetensors: is a FIFO")
        os.remove(folder / "config.json")
        os.mkfifo(folder / "config.json")
        one_line_error(lambda: load_weights(folder), "config.json: is a FIFO")


@pytest.mark.skipif(not os.path.exists("/dev/null") or os.name != "posix", reason="needs /dev/null")
def test_a_device_as_the_model_path():
    one_line_error(lambda: load_weights("/dev/null"), "is a device")


def test_fifo_as_a_state_file(tmp_path, fifo):
    model = RWKV(load_weights(save_random_model(tmp_path / "m.safetensors")))
    with deadline(10):
        one_line_error(lambda: model.load_state(fifo), "is a FIFO")


# ---- 7. control characters from files are escaped ----

def test_control_characters_in_names_and_dtypes_are_escaped(tmp_path):
    evil = "emb\x1b[2J\nweight"
    header = json.dumps({evil: {"dtype": "F\x1b[31m32\n", "shape": [1], "data_offsets": [0, 4]}})
    (tmp_path / "m.safetensors").write_bytes(struct.pack("<Q", len(header)) + header.encode() + b"\0" * 4)
    message = one_line_error(lambda: load_weights(tmp_path / "m.safetensors"), "unsupported dtype")
    assert "\\x1b" in message and "\\n" in message


def test_control_characters_in_tensor_names_of_a_loadable_file(tmp_path):
    t = random_tensors(1, 8, 13)
    t["\x1b]0;pwned\x07"] = np.ones(2, np.float32)
    write_safetensors(tmp_path / "m.safetensors", t)
    message = one_line_error(lambda: load_weights(tmp_path / "m.safetensors"), "unexpected tensor")
    assert "\\x1b]0;pwned\\x07" in message


def test_control_characters_in_byteorder_and_model_type(tmp_path):
    path = tmp_path / "m.pth"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02}.")
        z.writestr("archive/byteorder", "big\x1b[2J\r\n")
    one_line_error(lambda: load_weights(path), "-endian")
    folder = hf_folder(tmp_path / "hf", config=json.dumps({"model_type": "gpt\x1b[2J\nx"}))
    assert "\\x1b" in one_line_error(lambda: load_weights(folder), "model_type")


def test_messages_show_no_internal_reprs(tmp_path):
    # a persistent id holding a storage type in the wrong place
    pkl = b"\x80\x02(X\x07\x00\x00\x00storagectorch\nFloatStorage\nctorch\nFloatStorage\nNNtQ."
    message = one_line_error(lambda: load_weights(pth_with_pickle(tmp_path / "m.pth", pkl)), "persistent id")
    assert "object at 0x" not in message and "rwkvx." not in message


def test_uint8_nan_error_names_the_file_and_tensor(tmp_path):
    t = random_tensors(1, 8, 13)
    t["blocks.0.att.key.weight"][3, 5] = np.nan
    write_safetensors(tmp_path / "m.safetensors", t)
    message = one_line_error(lambda: load_weights(tmp_path / "m.safetensors", "uint8", check_tensors=False),
                             "NaN or infinite")
    assert "m.safetensors" in message and "blocks.0.att.key.weight" in message and "[3, 5]" in message


# ---- 8. NaN and infinite weights ----

@pytest.mark.parametrize("stored", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weights(tmp_path, stored, bad):
    t = random_tensors(1, 8, 13)
    t["blocks.0.ffn.value.weight"][2, 7] = bad
    path = tmp_path / "m.safetensors"
    write_safetensors(path, t, dtype=stored)
    # a load that maps the file as stored checks it only when asked: it must stay cheap
    w = load_weights(path, stored)
    assert not np.isfinite(w.blocks[0]["ffn_value"].view(np.float16) if stored == "float16"
                           else w.blocks[0]["ffn_value"]).all() or stored == "bfloat16"
    message = one_line_error(lambda: load_weights(path, stored, check_tensors=True), "blocks.0.ffn.value.weight")
    assert "[2, 7]" in message and ("NaN" if np.isnan(bad) else "infinite") in message
    # a load that converts reads every weight anyway: checked by default
    for dtype in {"float32", "bfloat16", "float16", "uint8"} - {stored}:
        one_line_error(lambda: load_weights(path, dtype), "blocks.0.ffn.value.weight holds")


def test_a_finite_weight_that_rounds_to_inf_in_bfloat16(tmp_path):
    t = random_tensors(1, 8, 13)
    t["blocks.0.att.output.weight"][1, 1] = np.finfo(np.float32).max
    write_safetensors(tmp_path / "m.safetensors", t)
    one_line_error(lambda: load_weights(tmp_path / "m.safetensors", "bfloat16"), "rounds past bfloat16")
    one_line_error(lambda: load_weights(tmp_path / "m.safetensors", "float16"), "does not fit float16")
    assert np.isfinite(load_weights(tmp_path / "m.safetensors", "float32", check_tensors=True).blocks[0]["att_output"]).all()


def test_non_finite_vectors_are_always_checked(tmp_path):
    t = random_tensors(1, 8, 13)
    t["blocks.0.ln1.weight"][0] = np.nan
    write_safetensors(tmp_path / "m.safetensors", t)
    one_line_error(lambda: load_weights(tmp_path / "m.safetensors"), "blocks.0.ln1.weight holds NaN")


def test_convert_refuses_non_finite_weights(tmp_path):
    t = random_tensors(1, 8, 13)
    t["head.weight"][0, 0] = np.inf
    write_safetensors(tmp_path / "m.safetensors", t)
    one_line_error(lambda: convert(tmp_path / "m.safetensors", tmp_path / "o.safetensors", "float32"),
                   "head.weight holds infinite")
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]


def test_huge_raw_decay_gives_a_finite_transformed_decay(tmp_path):
    t = random_tensors(1, 8, 13)
    t["blocks.0.att.time_decay"][1] = 1000.0
    write_safetensors(tmp_path / "m.safetensors", t)
    w = load_weights(tmp_path / "m.safetensors", check_tensors=True)
    assert np.isfinite(w.blocks[0]["att_time_decay"]).all()


def test_generation_refuses_non_finite_logits(tmp_path):
    t = random_tensors(1, 8, 256)
    t["head.weight"][:] = np.nan
    write_safetensors(tmp_path / "m.safetensors", t)
    model = RWKV(load_weights(tmp_path / "m.safetensors", check_tensors=False))
    stream = generate(model, ByteTokenizer(), "hello", max_tokens=3, sampler=Sampler(seed=0))
    message = one_line_error(lambda: list(stream), "logits hold NaN or infinite values", kind=RwkvxError)
    assert "check_tensors" in message


# ---- 9. the command line: closed or full stdout, SIGTERM ----

def run_cli(args, stdout):
    return subprocess.run([sys.executable, "-m", "rwkvx.run", *map(str, args)], cwd=TESTS,
                          stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=120)


def test_closed_stdout(tmp_path):
    model = save_random_model(tmp_path / "m.safetensors", n_vocab=256)
    result = subprocess.run(f'"{sys.executable}" -m rwkvx.run -m "{model}" -p hi -n 5 >&-', shell=True, cwd=TESTS,
                            stderr=subprocess.PIPE, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == "rwkvx: error: standard output is closed"
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("extra", [["-n", "50"], ["--info"]])
def test_full_stdout(tmp_path, extra):
    model = save_random_model(tmp_path / "m.safetensors", n_vocab=256)
    with open("/dev/full", "w") as full:
        result = run_cli(["-m", model, "-p", "hi", *extra], stdout=full)
    lines = result.stderr.splitlines()
    assert result.returncode == 1
    assert lines[-1] == "rwkvx: error: cannot write to standard output: No space left on device"
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr


def test_sigterm_during_generation(tmp_path):
    model = save_random_model(tmp_path / "m.safetensors", n_vocab=256)
    proc = subprocess.Popen([sys.executable, "-m", "rwkvx.run", "-m", str(model), "-p", "hi", "-n", "100000000",
                             "--ignore-eos"], cwd=TESTS, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        # generation has started once text arrives
        proc.stdout.read(1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM
    assert err.decode().splitlines()[-1] == "rwkvx: terminated (SIGTERM)"
    assert "Traceback" not in err.decode()


def test_run_main_restores_stdout_and_signal_handlers():
    from rwkvx._cli import run_main
    stdout, handler = sys.stdout, signal.getsignal(signal.SIGTERM)
    assert run_main(lambda: 0) == 0
    assert sys.stdout is stdout and signal.getsignal(signal.SIGTERM) is handler


# ---- 10. convert and files that are not its own ----

def test_convert_leaves_a_users_part_file_alone(tmp_path):
    src = save_random_model(tmp_path / "m.safetensors")
    (tmp_path / "out.safetensors.part").write_text("the user's own file")
    convert(src, tmp_path / "out.safetensors", "float32")
    assert (tmp_path / "out.safetensors.part").read_text() == "the user's own file"
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors", "out.safetensors", "out.safetensors.part"]
    # a new file's usual permissions, not the private ones of a temporary file
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(tmp_path / "out.safetensors").st_mode) == 0o666 & ~umask


def test_convert_force_refuses_what_is_not_a_regular_file(tmp_path, fifo):
    src = save_random_model(tmp_path / "m.safetensors")
    with deadline(10):
        one_line_error(lambda: convert(src, fifo, "float32", overwrite=True), "is a FIFO, not a regular file: "
                       "refusing to replace it", kind=RwkvxError)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    (tmp_path / "target").write_text("a file of the user's")
    os.symlink(tmp_path / "target", tmp_path / "link.safetensors")
    one_line_error(lambda: convert(src, tmp_path / "link.safetensors", "float32", overwrite=True),
                   "is a symbolic link", kind=RwkvxError)
    assert os.path.islink(tmp_path / "link.safetensors")
    one_line_error(lambda: convert(src, "/dev/null", "float32", overwrite=True), "is a device", kind=RwkvxError)


@pytest.mark.parametrize("failure", [OSError(27, "File too large"), KeyboardInterrupt()])
def test_convert_removes_its_temporary_file_on_failure(tmp_path, monkeypatch, failure):
    src = save_random_model(tmp_path / "m.safetensors")
    from rwkvx.formats import safetensors_io
    real_write = safetensors_io.SafetensorsWriter.write
    calls = []

    def failing_write(self, name, array):
        calls.append(name)
        if len(calls) == 5:
            raise failure
        real_write(self, name, array)

    monkeypatch.setattr(safetensors_io.SafetensorsWriter, "write", failing_write)
    with pytest.raises((RwkvxError, KeyboardInterrupt)):
        convert(src, tmp_path / "out.safetensors", "float32")
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]


def test_convert_sigterm_removes_its_temporary_file(tmp_path, monkeypatch, capsys):
    src = save_random_model(tmp_path / "m.safetensors")
    from rwkvx.formats import safetensors_io
    real_write = safetensors_io.SafetensorsWriter.write
    calls = []

    def write_then_term(self, name, array):
        calls.append(name)
        if len(calls) == 5:
            # delivered to this process, handled by run_main's handler between two writes
            os.kill(os.getpid(), signal.SIGTERM)
        real_write(self, name, array)

    monkeypatch.setattr(safetensors_io.SafetensorsWriter, "write", write_then_term)
    assert convert_main([str(src), str(tmp_path / "out.safetensors"), "--dtype", "float32"]) == 128 + signal.SIGTERM
    assert capsys.readouterr().err.splitlines()[-1] == "rwkvx: terminated (SIGTERM)"
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]


# ---- the API's argument checks ----

def test_sampler_accept_of_a_huge_id_allocates_nothing():
    sampler = Sampler(seed=0)
    tracemalloc.start()
    try:
        with pytest.raises(RwkvxError):
            sampler.accept(10**10)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_generate_with_a_bytes_prompt(tiny_path):
    model = RWKV(load_weights(tiny_path))
    one_line_error(lambda: generate(model, ByteTokenizer(), b"hello"), "got bytes", kind=RwkvxError)


@pytest.mark.parametrize("path", ["a\0b", b"a\0b", Path("a\0b")])
def test_load_of_a_path_with_a_nul_character(path):
    one_line_error(lambda: rwkvx.load(path), "NUL character", kind=RwkvxError)
    one_line_error(lambda: load_weights(path), "NUL character", kind=RwkvxError)


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.complex64, np.complex128, object, "U3", np.bool_])
def test_states_of_the_wrong_dtype_are_refused(tiny_path, dtype):
    model = RWKV(load_weights(tiny_path))
    state = np.zeros(model.state_shape, dtype=dtype)
    one_line_error(lambda: model.forward([1], state), "state: expected a float32 array", kind=RwkvxError)


def test_float64_and_float16_states_are_converted(tiny_path):
    model = RWKV(load_weights(tiny_path))
    _, state = model.forward([1, 2])
    expected, _ = model.forward([3], state)
    for dtype in (np.float64, np.float16):
        logits, _ = model.forward([3], state.astype(dtype))
        assert logits.dtype == np.float32
        if dtype == np.float64:
            np.testing.assert_array_equal(logits, expected)
