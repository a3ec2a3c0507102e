"""The demo model packaged with rwkvx: it loads, runs from the CLI with no arguments, and
quantises well. The held-out text is rebuilt from this Python's own documentation."""
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import rwkvx
from rwkvx import demo
from rwkvx.run import main

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def demo_corpus():
    spec = importlib.util.spec_from_file_location("rwkvx_demo_corpus", SCRIPTS / "demo_corpus.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def heldout() -> bytes:
    # 4 KB of documents the model never saw in training
    return demo_corpus().build_corpus().heldout[:4096]


def mean_nll(model, data: bytes) -> float:
    """Mean negative log-likelihood (nats per byte) of data[1:] given the bytes before."""
    logits, _ = model.forward(list(data[:-1]), all_logits=True)
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    log_probs = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(len(data) - 1), list(data[1:])].mean())


def test_demo_loads_by_name():
    model = rwkvx.load("demo")
    assert (model.n_layer, model.n_embd, model.n_vocab) == (4, 192, 256)
    # stored bfloat16: loading as bfloat16 maps the packaged file without a copy
    mapped = demo.demo_model()
    assert mapped.dtype == "bfloat16" and not mapped.weights.head.flags.owndata
    assert demo.CARD.is_file()


def test_heldout_quality_per_dtype(heldout):
    losses = {dtype: mean_nll(demo.demo_model(dtype=dtype), heldout)
              for dtype in ("float32", "bfloat16", "uint8")}
    # the packaged weights are bfloat16, so the float32 run computes the same function
    assert losses["bfloat16"] == losses["float32"]
    # the demo learnt something: far below the 8 bits per byte of a uniform guess
    assert losses["float32"] / math.log(2) < 3.0
    assert abs(losses["uint8"] - losses["float32"]) <= 0.02 * losses["float32"]


def test_info_and_convert_know_the_demo_name(capsys, tmp_path):
    assert main(["--info", "-m", "demo"]) == 0
    assert "4 layers, n_embd 192" in capsys.readouterr().out
    from rwkvx.convert import main as convert_main
    assert convert_main(["demo", str(tmp_path / "d.safetensors"), "--dtype", "uint8"]) == 0
    assert rwkvx.load(tmp_path / "d.safetensors", dtype="uint8").n_layer == 4


def test_greedy_generation_is_deterministic(capsys):
    outs = []
    for _ in range(2):
        assert main(["-m", "demo", "-p", "The list ", "-n", "40", "--temp", "0"]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and len(outs[0]) > 10


def test_cli_runs_the_demo_with_no_arguments():
    result = subprocess.run([sys.executable, "-m", "rwkvx.run", "-n", "30", "-s", "1"],
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120,
                            cwd=os.path.dirname(__file__))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(demo.DEFAULT_PROMPT) and len(result.stdout) > len(demo.DEFAULT_PROMPT)
    assert "demo model" in result.stderr and "-m " in result.stderr


def test_split_holds_out_five_percent_by_document():
    corpus = demo_corpus()
    documents = [(f"doc{i}", "x" * (100 + 37 * i)) for i in range(60)]
    train, held = corpus.split_documents(documents)
    assert set(train).isdisjoint(held)
    assert sorted(train + held) == sorted(name for name, _ in documents)
    sizes = dict(documents)
    held_bytes = sum(len(sizes[n]) for n in held)
    total = sum(len(t) for _, t in documents)
    assert 0.05 * total <= held_bytes < 0.05 * total + max(len(t) for _, t in documents)
    assert corpus.split_documents(list(reversed(documents)))[1] == list(reversed(held))
