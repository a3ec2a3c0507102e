"""Train rwkvx's small demo RWKV-4 from scratch, offline, on text every Python installation ships.

    python scripts/train_demo.py --out DIR [--layers 4 --embd 256 --ctx 256 --batch 16]
                                 [--steps N | --minutes M] [--lr 2e-3] [--seed 0] [--threads 2]

Needs PyTorch and safetensors (the optional training extra); rwkvx itself never imports
this file.

Data. Two sources, read in a fixed order and never downloaded:
- the language reference topics in ``pydoc_data.topics.topics`` (one document per topic);
- the docstrings of the pure-Python standard library (one document per module file):
  the top-level names of ``sys.stdlib_module_names``, sorted, minus private ones and a
  short deny list, that are ``.py`` files or packages of them; package directories are
  walked in sorted path order, skipping test directories. Files are parsed with ``ast``,
  never imported, so no module code runs; each document is the module docstring followed
  by every class, function and method docstring in source order, each headed by its
  qualified name (and signature for functions).
Documents are UTF-8 encoded and joined with a blank line; the vocabulary is the 256 byte
values. About 5% of the bytes are held out by document: documents are ordered by the
SHA-256 of their name and taken into the held-out set until it has 5% of all bytes. The
held-out text is never trained on. The text depends on the Python version, which the
sidecar records with the SHA-256 of both byte streams.

Model. Exactly the RWKV-4 rwkvx runs (rwkvx/reference.py): embedding, ln0 in block 0,
per block x += att(ln1(x)); x += ffn(ln2(x)) with token shift, time mixing through the
WKV recurrence and channel mixing with squared ReLU and sigmoid receptance, then ln_out
and head. Layer norms use eps 1e-5. For training the WKV recurrence runs in chunks
(``wkv_chunked``): inside a chunk of ``--chunk`` tokens the decay-weighted sums are
formed for every (t, i) pair in log space with a running max; across chunks a short
sequential scan carries the (aa, bb, pp) state of the reference. ``wkv_sequential`` is
the token-by-token recurrence, kept to test it against.

Training. Single process, ``torch.manual_seed(seed)`` before the initialisation
(BlinkDL's RWKV-4 scheme), a seeded generator for the data order (uniform random
windows of ctx+1 bytes from the training stream), AdamW, linear warmup then cosine
decay to 10% of --lr, gradient clipping. With --minutes the step count is fixed during
warmup from the measured speed and recorded; rerunning with --steps set to it gives the
same run (on the same machine and thread count), since nothing before that point
depends on the total.

Output in --out: ``model.safetensors`` (float32, BlinkDL key names as rwkvx/loader.py
reads them; rewritten at every evaluation and at the end), ``model.json`` (the
training facts), ``log.csv`` (step, lr, train and held-out loss, held-out bits per byte).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# the data lives beside this script, torch-free, so tests can rebuild the held-out text
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _args import positive_int  # noqa: E402
from demo_corpus import build_corpus  # noqa: E402

N_VOCAB = 256
LAYER_NORM_EPS = 1e-5
# the reference's "minus infinity" for the state's pp row
PP_START = -1e30
# ----------------------------------------------------------------------------
# WKV: the recurrence of rwkvx/reference.py time_mixing, in two forms


def wkv_sequential(time_decay: torch.Tensor, time_first: torch.Tensor,
                   k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The token-by-token recurrence, as in the reference. k, v: (B, T, C); returns (B, T, C).

    time_decay is the raw parameter: the state decays by e^{-e^time_decay} per token.
    """
    w = -torch.exp(time_decay)
    u = time_first
    aa = torch.zeros_like(k[:, 0])
    bb = torch.zeros_like(k[:, 0])
    pp = torch.full_like(k[:, 0], PP_START)
    out = []
    for t in range(k.shape[1]):
        kt, vt = k[:, t], v[:, t]
        ww = u + kt
        qq = torch.maximum(pp, ww)
        e1 = torch.exp(pp - qq)
        e2 = torch.exp(ww - qq)
        out.append((e1 * aa + e2 * vt) / (e1 * bb + e2))
        ww = pp + w
        qq = torch.maximum(ww, kt)
        e1 = torch.exp(ww - qq)
        e2 = torch.exp(kt - qq)
        aa = e1 * aa + e2 * vt
        bb = e1 * bb + e2
        pp = qq
    return torch.stack(out, dim=1)


def wkv_chunked(time_decay: torch.Tensor, time_first: torch.Tensor,
                k: torch.Tensor, v: torch.Tensor, chunk: int = 16) -> torch.Tensor:
    """The same values as wkv_sequential, computed a chunk of tokens at a time.

    With w = e^time_decay and u = time_first, for each channel
        wkv_t = (sum_{i<t} e^{k_i - (t-1-i) w} v_i + e^{u + k_t} v_t)
              / (sum_{i<t} e^{k_i - (t-1-i) w}     + e^{u + k_t}),
    a softmax over i <= t of the scores S[t, i] applied to v. Inside a chunk of L tokens
    the (L, L) scores are formed for all chunks at once; the tokens of earlier chunks
    enter through the state (A, B, P) at the chunk start, A e^P = sum e^{k_i - (s-1-i) w} v_i
    (and B e^P without v_i), which a scan over the T/L chunks builds from per-chunk sums.
    Every exponent has its max subtracted (the max is detached: the result does not
    depend on it). Memory: O(B T L C).
    """
    n_batch, n_time, n_chan = k.shape
    length = min(chunk, n_time)
    pad = -n_time % length
    if pad:
        # outputs at t depend only on tokens <= t, so padding at the end changes nothing before it
        k = F.pad(k, (0, 0, 0, pad))
        v = F.pad(v, (0, 0, 0, pad))
    n_chunk = (n_time + pad) // length
    k = k.view(n_batch, n_chunk, length, n_chan)
    v = v.view(n_batch, n_chunk, length, n_chan)
    w = torch.exp(time_decay)

    pos = torch.arange(length, device=k.device)
    # (L, L): t - 1 - i, the decay steps from token i to the output at t (i < t)
    steps = (pos[:, None] - 1 - pos[None, :]).to(k.dtype)
    # bias[t, i] (L, L, C): -(t-1-i) w for i < t, u on the diagonal, -inf above it
    bias = -steps[:, :, None] * w
    bias = torch.where((pos[:, None] == pos[None, :])[:, :, None], time_first.expand_as(bias), bias)
    bias = bias.masked_fill((pos[None, :] > pos[:, None])[:, :, None], float("-inf"))

    # per-chunk sums at the chunk's last token: log weights k_i - (L-1-i) w, (B, N, L, C)
    g = k - ((length - 1 - pos).to(k.dtype)[:, None] * w)
    g_max = g.amax(dim=2).detach()
    e_g = torch.exp(g - g_max[:, :, None])
    a_chunk = (e_g * v).sum(dim=2)
    b_chunk = e_g.sum(dim=2)

    # state at each chunk's start: decay the previous state by L w and add that chunk's sums
    big_a = [torch.zeros_like(a_chunk[:, 0])]
    big_b = [torch.zeros_like(b_chunk[:, 0])]
    big_p = [torch.full_like(g_max[:, 0], PP_START)]
    for n in range(1, n_chunk):
        p1 = big_p[-1] - length * w
        p2 = g_max[:, n - 1]
        q = torch.maximum(p1, p2).detach()
        e1, e2 = torch.exp(p1 - q), torch.exp(p2 - q)
        big_a.append(e1 * big_a[-1] + e2 * a_chunk[:, n - 1])
        big_b.append(e1 * big_b[-1] + e2 * b_chunk[:, n - 1])
        big_p.append(q)
    big_a = torch.stack(big_a, dim=1)[:, :, None]
    big_b = torch.stack(big_b, dim=1)[:, :, None]
    # (B, N, L, C): log weight of the state for token t of the chunk, P - t w
    state_log = torch.stack(big_p, dim=1)[:, :, None] - pos.to(k.dtype)[:, None] * w

    # scores (B, N, L_t, L_i, C)
    scores = k[:, :, None] + bias
    top = torch.maximum(scores.amax(dim=3), state_log).detach()
    e = torch.exp(scores - top[:, :, :, None])
    e_state = torch.exp(state_log - top)
    num = big_a * e_state + (e * v[:, :, None]).sum(dim=3)
    den = big_b * e_state + e.sum(dim=3)
    out = (num / den).view(n_batch, n_chunk * length, n_chan)
    return out[:, :n_time]


# ----------------------------------------------------------------------------
# model: module and parameter names are BlinkDL's, so state_dict() keys are checkpoint keys


@dataclass
class ModelConfig:
    n_layer: int
    n_embd: int
    n_vocab: int = N_VOCAB
    # WKV chunk length used in training
    chunk: int = 8

    @property
    def n_ffn(self) -> int:
        return 4 * self.n_embd


def token_shift(x: torch.Tensor) -> torch.Tensor:
    """x (B, T, C) -> the previous token's x, zeros before the first (the reference's fresh state)."""
    return F.pad(x, (0, 0, 1, -1))


def _ramp(n_embd: int) -> torch.Tensor:
    return torch.arange(n_embd, dtype=torch.float32) / n_embd


class TimeMix(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        c = config.n_embd
        self.chunk = config.chunk
        # BlinkDL's RWKV-4 init: decays from fast to slow across channels, deeper layers slower
        ratio_0_to_1 = layer_id / max(config.n_layer - 1, 1)
        ratio_1_to_0 = 1.0 - layer_id / config.n_layer
        h = torch.arange(c, dtype=torch.float32) / max(c - 1, 1)
        self.time_decay = nn.Parameter(-5 + 8 * h ** (0.7 + 1.3 * ratio_0_to_1))
        zigzag = torch.tensor([((i + 1) % 3 - 1) * 0.5 for i in range(c)], dtype=torch.float32)
        self.time_first = nn.Parameter(math.log(0.3) + zigzag)
        ramp = _ramp(c)
        self.time_mix_k = nn.Parameter(ramp ** ratio_1_to_0)
        self.time_mix_v = nn.Parameter(ramp ** ratio_1_to_0 + 0.3 * ratio_0_to_1)
        self.time_mix_r = nn.Parameter(ramp ** (0.5 * ratio_1_to_0))
        self.key = nn.Linear(c, c, bias=False)
        self.value = nn.Linear(c, c, bias=False)
        self.receptance = nn.Linear(c, c, bias=False)
        self.output = nn.Linear(c, c, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ln1 output (B, T, C)."""
        last_x = token_shift(x)
        # xk = x * time_mix_k + last_x * (1 - time_mix_k), likewise xv, xr
        xk = x * self.time_mix_k + last_x * (1 - self.time_mix_k)
        xv = x * self.time_mix_v + last_x * (1 - self.time_mix_v)
        xr = x * self.time_mix_r + last_x * (1 - self.time_mix_r)
        r = torch.sigmoid(self.receptance(xr))
        k = self.key(xk)
        v = self.value(xv)
        return self.output(r * wkv_chunked(self.time_decay, self.time_first, k, v, self.chunk))


class ChannelMix(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        c = config.n_embd
        ratio_1_to_0 = 1.0 - layer_id / config.n_layer
        ramp = _ramp(c)
        self.time_mix_k = nn.Parameter(ramp ** ratio_1_to_0)
        self.time_mix_r = nn.Parameter(ramp ** ratio_1_to_0)
        self.key = nn.Linear(c, config.n_ffn, bias=False)
        self.receptance = nn.Linear(c, c, bias=False)
        self.value = nn.Linear(config.n_ffn, c, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ln2 output (B, T, C)."""
        last_x = token_shift(x)
        xk = x * self.time_mix_k + last_x * (1 - self.time_mix_k)
        xr = x * self.time_mix_r + last_x * (1 - self.time_mix_r)
        # r = sigmoid(rw @ xr); k = relu(kw @ xk)^2; out = r * (vw @ k)
        r = torch.sigmoid(self.receptance(xr))
        k = torch.square(torch.relu(self.key(xk)))
        return r * self.value(k)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        c = config.n_embd
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(c, eps=LAYER_NORM_EPS)
        self.ln1 = nn.LayerNorm(c, eps=LAYER_NORM_EPS)
        self.ln2 = nn.LayerNorm(c, eps=LAYER_NORM_EPS)
        self.att = TimeMix(config, layer_id)
        self.ffn = ChannelMix(config, layer_id)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.att(self.ln1(x))
        return x + self.ffn(self.ln2(x))


class RWKV4(nn.Module):
    """RWKV-4 over (B, T) byte ids -> (B, T, n_vocab) logits, every sequence from a fresh state."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.emb = nn.Embedding(config.n_vocab, config.n_embd)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_out = nn.LayerNorm(config.n_embd, eps=LAYER_NORM_EPS)
        self.head = nn.Linear(config.n_embd, config.n_vocab, bias=False)
        self._init_matrices()

    @torch.no_grad()
    def _init_matrices(self) -> None:
        # BlinkDL's RWKV-4 scheme: tiny embedding (ln0 rescales it), zero key/receptance/
        # output projections, orthogonal value/ffn-key, orthogonal head with gain 0.5
        nn.init.uniform_(self.emb.weight, -1e-4, 1e-4)
        for block in self.blocks:
            for zero in (block.att.key, block.att.receptance, block.att.output,
                         block.ffn.receptance, block.ffn.value):
                nn.init.zeros_(zero.weight)
            for ortho in (block.att.value, block.ffn.key):
                rows, cols = ortho.weight.shape
                nn.init.orthogonal_(ortho.weight, gain=math.sqrt(max(rows / cols, 1.0)))
        rows, cols = self.head.weight.shape
        nn.init.orthogonal_(self.head.weight, gain=0.5 * math.sqrt(max(rows / cols, 1.0)))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.blocks[0].ln0(self.emb(idx))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_out(x))


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def checkpoint_tensors(model: RWKV4) -> dict[str, torch.Tensor]:
    """BlinkDL-named float32 tensors: state_dict keys already are the checkpoint keys."""
    return {name: t.detach().to(torch.float32).contiguous().clone() for name, t in model.state_dict().items()}


def save_checkpoint(model: RWKV4, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write model as float32 safetensors (written beside, then renamed into place)."""
    from safetensors.torch import save_file
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(checkpoint_tensors(model), str(tmp), metadata=metadata)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------
# training


def lr_at(step: int, total: int | None, peak: float, warmup: int, final_ratio: float = 0.1) -> float:
    """Linear warmup to peak over `warmup` steps, then cosine to final_ratio * peak at `total`.

    During warmup the value does not depend on total (see --minutes).
    """
    if step < warmup:
        return peak * (step + 1) / warmup
    if total is None:
        return peak
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return peak * (final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def windows(data: torch.Tensor, ctx: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping (n, ctx+1) windows of data; max_windows evenly spaced ones if given."""
    n = (len(data) - 1) // ctx
    starts = torch.arange(n) * ctx
    if max_windows is not None and max_windows < n:
        starts = starts[torch.linspace(0, n - 1, max_windows).round().long()]
    return torch.stack([data[s:s + ctx + 1] for s in starts.tolist()])


@torch.no_grad()
def evaluate(model: RWKV4, batches: torch.Tensor, batch_size: int) -> float:
    """Mean next-byte cross entropy (nats) over every position of every window."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(batches), batch_size):
        chunk = batches[i:i + batch_size]
        logits = model(chunk[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="sum")
        total += loss.item()
        count += chunk[:, 1:].numel()
    model.train()
    return total / count


def make_optimizer(model: RWKV4, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW; weight decay only on the projection matrices and the head."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim == 2 and name != "emb.weight" else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.99), eps=1e-8)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train_demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory (created)")
    p.add_argument("--layers", type=positive_int, default=4)
    p.add_argument("--embd", type=positive_int, default=256)
    p.add_argument("--ctx", type=positive_int, default=256, help="training context in bytes")
    p.add_argument("--batch", type=positive_int, default=16)
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--steps", type=positive_int, help="optimizer steps")
    budget.add_argument("--minutes", type=_positive_float,
                        help="time budget: the step count is fixed from the speed measured during warmup")
    p.add_argument("--lr", type=_positive_float, default=2e-3, help="peak learning rate")
    p.add_argument("--warmup", type=positive_int, default=100, help="warmup steps")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--grad-clip", type=_positive_float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive_int, default=2, help="torch threads")
    p.add_argument("--chunk", type=positive_int, default=8, help="WKV chunk length in training")
    p.add_argument("--eval-every", type=positive_int, default=100, help="steps between evaluations")
    p.add_argument("--eval-windows", type=positive_int, default=48,
                   help="held-out windows in periodic evaluations (the final one uses all)")
    return p


def _log(message: str) -> None:
    print(message, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    # denormal floats (from exp of very negative WKV exponents) are ~100x slower on x86
    torch.set_flush_denormal(True)

    t0 = time.perf_counter()
    corpus = build_corpus()
    train_data = torch.frombuffer(bytearray(corpus.train), dtype=torch.uint8).long()
    heldout_data = torch.frombuffer(bytearray(corpus.heldout), dtype=torch.uint8).long()
    if len(heldout_data) < args.ctx + 1:
        parser.error(f"--ctx {args.ctx} is longer than the held-out text ({len(heldout_data)} bytes)")
    _log(f"data: {corpus.n_documents} documents, train {len(corpus.train)} bytes, "
         f"held-out {len(corpus.heldout)} bytes ({len(corpus.heldout_names)} documents), "
         f"{time.perf_counter() - t0:.1f} s")

    torch.manual_seed(args.seed)
    config = ModelConfig(n_layer=args.layers, n_embd=args.embd, chunk=args.chunk)
    model = RWKV4(config)
    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    data_gen = torch.Generator().manual_seed(args.seed + 1)
    eval_small = windows(heldout_data, args.ctx, args.eval_windows)
    _log(f"model: {args.layers} layers x {args.embd}, {n_params(model)} parameters, ctx {args.ctx}, "
         f"batch {args.batch}, threads {args.threads}, torch {torch.__version__}")

    log_path = out / "log.csv"
    log_file = open(log_path, "w", newline="")
    log = csv.writer(log_file)
    log.writerow(["step", "bytes_seen", "elapsed_s", "lr", "train_loss", "heldout_loss", "heldout_bpb"])

    total_steps = args.steps
    start = time.perf_counter()
    eval_seconds, n_evals = 0.0, 0
    # --minutes: the speed is measured over steps [calibrate_from, calibrate_at), past the
    # slow first steps and inside warmup
    calibrate_at = min(args.warmup, 50)
    calibrate_from = calibrate_at // 4
    calibrate_clock = (0.0, 0.0)
    recent: list[float] = []
    train_loss = float("nan")
    step = 0

    def record(step: int) -> float:
        nonlocal eval_seconds, n_evals
        t = time.perf_counter()
        heldout_loss = evaluate(model, eval_small, args.batch)
        eval_seconds += time.perf_counter() - t
        n_evals += 1
        elapsed = time.perf_counter() - start
        lr = optimizer.param_groups[0]["lr"]
        log.writerow([step, step * args.batch * args.ctx, f"{elapsed:.1f}", f"{lr:.3e}",
                      f"{train_loss:.4f}", f"{heldout_loss:.4f}", f"{heldout_loss / math.log(2):.4f}"])
        log_file.flush()
        _log(f"step {step:6d}/{total_steps or '?'}  {elapsed:7.1f} s  lr {lr:.2e}  train {train_loss:.4f}  "
             f"held-out {heldout_loss:.4f} ({heldout_loss / math.log(2):.3f} bpb)")
        return heldout_loss

    record(0)
    while total_steps is None or step < total_steps:
        if total_steps is None and step == calibrate_from:
            calibrate_clock = (time.perf_counter(), eval_seconds)
        if total_steps is None and step == calibrate_at:
            # fix the step count from the speed so far; nothing before here depends on it
            now = time.perf_counter()
            train_time = (now - calibrate_clock[0]) - (eval_seconds - calibrate_clock[1])
            one_eval = eval_seconds / n_evals
            per_step = train_time / (step - calibrate_from) + one_eval / args.eval_every
            # the final evaluation: all held-out windows and as many training windows
            final_eval = one_eval * 2 * len(windows(heldout_data, args.ctx)) / len(eval_small)
            remaining = args.minutes * 60 - (now - start) - final_eval
            total_steps = max(step + int(remaining / per_step), step + 1)
            _log(f"budget {args.minutes} min: {total_steps} steps (reproduce with --steps {total_steps})")
        lr = lr_at(step, total_steps, args.lr, args.warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(train_data) - args.ctx - 1, (args.batch,), generator=data_gen)
        batch = torch.stack([train_data[s:s + args.ctx + 1] for s in starts.tolist()])
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, N_VOCAB), batch[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        step += 1
        recent.append(loss.item())
        if len(recent) >= args.eval_every or (total_steps is not None and step == total_steps):
            train_loss = sum(recent) / len(recent)
            recent = []
        if step % args.eval_every == 0 or step == total_steps:
            record(step)
            save_checkpoint(model, out / "model.safetensors", {"step": str(step)})
    train_seconds = time.perf_counter() - start

    # final numbers over all held-out windows and as many evenly spaced training windows
    all_heldout = windows(heldout_data, args.ctx)
    heldout_loss = evaluate(model, all_heldout, args.batch)
    train_eval_loss = evaluate(model, windows(train_data, args.ctx, len(all_heldout)), args.batch)
    save_checkpoint(model, out / "model.safetensors", {"step": str(step)})
    log_file.close()
    facts = {
        "model": {"architecture": "RWKV-4", **asdict(config), "n_ffn": config.n_ffn,
                  "n_params": n_params(model), "checkpoint": "model.safetensors",
                  "checkpoint_dtype": "float32", "checkpoint_bytes": (out / "model.safetensors").stat().st_size},
        "data": corpus.facts(),
        "training": {"steps": step, "ctx": args.ctx, "batch": args.batch,
                     "bytes_seen": step * args.batch * args.ctx, "lr": args.lr, "warmup": args.warmup,
                     "schedule": "linear warmup, cosine to 0.1 x lr", "optimizer": "AdamW betas (0.9, 0.99)",
                     "weight_decay": args.weight_decay, "grad_clip": args.grad_clip, "seed": args.seed,
                     "threads": args.threads, "minutes_budget": args.minutes,
                     "train_seconds": round(train_seconds, 1), "eval_every": args.eval_every},
        "results": {"train_loss": round(train_eval_loss, 5),
                    "train_bpb": round(train_eval_loss / math.log(2), 5),
                    "train_loss_last_steps": round(train_loss, 5),
                    "heldout_loss": round(heldout_loss, 5),
                    "heldout_bpb": round(heldout_loss / math.log(2), 5),
                    "heldout_windows": len(all_heldout),
                    "loss_unit": "nats per byte, mean over every position of ctx-byte windows from a fresh state"},
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "machine": platform.machine(),
        "reproduce": (f"python scripts/train_demo.py --out OUT --layers {args.layers} --embd {args.embd} "
                      f"--ctx {args.ctx} --batch {args.batch} --steps {step} --lr {args.lr} "
                      f"--warmup {args.warmup} --weight-decay {args.weight_decay} --grad-clip {args.grad_clip} "
                      f"--seed {args.seed} --threads {args.threads} --chunk {args.chunk} "
                      f"--eval-every {args.eval_every} --eval-windows {args.eval_windows}"),
    }
    (out / "model.json").write_text(json.dumps(facts, indent=2) + "\n")
    _log(f"done: {step} steps in {train_seconds / 60:.1f} min; train {train_eval_loss:.4f} "
         f"({train_eval_loss / math.log(2):.3f} bpb), held-out {heldout_loss:.4f} "
         f"({heldout_loss / math.log(2):.3f} bpb); wrote {out / 'model.safetensors'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
