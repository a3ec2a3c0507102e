"""Tokenizers: text to token ids and back, with a decoder that is safe when streaming.

Three kinds are supported, all behind the small :class:`Tokenizer` interface:

- :class:`ByteTokenizer`: 256 tokens, one per byte of the UTF-8 text (tiny test models).
- :class:`HFTokenizer`: any Hugging Face ``tokenizer.json``, e.g. GPT-NeoX's
  ``20B_tokenizer.json`` used by the RWKV-4 Pile and Raven models.
- :class:`WorldTokenizer`: the RWKV World vocabulary ``rwkv_vocab_v20230424.txt``.

:func:`load_tokenizer` picks one from a path (by the file's content, not its extension) and
checks that it fits the model's vocabulary.

The two RWKV tokenizers ship inside the package (Apache-2.0; the licence note is
``rwkvx/tokenizer_data/README.md``): :data:`PACKAGED` maps ``"20B"`` to GPT-NeoX's
``20B_tokenizer.json`` (RWKV-4 Pile and Raven, 50277 tokens) and ``"world"`` to
``rwkv_vocab_v20230424.txt`` (World models, 65536 tokens); ``load_tokenizer`` takes those
names too. :func:`default_tokenizer` picks the tokenizer for a model when none is given.

Streaming: a model produces one token at a time, and one character may span several tokens
(an emoji is 4 UTF-8 bytes, often split over 2-4 byte-level tokens). ``tokenizer.stream()``
returns a :class:`StreamDecoder` whose ``push(token_id)`` returns only text that is complete,
and whose ``flush()`` returns the rest with invalid bytes replaced by U+FFFD. For the byte
based tokenizers (all three above, when the ``tokenizer.json`` is byte-level BPE),
``"".join(pushes) + flush()`` equals ``decode(all ids)`` exactly.
"""

from __future__ import annotations

import abc
import ast
import codecs
import json
import operator
import os
import re
from collections.abc import Callable, Iterable

from rwkvx.errors import RwkvxError, TokenizerError
from rwkvx.formats.tensorfile import open_regular, printable

__all__ = [
    "Tokenizer",
    "StreamDecoder",
    "ByteTokenizer",
    "HFTokenizer",
    "WorldTokenizer",
    "load_tokenizer",
    "default_tokenizer",
    "PACKAGED",
]

# Names an end-of-text token goes by, in order of preference.
_EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>")

WORLD_VOCAB_SIZE = 65536
NEOX_VOCAB_SIZE = 50277

_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tokenizer_data")
# The tokenizers shipped with rwkvx, by the name --tokenizer accepts for each.
PACKAGED = {
    "20B": os.path.join(_DATA, "20B_tokenizer.json"),
    "world": os.path.join(_DATA, "rwkv_vocab_v20230424.txt"),
}
# Which packaged tokenizer a model's vocabulary size implies (256 is the byte tokenizer).
_BY_VOCAB_SIZE = {NEOX_VOCAB_SIZE: "20B", WORLD_VOCAB_SIZE: "world"}


def _utf8(text: str) -> bytes:
    """Return text as UTF-8 bytes; TokenizerError for lone surrogates, TypeError for non-str."""
    if not isinstance(text, str):
        raise TypeError(f"text: expected str, got {type(text).__name__}")
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise TokenizerError(
            f"text: expected valid Unicode, got an unpaired surrogate at index {exc.start}"
        ) from None


def _check_id(token_id: object, vocab_size: int) -> int:
    """Return token_id as an int if 0 <= token_id < vocab_size, else raise TokenizerError."""
    try:
        i = operator.index(token_id)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"token id: expected int, got {type(token_id).__name__}") from None
    if not 0 <= i < vocab_size:
        raise TokenizerError(f"token id: expected 0 <= id < {vocab_size}, got {i}")
    return i


class StreamDecoder(abc.ABC):
    """Turns a stream of token ids into text, one token at a time, never splitting a character."""

    @abc.abstractmethod
    def push(self, token_id: int) -> str:
        """Add one token; return the text that became complete (possibly "")."""

    @abc.abstractmethod
    def flush(self) -> str:
        """Return whatever text is still held back, invalid bytes replaced by U+FFFD, and reset."""


class _BytesStreamDecoder(StreamDecoder):
    """Stream decoder for tokenizers whose tokens are byte strings: an incremental UTF-8 decoder."""

    def __init__(self, token_bytes: Callable[[int], bytes]) -> None:
        self._token_bytes = token_bytes
        # Python's incremental decoder holds an incomplete sequence back and replaces invalid
        # bytes exactly as bytes.decode(errors="replace") would on the whole stream.
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Add one token; return the text that became complete (possibly "")."""
        return self._utf8.decode(self._token_bytes(token_id), final=False)

    def flush(self) -> str:
        """Return the held-back bytes decoded with U+FFFD for an incomplete character, and reset."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text


class _WindowStreamDecoder(StreamDecoder):
    """Stream decoder for tokenizers that are not byte-level: re-decode a short window of ids.

    Decoding a token on its own can lose context (SentencePiece drops a leading space at the
    start of a text; byte-fallback tokens decode to U+FFFD until the character is complete),
    so each push decodes the previous chunk plus the pending ids and returns the new suffix,
    holding it back while it ends with U+FFFD.
    """

    def __init__(self, decode: Callable[[list[int]], str], check: Callable[[int], int]) -> None:
        self._decode = decode
        self._check = check
        # ids[:read] were already returned; ids[:read] decoded alone is the context prefix.
        self._ids: list[int] = []
        self._read = 0

    def push(self, token_id: int) -> str:
        """Add one token; return the text that became complete (possibly "")."""
        self._ids.append(self._check(token_id))
        prefix = self._decode(self._ids[: self._read])
        text = self._decode(self._ids)
        if len(text) <= len(prefix) or text.endswith("\ufffd") or not text.startswith(prefix):
            return ""
        # Keep only the chunk just returned as context for the next one, so the window stays short.
        self._ids = self._ids[self._read :]
        self._read = len(self._ids)
        return text[len(prefix) :]

    def flush(self) -> str:
        """Return the text of the ids not returned yet (U+FFFD included) and reset."""
        prefix = self._decode(self._ids[: self._read])
        text = self._decode(self._ids)
        self._ids = []
        self._read = 0
        return text[len(prefix) :] if text.startswith(prefix) else text


class Tokenizer(abc.ABC):
    """Interface shared by all tokenizers.

    Attributes:
        vocab_size: number of token ids; valid ids are ``0 <= id < vocab_size``.
        eos_id: the end-of-text token that stops generation, or None if there is none.
    """

    vocab_size: int
    eos_id: int | None

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Return the token ids of text (no special tokens are added)."""

    @abc.abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Return the text of ids; invalid UTF-8 becomes U+FFFD."""

    @abc.abstractmethod
    def stream(self) -> StreamDecoder:
        """Return a fresh :class:`StreamDecoder` for decoding generated tokens one at a time."""


class _BytesTokenizer(Tokenizer):
    """Shared decoding for tokenizers where every id stands for a fixed byte string."""

    # token id -> its bytes; ids with no text (end of text, unused ids) map to b"".
    _table: list[bytes]

    def token_bytes(self, token_id: int) -> bytes:
        """Return the raw bytes token_id stands for (b"" for end-of-text and unused ids)."""
        return self._table[_check_id(token_id, self.vocab_size)]

    @property
    def max_token_bytes(self) -> int:
        """The longest token's length in bytes: text of B bytes has at least B / this many tokens."""
        if getattr(self, "_max_token_bytes", None) is None:
            self._max_token_bytes = max(map(len, self._table), default=1) or 1
        return self._max_token_bytes

    def decode(self, ids: Iterable[int]) -> str:
        """Return the text of ids: their bytes joined, decoded as UTF-8 with U+FFFD for errors."""
        data = b"".join([self.token_bytes(i) for i in ids])
        return data.decode("utf-8", errors="replace")

    def stream(self) -> StreamDecoder:
        """Return a fresh incremental UTF-8 :class:`StreamDecoder`."""
        return _BytesStreamDecoder(self.token_bytes)


class ByteTokenizer(_BytesTokenizer):
    """256 tokens, token = one byte of the UTF-8 encoding. There is no end-of-text token."""

    def __init__(self) -> None:
        self.vocab_size = 256
        self.eos_id = None
        self._table = [bytes([b]) for b in range(256)]

    def encode(self, text: str) -> list[int]:
        """Return the UTF-8 bytes of text as a list of ints."""
        return list(_utf8(text))

    def __repr__(self) -> str:
        return "ByteTokenizer()"


def _bytes_to_unicode() -> dict[int, str]:
    """Return GPT-2's byte -> printable character table used by byte-level BPE vocabularies."""
    # Printable Latin-1 bytes stand for themselves; the other 68 bytes are shifted to U+0100 and
    # up, in byte order, so that every vocabulary entry is visible text.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


class HFTokenizer(_BytesTokenizer):
    """A Hugging Face ``tokenizer.json``, loaded with ``tokenizers.Tokenizer.from_file``.

    For byte-level BPE (decoder type ``ByteLevel``, e.g. GPT-NeoX's 20B tokenizer) every id is
    mapped to its raw bytes once at load time, so decoding and streaming are exact. Any other
    tokenizer is decoded by the library, and streamed by re-decoding a short window of ids.
    ``decode`` keeps special tokens (``<|endoftext|>`` decodes to its text).
    """

    def __init__(self, path: str | os.PathLike[str], data: bytes | None = None) -> None:
        try:
            import tokenizers
        except ImportError:
            raise TokenizerError(
                f"tokenizer {_name(path)}: expected the 'tokenizers' package to be installed, got ImportError"
            ) from None
        self.path = os.fspath(path)
        if data is None:
            data = _read_file(self.path)
        # checked here first: the library aborts the whole process on some hostile files
        # (an id of 2^31 makes it allocate that many entries)
        _checked_tokenizer_json(self.path, data)
        try:
            self._hf = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
            config = json.loads(self._hf.to_str())
        # The library raises bare Exception subclasses (from Rust) for any malformed file.
        except Exception as exc:
            raise TokenizerError(
                f"tokenizer {_name(self.path)}: expected a valid tokenizer.json, got {printable(_one_line(exc))}"
            ) from None
        self.vocab_size = self._hf.get_vocab_size(with_added_tokens=True)
        self.eos_id = next(
            (i for i in map(self._hf.token_to_id, _EOS_NAMES) if i is not None), None
        )
        decoder = config.get("decoder") or {}
        self.byte_level = decoder.get("type") == "ByteLevel"
        if self.byte_level:
            self._table = self._byte_table(config)

    def _byte_table(self, config: dict) -> list[bytes]:
        """Return id -> raw bytes for a byte-level BPE vocabulary."""
        char_to_byte = {c: b for b, c in _bytes_to_unicode().items()}
        added = {t["id"]: t["content"] for t in config.get("added_tokens") or ()}
        vocab = self._hf.get_vocab(with_added_tokens=True)
        size = max(self.vocab_size, max(vocab.values(), default=-1) + 1)
        self.vocab_size = size
        table = [b""] * size
        for token, i in vocab.items():
            if i in added:
                table[i] = added[i].encode("utf-8")
                continue
            try:
                table[i] = bytes([char_to_byte[c] for c in token])
            except KeyError:
                # Same rule as the library's ByteLevel decoder: a token with a character outside
                # the byte table is taken as literal UTF-8 text.
                table[i] = token.encode("utf-8")
        return table

    def encode(self, text: str) -> list[int]:
        """Return the token ids of text, without adding special tokens (RWKV uses none)."""
        _utf8(text)
        # encode_batch releases the GIL while it works (encode does not): a long text
        # being encoded in one thread must not stall the others (a server's clients)
        return list(self._hf.encode_batch([text], add_special_tokens=False)[0].ids)

    def decode(self, ids: Iterable[int]) -> str:
        """Return the text of ids, special tokens included; invalid UTF-8 becomes U+FFFD."""
        if self.byte_level:
            return super().decode(ids)
        return self._decode_checked([_check_id(i, self.vocab_size) for i in ids])

    def token_bytes(self, token_id: int) -> bytes:
        """Return the raw bytes token_id stands for; only byte-level tokenizers have them."""
        if not self.byte_level:
            raise TokenizerError(f"tokenizer {self.path}: expected a byte-level BPE tokenizer, got another kind")
        return super().token_bytes(token_id)

    def _decode_checked(self, ids: list[int]) -> str:
        """Decode ids already range-checked with the library, special tokens kept."""
        return self._hf.decode(ids, skip_special_tokens=False)

    def stream(self) -> StreamDecoder:
        """Return a fresh :class:`StreamDecoder` (incremental UTF-8 for byte-level BPE)."""
        if self.byte_level:
            return super().stream()
        return _WindowStreamDecoder(self._decode_checked, lambda i: _check_id(i, self.vocab_size))

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r})"


def _plain_literal(text: str) -> str | bytes | None:
    """The value of a quoted str or bytes literal that has no escapes, else None.

    Most lines of the World vocabulary are such literals ('the', b'abc'), whose value is
    the text between the quotes; skipping ast.literal_eval for them halves the load time.
    Everything else (escapes, odd quoting, anything malformed) returns None, for
    ast.literal_eval to decide.
    """
    is_bytes = text[:1] == "b"
    body = text[2:-1] if is_bytes else text[1:-1]
    quote = text[1:2] if is_bytes else text[:1]
    if (len(text) < 2 + is_bytes or quote not in ("'", '"') or text[-1] != quote or quote in body
            or "\\" in body or not body.isprintable()):
        return None
    if is_bytes:
        return body.encode("ascii") if body.isascii() else None
    return body


class WorldTokenizer(_BytesTokenizer):
    """The RWKV World vocabulary (``rwkv_vocab_v20230424.txt``): greedy longest match over bytes.

    File format: one line per token, ``ID REPR LEN``, where REPR is a Python str or bytes
    literal and LEN its length in UTF-8 bytes. Id 0 is end of text and has no line; it
    decodes to "". ``vocab_size`` is 65536; ids without a line decode to "".
    """

    def __init__(self, path: str | os.PathLike[str], data: bytes | None = None) -> None:
        self.path = os.fspath(path)
        self.vocab_size = WORLD_VOCAB_SIZE
        self.eos_id = 0
        self._table = [b""] * WORLD_VOCAB_SIZE
        # Every prefix of every token -> that token's id if the prefix is itself a token, else
        # -1. Encoding walks forward while the text so far is a prefix, so the cost per token
        # is its length, not the longest token's length.
        self._prefixes: dict[bytes, int] = {}
        if data is None:
            data = _read_file(self.path)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise TokenizerError(
                f"tokenizer {_name(self.path)}: expected UTF-8 text, got an invalid byte at offset {exc.start}"
            ) from None
        for lineno, line in enumerate(text.splitlines(), start=1):
            if line:
                self._add_line(line, lineno)

    def _add_line(self, line: str, lineno: int) -> None:
        """Parse one ``ID REPR LEN`` line and add the token, or raise TokenizerError naming the line."""
        where = f"tokenizer {self.path}:{lineno}"
        first, last = line.find(" "), line.rfind(" ")
        try:
            if first <= 0 or last <= first:
                raise ValueError
            token_id, size = int(line[:first]), int(line[last + 1 :])
            value = _plain_literal(line[first + 1 : last])
            if value is None:
                value = ast.literal_eval(line[first + 1 : last])
            if not isinstance(value, (str, bytes)):
                raise ValueError
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            raise TokenizerError(f"{where}: expected 'ID REPR LEN', got {line[:60]!r}") from None
        data = value.encode("utf-8") if isinstance(value, str) else value
        if len(data) != size:
            raise TokenizerError(f"{where}: expected token {token_id} to be {size} bytes, got {len(data)}")
        if not data:
            raise TokenizerError(f"{where}: expected a non-empty token, got {line[:60]!r}")
        if not 1 <= token_id < WORLD_VOCAB_SIZE:
            raise TokenizerError(f"{where}: expected an id in 1..{WORLD_VOCAB_SIZE - 1}, got {token_id}")
        if self._table[token_id] or self._prefixes.get(data, -1) >= 0:
            raise TokenizerError(f"{where}: expected each id and token once, got a duplicate of id {token_id}")
        self._table[token_id] = data
        self._prefixes[data] = token_id
        for k in range(1, len(data)):
            self._prefixes.setdefault(data[:k], -1)

    def encode(self, text: str) -> list[int]:
        """Return the token ids of text: at each position, the longest token that matches."""
        data = _utf8(text)
        prefixes = self._prefixes
        ids: list[int] = []
        i, n = 0, len(data)
        while i < n:
            best_id, best_end = -1, i
            j = i + 1
            while j <= n:
                token_id = prefixes.get(data[i:j])
                if token_id is None:
                    break
                if token_id >= 0:
                    best_id, best_end = token_id, j
                j += 1
            if best_id < 0:
                raise TokenizerError(
                    f"tokenizer {self.path}: expected a token for every byte, got none for byte 0x{data[i]:02x}"
                )
            ids.append(best_id)
            i = best_end
        return ids

    def __repr__(self) -> str:
        return f"WorldTokenizer({self.path!r})"


# tokenizer files are at most this large (the 20B tokenizer.json is 2.4 MB) ...
_MAX_FILE_BYTES = 256 << 20
# ... and their token ids below this (vocabularies have ~50-250k tokens)
_MAX_TOKEN_ID = 1 << 24


def _name(path) -> str:
    return printable(os.fspath(path))


def _read_file(path: str) -> bytes:
    """A tokenizer file's bytes: a regular file only (a FIFO would block), of bounded size."""
    try:
        fd = open_regular(os.fspath(path), "tokenizer file")
    except RwkvxError as exc:
        raise TokenizerError(f"tokenizer {exc}") from None
    with os.fdopen(fd, "rb") as f:
        data = f.read(_MAX_FILE_BYTES + 1)
    if len(data) > _MAX_FILE_BYTES:
        raise TokenizerError(f"tokenizer {_name(path)}: larger than {_MAX_FILE_BYTES >> 20} MB")
    return data


def _checked_tokenizer_json(path: str, data: bytes) -> dict:
    """The parsed tokenizer.json, with every token id an int in 0..2^24."""
    try:
        config = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise TokenizerError(f"tokenizer {_name(path)}: not valid JSON ({printable(_one_line(exc), 80)})") from None
    if not isinstance(config, dict):
        raise TokenizerError(f"tokenizer {_name(path)}: expected a JSON object")
    model = config.get("model")
    vocab = model.get("vocab") if isinstance(model, dict) else None
    ids = list(vocab.values()) if isinstance(vocab, dict) else []
    added = config.get("added_tokens")
    if isinstance(added, list):
        ids += [t.get("id") for t in added if isinstance(t, dict)]
    for token_id in ids:
        if isinstance(token_id, bool) or not isinstance(token_id, int) or not 0 <= token_id < _MAX_TOKEN_ID:
            raise TokenizerError(f"tokenizer {_name(path)}: a token id of {printable(token_id, 40)} "
                                 f"(expected integers in 0..{_MAX_TOKEN_ID - 1})")
    return config


def _one_line(exc: BaseException) -> str:
    """Return the first line of an exception's message (the type name if it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


_WORLD_FIRST_LINE = re.compile(rb"\d+ ")


def _packaged(name: str) -> str:
    """The path of the packaged tokenizer called name ("20B" or "world", any case)."""
    key = next(k for k in PACKAGED if k.lower() == name.lower())
    path = PACKAGED[key]
    if not os.path.isfile(path):
        raise TokenizerError(f"tokenizer {key}: the packaged file {path} is missing from this installation "
                             "(reinstall rwkvx, or pass --tokenizer FILE)")
    return path


def load_tokenizer(path: str | os.PathLike[str] | None, n_vocab: int) -> Tokenizer:
    """Return the tokenizer at path, checked to fit a model with n_vocab tokens.

    path None means :class:`ByteTokenizer` and is only allowed when n_vocab == 256; the
    string "bytes" means :class:`ByteTokenizer` for any n_vocab >= 256, and "20B" and
    "world" (any case) the packaged tokenizers of :data:`PACKAGED` (a file of one of these
    three names is reached as ./bytes, ./world, ./20B). Otherwise the file's content decides:
    JSON (starts with "{") is a Hugging Face tokenizer.json, lines starting with "<id> " are
    an RWKV World vocabulary. Every failure raises :class:`TokenizerError` with a one-line
    message.
    """
    if path is None:
        if n_vocab != 256:
            raise TokenizerError(
                f"tokenizer: expected a tokenizer file for a model with {n_vocab} tokens, got none "
                "(RWKV-4 Pile/Raven models use 20B_tokenizer.json, World models "
                "rwkv_vocab_v20230424.txt, both packaged: --tokenizer 20B, --tokenizer world); "
                "pass it with --tokenizer"
            )
        return ByteTokenizer()
    if isinstance(path, str) and path.lower() in {k.lower() for k in PACKAGED}:
        path = _packaged(path)
    name = os.fspath(path)
    tokenizer: Tokenizer
    if isinstance(path, str) and path == "bytes":
        tokenizer = ByteTokenizer()
    else:
        data = _read_file(name)
        head = data[:4096].removeprefix(codecs.BOM_UTF8).lstrip()
        if head.startswith(b"{"):
            tokenizer = HFTokenizer(name, data)
        elif _WORLD_FIRST_LINE.match(head):
            tokenizer = WorldTokenizer(name, data)
        else:
            raise TokenizerError(
                f"tokenizer {_name(name)}: expected a Hugging Face tokenizer.json or an RWKV World "
                "vocabulary (.txt), got neither"
            )
    if tokenizer.vocab_size > n_vocab:
        raise TokenizerError(
            f"tokenizer {_name(name)} has {tokenizer.vocab_size} tokens but the model's vocabulary has {n_vocab}"
        )
    return tokenizer


def default_tokenizer(model_path: str | os.PathLike[str] | None, n_vocab: int) -> str | None:
    """The tokenizer for a model when none is given, as a path for :func:`load_tokenizer`.

    In order: a ``tokenizer.json`` beside the model file (inside it, for a model folder) wins;
    else the vocabulary size decides: 256 -> None (bytes), 50277 -> the packaged 20B
    tokenizer, 65536 -> the packaged World vocabulary. Any other size raises
    :class:`TokenizerError` naming ``--tokenizer``. model_path may be None (no file to look
    beside) or "demo" (the packaged demo model).
    """
    if model_path is not None:
        from rwkvx import demo

        model_path = os.path.abspath(os.fspath(demo.resolve(model_path)))
        folder = model_path if os.path.isdir(model_path) else os.path.dirname(model_path)
        beside = os.path.join(folder, "tokenizer.json")
        if os.path.isfile(beside):
            return beside
    if n_vocab == 256:
        return None
    if n_vocab in _BY_VOCAB_SIZE:
        return _packaged(_BY_VOCAB_SIZE[n_vocab])
    raise TokenizerError(
        f"tokenizer: none is known for a vocabulary of {n_vocab} tokens (rwkvx picks one for 256, "
        f"{NEOX_VOCAB_SIZE} and {WORLD_VOCAB_SIZE}); pass one with --tokenizer FILE (a tokenizer.json or an "
        "RWKV World vocabulary .txt), or --tokenizer 20B / world / bytes"
    )
