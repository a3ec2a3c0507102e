"""PyTorch ``.pth`` / ``pytorch_model.bin`` checkpoints, read without PyTorch and without
executing anything from the file.

Since torch 1.6, ``torch.save`` writes an uncompressed zip: ``<prefix>/data.pkl`` pickles
the object (for a checkpoint, a dict of tensors) and ``<prefix>/data/<key>`` holds each
storage's raw little-endian bytes. The prefix varies (``archive``, the file's stem, ...).
In the pickle a tensor is ``torch._utils._rebuild_tensor_v2(storage, storage_offset, size,
stride, requires_grad, backward_hooks[, metadata])`` and a storage is a persistent id
``("storage", torch.BFloat16Storage, key, location, numel)``. Several tensors may share
one storage at different element offsets (views and slices of one tensor).

The pickle is read by an Unpickler whose find_class knows only those few names and maps
each to a stand-in defined here, which records arguments and calls nothing else. Any
other global (``os.system``, a model class, ...) is refused before anything runs. Storages
are not read: each tensor becomes a Tensor at its byte offset inside its zip member
(members are stored uncompressed), so the loader maps or reads it like any other file.
"""
from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from typing import Callable

from rwkvx.errors import CheckpointError
from rwkvx.tensorfile import NUMPY_DTYPES, MappedFile, Tensor, TensorSource, fail, n_elements

ZIP_MAGIC = b"PK\x03\x04"

# torch storage class -> stored dtype name
_STORAGE_TYPES = {
    "FloatStorage": "F32", "HalfStorage": "F16", "BFloat16Storage": "BF16", "DoubleStorage": "F64",
    "ByteStorage": "U8", "CharStorage": "I8", "ShortStorage": "I16", "IntStorage": "I32",
    "LongStorage": "I64", "BoolStorage": "BOOL", "UntypedStorage": "U8",
}


class _Refused(Exception):
    """A pickle asked for something a checkpoint of tensors never needs."""


class _StorageType:
    def __init__(self, dtype: str):
        self.dtype = dtype


class _Storage:
    """A storage member of the zip: dtype, byte offset of its data in the file, element count."""

    def __init__(self, key: str, dtype: str, offset: int, numel: int):
        self.key, self.dtype, self.offset, self.numel = key, dtype, offset, numel


class _TensorRef:
    def __init__(self, storage: _Storage, storage_offset: int, size: tuple, stride: tuple):
        self.storage, self.storage_offset, self.size, self.stride = storage, storage_offset, size, stride


class _TypeTag:
    """Stands for torch.Tensor / torch.nn.Parameter where a pickle names the type."""


def _ints(value, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(isinstance(v, int) and v >= 0 for v in value):
        raise _Refused(f"tensor {what} {value!r} is not a tuple of non-negative ints")
    return tuple(value)


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored) -> _TensorRef:
    # torch._utils._rebuild_tensor(_v2): requires_grad, hooks and metadata do not matter here
    if not isinstance(storage, _Storage):
        raise _Refused("a tensor is rebuilt from something that is not a storage")
    if not isinstance(storage_offset, int) or storage_offset < 0:
        raise _Refused(f"tensor storage offset {storage_offset!r} is not a non-negative int")
    size, stride = _ints(size, "size"), _ints(stride, "stride")
    if len(size) != len(stride):
        raise _Refused(f"tensor size {size} and stride {stride} differ in length")
    return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data, *_ignored):
    # torch._utils._rebuild_parameter(_with_state): an nn.Parameter is its data
    return data


def _rebuild_from_type(func, new_type, args, state):
    # torch._tensor._rebuild_from_type_v2: func is one of the stand-ins above
    if func not in (_rebuild_tensor, _rebuild_parameter) or not isinstance(args, tuple):
        raise _Refused("_rebuild_from_type_v2 with an unexpected function")
    return func(*args)


_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("torch", "Tensor"): _TypeTag,
    ("torch.nn.parameter", "Parameter"): _TypeTag,
}
for _name, _dtype in _STORAGE_TYPES.items():
    _GLOBALS[("torch", _name)] = _StorageType(_dtype)
    _GLOBALS[("torch.storage", _name)] = _StorageType(_dtype)


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, storage: Callable[[str, str, int], "_Storage"]):
        super().__init__(io.BytesIO(data))
        self._storage = storage

    def find_class(self, module: str, name: str):
        try:
            return _GLOBALS[(module, name)]
        except KeyError:
            raise _Refused(f"data.pkl refers to {module}.{name}, which a checkpoint of tensors never "
                           "needs: refused, nothing was executed") from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str) and isinstance(pid[4], int)):
            raise _Refused(f"unexpected persistent id {pid!r}")
        return self._storage(pid[2], pid[1].dtype, pid[4])


class _Zip:
    """The members of a stored (uncompressed) zip: name -> (byte offset of data, size)."""

    def __init__(self, file: MappedFile):
        self.file = file
        path = file.path
        try:
            with open(path, "rb") as f:
                infos = zipfile.ZipFile(f).infolist()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
            raise fail(path, f"truncated or corrupt zip archive ({e})") from None
        self.members: dict[str, tuple[int, int, int]] = {}
        for info in infos:
            self.members[info.filename] = (info.header_offset, info.file_size, info.compress_type)

    def locate(self, name: str) -> tuple[int, int]:
        """(data offset, size) of a member, checked against the file."""
        path, size = self.file.path, self.file.size
        header_offset, file_size, compress = self.members[name]
        if compress != zipfile.ZIP_STORED:
            raise fail(path, f"zip member {name} is compressed; rwkvx maps storages and needs them stored "
                             "(torch.save writes them so)")
        if header_offset + 30 > size or self.file.map[header_offset:header_offset + 4] != ZIP_MAGIC:
            raise fail(path, f"corrupt zip: no local header for member {name} at byte {header_offset}")
        name_len, extra_len = struct.unpack_from("<HH", self.file.map, header_offset + 26)
        start = header_offset + 30 + name_len + extra_len
        if start + file_size > size:
            raise fail(path, f"truncated: zip member {name} ends at byte {start + file_size}, "
                             f"the file has {size}")
        return start, file_size

    def read(self, name: str) -> bytes:
        start, n = self.locate(name)
        return bytes(self.file.map[start:start + n])


def open_pth(file: MappedFile) -> TensorSource:
    """Index the tensors of a torch.save zip checkpoint."""
    path = file.path
    archive = _Zip(file)
    pickles = sorted((n for n in archive.members if n == "data.pkl" or n.endswith("/data.pkl")),
                     key=lambda n: (n.count("/"), n))
    if not pickles:
        raise fail(path, "zip file without a data.pkl: not a PyTorch checkpoint")
    pkl = pickles[0]
    prefix = pkl[:-len("data.pkl")]
    if (prefix + "byteorder") in archive.members:
        order = archive.read(prefix + "byteorder").decode("ascii", "replace").strip()
        if order != "little":
            raise fail(path, f"PyTorch checkpoint stored {order}-endian; rwkvx reads little-endian data")

    storages: dict[str, _Storage] = {}

    def storage(key: str, dtype: str, numel: int) -> _Storage:
        if key in storages:
            return storages[key]
        member = f"{prefix}data/{key}"
        if member not in archive.members:
            raise fail(path, f"PyTorch checkpoint: storage {key} has no zip member {member}")
        start, nbytes = archive.locate(member)
        needed = numel * NUMPY_DTYPES[dtype].itemsize
        if nbytes < needed:
            raise fail(path, f"truncated: storage {member} holds {nbytes} bytes, its {numel} {dtype} "
                             f"elements need {needed}")
        storages[key] = _Storage(key, dtype, start, numel)
        return storages[key]

    try:
        obj = _Unpickler(archive.read(pkl), storage).load()
    except _Refused as e:
        raise fail(path, str(e)) from None
    except RecursionError:
        raise fail(path, f"{pkl} nests too deeply to be a checkpoint") from None
    except CheckpointError:
        raise
    except Exception as e:
        raise fail(path, f"{pkl} is not a valid checkpoint pickle ({type(e).__name__}: {e})") from None

    if isinstance(obj, dict) and not any(isinstance(v, _TensorRef) for v in obj.values()):
        # {"state_dict": {...}} and {"model": {...}}, as some trainers save
        inner = [v for k, v in obj.items() if k in ("state_dict", "model", "module") and isinstance(v, dict)]
        if inner:
            obj = inner[0]
    if not isinstance(obj, dict):
        raise fail(path, f"PyTorch checkpoint holds a {type(obj).__name__}, not a dict of tensors")

    source = TensorSource(path, "pth")
    source.files.append(file)
    for name, ref in obj.items():
        if not isinstance(name, str) or not isinstance(ref, _TensorRef):
            continue
        source.tensors[name] = _tensor(path, name, ref, file)
    return source


def _tensor(path: str, name: str, ref: _TensorRef, file: MappedFile) -> Tensor:
    st = ref.storage
    itemsize = NUMPY_DTYPES[st.dtype].itemsize
    count = n_elements(ref.size)
    if count:
        last = ref.storage_offset + sum((d - 1) * s for d, s in zip(ref.size, ref.stride))
        if last >= st.numel:
            raise fail(path, f"tensor {name}: its view reaches element {last} of a storage of {st.numel}")
    # C-contiguous unless a dimension longer than 1 has another stride
    expected, contiguous = 1, True
    for d, s in zip(reversed(ref.size), reversed(ref.stride)):
        if d != 1 and s != expected:
            contiguous = False
        expected *= d
    offset = st.offset + ref.storage_offset * itemsize
    return Tensor(name, file, st.dtype, ref.size, offset, None if contiguous else ref.stride)
