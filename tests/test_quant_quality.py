"""scripts/quant_quality.py: KL against float32, top-1 agreement and loss per weight format,
and the simulated group formats it studies."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import rwkvx
from rwkvx.perplexity import perplexity

from conftest import ENGLISH, TINY_MODEL, save_random_model, shared_file

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "quant_quality.py"


@pytest.fixture(scope="module")
def qq():
    spec = importlib.util.spec_from_file_location("rwkvx_scripts_quant_quality", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny():
    return shared_file(TINY_MODEL)


# about 1 KB of English for the byte-level tiny model
TEXT = ENGLISH * 10
TOKENS = list(TEXT)


def test_float32_against_itself_is_kl_zero_and_full_agreement(qq, tiny):
    reference, again = rwkvx.load(tiny), rwkvx.load(tiny)
    reference.chunk_size = again.chunk_size = 100
    result = qq.compare(reference, again, TOKENS, count_bytes=len)
    assert result.kl_sum == 0.0 and result.top1 == 1.0
    assert result.count == len(TOKENS) - 1 and result.loss.n_bytes == len(TOKENS) - 1
    # the loss is rwkvx.perplexity's for the whole text as one chunk (its log-softmax takes
    # exp in float32, this one in float64: ~1e-8 nats apart)
    expected = perplexity(reference, TOKENS, ctx=len(TOKENS), count_bytes=len)
    assert result.loss.bits_per_byte == pytest.approx(expected.bits_per_byte, rel=1e-6)
    assert qq.compare(reference, reference, TOKENS).kl_sum == 0.0


def test_uint8_costs_a_small_kl_and_the_simulation_matches_its_kernels(qq, tiny):
    reference = rwkvx.load(tiny)
    kernel = qq.compare(reference, rwkvx.load(tiny, dtype="uint8"), TOKENS)
    # measured 4.7e-5 nats per token, agreement 0.991 on this text
    assert 1e-6 < kernel.kl_per_token < 1e-3
    assert kernel.top1 > 0.98
    # the same format dequantised in numpy and run in float32: only the order of the
    # arithmetic differs (measured 8e-6 apart, relative)
    model, sizes = qq.simulated_model(reference, qq.parse_sim_format("uint8:rowcol"))
    simulated = qq.compare(reference, model, TOKENS)
    assert simulated.kl_per_token == pytest.approx(kernel.kl_per_token, rel=1e-3)
    # and the bytes counted for it are those the uint8 load holds
    held = qq.converted_matrices(rwkvx.load(tiny, dtype="uint8").weights)
    assert sum(s.nbytes for s in sizes) == sum(m.nbytes for m in held)


@pytest.mark.parametrize("spec", ["int8:32", "int8:7", "int8:row:f32", "uint8:64", "uint8:5:f32", "uint8:row",
                                  "int4:32", "uint4:32", "uint2:row"])
@pytest.mark.parametrize("n_cols", [1, 7, 33, 100])
def test_simulated_formats_round_trip_within_half_a_step(qq, spec, n_cols):
    fmt = qq.parse_sim_format(spec)
    rng = np.random.default_rng(n_cols)
    w = (rng.standard_normal((5, n_cols)) / np.sqrt(n_cols)).astype(np.float32)
    w[2, n_cols // 2] *= 40  # an outlier: only its own group's step grows
    deq = fmt.dequantize(w)
    g = n_cols if fmt.group is None else min(fmt.group, n_cols)
    for begin in range(0, n_cols, g):
        x, y = w[:, begin:begin + g], deq[:, begin:begin + g]
        if fmt.kind == "int":
            span = np.abs(x).max(axis=1) / (2 ** (fmt.bits - 1) - 1)
        else:
            # the minimum is stored rounded down, by up to 2^-10 of itself in f16
            low = x.min(axis=1)
            span = (x.max(axis=1) - low + 2.0 ** -10 * np.abs(low)) / (2 ** fmt.bits - 1)
        # half a step, which an f16 scale makes up to 2^-10 larger, plus float32 rounding
        bound = span / 2 * (1 + 2.0 ** -10) + 1e-6 * np.abs(x).max(axis=1)
        assert (np.abs(x - y).max(axis=1) <= bound).all()
    per_group = (2 if fmt.scale == "f16" else 4) * (1 if fmt.kind == "int" else 2)
    assert fmt.nbytes(w.shape) == 5 * -(-n_cols * fmt.bits // 8) + 5 * -(-n_cols // g) * per_group


def test_simulated_head_kept_in_float(qq, tiny):
    reference = rwkvx.load(tiny)
    w = reference.weights
    for head, itemsize in (("f32", 4), ("f16", 2)):
        model, sizes = qq.simulated_model(reference, qq.parse_sim_format(f"int8:32:head={head}"))
        np.testing.assert_array_equal(model.weights.head, w.head.astype(f"float{8 * itemsize}"))
        assert not np.array_equal(model.weights.blocks[0]["att_key"], w.blocks[0]["att_key"])
        # the head's weights at its own width, every other matrix at 8.5 bits
        body = sum(m.size for m in qq.converted_matrices(w)[:-1])
        assert sum(s.nbytes for s in sizes) == body * 8.5 / 8 + w.head.size * itemsize


def test_only_some_matrices_converted(qq, tiny):
    reference = rwkvx.load(tiny)
    w = reference.weights
    model, sizes = qq.simulated_model(reference, qq.parse_sim_format("int8:32"), only=["att_output", "head"])
    for block, original in zip(model.weights.blocks, w.blocks):
        assert block["att_key"] is original["att_key"]
        assert not np.array_equal(block["att_output"], original["att_output"])
    assert not np.array_equal(model.weights.head, w.head)
    converted = sum(b["att_output"].size for b in w.blocks) + w.head.size
    total = sum(m.size for m in qq.converted_matrices(w))
    assert sum(s.nbytes for s in sizes) == converted * 8.5 / 8 + (total - converted) * 4
    # less converted, less KL
    whole, _ = qq.simulated_model(reference, qq.parse_sim_format("int8:32"))
    assert 0 < qq.compare(reference, model, TOKENS).kl_sum < qq.compare(reference, whole, TOKENS).kl_sum


def test_q4_simulated_by_rwkvx_quant(qq, tiny):
    quant = pytest.importorskip("rwkvx.quant")
    if not hasattr(quant, "quantize_q4"):
        pytest.skip("no q4 format in this rwkvx")
    reference = rwkvx.load(tiny)
    model, sizes = qq.simulated_model(reference, qq.parse_sim_format("q4"))
    w = reference.weights
    np.testing.assert_array_equal(model.weights.head, quant.quantize_q4(w.head).dequantize())
    assert sum(s.nbytes for s in sizes) == sum(quant.quantize_q4(m).nbytes for m in qq.converted_matrices(w))
    q4 = qq.compare(reference, model, TOKENS)
    u8 = qq.compare(reference, rwkvx.load(tiny, dtype="uint8"), TOKENS)
    assert q4.kl_per_token > u8.kl_per_token > 0


def test_cli_prints_one_row_per_format(qq, tiny, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_bytes(TEXT)
    assert qq.main(["-m", str(tiny), "-f", str(text), "--dtypes", "float32,uint8", "--simulate", "int8:32"]) == 0
    out = capsys.readouterr().out
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    assert [r[0].strip() for r in rows[1:]] == ["float32", "uint8", "int8 absmax g32 f16 (sim)"]
    f32, u8, q8 = ([c.strip() for c in r] for r in rows[1:])
    assert f32[1:5] == ["32.000", "0", "0", "1.0000"]
    # ggml's Q8_0 layout: a 16-bit scale per 32 weights
    assert q8[1] == "8.500" and float(q8[2]) > 0
    assert float(u8[1]) > 8 and float(u8[2]) > 0 and f"{len(TEXT) - 1} bytes" in out


def test_int8_arithmetic_is_a_format_of_its_own(qq, tiny, tmp_path, capsys):
    from rwkvx.model import ARITHMETICS
    if "int8" not in ARITHMETICS:
        pytest.skip("no int8 arithmetic in this rwkvx")
    text = tmp_path / "text.txt"
    text.write_bytes(TEXT)
    assert qq.main(["-m", str(tiny), "-f", str(text), "--dtypes", "uint8,uint8:int8"]) == 0
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| uint8")]
    assert [r[0] for r in rows] == ["uint8", "uint8, int8 arithmetic"]
    # the same weights; the int8-rounded inputs add their own error
    assert rows[0][1] == rows[1][1] and float(rows[1][2]) > float(rows[0][2]) > 0
    assert qq.main(["-m", str(tiny), "--dtypes", "float32:int8"]) == 2
    assert "arithmetic int8 needs dtype uint8" in capsys.readouterr().err


def test_a_large_vocabulary_is_scored_in_blocks_and_per_byte(qq, tmp_path, capsys):
    # 50277 tokens: the log-softmax runs on blocks of a few rows; the 20B tokenizer's tokens
    # stand for several bytes each, so KL per byte is below KL per token
    model = save_random_model(tmp_path / "neox.safetensors", 1, 32, 50277, seed=5)
    text = tmp_path / "text.txt"
    text.write_bytes(TEXT)
    assert qq.main(["-m", str(model), "-f", str(text), "--tokenizer", "20B", "--dtypes", "float32,uint8"]) == 0
    out = capsys.readouterr().out
    u8 = [c.strip() for c in out.splitlines()[-1].split("|")[1:-1]]
    assert u8[0] == "uint8"
    kl_token, kl_byte = float(u8[2]), float(u8[3])
    assert 0 < kl_byte < kl_token
    tokens = int(out.split(" tokens scored")[0].rsplit(" ", 1)[1])
    n_bytes = int(out.split(" bytes)")[0].rsplit("(", 1)[1])
    assert kl_byte == pytest.approx(kl_token * tokens / n_bytes, rel=2e-2)
    assert tokens < n_bytes < len(TEXT)


@pytest.mark.parametrize("args, message", [
    (["--dtypes", "float32,float8"], "--dtypes: 'float8' is not a dtype"),
    (["--simulate", "int9:32"], "--simulate: expected KIND:GROUP[:SCALE]"),
    (["--simulate", "int8"], "--simulate: expected KIND:GROUP[:SCALE]"),
    (["--simulate", "int8:0"], "group '0'"),
    (["--simulate", "int8:32:bf16"], "scale 'bf16'"),
    (["--simulate", "uint8:64:head=f8"], "head=f8 in 'uint8:64:head=f8'"),
    (["--simulate", "int8:rowcol"], "write uint8:rowcol"),
    (["--dtypes", "", "--simulate", ""], "nothing to measure"),
    (["-b", "0"], "expected an integer >= 1"),
    (["--simulate", "int8:32", "--matrices", "att_key,att_foo"], "--matrices: 'att_foo': expected names among"),
    (["-f", "no-such-file.txt"], "no such text file"),
])
def test_bad_arguments_are_one_line_and_exit_2(qq, tiny, args, message, capsys):
    assert qq.main(["-m", str(tiny), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("rwkvx: error: ") and message in err


def test_script_runs_standalone():
    result = subprocess.run([sys.executable, str(SCRIPT), "--dtypes", "bfloat32"], capture_output=True, text=True,
                            timeout=60, env=os.environ)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("rwkvx: error: --dtypes: 'bfloat32'") and result.stderr.count("\n") == 1
