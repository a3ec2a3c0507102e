"""python -m rwkvx.convert: rwkvx's own layout loads by mapping and runs exactly like its source;
python -m rwkvx.run --info; the streaming writer; the progress bar."""
import io
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

import rwkvx
from rwkvx.convert import convert, main as convert_main
from rwkvx.errors import CheckpointError, RwkvxError
from rwkvx.loader import DTYPES, describe, load_weights
from rwkvx.quant import QuantizedMatrix
from rwkvx.reference import Reference
from rwkvx.run import main as run_main
from rwkvx.formats.safetensors_io import SafetensorsWriter
from rwkvx.formats.tensorfile import Progress
from rwkvx.testing import random_tensors, write_safetensors

from conftest import TINY_MODEL, shared_file
from test_formats_pth import write_pth

TOKENS = [3, 1, 4, 1, 5, 9, 2, 6]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The same random model as bf16 safetensors and as a bf16 .pth (BlinkDL's release format)."""
    folder = tmp_path_factory.mktemp("src")
    tensors = random_tensors(2, 32, 61)
    write_safetensors(folder / "m.safetensors", tensors, dtype="bfloat16")
    write_pth(folder / "m.pth", tensors, dtype="bfloat16")
    return folder


def header(path):
    data = open(path, "rb").read(1 << 16)
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n])


def logits(weights):
    return rwkvx.RWKV(weights).forward(TOKENS)[0]


@pytest.mark.parametrize("src", ["m.safetensors", "m.pth"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_converted_file_is_mapped_and_runs_exactly_like_its_source(sources, tmp_path, src, dtype):
    meta = convert(sources / src, tmp_path / "c.safetensors", dtype)
    w = load_weights(tmp_path / "c.safetensors", dtype=dtype)
    assert w.source == "rwkvx" and w.info["metadata"]["dtype"] == dtype
    # every array is a read-only view of the file: no float copy, no quantisation work
    for array in w.arrays():
        assert not array.flags.owndata and not array.flags.writeable
    np.testing.assert_array_equal(logits(w), logits(load_weights(sources / src, dtype=dtype)))
    assert meta["format"] == "rwkvx" and meta["source"] == src and meta["architecture"] == "RWKV-4"
    assert header(tmp_path / "c.safetensors")["__metadata__"] == meta


def test_uint8_layout(sources, tmp_path):
    convert(sources / "m.safetensors", tmp_path / "u.safetensors", "uint8")
    h = header(tmp_path / "u.safetensors")
    assert h["blocks.1.ffn.key.weight.q"]["dtype"] == "U8" and h["blocks.1.ffn.key.weight.q"]["shape"] == [128, 32]
    assert h["blocks.1.ffn.key.weight.mx"]["shape"] == [32] and h["blocks.1.ffn.key.weight.ry"]["shape"] == [128]
    # transforms are applied: decay holds -exp(raw), time vectors are flat
    assert h["blocks.0.att.time_mix_k"]["shape"] == [32] and h["__metadata__"]["time_decay"] == "-exp(raw)"
    w = load_weights(tmp_path / "u.safetensors", dtype="uint8")
    assert isinstance(w.head, QuantizedMatrix) and (w.blocks[0]["att_time_decay"] < 0).all()
    # tensors are laid out by item size after a 64-byte aligned header: every view is aligned
    assert all(a.ctypes.data % a.itemsize == 0 for a in w.arrays())


def test_float_file_loads_in_other_dtypes(sources, tmp_path):
    convert(sources / "m.safetensors", tmp_path / "f.safetensors", "float32")
    for dtype in ("bfloat16", "uint8"):
        np.testing.assert_array_equal(logits(load_weights(tmp_path / "f.safetensors", dtype=dtype)),
                                      logits(load_weights(sources / "m.safetensors", dtype=dtype)))


def test_uint8_file_as_float_says_what_to_do(sources, tmp_path):
    convert(sources / "m.safetensors", tmp_path / "u.safetensors", "uint8")
    with pytest.raises(CheckpointError, match="holds uint8 weights.*load it with dtype uint8"):
        load_weights(tmp_path / "u.safetensors", dtype="float32")
    # and converting it further fails without leaving a file behind
    with pytest.raises(CheckpointError):
        convert(tmp_path / "u.safetensors", tmp_path / "f.safetensors", "float32")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["u.safetensors"]


def test_rwkv_cpp_source_keeps_its_transformed_decay(tmp_path):
    convert(shared_file(TINY_MODEL), tmp_path / "t.safetensors", "float32")
    np.testing.assert_array_equal(logits(load_weights(tmp_path / "t.safetensors")), logits(load_weights(TINY_MODEL)))


def test_newer_format_version_is_refused(sources, tmp_path):
    path = tmp_path / "c.safetensors"
    convert(sources / "m.safetensors", path, "float32")
    data = path.read_bytes()
    path.write_bytes(data.replace(b'"format_version":"1"', b'"format_version":"9"', 1))
    with pytest.raises(CheckpointError, match="newer rwkvx \\(file format version 9\\)"):
        load_weights(path)


def test_missing_quantised_part(sources, tmp_path):
    path = tmp_path / "u.safetensors"
    convert(sources / "m.safetensors", path, "uint8")
    data = path.read_bytes()
    path.write_bytes(data.replace(b'"head.weight.ry"', b'"head.weight.zz"', 1))
    with pytest.raises(CheckpointError, match="uint8 matrix head.weight: missing head.weight.ry"):
        load_weights(path)


def test_every_format_gives_the_same_model(tmp_path):
    from test_formats_ggml import write_rwkv_cpp
    from test_formats_hf import hf_folder

    tensors = random_tensors(2, 32, 61, time_shape="flat")
    write_safetensors(tmp_path / "m.safetensors", tensors)
    write_pth(tmp_path / "m.pth", tensors, dtype="float32")
    hf_folder(tmp_path / "hf", tensors, weights="bin", n_vocab=61)
    as_rwkv_cpp = dict(tensors)
    for i in range(2):
        raw = tensors[f"blocks.{i}.att.time_decay"].astype(np.float64)
        as_rwkv_cpp[f"blocks.{i}.att.time_decay"] = (-np.exp(raw)).astype(np.float32)
    write_rwkv_cpp(tmp_path / "m.bin", as_rwkv_cpp, {})
    convert(tmp_path / "m.pth", tmp_path / "c.safetensors", "float32")
    base = load_weights(tmp_path / "m.safetensors")
    ref, _ = Reference(base).forward(TOKENS)
    expected = logits(base)
    assert np.abs(expected - ref).max() <= 1e-3
    for path in ("m.pth", "hf", "m.bin", "c.safetensors"):
        np.testing.assert_array_equal(logits(load_weights(tmp_path / path)), expected)


# ---- the command line ----

def test_cli_converts_and_reports(sources, tmp_path, capsys):
    assert convert_main([str(sources / "m.pth"), str(tmp_path / "c.safetensors"), "--dtype", "uint8"]) == 0
    err = capsys.readouterr().err
    # stderr is not a terminal here: no progress bar, one summary line
    assert err.startswith("rwkvx: wrote ") and "uint8" in err and err.count("\n") == 1


@pytest.mark.parametrize("args,match", [
    (["--dtype", "int4"], "invalid choice: 'int4'"),
    ([], "the following arguments are required: --dtype"),
])
def test_cli_bad_options(sources, tmp_path, capsys, args, match):
    assert convert_main([str(sources / "m.pth"), str(tmp_path / "c.safetensors"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rwkvx: error: ") and match in err and err.count("\n") == 1


def test_cli_refuses_to_overwrite_without_force(sources, tmp_path, capsys):
    dst = tmp_path / "c.safetensors"
    dst.write_bytes(b"keep me")
    assert convert_main([str(sources / "m.pth"), str(dst), "--dtype", "float32"]) == 2
    assert "exists (pass --force to overwrite)" in capsys.readouterr().err and dst.read_bytes() == b"keep me"
    assert convert_main([str(sources / "m.pth"), str(dst), "--dtype", "float32", "--force"]) == 0
    assert load_weights(dst).source == "rwkvx"


def test_cli_bad_source(tmp_path, capsys):
    (tmp_path / "x.bin").write_bytes(b"garbage" * 10)
    assert convert_main([str(tmp_path / "x.bin"), str(tmp_path / "c.safetensors"), "--dtype", "float32"]) == 2
    err = capsys.readouterr().err
    assert "not a checkpoint" in err and err.count("\n") == 1
    assert not (tmp_path / "c.safetensors").exists()


def test_cli_source_is_destination(sources, capsys):
    with pytest.raises(RwkvxError, match="is the source"):
        convert(sources / "m.safetensors", sources / "m.safetensors", "float32", overwrite=True)


# ---- --info ----

def test_info_reads_headers_only(sources, capsys):
    assert run_main(["--info", "-m", str(sources / "m.pth")]) == 0
    out = capsys.readouterr().out
    for part in ("PyTorch zip checkpoint", "RWKV-4: 2 layers, n_embd 32, vocabulary 61, ffn 128",
                 "stored        bfloat16", "float32", "uint8", "quantised at load"):
        assert part in out


def test_info_numbers(sources, tmp_path):
    info = describe(sources / "m.safetensors")
    for dtype in DTYPES:
        nbytes, _, _ = info.memory[dtype]
        assert nbytes == load_weights(sources / "m.safetensors", dtype=dtype).nbytes
    assert info.memory["bfloat16"][1:] == (0, "mapped from the file, no copy")
    convert(sources / "m.safetensors", tmp_path / "u.safetensors", "uint8")
    info = describe(tmp_path / "u.safetensors")
    assert info.memory["float32"] is None and info.memory["uint8"][1] == 0


def test_info_on_a_bad_file_is_exit_2(tmp_path, capsys):
    assert run_main(["--info", "-m", str(tmp_path / "missing.pth")]) == 2
    assert "no such file" in capsys.readouterr().err


# ---- writer and progress bar ----

def test_writer_leaves_nothing_when_incomplete(tmp_path):
    writer = SafetensorsWriter(tmp_path / "w.safetensors", [("a", "F32", (2,)), ("b", "U8", (3,))])
    writer.write("b", np.zeros(3, np.uint8))
    with pytest.raises(ValueError, match="1 tensor\\(s\\) never written: a"):
        writer.close()
    assert list(tmp_path.iterdir()) == []


def test_writer_checks_what_it_is_given(tmp_path):
    with SafetensorsWriter(tmp_path / "w.safetensors", [("a", "F32", (2,))]) as writer:
        with pytest.raises(ValueError, match="a: expected \\[2\\] F32, got \\[2\\] float64"):
            writer.write("a", np.zeros(2))
        writer.write("a", np.ones(2, np.float32))
    assert header(tmp_path / "w.safetensors")["a"] == {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


def test_progress_bar_draws_only_when_asked():
    stream = io.StringIO()
    bar = Progress("loading", 2_000_000, enabled=True, delay=0.0, stream=stream)
    bar.advance(1_000_000)
    bar.advance(1_000_000)
    bar.close()
    text = stream.getvalue()
    assert text.startswith("\rrwkvx: loading [") and "100%" in text and text.endswith("\n")
    quiet = io.StringIO()
    bar = Progress("loading", 10, stream=quiet, delay=0.0)  # StringIO is not a terminal
    bar.advance(10)
    bar.close()
    assert quiet.getvalue() == ""


def test_loading_prints_nothing_when_not_a_terminal(sources, capsys):
    load_weights(sources / "m.pth", dtype="uint8")
    assert capsys.readouterr() == ("", "")


def test_converting_a_later_architecture_from_the_command_line(tmp_path):
    from conftest import SHARED, shared_file
    src = shared_file(SHARED / "models" / "tiny-rwkv-7v0-834K-FP32.bin")
    result = subprocess.run([sys.executable, "-m", "rwkvx.convert", str(src), str(tmp_path / "out.safetensors"),
                             "--dtype", "uint8"],
                            capture_output=True, text=True, timeout=120, cwd=os.path.dirname(__file__))
    assert result.returncode == 0, result.stderr
    assert result.stderr.startswith(f"rwkvx: wrote {tmp_path / 'out.safetensors'}: RWKV-7 12 layers x 64")
    assert header(tmp_path / "out.safetensors")["__metadata__"]["architecture"] == "RWKV-7"