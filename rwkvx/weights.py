"""The in-memory layout of an RWKV-4 model's weights, independent of file format.

Loaders fill a ModelWeights; the model and the reference read it. Names follow
rwkv.cpp's naming of BlinkDL's tensors (``blocks.3.att.key.weight`` is
``blocks[3]["att_key"]``). Load-time transforms are already applied: ``time_*`` vectors
are squeezed to (n_embd,), and ``att_time_decay`` holds ``-exp(time_decay)``, the
per-channel log-decay that the recurrence adds.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Optional, Union

import numpy as np

from rwkvx.quant import Q4Matrix, QuantizedMatrix

# (n_embd,) float32 per layer
VECTOR_NAMES = (
    "ln1_weight", "ln1_bias", "ln2_weight", "ln2_bias",
    "att_time_mix_k", "att_time_mix_v", "att_time_mix_r", "att_time_first", "att_time_decay",
    "ffn_time_mix_k", "ffn_time_mix_r",
)
# (n_embd, n_embd) except ffn_key (n_ffn, n_embd) and ffn_value (n_embd, n_ffn)
MATRIX_NAMES = (
    "att_key", "att_value", "att_receptance", "att_output",
    "ffn_key", "ffn_receptance", "ffn_value",
)

# A weight matrix: float32, float16, bfloat16 (stored as uint16 bit patterns: numpy has no
# bfloat16), uint8 (QuantizedMatrix) or q4 (Q4Matrix).
Matrix = Union[np.ndarray, QuantizedMatrix, Q4Matrix]

# The weight dtypes each arithmetic other than float32 computes with (load's `arithmetic`)
ARITHMETIC_DTYPES = {"int8": ("uint8", "q4"), "bfloat16": ("bfloat16",)}


def head_arithmetic(arithmetic: str, dtype: str) -> str:
    """The head's arithmetic in a model of `dtype`. A q4 model's head is uint8 and stays
    float32 with int8 arithmetic: the q4 products take int8 for one token too, and a uint8
    one does not, so only thus does a sequence give the same bits alone and in a batch."""
    return "float32" if dtype == "q4" else arithmetic


def linear(m: Matrix, arithmetic: str = "float32"):
    """A kernel-ready matrix from a float32, bfloat16 (uint16), float16, uint8 or q4 one,
    computing in `arithmetic` if that applies to its dtype (ARITHMETIC_DTYPES): with
    arithmetic "int8" or "bfloat16", the float32 low-rank matrices of RWKV-6/7 stay float32.
    Returns an rwkvx.kernels._matvec.Linear (imported here: the readers and the reference
    that use this module's layout do not need the compiled kernels)."""
    from rwkvx.kernels._matvec import Linear
    if isinstance(m, QuantizedMatrix):
        lin = Linear.u8(m.q, m.mx, m.rx, m.my, m.ry)
    elif isinstance(m, Q4Matrix):
        lin = Linear.q4(m.q4, m.sd, m.sm, m.D, m.M, m.n_cols)
    elif m.dtype == np.uint16:
        lin = Linear.bf16(m)
    elif m.dtype == np.float16:
        lin = Linear.f16(m)
    else:
        lin = Linear.f32(np.ascontiguousarray(m, dtype=np.float32))
    return lin.with_arithmetic(arithmetic) if lin.dtype in ARITHMETIC_DTYPES.get(arithmetic, ()) else lin


def to_bfloat16(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest, ties to even."""
    f = np.ascontiguousarray(a, dtype=np.float32)
    bits = f.view(np.uint32)
    rounded = bits + (np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1)))
    # NaN must stay NaN: rounding could carry its mantissa into the exponent
    rounded = np.where(np.isnan(f), bits | np.uint32(0x00400000), rounded)
    return (rounded >> 16).astype(np.uint16)


def widen(a: np.ndarray, out: Optional[np.ndarray] = None) -> np.ndarray:
    """float32 from a float16, float64 or bfloat16 (uint16) array, into `out` if given."""
    if out is None:
        out = np.empty(a.shape, dtype=np.float32)
    if a.dtype == np.uint16:
        # bfloat16 is the top half of a float32: widening is exact
        np.left_shift(a, 16, out=out.view(np.uint32), dtype=np.uint32)
    else:
        out[...] = a
    return out


def to_float32(a: np.ndarray) -> np.ndarray:
    """The array itself if float32, else a float32 copy of a float16 or bfloat16 (uint16) one."""
    return a if a.dtype == np.float32 else widen(a)

# State rows per layer, the order of ChatRWKV's state[5 * i + k]
FFN_XX, ATT_XX, ATT_AA, ATT_BB, ATT_PP = range(5)
# pp starts at "minus infinity" (ChatRWKV's -1e30: finite, so pp - p never makes NaN)
PP_INIT = -1e30


def held_arrays(weights) -> list:
    """Every array a model's weights hold (emb, ln0/ln_out vectors, head, each block's
    values), once each; a quantised matrix contributes its parts. Any architecture."""
    def parts(m):
        if isinstance(m, QuantizedMatrix):
            return [m.q, m.mx, m.rx, m.my, m.ry]
        if isinstance(m, Q4Matrix):
            return [m.q4, m.sd, m.sm, m.D, m.M]
        return [m]
    out = [weights.emb, weights.ln0_weight, weights.ln0_bias, weights.ln_out_weight, weights.ln_out_bias]
    out += parts(weights.head)
    for block in weights.blocks:
        for value in block.values():
            out += parts(value)
    return out


@dataclass
class ModelWeights:
    """emb (n_vocab, n_embd) float32, float16 or bfloat16 (as stored: a row is widened to
    float32 when looked up); ln0/ln_out vectors (n_embd,) float32; head (n_vocab, n_embd)."""

    emb: np.ndarray
    ln0_weight: np.ndarray
    ln0_bias: np.ndarray
    blocks: list[dict[str, Matrix]]
    ln_out_weight: np.ndarray
    ln_out_bias: np.ndarray
    head: Matrix
    dtype: str = "float32"
    source: str = ""
    info: dict = field(default_factory=dict)

    @property
    def n_layer(self) -> int:
        return len(self.blocks)

    @property
    def n_vocab(self) -> int:
        return self.emb.shape[0]

    @property
    def n_embd(self) -> int:
        return self.emb.shape[1]

    @property
    def n_ffn(self) -> int:
        return self.blocks[0]["ffn_key"].shape[0]

    def arrays(self):
        """Every array held, once each (quantised matrices contribute their parts)."""
        return held_arrays(self)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays())

    def fingerprint(self) -> str:
        """A short hash that tells checkpoints apart, the same for every dtype of one checkpoint.

        It hashes the shapes and the float32 vectors (layer norms, mixes, decays), which every
        dtype keeps exactly as loaded; the matrices, which uint8 and the half formats round,
        are left out. About 1 ms for a 430M model.
        """
        vectors = [block[name] for block in self.blocks for name in VECTOR_NAMES]
        return self._hash_float32(f"{self.n_layer},{self.n_embd},{self.n_vocab},{self.n_ffn}", vectors)

    def _hash_float32(self, header: str, block_tensors: list) -> str:
        """blake2b of header, the ln0/ln_out vectors and block_tensors, all as float32."""
        h = hashlib.blake2b(digest_size=12)
        h.update(header.encode())
        for v in [self.ln0_weight, self.ln0_bias, self.ln_out_weight, self.ln_out_bias, *block_tensors]:
            h.update(np.ascontiguousarray(v, dtype=np.float32).tobytes())
        return h.hexdigest()

    @property
    def bytes_per_token(self) -> int:
        """Weight bytes one decoded token reads: all but the unused embedding rows."""
        return self.nbytes - self.emb.nbytes + self.emb.itemsize * self.n_embd


def new_state(n_layer: int, n_embd: int, dtype=np.float32) -> np.ndarray:
    """A fresh state (n_layer, 5, n_embd): zeros, with pp at PP_INIT."""
    state = np.zeros((n_layer, 5, n_embd), dtype=dtype)
    state[:, ATT_PP, :] = PP_INIT
    return state
