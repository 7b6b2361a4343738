"""The torch reference: the single definition of what the sparse ops compute.

sparse_linear:   y[b, n] = sum_k x[b, k] * (|x[b, k]| > t_s(n)) * w_t[k, n]
                 where column n lies in segment s of `splits` and t_s = thresholds[s];
                 thresholds None keeps every entry (the dense product, with the same fusions).
sparse_silu_down: h = silu_mul(gate_up), then sparse_linear(h, w_t, threshold[:1] (or None), [N]).
Optional fusions of a decoder block: norm_weight -> the input is rms_norm(x, norm_weight, eps)
(sparse_linear); residual -> the output is residual + y (both ops).

Rounding: |x| is compared with the float32 threshold exactly (|x| widened to fp32); products
are summed in fp32 (fp64 for fp64 inputs) and the sum is rounded once to x.dtype. silu_mul computes
silu(gate) * up in fp32 and rounds once to the input dtype, as the fused kernel does.
rms_norm rounds the normalised x to x.dtype, then multiplies by the weight in that dtype (Llama's
order); the residual add rounds y first, then the sum (as `residual + y` in the model).
The GPU kernels follow these roundings but sum in other orders, so they match within an ulp.

Quantized weights (w_t's dtype says which): int8 (K, N) with scale (N,): w = q * scale[n], one
scale per output column, symmetric; int4 as uint8 (K, N / 2), two values 0..15 a byte along N
(the low nibble is the even column), with scale and zero (K / group, N): w = q * scale[g, n] +
zero[g, n] for row k in group g = k // group. The product is x_kept @ w with w dequantized in fp32
(dequantize), summed in fp32 and rounded once to x.dtype, as for float weights.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def silu_mul(gate_up: Tensor) -> Tensor:
    """(..., 2I) = [gate | up] -> silu(gate) * up (..., I), in fp32, rounded once to the input dtype."""
    gate, up = gate_up.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(gate_up.dtype)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Llama's RMSNorm over the last axis: x * rsqrt(mean(x^2) + eps) in fp32, rounded to x.dtype, times weight."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return normed.type_as(x) * weight


def keep_mask(x: Tensor, threshold: Tensor) -> Tensor:
    """|x| > t with |x| widened to fp32 (a 0-dim fp32 threshold would otherwise be rounded to x.dtype)."""
    return x.abs().float() > threshold.float()


def contiguous_rows(t: Optional[Tensor]) -> Optional[Tensor]:
    """t with unit stride along its last axis, as the kernels read every tensor (None stays None)."""
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def out_features(w_t: Tensor) -> int:
    """N of a stored W^T: its columns, twice its bytes a row for int4 (uint8, two values a byte)."""
    return w_t.shape[1] * (2 if w_t.dtype == torch.uint8 else 1)


def weight_columns(w_t: Tensor, scale: Optional[Tensor], zero: Optional[Tensor], start: int, end: int) -> tuple:
    """Columns start..end of a stored W^T and of its scale and zero (None stays None), as views: no
    copy. int4 holds columns 2m and 2m + 1 in one byte, so there start and end must be even."""
    per_byte = 2 if w_t.dtype == torch.uint8 else 1
    if start % per_byte or end % per_byte:
        raise ValueError(f"int4 columns {start}..{end} split a byte; take an even range")
    return (w_t[:, start // per_byte:end // per_byte], None if scale is None else scale[..., start:end],
            None if zero is None else zero[..., start:end])


def check_args(x: Tensor, w_t: Tensor, thresholds: Optional[Tensor], splits, norm_weight=None, residual=None,
               scale=None, zero=None) -> None:
    if x.dim() != 2 or w_t.dim() != 2:
        raise ValueError(f"x must be (B, K) and w_t (K, N); got {tuple(x.shape)} and {tuple(w_t.shape)}")
    if x.shape[1] != w_t.shape[0]:
        raise ValueError(f"x has K={x.shape[1]} but w_t has {w_t.shape[0]} rows (weights are stored (K, N))")
    if x.shape[1] == 0:
        raise ValueError("x and w_t have K=0 inputs: there is no product to take")
    others = [t for t in (w_t, thresholds, norm_weight, residual, scale, zero) if t is not None]
    if any(t.device != x.device for t in others):
        raise ValueError(f"x is on {x.device} but {[str(t.device) for t in others]} were given with it: move the "
                         f"weights, thresholds, norm weight, residual and scales to x's device")
    check_weights(x.dtype, w_t, scale, zero)
    N = out_features(w_t)
    if len(splits) == 0 or sum(splits) != N or min(splits) <= 0:
        raise ValueError(f"splits {list(splits)} must be positive and sum to N={N}")
    if thresholds is not None and (thresholds.dim() != 1 or thresholds.shape[0] < len(splits)):
        raise ValueError(f"thresholds must be 1-D with one entry per split ({len(splits)}); "
                         f"got shape {tuple(thresholds.shape)}")
    if norm_weight is not None and (norm_weight.shape != (x.shape[1],) or norm_weight.dtype != x.dtype):
        raise ValueError(f"norm_weight must be ({x.shape[1]},) {x.dtype}; got {tuple(norm_weight.shape)} "
                         f"{norm_weight.dtype}")
    if residual is not None and (residual.shape != (x.shape[0], N) or residual.dtype != x.dtype):
        raise ValueError(f"residual must be ({x.shape[0]}, {N}) {x.dtype}; got {tuple(residual.shape)} {residual.dtype}")


def check_weights(dtype: torch.dtype, w_t: Tensor, scale=None, zero=None) -> None:
    """w_t in the activations' dtype, or int8 with scale (N,), or int4 (uint8) with scale and zero (K / group, N)."""
    K, N = w_t.shape[0], out_features(w_t)
    if w_t.dtype == torch.int8:
        if scale is None or zero is not None or scale.shape != (N,) or not scale.is_floating_point():
            raise ValueError(f"int8 weights need a float scale of shape ({N},) and no zero")
    elif w_t.dtype == torch.uint8:
        if scale is None or zero is None or scale.dim() != 2 or scale.shape[1] != N or zero.shape != scale.shape or \
                K % scale.shape[0] or not (scale.is_floating_point() and zero.is_floating_point()):
            raise ValueError(f"int4 weights (uint8, two values a byte) need float scale and zero of shape "
                             f"(K / group, {N}) with the group dividing K={K}")
    elif w_t.dtype != dtype:
        raise ValueError(f"x is {dtype} but w_t is {w_t.dtype}: cast one of them")
    elif scale is not None or zero is not None:
        raise ValueError("scales are for int8 and int4 weights; float weights take none")


def unpack_int4(packed: Tensor) -> Tensor:
    """(K, N / 2) uint8 -> (K, N) uint8 values 0..15; the low nibble of byte m is column 2m."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2)


def pack_int4(q: Tensor) -> Tensor:
    """(K, N) values 0..15 (N even) -> (K, N / 2) uint8: unpack_int4's inverse."""
    q = q.to(torch.uint8)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def dequantize(w_t: Tensor, scale: Optional[Tensor] = None, zero: Optional[Tensor] = None) -> Tensor:
    """The (K, N) fp32 weights a stored W^T stands for (float weights: widened)."""
    if scale is None:
        return w_t.float()
    if w_t.dtype == torch.int8:
        return w_t.float() * scale.float()
    group = w_t.shape[0] // scale.shape[0]
    return unpack_int4(w_t).float() * scale.float().repeat_interleave(group, 0) + \
        zero.float().repeat_interleave(group, 0)


def masked_matmul(xm: Tensor, w_t: Tensor) -> Tensor:
    """xm (B, K) @ w_t (K, N) summed in fp32, rounded to xm.dtype. On CUDA cuBLAS already sums
    half types in fp32, so no fp32 copy of the weights is made (the fallback for large B)."""
    if xm.is_cuda:
        return xm @ w_t
    return fp32_matmul(xm, w_t)


def accumulator(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums are taken in: fp32, or the inputs' own if wider (fp64)."""
    return torch.promote_types(dtype, torch.float32)


def fp32_matmul(xm: Tensor, w: Tensor) -> Tensor:
    """xm (B, K) @ w (K, n) in fp32 (fp64 inputs: fp64), rounded once to xm.dtype."""
    acc = accumulator(xm.dtype)
    return (xm.to(acc) @ w.to(acc)).to(xm.dtype)


def masked_linear(x: Tensor, w_t: Tensor, thresholds: Optional[Tensor], splits, norm_weight=None, eps: float = 0.0,
                  residual=None, matmul=fp32_matmul, scale=None, zero=None) -> Tensor:
    """sparse_linear_ref's math on checked arguments; matmul(xm (B, K), w (K, n)) -> (B, n) in x.dtype
    (the ops' CUDA fallback passes masked_matmul: no fp32 copy of the weights). Quantized weights are
    dequantized to fp32 first (and multiplied in fp32)."""
    if scale is not None:
        w_t, matmul = dequantize(w_t, scale, zero), fp32_matmul
    if norm_weight is not None:
        x = rms_norm(x, norm_weight, eps)
    if thresholds is None:
        y = matmul(x, w_t)
        return y if residual is None else residual + y
    outs, start = [], 0
    for s, width in enumerate(splits):
        xm = torch.where(keep_mask(x, thresholds[s]), x, torch.zeros_like(x))  # (B, K)
        outs.append(matmul(xm, w_t[:, start:start + width]))
        start += width
    y = torch.cat(outs, dim=1)  # (B, N)
    return y if residual is None else residual + y


def sparse_linear_ref(x: Tensor, w_t: Tensor, thresholds: Optional[Tensor], splits, norm_weight=None, eps: float = 0.0,
                      residual=None, scale=None, zero=None) -> Tensor:
    """x (B, K), w_t (K, N) (or quantized, with scale and zero), thresholds (S,) fp32 or None (dense),
    splits S ints summing to N -> (B, N); norm_weight (K,) and residual (B, N) optional (see the
    module docstring)."""
    check_args(x, w_t, thresholds, splits, norm_weight, residual, scale, zero)
    return masked_linear(x, w_t, thresholds, splits, norm_weight, eps, residual, scale=scale, zero=zero)


def sparse_silu_down_ref(gate_up: Tensor, w_t: Tensor, threshold: Optional[Tensor], residual=None, scale=None,
                         zero=None) -> Tensor:
    """gate_up (B, 2I) = [gate | up], w_t (I, N) (or quantized), threshold (>=1,) fp32 or None (dense),
    residual (B, N) optional -> (B, N)."""
    if gate_up.dim() != 2 or gate_up.shape[1] != 2 * w_t.shape[0]:
        raise ValueError(f"gate_up must be (B, 2I) with I={w_t.shape[0]} (rows of w_t); got {tuple(gate_up.shape)}")
    h = silu_mul(gate_up)  # (B, I)
    return sparse_linear_ref(h, w_t, None if threshold is None else threshold[:1], [out_features(w_t)],
                             residual=residual, scale=scale, zero=zero)


def gap_threshold(values, p):
    """A threshold near the p-quantile of |values| in the widest gap between neighbouring values
    (an ulp of difference between kernel and reference silu then cannot flip an entry); below
    every |value| for p = 0, above every one for p = 1."""
    v = values.abs().float().flatten().sort().values
    if p == 0.0:
        return v[0].item() / 2
    if p == 1.0:
        return v[-1].item() * 1.01
    i, w = round(p * (v.numel() - 1)), max(2, v.numel() // 100)
    lo, hi = max(0, i - w), min(v.numel() - 1, i + w)
    j = lo + int((v[lo + 1:hi + 1] - v[lo:hi]).argmax())
    return (v[j].item() + v[j + 1].item()) / 2


def decode_attention_ref(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """q (B, KV, G, hd), k/v (B, KV, S, hd), mask (S,) bool -> (B, KV, G, hd). Scores in fp32 (fp64
    for fp64 inputs), softmax over the masked-in positions, probabilities rounded to q.dtype for p @ v."""
    acc = accumulator(q.dtype)
    scores = (q.to(acc) @ k.to(acc).transpose(-1, -2)) * q.shape[-1] ** -0.5  # (B, KV, G, S), fp32 as the kernel's
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1).to(q.dtype)
    return probs @ v


def rope(x: Tensor, freqs: Tensor) -> Tensor:
    """Rotary embedding of adjacent channel pairs: x (..., hd), freqs (..., hd/2, 2) [cos, sin]
    broadcastable to x's pairs; fp32 math, rounded once to x.dtype."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)  # (..., hd/2, 2)
    cos, sin = freqs[..., 0], freqs[..., 1]
    out = torch.stack([pairs[..., 0] * cos - pairs[..., 1] * sin, pairs[..., 1] * cos + pairs[..., 0] * sin], dim=-1)
    return out.flatten(-2).type_as(x)


def split_qkv(qkv: Tensor, n_head: int, n_kv: int, hd: int):
    """Views of one projected row per sequence, qkv (B, ..., (n_head + 2 n_kv) hd) with the leading
    dims holding B rows: q (B, KV, G, hd) (head h = kv * G + g), k and v (B, KV, hd)."""
    rows = qkv.reshape(-1, qkv.shape[-1])  # (B, N)
    B, q_size, kv_size = rows.shape[0], n_head * hd, n_kv * hd
    q = rows[:, :q_size].view(B, n_kv, n_head // n_kv, hd)
    return q, rows[:, q_size:q_size + kv_size].view(B, n_kv, hd), rows[:, q_size + kv_size:].view(B, n_kv, hd)


def decode_attention_step_ref(qkv: Tensor, n_head: int, k_cache: Tensor, v_cache: Tensor, rope_table: Tensor,
                              input_pos: Tensor) -> Tensor:
    """The causal decode step. qkv: one projected row per sequence (split_qkv), caches (B, KV, S,
    hd), rope_table (>= S, hd/2, 2) cos/sin per position, input_pos: the step's position (one
    element). k (rotated) and v are written to the caches in place at input_pos; returns the
    rotated q's decode_attention_ref over positions 0..input_pos: (B, KV, G, hd)."""
    KV, S, hd = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    q, k, v = split_qkv(qkv, n_head, KV, hd)
    pos = input_pos.reshape(1)
    freqs = rope_table[pos].reshape(hd // 2, 2)
    k_cache.index_copy_(2, pos, rope(k, freqs).unsqueeze(2))
    v_cache.index_copy_(2, pos, v.unsqueeze(2))
    mask = torch.arange(S, device=k_cache.device) <= pos
    return decode_attention_ref(rope(q, freqs), k_cache, v_cache, mask)
