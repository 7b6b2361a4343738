"""TEAL calibration: activation statistics -> thresholds -> block-wise greedy -> sparsity file.

    python calibrate.py                                    # default model, offline calibration split
    python calibrate.py --checkpoint_path DIR --data path/to/text.txt --out DIR/sparsity.json

1. Statistics. The dense model runs over the calibration text one block at a time; for every
   block and each of the four sparsified states (attn_in feeds q k v, attn_out feeds o, mlp_in
   feeds gate up, mlp_mid feeds down) an exact-count histogram of |x| on float32's own log grid
   (128 bins per octave) is kept, then summarised as a quantile table Q(p) at QUANTILE_P.
   Threshold for sparsity s: linear interpolation of the table at p = s, with Q(0) = 0, so that
   a fraction s of the entries has |x| <= t (TEAL keeps x iff |x| > t; level 0 is exactly dense).
2. Block-wise greedy (the TEAL paper's Algorithm 1). Per block, start dense; each iteration
   tries raising one projection's sparsity by step / share (share = its fraction of the block's
   parameters, from the weight shapes), so the parameter-weighted block sparsity rises by exactly
   `step` (less only on a projection's last step, which stops at sparsity 1), and keeps the
   projection whose step adds the least block-output error (mean squared error against the dense
   block output, on the dense block inputs), until the block sparsity reaches 0.9. To fit a CPU
   budget the error is measured at a few random query positions of a few full-length sequences
   (keys and values still see the whole context), and a candidate recomputes only what it
   changes (BlockProbe).
3. Levels. Model-wide level p means every block at block sparsity p. Greedy: each projection's
   sparsity is the linear interpolation between the two path points whose block sparsities
   bracket p (so the block sparsity is exactly p). Uniform: every projection at p. Thresholds are
   always read from the quantile tables; the per-level tables in the file (LEVELS) are the same
   function evaluated on a grid, for reading and for other tools. Levels above 0.9 are refused.
SmolLM2-135M, defaults (65,536 statistics tokens, greedy on 8 x 32 positions, step 0.01):
about 5 minutes on 2 CPU cores (321 s, 186 s of it the greedy).
"""
import argparse
import datetime
import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from model import PROJECTIONS, STATES, Transformer, apply_rotary_emb, grouped_attention, projection_params

FORMAT = "teal-fast sparsity file v1"
STATE_NAMES = tuple(STATES)  # attn_in, attn_out, mlp_in, mlp_mid
STATE_OF = [STATE_NAMES.index(next(s for s, projs in STATES.items() if p in projs)) for p in PROJECTIONS]
# p grid of the quantile tables: by 0.01 to 0.9, by 0.005 to 0.99, then 0.995, 0.999 and the maximum
QUANTILE_P = [i / 100 for i in range(90)] + [i / 200 for i in range(180, 199)] + [0.995, 0.999, 1.0]
LEVELS = [round(i * 0.025, 4) for i in range(37)]  # 0.00 .. 0.90
MAX_LEVEL = 0.9
MAX_PROJECTION_SPARSITY = 1.0


# ---------------------------------------------------------------------------- |x| statistics

class MagnitudeHistogram:
    """Streaming histogram of |x| with exact counts. Bin b holds the float32 values whose bit
    pattern >> 16 is b: 128 bins per octave (0.5% wide), every positive float covered."""
    SHIFT = 16
    N_BINS = 1 << 15

    def __init__(self, device):
        self.counts = torch.zeros(self.N_BINS, dtype=torch.int64, device=device)

    def add(self, x: Tensor):
        bits = x.detach().float().abs().view(torch.int32) >> self.SHIFT  # abs() is a contiguous copy
        self.counts += torch.bincount(bits.flatten(), minlength=self.N_BINS)

    @classmethod
    def edge(cls, b: Tensor) -> Tensor:
        """Lower edge (a float) of bins b."""
        return (b.clamp(max=0x7F80).to(torch.int32) << cls.SHIFT).view(torch.float32).double()

    def quantiles(self, p) -> Tensor:
        """Q(p): the value below which a fraction p of |x| lies, linear within a bin; Q(0) = 0."""
        p = torch.as_tensor(p, dtype=torch.float64)
        counts = self.counts.double().cpu()
        cum = counts.cumsum(0)
        if cum[-1] == 0:
            raise ValueError("no activations were recorded")
        rank = p * cum[-1]
        b = torch.searchsorted(cum, rank).clamp(max=self.N_BINS - 1)  # first bin with cum >= rank
        inside = ((rank - (cum[b] - counts[b])) / counts[b].clamp(min=1)).clamp(0, 1)
        lo, hi = self.edge(b), self.edge(b + 1)
        return torch.where(p > 0, lo + inside * (hi - lo), torch.zeros_like(p))


class ActivationStats:
    """Observer (model.observer signature): a MagnitudeHistogram per (layer, state)."""

    def __init__(self, n_layer: int, device):
        self.hist = [{s: MagnitudeHistogram(device) for s in STATE_NAMES} for _ in range(n_layer)]

    def __call__(self, layer: int, state: str, x: Tensor):
        self.hist[layer][state].add(x)

    def table(self, layer: int) -> np.ndarray:
        """(4, len(QUANTILE_P)) quantile table of one layer, rounded to 4 significant digits."""
        return np.array([[float(f"{q:.4g}") for q in self.hist[layer][s].quantiles(QUANTILE_P).tolist()]
                         for s in STATE_NAMES])


def threshold_from_table(table_row: np.ndarray, sparsity) -> np.ndarray:
    """Threshold(s) dropping a fraction `sparsity` of entries: the quantile table read at p = s."""
    return np.interp(sparsity, QUANTILE_P, table_row)


# ---------------------------------------------------------------------------- block-wise greedy

def keep(x: Tensor, t: float, magnitude: Optional[Tensor] = None) -> Tensor:
    """TEAL: keep x iff |x| > t (magnitude: x.abs() when already at hand)."""
    return x * ((x.abs() if magnitude is None else magnitude) > t)


def projection_shares(model: Transformer) -> np.ndarray:
    """(7,) each projection's fraction of a block's linear parameters, from the weight shapes."""
    params = projection_params(model).numpy()
    return params / params.sum()


class BlockProbe:
    """One block evaluated at sampled query positions of dense input sequences, with per-projection
    thresholds. Keys and values cover every position (the context); q, o and the MLP run only at
    the sampled positions. Partial results of the current allocation are cached, so a candidate
    recomputes only what it changes (an MLP candidate never touches attention)."""

    def __init__(self, block, x: Tensor, positions: Tensor, freqs_cis: Tensor):
        # x (B, L, D) dense block inputs; positions (M,) sampled query positions; freqs_cis (>= L, hd/2, 2)
        attn, ffn = block.attention, block.feed_forward
        B, L, _ = x.shape
        n_q, n_kv, _ = attn.splits
        self.n_head, self.n_kv_head, self.head_dim = attn.n_head, attn.n_kv_head, attn.head_dim
        w = attn.wqkv_t
        self.wq, self.wk, self.wv = (w[:, :n_q].contiguous(), w[:, n_q:n_q + n_kv].contiguous(),
                                     w[:, n_q + n_kv:].contiguous())
        self.wo, self.w2 = attn.wo_t, ffn.w2_t
        self.wg, self.wu = ffn.w13_t[:, :ffn.hidden].contiguous(), ffn.w13_t[:, ffn.hidden:].contiguous()
        self.ffn_norm = block.ffn_norm
        self.h_in = block.attention_norm(x)  # (B, L, D)
        self.h_in_at = self.h_in[:, positions]  # (B, M, D)
        self.h_in_abs, self.h_in_at_abs = self.h_in.abs(), self.h_in_at.abs()
        self.x_at = x[:, positions]  # (B, M, D)
        self.freqs_all, self.freqs_at = freqs_cis[:L], freqs_cis[positions]
        self.mask = positions[:, None] >= torch.arange(L, device=x.device)[None, :]  # (M, L)
        self.t = [0.0] * len(PROJECTIONS)
        self.cache = self.full(self.t)
        self.memo = {}  # attention outputs of q/k/v candidates: valid until an attention threshold changes
        self.reference = self.cache["out"]  # the dense block output at the sampled positions

    # pieces
    def q(self, t):  # (B, H, M, hd)
        B, M, _ = self.h_in_at.shape
        q = (keep(self.h_in_at, t, self.h_in_at_abs) @ self.wq).view(B, M, self.n_head, self.head_dim)
        return apply_rotary_emb(q, self.freqs_at).transpose(1, 2)

    def k(self, t):  # (B, KV, L, hd)
        B, L, _ = self.h_in.shape
        k = (keep(self.h_in, t, self.h_in_abs) @ self.wk).view(B, L, self.n_kv_head, self.head_dim)
        return apply_rotary_emb(k, self.freqs_all).transpose(1, 2)

    def v(self, t):  # (B, KV, L, hd)
        B, L, _ = self.h_in.shape
        return (keep(self.h_in, t, self.h_in_abs) @ self.wv).view(B, L, self.n_kv_head, self.head_dim).transpose(1, 2)

    def attend(self, q, k, v):  # -> (B, M, H hd)
        y = grouped_attention(q, k, v, self.mask)
        return y.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)

    def after_attention(self, y, t):  # the rest of the block from the o input, all thresholds t
        h = self.x_at + keep(y, t[3]) @ self.wo
        m_in = self.ffn_norm(h)
        m_abs = m_in.abs()
        gate, up = keep(m_in, t[4], m_abs) @ self.wg, keep(m_in, t[5], m_abs) @ self.wu
        return dict(y=y, h=h, m_in=m_in, m_abs=m_abs, gate=gate, up=up, **self.down(h, F.silu(gate) * up, t[6]))

    def down(self, h, mid, t):
        return dict(mid=mid, out=h + keep(mid, t) @ self.w2)

    def full(self, t):
        q, k, v = self.q(t[0]), self.k(t[1]), self.v(t[2])
        return dict(q=q, k=k, v=v, **self.after_attention(self.attend(q, k, v), t))

    def candidate(self, j: int, t: list) -> dict:
        """Cache entries that change when projection j's threshold becomes t[j] (t: all seven)."""
        c = self.cache
        if j < 3:
            key = (j, *t[:3])
            if key not in self.memo:
                qkv = dict(q=c["q"], k=c["k"], v=c["v"])
                name = "qkv"[j]
                qkv[name] = getattr(self, name)(t[j])
                self.memo[key] = (name, qkv[name], self.attend(qkv["q"], qkv["k"], qkv["v"]))
            name, new, y = self.memo[key]
            return {name: new, **self.after_attention(y, t)}
        if j == 3:
            return self.after_attention(c["y"], t)
        if j == 4:
            gate = keep(c["m_in"], t[4], c["m_abs"]) @ self.wg
            return dict(gate=gate, **self.down(c["h"], F.silu(gate) * c["up"], t[6]))
        if j == 5:
            up = keep(c["m_in"], t[5], c["m_abs"]) @ self.wu
            return dict(up=up, **self.down(c["h"], F.silu(c["gate"]) * up, t[6]))
        return self.down(c["h"], c["mid"], t[6])

    def adopt(self, j: int, t: list, change: dict):
        """Make candidate j (thresholds t, cache entries change) the current allocation."""
        self.t = t
        self.cache.update(change)
        if j < 3:
            self.memo.clear()

    def error(self, out: Tensor) -> float:
        return float((out.float() - self.reference.float()).pow(2).mean())


def greedy_block(probe: BlockProbe, table: np.ndarray, shares: np.ndarray, step: float,
                 target: float = MAX_LEVEL) -> list:
    """Algorithm 1 on one block: the list of chosen projections (indices), one per step of `step`
    in parameter-weighted block sparsity, from dense up to `target`."""
    sparsity = np.zeros(len(PROJECTIONS))
    choices = []
    while sparsity @ shares < target - 1e-9:
        best = None
        for j in range(len(PROJECTIONS)):
            s = next_sparsity(sparsity[j], step / shares[j])
            if s is None:
                continue
            t = list(probe.t)
            t[j] = float(threshold_from_table(table[STATE_OF[j]], s))
            change = probe.candidate(j, t)
            err = probe.error(change["out"])
            if best is None or err < best[0]:
                best = (err, j, t, change)
        _, j, t, change = best  # some projection is below sparsity 1 while the block is below target
        probe.adopt(j, t, change)
        sparsity[j] = next_sparsity(sparsity[j], step / shares[j])
        choices.append(j)
    return choices


def next_sparsity(s: float, increment: float):
    """A projection's sparsity after one more greedy step: s + increment, except that the last
    step of a projection stops at MAX_PROJECTION_SPARSITY (a shorter step); None when already there."""
    if s >= MAX_PROJECTION_SPARSITY - 1e-9:
        return None
    return s + increment if s + increment <= MAX_PROJECTION_SPARSITY + 1e-9 else MAX_PROJECTION_SPARSITY


def greedy_path(choices: list, shares: np.ndarray, step: float) -> np.ndarray:
    """(len(choices) + 1, 7) per-projection sparsities after 0, 1, ... greedy steps."""
    path = np.zeros((len(choices) + 1, len(PROJECTIONS)))
    for i, j in enumerate(choices):
        path[i + 1] = path[i]
        path[i + 1, j] = next_sparsity(path[i, j], step / shares[j])
    return path


# ---------------------------------------------------------------------------- the sparsity file

def file_sha256(path: Path) -> str:
    """sha256 of a file, remembered beside it in <name>.sha256.json under its size and mtime, so
    a 16 GB checkpoint is hashed once rather than on every start (about 10 s each time). A file
    that changes gets another size or mtime and is hashed again; where the folder is read-only
    nothing is remembered."""
    path = Path(path)
    stat = path.stat()
    key = dict(size=stat.st_size, mtime_ns=stat.st_mtime_ns)
    sidecar = path.with_name(path.name + ".sha256.json")
    try:
        cached = json.loads(sidecar.read_text())
        if {k: cached.get(k) for k in key} == key and len(str(cached.get("sha256"))) == 64:
            return cached["sha256"]
    except (OSError, ValueError, AttributeError):
        pass  # no sidecar yet, or an unreadable one: hash the file
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    try:  # written whole or not at all (several ranks may start together)
        tmp = sidecar.with_name(f"{sidecar.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(dict(key, sha256=h.hexdigest())) + "\n")
        os.replace(tmp, sidecar)
    except OSError:
        pass
    return h.hexdigest()


def model_identity(model: Transformer, checkpoint_dir=None) -> dict:
    a = model.args
    weights = Path(checkpoint_dir) / "model.safetensors" if checkpoint_dir is not None else None
    return dict(n_layer=a.n_layer, dim=a.dim, n_head=a.n_head, n_kv_head=a.n_local_heads,
                intermediate_size=a.intermediate_size, head_dim=a.head_dim,
                sha256=file_sha256(weights) if weights is not None and weights.is_file() else None)


class SparsityFile:
    """Quantile tables + greedy paths of one model, and the thresholds of any level they imply."""

    def __init__(self, data: dict):
        self.data = data
        self.model = data["model"]
        self.quantiles = np.array([data["quantiles"][s] for s in STATE_NAMES]).transpose(1, 0, 2)  # (n_layer, 4, P)
        if list(data["quantile_p"]) != QUANTILE_P:
            raise ValueError("the file's quantile grid differs from this calibrate.py's: recalibrate")
        n_layer = self.model["n_layer"]
        if self.quantiles.shape != (n_layer, len(STATE_NAMES), len(QUANTILE_P)) or \
                (data.get("greedy") and len(data["greedy"]["choices"]) != n_layer):
            raise ValueError(f"its tables do not cover the {n_layer} layers it names (truncated or edited?)")
        self.modes = ("uniform", "greedy") if data.get("greedy") else ("uniform",)
        self.levels = list(data["levels"])
        self.paths = None
        if data.get("greedy"):
            g = data["greedy"]
            shares = np.array(g["shares"])
            self.paths = [greedy_path(c, shares, g["step"]) for c in g["choices"]]  # per layer (steps + 1, 7)
            # block sparsity of each path point, rounded so that k * step is exactly a path point
            self.path_levels = [np.round(path @ shares, 12) for path in self.paths]

    # levels -> sparsities -> thresholds
    def sparsities(self, level: float, mode: str) -> Tensor:
        """(n_layer, 7) intended fraction of each projection's input entries dropped at this level."""
        self._check(level, mode)
        n_layer = self.quantiles.shape[0]
        if mode == "uniform":
            return torch.full((n_layer, len(PROJECTIONS)), float(level), dtype=torch.float32)
        s = [[np.interp(level, b, path[:, j]) for j in range(len(PROJECTIONS))]
             for path, b in zip(self.paths, self.path_levels)]  # linear between the bracketing path points
        return torch.tensor(s, dtype=torch.float32)

    def thresholds(self, level: float, mode: str) -> Tensor:
        """(n_layer, 7) float32 thresholds in model.PROJECTIONS order; all zero at level 0."""
        s = self.sparsities(level, mode).double().numpy()
        t = np.array([[threshold_from_table(self.quantiles[l, STATE_OF[j]], s[l, j]) for j in range(len(PROJECTIONS))]
                      for l in range(s.shape[0])])
        return torch.tensor(t, dtype=torch.float32)

    def _check(self, level, mode):
        if mode not in self.modes:
            raise ValueError(f"sparsity mode {mode!r} is not in this file (it has {', '.join(self.modes)})"
                             + ("; it was calibrated without the greedy search (random tokens under tensor "
                                "parallelism): use --sparsity_mode uniform" if mode == "greedy" else ""))
        if not 0.0 <= level < 1.0:
            raise ValueError(f"sparsity level must be in [0, 1), got {level}")
        if level > MAX_LEVEL + 1e-9:
            raise ValueError(f"sparsity level {level} is above {MAX_LEVEL}, the highest calibrated level")

    # identity
    def check_model(self, model: Transformer, checkpoint_dir=None, path="sparsity file"):
        ours = model_identity(model)
        again = f"run `python calibrate.py --checkpoint_path {checkpoint_dir}`" if checkpoint_dir else \
            "calibrate this model with calibrate.py"
        for key in ("n_layer", "dim", "n_head", "n_kv_head", "intermediate_size"):
            if self.model.get(key) != ours[key]:
                raise ValueError(f"{path} was calibrated for a model with {key} {self.model.get(key)}, "
                                 f"this model has {key} {ours[key]}: {again} to make one for it")
        weights = Path(checkpoint_dir) / "model.safetensors" if checkpoint_dir is not None else None
        if self.model.get("sha256") and weights is not None and weights.is_file():
            digest = file_sha256(weights)
            if digest != self.model["sha256"]:
                raise ValueError(f"{path} was calibrated for other weights (model.safetensors sha256 "
                                 f"{self.model['sha256'][:12]}..., {weights} has {digest[:12]}...): {again}")

    @classmethod
    def load(cls, path, model: Transformer, checkpoint_dir=None) -> "SparsityFile":
        path = Path(path)
        if not path.is_file():
            where = f" --checkpoint_path {checkpoint_dir}" if checkpoint_dir else ""
            raise FileNotFoundError(f"sparsity file {path} not found: run `python calibrate.py{where} --out {path}` "
                                    f"to calibrate (for the default model: cp sparsity/SmolLM2-135M-Instruct.json "
                                    f"{path})")
        try:
            data = json.loads(path.read_text())
            if data.get("format") != FORMAT:
                raise KeyError("format")
            sf = cls(data)
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError, IndexError) as e:
            raise ValueError(f"{path} is not a {FORMAT} ({type(e).__name__}: {e}): recalibrate with "
                             f"calibrate.py") from None
        sf.check_model(model, checkpoint_dir, path)
        return sf

    def level_tables(self) -> dict:
        """For each mode and grid level: per layer, per projection, sparsity and threshold."""
        out = {}
        for mode in self.modes:
            out[mode] = [dict(level=p, sparsity=_round(self.sparsities(p, mode).tolist(), 4),
                              threshold=_round(self.thresholds(p, mode).tolist(), 4)) for p in self.levels]
        return out

    def save(self, path):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {k: v for k, v in self.data.items() if k != "modes"}
        data["modes"] = self.level_tables()
        path.write_text(dump_json(data) + "\n")

    @classmethod
    def for_random(cls, model: Transformer, n_seq: int = 16, seq_len: int = 512, greedy_seqs: int = 4,
                   greedy_positions: int = 64, step: float = 0.01, seed: int = 0) -> "SparsityFile":
        """Calibration on uniformly random tokens, for random-weight models (GPU benchmarks): the
        same code as a real calibration with fewer tokens (n_seq x seq_len for the statistics,
        greedy_seqs x greedy_positions for the greedy). About 7 s for Llama-3-8B shapes on an H200;
        on a CPU a coarse search (4 x 128 tokens, step 0.05; about a minute for SmolLM2 shapes).
        Under tensor parallelism (a sharded model) the greedy is skipped: uniform levels only."""
        device = model.tok_embeddings.weight.device
        if device.type == "cpu":  # smoke tests of random models on a CPU: a coarse, cheap search (none if none asked)
            n_seq, seq_len, greedy_seqs, greedy_positions, step = 4, 128, min(greedy_seqs, 2), 16, 0.05
        seq_len = min(seq_len, model.args.block_size)
        gen = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, model.args.vocab_size, (n_seq, seq_len), generator=gen)
        sharded = model.tp[1] > 1
        return calibrate(model, tokens.to(device), greedy_seqs=0 if sharded else greedy_seqs,
                         greedy_positions=greedy_positions, step=step, seed=seed, progress=False,
                         provenance=dict(source="random tokens", tokens=tokens.numel(), seq_len=seq_len))


def _round(x, digits):
    if isinstance(x, list):
        return [_round(v, digits) for v in x]
    return float(f"{x:.{digits}g}")


def dump_json(obj, indent: int = 0) -> str:
    """JSON with lists of numbers on one line each (compact, still diffable)."""
    pad, inner = " " * indent, " " * (indent + 1)
    if isinstance(obj, dict):
        items = [f"{inner}{json.dumps(k)}: {dump_json(v, indent + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}" if items else "{}"
    if isinstance(obj, list) and obj and all(isinstance(v, (dict, list)) for v in obj):
        return "[\n" + ",\n".join(inner + dump_json(v, indent + 1) for v in obj) + "\n" + pad + "]"
    return json.dumps(obj, separators=(",", ":"))


# ---------------------------------------------------------------------------- calibration

def equal_batches(n: int, batch_size: int) -> int:
    """The largest batch size <= batch_size that divides n (static KV caches want equal batches)."""
    return max(b for b in range(1, min(batch_size, n) + 1) if n % b == 0)


@torch.no_grad()
def calibrate(model: Transformer, tokens: Tensor, *, greedy_seqs: int = 8, greedy_positions: int = 32,
              step: float = 0.01, batch_size: int = 8, seed: int = 0, provenance: Optional[dict] = None,
              checkpoint_dir=None, progress: bool = True) -> SparsityFile:
    """Statistics on tokens (n_seq, seq_len), then the greedy on greedy_seqs of those sequences
    (spread over the set) at greedy_positions random query positions each (0: no greedy)."""
    from tqdm import tqdm

    n_seq, L = tokens.shape
    if greedy_seqs > n_seq:
        raise ValueError(f"greedy wants {greedy_seqs} sequences but calibration has only {n_seq}")
    if not 0 < step <= 0.1:
        raise ValueError(f"greedy step must be in (0, 0.1], got {step}")
    device = model.tok_embeddings.weight.device
    tokens = tokens.to(device)
    bs = equal_batches(n_seq, batch_size)
    model.setup_caches(bs, L)
    pos = torch.arange(L, device=device)
    mask = torch.arange(model.max_seq_length, device=device)[None, :] <= pos[:, None]  # as Transformer.forward
    freqs_cis = model.freqs_cis[pos]
    gen = torch.Generator().manual_seed(seed)
    greedy_idx = torch.linspace(0, n_seq - 1, greedy_seqs).round().long().to(device) if greedy_seqs else None
    positions = torch.randperm(L, generator=gen)[:min(greedy_positions, L)].sort().values.to(device)
    shares = projection_shares(model)

    stats = ActivationStats(model.args.n_layer, device)
    tables, choices = [], []
    x = model.tok_embeddings(tokens)  # (n_seq, L, D): every block's input, one block at a time
    t0 = time.perf_counter()
    seconds_greedy = 0.0
    bar = tqdm(model.layers, desc="calibrating", disable=not progress, unit="block")
    for layer, block in enumerate(bar):
        x_next = torch.empty_like(x)
        for start in range(0, n_seq, bs):
            x_next[start:start + bs] = block(x[start:start + bs], freqs_cis, mask, pos, False,
                                             stats)
        tables.append(stats.table(layer))
        stats.hist[layer] = None  # free the histograms
        if greedy_seqs:
            t_greedy = time.perf_counter()
            probe = BlockProbe(block, x[greedy_idx], positions, freqs_cis)
            choices.append(greedy_block(probe, tables[-1], shares, step))
            seconds_greedy += time.perf_counter() - t_greedy
            bar.set_postfix(last=",".join(PROJECTIONS[j] for j in choices[-1][-3:]))
        x = x_next
    seconds = time.perf_counter() - t0
    model.max_batch_size = model.max_seq_length = -1  # the next setup_caches allocates what its caller needs

    data = dict(
        format=FORMAT,
        model=model_identity(model, checkpoint_dir),
        calibration=dict(**(provenance or {}), date=datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"), seed=seed, statistics_tokens=int(tokens.numel()),
            greedy_tokens=int(greedy_seqs * len(positions)), greedy_seqs=greedy_seqs,
            greedy_positions=len(positions), greedy_error="mean squared error of the block output",
            device=str(device), dtype=str(model.tok_embeddings.weight.dtype).replace("torch.", ""),
            seconds=round(seconds, 1), seconds_greedy=round(seconds_greedy, 1)),
        projections=list(PROJECTIONS),
        states={s: list(p) for s, p in STATES.items()},
        quantile_p=QUANTILE_P,
        quantiles={s: [t[i].tolist() for t in tables] for i, s in enumerate(STATE_NAMES)},
        greedy=dict(step=step, shares=_round(shares.tolist(), 17), max_projection_sparsity=MAX_PROJECTION_SPARSITY,
                    choices=choices) if greedy_seqs else None,
        levels=LEVELS,
    )
    return SparsityFile(data)


# ---------------------------------------------------------------------------- CLI

def summary(sf: SparsityFile, levels=(0.25, 0.4, 0.5, 0.6, 0.9)) -> str:
    lines = ["mode     level  " + "  ".join(f"{s:>8}" for s in STATE_NAMES) + "   (mean sparsity over blocks)"]
    for mode in sf.modes:
        for p in levels:
            s = sf.sparsities(p, mode)
            per_state = [float(s[:, [PROJECTIONS.index(q) for q in STATES[st]]].mean()) for st in STATE_NAMES]
            lines.append(f"{mode:<8} {p:5.2f}  " + "  ".join(f"{v:8.3f}" for v in per_state))
    return "\n".join(lines)


def main(argv=None):
    from generate import DEFAULT_CHECKPOINT, DTYPES, default_device, run_cli

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint_path", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--data", default="wiki-calib", help="wiki-calib (default), news, a text file, hf:c4, ...")
    parser.add_argument("--tokens", type=int, default=65536, help="tokens for the |x| statistics")
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--greedy_tokens", type=int, default=256,
                        help="scored positions for the greedy: --greedy_seqs sequences x this / greedy_seqs")
    parser.add_argument("--greedy_seqs", type=int, default=8, help="calibration sequences the greedy uses")
    parser.add_argument("--step", type=float, default=0.01, help="greedy base step in block sparsity")
    parser.add_argument("--out", type=Path, default=None, help="default: <checkpoint>/sparsity.json")
    parser.add_argument("--device", default=default_device(), help="cuda when present (as generate.py)")
    parser.add_argument("--precision", choices=sorted(DTYPES), default="fp32",
                        help="fp32 by default on every device: the statistics are the thresholds")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    run_cli(run, parser.parse_args(argv))


def run(args):
    from data import calibration_tokens
    from generate import DTYPES, load_model, refuse_directory
    from tokenizer import load_tokenizer

    refuse_directory(args.out, "sparsity.json")
    if args.tokens < args.seq_len or args.seq_len < 2:
        raise ValueError(f"--tokens ({args.tokens}) must be at least --seq_len ({args.seq_len}), which must be >= 2")
    if args.batch_size < 1:
        raise ValueError("--batch_size must be at least 1")
    if args.greedy_seqs < 1 or args.greedy_tokens < args.greedy_seqs:
        raise ValueError("--greedy_seqs must be >= 1 and --greedy_tokens >= --greedy_seqs")
    t0 = time.perf_counter()
    model = load_model(args.checkpoint_path, args.device, DTYPES[args.precision])
    tokens = calibration_tokens(load_tokenizer(args.checkpoint_path, model.args.vocab_size), args.data, args.tokens,
                                args.seq_len)
    print(f"{args.data}: {tokens.shape[0]} sequences x {tokens.shape[1]} tokens", flush=True)
    sf = calibrate(model, tokens, greedy_seqs=args.greedy_seqs,
                   greedy_positions=math.ceil(args.greedy_tokens / args.greedy_seqs), step=args.step,
                   batch_size=args.batch_size, seed=args.seed, checkpoint_dir=args.checkpoint_path,
                   provenance=dict(source=args.data, tokens=int(tokens.numel()), seq_len=args.seq_len))
    out = args.out or args.checkpoint_path / "sparsity.json"
    sf.save(out)
    print(summary(sf))
    print(f"Calibrated in {time.perf_counter() - t0:.0f} s on {args.device}; wrote {out} "
          f"({out.stat().st_size / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
