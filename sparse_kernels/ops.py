"""torch.library ops "teal::sparse_linear", "teal::sparse_silu_down", "teal::decode_attention",
"teal::decode_attention_step" and "teal::dequantize_int4".

Matvecs, CUDA with Triton and B <= 8: the Triton kernel, configured from configs.json (tuned per
op, shape, dtype and batch by scripts/bench_kernels.py --tune); an untuned shape takes the tile
of the nearest tuned one (derived_config), and a dtype/batch with nothing tuned a heuristic.
Attention, CUDA with Triton, B <= 8 and an even head size <= 256: the split-S kernel of
attention.py (the step op warns once if it has to fall back). int4 weights dequantized for a
prompt's matmul, CUDA with Triton: one kernel, exactly the reference's values. Anything else
(CPU, no Triton, larger batches): the torch reference math. No host sync, no data-dependent
allocation, no memset per call: workspaces and arrival counters are persistent per device and the
kernels leave the counters at zero. On the GPU the results match the reference within rounding: the
kernels sum in another order and may fuse multiply-adds, so a value formed in a kernel (silu,
RMSNorm, RoPE) can be an ulp off and, rarely, fall on the other side of a threshold.
"""
import json
import math
import os
import threading
import warnings
from pathlib import Path
from typing import List, Optional

import torch
from torch import Tensor

from . import cpu
from .reference import (check_args, contiguous_rows, decode_attention_ref, decode_attention_step_ref, dequantize,
                        masked_linear, masked_matmul, out_features, silu_mul, split_qkv, weight_columns)

MAX_B = 8  # larger batches take the reference math
CONFIG_PATH = Path(__file__).with_name("configs.json")
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}

_configs = None
_workspaces = {}  # device index -> (fp32 partials, int32 counters, int32 row indices, fp32 inputs)
_sm_counts = {}


def tuned_configs() -> dict:
    global _configs
    if _configs is None:
        _configs = json.loads(CONFIG_PATH.read_text())["configs"] if CONFIG_PATH.exists() else {}
    return _configs


def config_key(op: str, K: int, N: int, dtype: torch.dtype, B: int, weights: str = "float",
               dense: bool = False) -> str:
    """The configs.json key of an op, shape, activations' dtype, batch and weight format (float: none);
    dense: a quantized format's config for the dense kernel alone, where it differs ("linear/int4/dense")."""
    fmt = "" if weights == "float" else f"/{weights}" + ("/dense" if dense else "")
    return f"{op}{fmt}:{K}x{N}:{DTYPE_NAMES[dtype]}:B{B}"


def parse_config_key(key: str) -> tuple:
    """config_key's inverse: (op, K, N, dtype name, B); op keeps its weight format ("linear/int8")."""
    op, shape, dtype_name, b = key.split(":")
    K, N = (int(v) for v in shape.split("x"))
    return op, K, N, dtype_name, int(b[1:])


def sm_count(device: torch.device) -> int:
    if device.index not in _sm_counts:
        _sm_counts[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    return _sm_counts[device.index]


def heuristic_config(K: int, N: int, dtype: torch.dtype, B: int, n_sm: int) -> dict:
    """For a dtype (fp32) or batch with nothing tuned at all. B == 1 with large weights: wide
    elementwise tiles (1-2 KB of each gathered row, which DRAM streams better than 256-byte
    pieces) with 3-4 steps in flight: the tuner's picks on the 8B and 70B MLP shapes. Otherwise
    tl.dot tiles. About two to three programs per SM."""
    from .triton_kernels import next_pow2  # only reached where Triton runs the op

    if B == 1 and max(K, N) >= 8192 and dtype != torch.float32:
        block_n, block_k, depth = (1024, 4, 3) if N >= 16384 else (512, 8, 4)
        cfg = dict(BLOCK_N=block_n, BLOCK_K=block_k, DEPTH=depth, DOT=False, num_warps=4, num_stages=1)
        per_sm, min_log2 = 2, 6
    else:
        block_n = 256 if N > 8192 and dtype != torch.float32 else 128
        cfg = dict(BLOCK_N=block_n, BLOCK_K=64, DOT=True, num_warps=8, num_stages=1)
        per_sm, min_log2 = 3, 7
    n_tiles = -(-N // cfg["BLOCK_N"])
    k_chunk = 1 << max(min_log2, min(11, round(math.log2(max(1.0, K * n_tiles / (per_sm * n_sm))))))
    k_chunk = max(cfg["BLOCK_K"], min(k_chunk, max(128, 4096 // next_pow2(B))))  # phase-1 registers: B * K_CHUNK
    return dict(cfg, K_CHUNK=k_chunk)


def pick_config(op: str, K: int, N: int, dtype: torch.dtype, B: int, n_sm: int, weights: str = "float",
                dense: bool = False) -> dict:
    """The tuned config of this (op, shape, dtype, B); else one derived from the nearest tuned
    shape (derived_config); else the heuristic. A tuned B stands in for another if its config fits
    (a tl.dot config fits any B, an elementwise one only B == 1); fp16 and bf16 share configs.
    Quantized weights take their own tuned configs where there are some, else the float ones; the
    dense kernel (dense: no thresholds) its own where the tuner found one clearly faster there."""
    if weights != "float":
        for key in ([config_key(op, K, N, dtype, B, weights, dense=True)] if dense else []) + [
                config_key(op, K, N, dtype, B, weights)]:
            if key in tuned_configs():
                return tuned_configs()[key]
    table = {key: cfg for key, cfg in tuned_configs().items() if "/" not in key.split(":")[0]}
    dtypes = [dtype] + {torch.bfloat16: [torch.float16], torch.float16: [torch.bfloat16]}.get(dtype, [])
    batches = sorted((1, 2, 3, 4, 8) + (B,), key=lambda b: (abs(b - B), -b))
    for b in batches:
        for dt in dtypes:
            cfg = table.get(config_key(op, K, N, dt, b))
            if cfg is not None and (cfg["DOT"] or B == 1):
                return cfg
    for b in batches:
        tuned = {key: cfg for key, cfg in table.items() if (cfg["DOT"] or B == 1) and any(
            key.endswith(f":{DTYPE_NAMES[dt]}:B{b}") for dt in dtypes)}
        if tuned:
            return derived_config(op, K, N, B, tuned)
    return heuristic_config(K, N, dtype, B, n_sm)


def derived_config(op: str, K: int, N: int, B: int, tuned: dict) -> dict:
    """A config for an untuned shape from the tuned one nearest in log K + log N (same op first):
    its tile, warps and depth, with K_CHUNK scaled so the grid has about as many programs as the
    tuned shape's. Tensor-parallel shards (e.g. Llama-3-8B's 4096x3072 q/k/v over two GPUs) are
    within a factor of two or so of a tuned shape, and the tuner's picks change slowly with shape."""
    from .triton_kernels import next_pow2  # only reached where Triton runs the op

    def distance(key):
        key_op, k, n, _, _ = parse_config_key(key)
        return key_op != op, abs(math.log2(k / K)) + abs(math.log2(n / N))

    nearest = min(tuned, key=distance)
    cfg = dict(tuned[nearest])
    _, k_tuned, n_tuned, _, _ = parse_config_key(nearest)
    programs = -(-k_tuned // cfg["K_CHUNK"]) * -(-n_tuned // cfg["BLOCK_N"])
    cfg["BLOCK_N"] = max(16, min(cfg["BLOCK_N"], next_pow2(N)))
    n_tiles = -(-N // cfg["BLOCK_N"])
    k_chunk = 1 << max(0, round(math.log2(max(1.0, K * n_tiles / programs))))
    # 128 to 4096 rows (the tuner's bounds; it goes down to 64 only for tiles of 512 columns or more), at most
    # 8192 inputs (B * K_CHUNK) in phase 1's registers
    cfg["K_CHUNK"] = max(cfg["BLOCK_K"], 128, min(k_chunk, next_pow2(K), 4096, 8192 // next_pow2(B)))
    return cfg


def workspace(device: torch.device, n_part: int, n_count: int, n_idx: int, n_xs: int):
    """Persistent per-device buffers (fp32 partials, int32 arrival counters kept at zero by the
    kernel, int32 row indices, fp32 compacted inputs), grown only outside CUDA graph capture. They are allocated from
    a helper thread: a graph pool that routes this thread's allocations (torch.compile's
    CUDA-graph trees do) never owns them."""
    bufs = _workspaces.get(device.index)
    need = (n_part, n_count, n_idx, n_xs)
    if bufs is None or any(b.numel() < n for b, n in zip(bufs, need)):
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("sparse_kernels: workspace too small during CUDA graph capture; "
                               "run the op once eagerly (warm-up) before capturing")
        torch.cuda.synchronize(device)  # the old buffers may still be in use
        old = bufs or [torch.empty(0)] * 4
        sizes = [max(n, o.numel(), 1 << 16) for n, o in zip(need, old)]
        new = []

        def allocate():
            with torch.cuda.device(device):
                new.extend([torch.empty(sizes[0], dtype=torch.float32, device=device),
                            torch.zeros(sizes[1], dtype=torch.int32, device=device),
                            torch.empty(sizes[2], dtype=torch.int32, device=device),
                            torch.empty(sizes[3], dtype=torch.float32, device=device)])
                torch.cuda.synchronize(device)

        thread = threading.Thread(target=allocate)
        thread.start()
        thread.join()
        if len(new) != 4:
            raise RuntimeError("sparse_kernels: could not allocate the workspace")
        bufs = _workspaces[device.index] = tuple(new)
    return bufs


def use_triton(x: Tensor) -> bool:
    """Whether the ops run their Triton kernels for input x: CUDA, bf16/fp16/fp32, at most MAX_B rows."""
    return x.is_cuda and x.shape[0] <= MAX_B and x.dtype in DTYPE_NAMES and triton_available()


def triton_available() -> bool:
    """Triton is installed and TEAL_NO_TRITON is not set."""
    if os.environ.get("TEAL_NO_TRITON"):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def segment_starts(splits: List[int], dense: bool = False) -> List[int]:
    """The first columns of segments 1.. of `splits`; none for a dense product (segments only
    choose thresholds, so it is one launch over all columns)."""
    return [] if dense else [sum(splits[:i]) for i in range(1, len(splits))]


def fit_to_segments(cfg: dict, bounds: List[int]) -> dict:
    """cfg with BLOCK_N halved until it divides every segment start in bounds (down to 16), so
    that a tile never straddles two segments; what is still odd then takes one launch per segment."""
    block_n = cfg["BLOCK_N"]
    while block_n > 16 and any(b % block_n for b in bounds):
        block_n //= 2
    return dict(cfg, BLOCK_N=block_n)


def run_triton(op: str, x: Tensor, w_t: Tensor, thresholds: Optional[Tensor], splits: List[int], cfg=None,
               norm_weight: Optional[Tensor] = None, eps: float = 0.0, residual: Optional[Tensor] = None,
               early_weights: bool = True, scale: Optional[Tensor] = None, zero: Optional[Tensor] = None) -> Tensor:
    from . import triton_kernels as tk

    B, K, N = x.shape[0], w_t.shape[0], out_features(w_t)
    y = torch.empty(B, N, dtype=x.dtype, device=x.device)
    if B == 0:
        return y
    weights = tk.weight_format(w_t, x.dtype)
    group = K // scale.shape[0] if weights == "int4" else 0
    bounds = segment_starts(splits, dense=thresholds is None)
    cfg = fit_to_segments(cfg or pick_config(op, K, N, x.dtype, B, sm_count(x.device), weights, thresholds is None),
                          bounds)
    silu = op == "silu_down"
    if len(bounds) <= 3 and not any(b % cfg["BLOCK_N"] for b in bounds):
        pieces = [(w_t, scale, zero, thresholds, bounds, y, residual)]
    else:  # odd splits: one launch per segment on column views
        pieces = [(*weight_columns(w_t, scale, zero, a, a + n), thresholds[s:s + 1], [], y[:, a:a + n],
                   None if residual is None else residual[:, a:a + n])
                  for s, (a, n) in enumerate(zip([0] + bounds, splits))]
    for wp, sp, zp, tp, bp, yp, rp in pieces:
        sizes = tk.workspace_sizes(B, K, yp.shape[1], cfg, group)
        tk.launch(x, wp, tp, bp, yp, *workspace(x.device, *sizes), cfg, silu=silu, norm_weight=norm_weight,
                  eps=eps, residual=rp, early_weights=early_weights, scale=sp, zero=zp)
    return y


def _weights(w_t: Tensor):
    """(w_t with unit column stride, whether that took a copy): a dense kernel must not read a
    copy made by the kernel just before it ahead of its wait (triton_kernels.launch)."""
    rows = contiguous_rows(w_t)
    return rows, rows is not w_t


@torch.library.custom_op("teal::sparse_linear", mutates_args=())
def _sparse_linear_op(x: Tensor, w_t: Tensor, thresholds: Optional[Tensor], splits: List[int],
                      norm_weight: Optional[Tensor] = None, eps: float = 0.0, residual: Optional[Tensor] = None,
                      scale: Optional[Tensor] = None, zero: Optional[Tensor] = None) -> Tensor:
    x, (w_t, copied) = contiguous_rows(x), _weights(w_t)
    residual, thresholds, norm_weight, scale, zero = (contiguous_rows(t) for t in (residual, thresholds, norm_weight,
                                                                                    scale, zero))
    if use_triton(x):
        return run_triton("linear", x, w_t, thresholds, splits, norm_weight=norm_weight, eps=eps, residual=residual,
                          early_weights=not copied, scale=scale, zero=zero)
    if cpu.usable(x, w_t, splits):  # the CPU kernel (cpu_kernels.c)
        return cpu.matvec(x, w_t, thresholds, splits, norm_weight, eps, residual, scale=scale, zero=zero)
    # the CPU without its kernel (or odd int4 segments): the reference; CUDA without the kernel (B > 8): the
    # same math, no fp32 copy of float weights
    return masked_linear(x, w_t, thresholds, splits, norm_weight, eps, residual, matmul=masked_matmul, scale=scale,
                         zero=zero)


@_sparse_linear_op.register_fake
def _(x, w_t, thresholds, splits, norm_weight=None, eps=0.0, residual=None, scale=None, zero=None):
    return x.new_empty(x.shape[0], out_features(w_t))


@torch.library.custom_op("teal::sparse_silu_down", mutates_args=())
def _sparse_silu_down_op(gate_up: Tensor, w_t: Tensor, threshold: Optional[Tensor], residual: Optional[Tensor] = None,
                         scale: Optional[Tensor] = None, zero: Optional[Tensor] = None) -> Tensor:
    gate_up, (w_t, copied) = contiguous_rows(gate_up), _weights(w_t)
    residual, threshold, scale, zero = (contiguous_rows(t) for t in (residual, threshold, scale, zero))
    N = out_features(w_t)
    if use_triton(gate_up):
        return run_triton("silu_down", gate_up, w_t, threshold, [N], residual=residual, early_weights=not copied,
                          scale=scale, zero=zero)
    if cpu.usable(gate_up, w_t, [N]):
        return cpu.matvec(gate_up, w_t, None if threshold is None else threshold[:1], [N], residual=residual, silu=True,
                          scale=scale, zero=zero)
    return masked_linear(silu_mul(gate_up), w_t, None if threshold is None else threshold[:1], [N],
                         residual=residual, matmul=masked_matmul, scale=scale, zero=zero)  # as in _sparse_linear_op


@_sparse_silu_down_op.register_fake
def _(gate_up, w_t, threshold, residual=None, scale=None, zero=None):
    return gate_up.new_empty(gate_up.shape[0], out_features(w_t))


# cpu_kernels: where the CPU kernels take the inputs, the public functions below call them
# (cpu.py): directly, or in compiled graphs through their own light ops, since a custom op's
# dispatch costs ~70 us a call (a decode step makes 150). The custom ops' CPU branches run the
# same kernels for direct callers of torch.ops.teal.*.

def sparse_linear(x: Tensor, w_t: Tensor, thresholds: Optional[Tensor], splits, norm_weight: Optional[Tensor] = None,
                  eps: Optional[float] = None, residual: Optional[Tensor] = None, scale: Optional[Tensor] = None,
                  zero: Optional[Tensor] = None) -> Tensor:
    """x (B, K) @ w_t (K, N) keeping only |x| > thresholds[s] for the columns of segment s
    (thresholds None: every entry, the dense product through the same fused kernel; on Hopper that
    kernel reads its first rows of w_t before it waits for the kernel before it, so w_t must not be
    written by that kernel, unless the op copies it itself for a non-unit column stride).
    Fused on request: x := rms_norm(x, norm_weight, eps) first (eps required with norm_weight);
    residual (B, N) added to the output. Quantized weights: int8 w_t with scale (N,), or int4 w_t
    (uint8 (K, N / 2)) with scale and zero (K / group, N) (reference.py says what they mean)."""
    splits = [int(s) for s in splits]
    check_args(x, w_t, thresholds, splits, norm_weight, residual, scale, zero)
    if norm_weight is not None and eps is None:
        raise ValueError("sparse_linear: pass the norm's eps with norm_weight (e.g. the model's norm_eps)")
    if cpu.usable(x, w_t, splits):  # cpu_kernels
        return cpu.sparse_linear(x, w_t, thresholds, splits, norm_weight, float(eps or 0.0), residual, scale=scale,
                                 zero=zero)
    return _sparse_linear_op(x, w_t, thresholds, splits, norm_weight, float(eps or 0.0), residual, scale, zero)


def sparse_silu_down(gate_up: Tensor, w_t: Tensor, threshold: Optional[Tensor], residual: Optional[Tensor] = None,
                     scale: Optional[Tensor] = None, zero: Optional[Tensor] = None) -> Tensor:
    """h = silu(gate) * up from gate_up (B, 2I); h (kept iff |h| > threshold[0]; None: all) @ w_t (I, N)
    (or quantized, as sparse_linear); residual (B, N), if given, added to the output."""
    if gate_up.dim() != 2 or gate_up.shape[1] != 2 * w_t.shape[0]:
        raise ValueError(f"gate_up must be (B, 2I) with I={w_t.shape[0]} (rows of w_t); got {tuple(gate_up.shape)}")
    N = out_features(w_t)
    check_args(gate_up[:, :w_t.shape[0]], w_t, threshold, [N], residual=residual, scale=scale, zero=zero)
    if cpu.usable(gate_up, w_t, [N]):  # cpu_kernels
        return cpu.sparse_linear(gate_up, w_t, None if threshold is None else threshold[:1], [N], residual=residual,
                                 silu=True, scale=scale, zero=zero)
    return _sparse_silu_down_op(gate_up, w_t, threshold, residual, scale, zero)


@torch.library.custom_op("teal::dequantize_int4", mutates_args=())
def _dequantize_int4_op(w_t: Tensor, scale: Tensor, zero: Tensor, dtype: torch.dtype) -> Tensor:
    w_t, scale, zero = (contiguous_rows(t) for t in (w_t, scale, zero))
    if w_t.is_cuda and dtype in DTYPE_NAMES and triton_available():
        from . import triton_kernels as tk

        out = torch.empty(w_t.shape[0], 2 * w_t.shape[1], dtype=dtype, device=w_t.device)
        return tk.dequantize_int4(w_t, scale, zero, out)
    return dequantize(w_t, scale, zero).to(dtype)


@_dequantize_int4_op.register_fake
def _(w_t, scale, zero, dtype):
    return w_t.new_empty(w_t.shape[0], 2 * w_t.shape[1], dtype=dtype)


def dequantize_int4(w_t: Tensor, scale: Tensor, zero: Tensor, dtype: torch.dtype) -> Tensor:
    """The (K, N) weights int4 w_t (K, N / 2) uint8 with scale and zero (K / group, N) stand for, in dtype:
    reference.dequantize rounded once to dtype. On CUDA one Triton kernel reads the packed bytes and writes
    the result (a prompt's matmul takes it: torch's unpacking made several fp32 copies of the matrix)."""
    if w_t.dtype != torch.uint8 or w_t.dim() != 2 or scale.shape != zero.shape or scale.dim() != 2 \
            or scale.shape[1] != 2 * w_t.shape[1] or w_t.shape[0] % scale.shape[0]:
        raise ValueError(f"dequantize_int4: expected uint8 (K, N / 2) weights with scale and zero (K / group, N); got "
                         f"{tuple(w_t.shape)} {w_t.dtype}, {tuple(scale.shape)}, {tuple(zero.shape)}")
    return _dequantize_int4_op(w_t, scale, zero, dtype)


def _attention_triton(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], rope=None) -> Tensor:
    from . import attention

    B, KV, G, hd = q.shape
    if not attention.walkable(k, v):
        k, v = k.contiguous(), v.contiguous()
    out = torch.empty(B * KV, G, hd, dtype=q.dtype, device=q.device)
    n_sm = sm_count(q.device)
    part, counts, _, _ = workspace(q.device, *attention.workspace_sizes(B * KV, G, hd, k.shape[2], n_sm=n_sm,
                                                                       step=rope is not None), 0, 0)
    mask = None if mask is None else mask.contiguous()
    attention.launch(contiguous_rows(q), k, v, mask, out, part, counts, n_sm=n_sm, rope=rope)
    return out.view(B, KV, G, hd)


_warned = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


def use_attention_kernel(x: Tensor, hd: int) -> bool:
    """Whether the attention ops run the Triton kernel for inputs like x with head size hd."""
    return use_triton(x) and hd <= 256 and hd % 2 == 0


@torch.library.custom_op("teal::decode_attention", mutates_args=())
def _decode_attention_op(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    if not use_attention_kernel(q, q.shape[-1]):
        return decode_attention_ref(q, k, v, mask)
    return _attention_triton(q, k, v, mask)


@_decode_attention_op.register_fake
def _(q, k, v, mask):
    return q.new_empty(q.shape)  # contiguous, like both real paths


@torch.library.custom_op("teal::decode_attention_step", mutates_args=("k_cache", "v_cache"))
def _decode_attention_step_op(qkv: Tensor, n_head: int, k_cache: Tensor, v_cache: Tensor, rope_table: Tensor,
                              input_pos: Tensor) -> Tensor:
    # Whole tensors cross the op boundary and the kernel finds the position's angles and the
    # causal mask itself: inductor then computes nothing per layer before the call.
    B, KV, _, hd = k_cache.shape
    if cpu.takes_attention(qkv, k_cache, v_cache, rope_table):
        return cpu.attention_step(qkv, n_head, k_cache, v_cache, rope_table, input_pos)
    usable = use_attention_kernel(qkv, hd)
    if usable:  # the caches are written in place, so they must be walkable as they are
        from . import attention
        usable = attention.walkable(k_cache, v_cache) and rope_table.dtype == torch.float32 and \
            rope_table.is_contiguous()
    if not usable:
        if qkv.is_cuda and use_triton(qkv):
            _warn_once("decode_attention_step: the Triton kernel does not take these inputs (head size, cache or "
                       "RoPE table layout); running the slower torch reference")
        return decode_attention_step_ref(qkv, n_head, k_cache, v_cache, rope_table, input_pos)
    q, k, v = split_qkv(contiguous_rows(qkv), n_head, KV, hd)
    return _attention_triton(q, k_cache, v_cache, None, rope=(k, v, rope_table, input_pos.reshape(1)))


@_decode_attention_step_op.register_fake
def _(qkv, n_head, k_cache, v_cache, rope_table, input_pos):
    B, KV, _, hd = k_cache.shape
    return qkv.new_empty(B, KV, n_head // KV, hd)


def decode_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """One query position per sequence with grouped heads: q (B, KV, G, hd), the cache k, v
    (B, KV, S, hd), mask (S,) bool of the positions to attend to -> (B, KV, G, hd)."""
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise ValueError(f"decode_attention: q (B, KV, G, hd) and k, v (B, KV, S, hd) expected; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"decode_attention: q is {q.dtype} but k, v are {k.dtype}, {v.dtype}: cast them to one dtype")
    if len({t.device for t in (q, k, v, mask)}) != 1:
        raise ValueError("decode_attention: q, k, v and mask must be on one device")
    if k.shape[2] == 0:
        raise ValueError("decode_attention: the cache has no positions")
    if mask.shape != (k.shape[2],) or mask.dtype != torch.bool:
        raise ValueError(f"decode_attention: mask must be ({k.shape[2]},) bool; got {tuple(mask.shape)} {mask.dtype}")
    return _decode_attention_op(q, k, v, mask)


def decode_attention_step(qkv: Tensor, n_head: int, k_cache: Tensor, v_cache: Tensor, rope_table: Tensor,
                          input_pos: Tensor) -> Tensor:
    """A causal decode step's attention with its RoPE and KV-cache write. qkv (B, [1,] (n_head + 2 KV) hd):
    the projected row of each sequence ([q | k | v], q and k not yet rotated); caches (B, KV, S, hd);
    rope_table (>= S, hd/2, 2) the cos/sin of every position; input_pos: the step's position (one
    element, 0 <= input_pos < S: it stays on the device, so the kernel cannot check it). Writes k
    (rotated) and v into the caches at input_pos, in place; returns the rotated q's attention over
    positions 0..input_pos: (B, KV, G, hd), head h = kv * G + g. On Hopper the kernel reads the caches,
    the table and input_pos before it waits for the kernel before it (attention.py): that kernel must
    not write them (or set TEAL_NO_PDL=1)."""
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"decode_attention_step: caches (B, KV, S, hd) expected; got {tuple(k_cache.shape)}, "
                         f"{tuple(v_cache.shape)}")
    B, KV, S, hd = k_cache.shape
    if S == 0:
        raise ValueError("decode_attention_step: the cache has no positions")
    if qkv.dtype != k_cache.dtype or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"decode_attention_step: qkv is {qkv.dtype} but the caches are {k_cache.dtype}, "
                         f"{v_cache.dtype}: cast them to one dtype")
    if len({t.device for t in (qkv, k_cache, v_cache, rope_table, input_pos)}) != 1:
        raise ValueError("decode_attention_step: qkv, the caches, the RoPE table and input_pos must be on one device")
    if n_head % KV or qkv.shape[-1] != (n_head + 2 * KV) * hd or qkv.numel() != B * qkv.shape[-1]:
        raise ValueError(f"decode_attention_step: qkv must hold {B} rows of (n_head + 2 * {KV}) * {hd} = "
                         f"{(n_head + 2 * KV) * hd} with n_head={n_head} a multiple of {KV}; got {tuple(qkv.shape)}")
    if hd % 2 or rope_table.dim() != 3 or rope_table.shape[0] < S or rope_table.shape[1:] != (hd // 2, 2) or \
            input_pos.numel() != 1:
        raise ValueError(f"decode_attention_step: a RoPE table (>= {S}, {hd // 2}, 2) and one position expected; "
                         f"got {tuple(rope_table.shape)} and {input_pos.numel()} positions")
    if cpu.takes_attention(qkv, k_cache, v_cache, rope_table):  # cpu_kernels
        return cpu.decode_attention_step(qkv, int(n_head), k_cache, v_cache, rope_table, input_pos)
    return _decode_attention_step_op(qkv, int(n_head), k_cache, v_cache, rope_table, input_pos)
