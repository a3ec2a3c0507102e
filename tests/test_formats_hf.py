"""Hugging Face RwkvForCausalLM folders: names, shards, tied heads, bad folders, and logits against
transformers itself when it is installed (skipped otherwise)."""
import json
import re

import numpy as np
import pytest

import rwkvx
from rwkvx.errors import CheckpointError
from rwkvx.loader import describe, load_weights
from rwkvx.testing import random_tensors, write_safetensors

from test_formats_pth import write_pth

_HF_BLOCK = {
    "ln0.weight": "pre_ln.weight", "ln0.bias": "pre_ln.bias",
    "att.time_mix_k": "attention.time_mix_key", "att.time_mix_v": "attention.time_mix_value",
    "att.time_mix_r": "attention.time_mix_receptance",
    "ffn.time_mix_k": "feed_forward.time_mix_key", "ffn.time_mix_r": "feed_forward.time_mix_receptance",
}


def hf_name(key: str) -> str:
    """BlinkDL's tensor name -> transformers' (written independently of rwkvx/formats/hf.py)."""
    if key == "emb.weight":
        return "rwkv.embeddings.weight"
    if key == "head.weight":
        return key
    if key.startswith("ln_out."):
        return "rwkv." + key
    layer, rest = re.match(r"blocks\.(\d+)\.(.*)$", key).groups()
    rest = _HF_BLOCK.get(rest) or rest.replace("att.", "attention.").replace("ffn.", "feed_forward.")
    return f"rwkv.blocks.{layer}.{rest}"


def config(n_layer=2, n_embd=32, n_vocab=50, **extra):
    return {"model_type": "rwkv", "architectures": ["RwkvForCausalLM"], "vocab_size": n_vocab,
            "hidden_size": n_embd, "num_hidden_layers": n_layer, "attention_hidden_size": n_embd,
            "intermediate_size": 4 * n_embd, "rescale_every": 6, "layer_norm_epsilon": 1e-5, **extra}


def hf_folder(folder, tensors, weights="safetensors", shards=1, **extra):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config(**extra)))
    named = {hf_name(k): v for k, v in tensors.items()}
    names = list(named)
    groups = [names[i::shards] for i in range(shards)]
    ext, stem = ("safetensors", "model") if weights == "safetensors" else ("bin", "pytorch_model")
    files = [f"{stem}.{ext}"] if shards == 1 else [f"{stem}-{i + 1:05d}-of-{shards:05d}.{ext}" for i in range(shards)]
    for file, group in zip(files, groups):
        part = {n: named[n] for n in group}
        if weights == "safetensors":
            write_safetensors(folder / file, part)
        else:
            write_pth(folder / file, part, dtype="float32")
    if shards > 1:
        index = {"metadata": {}, "weight_map": {n: f for f, g in zip(files, groups) for n in g}}
        (folder / f"{stem}.{ext}.index.json").write_text(json.dumps(index))
    return folder


@pytest.fixture
def tensors():
    return random_tensors(2, 32, 50)


@pytest.fixture
def blinkdl(tmp_path, tensors):
    path = tmp_path / "blinkdl.safetensors"
    write_safetensors(path, tensors)
    return load_weights(path)


def same_weights(a, b):
    assert (a.n_layer, a.n_embd, a.n_vocab) == (b.n_layer, b.n_embd, b.n_vocab)
    for x, y in zip(a.arrays(), b.arrays()):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("weights,shards", [("safetensors", 1), ("safetensors", 3), ("bin", 1), ("bin", 2)])
def test_folder_loads_like_the_blinkdl_checkpoint(tmp_path, tensors, blinkdl, weights, shards):
    folder = hf_folder(tmp_path / "hf", tensors, weights=weights, shards=shards)
    w = load_weights(folder)
    assert w.source == "hf"
    same_weights(w, blinkdl)
    info = describe(folder)
    assert info.format == "hf" and info.n_layer == 2
    assert info.file_size == sum(f.stat().st_size for f in folder.iterdir() if f.suffix in (".safetensors", ".bin"))


def test_hf_named_file_without_its_folder(tmp_path, tensors, blinkdl):
    write_safetensors(tmp_path / "model.safetensors", {hf_name(k): v for k, v in tensors.items()})
    same_weights(load_weights(tmp_path / "model.safetensors"), blinkdl)


def test_tied_head_is_the_embedding(tmp_path, tensors):
    del tensors["head.weight"]
    folder = hf_folder(tmp_path / "hf", tensors, tie_word_embeddings=True)
    w = load_weights(folder)
    np.testing.assert_array_equal(w.head, tensors["emb.weight"])


# ---- bad folders ----

def expect_error(path, match):
    with pytest.raises(CheckpointError, match=match) as info:
        rwkvx.load(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


@pytest.mark.parametrize("model_type,match", [
    ("rwkv5", "this is an RWKV-5 checkpoint; rwkvx supports RWKV-4"),
    ("rwkv7", "this is an RWKV-7 checkpoint; rwkvx supports RWKV-4"),
    ("llama", "model_type 'llama': rwkvx runs RWKV-4 models"),
])
def test_other_architectures_are_named(tmp_path, tensors, model_type, match):
    folder = hf_folder(tmp_path / "hf", tensors, model_type=model_type)
    expect_error(folder, match)


def test_folder_without_weights(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config()))
    expect_error(tmp_path / "hf", "no weights: expected one of model.safetensors")


def test_shard_listed_but_missing(tmp_path, tensors):
    folder = hf_folder(tmp_path / "hf", tensors, shards=2)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors: no such file"):
        rwkvx.load(folder)


def test_broken_config(tmp_path, tensors):
    folder = hf_folder(tmp_path / "hf", tensors)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: cannot read JSON"):
        rwkvx.load(folder)


def test_unequal_attention_size(tmp_path, tensors):
    folder = hf_folder(tmp_path / "hf", tensors, attention_hidden_size=16)
    expect_error(folder, "attention_hidden_size 16 differs from hidden_size 32")


# ---- against transformers ----

@pytest.mark.parametrize("rescale_every,tie", [(0, False), (2, False), (0, True)])
def test_logits_match_transformers(tmp_path, rescale_every, tie):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.RwkvConfig(vocab_size=97, hidden_size=64, num_hidden_layers=4, intermediate_size=256,
                                  rescale_every=rescale_every, context_length=64, tie_word_embeddings=tie)
    model = transformers.RwkvForCausalLM(cfg)
    # trained-looking values (transformers' init leaves some tensors constant)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, value in model.state_dict().items():
            if "time_decay" in name:
                value.copy_(torch.rand(value.shape, generator=g) * 7 - 6)
            elif "time_mix" in name:
                value.copy_(torch.rand(value.shape, generator=g))
            elif "time_first" in name:
                value.copy_(torch.rand(value.shape, generator=g) * 2 - 2.2)
            elif value.ndim == 2:
                value.copy_(torch.randn(value.shape, generator=g) / (1 if "embeddings" in name else 8))
            else:
                value.copy_(torch.randn(value.shape, generator=g) * 0.1 + (1 if name.endswith("weight") else 0))
    model.save_pretrained(tmp_path / "hf")
    # the same weights as a pytorch_model.bin (a torch.save zip), saved before transformers
    # rescales them in place for inference
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_bytes((tmp_path / "hf" / "config.json").read_bytes())
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")

    tokens = [1, 5, 9, 20, 50, 96, 3, 3, 7]
    model.eval()
    with torch.no_grad():
        expected = model(torch.tensor([tokens])).logits[0, -1].numpy()
    logits, _ = rwkvx.load(tmp_path / "hf").forward(tokens)
    # Rescaling divides activations by up to 2**(n_layer // rescale_every), and LayerNorm's eps
    # then weighs more: max |diff| / max |logit| measured once is 4.9e-7 without (float32
    # rounding), 1.6e-5 with it; budgets are about twice those
    budget = 1e-6 if rescale_every == 0 else 3e-5
    assert np.abs(logits - expected).max() <= budget * np.abs(expected).max()
    assert logits.argmax() == expected.argmax()
    bin_logits, _ = rwkvx.load(tmp_path / "bin").forward(tokens)
    np.testing.assert_array_equal(bin_logits, logits)
