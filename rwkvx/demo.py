"""The small demo model that ships inside rwkvx, so it runs right after install.

A 4-layer, 192-wide RWKV-4 with a byte vocabulary, trained by scripts/train_demo.py on
text every Python installation has (the language reference topics and the standard
library's docstrings). It knows a little about Python and nothing else: it is here to
show the engine working, not to be useful. rwkvx/demo/CARD.md tells how it was made.
"""
from __future__ import annotations

from pathlib import Path

from rwkvx.errors import CheckpointError

NAME = "demo"
DIRECTORY = Path(__file__).resolve().parent / "demo"
CHECKPOINT = DIRECTORY / "rwkv4-demo-4x192-bf16.safetensors"
CARD = DIRECTORY / "CARD.md"
DEFAULT_PROMPT = "The built-in function "


def demo_path() -> Path:
    """The packaged checkpoint's path (CheckpointError if the installation lacks it)."""
    if not CHECKPOINT.is_file():
        raise CheckpointError(f"{CHECKPOINT}: the demo model is missing from this installation "
                              "(reinstall rwkvx, or pass -m with a checkpoint)")
    return CHECKPOINT


def resolve(path):
    """The path to load: the packaged demo for the name "demo" (unless such a file exists)."""
    if isinstance(path, str) and path == NAME and not Path(path).exists():
        return demo_path()
    return path


def demo_model(dtype: str = "bfloat16", threads: int | None = None):
    """Load the demo model (stored bfloat16, so that dtype maps it without a copy)."""
    from rwkvx.model import load
    return load(demo_path(), dtype=dtype, threads=threads)
