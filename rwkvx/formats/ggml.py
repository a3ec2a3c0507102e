"""rwkv.cpp's ``.bin`` files: FP32, FP16 and ggml's quantised block formats.

The layout (../shared/models/README.md, rwkv.cpp's docs/FILE_FORMAT.md): a 24-byte header
(magic "ggmf", version 100 or 101, n_vocab, n_embd, n_layer, data type), then one record
per tensor until the end of the file: n_dims, key length, data type, the dims in reverse
(PyTorch's last dimension first), the UTF-8 key, the data. Keys are BlinkDL's, with time_*
vectors squeezed and att.time_decay stored as -exp(raw).

Quantised tensors (file version 101, ggml's layout since May 2023) are rows of blocks of
32 weights. A block holds fp16 scale d (and for the _1 types an fp16 minimum m), the low
4 bits of each weight packed two per byte (weight j in the low nibble of byte j, weight
j + 16 in the high nibble), for the 5-bit types a 32-bit word whose bit j is weight j's
fifth bit, and for Q8_0 32 signed bytes:

    Q4_0  d, qs[16]          w = d * (q - 8)     q in 0..15       18 bytes
    Q4_1  d, m, qs[16]       w = d * q + m       q in 0..15       20 bytes
    Q5_0  d, qh, qs[16]      w = d * (q - 16)    q in 0..31       22 bytes
    Q5_1  d, m, qh, qs[16]   w = d * q + m       q in 0..31       24 bytes
    Q8_0  d, qs[32] int8     w = d * q                            34 bytes

They are dequantised to float32 when loaded (then converted to the run dtype like any
other tensor). Version 100 files used an older, incompatible block layout: refused.
"""
from __future__ import annotations

import struct
from typing import Optional

import numpy as np

from rwkvx.formats.tensorfile import MAX_TENSORS, MappedFile, Tensor, TensorSource, fail, n_elements, printable

MAGIC = 0x67676D66
VERSIONS = (100, 101)
QK = 32
# ggml type id -> (name, bytes per block of QK weights)
QUANT_TYPES = {2: ("Q4_0", 18), 3: ("Q4_1", 20), 7: ("Q5_0", 22), 8: ("Q5_1", 24), 9: ("Q8_0", 34)}
FLOAT_TYPES = {0: "F32", 1: "F16"}
_BLOCK_BYTES = {name: size for name, size in QUANT_TYPES.values()}
# blocks dequantised per step: bounds the temporaries to a few MB
_BLOCKS_PER_STEP = 1 << 16


def dequantize_blocks(kind: str, raw: np.ndarray, out: np.ndarray) -> None:
    """Dequantise blocks. raw: (n_blocks, block bytes) uint8; out: (n_blocks, 32) float32."""
    d = np.ascontiguousarray(raw[:, 0:2]).view(np.float16).astype(np.float32)   # (n_blocks, 1)
    if kind == "Q8_0":
        np.multiply(raw[:, 2:].view(np.int8), d, out=out)
        return
    has_min = kind in ("Q4_1", "Q5_1")
    pos = 4 if has_min else 2
    if kind in ("Q5_0", "Q5_1"):
        qh = np.ascontiguousarray(raw[:, pos:pos + 4]).view("<u4")                  # (n_blocks, 1)
        pos += 4
    qs = raw[:, pos:pos + 16]
    q = np.empty(out.shape, dtype=np.uint8)
    # weight j in the low nibble of byte j, weight j + 16 in the high nibble
    np.bitwise_and(qs, 0x0F, out=q[:, :16])
    np.right_shift(qs, 4, out=q[:, 16:])
    if kind in ("Q5_0", "Q5_1"):
        # bit j of qh is weight j's fifth bit
        fifth = (qh >> np.arange(QK, dtype=np.uint32)) & 1
        q |= (fifth << 4).astype(np.uint8)
    out[...] = q
    if kind == "Q4_0":
        out -= 8
    elif kind == "Q5_0":
        out -= 16
    out *= d
    if has_min:
        out += np.ascontiguousarray(raw[:, 2:4]).view(np.float16).astype(np.float32)


class GgmlQuantTensor(Tensor):
    """A tensor stored in one of ggml's block formats: no view; reads dequantise to float32."""

    @property
    def nbytes(self) -> int:
        return self.size // QK * _BLOCK_BYTES[self.dtype]

    def view(self):
        return None

    def read(self) -> np.ndarray:
        return self.float32()

    def float32(self, out: Optional[np.ndarray] = None) -> np.ndarray:
        """The dequantised tensor (into `out`, C-contiguous float32, if given)."""
        block = _BLOCK_BYTES[self.dtype]
        n_blocks = self.size // QK
        if out is None:
            out = np.empty(self.shape, dtype=np.float32)
        blocks = out.reshape(n_blocks, QK)
        for start in range(0, n_blocks, _BLOCKS_PER_STEP):
            stop = min(start + _BLOCKS_PER_STEP, n_blocks)
            raw = np.empty((stop - start, block), dtype=np.uint8)
            self.file.read_into(raw, self.offset + start * block)
            dequantize_blocks(self.dtype, raw, blocks[start:stop])
        return out


def open_ggml(file: MappedFile) -> TensorSource:
    """Index an rwkv.cpp file's tensors."""
    path, size = file.path, file.size
    if size < 24:
        raise fail(path, "truncated: rwkv.cpp header is 24 bytes")
    buf = file.map
    _, version, n_vocab, n_embd, _, _ = struct.unpack_from("<6i", buf, 0)
    if version not in VERSIONS:
        raise fail(path, f"rwkv.cpp file version {version} is not supported (expected 100 or 101)")
    source = TensorSource(path, "rwkv.cpp", decay_is_transformed=True)
    source.files.append(file)
    pos = 24
    while pos < size:
        if pos + 12 > size:
            raise fail(path, f"truncated: tensor header at byte {pos}")
        n_dims, key_len, type_id = struct.unpack_from("<3i", buf, pos)
        pos += 12
        if not 1 <= n_dims <= 4 or not 0 < key_len < 4096:
            raise fail(path, f"corrupt tensor header at byte {pos - 12}")
        if pos + 4 * n_dims + key_len > size:
            raise fail(path, f"truncated: tensor header at byte {pos - 12}")
        dims = struct.unpack_from(f"<{n_dims}i", buf, pos)
        pos += 4 * n_dims
        try:
            name = bytes(buf[pos:pos + key_len]).decode("utf-8")
        except UnicodeDecodeError:
            raise fail(path, f"tensor name at byte {pos} is not UTF-8") from None
        pos += key_len
        if len(source.tensors) >= MAX_TENSORS:
            raise fail(path, f"more than {MAX_TENSORS} tensors: not an RWKV checkpoint")
        if any(d <= 0 for d in dims):
            raise fail(path, f"tensor {printable(name, 120)}: dimension {list(dims)} is not positive")
        # rwkv.cpp stores dimensions reversed against PyTorch's shape
        shape = tuple(reversed(dims))
        if type_id in FLOAT_TYPES:
            tensor = Tensor(name, file, FLOAT_TYPES[type_id], shape, pos)
        elif type_id in QUANT_TYPES:
            kind = QUANT_TYPES[type_id][0]
            if version == 100:
                raise fail(path, f"tensor {printable(name, 120)} is {kind} in rwkv.cpp's pre-2023-05-27 block layout "
                                 "(file version 100), which rwkvx does not read: quantise the FP16 file "
                                 "again with a current rwkv.cpp, or use the FP16/FP32 file")
            if dims[0] % QK:
                raise fail(path, f"tensor {printable(name, 120)}: {kind} rows of {dims[0]} weights are not whole "
                                 f"blocks of {QK}")
            tensor = GgmlQuantTensor(name, file, kind, shape, pos)
        else:
            raise fail(path, f"tensor {printable(name, 120)}: unknown rwkv.cpp data type {type_id} (known: 0 FP32, "
                             "1 FP16, 2 Q4_0, 3 Q4_1, 7 Q5_0, 8 Q5_1, 9 Q8_0)")
        if tensor.nbytes <= 0 or pos + tensor.nbytes > size:
            raise fail(path, f"truncated: tensor {name} needs {tensor.nbytes} bytes at byte {pos}, "
                             f"the file has {size}")
        source.tensors[name] = tensor
        pos += tensor.nbytes
    emb = source.tensors.get("emb.weight")
    if emb is not None and emb.shape != (n_vocab, n_embd):
        raise fail(path, f"header says n_vocab={n_vocab}, n_embd={n_embd} but emb.weight is {list(emb.shape)}")
    return source


def tensor_bytes(kind: str, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of `shape` in a quantised format (for writers and tests)."""
    return n_elements(shape) // QK * _BLOCK_BYTES[kind]
