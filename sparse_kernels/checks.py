"""What the kernel checks share: the fused ops by name, their inputs, their reference and tolerances.

The tests run these checks under Triton's interpreter on the CPU; scripts/bench_kernels.py runs
them on a GPU. An op name is a base op ("linear", "silu_down") with the block's fusions as
suffixes: "+norm" (the input is RMSNorm(x) * weight) and "+res" (a residual added to the output).
"""
import torch

from .ops import sparse_linear, sparse_silu_down
from .reference import pack_int4, rms_norm, silu_mul, sparse_linear_ref, sparse_silu_down_ref

EPS = 1e-5  # the norm's eps in every check
TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 2e-4}  # atol = rtol, for outputs of size ~1


def fused_inputs(op, B, K, N, dtype, g, device="cuda"):
    """x, and the RMSNorm weight / residual that op's "+norm" / "+res" suffixes ask for (else None)."""
    x = torch.randn(B, 2 * K if op.startswith("silu_down") else K, device=device, generator=g).to(dtype)
    norm_w = (0.5 + torch.rand(K, device=device, generator=g)).to(dtype) if "+norm" in op else None
    residual = torch.randn(B, N, device=device, generator=g).to(dtype) if "+res" in op else None
    return x, norm_w, residual


def kernel_input(op, x, norm_w):
    """What the thresholds apply to: silu(gate) * up, rms_norm(x), or x."""
    if op.startswith("silu_down"):
        return silu_mul(x)
    return x if norm_w is None else rms_norm(x, norm_w, EPS)


def random_quantized(K, N, weights, group, g, device="cuda"):
    """Random stored weights with outputs of size ~1 for x ~ N(0, 1): int8 q uniform in [-127, 127] with
    per-column fp32 scales; int4 (uint8, two values a byte) q uniform in 0..15 with bf16 scales and zeros
    that centre each group (w = q * scale + zero). Returns (w_t, scale, zero)."""
    jitter = 0.5 + torch.rand(N, device=device, generator=g)  # (N,) a different scale per column
    if weights == "int8":
        q = torch.randint(-127, 128, (K, N), device=device, generator=g, dtype=torch.int32).to(torch.int8)
        return q, (jitter / (73.0 * K ** 0.5)).float(), None
    q = torch.randint(0, 16, (K, N), device=device, generator=g, dtype=torch.int32)
    scale = (jitter / (4.6 * K ** 0.5)).expand(K // group, N) * (0.5 + torch.rand(K // group, N, device=device,
                                                                                   generator=g))
    zero = -7.5 * scale * (0.8 + 0.4 * torch.rand(K // group, N, device=device, generator=g))
    return pack_int4(q), scale.to(torch.bfloat16), zero.to(torch.bfloat16)


def run_op(op, x, w, thr, splits, norm_w, residual, scale=None, zero=None):
    if op.startswith("silu_down"):
        return sparse_silu_down(x, w, thr, residual=residual, scale=scale, zero=zero)
    return sparse_linear(x, w, thr, splits, norm_weight=norm_w, eps=EPS, residual=residual, scale=scale, zero=zero)


def reference_op(op, x, w, thr, splits, norm_w, residual, scale=None, zero=None):
    if op.startswith("silu_down"):
        return sparse_silu_down_ref(x, w, thr, residual=residual, scale=scale, zero=zero)
    return sparse_linear_ref(x, w, thr, splits, norm_weight=norm_w, eps=EPS, residual=residual, scale=scale,
                             zero=zero)
