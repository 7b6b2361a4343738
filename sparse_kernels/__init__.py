"""TEAL ops: thresholded column-sparse matvecs and a decode attention, each a torch reference plus a Triton kernel.

    y = sparse_linear(x, w_t, thresholds, splits)      # x (B, K), w_t (K, N) -> (B, N)
    y = sparse_silu_down(gate_up, w_t, threshold)      # gate_up (B, 2I), w_t (I, N) -> (B, N)

    out = decode_attention(q, k, v, mask)               # q (B, KV, G, hd), cache (B, KV, S, hd)

All are torch.library custom ops (teal::...), so torch.compile captures them whole.
"""
from .ops import decode_attention, sparse_linear, sparse_silu_down
from .reference import decode_attention_ref, silu_mul, sparse_linear_ref, sparse_silu_down_ref

__all__ = ["sparse_linear", "sparse_silu_down", "sparse_linear_ref", "sparse_silu_down_ref", "silu_mul",
           "decode_attention", "decode_attention_ref"]
