"""PyTorch .pth checkpoints read without torch: files written here by hand, and by torch.save when
torch is installed (the comparisons against torch.load skip otherwise)."""
import collections
import os
import pickle
import struct
import zipfile

import numpy as np
import pytest

import rwkvx
from rwkvx.errors import CheckpointError
from rwkvx.loader import load_weights, open_checkpoint
from rwkvx.reference import Reference
from rwkvx.run import main
from rwkvx.testing import random_tensors, write_safetensors
from rwkvx.weights import to_bfloat16

_STORAGE = {"float32": ("FloatStorage", np.float32), "float16": ("HalfStorage", np.float16),
            "bfloat16": ("BFloat16Storage", np.uint16)}


# ---- a torch-free writer of torch.save's zip format, opcode by opcode ----

class _Pickle:
    """Protocol-2 pickle opcodes, written directly (no module lookups, so no torch needed)."""

    def __init__(self):
        self.out = bytearray(pickle.PROTO + b"\x02")

    def glob(self, module, name):
        self.out += pickle.GLOBAL + f"{module}\n{name}\n".encode()

    def text(self, s):
        b = s.encode()
        self.out += pickle.BINUNICODE + struct.pack("<I", len(b)) + b

    def int(self, i):
        self.out += pickle.BININT + struct.pack("<i", i)

    def ints(self, values):
        self.out += pickle.MARK
        for v in values:
            self.int(v)
        self.out += pickle.TUPLE

    def ordered_dict(self):
        self.glob("collections", "OrderedDict")
        self.out += pickle.EMPTY_TUPLE + pickle.REDUCE


def state_dict_pickle(entries):
    """entries: (name, storage class, storage key, storage numel, offset, size, stride)."""
    p = _Pickle()
    p.ordered_dict()
    p.out += pickle.MARK
    for name, cls, key, numel, offset, size, stride in entries:
        p.text(name)
        p.glob("torch._utils", "_rebuild_tensor_v2")
        p.out += pickle.MARK
        p.out += pickle.MARK
        p.text("storage")
        p.glob("torch", cls)
        p.text(key)
        p.text("cpu")
        p.int(numel)
        p.out += pickle.TUPLE + pickle.BINPERSID
        p.int(offset)
        p.ints(size)
        p.ints(stride)
        p.out += pickle.NEWFALSE
        p.ordered_dict()
        p.out += pickle.TUPLE + pickle.REDUCE
    p.out += pickle.SETITEMS + pickle.STOP
    return bytes(p.out)


def write_zip(path, pkl, storages, prefix="archive", byteorder="little", compress=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr(f"{prefix}/data.pkl", pkl)
        if byteorder:
            z.writestr(f"{prefix}/byteorder", byteorder)
        for key, data in storages.items():
            z.writestr(f"{prefix}/data/{key}", data, compress_type=compress)
        z.writestr(f"{prefix}/version", "3\n")
    return path


def write_pth(path, tensors, dtype="bfloat16", prefix="archive"):
    """tensors: name -> float32 array; each gets its own storage in `dtype`, as torch.save writes."""
    cls, np_dtype = _STORAGE[dtype]
    entries, storages = [], {}
    for i, (name, value) in enumerate(tensors.items()):
        raw = to_bfloat16(value) if dtype == "bfloat16" else np.ascontiguousarray(value, dtype=np_dtype)
        strides = [int(np.prod(value.shape[d + 1:])) for d in range(value.ndim)]
        entries.append((name, cls, str(i), raw.size, 0, value.shape, strides))
        storages[str(i)] = raw.tobytes()
    return write_zip(path, state_dict_pickle(entries), storages, prefix=prefix)


def bf16_round(a):
    return (to_bfloat16(a).astype(np.uint32) << 16).view(np.float32)


def expect_error(path, match):
    with pytest.raises(CheckpointError, match=match) as info:
        load_weights(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)
    return str(info.value)


# ---- torch-free ----

@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_handwritten_pth_loads_like_the_same_safetensors(tmp_path, dtype):
    tensors = random_tensors(2, 32, 50)
    write_pth(tmp_path / "m.pth", tensors, dtype=dtype, prefix="RWKV-4-Pile-169M-20220807-8023")
    write_safetensors(tmp_path / "m.safetensors", tensors, dtype=dtype)
    a = load_weights(tmp_path / "m.pth", dtype="float32")
    b = load_weights(tmp_path / "m.safetensors", dtype="float32")
    assert a.source == "pth"
    for x, y in zip(a.arrays(), b.arrays()):
        np.testing.assert_array_equal(x, y)


def test_storages_shared_at_offsets_and_strided_views(tmp_path):
    # one float32 storage holding a (4, 6) matrix; tensors are views of it, as torch saves them
    base = np.arange(24, dtype=np.float32).reshape(4, 6) / 7
    entries = [
        ("whole", "FloatStorage", "0", 24, 0, (4, 6), (6, 1)),
        ("rows", "FloatStorage", "0", 24, 6, (2, 6), (6, 1)),         # base[1:3]
        ("transposed", "FloatStorage", "0", 24, 0, (6, 4), (1, 6)),   # base.T
        ("column", "FloatStorage", "0", 24, 2, (4,), (6,)),           # base[:, 2]
        ("broadcast", "FloatStorage", "0", 24, 5, (3, 2), (0, 1)),    # an expand()ed view
    ]
    write_zip(tmp_path / "v.pth", state_dict_pickle(entries), {"0": base.tobytes()})
    source = open_checkpoint(tmp_path / "v.pth")
    expected = {"whole": base, "rows": base[1:3], "transposed": base.T, "column": base[:, 2],
                "broadcast": np.broadcast_to(base.reshape(-1)[5:7], (3, 2))}
    for name, value in expected.items():
        tensor = source.tensors[name]
        np.testing.assert_array_equal(tensor.read(), value)
        np.testing.assert_array_equal(tensor.float32(), value)
    # contiguous views map the file (offsets here are not even aligned: zipfile does not pad)
    assert source.tensors["rows"].strides is None and source.tensors["transposed"].strides == (1, 6)


def test_bf16_pth_run_in_bfloat16_keeps_the_stored_bits(tmp_path):
    tensors = random_tensors(2, 16, 10)
    path = write_pth(tmp_path / "m.pth", tensors)
    # zipfile does not align members, so some tensors are copied rather than mapped: same bits
    w = load_weights(path, dtype="bfloat16")
    np.testing.assert_array_equal(w.head, to_bfloat16(tensors["head.weight"]))


def test_forbidden_global_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    p = _Pickle()
    p.glob("os", "system")
    p.text(f"touch {marker}")
    p.out += pickle.TUPLE1 + pickle.REDUCE + pickle.STOP
    write_zip(tmp_path / "evil.pth", bytes(p.out), {})
    message = expect_error(tmp_path / "evil.pth", "refers to os.system.*refused, nothing was executed")
    assert not marker.exists() and "pwned" not in message


def test_forbidden_global_in_the_cli_is_exit_2(tmp_path, capsys):
    p = _Pickle()
    p.glob("builtins", "eval")
    p.text("1")
    p.out += pickle.TUPLE1 + pickle.REDUCE + pickle.STOP
    write_zip(tmp_path / "evil.pth", bytes(p.out), {})
    assert main(["-m", str(tmp_path / "evil.pth"), "-p", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rwkvx: error: ") and "builtins.eval" in err and err.count("\n") == 1


def test_persistent_id_of_the_wrong_shape(tmp_path):
    p = _Pickle()
    p.text("not a storage id")
    p.out += pickle.BINPERSID + pickle.STOP
    write_zip(tmp_path / "m.pth", bytes(p.out), {})
    expect_error(tmp_path / "m.pth", "unexpected persistent id")


def test_truncated_zip(tmp_path):
    path = write_pth(tmp_path / "m.pth", random_tensors(1, 8, 10))
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    expect_error(path, "truncated or corrupt zip")


def test_zip_member_running_past_the_end_of_the_file(tmp_path):
    entries = [("emb.weight", "FloatStorage", "0", 4, 0, (2, 2), (2, 1))]
    path = write_zip(tmp_path / "m.pth", state_dict_pickle(entries), {"0": b"\0" * 16})
    data = bytearray(path.read_bytes())
    # the central directory entry of archive/data/0 claims 1 MB (compressed and stored sizes)
    entry = data.rindex(b"PK\x01\x02", 0, data.rindex(b"archive/data/0"))
    struct.pack_into("<II", data, entry + 20, 1 << 20, 1 << 20)
    path.write_bytes(bytes(data))
    expect_error(path, "truncated: zip member archive/data/0 ends at byte")


def test_storage_member_shorter_than_its_tensors(tmp_path):
    entries = [("emb.weight", "FloatStorage", "0", 40, 0, (10, 4), (4, 1))]
    write_zip(tmp_path / "m.pth", state_dict_pickle(entries), {"0": b"\0" * 100})
    expect_error(tmp_path / "m.pth", "truncated: storage archive/data/0 holds 100 bytes")


def test_view_past_the_end_of_its_storage(tmp_path):
    entries = [("emb.weight", "FloatStorage", "0", 10, 4, (2, 4), (4, 1))]
    write_zip(tmp_path / "m.pth", state_dict_pickle(entries), {"0": b"\0" * 40})
    expect_error(tmp_path / "m.pth", "emb.weight: its view reaches element 11 of a storage of 10")


def test_missing_storage_member(tmp_path):
    entries = [("emb.weight", "FloatStorage", "7", 4, 0, (2, 2), (2, 1))]
    write_zip(tmp_path / "m.pth", state_dict_pickle(entries), {})
    expect_error(tmp_path / "m.pth", "storage 7 has no zip member archive/data/7")


def test_compressed_member(tmp_path):
    entries = [("emb.weight", "FloatStorage", "0", 4, 0, (2, 2), (2, 1))]
    write_zip(tmp_path / "m.pth", state_dict_pickle(entries), {"0": b"\0" * 16}, compress=zipfile.ZIP_DEFLATED)
    expect_error(tmp_path / "m.pth", "compressed")


def test_big_endian(tmp_path):
    write_zip(tmp_path / "m.pth", state_dict_pickle([]), {}, byteorder="big")
    expect_error(tmp_path / "m.pth", "big-endian")


def test_zip_without_data_pkl(tmp_path):
    with zipfile.ZipFile(tmp_path / "m.pth", "w") as z:
        z.writestr("notes.txt", "hello")
    expect_error(tmp_path / "m.pth", "without a data.pkl: not a PyTorch checkpoint")


def test_pickle_of_something_else(tmp_path):
    write_zip(tmp_path / "m.pth", pickle.dumps([1, 2, 3], protocol=2), {})
    expect_error(tmp_path / "m.pth", "holds a list, not a dict of tensors")


def test_garbage_pickle(tmp_path):
    write_zip(tmp_path / "m.pth", b"\x80\x02garbage", {})
    expect_error(tmp_path / "m.pth", "data.pkl is not a valid checkpoint pickle")


def test_legacy_pickle_format(tmp_path):
    # torch.save before 1.6 wrote a pickled magic number, then pickles, then raw storages
    (tmp_path / "old.pth").write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + b"\0" * 64)
    expect_error(tmp_path / "old.pth", "legacy PyTorch pickle file")


# ---- against torch itself ----

@pytest.fixture
def torch():
    return pytest.importorskip("torch")


def _torch_model(torch, tensors, dtype):
    return collections.OrderedDict((k, torch.from_numpy(v.copy()).to(dtype)) for k, v in tensors.items())


def _as_numpy(t):
    import torch
    t = t.detach()
    return t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()


def test_torch_save_bf16_model_agrees_with_torch_load(tmp_path, torch):
    tensors = random_tensors(2, 32, 50)
    torch.save(_torch_model(torch, tensors, torch.bfloat16), tmp_path / "model.pth")
    # the zip's member prefix is the stem the file was saved under, whatever it is called now
    os.rename(tmp_path / "model.pth", tmp_path / "renamed.pth")
    loaded = torch.load(tmp_path / "renamed.pth", weights_only=True)
    source = open_checkpoint(tmp_path / "renamed.pth")
    assert set(source.tensors) == set(loaded)
    for name, t in loaded.items():
        assert source.tensors[name].dtype == "BF16"
        np.testing.assert_array_equal(source.tensors[name].float32(), _as_numpy(t))

    # run in bfloat16, every matrix maps the file (torch aligns its members)
    w = load_weights(tmp_path / "renamed.pth", dtype="bfloat16")
    for array in (w.emb, w.head, w.blocks[0]["att_key"], w.blocks[1]["ffn_value"]):
        assert not array.flags.owndata and not array.flags.writeable
    # logits as the float64 reference of the same (bf16-rounded) weights
    write_safetensors(tmp_path / "f.safetensors", {k: bf16_round(v) for k, v in tensors.items()})
    logits, _ = rwkvx.RWKV(w).forward([1, 2, 3, 4])
    ref, _ = Reference(load_weights(tmp_path / "f.safetensors")).forward([1, 2, 3, 4])
    assert np.abs(logits - ref).max() <= 1e-5 * np.abs(ref).max()


def test_torch_save_shared_storage_views(tmp_path, torch):
    # every tensor is a view into one flat buffer, saved as one storage at element offsets
    tensors = random_tensors(1, 16, 10, time_shape="flat")
    flat = torch.zeros(sum(v.size for v in tensors.values()) + 7, dtype=torch.float16)
    views, pos = collections.OrderedDict(), 3
    for name, value in tensors.items():
        view = flat[pos:pos + value.size].view(value.shape)
        view.copy_(torch.from_numpy(value))
        views[name] = view
        pos += value.size
    views["blocks.0.att.key.weight"] = views["blocks.0.att.key.weight"].t()  # a transposed view too
    torch.save(views, tmp_path / "shared.pth")
    loaded = torch.load(tmp_path / "shared.pth", weights_only=True)
    source = open_checkpoint(tmp_path / "shared.pth")
    offsets = {t.offset for t in source.tensors.values()}
    assert len(offsets) == len(tensors)  # one storage, distinct offsets into it
    for name, t in loaded.items():
        np.testing.assert_array_equal(source.tensors[name].read(), t.numpy())
    w = load_weights(tmp_path / "shared.pth")
    np.testing.assert_array_equal(w.blocks[0]["att_key"], loaded["blocks.0.att.key.weight"].float().numpy())


def test_torch_save_of_parameters_and_module_state_dict(tmp_path, torch):
    module = torch.nn.Linear(8, 4, bias=True)
    torch.save(dict(module.named_parameters()), tmp_path / "params.pth")        # nn.Parameter objects
    torch.save(module.state_dict(), tmp_path / "state.pth")                     # OrderedDict with _metadata
    for name in ("params.pth", "state.pth"):
        source = open_checkpoint(tmp_path / name)
        np.testing.assert_array_equal(source.tensors["weight"].read(), module.weight.detach().numpy())
        np.testing.assert_array_equal(source.tensors["bias"].read(), module.bias.detach().numpy())
