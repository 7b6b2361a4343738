"""TEAL outside the kernels: the sparsity file and the meter of the sparsity a run reached.

The sparsity file (written by calibrate.py, read by every CLI) holds, per block, the |x| quantile
tables of the four sparsified states and the block-wise greedy path; a model-wide level p becomes
per-projection sparsities (greedy: the path's point at block sparsity p; uniform: p everywhere) and
those become thresholds by reading the tables. An input entry is kept iff |x| > threshold, so
level 0 (every threshold 0) keeps every nonzero entry.

The meter counts, on real text, the entries each projection drops at the thresholds in use.
"""
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from fileio import atomic_write
from model import PROJECTIONS, STATES, Transformer, projection_params, scales_of

FORMAT = "teal-fast sparsity file v1"
STATE_NAMES = tuple(STATES)  # attn_in, attn_out, mlp_in, mlp_mid
STATE_OF = [STATE_NAMES.index(next(s for s, projs in STATES.items() if p in projs)) for p in PROJECTIONS]
# p grid of the quantile tables: by 0.01 to 0.9, by 0.005 to 0.99, then 0.995, 0.999 and the maximum
QUANTILE_P = [i / 100 for i in range(90)] + [i / 200 for i in range(180, 199)] + [0.995, 0.999, 1.0]
LEVELS = [round(i * 0.025, 4) for i in range(37)]  # 0.00 .. 0.90
MAX_LEVEL = 0.9
MAX_PROJECTION_SPARSITY = 1.0



# ---------------------------------------------------------------------------- levels -> thresholds

def threshold_from_table(table_row: np.ndarray, sparsity) -> np.ndarray:
    """Threshold(s) dropping a fraction `sparsity` of entries: the quantile table read at p = s."""
    return np.interp(sparsity, QUANTILE_P, table_row)



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
        with atomic_write(sidecar) as tmp:
            tmp.write_text(json.dumps(dict(key, sha256=h.hexdigest())) + "\n")
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
            out[mode] = [dict(level=p, sparsity=round_digits(self.sparsities(p, mode).tolist(), 4),
                              threshold=round_digits(self.thresholds(p, mode).tolist(), 4)) for p in self.levels]
        return out

    def save(self, path):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {k: v for k, v in self.data.items() if k != "modes"}
        data["modes"] = self.level_tables()
        with atomic_write(path) as tmp:  # an interrupted save leaves the previous file as it was
            tmp.write_text(dump_json(data) + "\n")


def round_digits(x, digits):
    if isinstance(x, list):
        return [round_digits(v, digits) for v in x]
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



# ---------------------------------------------------------------------------- realized sparsity

@dataclass
class RealizedSparsity:
    per_projection: Tensor  # (n_layer, 7): fraction of input entries dropped for each projection
    weights: Tensor  # (7,) parameters per projection

    @property
    def model_wide(self) -> float:
        """Fraction of block linear weights skipped, weighted by parameters."""
        w = self.weights.to(self.per_projection)
        return float((self.per_projection * w).sum() / (w.sum() * self.per_projection.shape[0]))

    def per_state(self) -> dict:
        out = {}
        for state, projs in STATES.items():
            idx = [PROJECTIONS.index(p) for p in projs]
            w = self.weights[idx].to(self.per_projection)
            out[state] = float((self.per_projection[:, idx] * w).sum() / (w.sum() * self.per_projection.shape[0]))
        return out


class SparsityMeter:
    """Observer that counts, per layer and projection, the input entries with |x| <= threshold."""

    def __init__(self, model: Transformer):
        self.model = model
        self.dropped = torch.zeros(model.args.n_layer, len(PROJECTIONS), dtype=torch.float64)
        self.total = torch.zeros(model.args.n_layer, len(PROJECTIONS), dtype=torch.float64)

    def __call__(self, layer: int, state: str, x: Tensor):
        thresholds = self.model.layers[layer].thresholds
        magnitude = x.detach().abs().float()
        for proj in STATES[state]:
            j = PROJECTIONS.index(proj)
            self.dropped[layer, j] += float((magnitude <= thresholds[j]).sum())
            self.total[layer, j] += magnitude.numel()

    def result(self) -> RealizedSparsity:
        """Under tensor parallelism every rank must call this: a rank sees only its slice of the o
        and down inputs and holds only its share of the weights, so both are summed over ranks."""
        counts = torch.stack([self.dropped, self.total, projection_params(self.model).expand_as(self.total)])
        group = self.model.layers[0].attention.tp_group  # None unless sharded over several ranks
        if group is not None:
            summed = counts.to(self.model.tok_embeddings.weight.device)
            dist.all_reduce(summed, group=group)
            counts = summed.cpu()
        dropped, total, params = counts
        return RealizedSparsity(dropped / total.clamp(min=1), params[0])


@torch.no_grad()
def forward_window(model: Transformer, tokens: Tensor, prompt_len: int, sparse_tail: bool, meter=None) -> Tensor:
    """tokens (B, L) -> logits (B, L, V). Positions < prompt_len are a dense prefill; the rest
    are one more forward, sparse when sparse_tail (the computation of decode steps, batched)."""
    B, L = tokens.shape
    model.setup_caches(B, L)
    saved = (model.sparse_prefill, model.sparse_decode)
    pos = torch.arange(L, device=tokens.device)
    try:
        model.sparse_prefill = model.sparse_decode = False
        parts = [model(tokens[:, :prompt_len], pos[:prompt_len])] if prompt_len > 0 else []
        if prompt_len < L:
            model.sparse_prefill = model.sparse_decode = sparse_tail
            model.observer = meter
            parts.append(model(tokens[:, prompt_len:], pos[prompt_len:]))
    finally:
        model.sparse_prefill, model.sparse_decode = saved
        model.observer = None
    return torch.cat(parts, dim=1)


def measure_sparsity(model: Transformer, seq: Tensor, prompt_len: int) -> RealizedSparsity:
    """Realized sparsity of a generation: seq (B, T) re-run eagerly, prompt dense, the rest sparse
    exactly as decode steps compute it."""
    meter = SparsityMeter(model)
    forward_window(model, seq, prompt_len, sparse_tail=True, meter=meter)
    return meter.result()


def weight_bytes_per_token(model: Transformer, sparsity: Optional[Tensor] = None) -> float:
    """Bytes of weights one decode step reads: every block linear (times 1 - its input
    sparsity when given, (n_layer, 7)), the norms and the LM head; the embedding row is noise.
    Quantized weights count their stored bytes and their scales (int4: the scales of every group)."""
    n_layer = len(model.layers)
    kept = torch.ones(n_layer, 7, dtype=torch.float64) if sparsity is None else 1.0 - sparsity.double().cpu()
    attn = model.layers[0].attention
    per_weight = stored_bytes(attn, "wqkv_t") / (attn.wqkv_t.shape[0] * sum(attn.splits))
    total = float((kept * projection_params(model)).sum()) * per_weight
    norm = model.layers[0].attention_norm.weight
    total += n_layer * 2 * norm.numel() * norm.element_size()
    if hasattr(model, "output_t"):
        head = stored_bytes(model, "output_t")
    else:
        weight = model.tok_embeddings.weight if model.output is None else model.output.weight
        head = weight.numel() * weight.element_size()
    return total + head + model.norm.weight.numel() * model.norm.weight.element_size()


def stored_bytes(module, name: str) -> int:
    """Bytes of W^T `name` as stored on module, its scales included (model.add_weight)."""
    tensors = [getattr(module, name), *scales_of(module, name)]
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)
