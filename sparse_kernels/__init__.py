"""Thresholded (TEAL) column-sparse matvec ops: a torch reference and Triton kernels.

    y = sparse_linear(x, w_t, thresholds, splits)      # x (B, K), w_t (K, N) -> (B, N)
    y = sparse_silu_down(gate_up, w_t, threshold)      # gate_up (B, 2I), w_t (I, N) -> (B, N)

Both are torch.library custom ops (teal::...), so torch.compile captures them whole.
"""
from .ops import sparse_linear, sparse_silu_down
from .reference import silu_mul, sparse_linear_ref, sparse_silu_down_ref

__all__ = ["sparse_linear", "sparse_silu_down", "sparse_linear_ref", "sparse_silu_down_ref", "silu_mul"]
