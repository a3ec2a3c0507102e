"""States as files: a conversation, a prompt or a document is one fixed-size array.

A state file is a safetensors file (loading one never runs code) with:

- ``state``: float32, the model's ``state_shape``;
- ``tokens`` (optional): int32 (n,), the tokens that produced the state;
- further float32/int32 tensors a caller adds (the prompt cache keeps earlier states and the
  last logits there); readers ignore names they do not know;
- metadata: ``format = "rwkvx-state"``, ``format_version``, ``architecture``,
  ``state_shape`` ("24,5,1024"), ``model_fingerprint`` (see :func:`checkpoint_fingerprint`),
  ``initial_state`` (the digest of the state the model's sequences started from, "" or
  absent for zeros; see RWKV.set_initial_state) and ``n_tokens``.

A file is written to a temporary name in its folder and renamed into place, so a reader
never sees half a state and an interrupted save leaves the old file as it was.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
import warnings

import numpy as np

from rwkvx.errors import RwkvxError, RwkvxWarning
from rwkvx.formats.safetensors_io import STATE_FORMAT_NAME as FORMAT_NAME
from rwkvx.formats.safetensors_io import looks_like_safetensors, open_safetensors, refuse_to_replace
from rwkvx.formats.tensorfile import NUMPY_DTYPES, MappedFile, fail

FORMAT_VERSION = 1

_STORED = {np.dtype(np.float32): "F32", np.dtype(np.int32): "I32"}


def write_state_file(path: str | os.PathLike, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """Write float32/int32 arrays and string metadata as a safetensors file, atomically."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise RwkvxError(f"{path}: is a directory; give a file name for the state")
    # the new file is renamed over path: a FIFO, device or link there is refused, not replaced
    refuse_to_replace(path)
    header, blobs, offset = {"__metadata__": {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION),
                                              **metadata}}, [], 0
    for name, array in tensors.items():
        array = np.ascontiguousarray(array)
        data = array.tobytes()
        header[name] = {"dtype": _STORED[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=".rwkvx-state-", suffix=".tmp", dir=folder)
    except OSError as e:
        raise RwkvxError(f"{path}: cannot write the state: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(text)))
            f.write(text)
            for data in blobs:
                f.write(data)
        os.replace(tmp, path)
    except OSError as e:
        _remove_quietly(tmp)
        raise RwkvxError(f"{path}: cannot write the state: {e.strerror or e}") from None
    except BaseException:
        _remove_quietly(tmp)
        raise


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def read_state_file(path: str | os.PathLike, *, architecture: str, state_shape: tuple[int, ...],
                    fingerprint: str | None, n_vocab: int) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read and check a state file for a model; returns (arrays, metadata).

    arrays holds private, writable copies: "state" (float32 state_shape, finite), "tokens"
    (a list of ints in 0..n_vocab-1) when the file has them, and every other float32/int32
    tensor by name. Raises CheckpointError (one line naming the file) for anything that is
    not a readable state of this shape; warns (RwkvxWarning) when the state was made by a
    different checkpoint of the same shape (fingerprint None: the caller checks that).
    """
    path = os.fspath(path)
    file = MappedFile(path)
    if not looks_like_safetensors(file.head(16)):
        raise fail(path, "not an rwkvx state file (expected a safetensors file written by save_state)")
    # any dtype at first, so that a model checkpoint is named as such, not by its dtype
    source = open_safetensors(file, dtypes=tuple(NUMPY_DTYPES))
    meta = source.metadata
    if meta.get("format") != FORMAT_NAME:
        raise fail(path, "not an rwkvx state file (a safetensors file without rwkvx state metadata; "
                         "a model checkpoint is opened with rwkvx.load)")
    try:
        version = int(meta.get("format_version", ""))
    except ValueError:
        raise fail(path, "state file with a malformed format_version") from None
    if version > FORMAT_VERSION:
        raise fail(path, f"written by a newer rwkvx (state format version {version}); "
                         f"this rwkvx reads version {FORMAT_VERSION} and older")
    if meta.get("architecture") != architecture:
        raise fail(path, f"a state of an {_printable(meta.get('architecture'))} model; this model is {architecture}")
    tensor = source.tensors.get("state")
    if tensor is None or tensor.dtype != "F32":
        raise fail(path, "state file without a float32 'state' tensor")
    if tuple(tensor.shape) != tuple(state_shape):
        raise fail(path, f"a state of shape {tuple(tensor.shape)}, this model's states are {tuple(state_shape)}")
    arrays: dict[str, np.ndarray] = {}
    for name, t in source.tensors.items():
        if t.dtype not in ("F32", "I32"):
            raise fail(path, f"tensor {_printable(name)}: a state file holds F32 and I32 tensors, got {t.dtype}")
        arrays[name] = t.read()
    state = arrays["state"]
    if not np.isfinite(state).all():
        raise fail(path, "the state holds NaN or infinite values")
    if "tokens" in arrays:
        tokens = arrays["tokens"]
        if tokens.ndim != 1 or tokens.dtype != np.int32:
            raise fail(path, f"'tokens' must be a 1-D int32 tensor, got {tokens.dtype} {tokens.shape}")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= n_vocab):
            raise fail(path, f"token ids outside this model's vocabulary (0..{n_vocab - 1})")
    if fingerprint is not None and meta.get("model_fingerprint") != fingerprint:
        warnings.warn(f"{path}: this state was made by a different checkpoint of the same shape; "
                      "continuing from it will not reproduce that model's text", RwkvxWarning, stacklevel=3)
    return arrays, meta


# RWKV-5 and 6's state tuning keeps each head's matrix transposed against the state the
# runtime holds (ChatRWKV and RWKV-Runner load it with transpose(1, 2)); RWKV-7's matches it
_TUNED_TRANSPOSED = {"RWKV-5": True, "RWKV-6": True, "RWKV-7": False}


def read_tuned_state(path: str | os.PathLike, *, architecture: str, n_layer: int, n_head: int,
                     head_size: int) -> np.ndarray:
    """A state-tuning file as a state (n_layer, 2 + head_size, n_embd), float32.

    State tuning (RWKV-PEFT, RWKV-LM) trains the state a RWKV-5/6/7 model starts from: one
    (n_head, head_size, head_size) matrix per layer, ``blocks.N.att.time_state``, saved as a
    .pth or safetensors file (float32, bfloat16 or float16). The token-shift rows start at
    zero, as those tools start them. Raises CheckpointError (one line naming the file) for
    anything else.
    """
    path = os.fspath(path)
    if architecture not in _TUNED_TRANSPOSED:
        raise fail(path, f"state-tuning files (blocks.N.att.time_state) are for RWKV-5, 6 and 7; "
                         f"this model is {architecture}")
    source = open_state_source(path)
    names = [f"blocks.{layer}.att.time_state" for layer in range(n_layer)]
    missing = [name for name in names if name not in source.tensors]
    if missing:
        raise fail(path, f"a state-tuning file without {missing[0]}: this model has {n_layer} layers")
    extra = sorted(set(source.tensors) - set(names))
    if extra:
        raise fail(path, f"a state-tuning file holds only blocks.N.att.time_state for this model's "
                         f"{n_layer} layers; it also has {_printable(extra[0])}")
    layers = []
    for name in names:
        tensor = source.tensors[name]
        if tuple(tensor.shape) != (n_head, head_size, head_size):
            raise fail(path, f"{name}: expected {[n_head, head_size, head_size]} (this model's heads), "
                             f"got {list(tensor.shape)}")
        if getattr(tensor, "dtype", None) not in ("F32", "BF16", "F16", "F64"):
            raise fail(path, f"{name}: expected floating point, got {_printable(getattr(tensor, 'dtype', None))}")
        heads = tensor.float32()
        if not np.isfinite(heads).all():
            raise fail(path, f"{name} holds NaN or infinite values")
        layers.append(heads)
    return tuned_state(np.stack(layers), architecture)


def open_state_source(path: str | os.PathLike):
    """An rwkvx state file or a state-tuning file, opened (nothing read): the
    TensorSource of its tensors. Raises CheckpointError for anything else; what fits which
    model is checked by read_state_file and read_tuned_state."""
    from rwkvx.formats.pth import ZIP_MAGIC
    from rwkvx.loader import open_checkpoint
    path = os.fspath(path)
    not_a_state = "neither an rwkvx state file nor a state-tuning file"
    if os.path.isdir(path):
        raise fail(path, f"is a directory, {not_a_state}")
    # a file of a known format reports its own damage; anything else is named for what
    # was expected of it
    file = MappedFile(path)
    head = file.head(16)
    if not (head[:4] == ZIP_MAGIC or looks_like_safetensors(head) or head[:1] == b"\x80"):
        raise fail(path, f"{not_a_state} (.pth or safetensors)")
    if is_state_file(path):
        return open_safetensors(file, dtypes=tuple(NUMPY_DTYPES))
    source = open_checkpoint(path)
    if source.metadata.get("format") != FORMAT_NAME and not any(k.endswith(".att.time_state") for k in source.tensors):
        raise fail(path, f"{not_a_state} (no blocks.N.att.time_state tensors)")
    return source


def tuned_state(time_state: np.ndarray, architecture: str) -> np.ndarray:
    """The state (n_layer, 2 + N, H N) that state tuning's matrices (n_layer, H, N, N), as
    stored, start: token-shift rows zero, each head's matrix in the runtime's orientation."""
    n_layer, n_head, head_size, _ = time_state.shape
    heads = time_state.transpose(0, 1, 3, 2) if _TUNED_TRANSPOSED[architecture] else time_state
    state = np.zeros((n_layer, 2 + head_size, n_head * head_size), np.float32)
    state[:, 2:] = heads.reshape(n_layer, head_size, n_head * head_size)
    return state


def is_state_file(path: str | os.PathLike) -> bool:
    """Whether path is a safetensors file with rwkvx state metadata (read_state_file reads it)."""
    try:
        file = MappedFile(os.fspath(path))
        return (looks_like_safetensors(file.head(16))
                and open_safetensors(file, dtypes=tuple(NUMPY_DTYPES)).metadata.get("format") == FORMAT_NAME)
    except (OSError, RwkvxError):
        return False


def _printable(value) -> str:
    text = "unknown" if value is None else str(value)
    return text.encode("unicode_escape").decode("ascii")[:40]


# bytes hashed from each stored tensor, at its start, middle and end
_WINDOW = 256


def checkpoint_fingerprint(source) -> str:
    """A short hash that tells checkpoints apart, from an opened checkpoint's stored bytes
    (source: rwkvx.loader.open_checkpoint's TensorSource, which the caller has open anyway).

    It covers every tensor's name, shape and stored dtype, and three windows of 256 bytes of
    its data: a fine-tune (a merged LoRA, a new head) changes it, a different run dtype of
    the same file does not, and it reads a few KB however large the model. A file written
    by ``python -m rwkvx.convert`` carries its source's fingerprint in its metadata, so the
    converted file and its source agree. It is a fingerprint, not a checksum: a change to a
    few weights away from the windows goes unnoticed.
    """
    from rwkvx.formats.tensorfile import QuantizedTensor

    recorded = source.metadata.get("model_fingerprint")
    if recorded:
        return recorded
    h = hashlib.blake2b(digest_size=12)
    for name in sorted(source.tensors):
        if name.endswith(".att.time_state"):
            # a state-tuned checkpoint is its base model's weights (the start is told
            # apart by initial_state_digest): states saved with either load in the other
            continue
        tensor = source.tensors[name]
        parts = tensor.parts.values() if isinstance(tensor, QuantizedTensor) else [tensor]
        h.update(f"{name}:{tensor.shape}".encode())
        for part in parts:
            data, start = part.file.map, part.offset
            end = min(start + part.nbytes, len(data))
            h.update(part.dtype.encode())
            for at in (start, start + (end - start) // 2, end - _WINDOW):
                at = max(start, at)
                h.update(data[at:min(at + _WINDOW, end)])
    return h.hexdigest()


def state_metadata(architecture: str, state_shape: tuple[int, ...], fingerprint: str,
                   n_tokens: int | None, initial_state: str = "") -> dict[str, str]:
    """The metadata every state file carries. initial_state: the digest of the state the
    model's sequences start from (RWKV.initial_state_digest), "" for zeros: the tokens were
    run from there."""
    from rwkvx import __version__
    meta = {"architecture": architecture, "state_shape": ",".join(str(d) for d in state_shape),
            "model_fingerprint": fingerprint, "initial_state": initial_state, "writer": f"rwkvx {__version__}"}
    if n_tokens is not None:
        meta["n_tokens"] = str(n_tokens)
    return meta
