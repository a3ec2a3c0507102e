"""A seeded mutation fuzzer for every file format rwkvx reads.

rwkvx promises that loading any file ends in a model or in one clear line (an RwkvxError),
never a hang, a crash, a memory blow-up, code execution or a non-finite model. This
script checks the promise on mutated files: it builds small valid seeds of each format
(safetensors in three dtypes, rwkvx's own layout in float32, bfloat16 and uint8, PyTorch
.pth zips, rwkv.cpp .bin files in FP32/FP16/Q8_0/Q4_0, Hugging Face folders with one file
or shards, state files and prompt caches), mutates them (bit flips, interesting integers,
truncation, splices, and format-aware edits of safetensors headers, pickles, zip
records, rwkv.cpp tensor headers and config.json), adds a catalogue of hand-built hostile
pickles (shared-reference bombs, huge memo indices, deep nesting, BUILD on rwkvx's
stand-ins, forbidden globals), and loads each case in a worker process that runs under
an address-space limit, with a timeout per case.

Every case ends in one of: ``loaded`` (with check_tensors=True: every weight finite),
``loaded-unchecked`` (default checks), ``error`` (an RwkvxError of one printable line):
these are fine. Anything else is a finding: ``leak:<Type>`` (another exception type),
``bad-message`` (an error spanning lines or holding control characters), ``nonfinite``
(a checked load that kept a NaN), ``timeout``, ``crash`` (the worker died, e.g. by a
signal or the memory limit), ``state-changed`` (a later valid load differs: some file
changed rwkvx's state). Findings are saved with the command that reproduces them.

    python scripts/fuzz.py --cases 2000                     # a few minutes, every format
    python scripts/fuzz.py --seconds 3600 --seed 7          # an hour
    python scripts/fuzz.py --ci                             # the seeded slice CI runs (~1 min)
    python scripts/fuzz.py --format pth --cases 500 --save-dir /tmp/findings
    python scripts/fuzz.py --replay pth 7 1234              # run one case in this process
    python scripts/fuzz.py --entry load                     # through rwkvx.load (all architectures)

A case is (format, seed, index): the same triple gives the same bytes on every machine.
The exit status is 1 when anything was found, else 0.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import random
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zipfile

import numpy as np

FORMATS = ("safetensors", "rwkvx", "pth", "pickle", "ggml", "hf", "state", "cache", "tokenizer")
FINE = ("loaded", "loaded-unchecked", "error")
TIMEOUT = 10.0
MEMORY_LIMIT = 1536 << 20
# tests/test_hostile_fuzz.py: ~30 s on a 2-core machine shared with other work
CI_CASES = 12_000
# the model every seed is made of: small enough that mutations often land in headers
N_LAYER, N_EMBD, N_VOCAB = 1, 8, 13

INTERESTING = [0, 1, 2, 7, 8, 15, 16, 31, 32, 63, 64, 127, 128, 255, 256, 1023, 1024, 4096, 65535, 65536,
               2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**53, 2**62, 2**63 - 1, 2**63, 2**64 - 1, -1, -2, -2**31, -2**63]


# ---- seeds: small valid files of each format -----------------------------------------------

def _tensors(seed: int = 0) -> dict[str, np.ndarray]:
    from rwkvx.testing import random_tensors
    return random_tensors(N_LAYER, N_EMBD, N_VOCAB, seed=seed)


def _pickle_state_dict(entries) -> bytes:
    """torch.save's data.pkl for entries (name, storage class, key, numel, offset, size, stride),
    written opcode by opcode (protocol 2, memoised as torch's pickler does)."""
    out = bytearray(b"\x80\x02")
    memo = [0]

    def put():
        out.extend(b"q" + bytes([memo[0] % 256]) if memo[0] < 256 else b"r" + struct.pack("<I", memo[0]))
        memo[0] += 1

    def glob(module, name):
        out.extend(f"c{module}\n{name}\n".encode())
        put()

    def text(s):
        b = s.encode()
        out.extend(b"X" + struct.pack("<I", len(b)) + b)
        put()

    def ints(values):
        out.extend(b"(")
        for v in values:
            out.extend(b"J" + struct.pack("<i", v))
        out.extend(b"t")
        put()

    glob("collections", "OrderedDict")
    out.extend(b")R")
    put()
    out.extend(b"(")
    for name, cls, key, numel, offset, size, stride in entries:
        text(name)
        glob("torch._utils", "_rebuild_tensor_v2")
        out.extend(b"((")
        text("storage")
        glob("torch", cls)
        text(key)
        text("cpu")
        out.extend(b"J" + struct.pack("<i", numel) + b"tQ")
        out.extend(b"J" + struct.pack("<i", offset))
        ints(size)
        ints(stride)
        out.extend(b"\x89")
        glob("collections", "OrderedDict")
        out.extend(b")Rtq\x00R")
    out.extend(b"u.")
    return bytes(out)


def _zip(members: dict[str, bytes]) -> bytes:
    import io
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def _pth_members(tensors, dtype="bf16") -> dict[str, bytes]:
    from rwkvx.weights import to_bfloat16
    cls = {"bf16": "BFloat16Storage", "f16": "HalfStorage", "f32": "FloatStorage"}[dtype]
    entries, members = [], {}
    for i, (name, value) in enumerate(tensors.items()):
        if dtype == "bf16":
            raw = to_bfloat16(value)
        else:
            raw = np.ascontiguousarray(value, dtype=np.float16 if dtype == "f16" else np.float32)
        strides = [int(np.prod(value.shape[d + 1:])) for d in range(value.ndim)]
        entries.append((name, cls, str(i), raw.size, 0, value.shape, strides))
        members[f"archive/data/{i}"] = raw.tobytes()
    return {"archive/data.pkl": _pickle_state_dict(entries), "archive/byteorder": b"little",
            **members, "archive/version": b"3\n"}


def _ggml(tensors, matrix_type: int) -> bytes:
    emb = tensors["emb.weight"]
    out = bytearray(struct.pack("<6i", 0x67676D66, 101, emb.shape[0], emb.shape[1], N_LAYER, 1))
    for name, value in tensors.items():
        value = np.squeeze(value) if value.ndim == 3 else value
        if name.endswith("att.time_decay"):
            value = -np.exp(value)
        kind = matrix_type if value.ndim == 2 and value.shape[1] % 32 == 0 and name != "emb.weight" else 0
        key = name.encode()
        out += struct.pack("<3i", value.ndim, len(key), kind) + struct.pack(f"<{value.ndim}i", *reversed(value.shape))
        out += key
        if kind == 0:
            out += value.astype("<f4").tobytes()
        elif kind == 1:
            out += value.astype("<f2").tobytes()
        else:
            # Q8_0 (9) / Q4_0 (2) blocks: an fp16 scale, then codes; values need not match
            blocks = value.size // 32
            size = 34 if kind == 9 else 18
            raw = np.zeros((blocks, size), dtype=np.uint8)
            raw[:, 0:2] = np.full(blocks, 0.01, dtype=np.float16).view(np.uint8).reshape(blocks, 2)
            raw[:, 2:] = np.arange(size - 2, dtype=np.uint8)
            out += raw.tobytes()
    return bytes(out)


def build_seeds(folder: str):
    """{format: [seed case, ...]}, each case {file name: bytes} (several files for a folder),
    and the model the state formats belong to."""
    from rwkvx.convert import convert
    from rwkvx.loader import load_weights
    from rwkvx.model import RWKV
    from rwkvx.prompt_cache import PromptCache
    from rwkvx.testing import write_safetensors

    t = _tensors()
    # n_ffn 32 so ffn matrices hold whole Q blocks too
    from rwkvx.testing import random_tensors
    t32 = random_tensors(N_LAYER, 32, N_VOCAB, seed=1, time_shape="flat")
    seeds: dict[str, list[dict[str, bytes]]] = {f: [] for f in FORMATS}
    for dtype in ("float32", "bfloat16", "float16"):
        path = os.path.join(folder, f"seed-{dtype}.safetensors")
        write_safetensors(path, t, dtype=dtype)
        seeds["safetensors"].append({"m": open(path, "rb").read()})
    src = os.path.join(folder, "seed-float32.safetensors")
    for dtype in ("float32", "bfloat16", "uint8"):
        out = os.path.join(folder, f"seed-rwkvx-{dtype}.safetensors")
        convert(src, out, dtype, overwrite=True, progress=False)
        seeds["rwkvx"].append({"m": open(out, "rb").read()})
    for dtype in ("bf16", "f16", "f32"):
        seeds["pth"].append({"m": _zip(_pth_members(t, dtype))})
    seeds["pickle"].append({"m": _zip(_pth_members(t, "f32"))})
    seeds["ggml"] += [{"m": _ggml(t, 0)}, {"m": _ggml(t32, 1)}, {"m": _ggml(t32, 9)}, {"m": _ggml(t32, 2)}]
    hf_names = {("rwkv.embeddings.weight" if k == "emb.weight" else k if k == "head.weight" else "rwkv." + k): v
                for k, v in t.items()}
    config = json.dumps({"model_type": "rwkv", "vocab_size": N_VOCAB, "hidden_size": N_EMBD,
                         "num_hidden_layers": N_LAYER, "attention_hidden_size": N_EMBD}).encode()
    one = os.path.join(folder, "hf-one.safetensors")
    write_safetensors(one, hf_names)
    seeds["hf"].append({"config.json": config, "model.safetensors": open(one, "rb").read()})
    names = list(hf_names)
    shard_files = {}
    for i, group in enumerate((names[0::2], names[1::2])):
        p = os.path.join(folder, f"hf-shard{i}.safetensors")
        write_safetensors(p, {n: hf_names[n] for n in group})
        shard_files[f"model-0000{i + 1}-of-00002.safetensors"] = open(p, "rb").read()
    index = {"metadata": {}, "weight_map": {n: f"model-0000{(i % 2) + 1}-of-00002.safetensors"
                                            for i, n in enumerate(names)}}
    seeds["hf"].append({"config.json": config, "model.safetensors.index.json": json.dumps(index).encode(),
                        **shard_files})
    seeds["hf"].append({"config.json": config, "pytorch_model.bin": _zip(_pth_members(hf_names, "f32"))})

    seeds["tokenizer"] = _tokenizer_seeds(folder)
    model = RWKV(load_weights(src))
    _, state = model.forward([1, 2, 3])
    p = os.path.join(folder, "seed.state")
    model.save_state(p, state, [1, 2, 3])
    seeds["state"].append({"m": open(p, "rb").read()})
    model.save_state(p, state)
    seeds["state"].append({"m": open(p, "rb").read()})
    p = os.path.join(folder, "seed.cache")
    PromptCache(p, model).prefill(list(range(1, 12)))
    seeds["cache"].append({"m": open(p, "rb").read()})
    return seeds, model


def _tokenizer_seeds(folder: str) -> list[dict[str, bytes]]:
    """A World vocabulary's first 300 lines and a few longer ones; a small byte-level BPE
    tokenizer.json trained here."""
    from rwkvx.tokenizer import PACKAGED
    with open(PACKAGED["world"], "rb") as f:
        lines = f.read().splitlines(keepends=True)
    seeds = [{"tokenizer": b"".join(lines[:300] + lines[20000:20040] + lines[-20:])}]
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    except ImportError:  # pragma: no cover - tokenizers is a dependency
        return seeds
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["The quick brown fox jumps over the lazy dog, and the model reads its own files."] * 4
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = os.path.join(folder, "tokenizer.json")
    tok.save(path)
    seeds.append({"tokenizer": open(path, "rb").read()})
    return seeds


# ---- hostile pickles, built by hand --------------------------------------------------------

def _bomb(levels: int, container: bytes = b"\x86") -> bytes:
    # x0 = (); x_{k+1} = (x_k, x_k): 2^levels leaves in a few bytes per level
    out = bytearray(b"\x80\x02)q\x00")
    for k in range(levels):
        out += b"h" + bytes([k % 256]) + b"h" + bytes([k % 256]) + container + b"q" + bytes([(k + 1) % 256])
    return bytes(out)


def hostile_pickles() -> list[bytes]:
    storage = b"ctorch\nBFloat16Storage\n"
    catalogue = [
        _bomb(60) + b".",                                                 # the structure alone
        b"\x80\x02}" + _bomb(60)[2:] + b"K\x01s.",                        # as a dict key
        b"\x80\x02(" + _bomb(60)[2:] + b"l.",                             # lists of lists
        b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n(" + _bomb(60)[2:] + b"K\x00" + _bomb(60)[2:] + b"\x85" * 2
        + b"tR.",                                                         # as a tensor's size
        b"\x80\x02(X\x07\x00\x00\x00storage" + storage + _bomb(60)[2:] + b"X\x03\x00\x00\x00cpuK\x01tQ.",
        b"\x80\x02}r\x00\xe1\xf5\x05.",                                   # LONG_BINPUT 10^8
        b"\x80\x02}r\xff\xff\xff\xff.",
        b"\x80\x02" + b"(" * 100000 + b"t" * 100000 + b".",               # deep nesting
        b"\x80\x02" + b"]" + b"]a" * 50000 + b".",
        b"\x80\x02" + storage + b"}X\x05\x00\x00\x00dtypeX\x03\x00\x00\x00F16sb.",  # BUILD on a stand-in
        b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00trueq\x00\x85R.",         # forbidden globals
        b"\x80\x02cbuiltins\neval\n.",
        b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x8c\x06system\x93.",
        b"\x80\x02(cos\nsystem\nX\x02\x00\x00\x00idtb.",
        b"\x80\x02" + storage + b")R.",                                   # calling a stand-in
        b"\x80\x02(S'x'\nI1\ni__main__\nX\n.",                            # protocol-0 opcodes
        b"\x80\x02\x8b\xff\xff\xff\x7f.",                                 # LONG4 of 2 GB
        b"\x80\x02X\xff\xff\xff\xff.",                                    # string past the end
        b"\x80\x02\x8c\x05ab",                                            # truncated
        b"\x80\x02}(" + b"J\x00\x00\x00\x00" * 2 * 1000 + b"u.",          # SETITEMS of ints
        b"\x80\x05\x95" + struct.pack("<Q", 2**63) + b"N.",               # FRAME of 2^63
        pickle.dumps({"a": [1, 2, 3], "b": (1.5, None, True)}, protocol=5),
        pickle.dumps(set(range(5)), protocol=4),
    ]
    return catalogue


# ---- mutations -----------------------------------------------------------------------------

def _mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 3, 5))):
        if not b:
            b = bytearray(rng.randbytes(rng.randrange(1, 64)))
        kind = rng.randrange(8)
        at = rng.randrange(len(b))
        if kind == 0:
            for _ in range(rng.randrange(1, 9)):
                i = rng.randrange(len(b))
                b[i] ^= 1 << rng.randrange(8)
        elif kind == 1:
            b[at] = rng.choice((0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)))
        elif kind == 2:
            width = rng.choice((1, 2, 4, 8))
            value = rng.choice(INTERESTING) % (1 << (8 * width))
            b[at:at + width] = value.to_bytes(width, "little")
        elif kind == 3:
            del b[rng.randrange(len(b) + 1):]
        elif kind == 4:
            b[at:at] = rng.randbytes(rng.randrange(1, 64))
        elif kind == 5:
            end = min(len(b), at + rng.randrange(1, 256))
            del b[at:end]
        elif kind == 6:
            src = rng.randrange(len(b))
            chunk = b[src:src + rng.randrange(1, 128)]
            b[at:at] = chunk
        else:
            src = rng.randrange(len(b))
            chunk = b[src:src + rng.randrange(1, 64)]
            b[at:at + len(chunk)] = chunk
    return bytes(b)


_WEIRD_STRINGS = ["", "\x1b[31mred\x1b[0m", "a\nb", "F\x0032", "blocks.99999999999999.att.key.weight",
                  "blocks.999999.ln1.weight", "x" * 5000, "\u202eevil", "I64", "F64", "BOOL", "U8", "F16",
                  "BF16", "F32", "I32", "rwkvx", "rwkvx-state", "emb.weight", "head.weight"]


def _weird_value(rng: random.Random):
    kind = rng.randrange(9)
    if kind == 0:
        return rng.choice(INTERESTING)
    if kind == 1:
        return rng.choice(_WEIRD_STRINGS)
    if kind == 2:
        return [rng.choice(INTERESTING) for _ in range(rng.randrange(0, 5))]
    if kind == 3:
        return None
    if kind == 4:
        return 1.5
    if kind == 5:
        return {"dtype": "F32"}
    if kind == 6:
        return [0] * rng.randrange(0, 20)
    if kind == 7:
        return rng.choice((True, False))
    return [[[[1]]]]


def _mutate_safetensors(rng: random.Random, data: bytes) -> bytes:
    try:
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + n])
        body = data[8 + n:]
    except Exception:
        return _mutate_bytes(rng, data)
    if not isinstance(header, dict):
        return _mutate_bytes(rng, data)
    for _ in range(rng.randrange(1, 4)):
        names = [k for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)
                 and isinstance(v.get("shape"), list) and isinstance(v.get("data_offsets"), list)]
        kind = rng.randrange(10)
        name = rng.choice(names) if names else None
        if kind == 0 and name:
            field = rng.choice(("dtype", "shape", "data_offsets"))
            header[name][field] = _weird_value(rng)
        elif kind == 1 and name:
            shape = header[name]["shape"]
            if shape:
                shape[rng.randrange(len(shape))] = rng.choice(INTERESTING)
            else:
                shape.append(rng.choice(INTERESTING))
        elif kind == 2 and name:
            off = header[name]["data_offsets"]
            off[rng.randrange(2)] = rng.choice(INTERESTING + [len(body), len(body) + 1])
        elif kind == 3 and name:
            header[rng.choice(_WEIRD_STRINGS)] = header.pop(name)
        elif kind == 4:
            meta = header.setdefault("__metadata__", {})
            if isinstance(meta, dict):
                key = rng.choice(("format", "format_version", "architecture", "model_fingerprint", "n_tokens",
                                  "state_shape", rng.choice(_WEIRD_STRINGS)))
                meta[key] = rng.choice((_weird_value(rng), str(rng.choice(INTERESTING)), "rwkvx", "rwkvx-state"))
        elif kind == 5:
            header[rng.choice(_WEIRD_STRINGS)] = rng.choice(
                (_weird_value(rng), {"dtype": "F32", "shape": [rng.choice(INTERESTING)], "data_offsets": [0, 4]}))
        elif kind == 6 and name:
            header[name]["dtype"] = rng.choice(("F32", "F16", "BF16", "U8", "I32", "I64", "F64", "BOOL", "X"))
        elif kind == 7 and name:
            del header[name]
        elif kind == 8:
            # deep nesting somewhere in the header
            depth = rng.choice((100, 900, 5000, 100000))
            text = json.dumps(header)[:-1] + ',"deep":' + "[" * depth + "]" * depth + "}"
            raw = text.encode()
            return struct.pack("<Q", len(raw)) + raw + body
        elif kind == 9 and name:
            header[name]["shape"] = header[name]["shape"] + [0]
    raw = json.dumps(header).encode()
    if rng.random() < 0.1:
        return struct.pack("<Q", len(raw) + rng.choice((-1, 1, 8, 2**40))) + raw + body
    if rng.random() < 0.3:
        body = _mutate_bytes(rng, body) if body else body
    return struct.pack("<Q", len(raw)) + raw + body


def _mutate_zip(rng: random.Random, data: bytes, catalogue: list[bytes]) -> bytes:
    try:
        with zipfile.ZipFile(__import__("io").BytesIO(data)) as z:
            members = {i.filename: z.read(i) for i in z.infolist()}
    except Exception:
        return _mutate_bytes(rng, data)
    kind = rng.randrange(10)
    pkl = next((n for n in members if n.endswith("data.pkl")), None)
    if kind <= 3 and pkl:
        members[pkl] = _mutate_bytes(rng, members[pkl])
    elif kind == 4 and pkl:
        members[pkl] = rng.choice(catalogue)
    elif kind == 5 and pkl:
        # splice a hostile pickle's body into the real one
        evil = rng.choice(catalogue)
        at = rng.randrange(2, len(members[pkl]))
        members[pkl] = members[pkl][:at] + evil[2:-1] + b"0" + members[pkl][at:]
    elif kind == 6:
        name = rng.choice(list(members))
        members[name] = _mutate_bytes(rng, members[name])
    elif kind == 7:
        name = rng.choice(list(members))
        members[rng.choice(_WEIRD_STRINGS + [name + "x", "archive/byteorder"])] = members.pop(name)
    elif kind == 8 and "archive/byteorder" in members:
        members["archive/byteorder"] = rng.choice((b"big", b"\x1b[2Jbig\n", b"", b"little" * 100))
    else:
        return _mutate_bytes(rng, data)
    out = _zip(members)
    # and sometimes the zip records themselves: end record, versions, offsets
    if rng.random() < 0.2:
        out = _mutate_bytes(rng, out)
    if rng.random() < 0.1:
        end = out.rfind(b"PK\x05\x06")
        if end >= 0:
            b = bytearray(out)
            field = rng.choice((12, 16))  # central directory size, offset
            b[end + field:end + field + 4] = (rng.choice(INTERESTING) % 2**32).to_bytes(4, "little")
            out = bytes(b)
    if rng.random() < 0.1:
        cd = out.find(b"PK\x01\x02")
        if cd >= 0:
            b = bytearray(out)
            b[cd + 6:cd + 8] = rng.choice((b"\xff\x00", b"\x3f\x00", b"\x00\xff"))  # version needed
            out = bytes(b)
    return out


def _mutate_ggml(rng: random.Random, data: bytes) -> bytes:
    if rng.random() < 0.5:
        return _mutate_bytes(rng, data)
    # an int32 field of the header or of a tensor record
    records = [0, 4, 8, 12, 16, 20]
    pos = 24
    while pos + 12 <= len(data) and len(records) < 200:
        n_dims, key_len, type_id = struct.unpack_from("<3i", data, pos)
        if not 1 <= n_dims <= 4 or not 0 < key_len < 4096:
            break
        records += [pos, pos + 4, pos + 8] + [pos + 12 + 4 * i for i in range(n_dims)]
        dims = struct.unpack_from(f"<{n_dims}i", data, pos + 12)
        n = int(np.prod(dims))
        size = {0: 4 * n, 1: 2 * n, 9: n // 32 * 34, 2: n // 32 * 18}.get(type_id, 0)
        pos += 12 + 4 * n_dims + key_len + size
    b = bytearray(data)
    at = rng.choice(records)
    value = rng.choice(INTERESTING + [3, 4, 5, 6, 7, 8, 9, 10, 100, 101]) % 2**32
    b[at:at + 4] = value.to_bytes(4, "little")
    return bytes(b)


def _mutate_json(rng: random.Random, data: bytes) -> bytes:
    kind = rng.randrange(6)
    try:
        value = json.loads(data)
    except Exception:
        return _mutate_bytes(rng, data)
    if kind == 0:
        depth = rng.choice((500, 5000, 100000))
        return b"[" * depth + b"]" * depth
    if kind == 1 and isinstance(value, dict):
        key = rng.choice(list(value) + ["model_type", "weight_map", "tie_word_embeddings"])
        value[key] = rng.choice((_weird_value(rng), "rwkv", "rwkv6", "rwkv\x1b[2J", {"a": "../x"},
                                 {"x": "model.safetensors"}, {"x": "."}, {"x": ""}, {"x": 5}))
        return json.dumps(value).encode()
    if kind == 2 and isinstance(value, dict) and isinstance(value.get("weight_map"), dict):
        wm = value["weight_map"]
        name = rng.choice(list(wm))
        wm[name] = rng.choice(("../etc/passwd", "/etc/passwd", "", ".", "model.safetensors", "config.json",
                               5, None, ["a"], "x\n"))
        return json.dumps(value).encode()
    return _mutate_bytes(rng, data)


def _mutate_tokenizer_json(rng: random.Random, data: bytes) -> bytes:
    value = json.loads(data)
    model = value.get("model") or {}
    vocab = model.get("vocab") or {}
    kind = rng.randrange(6)
    if kind == 0 and vocab:
        vocab[rng.choice(list(vocab))] = rng.choice(INTERESTING + [300, 301])
    elif kind == 1 and vocab:
        vocab[rng.choice(_WEIRD_STRINGS)] = rng.choice(INTERESTING + [len(vocab)])
    elif kind == 2:
        value.setdefault("added_tokens", []).append(
            {"id": rng.choice(INTERESTING), "content": rng.choice(_WEIRD_STRINGS), "special": True,
             "single_word": False, "lstrip": False, "rstrip": False, "normalized": False})
    elif kind == 3:
        value[rng.choice(("decoder", "pre_tokenizer", "normalizer", "model"))] = _weird_value(rng)
    elif kind == 4 and isinstance(model.get("merges"), list) and model["merges"]:
        model["merges"][rng.randrange(len(model["merges"]))] = _weird_value(rng)
    else:
        return _mutate_json(rng, data)
    return json.dumps(value).encode()


def make_case(fmt: str, seed: int, index: int, seeds, catalogue) -> dict[str, bytes]:
    """The files of case (fmt, seed, index): deterministic."""
    rng = random.Random(f"{seed}:{fmt}:{index}")
    try:
        return _make_case(rng, fmt, seeds, catalogue)
    except Exception:
        # a mutator that trips over its own input: plain byte mutations instead
        rng = random.Random(f"{seed}:{fmt}:{index}:bytes")
        files = dict(rng.choice(seeds[fmt]))
        name = rng.choice(list(files))
        files[name] = _mutate_bytes(rng, files[name])
        return files


def _make_case(rng: random.Random, fmt: str, seeds, catalogue) -> dict[str, bytes]:
    files = dict(rng.choice(seeds[fmt]))
    if fmt == "pickle":
        members = _pth_members(_tensors(), "f32")
        pkl = rng.choice(catalogue)
        if rng.random() < 0.5:
            pkl = _mutate_bytes(rng, pkl)
        members["archive/data.pkl"] = pkl
        return {"m": _zip(members)}
    if fmt == "hf":
        name = rng.choice(list(files))
        data = files[name]
        if name.endswith(".json"):
            files[name] = _mutate_json(rng, data)
        elif name.endswith(".bin"):
            files[name] = _mutate_zip(rng, data, catalogue)
        else:
            files[name] = _mutate_safetensors(rng, data) if rng.random() < 0.6 else _mutate_bytes(rng, data)
        if rng.random() < 0.05:
            del files[rng.choice(list(files))]
        return files
    if fmt == "tokenizer":
        data = files["tokenizer"]
        if data.startswith(b"{") and rng.random() < 0.6:
            files["tokenizer"] = _mutate_tokenizer_json(rng, data)
        else:
            files["tokenizer"] = _mutate_bytes(rng, data)
        return files
    data = files["m"]
    if fmt in ("safetensors", "rwkvx", "state", "cache"):
        files["m"] = _mutate_safetensors(rng, data) if rng.random() < 0.6 else _mutate_bytes(rng, data)
    elif fmt == "pth":
        files["m"] = _mutate_zip(rng, data, catalogue)
    elif fmt == "ggml":
        files["m"] = _mutate_ggml(rng, data)
    return files


# ---- running one case ----------------------------------------------------------------------

def _write_case(folder: str, files: dict[str, bytes], is_folder: bool = False) -> str:
    """Write the case's files; the path to load (the folder, or its one file)."""
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    for name, data in files.items():
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)
    return folder if is_folder else os.path.join(folder, next(iter(files)))


def _finite(weights) -> bool:
    from rwkvx.loader import _first_nonfinite
    from rwkvx.quant import QuantizedMatrix
    for a in weights.arrays():
        parts = [a.mx, a.rx, a.my, a.ry] if isinstance(a, QuantizedMatrix) else [a]
        if any(_first_nonfinite(np.asarray(p)) is not None for p in parts):
            return False
    return True


def run_case(fmt: str, seed: int, index: int, seeds, catalogue, model, folder: str) -> str:
    """The outcome of one case (see the module docstring)."""
    from rwkvx.errors import RwkvxError
    from rwkvx.loader import describe, load_weights
    from rwkvx.model import RWKV

    rng = random.Random(f"run:{seed}:{fmt}:{index}")
    path = _write_case(folder, make_case(fmt, seed, index, seeds, catalogue), is_folder=fmt == "hf")
    try:
        if fmt == "tokenizer":
            from rwkvx.tokenizer import load_tokenizer
            tok = load_tokenizer(path, rng.choice((256, 300, 65536, 1 << 20)))
            ids = tok.encode("The quick br\u00f6wn fox \u2713 <|endoftext|>")
            text = tok.decode(ids)
            stream = tok.stream()
            for i in list(ids) + [rng.randrange(max(tok.vocab_size, 1)) for _ in range(8)]:
                text += stream.push(i)
            return "loaded"
        if fmt == "state":
            state, tokens = model.load_state(path)
            return "loaded" if np.isfinite(state).all() else "nonfinite"
        if fmt == "cache":
            from rwkvx.prompt_cache import PromptCache
            cache = PromptCache(path, model, read_only=True)
            if not all(np.isfinite(state).all() for state in cache.states.values()):
                return "nonfinite"
            # a hostile but finite state may still run to NaN: generation refuses those logits
            cache.prefill(list(range(1, rng.randrange(2, 14))))
            return "loaded"
        if rng.random() < 0.1:
            describe(path)
            return "loaded-unchecked"
        dtype = rng.choice(("float32", "bfloat16", "float16", "uint8"))
        if os.environ.get("RWKVX_FUZZ_ENTRY") == "load":
            # the public entry point, which also routes RWKV-5/6/7 files to rwkvx.arch
            import rwkvx
            rwkvx.load(path, dtype, threads=1, mmap=rng.random() < 0.8).forward([0])
            return "loaded-unchecked"
        checked = rng.random() < 0.8
        weights = load_weights(path, dtype, mmap=rng.random() < 0.8, check_tensors=True if checked else None,
                               progress=False)
        if checked and not _finite(weights):
            return "nonfinite"
        # the model runs on what was loaded
        RWKV(weights, threads=1).forward([0])
        return "loaded" if checked else "loaded-unchecked"
    except RwkvxError as e:
        message = str(e)
        return "error" if message and message.isprintable() else "bad-message"
    except MemoryError:
        return "leak:MemoryError"
    except Exception as e:
        return f"leak:{type(e).__name__}"


def _canary(seeds, folder: str) -> str:
    """A digest of every valid seed loaded: it must not change while the fuzzer runs."""
    import hashlib
    from rwkvx.loader import load_weights
    h = hashlib.sha256()
    for fmt in ("safetensors", "rwkvx", "pth", "ggml", "hf"):
        for files in seeds[fmt]:
            path = _write_case(folder, files, is_folder=fmt == "hf")
            for dtype in ("float32", "bfloat16"):
                try:
                    w = load_weights(path, dtype, progress=False)
                except Exception as e:  # e.g. a uint8 file as float32: stable too
                    h.update(type(e).__name__.encode())
                    continue
                for a in w.arrays():
                    for p in ([a.q, a.mx, a.rx, a.my, a.ry] if hasattr(a, "q") else [a]):
                        h.update(np.ascontiguousarray(p).tobytes())
    return h.hexdigest()


def worker(seed: int, memory_limit: int) -> None:
    """Read "format index" lines on stdin, answer one JSON line per case on stdout."""
    try:
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))
    except (ImportError, ValueError, OSError):  # pragma: no cover - not Linux
        pass
    import warnings
    warnings.simplefilter("ignore")
    # inside the driver's folder, which the driver removes even when this worker is killed
    tmp = tempfile.mkdtemp(prefix="worker-", dir=os.environ.get("RWKVX_FUZZ_TMP"))
    # answers go to the driver on a copy of fd 1; whatever else writes to fd 1 (libraries,
    # Rust code) goes to stderr instead of into the protocol
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        seeds, model = build_seeds(tmp)
        catalogue = hostile_pickles()
        folder = os.path.join(tmp, "case")
        canary = _canary(seeds, folder)
        out.write(json.dumps({"ready": True}) + "\n")
        out.flush()
        for n, line in enumerate(sys.stdin):
            fmt, index = line.split()
            outcome = run_case(fmt, seed, int(index), seeds, catalogue, model, folder)
            if (n + 1) % 500 == 0 and _canary(seeds, folder) != canary:
                outcome = "state-changed"
            out.write(json.dumps({"outcome": outcome}) + "\n")
            out.flush()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---- the driver ----------------------------------------------------------------------------

class Worker:
    def __init__(self, seed: int, memory_limit: int):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", "--seed", str(seed),
                                      "--memory-mb", str(memory_limit >> 20),
                                      "--entry", os.environ.get("RWKVX_FUZZ_ENTRY", "load_weights")],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     env=env, text=True, bufsize=1)
        ready = self._read(120.0)
        if ready is None or not ready.get("ready"):
            raise RuntimeError("the fuzz worker did not start")

    def _read(self, timeout: float):
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return None
        line = self.proc.stdout.readline()
        return json.loads(line) if line else {"outcome": "crash"}

    def run(self, fmt: str, index: int, timeout: float) -> tuple[str, float]:
        start = time.perf_counter()
        try:
            self.proc.stdin.write(f"{fmt} {index}\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            return "crash", 0.0
        answer = self._read(timeout)
        seconds = time.perf_counter() - start
        if answer is None:
            self.kill()
            return "timeout", seconds
        if answer.get("outcome") == "crash":
            self.proc.wait()
            return f"crash:{self.proc.returncode}", seconds
        return answer["outcome"], seconds

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def alive(self) -> bool:
        return self.proc.poll() is None


def fuzz(formats, seed: int, cases: int | None, seconds: float | None, timeout: float, memory_limit: int,
         save_dir: str | None, quiet: bool = False) -> dict:
    counts: dict[str, dict[str, int]] = {f: {} for f in formats}
    findings = []
    slowest = 0.0
    base = tempfile.mkdtemp(prefix="rwkvx-fuzz-")
    os.environ["RWKVX_FUZZ_TMP"] = base
    work = Worker(seed, memory_limit)
    start = time.monotonic()
    last_report = start
    n = 0
    try:
        while (cases is None or n < cases) and (seconds is None or time.monotonic() - start < seconds):
            fmt = formats[n % len(formats)]
            index = n // len(formats)
            outcome, took = work.run(fmt, index, timeout)
            slowest = max(slowest, took)
            counts[fmt][outcome] = counts[fmt].get(outcome, 0) + 1
            if outcome not in FINE:
                findings.append((fmt, seed, index, outcome))
                if save_dir:
                    _save(save_dir, fmt, seed, index, outcome)
                if not quiet:
                    print(f"FOUND {outcome}: python scripts/fuzz.py --replay {fmt} {seed} {index}", flush=True)
            if not work.alive() or outcome == "state-changed":
                work.kill()
                work = Worker(seed, memory_limit)
            n += 1
            if not quiet and time.monotonic() - last_report > 30:
                last_report = time.monotonic()
                print(f"{n} cases, {n / (last_report - start):.0f}/s, {len(findings)} findings", flush=True)
    finally:
        work.kill()
        shutil.rmtree(base, ignore_errors=True)
    return {"seed": seed, "cases": n, "seconds": round(time.monotonic() - start, 1), "slowest_case_s": round(slowest, 2),
            "counts": counts, "findings": findings}


def _save(save_dir: str, fmt: str, seed: int, index: int, outcome: str) -> None:
    # rebuilt in this process (the worker's copy may be gone)
    tmp = tempfile.mkdtemp(prefix="rwkvx-fuzz-save-")
    try:
        seeds, _ = build_seeds(tmp)
        files = make_case(fmt, seed, index, seeds, hostile_pickles())
        folder = os.path.join(save_dir, f"{fmt}-{seed}-{index}-{outcome.replace(':', '_')}")
        os.makedirs(folder, exist_ok=True)
        for name, data in files.items():
            with open(os.path.join(folder, name), "wb") as f:
                f.write(data)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replay(fmt: str, seed: int, index: int) -> None:
    """Run one case in this process, with the traceback of whatever it raises."""
    tmp = tempfile.mkdtemp(prefix="rwkvx-fuzz-")
    try:
        seeds, model = build_seeds(tmp)
        files = make_case(fmt, seed, index, seeds, hostile_pickles())
        path = _write_case(os.path.join(tmp, "case"), files, is_folder=fmt == "hf")
        print(f"case files: {', '.join(f'{k} ({len(v)} bytes)' for k, v in files.items())}")
        os.environ["RWKVX_FUZZ_REPLAY"] = "1"
        print("outcome:", run_case(fmt, seed, index, seeds, hostile_pickles(), model, os.path.join(tmp, "case")))
        del path
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python scripts/fuzz.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--format", action="append", choices=FORMATS,
                   help="formats to fuzz (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cases", type=int, help="cases to run (default: 1000 unless --seconds)")
    p.add_argument("--seconds", type=float, help="run until this much time has passed")
    p.add_argument("--timeout", type=float, default=TIMEOUT, help="seconds per case (default: %(default)s)")
    p.add_argument("--memory-mb", type=int, default=MEMORY_LIMIT >> 20,
                   help="the worker's address-space limit in MB (default: %(default)s)")
    p.add_argument("--save-dir", help="write the files of every finding here")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--ci", action="store_true", help=f"the seeded slice CI runs: {CI_CASES} cases, seed 0")
    p.add_argument("--replay", nargs=3, metavar=("FORMAT", "SEED", "INDEX"), help="run one case in this process")
    p.add_argument("--entry", choices=("load_weights", "load"), default="load_weights",
                   help="what loads the model files: rwkvx.loader.load_weights with check_tensors (RWKV-4, "
                        "the default) or rwkvx.load (every architecture, default checks)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    # the workers inherit it
    os.environ["RWKVX_FUZZ_ENTRY"] = args.entry
    if args.worker:
        worker(args.seed, args.memory_mb << 20)
        return 0
    if args.replay:
        replay(args.replay[0], int(args.replay[1]), int(args.replay[2]))
        return 0
    formats = tuple(args.format or FORMATS)
    cases = args.cases
    if args.ci:
        cases = cases or CI_CASES
    elif cases is None and args.seconds is None:
        cases = 1000
    summary = fuzz(formats, args.seed, cases, args.seconds, args.timeout, args.memory_mb << 20, args.save_dir,
                   quiet=args.json)
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{summary['cases']} cases in {summary['seconds']} s (seed {summary['seed']}, slowest case "
              f"{summary['slowest_case_s']} s)")
        for fmt, outcomes in summary["counts"].items():
            print(f"  {fmt:<12} " + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())))
        print(f"{len(summary['findings'])} findings")
    return 1 if summary["findings"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
