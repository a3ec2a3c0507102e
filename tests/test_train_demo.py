"""scripts/train_demo.py trains the model rwkvx runs: same logits, and its chunked WKV is the recurrence.

Runs where PyTorch and safetensors are installed (the training extra) and skips otherwise.
"""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

import rwkvx  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_demo.py"
TEXT = b"def f(x):\n    return x  # ok"


@pytest.fixture(scope="module")
def td():
    """scripts/train_demo.py as a module (registered first: dataclasses look the module up)."""
    name = "rwkvx_scripts_train_demo"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models run fastest on one thread; restore torch's setting afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _random_model(td, n_layer=2, n_embd=32, chunk=4, seed=0):
    """A training model with every tensor random, so no zero-initialised matrix hides a mistake."""
    torch.manual_seed(seed)
    model = td.RWKV4(td.ModelConfig(n_layer=n_layer, n_embd=n_embd, chunk=chunk))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))
            elif name.endswith("time_decay"):
                # fast (e^-e^1) to slow (e^-e^-6) channels, like a trained model
                p.copy_(torch.rand(p.shape, generator=gen) * 7 - 6)
            elif name.endswith("time_first"):
                p.copy_(torch.rand(p.shape, generator=gen) * 2 - 1 + math.log(0.3))
            elif "time_mix" in name:
                p.copy_(torch.rand(p.shape, generator=gen))
            elif name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _wkv_inputs(dtype, n_batch=2, n_time=37, n_chan=8, k_scale=3.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    decay = (torch.rand(n_chan, generator=gen, dtype=dtype) * 9 - 6).requires_grad_()
    first = torch.randn(n_chan, generator=gen, dtype=dtype).requires_grad_()
    k = (k_scale * torch.randn(n_batch, n_time, n_chan, generator=gen, dtype=dtype)).requires_grad_()
    v = torch.randn(n_batch, n_time, n_chan, generator=gen, dtype=dtype).requires_grad_()
    return decay, first, k, v


@pytest.mark.parametrize("chunk", [1, 3, 4, 16, 64])
def test_wkv_chunked_matches_sequential(td, chunk):
    # float64, T=37 (not a multiple of most chunks), decays from e^-e^3 to e^-e^-6
    inputs = _wkv_inputs(torch.float64)
    chunked = td.wkv_chunked(*inputs, chunk=chunk)
    sequential = td.wkv_sequential(*inputs)
    np.testing.assert_allclose(chunked.detach().numpy(), sequential.detach().numpy(), rtol=1e-12, atol=1e-12)
    weights = torch.randn(sequential.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads_chunked = torch.autograd.grad((chunked * weights).sum(), inputs)
    grads_sequential = torch.autograd.grad((sequential * weights).sum(), inputs)
    for name, a, b in zip(("time_decay", "time_first", "k", "v"), grads_chunked, grads_sequential):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-10, atol=1e-10, err_msg=name)


def test_wkv_chunked_is_stable_for_large_keys_float32(td):
    # k up to ~100 would overflow e^k in float32 without the max trick
    inputs = _wkv_inputs(torch.float32, k_scale=40.0)
    chunked = td.wkv_chunked(*inputs, chunk=8)
    reference = td.wkv_sequential(*(t.detach().double() for t in inputs))
    assert torch.isfinite(chunked).all()
    np.testing.assert_allclose(chunked.detach().numpy(), reference.numpy(), rtol=1e-4, atol=1e-5)
    grads = torch.autograd.grad(chunked.sum(), inputs)
    assert all(torch.isfinite(g).all() for g in grads)


def test_checkpoint_has_blinkdl_names(td, tmp_path):
    from safetensors.numpy import load_file
    model = _random_model(td)
    path = tmp_path / "demo.safetensors"
    td.save_checkpoint(model, path)
    tensors = load_file(str(path))
    expected = {"emb.weight", "blocks.0.ln0.weight", "blocks.0.ln0.bias", "ln_out.weight", "ln_out.bias",
                "head.weight"}
    for i in range(2):
        expected |= {f"blocks.{i}.{name}" for name in (
            "ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias",
            "att.time_decay", "att.time_first", "att.time_mix_k", "att.time_mix_v", "att.time_mix_r",
            "att.key.weight", "att.value.weight", "att.receptance.weight", "att.output.weight",
            "ffn.time_mix_k", "ffn.time_mix_r", "ffn.key.weight", "ffn.receptance.weight", "ffn.value.weight")}
    assert set(tensors) == expected
    assert all(t.dtype == np.float32 for t in tensors.values())
    # matrices are (out, in)
    assert tensors["blocks.1.ffn.key.weight"].shape == (128, 32)
    assert tensors["blocks.1.ffn.value.weight"].shape == (32, 128)
    assert tensors["head.weight"].shape == (256, 32)
    # time_decay is the raw parameter; the loader applies -exp once
    loaded = rwkvx.load(path, threads=1)
    raw = model.blocks[1].att.time_decay.detach().double().numpy()
    np.testing.assert_allclose(loaded.weights.blocks[1]["att_time_decay"], -np.exp(raw), rtol=1e-6)


@pytest.mark.parametrize("chunk", [4, 16])
def test_rwkvx_logits_match_training_forward(td, tmp_path, chunk):
    model = _random_model(td, chunk=chunk)
    tokens = list(TEXT)
    assert 20 <= len(tokens) <= 32
    with torch.no_grad():
        expected = model(torch.tensor([tokens]))[0].numpy()
    path = tmp_path / "demo.safetensors"
    td.save_checkpoint(model, path)
    rwkv = rwkvx.load(path, threads=1)

    # token by token: the logits after every prefix
    state = None
    scale = np.abs(expected).max()
    for t, token in enumerate(tokens):
        logits, state = rwkv.forward([token], state)
        assert logits.dtype == np.float32
        diff = np.abs(logits - expected[t]).max()
        assert diff <= 1e-5 * scale, f"position {t}: max |diff| {diff:.3g}, max |logit| {scale:.3g}"
    # the whole sequence in one call gives the last position's logits
    logits, _ = rwkv.forward(tokens)
    assert np.abs(logits - expected[-1]).max() <= 1e-5 * scale


def test_trained_model_matches_rwkvx(td, tmp_path):
    # BlinkDL's initialisation (zero matrices) moved by a few optimizer steps, as a real run does
    torch.manual_seed(3)
    model = td.RWKV4(td.ModelConfig(n_layer=2, n_embd=32, chunk=4))
    optimizer = td.make_optimizer(model, lr=2e-2, weight_decay=0.01)
    batch = torch.tensor([list(TEXT[:21])] * 2)
    losses = []
    for _ in range(6):
        logits = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), batch[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    tokens = list(TEXT)
    with torch.no_grad():
        expected = model(torch.tensor([tokens]))[0, -1].numpy()
    path = tmp_path / "trained.safetensors"
    td.save_checkpoint(model, path)
    logits, _ = rwkvx.load(path, threads=1).forward(tokens)
    assert np.abs(logits - expected).max() <= 1e-5 * np.abs(expected).max()


def test_lr_schedule_warmup_does_not_depend_on_total(td):
    # what makes a --minutes run reproducible with --steps
    for step in range(100):
        assert td.lr_at(step, None, 1e-3, 100) == td.lr_at(step, 5000, 1e-3, 100)
    assert td.lr_at(99, 1000, 1e-3, 100) == pytest.approx(1e-3)
    assert td.lr_at(1000, 1000, 1e-3, 100) == pytest.approx(1e-4)
