"""TEAL ops: thresholded column-sparse matvecs and a decode attention, each a torch reference plus a Triton kernel.

    y = sparse_linear(x, w_t, thresholds, splits)      # x (B, K), w_t (K, N) -> (B, N)
    y = sparse_linear(h, w_t, thresholds, splits, norm_weight=w, eps=1e-5)   # x = RMSNorm(h) first
    y = sparse_linear(x, w_t, thresholds, splits, residual=r)                # r + x @ w_t (kept entries)
    y = sparse_silu_down(gate_up, w_t, threshold[, residual=r])  # gate_up (B, 2I), w_t (I, N) -> (B, N)
    y = sparse_linear(x, q_t, thresholds, splits, scale=s)             # int8 q_t (K, N), s (N,)
    y = sparse_linear(x, p_t, thresholds, splits, scale=s, zero=z)     # int4 p_t (K, N / 2) uint8, s, z (K / G, N)

    out = decode_attention(q, k, v, mask)               # q (B, KV, G, hd), cache (B, KV, S, hd)
    out = decode_attention_step(qkv, n_head, k_cache, v_cache, rope_table, input_pos)
        # the causal decode step: RoPE of q and k, the cache write at input_pos, attention
    w = dequantize_int4(p_t, s, z, torch.bfloat16)      # (K, N) for a prompt's matmul

All are torch.library custom ops (teal::...), so torch.compile captures them whole.
"""
from .ops import decode_attention, decode_attention_step, dequantize_int4, sparse_linear, sparse_silu_down
from .reference import (decode_attention_ref, decode_attention_step_ref, dequantize, out_features, pack_int4,
                        rms_norm, rope, silu_mul, sparse_linear_ref, sparse_silu_down_ref, unpack_int4, weight_columns)

__all__ = ["sparse_linear", "sparse_silu_down", "sparse_linear_ref", "sparse_silu_down_ref", "silu_mul", "rms_norm",
           "rope", "decode_attention", "decode_attention_ref", "decode_attention_step", "decode_attention_step_ref",
           "dequantize", "dequantize_int4", "out_features", "pack_int4", "unpack_int4", "weight_columns"]
