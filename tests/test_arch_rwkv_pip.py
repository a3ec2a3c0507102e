"""The float64 reference of RWKV-5.2, 6 and 7 against BlinkDL's own runtime, the `rwkv` pip
package (strategy "cpu fp32"), on random checkpoints with BlinkDL's names and layouts.

Optional: runs where torch and rwkv are installed (CI installs them). The package runs in a
subprocess because RWKV_V7_ON=1 must be set before it is imported and makes that process
v7-only. Tokens are fed one at a time (its single-token paths need no CUDA kernel), with a
copy of the state list each time (its forward overwrites the list passed in).

Tolerance: 1e-5 x max|logit| (the package computes in float32; measured about 1e-7)."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

from rwkvx.arch import recognise_path
from rwkvx.arch.common import WKV, Reference, read_weights

from arch_random import random_checkpoint

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("torch") is None or importlib.util.find_spec("rwkv") is None,
    reason="torch and rwkv (BlinkDL's runtime) are not installed")

TOKENS = [5, 17, 0, 96, 33, 33, 2, 64, 7, 81, 12, 40]

RUNNER = r"""
import sys
import numpy as np
import torch
from rwkv.model import RWKV

arrays = np.load(sys.argv[1])
torch.save({k: torch.from_numpy(arrays[k].copy()) for k in arrays.files}, sys.argv[2] + ".pth")
model = RWKV(model=sys.argv[2], strategy="cpu fp32")
state, outs = None, []
for token in [int(t) for t in sys.argv[3].split(",")]:
    logits, state = model.forward([token], None if state is None else [s.clone() for s in state])
    outs.append(logits.float().numpy())
np.savez(sys.argv[4], logits=np.stack(outs), **{f"s{i}": s.float().numpy() for i, s in enumerate(state)})
"""


def _run_package(tmp_path, version, tensors):
    np.savez(tmp_path / "w.npz", **tensors)
    env = dict(os.environ, RWKV_CUDA_ON="0", RWKV_JIT_ON="1", RWKV_V7_ON="1" if version == "v7" else "0")
    cmd = [sys.executable, "-c", RUNNER, str(tmp_path / "w.npz"), str(tmp_path / "model"),
           ",".join(map(str, TOKENS)), str(tmp_path / "out.npz")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return np.load(tmp_path / "out.npz")


@pytest.mark.parametrize("version", ["v5", "v6", "v7"])
def test_reference_matches_blinkdl_runtime(tmp_path, version):
    tensors = random_checkpoint(version, n_layer=3, n_embd=64, head_size=16)
    out = _run_package(tmp_path, version, tensors)
    # the same tensors through rwkvx's reader (safetensors, BlinkDL's names)
    from arch_random import write_safetensors
    arch, source = recognise_path(write_safetensors(tmp_path / "m.safetensors", tensors))
    ref = Reference(read_weights(source, arch))
    logits, state = ref.forward(TOKENS, all_logits=True)
    expected = out["logits"]
    err = np.abs(logits - expected).max()
    print(f"{version}: max abs diff {err:.3g}, max |logit| {np.abs(expected).max():.3g}")
    assert err <= 1e-5 * np.abs(expected).max(), f"max abs diff {err:.3g}"
    # the .pth the package read, through rwkvx's own .pth reader: the same model
    arch_pth, source_pth = recognise_path(tmp_path / "model.pth")
    assert arch_pth is arch and source_pth.format == "pth"
    assert np.array_equal(Reference(read_weights(source_pth, arch_pth)).forward(TOKENS, all_logits=True)[0], logits)
    # the package's state per layer: att_x, the (H, N, N) matrices, ffn_x (same orientation as ours)
    for layer in range(ref.n_layer):
        att_x, heads, ffn_x = (out[f"s{3 * layer + i}"] for i in range(3))
        np.testing.assert_allclose(state[layer, 1], att_x, rtol=0, atol=1e-5)
        np.testing.assert_allclose(state[layer, 0], ffn_x, rtol=0, atol=1e-5)
        ours = state[layer, WKV:].reshape(heads.shape)
        np.testing.assert_allclose(ours, heads, rtol=0, atol=1e-5 * np.abs(heads).max())


# A state-tuned start, as RWKV-Runner gives it to the package: token shifts zero, each layer's
# blocks.N.att.time_state transposed (1, 2) for RWKV-5/6 and as stored for RWKV-7
TUNED_RUNNER = r"""
import sys
import numpy as np
import torch
from rwkv.model import RWKV

arrays = np.load(sys.argv[1])
torch.save({k: torch.from_numpy(arrays[k].copy()) for k in arrays.files if "time_state" not in k}, sys.argv[2] + ".pth")
tuned = {k: torch.from_numpy(arrays[k].copy()) for k in arrays.files if "time_state" in k}
torch.save(tuned, sys.argv[2] + "-state.pth")
model = RWKV(model=sys.argv[2], strategy="cpu fp32")
state = []
for i in range(model.args.n_layer):
    heads = tuned[f"blocks.{i}.att.time_state"]
    state += [torch.zeros(model.args.n_embd), heads if sys.argv[5] == "v7" else heads.transpose(1, 2).contiguous(),
              torch.zeros(model.args.n_embd)]
outs = []
for token in [int(t) for t in sys.argv[3].split(",")]:
    logits, state = model.forward([token], [s.clone() for s in state])
    outs.append(logits.float().numpy())
np.savez(sys.argv[4], logits=np.stack(outs))
"""


@pytest.mark.parametrize("version", ["v5", "v6", "v7"])
def test_state_tuning_file_starts_as_in_blinkdl_runtime(tmp_path, version):
    import rwkvx
    tensors = random_checkpoint(version, n_layer=3, n_embd=64, head_size=16)
    rng = np.random.default_rng(1)
    tuned = {f"blocks.{i}.att.time_state": (0.5 * rng.standard_normal((4, 16, 16))).astype(np.float32)
             for i in range(3)}
    np.savez(tmp_path / "w.npz", **tensors, **tuned)
    env = dict(os.environ, RWKV_CUDA_ON="0", RWKV_JIT_ON="1", RWKV_V7_ON="1" if version == "v7" else "0")
    cmd = [sys.executable, "-c", TUNED_RUNNER, str(tmp_path / "w.npz"), str(tmp_path / "model"),
           ",".join(map(str, TOKENS)), str(tmp_path / "out.npz"), version]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    expected = np.load(tmp_path / "out.npz")["logits"]
    model = rwkvx.load(tmp_path / "model.pth", initial_state=tmp_path / "model-state.pth")
    logits, _ = model.forward(TOKENS, all_logits=True)
    err = np.abs(logits - expected).max()
    print(f"{version}: max abs diff {err:.3g}, max |logit| {np.abs(expected).max():.3g}")
    assert err <= 1e-5 * np.abs(expected).max(), f"max abs diff {err:.3g}"
    # and the start matters: from zeros the logits are others
    assert np.abs(rwkvx.load(tmp_path / "model.pth").forward(TOKENS, all_logits=True)[0] - expected).max() > 100 * err


@pytest.mark.parametrize("version", ["v5", "v6"])
def test_state_tuned_checkpoint_runs_as_in_blinkdl_runtime(tmp_path, version):
    # the time_state tensors inside the model file: the package starts from them when given
    # no state (its RWKV-7 class does not read them; RWKV-Runner's does, as the test above)
    import rwkvx
    tensors = random_checkpoint(version, n_layer=3, n_embd=64, head_size=16)
    rng = np.random.default_rng(2)
    for i in range(3):
        tensors[f"blocks.{i}.att.time_state"] = (0.5 * rng.standard_normal((4, 16, 16))).astype(np.float32)
    expected = _run_package(tmp_path, version, tensors)["logits"]
    model = rwkvx.load(tmp_path / "model.pth")
    assert model.initial_state is not None
    logits, _ = model.forward(TOKENS, all_logits=True)
    err = np.abs(logits - expected).max()
    print(f"{version}: max abs diff {err:.3g}, max |logit| {np.abs(expected).max():.3g}")
    assert err <= 1e-5 * np.abs(expected).max(), f"max abs diff {err:.3g}"
