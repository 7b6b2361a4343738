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
about 5 minutes on 2 CPU cores (the file records its own time).
"""
import argparse
import datetime
import math
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from data import calibration_tokens
from loader import DEFAULT_CHECKPOINT, DTYPES, default_device, load_model, refuse_directory, run_cli
from model import PROJECTIONS, STATES, Transformer, projection_params
from teal import (FORMAT, MAX_LEVEL, MAX_PROJECTION_SPARSITY, QUANTILE_P, LEVELS, STATE_NAMES, STATE_OF, SparsityFile,
                  round_digits, model_identity, next_sparsity, threshold_from_table)
from tokenizer import load_tokenizer

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


# ---------------------------------------------------------------------------- block-wise greedy

def projection_shares(model: Transformer) -> np.ndarray:
    """(7,) each projection's fraction of a block's linear parameters, from the weight shapes."""
    params = projection_params(model).numpy()
    return params / params.sum()


class BlockProbe:
    """One block evaluated at sampled query positions of dense input sequences, with per-projection
    thresholds, through the block's own pieces (Attention.project_one, to_heads, attend, project_out;
    FeedForward.project_one, project_down: the code a forward runs, one projection at a time). Keys
    and values cover every position (the context); q, o and the MLP run only at the sampled
    positions. Partial results of the current allocation are cached, so a candidate recomputes only
    what it changes (an MLP candidate never touches attention)."""

    def __init__(self, block, x: Tensor, positions: Tensor, freqs_cis: Tensor):
        # x (B, L, D) dense block inputs; positions (M,) sampled query positions; freqs_cis (>= L, hd/2, 2)
        self.block, self.attn, self.ffn = block, block.attention, block.feed_forward
        L = x.shape[1]
        self.x, self.x_at = x, x[:, positions]  # (B, L, D), (B, M, D)
        self.freqs_all, self.freqs_at = freqs_cis[:L], freqs_cis[positions]
        self.mask = positions[:, None] >= torch.arange(L, device=x.device)[None, :]  # (M, L)
        self.t = [0.0] * len(PROJECTIONS)
        self.cache = self.full(self.t)
        self.memo = {}  # attention outputs of q/k/v candidates: valid until an attention threshold changes
        self.reference = self.cache["out"]  # the dense block output at the sampled positions

    def threshold(self, t: list, j: int) -> Tensor:
        return torch.tensor(t[j:j + 1], dtype=torch.float32, device=self.x.device)

    # pieces (every projection sparse: a threshold of 0 keeps every nonzero entry)
    def q(self, t):  # (B, H, M, hd)
        return self.attn.to_heads(self.attn.project_one("q", self.x_at, self.block.attention_norm,
                                                        self.threshold(t, 0), True), self.freqs_at)

    def k(self, t):  # (B, KV, L, hd)
        return self.attn.to_heads(self.attn.project_one("k", self.x, self.block.attention_norm,
                                                        self.threshold(t, 1), True), self.freqs_all)

    def v(self, t):  # (B, KV, L, hd)
        return self.attn.to_heads(self.attn.project_one("v", self.x, self.block.attention_norm,
                                                        self.threshold(t, 2), True))

    def after_attention(self, y, t):  # the rest of the block from the o input, all thresholds t
        h = self.attn.project_out(y, self.x_at, self.threshold(t, 3), True)
        gate, up = (self.ffn.project_one(part, h, self.block.ffn_norm, self.threshold(t, j), True)
                    for part, j in (("gate", 4), ("up", 5)))
        return dict(y=y, h=h, gate=gate, up=up, **self.down(h, gate, up, t))

    def down(self, h, gate, up, t):
        return dict(out=self.ffn.project_down(torch.cat([gate, up], dim=-1), h, self.threshold(t, 6), True))

    def full(self, t):
        q, k, v = self.q(t), self.k(t), self.v(t)
        return dict(q=q, k=k, v=v, **self.after_attention(self.attn.attend(q, k, v, self.mask), t))

    def candidate(self, j: int, t: list) -> dict:
        """Cache entries that change when projection j's threshold becomes t[j] (t: all seven)."""
        c = self.cache
        if j < 3:
            key = (j, *t[:3])
            if key not in self.memo:
                qkv = dict(q=c["q"], k=c["k"], v=c["v"])
                name = "qkv"[j]
                qkv[name] = getattr(self, name)(t)
                self.memo[key] = (name, qkv[name], self.attn.attend(qkv["q"], qkv["k"], qkv["v"], self.mask))
            name, new, y = self.memo[key]
            return {name: new, **self.after_attention(y, t)}
        if j == 3:
            return self.after_attention(c["y"], t)
        if j == 4:
            gate = self.ffn.project_one("gate", c["h"], self.block.ffn_norm, self.threshold(t, 4), True)
            return dict(gate=gate, **self.down(c["h"], gate, c["up"], t))
        if j == 5:
            up = self.ffn.project_one("up", c["h"], self.block.ffn_norm, self.threshold(t, 5), True)
            return dict(up=up, **self.down(c["h"], c["gate"], up, t))
        return self.down(c["h"], c["gate"], c["up"], t)

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
        greedy=dict(step=step, shares=round_digits(shares.tolist(), 17), max_projection_sparsity=MAX_PROJECTION_SPARSITY,
                    choices=choices) if greedy_seqs else None,
        levels=LEVELS,
    )
    return SparsityFile(data)


def calibrate_random(model: Transformer, n_seq: int = 16, seq_len: int = 512, greedy_seqs: int = 4,
                     greedy_positions: int = 64, step: float = 0.01, seed: int = 0) -> SparsityFile:
    """Calibration on uniformly random tokens, for random-weight models (GPU benchmarks): the
    same code as a real calibration with fewer tokens (n_seq x seq_len for the statistics,
    greedy_seqs x greedy_positions for the greedy). A few seconds for Llama-3-8B shapes on a GPU;
    on a CPU a coarse search (4 x 128 tokens, step 0.05) for smoke tests. Under tensor parallelism
    (a sharded model) the greedy is skipped: uniform levels only."""
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
    run_cli(run, parser.parse_args(argv), "calibrating")


def run(args):
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
