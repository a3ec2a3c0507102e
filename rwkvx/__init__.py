"""rwkvx: fast CPU inference for RWKV-4, 5.2, 6 and 7 language models."""
import os as _os

# How OpenMP threads wait at the kernels' barriers. libgomp's default spins 300,000 pauses
# (about 11 ms on an AMD Zen 4 core, 37 ns a pause) before sleeping: a thread left
# waiting for one that another program has descheduled holds its core all that time, and
# idle threads burn CPU for 11 ms after each call. 10,000 pauses (~0.4 ms there) still
# cover every wait inside a token, so an idle machine decodes as fast; longer waits sleep.
# (Measured on the 430M shape, uint8, 2 cores, one busy process: _parallel.pyx's governor
# then drops to one thread; alone, 1,000 pauses cost 7% and passive waiting 50%, since a
# sleeping thread takes tens of microseconds to wake in a VM.) libgomp reads its
# environment once, when it is loaded (by the extensions, just below), so the variable is
# set only for that moment, only when the user set neither it nor OMP_WAIT_POLICY, and
# only if no other library loaded libgomp first (its settings are fixed then).
_SPIN_COUNT = "10000"


def _libgomp_loaded() -> bool:
    try:
        with open("/proc/self/maps") as f:
            return "libgomp" in f.read()
    except OSError:
        return False


if "GOMP_SPINCOUNT" in _os.environ or "OMP_WAIT_POLICY" in _os.environ:
    _wait_note = ", ".join(f"{k}={_os.environ[k]}" for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
                           if k in _os.environ) + " (set by you)"
    _tuned = False
elif _libgomp_loaded():
    _wait_note = "OpenMP's own (libgomp was loaded before rwkvx)"
    _tuned = False
else:
    _wait_note = f"spin {_SPIN_COUNT} pauses, then sleep (rwkvx's GOMP_SPINCOUNT)"
    _tuned = True
    _os.environ["GOMP_SPINCOUNT"] = _SPIN_COUNT
try:
    from rwkvx.kernels import _layer, _matvec, _parallel  # noqa: F401
except ImportError as e:  # pragma: no cover - only without a build
    raise ImportError(
        "rwkvx's compiled extensions are missing or broken "
        f"({e}). Install the package with `pip install .` from the source tree "
        "(it needs a C compiler), or run `python setup.py build_ext --inplace` for development."
    ) from e
finally:
    # programs this process starts get the environment the user gave it
    if _tuned:
        del _os.environ["GOMP_SPINCOUNT"]
_parallel._record_wait_policy(_wait_note)
del _libgomp_loaded, _tuned, _wait_note

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
