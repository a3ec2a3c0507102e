"""rwkvx: fast CPU inference for RWKV-4 language models."""
try:
    from rwkvx import _layer, _matvec, _parallel  # noqa: F401
except ImportError as e:  # pragma: no cover - only without a build
    raise ImportError(
        "rwkvx's compiled extensions are missing or broken "
        f"({e}). Install the package with `pip install .` from the source tree "
        "(it needs a C compiler), or run `python setup.py build_ext --inplace` for development."
    ) from e

from rwkvx.errors import CheckpointError, RwkvxError, TokenizerError
from rwkvx.generate import TextStream, generate
from rwkvx.model import RWKV, load
from rwkvx.sampling import Sampler
from rwkvx.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, WorldTokenizer, load_tokenizer

__version__ = "0.1.0"

__all__ = [
    "RWKV", "load", "generate", "TextStream", "Sampler",
    "Tokenizer", "ByteTokenizer", "HFTokenizer", "WorldTokenizer", "load_tokenizer",
    "RwkvxError", "CheckpointError", "TokenizerError", "__version__",
]
