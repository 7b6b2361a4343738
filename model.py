"""A Llama-architecture decoder in the gpt-fast style, with TEAL activation sparsity.

Every linear weight inside a block is stored transposed, (K_in, N_out), so the
weights of one input channel are one contiguous row: a zeroed input entry means a
row the sparse kernels never read. Each block holds its seven TEAL thresholds
[q, k, v, o, gate, up, down] as a float32 buffer; a new sparsity level is a copy
into those buffers, never a recompile. The model reads no files: loaders hand it
tensors (see loader.load_model).
"""
import math
from dataclasses import asdict, dataclass, fields
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from sparse_kernels import (decode_attention, decode_attention_step, dequantize, dequantize_int4, out_features,
                            rms_norm, rope, silu_mul, sparse_linear, sparse_silu_down, weight_columns)
from sparse_kernels.cpu import linear as cpu_linear
from sparse_kernels.cpu import usable as cpu_kernel_usable

PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
# The four hidden states TEAL sparsifies and the projections each one feeds.
STATES = {"attn_in": ("q", "k", "v"), "attn_out": ("o",), "mlp_in": ("gate", "up"), "mlp_mid": ("down",)}


@dataclass
class ModelArgs:
    block_size: int = 2048
    vocab_size: int = 32000
    n_layer: int = 32
    n_head: int = 32
    dim: int = 4096
    intermediate_size: Optional[int] = None
    n_local_heads: int = -1  # key/value heads; -1 means n_head (no GQA)
    head_dim: Optional[int] = None
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    rope_scaling: Optional[dict] = None  # Llama-3.1 style: factor, low/high_freq_factor, original_max_position_embeddings
    tie_embeddings: bool = False
    # weight-only (quantize.py): {"mode": "int8"} or {"mode": "int4", "groupsize": G}; "tied_head": "int8" where a tied
    # model's LM head reads an int8 copy of the embedding table (output_t), the table itself kept for lookups
    quantization: Optional[dict] = None

    def __post_init__(self):
        if self.n_local_heads == -1:
            self.n_local_heads = self.n_head
        if self.intermediate_size is None:  # Llama's rule: 2/3 of 4*dim, rounded up to a multiple of 256
            hidden = int(2 * 4 * self.dim / 3)
            self.intermediate_size = 256 * math.ceil(hidden / 256)
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_head
        if self.n_head % self.n_local_heads:
            raise ValueError(f"n_head={self.n_head} is not a multiple of n_local_heads={self.n_local_heads}")
        if self.quantization is not None:
            check_quantization(self.quantization, self.weight_rows())
            if self.quantization.get("tied_head") and not self.tie_embeddings:
                raise ValueError(f"quantization {self.quantization!r}: tied_head is for a model whose head is its "
                                 f"embedding table (tie_embeddings), and this one has its own")

    def weight_rows(self) -> dict:
        """K (rows of W^T) of each block projection and of an untied LM head, by weight name."""
        rows = dict(wqkv_t=self.dim, wo_t=self.n_head * self.head_dim, w13_t=self.dim, w2_t=self.intermediate_size)
        return rows if self.tie_embeddings else dict(rows, output_t=self.dim)

    def head_quantization(self) -> Optional[dict]:
        """How a quantized model's LM head is stored as its own W^T, output_t (D, V): untied, as the
        blocks; tied, as quantization["tied_head"] says (an int8 copy of the table). None: no output_t."""
        if self.quantization is None:
            return None
        if not self.tie_embeddings:
            return self.quantization
        tied = self.quantization.get("tied_head")
        return None if tied is None else {"mode": tied}

    @classmethod
    def from_dict(cls, d: dict) -> "ModelArgs":
        """A checkpoint's config (its config.json): every field of CHECKPOINT_FIELDS given, of its type.
        Unlike from_name, nothing is defaulted: a wrong guess (a rotary base, say) still runs and gives
        fluent-looking garbage."""
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown fields {sorted(unknown)}; expected a subset of {sorted(known)}")
        missing = [k for k in CHECKPOINT_FIELDS if k not in d]
        if missing:
            raise ValueError(f"missing {', '.join(map(repr, missing))} (every hyperparameter that changes the "
                             f"math must be given; none is defaulted)")
        for key, kind in CHECKPOINT_FIELDS.items():
            if not valid_field(d[key], kind):
                raise ValueError(f"{key!r} must be {FIELD_KINDS[kind]}, got {d[key]!r}")
        return cls(**d)

    @classmethod
    def from_name(cls, name: str) -> "ModelArgs":
        if name in transformer_configs:
            return cls(**transformer_configs[name])
        # Like gpt-fast: accept a path or HF repo id that contains a config name; longest match wins.
        matches = [c for c in transformer_configs if c.lower() in name.lower()]
        if not matches:
            raise ValueError(f"unknown model config {name!r}; choose one of: {', '.join(transformer_configs)}")
        return cls(**transformer_configs[max(matches, key=len)])

    def to_dict(self) -> dict:
        return asdict(self)


# The fields a checkpoint's config.json must give (ModelArgs.from_dict), with their JSON kind. Each changes
# the model's output: the shapes (the weights' shapes do not pin them all down: 9 heads of 64 and 18 of 32
# give the same tensors), the rotary base and scaling, the norm epsilon, whether the head is the embedding,
# and block_size (the longest sequence, the length of the rotary table). Fields not listed are optional:
# quantization absent means float weights (its value is checked in __post_init__).
CHECKPOINT_FIELDS = dict(block_size="count", vocab_size="count", n_layer="count", n_head="count", dim="count",
                         intermediate_size="count", n_local_heads="count", head_dim="count", rope_base="positive",
                         norm_eps="positive", rope_scaling="scaling", tie_embeddings="bool")
ROPE_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
FIELD_KINDS = dict(count="a positive integer", positive="a positive number", bool="true or false",
                   scaling=f"null or an object of the numbers {', '.join(ROPE_SCALING_KEYS)}")


def valid_field(v, kind: str) -> bool:
    if kind == "bool":
        return isinstance(v, bool)
    if kind == "scaling":
        return v is None or (isinstance(v, dict) and sorted(v) == sorted(ROPE_SCALING_KEYS) and
                             all(valid_field(v[k], "positive") for k in ROPE_SCALING_KEYS))
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        return False
    return kind == "positive" or isinstance(v, int)


_llama3 = dict(vocab_size=128256, n_local_heads=8, rope_base=500000.0)
_llama31_scaling = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
_llama32_scaling = dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
_smollm2 = dict(vocab_size=49152, rope_base=100000.0, tie_embeddings=True, block_size=8192)

transformer_configs = {
    "Llama-2-7b": dict(block_size=4096, n_layer=32, n_head=32, dim=4096, intermediate_size=11008),
    "Llama-2-13b": dict(block_size=4096, n_layer=40, n_head=40, dim=5120, intermediate_size=13824),
    "Llama-2-70b": dict(block_size=4096, n_layer=80, n_head=64, n_local_heads=8, dim=8192, intermediate_size=28672),
    "CodeLlama-7b": dict(block_size=16384, vocab_size=32016, n_layer=32, n_head=32, dim=4096,
                         intermediate_size=11008, rope_base=1000000.0),
    "CodeLlama-34b": dict(block_size=16384, n_layer=48, n_head=64, n_local_heads=8, dim=8192,
                          intermediate_size=22016, rope_base=1000000.0),
    "Llama-3-8B": dict(block_size=8192, n_layer=32, n_head=32, dim=4096, intermediate_size=14336, **_llama3),
    "Llama-3-70B": dict(block_size=8192, n_layer=80, n_head=64, dim=8192, intermediate_size=28672, **_llama3),
    "Llama-3.1-8B": dict(block_size=131072, n_layer=32, n_head=32, dim=4096, intermediate_size=14336,
                         rope_scaling=_llama31_scaling, **_llama3),
    "Llama-3.1-70B": dict(block_size=131072, n_layer=80, n_head=64, dim=8192, intermediate_size=28672,
                          rope_scaling=_llama31_scaling, **_llama3),
    "Llama-3.2-1B": dict(block_size=131072, n_layer=16, n_head=32, dim=2048, intermediate_size=8192,
                         head_dim=64, tie_embeddings=True, rope_scaling=_llama32_scaling, **_llama3),
    "Llama-3.2-3B": dict(block_size=131072, n_layer=28, n_head=24, dim=3072, intermediate_size=8192,
                         head_dim=128, tie_embeddings=True, rope_scaling=_llama32_scaling, **_llama3),
    "Mistral-7B": dict(block_size=32768, n_layer=32, n_head=32, n_local_heads=8, dim=4096,
                       intermediate_size=14336, vocab_size=32000),
    "TinyLlama-1.1B": dict(block_size=2048, n_layer=22, n_head=32, n_local_heads=4, dim=2048,
                           intermediate_size=5632),
    "SmolLM2-135M": dict(n_layer=30, n_head=9, n_local_heads=3, dim=576, intermediate_size=1536, **_smollm2),
    "SmolLM2-360M": dict(n_layer=32, n_head=15, n_local_heads=5, dim=960, intermediate_size=2560, **_smollm2),
    "SmolLM2-1.7B": dict(n_layer=24, n_head=32, n_local_heads=32, dim=2048, intermediate_size=8192,
                         **{**_smollm2, "rope_base": 130000.0}),
}


class KVCache(nn.Module):
    """Static cache: (B, n_kv_heads, max_seq_length, head_dim) per block."""

    def __init__(self, max_batch_size, max_seq_length, n_kv_heads, head_dim, dtype):
        super().__init__()
        shape = (max_batch_size, n_kv_heads, max_seq_length, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor):
        # input_pos (T,), k/v (B, KV, T, hd)
        self.k_cache.index_copy_(2, input_pos, k)
        self.v_cache.index_copy_(2, input_pos, v)
        return self.k_cache, self.v_cache


QUANTIZATION_MODES = ("int8", "int4")


def check_quantization(quantization: dict, rows: dict) -> None:
    """A known mode; int4's groupsize a power of two >= 16 that divides every weight's K; tied_head, if
    given, "int8"."""
    mode = quantization.get("mode") if isinstance(quantization, dict) else None
    if mode not in QUANTIZATION_MODES:
        raise ValueError(f"quantization {quantization!r}: mode must be one of {', '.join(QUANTIZATION_MODES)}")
    if quantization.get("tied_head", "int8") != "int8":
        raise ValueError(f"quantization {quantization!r}: tied_head must be \"int8\" (absent: the float table "
                         f"is the head)")
    if mode == "int4":
        group = quantization.get("groupsize")
        if not isinstance(group, int) or group < 16 or group & (group - 1):
            raise ValueError(f"int4 groupsize {group!r} must be a power of two of at least 16 (e.g. 32, 64, 128)")
        odd = {name: K for name, K in rows.items() if K % group}
        if odd:
            common = math.gcd(*rows.values())
            largest = common & -common  # the largest power of two dividing every K
            hint = f"the largest groupsize this model takes is {largest}" if largest >= 16 else \
                "no int4 groupsize fits this model: use int8"
            raise ValueError(f"int4 groupsize {group} does not divide K of {', '.join(f'{n} ({k})' for n, k in odd.items())}"
                             f"; {hint}")


def add_weight(module: nn.Module, name: str, K: int, N: int, quantization: Optional[dict] = None, device=None):
    """Register W^T `name` (K, N) on module (again, to reshape it): a float Parameter, or its stored
    quantized form with buffers `name`_scale and `name`_zero (None where the mode has none):
    int8 (K, N) with an fp32 scale (N,); int4 as uint8 (K, N / 2) with bf16 scale and zero (K / G, N)."""
    mode = None if quantization is None else quantization["mode"]
    scale = zero = None
    if mode is None:
        weight = torch.empty(K, N, device=device)
    elif mode == "int8":
        weight, scale = torch.empty(K, N, dtype=torch.int8, device=device), torch.empty(N, device=device)
    else:
        groups = K // quantization["groupsize"]
        weight = torch.empty(K, N // 2, dtype=torch.uint8, device=device)
        scale, zero = (torch.empty(groups, N, dtype=torch.bfloat16, device=device) for _ in range(2))
    setattr(module, name, nn.Parameter(weight, requires_grad=False))
    module.register_buffer(f"{name}_scale", scale)
    module.register_buffer(f"{name}_zero", zero)


def scales_of(module: nn.Module, name: str) -> tuple:
    """(scale, zero) of W^T `name`: (None, None) for float weights."""
    return getattr(module, f"{name}_scale"), getattr(module, f"{name}_zero")


def columns_of(module: nn.Module, name: str, start: int, end: int) -> tuple:
    """Columns start..end of W^T `name` as stored, and their (scale, zero): views, no copy (int4: an
    even range, sparse_kernels.weight_columns)."""
    w, *quant = weight_columns(getattr(module, name), *scales_of(module, name), start, end)
    return w, tuple(quant)


def keeps_stored_dtype(name: str, t: Tensor) -> bool:
    """Whether a checkpoint tensor loads in its stored dtype rather than the model's: quantized
    weights (integers) and their scales."""
    return not t.is_floating_point() or name.endswith(("_scale", "_zero"))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


def fused_dense(x: Tensor, w_t: Tensor) -> bool:
    """Whether a dense projection of x (B, T, K) takes the fused op: a decode step (T == 1) on CUDA,
    and on the CPU any B * T <= 8 rows its kernel takes (sparse_kernels.cpu: fp32/bf16, int8 weights).
    On CUDA the matvec, its norm and its residual add are one launch of the dense kernel (its first weight
    rows requested before the input is ready; more than 8 sequences take the op's torch math). On
    the CPU they are one call that streams W^T about as fast as MKL's fp32 matvec; in bf16 oneDNN
    took 25 ms for a 6-token prompt's 576x3072 product (AVX2, no native bf16), the kernel reads
    the weights once for all rows. Longer prompts' matmuls are compute-bound and stay with the BLAS."""
    if x.is_cuda:
        return x.dim() == 3 and x.shape[1] == 1
    return cpu_kernel_usable(x.reshape(-1, x.shape[-1]), w_t)


def linear_t(x: Tensor, w_t: Tensor, thresholds: Optional[Tensor], splits: list, sparse: bool,
             norm: Optional[RMSNorm] = None, residual: Optional[Tensor] = None, quant: tuple = (None, None),
             fused: bool = True) -> Tensor:
    """[residual +] norm(x) (..., K) @ w_t (K, N); if sparse, input entries with |norm(x)| <=
    threshold of the output segment are dropped first (TEAL). Sparse, and dense decode steps on
    CUDA (unless fused is False): one fused kernel with the norm and the residual add
    (sparse_kernels.sparse_linear, the one semantics). Otherwise torch's product (cuBLAS on a GPU);
    quantized weights (quant: their (scale, zero), see add_weight) dequantized for it."""
    N = sum(splits)
    if not sparse and not (fused and fused_dense(x, w_t)):
        y = torch_product(x if norm is None else norm(x), w_t, quant)
        return y if residual is None else residual + y
    lead = x.shape[:-1]
    y = sparse_linear(x.reshape(-1, x.shape[-1]), w_t, thresholds if sparse else None, splits,
                      norm_weight=None if norm is None else norm.weight, eps=0.0 if norm is None else norm.eps,
                      residual=None if residual is None else residual.reshape(-1, N), scale=quant[0], zero=quant[1])
    return y.view(*lead, N)


def torch_product(x: Tensor, w_t: Tensor, quant: tuple) -> Tensor:
    """x (..., K) @ w_t in torch: float weights as they are; int8 as gpt-fast computes it, the product
    with the weights cast to x's dtype, then the column scales; int4 dequantized to x's dtype first.
    Traced by torch.compile, int4 is the reference's unpacking, for inductor to fuse (the compiled
    anchor stays torch's own code); eager, torch's ops make several fp32 copies of the matrix, so on
    CUDA one kernel reads the packed bytes and writes it (docs/kernels.md: what that saves)."""
    scale, zero = quant
    if scale is None:
        return x @ w_t
    if zero is None:
        return (x @ w_t.to(x.dtype)) * scale.to(x.dtype)
    if torch.compiler.is_compiling():
        return x @ dequantize(w_t, scale, zero).to(x.dtype)
    return x @ dequantize_int4(w_t, scale, zero, x.dtype)


def silu_down_t(gate_up: Tensor, w_t: Tensor, threshold: Tensor, sparse: bool, residual: Optional[Tensor] = None,
                quant: tuple = (None, None), fused: bool = True) -> Tensor:
    """[residual +] silu(gate) * up (..., I) @ w_t (I, N) from gate_up (..., 2I), as linear_t; if sparse,
    entries with |silu(gate) * up| <= threshold are dropped first, in one fused kernel (sparse_silu_down)."""
    N = out_features(w_t)
    if not sparse and not (fused and fused_dense(gate_up, w_t)):
        y = torch_product(silu_mul(gate_up), w_t, quant)
        return y if residual is None else residual + y
    lead = gate_up.shape[:-1]
    y = sparse_silu_down(gate_up.reshape(-1, gate_up.shape[-1]), w_t, threshold if sparse else None,
                         residual=None if residual is None else residual.reshape(-1, N), scale=quant[0], zero=quant[1])
    return y.view(*lead, N)


def all_reduce_if_sharded(x: Tensor, group) -> Tensor:
    """Sum the partial outputs of input-sharded projections over tensor-parallel ranks. Traced by
    torch.compile: the functional collective, which it and CUDA graphs capture. Eager: an in-place
    all-reduce of x (a fresh output), since in eager mode the functional form's wrappers cost more than
    the reduction itself (measured in docs/design.md, "Tensor parallelism")."""
    if group is None:
        return x
    if torch.compiler.is_compiling():
        from torch.distributed import _functional_collectives as funcol

        return funcol.all_reduce(x, "sum", group)
    torch.distributed.all_reduce(x, group=group)
    return x


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = args.n_head, args.n_local_heads, args.head_dim
        q_size, kv_size = args.n_head * args.head_dim, args.n_local_heads * args.head_dim
        self.splits = [q_size, kv_size, kv_size]
        add_weight(self, "wqkv_t", args.dim, q_size + 2 * kv_size, args.quantization)  # (D, Nq + 2 Nkv)
        add_weight(self, "wo_t", q_size, args.dim, args.quantization)  # (H hd, D)
        self.dim = args.dim
        self.kv_cache: Optional[KVCache] = None
        self.tp_group = None  # set by tp.shard_model: wo_t then holds this rank's input rows
        self.adds_residual = True  # under tensor parallelism rank 0's o adds x, the others only their share
        self.fused = True  # dense decode steps on CUDA through the fused kernel (Transformer.use_fused_kernels)

    def forward(self, x, norm, freqs_cis, mask, input_pos, thresholds, sparse, observe=None, rope_table=None):
        """x + attention(norm(x)): the norm is fused into the q/k/v and the residual into the o
        projection (under tensor parallelism, into rank 0's share of the sum). A decode
        step (T == 1 with a cache and the whole rope_table) is causal and ignores freqs_cis and mask."""
        B, T, _ = x.shape  # (B, T, D)
        qkv = self.project_qkv(x, norm, thresholds[0:3], sparse)
        if T == 1 and self.kv_cache is not None and rope_table is not None:
            # decode: RoPE, the cache write and causal attention in one kernel
            cache = self.kv_cache
            y = decode_attention_step(qkv, self.n_head, cache.k_cache, cache.v_cache, rope_table, input_pos)
            y = y.view(B, T, self.n_head * self.head_dim)  # (B, KV, G, hd): heads h = kv * G + g
        else:
            q, k, v = self.heads(qkv, freqs_cis)
            if self.kv_cache is not None:
                k, v = self.kv_cache.update(input_pos, k, v)  # (B, KV, S, hd)
            y = self.attend(q, k, v, mask)
        if observe is not None:
            observe("attn_out", y)
        return self.project_out(y, x, thresholds[3:4], sparse)

    # The pieces of forward, which calibrate.py's greedy search also runs one at a time.
    def project_qkv(self, x: Tensor, norm, thresholds: Tensor, sparse: bool) -> Tensor:
        """[q | k | v] = norm(x) (B, T, D) @ wqkv_t -> (B, T, Nq + 2 Nkv), thresholds (3,) [q, k, v]."""
        return linear_t(x, self.wqkv_t, thresholds, self.splits, sparse, norm=norm, quant=scales_of(self, "wqkv_t"),
                        fused=self.fused)

    def project_one(self, part: str, x: Tensor, norm, threshold: Tensor, sparse: bool) -> Tensor:
        """One of q, k, v alone, as project_qkv computes it: norm(x) (B, T, D) -> (B, T, its columns),
        threshold (1,) its own (calibration's greedy recomputes only the part whose threshold moves)."""
        s = "qkv".index(part)
        start = sum(self.splits[:s])
        w, quant = columns_of(self, "wqkv_t", start, start + self.splits[s])
        return linear_t(x, w, threshold, [self.splits[s]], sparse, norm=norm, quant=quant, fused=self.fused)

    def heads(self, qkv: Tensor, freqs_cis: Tensor):
        """q (B, H, T, hd), k and v (B, KV, T, hd) from qkv (B, T, N), q and k rotated by freqs_cis (T, hd/2, 2)."""
        q, k, v = qkv.split(self.splits, dim=-1)
        return self.to_heads(q, freqs_cis), self.to_heads(k, freqs_cis), self.to_heads(v)

    def to_heads(self, t: Tensor, freqs_cis: Optional[Tensor] = None) -> Tensor:
        """(B, T, n hd) -> (B, n, T, hd), rotated by freqs_cis (T, hd/2, 2) if given (q and k)."""
        B, T, _ = t.shape
        t = t.view(B, T, -1, self.head_dim)
        return (t if freqs_cis is None else apply_rotary_emb(t, freqs_cis)).transpose(1, 2)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        """q (B, H, T, hd) over k, v (B, KV, S, hd) with mask (T, S) -> (B, T, H hd), the o projection's input."""
        B, _, T, _ = q.shape
        return grouped_attention(q, k, v, mask).transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)

    def project_out(self, y: Tensor, x: Tensor, threshold: Tensor, sparse: bool) -> Tensor:
        """x + y (B, T, H hd) @ wo_t, threshold (1,); under tensor parallelism summed over ranks."""
        out = linear_t(y, self.wo_t, threshold, [self.dim], sparse, residual=x if self.adds_residual else None,
                       quant=scales_of(self, "wo_t"), fused=self.fused)
        return all_reduce_if_sharded(out, self.tp_group)


def grouped_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """GQA without repeating K/V: the G query heads that share a kv head are stacked
    along the query axis. q (B, H, T, hd), k/v (B, KV, S, hd), mask (T, S) -> (B, H, T, hd)."""
    B, H, T, hd = q.shape
    n_kv, S = k.shape[1], k.shape[2]
    group = H // n_kv
    q = q.reshape(B, n_kv, group * T, hd)  # heads h = kv * G + g, rows ordered (g, t)
    if T == 1:
        # One query position (decode steps with a cache take Attention's fused step instead): the
        # split-S Triton kernel on CUDA, elsewhere its reference, matmuls + softmax per kv head.
        return decode_attention(q, k, v, mask[0]).view(B, H, T, hd)  # (B, KV, G, hd) -> (B, H, 1, hd)
    mask = mask.unsqueeze(0).expand(group, T, S).reshape(group * T, S)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, KV, G*T, hd)
    return y.reshape(B, H, T, hd)  # a copy where the backend's output is not contiguous (CUDA's efficient and math)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.hidden = args.intermediate_size
        add_weight(self, "w13_t", args.dim, 2 * args.intermediate_size, args.quantization)  # (D, 2I): [gate | up]
        add_weight(self, "w2_t", args.intermediate_size, args.dim, args.quantization)  # (I, D)
        self.tp_group = None  # set by tp.shard_model: w2_t then holds this rank's input rows
        self.adds_residual = True  # as in Attention
        self.fused = True

    def forward(self, x, norm, thresholds, sparse, observe=None):
        """x + mlp(norm(x)), fused like Attention.forward."""
        gate_up = self.project_gate_up(x, norm, thresholds[0:2], sparse)  # (B, T, 2I)
        if observe is not None:
            observe("mlp_mid", silu_mul(gate_up))
        return self.project_down(gate_up, x, thresholds[2:3], sparse)

    # The pieces of forward, as in Attention.
    def project_gate_up(self, x: Tensor, norm, thresholds: Tensor, sparse: bool) -> Tensor:
        """[gate | up] = norm(x) (B, T, D) @ w13_t -> (B, T, 2I), thresholds (2,) [gate, up]."""
        return linear_t(x, self.w13_t, thresholds, [self.hidden, self.hidden], sparse, norm=norm,
                        quant=scales_of(self, "w13_t"), fused=self.fused)

    def project_one(self, part: str, x: Tensor, norm, threshold: Tensor, sparse: bool) -> Tensor:
        """gate or up alone, as project_gate_up computes it: (B, T, D) -> (B, T, I) (see Attention.project_one)."""
        start = ("gate", "up").index(part) * self.hidden
        w, quant = columns_of(self, "w13_t", start, start + self.hidden)
        return linear_t(x, w, threshold, [self.hidden], sparse, norm=norm, quant=quant, fused=self.fused)

    def project_down(self, gate_up: Tensor, x: Tensor, threshold: Tensor, sparse: bool) -> Tensor:
        """x + silu(gate) * up @ w2_t, threshold (1,); under tensor parallelism summed over ranks."""
        out = silu_down_t(gate_up, self.w2_t, threshold, sparse, residual=x if self.adds_residual else None,
                          quant=scales_of(self, "w2_t"), fused=self.fused)
        return all_reduce_if_sharded(out, self.tp_group)


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        # TEAL thresholds [q, k, v, o, gate, up, down]; 0 keeps every nonzero entry (dense).
        self.register_buffer("thresholds", torch.zeros(len(PROJECTIONS)), persistent=False)

    def forward(self, x, freqs_cis, mask, input_pos, sparse, observer=None, rope_table=None):
        observe = None if observer is None else (lambda state, t: observer(self.layer_id, state, t))
        if observe is not None:  # the normed inputs are formed inside the projections' kernels
            observe("attn_in", self.attention_norm(x))
        h = self.attention(x, self.attention_norm, freqs_cis, mask, input_pos, self.thresholds[:4], sparse, observe,
                           rope_table)
        if observe is not None:
            observe("mlp_in", self.ffn_norm(h))
        return self.feed_forward(h, self.ffn_norm, self.thresholds[4:], sparse, observe)


Observer = Callable[[int, str, Tensor], None]


def projection_params(model: "Transformer") -> Tensor:
    """(7,) weights each projection holds in one block (this rank's under tensor parallelism),
    PROJECTIONS order; every block has the same shapes."""
    attn, ffn = model.layers[0].attention, model.layers[0].feed_forward
    d_in, d_out = attn.wqkv_t.shape[0], model.args.dim
    n_q, n_kv, _ = attn.splits
    return torch.tensor([d_in * n_q, d_in * n_kv, d_in * n_kv, attn.wo_t.shape[0] * d_out,
                         d_in * ffn.hidden, d_in * ffn.hidden, ffn.w2_t.shape[0] * d_out], dtype=torch.float64)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.n_layer))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = None if args.tie_embeddings or args.quantization else \
            nn.Linear(args.dim, args.vocab_size, bias=False)
        head_quantization = args.head_quantization()
        if head_quantization:  # the LM head quantized too, stored transposed like a block's
            add_weight(self, "output_t", args.dim, args.vocab_size, head_quantization)  # (D, V)
        self.max_batch_size = -1
        self.max_seq_length = -1
        self.freqs_cis: Optional[Tensor] = None
        # Which forwards are sparse: decode steps (T == 1) when sparse_decode, the prompt when sparse_prefill.
        self.sparse_decode = False
        self.sparse_prefill = False
        self.observer: Optional[Observer] = None  # eager-only hook for calibration / sparsity metering
        self.tp = (0, 1)  # (rank, world_size), set by tp.shard_model

    def setup_caches(self, max_batch_size: int, max_seq_length: int):
        if max_seq_length > self.args.block_size:
            raise ValueError(f"sequence length {max_seq_length} exceeds the model's block_size {self.args.block_size}")
        if self.max_batch_size == max_batch_size and self.max_seq_length >= max_seq_length:
            return  # the cache's batch is part of every decode shape; a longer cache is only masked
        dtype, device = self.tok_embeddings.weight.dtype, self.tok_embeddings.weight.device
        self.max_batch_size, self.max_seq_length = max_batch_size, max_seq_length
        for block in self.layers:  # n_kv_head is per rank under tensor parallelism
            block.attention.kv_cache = KVCache(max_batch_size, max_seq_length, block.attention.n_kv_head,
                                               self.args.head_dim, dtype).to(device)
        self.freqs_cis = precompute_freqs_cis(max_seq_length, self.args.head_dim, self.args.rope_base,
                                              self.args.rope_scaling).to(device)

    def forward(self, idx: Tensor, input_pos: Tensor) -> Tensor:
        # idx (B, T) token ids, input_pos (T,) their positions; returns logits (B, T, V) in float32
        assert self.freqs_cis is not None, "call setup_caches() first"
        T = idx.shape[1]
        sparse = self.sparse_prefill if T > 1 else self.sparse_decode
        mask = torch.arange(self.max_seq_length, device=idx.device)[None, :] <= input_pos[:, None]  # (T, S)
        freqs_cis = self.freqs_cis[input_pos]
        x = self.tok_embeddings(idx)  # (B, T, D)
        for block in self.layers:  # a decode step's attention reads its angles from the whole table
            x = block(x, freqs_cis, mask, input_pos, sparse, self.observer, rope_table=self.freqs_cis)
        return self.head(self.norm(x))

    def head(self, x: Tensor) -> Tensor:
        """Logits (B, T, V) in float32 of the final normed states x (B, T, D). A quantized head (an
        untied one, or a tied table's quantized copy) runs as a block's dense projection (the fused
        kernel in a decode step on CUDA, the C kernel on the CPU); a float tied head is the embedding
        table, in the model's dtype (on the CPU up to 8 rows take the kernel's product in
        this layout: torch's fp32 one read the table at a third of the bandwidth, cpu_kernels.c)."""
        fused = self.layers[0].attention.fused
        if hasattr(self, "output_t"):
            return linear_t(x, self.output_t, None, [self.args.vocab_size], False, quant=scales_of(self, "output_t"),
                            fused=fused).float()
        head = self.tok_embeddings.weight if self.output is None else self.output.weight
        rows = x.reshape(-1, x.shape[-1])  # (B T, D)
        if fused and cpu_kernel_usable(rows, head):
            return cpu_linear(rows, head).view(*x.shape[:-1], -1).float()
        return F.linear(x, head).float()

    def set_thresholds(self, thresholds: Tensor):
        """thresholds (n_layer, 7) in PROJECTIONS order; a copy, so compiled graphs stay valid."""
        if tuple(thresholds.shape) != (self.args.n_layer, len(PROJECTIONS)):
            raise ValueError(f"thresholds must have shape ({self.args.n_layer}, {len(PROJECTIONS)}), "
                             f"got {tuple(thresholds.shape)}")
        for block, row in zip(self.layers, thresholds):
            block.thresholds.copy_(row)

    def get_thresholds(self) -> Tensor:
        return torch.stack([block.thresholds for block in self.layers])  # (n_layer, 7)

    def use_fused_kernels(self, fused: bool = True):
        """Dense decode steps through the fused kernels (default) or through torch's products, which
        torch.compile generates itself: the way plain gpt-fast runs (scripts/bench_sweep.py's anchor)."""
        for block in self.layers:
            block.attention.fused = block.feed_forward.fused = fused


def apply_rope_scaling(freqs: Tensor, scaling: dict) -> Tensor:
    """Llama-3.1 frequency scaling: long wavelengths slowed by `factor`, short ones kept,
    a smooth blend in between."""
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / freqs
    smooth = (old_context / wavelen - low) / (high - low)
    blended = (1 - smooth) * freqs / factor + smooth * freqs
    out = torch.where(wavelen > low_wavelen, freqs / factor, blended)
    return torch.where(wavelen < high_wavelen, freqs, out)


def precompute_freqs_cis(seq_len: int, head_dim: int, base: float, rope_scaling: Optional[dict] = None) -> Tensor:
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64)[: head_dim // 2] / head_dim))
    if rope_scaling is not None:
        freqs = apply_rope_scaling(freqs, rope_scaling)
    t = torch.arange(seq_len, dtype=torch.float64)
    angles = torch.outer(t, freqs)  # (S, hd/2)
    return torch.stack([angles.cos(), angles.sin()], dim=-1).float()  # (S, hd/2, 2)


def apply_rotary_emb(x: Tensor, freqs_cis: Tensor) -> Tensor:
    # x (B, T, heads, hd) with rotation pairs in adjacent channels; freqs_cis (T, hd/2, 2)
    return rope(x, freqs_cis.view(1, x.shape[1], 1, x.shape[3] // 2, 2))
