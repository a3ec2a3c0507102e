"""What RWKV-5.2, 6 and 7 share: the state layout, the norms, reading and holding weights,
and the float64 reference model that runs any of them.

State per layer (float32, ``(2 + head_size, n_embd)``): row FFN_XX is the channel mixing's
previous input, row ATT_XX the time mixing's, and rows WKV.. hold the H per-head (N, N)
matrices of the WKV recurrence, flattened (H * N * N = N * n_embd floats): keys x values
for RWKV-5.2/6, values x keys for RWKV-7, as in BlinkDL's runtime (so its states compare
directly). A whole state is ``(n_layer, 2 + head_size, n_embd)``.

The layer math itself lives in one module per architecture (v5, v6, v7); each defines
``read_block`` (checkpoint names -> weights), ``block`` (float64 numpy, the specification),
and ``Layer`` (the float32 runtime: the shared matrix kernels, rwkvx.kernels._wkv for the
recurrence and the elementwise work around it, numpy for the rest).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from rwkvx import reference
from rwkvx.kernels._matvec import Linear
from rwkvx.hugepages import Arena
from rwkvx.loader import check_finite, matrix_format, read_embedding, read_matrix, run_nbytes, stored_as_run
from rwkvx.formats.safetensors_io import FORMAT_NAME
from rwkvx.formats.tensorfile import RUN_STORED, Tensor, TensorSource, fail
from rwkvx.weights import ModelWeights, to_float32

FFN_XX, ATT_XX, WKV = 0, 1, 2

LAYER_NORM_EPS = 1e-5
# BlinkDL's ln_x: GroupNorm(eps=1e-5) of x / head_size_divisor(8) at training, which is
# eps = 64e-5 on the undivided x (ChatRWKV's and rwkv.cpp's v6/v7 value)
GROUP_NORM_EPS = 64e-5

RUN_DTYPES = ("float32", "bfloat16", "float16", "uint8", "q4")


# ---- the math both the reference and the runtime use (any float dtype, last axis) ----

def layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + LAYER_NORM_EPS) * w + b


def group_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, n_head: int, eps: float = GROUP_NORM_EPS) -> np.ndarray:
    """Layer norm within each head's N channels, then a per-channel affine; x (..., H * N)."""
    shape = x.shape
    h = x.reshape(shape[:-1] + (n_head, shape[-1] // n_head))
    mean = h.mean(axis=-1, keepdims=True)
    var = ((h - mean) ** 2).mean(axis=-1, keepdims=True)
    return ((h - mean) / np.sqrt(var + eps)).reshape(shape) * w + b


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def silu(x: np.ndarray) -> np.ndarray:
    return x * sigmoid(x)


def new_state(n_layer: int, n_embd: int, head_size: int, dtype=np.float32) -> np.ndarray:
    """A fresh state: all zeros, (n_layer, 2 + head_size, n_embd)."""
    return np.zeros((n_layer, 2 + head_size, n_embd), dtype=dtype)


def wkv_matrices(layer_state: np.ndarray, n_head: int) -> np.ndarray:
    """The (H, N, N) view of a layer state's WKV rows (writes go to the state)."""
    n = layer_state.shape[0] - WKV
    return layer_state[WKV:].reshape(n_head, n, n)


# ---- weights ----

@dataclass
class Weights(ModelWeights):
    """A v5+ model's weights, file format undone: matrices (out, in), vectors (n_embd,),
    per-head parameters (H, N). The big matrices (arch.LINEAR) are in the run dtype; every
    other tensor (norms, mixes, decays, the low-rank matrices) is float32. Shapes, arrays()
    and byte counts are ModelWeights'."""

    arch: object = None
    head_size: int = 0
    # a state-tuned checkpoint's blocks.N.att.time_state, (n_layer, H, N, N) as stored
    time_state: Optional[np.ndarray] = None

    n_head = property(lambda self: self.n_embd // self.head_size)

    def fingerprint(self) -> str:
        """Tells checkpoints apart, the same for every run dtype: the architecture, the shapes
        and every float32 tensor that no dtype rounds (all but the big matrices)."""
        names = [sorted(name for name in block if name not in self.arch.LINEAR) for block in self.blocks]
        header = (f"{self.arch.NAME},{self.n_layer},{self.n_embd},{self.n_vocab},{self.n_ffn},{self.head_size},"
                  f"{names}")
        return self._hash_float32(header, [block[name] for block, kept in zip(self.blocks, names) for name in kept])


class Planned:
    """What a big matrix or the embedding will be (shape, stored dtype name or "uint8"),
    in place of its data: Reader(shapes_only=True) plans a file without reading weights."""

    def __init__(self, shape: tuple[int, ...], dtype: str):
        self.shape, self.dtype = tuple(shape), dtype


class Reader:
    """Reads tensors by checkpoint name in the shapes rwkvx keeps, collecting every missing or
    mis-shaped tensor so that one error names them all.

    Small tensors (vectors, per-head parameters, low-rank matrices) come out float32: views
    of the mapped file where it stores them so, else private copies. The big matrices and
    the embedding go through rwkvx.loader's read_matrix / read_embedding, as RWKV-4's do:
    views of the file where it stores the run dtype, else converted into `arena`.
    copy_mapped: nothing is a view of the file (load(mmap=False)). check: the finiteness
    check (rwkvx.loader.iter_weights): small tensors are checked unless "none".
    shapes_only: read no data (small tensors are zeros, big ones Planned), to plan a file.
    """

    def __init__(self, source: TensorSource, dtype: str = "float32", arena: Optional[Arena] = None, *,
                 copy_mapped: bool = False, check: str = "read", shapes_only: bool = False):
        self.source = source
        # rwkv.cpp's converter and rwkvx.convert store the tensors as the runtime holds
        # them: low-rank matrices (out, in), RWKV-5.2's decay as exp(-exp(raw))
        self.transformed = source.format in ("rwkv.cpp", FORMAT_NAME)
        # RWKV-6/7's low-rank matrices stored (in, out), as BlinkDL stores them and rwkvx.convert
        # now writes them (saying so in the metadata); rwkv.cpp and older rwkvx files hold (out, in)
        self.low_rank_in_out = not self.transformed or source.metadata.get("low_rank") == "in,out"
        self.dtype = dtype
        self.arena = arena if arena is not None else Arena(0)
        self.copy_mapped = copy_mapped
        self.check_mode = check
        self.shapes_only = shapes_only
        self.problems: list[str] = []
        self.used: set[str] = set()

    def has(self, key: str) -> bool:
        return key in self.source.tensors

    def values(self, key: str, size: int) -> Optional[np.ndarray]:
        """The tensor as float32 of any shape holding `size` values (None, recorded, if not)."""
        tensor = self.source.tensors.get(key)
        if tensor is None:
            self.problems.append(f"missing {key}")
            return None
        self.used.add(key)
        if int(np.prod(tensor.shape)) != size:
            self.problems.append(f"{key}: expected {size} values, got shape {list(tensor.shape)}")
            return None
        if not hasattr(tensor, "float32"):
            self.problems.append(f"{key}: stored as {tensor.dtype}, expected floating point")
            return None
        if self.shapes_only:
            return np.zeros(tensor.shape, np.float32)
        view = None
        if isinstance(tensor, Tensor) and tensor.dtype == "F32" and not self.copy_mapped:
            view = tensor.view()
        v = view if view is not None else tensor.float32()
        if self.check_mode != "none":
            # small: checked even when mapped, as stored (before any transform)
            check_finite(self.source, key, v)
        return v

    def vector(self, key: str, n: int) -> np.ndarray:
        """A (n,) vector; BlinkDL stores these (1, 1, n), converters (n,) or (n, 1)."""
        v = self.values(key, n)
        return np.zeros(n, np.float32) if v is None else np.ascontiguousarray(v.reshape(n))

    def heads(self, key: str, n_head: int, head_size: int) -> np.ndarray:
        """A per-head parameter (H, N); stored (H, N), (H, N, 1) or (1, 1, H, N)."""
        v = self.values(key, n_head * head_size)
        return np.zeros((n_head, head_size), np.float32) if v is None else v.reshape(n_head, head_size)

    def time_state(self, key: str, n_head: int, head_size: int) -> np.ndarray:
        """A layer's tuned initial WKV matrices (H, N, N), as stored (see rwkvx.states)."""
        shape = (n_head, head_size, head_size)
        tensor = self.source.tensors.get(key)
        if tensor is not None and tuple(tensor.shape) != shape:
            self.problems.append(f"{key}: expected {list(shape)}, got {list(tensor.shape)}")
            self.used.add(key)
            return np.zeros(shape, np.float32)
        v = self.values(key, n_head * head_size * head_size)
        if v is None:
            return np.zeros(shape, np.float32)
        if not self.shapes_only and not np.isfinite(v).all():
            # checked whatever check_tensors says: a start of NaN would spoil every sequence
            self.problems.append(f"{key} holds NaN or infinite values")
        return v.reshape(shape)

    def low_rank(self, key: str, shape: tuple[int, int]) -> np.ndarray:
        """A low-rank matrix in rwkvx's (out, in) orientation `shape`: a transposed view of the
        file's (in, out) where it holds that (low_rank_in_out)."""
        stored = shape[::-1] if self.low_rank_in_out else shape
        tensor = self.source.tensors.get(key)
        if tensor is not None and tuple(tensor.shape) != tuple(stored):
            self.problems.append(f"{key}: expected {list(stored)}, got {list(tensor.shape)}")
            self.used.add(key)
            return np.zeros(shape, np.float32)
        m = self.values(key, shape[0] * shape[1])
        if m is None:
            return np.zeros(shape, np.float32)
        return m.T if self.low_rank_in_out else m

    def low_rank_out(self, key: str) -> int:
        """The output side of a stored low-rank matrix's first half (in -> out): (C, D) in
        BlinkDL's files and rwkvx's, (D, C) in rwkv.cpp's; 1 where it is missing or not 2-D
        (check() reports that)."""
        t = self.source.tensors.get(key)
        if t is None or len(t.shape) != 2:
            return 1
        return t.shape[1] if self.low_rank_in_out else t.shape[0]

    def _present(self, key: str, shape: tuple[int, int]):
        """The stored tensor if it has `shape` (recorded as used), else None (the problem recorded)."""
        tensor = self.source.tensors.get(key)
        if tensor is None:
            self.problems.append(f"missing {key}")
            return None
        self.used.add(key)
        if tuple(tensor.shape) != tuple(shape):
            self.problems.append(f"{key}: expected {list(shape)}, got {list(tensor.shape)}")
            return None
        return tensor

    def big(self, key: str, shape: tuple[int, int]):
        """A big matrix (arch.LINEAR, the head) in the run dtype, as RWKV-4's loader reads its
        matrices (rwkvx.loader.read_matrix)."""
        tensor = self._present(key, shape)
        if tensor is None:
            return np.zeros(shape, np.float32)
        if self.shapes_only:
            fmt = matrix_format(self.dtype, key)
            return Planned(shape, fmt if fmt in ("uint8", "q4") else RUN_STORED[fmt])
        return read_matrix(self.source, key, tensor, self.dtype, self.arena, self.copy_mapped, self.check_mode)

    def embedding(self, key: str, shape: tuple[int, int]) -> np.ndarray:
        """The embedding as stored when float32/float16/bfloat16 (one row is widened per token)."""
        tensor = self._present(key, shape)
        if tensor is None:
            return np.zeros(shape, np.float32)
        if self.shapes_only:
            return Planned(shape, tensor.dtype if tensor.dtype in ("F32", "F16", "BF16") else "F32")
        return read_embedding(self.source, tensor, self.copy_mapped, self.check_mode)

    def check(self) -> None:
        unexpected = sorted(set(self.source.tensors) - self.used)
        problems = list(self.problems)
        if unexpected:
            problems.append(f"unexpected tensor(s): {', '.join(unexpected[:8])}"
                            + (", ..." if len(unexpected) > 8 else ""))
        if problems:
            shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
            raise fail(self.source.path, shown)


def big_keys(arch, n_layer: int) -> set[str]:
    """Checkpoint keys of the matrices that run in the model's dtype (arch.LINEAR, the head)."""
    return {f"blocks.{layer}.{stored_key(name, arch)}" for layer in range(n_layer) for name in arch.LINEAR} \
        | {"head.weight"}


def stored_key(name: str, arch) -> str:
    """The checkpoint key (after "blocks.N.") of a layer weight's rwkvx name, BlinkDL's
    spelling: att_key -> att.key.weight, att_ln_x_weight -> att.ln_x.weight, ln1_bias ->
    ln1.bias, att_time_decay -> att.time_decay. rwkvx.convert writes layers under these."""
    part, _, rest = name.partition("_")
    key = f"{part}.{rest}" if part in ("att", "ffn") else name
    for end in ("_weight", "_bias"):
        if key.endswith(end):
            key = key[:-len(end)] + "." + end[1:]
    return key + ".weight" if name in arch.LINEAR else key


def sizes(source: TensorSource, arch) -> tuple[int, int, int, int, int]:
    """(n_layer, n_embd, n_vocab, n_head, head_size) of a v5+ checkpoint, from its index."""
    emb_tensor = source.tensors.get("emb.weight")
    if emb_tensor is None or len(emb_tensor.shape) != 2:
        raise fail(source.path, f"no 2-D emb.weight: not a complete {arch.NAME} checkpoint")
    n_vocab, n_embd = emb_tensor.shape
    n_layer = len({int(k.split(".")[1]) for k in source.tensors if k.startswith("blocks.")
                   and k.split(".")[1].isdigit()})
    n_head, head_size = arch.heads(source)
    if n_head * head_size != n_embd:
        raise fail(source.path, f"{n_head} heads of {head_size} do not make n_embd {n_embd}")
    return n_layer, n_embd, n_vocab, n_head, head_size


def arena_nbytes(source: TensorSource, arch, dtype: str, n_layer: int, copy_mapped: bool = False) -> int:
    """Bytes of the block read_weights fills: the big matrices it converts (or with copy_mapped
    reads) in `dtype` (uint8: their q), and every other tensor but the embedding in float32
    (those left mapped too: pages of the block are committed only when filled), each padded
    to a cache line (a file's tensor may become several arrays: v7's packed mixes, so a few
    lines spare per tensor)."""
    big = big_keys(arch, n_layer)
    total = 0
    for key, tensor in source.tensors.items():
        if key in big:
            fmt = matrix_format(dtype, key)
            if copy_mapped or not stored_as_run(tensor, fmt):
                total += run_nbytes(tuple(tensor.shape), fmt, padded=True)
        elif key != "emb.weight":
            total += Arena.arena_nbytes(tensor.size * 4) + 8 * 64
    return total


def read_parts(reader: Reader, arch, n_layer: int, n_embd: int, n_head: int, head_size: int):
    """The model's weights in file order, a layer at a time: yields (-1, {emb, ln0_weight,
    ln0_bias}), (l, layer l's dict) for each layer, then (-1, {ln_out_weight, ln_out_bias,
    head}); reader.check() then raises if any tensor was missing, mis-shaped or unused."""
    n_vocab = reader.source.tensors["emb.weight"].shape[0]
    yield -1, {"emb": reader.embedding("emb.weight", (n_vocab, n_embd)),
               "ln0_weight": reader.vector("blocks.0.ln0.weight", n_embd),
               "ln0_bias": reader.vector("blocks.0.ln0.bias", n_embd)}
    for layer in range(n_layer):
        block = arch.read_block(reader, layer, n_embd, n_head, head_size)
        for name in ("ln1", "ln2"):
            block[f"{name}_weight"] = reader.vector(f"blocks.{layer}.{name}.weight", n_embd)
            block[f"{name}_bias"] = reader.vector(f"blocks.{layer}.{name}.bias", n_embd)
        yield layer, block
    yield -1, {"ln_out_weight": reader.vector("ln_out.weight", n_embd),
               "ln_out_bias": reader.vector("ln_out.bias", n_embd),
               "head": reader.big("head.weight", (n_vocab, n_embd))}
    # a state-tuned checkpoint (as RWKV-Runner reads them): the initial WKV matrices the
    # tuning trained, every layer's or none
    keys = [f"blocks.{layer}.att.time_state" for layer in range(n_layer)]
    if any(reader.has(key) for key in keys):
        yield -1, {"time_state": np.stack([reader.time_state(key, n_head, head_size) for key in keys])}
    reader.check()


# the file keys of the weights outside the layers
_TOP_KEYS = {"emb": "emb.weight", "ln0_weight": "blocks.0.ln0.weight", "ln0_bias": "blocks.0.ln0.bias",
             "ln_out_weight": "ln_out.weight", "ln_out_bias": "ln_out.bias", "head": "head.weight"}


def converted_tensors(source: TensorSource, arch, dtype: str, *, check: str = "all", shapes_only: bool = False):
    """What rwkvx.convert writes for a v5+ checkpoint: (key, value) for every weight as
    read_weights keeps it (transforms applied, big matrices in `dtype`, small ones float32),
    keyed by BlinkDL's names (stored_key), one layer in memory at a time. Files written so
    are read back by the same read_block (Reader.transformed). shapes_only: Planned big
    matrices and zero small ones, reading no weights; every name and shape is checked."""
    n_layer, n_embd, _, n_head, head_size = sizes(source, arch)
    reader = Reader(source, dtype, check=check, shapes_only=shapes_only)
    for layer, part in read_parts(reader, arch, n_layer, n_embd, n_head, head_size):
        for name, value in part.items():
            if name in getattr(arch, "STORED_IN_OUT", ()):
                # (in, out) for each matrix of a stack; a view of the source where it holds that
                value = np.ascontiguousarray(np.swapaxes(value, -1, -2))
            if name == "time_state":
                for i, heads in enumerate(value):
                    yield f"blocks.{i}.att.time_state", heads
                continue
            yield (_TOP_KEYS[name] if layer < 0 else f"blocks.{layer}.{stored_key(name, arch)}"), value


def read_weights(source: TensorSource, arch, dtype: str = "float32", *, mmap: bool = True,
                 check: str = "read") -> Weights:
    """Every tensor of a v5+ checkpoint, checked, with the file format's transforms undone.

    Matrices the file stores in the run dtype (a bf16 checkpoint run in bfloat16, a file
    written by rwkvx.convert in its dtype), and float32 small tensors, are read-only views
    of the mapped file, as RWKV-4's loader keeps them; mmap=False reads them instead, and
    then drops the file from the page cache. Each other layer is converted to the run dtype
    as it is read, so loading holds one layer in float32 beyond the result. What decoding
    reads and is not mapped is put in one block of 2 MB pages, as rwkvx.loader does for
    RWKV-4: streaming the weights through 4 KB pages costs a TLB miss per page.
    check: rwkvx.loader.check_mode's NaN/infinity scan ("read", "all" or "none").
    """
    n_layer, n_embd, _, n_head, head_size = sizes(source, arch)
    arena = Arena(arena_nbytes(source, arch, dtype, n_layer, copy_mapped=not mmap))
    reader = Reader(source, dtype, arena, copy_mapped=not mmap, check=check)
    top, blocks = {}, []
    for layer, part in read_parts(reader, arch, n_layer, n_embd, n_head, head_size):
        for name, value in part.items():
            # small tensors read privately join the 2 MB pages (views of the file stay views)
            if name not in arch.LINEAR and name not in ("emb", "head", "time_state") and value.flags.writeable:
                # a matrix the layer reads transposed is kept in that orientation
                if name in getattr(arch, "STORED_IN_OUT", ()):
                    part[name] = np.swapaxes(arena.keep(np.swapaxes(value, -1, -2)), -1, -2)
                else:
                    part[name] = arena.keep(value)
        (blocks.append(part) if layer >= 0 else top.update(part))
    if not mmap:
        from rwkvx.hugepages import drop_from_page_cache
        for file in source.files:
            drop_from_page_cache(file.path)
    return Weights(arch=arch, blocks=blocks, head_size=head_size, dtype=dtype, source=source.path, **top)


# ---- the float64 reference ----

class Reference(reference.Reference):
    """Any v5+ model in float64 numpy, one token at a time: the executable specification.

    forward(tokens, state) -> (logits, new_state) like RWKV.forward, in float64. The big
    matrices are taken as the run dtype holds them (uint8 dequantised), so this also defines
    what every run dtype must compute.
    """

    def __init__(self, weights: Weights):
        super().__init__(weights)  # every tensor in float64, as RWKV-4's reference holds them
        self.arch = weights.arch
        self.head_size = weights.head_size
        self.time_state = weights.time_state
        # rwkv.cpp's v5 graph normalises with 1e-5; tests of its expected logits set this
        self.group_norm_eps = GROUP_NORM_EPS

    def new_state(self) -> np.ndarray:
        if self.time_state is not None:  # a state-tuned checkpoint starts there
            from rwkvx.states import tuned_state
            return tuned_state(self.time_state, self.arch.NAME).astype(np.float64)
        return new_state(self.n_layer, self.n_embd, self.head_size, np.float64)

    def forward(self, tokens, state=None, all_logits: bool = False):
        state = self.new_state() if state is None else np.array(state, dtype=np.float64)
        outs = []
        for token in tokens:
            x = layer_norm(to_float32(self.emb[token]).astype(np.float64), *self.ln0)
            carry = None
            for p, s in zip(self.blocks, state):
                x, carry = self.arch.block(x, s, p, carry, self.group_norm_eps)
            outs.append(self.head @ layer_norm(x, *self.ln_out))
        return (np.stack(outs) if all_logits else outs[-1]), state


# ---- the float32 runtime's helpers: every op takes (T, C) rows, so one token (T = 1) and a
# chunk of a prompt run the same code and give the same bits ----

# Multiply-adds below which products run on one thread: a parallel loop ends in a barrier,
# which on cores shared with other work waits for a descheduled thread (measured on the v7
# 0.4B shape, 2 threads, a loaded 2-core machine: 7 parallel loops per layer decoded at
# 2.3-2.5x RWKV-4's time per token, 1 thread at 1.0x). The low-rank groups of a decoded
# token (~0.2M) and the WKV of one token (H N^2 = 65536 at 0.4B) stay serial; the big
# projections and prompts are parallel. Results do not depend on it.
SERIAL_BELOW = 1 << 18


def matmul(lin: Linear, X: np.ndarray, n_threads: int) -> np.ndarray:
    """X @ W.T for rows X (T, n_cols): a matrix-vector product for one row (the memory-bound
    decode path), else one pass over W; row t is bit-identical either way."""
    rows, cols = lin.shape
    if rows * cols * X.shape[0] < SERIAL_BELOW:
        n_threads = 1
    if X.shape[0] == 1:
        return lin(X[0], n_threads=n_threads)[None]
    return lin.matmul(X, n_threads=n_threads)


def norm_rows(X: np.ndarray, w: np.ndarray, b: np.ndarray, n_threads: int) -> np.ndarray:
    from rwkvx.kernels._layer import layer_norm_rows
    out = np.empty_like(X)
    layer_norm_rows(X, w, b, out, min(n_threads, X.shape[0]))
    return out


def shift(X: np.ndarray, states, row: int, starts: np.ndarray) -> np.ndarray:
    """Each row's previous token: the row before it, or for the first row of sequence b,
    row `row` of its layer state before this call (states.sources[b]); states[b]'s row is
    then set to the sequence's last row."""
    prev = np.empty_like(X)
    prev[1:] = X[:-1]
    for b, (s, source) in enumerate(zip(states, states.sources)):
        prev[starts[b]] = source[row]
        s[row] = X[starts[b + 1] - 1]
    return prev


def one_row_each(starts: np.ndarray, n_rows: int) -> bool:
    """Whether rows starts[b]..starts[b + 1] give every sequence exactly one row (a batched
    decoding step, or one decoded token): what the fused layer steps (rwkvx.kernels._step) run."""
    # a list comparison: a few times faster than numpy's for the few rows of a batch
    return len(starts) == n_rows + 1 and starts.tolist() == list(range(n_rows + 1))


class LayerStates(list):
    """One layer's states of the sequences in a call (written), with `sources`: the same
    layer's states before the call (read; the states themselves once a call is past its
    first chunk). The kernels read the old state and write the new one, so a call's new
    state is never first copied from the old."""

    def __init__(self, states: list, sources: list):
        super().__init__(states)
        self.sources = sources


def heads_of(states: list, n_head: int) -> list:
    """The (H, N, N) WKV blocks of layer states (views: the kernels update the states)."""
    return [wkv_matrices(s, n_head) for s in states]



try:
    # the contention governor: fewer threads while the process keeps being preempted, as the
    # kernels' own entry points ask it (rwkvx.kernels._parallel); absent in older builds
    from rwkvx.kernels._parallel import team_size_now
except ImportError:  # pragma: no cover
    def team_size_now(n_threads: int) -> int:
        return n_threads


def products(jobs: list, n_threads: int) -> list[np.ndarray]:
    """[matmul(lin, X) for lin, X in jobs] (the same bits), up to four products sharing one
    set of parallel loops; every X has the same number of rows."""
    from rwkvx.kernels._group import matmul_group, matvec_group
    n_tok = jobs[0][1].shape[0]
    outs = [np.empty((n_tok, lin.shape[0]), np.float32) for lin, _ in jobs]
    for i in range(0, len(jobs), 4):
        part = jobs[i:i + 4]
        size = n_tok * sum(lin.shape[0] * lin.shape[1] for lin, _ in part)
        threads = 1 if size < SERIAL_BELOW else team_size_now(n_threads)
        if n_tok == 1:
            matvec_group([lin for lin, _ in part], [X[0] for _, X in part], [o[0] for o in outs[i:i + 4]], threads)
        else:
            matmul_group([lin for lin, _ in part], [X for _, X in part], outs[i:i + 4], threads)
    return outs


def low_rank_in_out(p: dict, names) -> dict:
    """The low-rank matrices `names` of a layer's p (those it has), each matrix of a stack
    transposed to (in, out), C-contiguous float32, for their kernel (_lowrank.h); p keeps
    transposed views of them, so there is one copy (none where the file holds (in, out))."""
    low = {}
    for name in names:
        if name in p:
            low[name] = np.ascontiguousarray(np.swapaxes(p[name], -1, -2), dtype=np.float32)
            p[name] = np.swapaxes(low[name], -1, -2)
    return low


def lowrank(matrices: dict, jobs: list, n_threads: int, outs: Optional[list] = None) -> list[np.ndarray]:
    """[X @ matrices[name] for name, X in jobs] in one parallel loop: the small float32
    matrices of the low-rank paths, stored transposed (in, out) (rwkvx.kernels._matvec.lowrank_group);
    every X has the same number of rows, and a row's result does not depend on the others.
    outs: C-contiguous float32 arrays to write the results into (default: new ones)."""
    from rwkvx.kernels._matvec import lowrank_group
    n_tok = jobs[0][1].shape[0]
    wts = [matrices[name] for name, _ in jobs]
    if outs is None:
        outs = [np.empty((n_tok, wt.shape[1]), np.float32) for wt in wts]
    size = n_tok * sum(wt.size for wt in wts)
    lowrank_group(wts, [np.ascontiguousarray(X) for _, X in jobs], outs,
                  1 if size < SERIAL_BELOW else team_size_now(n_threads))
    return outs


def wkv_threads(n_rows: int, n_head: int, head_size: int, n_threads: int) -> int:
    """Threads for the WKV kernels: one per (sequence, head) task at most, one for little work."""
    if n_rows * n_head * head_size * head_size < SERIAL_BELOW:
        return 1
    return team_size_now(min(n_threads, n_rows * n_head))
