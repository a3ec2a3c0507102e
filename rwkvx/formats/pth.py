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
import struct
import zipfile
from typing import Callable

from rwkvx.errors import CheckpointError
from rwkvx.formats.tensorfile import (MAX_TENSORS, NUMPY_DTYPES, MappedFile, Tensor, TensorSource, describe, fail,
                              n_elements, printable)

ZIP_MAGIC = b"PK\x03\x04"

# torch storage class -> stored dtype name
_STORAGE_TYPES = {
    "FloatStorage": "F32", "HalfStorage": "F16", "BFloat16Storage": "BF16", "DoubleStorage": "F64",
    "ByteStorage": "U8", "CharStorage": "I8", "ShortStorage": "I16", "IntStorage": "I32",
    "LongStorage": "I64", "BoolStorage": "BOOL", "UntypedStorage": "U8",
}

# Bounds on what a data.pkl may build. A 14B RWKV-4 .pth pickles ~730 tensors in ~15,000
# opcodes and ~100 KB; these leave two orders of magnitude and stop a "billion laughs"
# pickle (containers of containers shared by reference, 2^60 elements in a few hundred
# bytes) before anything walks or hashes it.
MAX_PICKLE_BYTES = 64 << 20
MAX_OPCODES = 2_000_000
# elements one container reaches, counting shared ones each time they are reached
MAX_CONTAINER_WEIGHT = 1_000_000
MAX_NESTING = 64
# a dict key is hashed on every insertion: it must stay tiny
MAX_KEY_WEIGHT = 64
MAX_DIMS = 16
MAX_CENTRAL_DIRECTORY = 32 << 20
_MAX_INDEX = 1 << 62


class _Refused(Exception):
    """A pickle asked for something a checkpoint of tensors never needs."""


class _Malformed(_Refused):
    """A pickle that is not a well-formed program (truncated, stack errors, unknown opcodes)."""


class _Frozen:
    """Stand-ins shared by every load are immutable, so no file can change how the next is read."""

    __slots__ = ()

    def __setattr__(self, name, value):
        raise _Refused("a pickle may not change rwkvx's own objects")

    __delattr__ = __setattr__


class _StorageType(_Frozen):
    __slots__ = ("dtype",)

    def __init__(self, dtype: str):
        object.__setattr__(self, "dtype", dtype)


class _Storage:
    """A storage member of the zip: dtype, byte offset of its data in the file, element count."""

    def __init__(self, key: str, dtype: str, offset: int, numel: int):
        self.key, self.dtype, self.offset, self.numel = key, dtype, offset, numel


class _TensorRef:
    def __init__(self, storage: _Storage, storage_offset: int, size: tuple, stride: tuple):
        self.storage, self.storage_offset, self.size, self.stride = storage, storage_offset, size, stride


class _TypeTag(_Frozen):
    """Stands for torch.Tensor / torch.nn.Parameter where a pickle names the type."""

    __slots__ = ()


def _ints(value, what: str) -> tuple[int, ...]:
    # the length first: nothing here walks a container of unknown size
    if not isinstance(value, (tuple, list)) or len(value) > MAX_DIMS:
        raise _Refused(f"tensor {what} is {describe(value)}, not a tuple of at most {MAX_DIMS} ints")
    if not all(type(v) is int and 0 <= v < _MAX_INDEX for v in value):
        raise _Refused(f"tensor {what} is not a tuple of non-negative ints below 2^62")
    return tuple(value)


def _rebuild_tensor(storage=None, storage_offset=None, size=None, stride=None, *_ignored) -> _TensorRef:
    # torch._utils._rebuild_tensor(_v2): requires_grad, hooks and metadata do not matter here
    if not isinstance(storage, _Storage):
        raise _Refused("a tensor is rebuilt from something that is not a storage")
    if type(storage_offset) is not int or not 0 <= storage_offset < _MAX_INDEX:
        raise _Refused(f"tensor storage offset {describe(storage_offset)} is not a non-negative int below 2^62")
    size, stride = _ints(size, "size"), _ints(stride, "stride")
    if len(size) != len(stride):
        raise _Refused(f"tensor size {size} and stride {stride} differ in length")
    return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data=None, *_ignored):
    # torch._utils._rebuild_parameter(_with_state): an nn.Parameter is its data
    if not isinstance(data, _TensorRef):
        raise _Refused("a parameter is rebuilt from something that is not a tensor")
    return data


def _rebuild_from_type(func=None, new_type=None, args=None, state=None, *_ignored):
    # torch._tensor._rebuild_from_type_v2: func is one of the stand-ins above
    if func not in (_rebuild_tensor, _rebuild_parameter) or type(args) is not tuple or len(args) > 8:
        raise _Refused("_rebuild_from_type_v2 with an unexpected function")
    return func(*args)


def _ordered_dict(*args):
    # collections.OrderedDict: pickled as OrderedDict() then SETITEMS
    if args:
        raise _Refused("OrderedDict called with arguments")
    return collections.OrderedDict()


_GLOBALS = {
    ("collections", "OrderedDict"): _ordered_dict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("torch", "Tensor"): _TypeTag(),
    ("torch.nn.parameter", "Parameter"): _TypeTag(),
}
for _name, _dtype in _STORAGE_TYPES.items():
    _GLOBALS[("torch", _name)] = _StorageType(_dtype)
    _GLOBALS[("torch.storage", _name)] = _StorageType(_dtype)
_CALLABLE = (_ordered_dict, _rebuild_tensor, _rebuild_parameter, _rebuild_from_type)

_MARK = object()


class _Unpickler:
    """A pickle machine for the opcodes torch.save writes, and nothing else.

    Not pickle.Unpickler: that one grows its memo to any index a file names, builds
    structures of any size and hashes them as dict keys, and lets BUILD set attributes on
    any object. Here the memo is a dict, every container's weight (elements reachable,
    shared ones counted each time) and nesting are tracked as it is built and bounded, dict
    keys must be small, callables are the stand-ins above (called with checked arguments),
    and BUILD applies only to dicts this pickle made (torch's state_dict _metadata, ignored).
    """

    def __init__(self, data: bytes, storage: Callable[[str, str, int], "_Storage"]):
        self.data = data
        self._storage = storage
        # id -> (container, weight, depth) for containers built here; holding the container
        # keeps its id from being reused
        self._sizes: dict[int, tuple[object, int, int]] = {}

    # -- weights --

    def _size(self, obj) -> tuple[int, int]:
        entry = self._sizes.get(id(obj))
        return (entry[1], entry[2]) if entry is not None else (1, 0)

    def _track(self, obj, weight: int, depth: int):
        if weight > MAX_CONTAINER_WEIGHT:
            raise _Refused(f"data.pkl builds a structure of more than {MAX_CONTAINER_WEIGHT:,} elements "
                           "(shared references multiplied: a pickle bomb?)")
        if depth > MAX_NESTING:
            raise _Refused(f"data.pkl nests structures more than {MAX_NESTING} deep")
        self._sizes[id(obj)] = (obj, weight, depth)
        return obj

    def _new(self, container, items) -> object:
        weight, depth = 1, 0
        for item in items:
            w, d = self._size(item)
            weight += w
            depth = max(depth, d)
        return self._track(container, weight, depth + 1)

    def _grow(self, container, items) -> None:
        weight, depth = self._size(container)
        for item in items:
            w, d = self._size(item)
            weight += w
            depth = max(depth, d + 1)
        self._track(container, weight, depth)

    def _key(self, key):
        if isinstance(key, (str, int, float, bytes)) or key is None:
            return key
        if type(key) is tuple and self._size(key)[0] <= MAX_KEY_WEIGHT:
            return key
        raise _Refused(f"a dict key is {describe(key)}: a checkpoint's keys are names")

    # -- the machine --

    def load(self):
        data, n = self.data, len(self.data)
        stack: list = []
        marks: list[int] = []
        memo: dict[int, object] = {}
        pos, ops = 0, 0

        def take(k: int) -> bytes:
            nonlocal pos
            if k < 0 or pos + k > n:
                raise _Malformed("it ends in the middle of an opcode")
            chunk = data[pos:pos + k]
            pos += k
            return chunk

        def pop_mark() -> list:
            if not marks:
                raise _Malformed("no MARK")
            at = marks.pop()
            items = stack[at:]
            del stack[at:]
            return items

        def pop():
            if len(stack) <= (marks[-1] if marks else 0):
                raise _Malformed("pops an empty stack")
            return stack.pop()

        def top():
            if len(stack) <= (marks[-1] if marks else 0):
                raise _Malformed("reads an empty stack")
            return stack[-1]

        def put(index: int) -> None:
            # a memo index is at most the number of opcodes run so far in a real pickle
            if index > ops:
                raise _Malformed(f"memo index {index} at opcode {ops}")
            memo[index] = top()

        def get(index: int) -> None:
            if index not in memo:
                raise _Malformed(f"memo index {index} was never stored")
            stack.append(memo[index])

        def text(raw: bytes) -> str:
            try:
                return raw.decode("utf-8", "surrogatepass")
            except UnicodeDecodeError:
                raise _Malformed("a string is not UTF-8") from None

        def dict_items(target, items) -> None:
            if type(target) not in (dict, collections.OrderedDict) or len(items) % 2:
                raise _Malformed("SETITEMS on something that is not a dict")
            for i in range(0, len(items), 2):
                target[self._key(items[i])] = items[i + 1]
            self._grow(target, items)

        def list_items(target, items) -> None:
            if type(target) is not list:
                raise _Malformed("APPENDS on something that is not a list")
            target.extend(items)
            self._grow(target, items)

        while True:
            ops += 1
            if ops > MAX_OPCODES:
                raise _Refused(f"data.pkl runs more than {MAX_OPCODES:,} opcodes")
            if pos >= n:
                raise _Malformed("it ends without a STOP opcode")
            op = data[pos]
            pos += 1
            if op == 0x80:  # PROTO
                if take(1)[0] > 5:
                    raise _Refused("pickle protocol above 5")
            elif op == 0x95:  # FRAME: a length hint only
                take(8)
            elif op == 0x2E:  # STOP
                if len(stack) != 1 or marks:
                    raise _Malformed("STOP with a stack of other than one object")
                return stack[0]
            elif op == 0x28:  # MARK
                marks.append(len(stack))
            elif op == 0x30:  # POP
                if marks and marks[-1] == len(stack):
                    marks.pop()
                else:
                    pop()
            elif op == 0x31:  # POP_MARK
                pop_mark()
            elif op == 0x32:  # DUP
                stack.append(top())
            elif op == 0x4E:  # NONE
                stack.append(None)
            elif op == 0x88:  # NEWTRUE
                stack.append(True)
            elif op == 0x89:  # NEWFALSE
                stack.append(False)
            elif op == 0x4A:  # BININT
                stack.append(struct.unpack("<i", take(4))[0])
            elif op == 0x4B:  # BININT1
                stack.append(take(1)[0])
            elif op == 0x4D:  # BININT2
                stack.append(struct.unpack("<H", take(2))[0])
            elif op in (0x8A, 0x8B):  # LONG1, LONG4
                k = take(1)[0] if op == 0x8A else struct.unpack("<i", take(4))[0]
                if not 0 <= k <= 16:
                    raise _Refused(f"data.pkl holds an integer of {k} bytes")
                stack.append(int.from_bytes(take(k), "little", signed=True))
            elif op == 0x47:  # BINFLOAT
                stack.append(struct.unpack(">d", take(8))[0])
            elif op == 0x58:  # BINUNICODE
                stack.append(text(take(struct.unpack("<I", take(4))[0])))
            elif op == 0x8C:  # SHORT_BINUNICODE
                stack.append(text(take(take(1)[0])))
            elif op == 0x8D:  # BINUNICODE8
                stack.append(text(take(struct.unpack("<Q", take(8))[0])))
            elif op == 0x43:  # SHORT_BINBYTES
                stack.append(take(take(1)[0]))
            elif op == 0x42:  # BINBYTES
                stack.append(take(struct.unpack("<I", take(4))[0]))
            elif op == 0x8E:  # BINBYTES8
                stack.append(take(struct.unpack("<Q", take(8))[0]))
            elif op == 0x29:  # EMPTY_TUPLE
                stack.append(())
            elif op in (0x85, 0x86, 0x87):  # TUPLE1, TUPLE2, TUPLE3
                k = op - 0x84
                if len(stack) - (marks[-1] if marks else 0) < k:
                    raise _Malformed("TUPLE of a short stack")
                items = stack[-k:]
                del stack[-k:]
                stack.append(self._new(tuple(items), items))
            elif op == 0x74:  # TUPLE
                items = pop_mark()
                stack.append(self._new(tuple(items), items))
            elif op == 0x5D:  # EMPTY_LIST
                stack.append(self._track([], 1, 1))
            elif op == 0x6C:  # LIST
                items = pop_mark()
                stack.append(self._new(list(items), items))
            elif op == 0x61:  # APPEND
                item = pop()
                list_items(top(), [item])
            elif op == 0x65:  # APPENDS
                items = pop_mark()
                list_items(top(), items)
            elif op == 0x7D:  # EMPTY_DICT
                stack.append(self._track({}, 1, 1))
            elif op == 0x64:  # DICT
                items = pop_mark()
                target = self._track({}, 1, 1)
                dict_items(target, items)
                stack.append(target)
            elif op == 0x73:  # SETITEM
                value = pop()
                key = pop()
                dict_items(top(), [key, value])
            elif op == 0x75:  # SETITEMS
                items = pop_mark()
                dict_items(top(), items)
            elif op == 0x63:  # GLOBAL
                end = data.find(b"\n", pos, pos + 512)
                end2 = data.find(b"\n", end + 1, end + 513) if end >= 0 else -1
                if end2 < 0:
                    raise _Malformed("GLOBAL without its two lines")
                module, name = text(data[pos:end]), text(data[end + 1:end2])
                pos = end2 + 1
                stack.append(self._find_class(module, name))
            elif op == 0x93:  # STACK_GLOBAL
                name = pop()
                module = pop()
                if type(module) is not str or type(name) is not str:
                    raise _Malformed("STACK_GLOBAL of something that is not a name")
                stack.append(self._find_class(module, name))
            elif op == 0x52:  # REDUCE
                args = pop()
                func = pop()
                if not any(func is c for c in _CALLABLE):
                    raise _Refused(f"data.pkl calls {describe(func)}, which is not a function a checkpoint uses")
                if type(args) is not tuple or len(args) > 8:
                    raise _Malformed("REDUCE with arguments that are not a short tuple")
                result = func(*args)
                if isinstance(result, dict):
                    self._track(result, 1, 1)
                stack.append(result)
            elif op == 0x62:  # BUILD
                state = pop()
                target = top()
                # OrderedDict state_dicts carry _metadata this way; nothing else may be changed
                if type(target) not in (dict, collections.OrderedDict) or id(target) not in self._sizes:
                    raise _Refused(f"data.pkl sets the state of {describe(target)}: refused")
                if state is not None and type(state) is not dict and type(state) is not tuple:
                    raise _Malformed("BUILD with a state that is not a dict")
            elif op == 0x51:  # BINPERSID
                stack.append(self._persistent_load(pop()))
            elif op == 0x71:  # BINPUT
                put(take(1)[0])
            elif op == 0x72:  # LONG_BINPUT
                put(struct.unpack("<I", take(4))[0])
            elif op == 0x94:  # MEMOIZE
                put(len(memo))
            elif op == 0x68:  # BINGET
                get(take(1)[0])
            elif op == 0x6A:  # LONG_BINGET
                get(struct.unpack("<I", take(4))[0])
            else:
                raise _Malformed(f"opcode 0x{op:02x} at byte {pos - 1} is not one torch.save writes; "
                                 "refused, nothing was executed")

    def _find_class(self, module: str, name: str):
        try:
            return _GLOBALS[(module, name)]
        except KeyError:
            raise _Refused(f"data.pkl refers to {printable(module, 80)}.{printable(name, 80)}, which a "
                           "checkpoint of tensors never needs: refused, nothing was executed") from None

    def _persistent_load(self, pid):
        if not (type(pid) is tuple and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and type(pid[2]) is str and len(pid[2]) <= 256
                and type(pid[4]) is int and 0 <= pid[4] < _MAX_INDEX):
            raise _Refused(f"unexpected persistent id ({describe(pid)}), expected "
                           "('storage', type, key, location, numel)")
        return self._storage(pid[2], pid[1].dtype, pid[4])


class _Zip:
    """The members of a stored (uncompressed) zip: name -> (byte offset of data, size)."""

    def __init__(self, file: MappedFile):
        self.file = file
        path = file.path
        try:
            # zipfile builds an object per central directory entry (~10x its bytes): a
            # checkpoint's directory is a few KB per hundred tensors
            end = zipfile._EndRecData(file.map)
            if end is not None and end[zipfile._ECD_SIZE] > MAX_CENTRAL_DIRECTORY:
                raise fail(path, f"a zip directory of {end[zipfile._ECD_SIZE]} bytes: more than a checkpoint has")
            # parsed from the mapping of the file already opened (and checked to be a regular
            # file), not by opening the path again
            infos = zipfile.ZipFile(file.map).infolist()
        except CheckpointError:
            raise
        except RecursionError:  # pragma: no cover - zipfile does not recurse
            raise fail(path, "corrupt zip archive") from None
        except Exception as e:
            # zipfile is pure Python: any exception (BadZipFile, OSError from a seek before
            # the start, NotImplementedError for an unknown version, struct.error, ...)
            # means an archive it cannot parse
            raise fail(path, f"truncated or corrupt zip archive ({type(e).__name__}: {printable(e, 200)})") from None
        if len(infos) > MAX_TENSORS:
            raise fail(path, f"zip archive of {len(infos)} members: more than a checkpoint has")
        self.members: dict[str, tuple[int, int, int]] = {}
        for info in infos:
            self.members[info.filename] = (info.header_offset, info.file_size, info.compress_type)

    def locate(self, name: str) -> tuple[int, int]:
        """(data offset, size) of a member, checked against the file."""
        path, size = self.file.path, self.file.size
        header_offset, file_size, compress = self.members[name]
        shown = printable(name, 120)
        if compress != zipfile.ZIP_STORED:
            raise fail(path, f"zip member {shown} is compressed; rwkvx maps storages and needs them stored "
                             "(torch.save writes them so)")
        if (header_offset < 0 or header_offset + 30 > size
                or self.file.map[header_offset:header_offset + 4] != ZIP_MAGIC):
            raise fail(path, f"corrupt zip: no local header for member {shown} at byte {header_offset}")
        name_len, extra_len = struct.unpack_from("<HH", self.file.map, header_offset + 26)
        start = header_offset + 30 + name_len + extra_len
        if file_size < 0 or start + file_size > size:
            raise fail(path, f"truncated: zip member {shown} ends at byte {start + file_size}, "
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
        order = bytes(archive.read(prefix + "byteorder")[:64]).decode("ascii", "replace").strip()
        if order != "little":
            raise fail(path, f"PyTorch checkpoint stored {printable(order, 20)}-endian; rwkvx reads "
                             "little-endian data")

    storages: dict[str, _Storage] = {}

    def storage(key: str, dtype: str, numel: int) -> _Storage:
        if key in storages:
            return storages[key]
        member = f"{prefix}data/{key}"
        if member not in archive.members:
            raise fail(path, f"PyTorch checkpoint: storage {printable(key, 60)} has no zip member "
                             f"{printable(member, 120)}")
        start, nbytes = archive.locate(member)
        needed = numel * NUMPY_DTYPES[dtype].itemsize
        if nbytes < needed:
            raise fail(path, f"truncated: storage {printable(member, 120)} holds {nbytes} bytes, its "
                             f"{numel} {dtype} elements need {needed}")
        storages[key] = _Storage(key, dtype, start, numel)
        return storages[key]

    shown = printable(pkl, 120)
    if archive.members[pkl][1] > MAX_PICKLE_BYTES:
        raise fail(path, f"{shown} is {archive.members[pkl][1]} bytes: too large for a checkpoint's index")
    try:
        obj = _Unpickler(archive.read(pkl), storage).load()
    except _Malformed as e:
        raise fail(path, f"{shown} is not a valid checkpoint pickle ({e})") from None
    except _Refused as e:
        raise fail(path, str(e)) from None
    except CheckpointError:
        raise
    except RecursionError:  # pragma: no cover - the machine does not recurse
        raise fail(path, f"{shown} nests too deeply to be a checkpoint") from None
    except Exception as e:
        raise fail(path, f"{shown} is not a valid checkpoint pickle ({type(e).__name__})") from None

    if isinstance(obj, dict) and not any(isinstance(v, _TensorRef) for v in obj.values()):
        # {"state_dict": {...}} and {"model": {...}}, as some trainers save
        inner = [v for k, v in obj.items() if k in ("state_dict", "model", "module") and isinstance(v, dict)]
        if inner:
            obj = inner[0]
    if not isinstance(obj, dict):
        raise fail(path, f"PyTorch checkpoint holds a {type(obj).__name__}, not a dict of tensors")

    source = TensorSource(path, "pth")
    source.files.append(file)
    if len(obj) > MAX_TENSORS:
        raise fail(path, f"PyTorch checkpoint of {len(obj)} entries: more than a checkpoint has")
    for name, ref in obj.items():
        if not isinstance(name, str) or not isinstance(ref, _TensorRef):
            continue
        source.tensors[name] = _tensor(path, name, ref, file)
    return source


def _tensor(path: str, name: str, ref: _TensorRef, file: MappedFile) -> Tensor:
    st = ref.storage
    itemsize = NUMPY_DTYPES[st.dtype].itemsize
    count = n_elements(ref.size)
    shown = printable(name, 120)
    if count:
        last = ref.storage_offset + sum((d - 1) * s for d, s in zip(ref.size, ref.stride))
        if last >= st.numel:
            raise fail(path, f"tensor {shown}: its view reaches element {last} of a storage of {st.numel}")
        # a view repeating elements (stride 0, overlapping strides) would have reading it
        # allocate more than the file holds
        if count > st.numel:
            raise fail(path, f"tensor {shown}: a view of {count} elements over a storage of {st.numel} "
                             "(repeated elements: stride 0 or overlapping strides)")
    # C-contiguous unless a dimension longer than 1 has another stride
    expected, contiguous = 1, True
    for d, s in zip(reversed(ref.size), reversed(ref.stride)):
        if d != 1 and s != expected:
            contiguous = False
        expected *= d
    offset = st.offset + ref.storage_offset * itemsize
    return Tensor(name, file, st.dtype, ref.size, offset, None if contiguous else ref.stride)
