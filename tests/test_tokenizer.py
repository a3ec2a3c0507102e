"""Tests for rwkvx.tokenizer: round trips, streaming that never splits a character, loading errors."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest

from rwkvx.errors import TokenizerError
from rwkvx.tokenizer import (
    PACKAGED,
    ByteTokenizer,
    HFTokenizer,
    Tokenizer,
    WorldTokenizer,
    default_tokenizer,
    load_tokenizer,
)

from conftest import save_random_model

SHARED = Path(__file__).resolve().parents[2] / "shared"
# The copies shipped inside the package; ../shared holds the originals.
NEOX_JSON = Path(PACKAGED["20B"])
WORLD_TXT = Path(PACKAGED["world"])

# Multi-byte characters of every UTF-8 length: 2 (é, ö, ñ), 3 (中文, —, “”), 4 (emoji).
TEXTS = [
    "Hello, world!",
    "Héllo wörld, señor — “quoted” café naïve",
    "中文字符和日本語のテキスト",
    "emoji 😀👍🏽 and a family 👨‍👩‍👧 and flags 🇫🇷",
    "  leading spaces\n\n\ttabs and newlines\r\n",
    "",
]


def stream_all(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    """Push ids one at a time; return every push's result followed by flush()'s."""
    decoder = tokenizer.stream()
    pieces = [decoder.push(i) for i in ids]
    pieces.append(decoder.flush())
    return pieces


def assert_streams_whole(tokenizer: Tokenizer, ids: list[int], text: str) -> None:
    """Streaming ids gives back text, and no piece carries half a character."""
    pieces = stream_all(tokenizer, ids)
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


# ---- ByteTokenizer


@pytest.mark.parametrize("text", TEXTS)
def test_bytes_round_trip(text: str) -> None:
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.vocab_size == 256 and tok.eos_id is None


@pytest.mark.parametrize("text", TEXTS)
def test_bytes_stream_never_splits_a_character(text: str) -> None:
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert_streams_whole(tok, ids, text)


def test_bytes_stream_holds_back_an_emoji_until_its_last_byte() -> None:
    tok = ByteTokenizer()
    decoder = tok.stream()
    assert [decoder.push(b) for b in "a😀".encode("utf-8")] == ["a", "", "", "", "😀"]
    assert decoder.flush() == ""


def test_bytes_stream_flush_replaces_an_unfinished_character() -> None:
    tok = ByteTokenizer()
    ids = list("x😀".encode("utf-8"))[:3]
    pieces = stream_all(tok, ids)
    assert pieces == ["x", "", "", "\ufffd"]
    assert "".join(pieces) == tok.decode(ids)


def test_bytes_stream_equals_decode_on_random_bytes() -> None:
    # Invalid UTF-8 must be replaced the same way whether decoded at once or byte by byte.
    rng = random.Random(1234)
    tok = ByteTokenizer()
    for _ in range(200):
        ids = [rng.choice([rng.randrange(256), rng.randrange(0x80, 0x100)]) for _ in range(rng.randrange(1, 12))]
        assert "".join(stream_all(tok, ids)) == tok.decode(ids)


def test_stream_returns_a_fresh_decoder() -> None:
    tok = ByteTokenizer()
    first = tok.stream()
    assert first.push(0xF0) == ""
    assert tok.stream().push(ord("a")) == "a"


def test_bytes_decode_rejects_out_of_range_ids() -> None:
    tok = ByteTokenizer()
    for bad in (256, -1):
        with pytest.raises(TokenizerError, match=r"token id: expected 0 <= id < 256"):
            tok.decode([65, bad])
    with pytest.raises(TokenizerError):
        tok.stream().push(300)


def test_encode_rejects_non_text() -> None:
    with pytest.raises(TypeError, match="text: expected str"):
        ByteTokenizer().encode(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(TokenizerError, match="surrogate"):
        ByteTokenizer().encode("a\ud800b")


# ---- HFTokenizer: GPT-NeoX 20B (byte-level BPE)


@pytest.fixture(scope="module")
def neox() -> HFTokenizer:
    if not NEOX_JSON.is_file():
        pytest.skip(f"{NEOX_JSON} not found")
    return HFTokenizer(NEOX_JSON)


def test_neox_vocabulary(neox: HFTokenizer) -> None:
    assert neox.byte_level
    assert neox.vocab_size == 50277
    assert neox.eos_id == 0
    assert neox.decode([0]) == "<|endoftext|>"


@pytest.mark.parametrize("text", TEXTS)
def test_neox_round_trip_and_stream(neox: HFTokenizer, text: str) -> None:
    ids = neox.encode(text)
    assert neox.decode(ids) == text
    assert_streams_whole(neox, ids, text)


def test_neox_splits_an_emoji_over_tokens_and_streams_it_whole(neox: HFTokenizer) -> None:
    # Byte-level BPE cuts this emoji in the middle, so one push alone would be half a character.
    ids = neox.encode(" 😀")
    assert len(ids) >= 2
    pieces = stream_all(neox, ids)
    assert [p for p in pieces if p] == [" ", "😀"]


def test_neox_decode_matches_the_library_on_random_ids(neox: HFTokenizer) -> None:
    rng = random.Random(7)
    ids = [rng.randrange(neox.vocab_size) for _ in range(400)]
    assert neox.decode(ids) == neox._hf.decode(ids, skip_special_tokens=False)
    assert "".join(stream_all(neox, ids)) == neox.decode(ids)


def test_neox_decode_rejects_out_of_range_ids(neox: HFTokenizer) -> None:
    with pytest.raises(TokenizerError, match="50277"):
        neox.decode([50277])


# ---- HFTokenizer: not byte-level (SentencePiece-style with byte fallback), built here


def write_sentencepiece_like(path: Path) -> Path:
    """Write a tiny Llama-style tokenizer.json: ▁ for spaces, <0xNN> tokens for unknown bytes."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import AddedToken, decoders, models, normalizers

    vocab = {"<unk>": 0, "</s>": 1}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for c in "▁abcdefghijklmnopqrstuvwxyzé":
        vocab[c] = len(vocab)
    vocab["▁h"] = len(vocab)
    vocab["▁he"] = len(vocab)
    tok = tokenizers.Tokenizer(
        models.BPE(vocab=vocab, merges=[("▁", "h"), ("▁h", "e")], byte_fallback=True, unk_token="<unk>")
    )
    tok.add_special_tokens([AddedToken("<unk>", special=True), AddedToken("</s>", special=True)])
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.save(str(path))
    return path


def test_window_stream_on_a_byte_fallback_tokenizer(tmp_path: Path) -> None:
    tok = load_tokenizer(write_sentencepiece_like(tmp_path / "tokenizer.json"), 1000)
    assert isinstance(tok, HFTokenizer) and not tok.byte_level
    assert tok.eos_id == 1
    text = "hello 😀 wörld é"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert_streams_whole(tok, ids, text)
    with pytest.raises(TokenizerError):
        tok.token_bytes(5)


# ---- WorldTokenizer


@pytest.fixture(scope="module")
def world() -> WorldTokenizer:
    if not WORLD_TXT.is_file():
        pytest.skip(f"{WORLD_TXT} not found")
    return WorldTokenizer(WORLD_TXT)


def test_world_vocabulary(world: WorldTokenizer) -> None:
    assert world.vocab_size == 65536
    assert world.eos_id == 0
    assert world.decode([0]) == ""


@pytest.mark.parametrize("text", TEXTS)
def test_world_round_trip_and_stream(world: WorldTokenizer, text: str) -> None:
    ids = world.encode(text)
    assert world.decode(ids) == text
    assert_streams_whole(world, ids, text)


def test_world_encoding_is_greedy_longest_match(world: WorldTokenizer) -> None:
    data = "The quick brown fox 中文 😀\n\n    def f():".encode("utf-8")
    ids = world.encode(data.decode("utf-8"))
    i = 0
    for token_id in ids:
        token = world.token_bytes(token_id)
        assert data.startswith(token, i)
        # No longer token matches at this position.
        longer = [t for t in world._table if len(t) > len(token) and data.startswith(t, i)]
        assert longer == []
        i += len(token)
    assert i == len(data)


def test_world_round_trips_10kb(world: WorldTokenizer) -> None:
    # (speed is measured, not asserted: about 3 ms for this text when written)
    text = ("Héllo wörld 😀 中文 naïve café — “quotes”\n\ndef f(x):\n    return x ** 2\n" * 200)[:10_000]
    assert world.decode(world.encode(text)) == text


def test_world_table_matches_literal_eval_on_every_line(world: WorldTokenizer) -> None:
    # Loading skips ast.literal_eval for plain quoted literals; the table must be the same.
    import ast

    with open(WORLD_TXT, encoding="utf-8") as f:
        for line in f:
            first, last = line.find(" "), line.rstrip("\n").rfind(" ")
            token_id, value = int(line[:first]), ast.literal_eval(line[first + 1 : last])
            assert world._table[token_id] == (value.encode("utf-8") if isinstance(value, str) else value)


@pytest.mark.parametrize(
    "line, token",
    [
        ("300 'ab' 2", b"ab"),
        ("300 \"it's\" 4", b"it's"),
        ("300 b'ab' 2", b"ab"),
        ("300 b\"a'b\" 3", b"a'b"),
        ("300 'a b' 3", b"a b"),
        ("300 '\\n\\n' 2", b"\n\n"),
        ("300 '\\\\x' 2", b"\\x"),
        ("300 b'\\xff\\xfe' 2", b"\xff\xfe"),
        ("300 'caf\u00e9' 5", "café".encode("utf-8")),
        ("300 '\\u00e9' 2", "é".encode("utf-8")),
    ],
)
def test_world_literals_with_and_without_escapes(tmp_path: Path, line: str, token: bytes) -> None:
    tok = WorldTokenizer(write_vocab(tmp_path / "vocab.txt", [line]))
    assert tok.token_bytes(300) == token


def write_vocab(path: Path, extra_lines: list[str]) -> Path:
    """Write a small World-format vocabulary: all 256 bytes, then extra_lines."""
    lines = [f"{b + 1} {bytes([b])!r} 1" for b in range(256)]
    path.write_text("\n".join(lines + extra_lines) + "\n", encoding="utf-8")
    return path


def test_world_greedy_on_a_small_vocabulary(tmp_path: Path) -> None:
    path = write_vocab(tmp_path / "vocab.txt", ["300 'ab' 2", "301 'abcd' 4", "302 'é' 2", "303 b'\\xf0\\x9f' 2"])
    tok = WorldTokenizer(path)
    assert tok.encode("abcd") == [301]
    # "abc" is not a token, so the longest match at 0 is "ab" even though "abcd" nearly fits.
    assert tok.encode("abce") == [300, ord("c") + 1, ord("e") + 1]
    assert tok.encode("é") == [302]
    ids = tok.encode("😀")
    assert ids[0] == 303 and tok.decode(ids) == "😀"
    assert "".join(stream_all(tok, ids)) == "😀"
    # Ids without a line decode to nothing rather than failing mid-generation.
    assert tok.decode([0, 65535]) == ""


@pytest.mark.parametrize(
    "line, match",
    [
        ("300 'abc' 2", "expected token 300 to be 2 bytes, got 3"),
        ("300 'é' 1", "expected token 300 to be 1 bytes, got 2"),
        ("300 abc 3", "expected 'ID REPR LEN'"),
        ("300 __import__('os').getcwd() 1", "expected 'ID REPR LEN'"),
        ("300 12 2", "expected 'ID REPR LEN'"),
        ("x 'ab' 2", "expected 'ID REPR LEN'"),
        ("70000 'ab' 2", "expected an id in 1..65535"),
        ("300 'a'b' 3", "expected 'ID REPR LEN'"),
        ("300 b'\u00e9' 2", "expected 'ID REPR LEN'"),
        ("300 'ab 2", "expected 'ID REPR LEN'"),
        ("5 'zz' 2", "duplicate"),
        ("300 'a' 1", "duplicate"),
    ],
)
def test_world_rejects_malformed_lines(tmp_path: Path, line: str, match: str) -> None:
    path = write_vocab(tmp_path / "vocab.txt", [line])
    with pytest.raises(TokenizerError, match=match) as info:
        WorldTokenizer(path)
    assert ":257:" in str(info.value)
    assert "\n" not in str(info.value)


# ---- load_tokenizer


def test_load_none_is_bytes_for_a_256_token_model() -> None:
    assert isinstance(load_tokenizer(None, 256), ByteTokenizer)


def test_load_none_needs_a_file_for_other_models() -> None:
    with pytest.raises(TokenizerError) as info:
        load_tokenizer(None, 50277)
    message = str(info.value)
    assert "50277" in message and "--tokenizer" in message
    assert "20B_tokenizer.json" in message and "rwkv_vocab_v20230424.txt" in message
    assert "\n" not in message


def test_load_bytes_by_name() -> None:
    assert isinstance(load_tokenizer("bytes", 256), ByteTokenizer)
    assert isinstance(load_tokenizer("bytes", 50277), ByteTokenizer)
    with pytest.raises(TokenizerError, match="has 256 tokens but the model's vocabulary has 97"):
        load_tokenizer("bytes", 97)


def test_load_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    with pytest.raises(TokenizerError, match="nope.json") as info:
        load_tokenizer(missing, 50277)
    assert "\n" not in str(info.value)


def test_load_directory(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match=re.escape(str(tmp_path))):
        load_tokenizer(tmp_path, 50277)


@pytest.mark.parametrize(
    "content",
    [
        b"\x00\x01\x02garbage\xff\xfe",
        b"hello world\n",
        b"",
        b"{ this is not json",
        b'{"version": "1.0", "model": {"type": "Nonsense"}}',
        b"[1, 2, 3]",
        b"1 'a' 1\n2 not-a-literal 1\n",
        b"1 'a' 1\n2 '\xff' 1\n",
    ],
)
def test_load_garbage_is_a_tokenizer_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "tok.json"
    path.write_bytes(content)
    with pytest.raises(TokenizerError, match="tok.json") as info:
        load_tokenizer(path, 65536)
    assert "\n" not in str(info.value)


def test_load_detects_by_content_not_extension(tmp_path: Path) -> None:
    path = write_vocab(tmp_path / "vocab.json", ["300 'ab' 2"])
    assert isinstance(load_tokenizer(str(path), 65536), WorldTokenizer)
    json_path = write_sentencepiece_like(tmp_path / "tokenizer.txt")
    assert isinstance(load_tokenizer(json_path, 65536), HFTokenizer)


def test_load_world_too_big_for_the_model(tmp_path: Path) -> None:
    path = write_vocab(tmp_path / "vocab.txt", [])
    with pytest.raises(TokenizerError, match=r"has 65536 tokens but the model's vocabulary has 50277"):
        load_tokenizer(path, 50277)


def test_load_packaged_tokenizers_by_path(neox: HFTokenizer, world: WorldTokenizer) -> None:
    assert isinstance(load_tokenizer(NEOX_JSON, 50277), HFTokenizer)
    assert isinstance(load_tokenizer(str(WORLD_TXT), 65536), WorldTokenizer)
    with pytest.raises(TokenizerError, match="has 50277 tokens but the model's vocabulary has 256"):
        load_tokenizer(NEOX_JSON, 256)


# ---- the packaged tokenizers and the automatic choice


def test_packaged_files_are_the_shared_originals() -> None:
    for name in ("20B_tokenizer.json", "rwkv_vocab_v20230424.txt"):
        original = SHARED / "tokenizers" / name
        if not original.is_file():
            pytest.skip(f"{original} not available")
        packaged = NEOX_JSON if name.endswith(".json") else WORLD_TXT
        assert packaged.name == name and packaged.read_bytes() == original.read_bytes()


def test_packaged_licence_note_sits_beside_them() -> None:
    note = (NEOX_JSON.parent / "README.md").read_text(encoding="utf-8")
    assert "Apache-2.0" in note and "20B_tokenizer.json" in note and "rwkv_vocab_v20230424.txt" in note


def test_package_data_ships_every_tokenizer_file() -> None:
    # pip install . copies only what package-data names; a file missing here works from the
    # source tree and fails after installation.
    import fnmatch

    tomllib = pytest.importorskip("tomllib")
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    patterns = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["package-data"]["rwkvx"]
    folder = NEOX_JSON.parent
    files = sorted(p.name for p in folder.iterdir())
    assert files == ["20B_tokenizer.json", "README.md", "rwkv_vocab_v20230424.txt"]
    for name in files:
        assert any(fnmatch.fnmatch(f"{folder.name}/{name}", pattern) for pattern in patterns), name


@pytest.mark.parametrize("name, kind, n_vocab", [("20b", HFTokenizer, 50277), ("WORLD", WorldTokenizer, 65536)])
def test_load_packaged_tokenizers_by_name(name: str, kind: type, n_vocab: int) -> None:
    tok = load_tokenizer(name, n_vocab)
    assert isinstance(tok, kind) and tok.path in PACKAGED.values()


def test_packaged_name_still_checks_the_vocabulary() -> None:
    with pytest.raises(TokenizerError, match="has 50277 tokens but the model's vocabulary has 256"):
        load_tokenizer("20B", 256)


@pytest.mark.parametrize("n_vocab, expected", [(256, None), (50277, PACKAGED["20B"]), (65536, PACKAGED["world"])])
def test_default_by_vocabulary_size(n_vocab: int, expected: str | None) -> None:
    assert default_tokenizer(None, n_vocab) == expected


@pytest.mark.parametrize("n_vocab", [97, 257, 50304, 65535, 100000])
def test_default_for_an_unknown_vocabulary_names_the_flag(tmp_path: Path, n_vocab: int) -> None:
    with pytest.raises(TokenizerError) as info:
        default_tokenizer(tmp_path / "model.safetensors", n_vocab)
    message = str(info.value)
    assert f"vocabulary of {n_vocab} tokens" in message and "--tokenizer" in message and "\n" not in message


def test_a_tokenizer_beside_the_model_wins(tmp_path: Path) -> None:
    beside = write_sentencepiece_like(tmp_path / "tokenizer.json")
    model = tmp_path / "model.safetensors"
    for n_vocab in (256, 300, 50277, 65536):
        assert default_tokenizer(model, n_vocab) == str(beside)
    # a model folder (Hugging Face layout): the tokenizer inside it
    folder = tmp_path / "hf"
    folder.mkdir()
    inside = write_sentencepiece_like(folder / "tokenizer.json")
    assert default_tokenizer(folder, 65536) == str(inside)
    assert default_tokenizer(str(folder / "model.safetensors"), 300) == str(inside)


def test_the_demo_model_gets_bytes_whatever_the_current_folder(tmp_path: Path, monkeypatch) -> None:
    write_sentencepiece_like(tmp_path / "tokenizer.json")
    monkeypatch.chdir(tmp_path)
    assert default_tokenizer("demo", 256) is None


@pytest.mark.parametrize("n_vocab, kind", [(256, ByteTokenizer), (50277, HFTokenizer), (65536, WorldTokenizer)])
def test_the_cli_picks_the_tokenizer_by_vocabulary(tmp_path: Path, capsys, n_vocab: int, kind: type) -> None:
    from rwkvx._cli import load_model
    from rwkvx.run import build_parser, main

    path = save_random_model(tmp_path / f"v{n_vocab}.safetensors", 1, 8, n_vocab)
    model, tok, _ = load_model(build_parser().parse_args(["-m", str(path)]))
    assert model.n_vocab == n_vocab and type(tok) is kind
    assert main(["-m", str(path), "-p", "Hello, мир", "-n", "4", "--temp", "0", "-t", "1"]) == 0
    # an end-of-text token may stop a random model early
    assert re.search(r"generated [1-4] tokens", capsys.readouterr().err)


def test_the_cli_refuses_an_unknown_vocabulary_without_tokenizer(tmp_path: Path, capsys) -> None:
    from rwkvx.run import main

    path = save_random_model(tmp_path / "v300.safetensors", 1, 8, 300)
    assert main(["-m", str(path), "-p", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rwkvx: error: tokenizer: none is known for a vocabulary of 300 tokens")
    assert "--tokenizer" in err and err.count("\n") == 1
    # naming a packaged tokenizer is enough
    assert main(["-m", str(path), "-p", "x", "-n", "1", "--tokenizer", "20B"]) == 2
    assert "has 50277 tokens but the model's vocabulary has 300" in capsys.readouterr().err


MULTILINGUAL = [
    "The quick brown fox jumps over the lazy dog.",
    "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "敏捷的棕色狐狸跳过了懒狗。人工智能正在改变世界。",
    "いろはにほへと ちりぬるを わかよたれそ つねならむ",
    "다람쥐 헌 쳇바퀴에 타고파",
    "نص حكيم له سر قاطع وذو شأن عظيم مكتوب على ثوب أخضر",
    "ऋषियों को सताने वाले दुष्ट राक्षसों के राजा रावण का सर्वनाश करने वाले",
    "Ξεσκεπάζω την ψυχοφθόρα βδελυγμία",
    "Pchnąć w tę łódź jeża lub ośm skrzyń fig. Größenwahn, façade, Ærøskøbing",
    "เป็นมนุษย์สุดประเสริฐเลิศคุณค่า",
    "emoji 🦀🐍 ✓ ∑ x² ≤ ∞, tabs\tand\nnewlines\r\n",
]


@pytest.mark.parametrize("text", MULTILINGUAL)
def test_packaged_world_vocabulary_round_trips_multilingual_text(world: WorldTokenizer, text: str) -> None:
    ids = world.encode(text)
    assert world.decode(ids) == text
    assert_streams_whole(world, ids, text)
    assert all(0 < i < 65536 for i in ids)


def test_packaged_world_vocabulary_has_words_not_just_bytes(world: WorldTokenizer) -> None:
    text = "".join(MULTILINGUAL)
    # about 2.4 bytes per token on this text when written; bytes alone would be 1
    assert len(text.encode("utf-8")) / len(world.encode(text)) > 2


def test_hostile_tokenizer_files_are_one_line_errors(tmp_path):
    import json
    import os
    from rwkvx.tokenizer import load_tokenizer
    from rwkvx.errors import TokenizerError
    base = {"version": "1.0", "added_tokens": [], "model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}}
    cases = {
        # an id of 2^31: the library would allocate that many entries (or abort the process)
        "huge id": json.dumps({**base, "added_tokens": [{"id": 2**31, "content": "x", "special": True}]}),
        "float id": json.dumps({**base, "model": {"type": "BPE", "vocab": {"a": 0.5}, "merges": []}}),
        "deep": "{\"a\": " + "[" * 100000 + "]" * 100000 + "}",
        "not an object": "[1, 2]",
    }
    for name, text in cases.items():
        path = tmp_path / f"{name}.json"
        path.write_text(text)
        with pytest.raises(TokenizerError) as info:
            load_tokenizer(str(path), 50277)
        assert "\n" not in str(info.value), name
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(TokenizerError, match="FIFO"):
        load_tokenizer(str(fifo), 50277)
