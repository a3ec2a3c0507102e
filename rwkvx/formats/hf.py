"""Hugging Face RWKV-4 models (transformers' RwkvForCausalLM): a folder, or its weight files.

A folder holds config.json and the weights as model.safetensors, shards listed by
model.safetensors.index.json, pytorch_model.bin, or shards listed by
pytorch_model.bin.index.json. Tensor names differ from BlinkDL's only in spelling
(rwkv.blocks.N.attention.time_mix_key is blocks.N.att.time_mix_k, and so on) and are
translated here, so everything after this module sees BlinkDL's names.

transformers stores the weights exactly as trained. In inference mode it divides each
block's attention.output and feed_forward.value weights by 2**(block // rescale_every)
and halves the hidden state after every rescale_every blocks, to keep float16
activations in range. The two cancel (every block's input passes through a LayerNorm,
which ignores scale), so rwkvx runs the stored weights unchanged; logits agree with
transformers' to the precision of LayerNorm's epsilon.
"""
from __future__ import annotations

import os
import re
from typing import Callable

from rwkvx.formats.tensorfile import MAX_TENSORS, TensorSource, describe, fail, printable, read_regular

# config.json and a shard index are a few KB; a 10 GB "config.json" is not read into memory
_MAX_JSON = 16 << 20

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")

# transformers' name (after an optional "rwkv." prefix) -> BlinkDL's
_RENAMES = (
    (re.compile(r"^embeddings\.weight$"), "emb.weight"),
    (re.compile(r"^blocks\.(\d+)\.pre_ln\.(weight|bias)$"), r"blocks.\1.ln0.\2"),
    (re.compile(r"^blocks\.(\d+)\.attention\.time_mix_key$"), r"blocks.\1.att.time_mix_k"),
    (re.compile(r"^blocks\.(\d+)\.attention\.time_mix_value$"), r"blocks.\1.att.time_mix_v"),
    (re.compile(r"^blocks\.(\d+)\.attention\.time_mix_receptance$"), r"blocks.\1.att.time_mix_r"),
    (re.compile(r"^blocks\.(\d+)\.attention\.(time_decay|time_first)$"), r"blocks.\1.att.\2"),
    (re.compile(r"^blocks\.(\d+)\.attention\.(key|value|receptance|output)\.weight$"), r"blocks.\1.att.\2.weight"),
    (re.compile(r"^blocks\.(\d+)\.feed_forward\.time_mix_key$"), r"blocks.\1.ffn.time_mix_k"),
    (re.compile(r"^blocks\.(\d+)\.feed_forward\.time_mix_receptance$"), r"blocks.\1.ffn.time_mix_r"),
    (re.compile(r"^blocks\.(\d+)\.feed_forward\.(key|receptance|value)\.weight$"), r"blocks.\1.ffn.\2.weight"),
)
_HF_MARKERS = re.compile(r"(^|\.)(embeddings\.weight|attention\.time_mix_key|feed_forward\.key\.weight)$")


def normalise_names(source: TensorSource) -> None:
    """Rename transformers' tensor names to BlinkDL's, in place, if the source uses them."""
    if not any(_HF_MARKERS.search(name) for name in source.tensors):
        return
    renamed = {}
    for name, tensor in source.tensors.items():
        new = name[len("rwkv."):] if name.startswith("rwkv.") else name
        for pattern, replacement in _RENAMES:
            if pattern.match(new):
                new = pattern.sub(replacement, new)
                break
        if new in renamed:
            raise fail(source.path, f"tensors {printable(name, 120)} and another both mean {printable(new, 120)}")
        renamed[new] = tensor
    source.tensors = renamed


def _read_json(folder: str, name: str) -> dict:
    from rwkvx.formats.safetensors_io import load_json
    path = os.path.join(folder, name)
    value = load_json(path, read_regular(path, _MAX_JSON, "JSON file"), "cannot read JSON")
    if not isinstance(value, dict):
        raise fail(path, "is not a JSON object")
    return value


def check_config(folder: str, config: dict) -> None:
    """Refuse configs of other architectures, naming what they are."""
    model_type = config.get("model_type", "")
    later = re.fullmatch(r"rwkv[-_]?([5-9])", model_type) if isinstance(model_type, str) else None
    if later:
        raise fail(folder, f"this is an RWKV-{later.group(1)} checkpoint; rwkvx supports RWKV-4")
    if model_type != "rwkv":
        raise fail(folder, f"config.json says model_type {describe(model_type)}: rwkvx runs RWKV-4 models "
                           "(model_type 'rwkv')")
    hidden, attention = config.get("hidden_size"), config.get("attention_hidden_size")
    if attention is not None and attention != hidden:
        raise fail(folder, f"config.json: attention_hidden_size {describe(attention)} differs from hidden_size "
                           f"{describe(hidden)}; rwkvx supports RWKV-4 with equal sizes")


def open_folder(folder: str, open_file: Callable[[str], TensorSource]) -> TensorSource:
    """Index a Hugging Face model folder's tensors (all shards) under BlinkDL's names."""
    # exists, not isfile: a config.json that is a FIFO or a device is refused by name when read
    if not os.path.lexists(os.path.join(folder, "config.json")):
        raise fail(folder, "is a directory without config.json: not a Hugging Face model folder "
                           "(give a checkpoint file, or a folder with config.json)")
    config = _read_json(folder, "config.json")
    check_config(folder, config)
    present = [name for name in WEIGHT_FILES if os.path.lexists(os.path.join(folder, name))]
    if not present:
        raise fail(folder, f"no weights: expected one of {', '.join(WEIGHT_FILES)}")
    chosen = present[0]
    if chosen.endswith(".index.json"):
        weight_map = _read_json(folder, chosen).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise fail(os.path.join(folder, chosen), "has no weight_map")
        if len(weight_map) > MAX_TENSORS or not all(isinstance(v, str) for v in weight_map.values()):
            raise fail(os.path.join(folder, chosen), "weight_map is not a map of tensor names to file names")
        shards = sorted(set(weight_map.values()))
    else:
        shards = [chosen]

    source = TensorSource(folder, "hf")
    source.config = config
    for shard in shards:
        if os.path.basename(shard) != shard or shard in ("", ".", ".."):
            raise fail(os.path.join(folder, chosen), f"shard {describe(shard)} is not a file name in the folder")
        part = open_file(os.path.join(folder, shard))
        source.files += part.files
        for name, tensor in part.tensors.items():
            if name in source.tensors:
                raise fail(folder, f"tensor {printable(name, 120)} appears in more than one shard")
            source.tensors[name] = tensor
    normalise_names(source)
    if "head.weight" not in source.tensors and config.get("tie_word_embeddings") and "emb.weight" in source.tensors:
        # tied weights: the output head is the embedding matrix
        source.tensors["head.weight"] = source.tensors["emb.weight"]
    return source
