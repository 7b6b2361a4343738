"""Benchmark (and tune) the sparse matvec kernels on a GPU (the design page's protocol, section 6).

    python scripts/bench_kernels.py                    # GPU checks, then the table; JSON to results/bench_kernels.json
    python scripts/bench_kernels.py --tune             # also search configs first, write sparse_kernels/configs.json
    python scripts/bench_kernels.py --tune --tune_only --tune_shapes tp --tune_batches 1 --skip_checks
                                                       # only tune tensor parallelism's shard shapes
    python scripts/bench_kernels.py --tune --tune_only --tune_shapes Llama-2-7b@2   # any config, any world size
    python scripts/bench_kernels.py --tune --tune_only --weights int8,int4 --tune_batches 1 --tune_shapes Llama-3-8B
                                                       # quantized weights' configs (op/int8, op/int4; the LM head too)

Shapes: Llama-3-8B qkv 4096->6144 (splits 4096/1024/1024), o 4096->4096, gate+up 4096->2x14336,
down 14336->4096 (sparse_silu_down), Llama-3-70B up 8192->28672 and down 28672->8192, and the
8B shapes with the block fusions the model uses (RMSNorm into qkv and gate+up, the residual add
into o and down; their cuBLAS and ideal columns are the unfused ones), each also without
thresholds (p "dns": the dense kernel the model's dense decode runs); bf16; p in 0, 0.1, .., 0.9;
x random, thresholds the exact p-quantile of |x| (of |silu(g)*up| for down).
Times: triton.testing.do_bench_cudagraph, median, cycling through enough weight buffers (>= 1 GiB)
that the 60 MB L2 holds none of them. Columns: cuBLAS dense (F.linear on an (N, K) weight; for
down, on the ready h = silu(g)*up), ideal (cuBLAS over a contiguous (1-p)K slice), ours, the
speedups over cuBLAS, and GB/s of the bytes ours touches (weight rows read + x + y).
"""
import argparse
import itertools
import json
import math
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fileio import atomic_write  # noqa: E402
from loader import DTYPES, run_cli  # noqa: E402
from sparse_kernels import ops, sparse_linear, sparse_linear_ref, sparse_silu_down, sparse_silu_down_ref  # noqa: E402
from sparse_kernels.checks import (EPS, TOL, fused_inputs, kernel_input, random_quantized, reference_op,  # noqa: E402
                                   run_op)
from sparse_kernels.reference import gap_threshold  # noqa: E402
from model import ModelArgs  # noqa: E402
from tp import shard_matvec_shapes  # noqa: E402

SHAPES = [  # name, op, K, N, splits
    ("8B qkv", "linear", 4096, 6144, [4096, 1024, 1024]),
    ("8B o", "linear", 4096, 4096, [4096]),
    ("8B gate+up", "linear", 4096, 28672, [14336, 14336]),
    ("8B down", "silu_down", 14336, 4096, [4096]),
    ("70B up", "linear", 8192, 28672, [28672]),
    ("70B down", "silu_down", 28672, 8192, [8192]),
    ("8B qkv+norm", "linear+norm", 4096, 6144, [4096, 1024, 1024]),
    ("8B o+res", "linear+res", 4096, 4096, [4096]),
    ("8B g+u+norm", "linear+norm", 4096, 28672, [14336, 14336]),
    ("8B down+res", "silu_down+res", 14336, 4096, [4096]),
]
TUNED_SHAPES = [shape for shape in SHAPES if "+" not in shape[1]]  # a fusion runs its base op's config


def shapes_to_tune(spec: str) -> list:
    """--tune_shapes: "block", "tp" or CONFIG[@WORLD]."""
    if spec in ("block", "tp"):
        return TUNED_SHAPES if spec == "block" else TP_SHAPES
    config, _, world = spec.partition("@")
    if world and not (world.isdigit() and int(world) >= 1):
        raise ValueError(f"{spec!r}: the world size after @ must be a whole number of GPUs")
    return shard_matvec_shapes(config, int(world or 1))


def head_shapes(spec: str) -> list:
    """The LM head of --tune_shapes' model (block: Llama-3-8B's), for quantized weights: a quantized head
    runs the dense kernel (a float head runs cuBLAS). Tensor-parallel ranks hold the whole head."""
    config = "Llama-3-8B" if spec in ("block", "tp") else spec.partition("@")[0]
    args = ModelArgs.from_name(config)
    tag = config.rsplit("-", 1)[-1]
    return [(f"{tag} head", "linear", args.dim, args.vocab_size, [args.vocab_size])]


# tensor-parallel shards (tuned with --tune_shapes tp): Llama-3-8B over 2, 4, 8 GPUs, 70B over 2, 4, 8;
# 70B's gate+up over two GPUs is the 70B up shape above
TP_SHAPES = [s for config in ("Llama-3-8B", "Llama-3-70B") for world in (2, 4, 8) for s in shard_matvec_shapes(config, world)
             if s[1:4] not in [t[1:4] for t in TUNED_SHAPES]]
LEVELS = [round(0.1 * i, 1) for i in range(10)]
COPY_GBPS = 4300  # copy bandwidth of our H200, GB/s, for the table's % column (measured: docs/kernels.md)


# ---------------------------------------------------------------- problems

def quantile_threshold(values: torch.Tensor, p: float) -> float:
    """The exact p-quantile of |values| (torch.quantile, linear interpolation)."""
    return torch.quantile(values.abs().float().flatten(), p).item()


class Problem:
    """One op at one shape, batch and dtype, with rotating weight buffers."""

    def __init__(self, op, K, N, splits, B, dtype, min_bytes=1 << 30, seed=0, weights="float", group=128):
        self.op, self.K, self.N, self.splits, self.B, self.dtype = op, K, N, splits, B, dtype
        self.weights, self.group = weights, group
        g = torch.Generator(device="cuda").manual_seed(seed)
        self.elem_bytes = {"float": dtype.itemsize, "int8": 1, "int4": 0.5}[weights]
        n_buf = max(2, math.ceil(min_bytes / (K * N * self.elem_bytes)))
        if weights == "float":  # (w_t, scale, zero)
            self.bufs = [(torch.randn(K, N, device="cuda", generator=g).mul_(K ** -0.5).to(dtype), None, None)
                         for _ in range(n_buf)]
        else:
            self.bufs = [random_quantized(K, N, weights, group, g) for _ in range(n_buf)]
        self.x, self.norm_w, self.residual = fused_inputs(op, B, K, N, dtype, g)
        self.src = kernel_input(op, self.x, self.norm_w)  # (B, K): what the thresholds apply to
        self.step = itertools.count()

    def thresholds(self, p):
        if p is None:  # dense: no thresholds
            return None
        return torch.full((len(self.splits),), quantile_threshold(self.src, p), device="cuda")

    def ours(self, thr, cfg=None):
        def fn():
            w, scale, zero = self.bufs[next(self.step) % len(self.bufs)]
            if cfg is not None:
                return ops.run_triton(self.op.split("+")[0], self.x, w, thr, self.splits, cfg,
                                      norm_weight=self.norm_w, eps=EPS, residual=self.residual, scale=scale, zero=zero)
            return run_op(self.op, self.x, w, thr, self.splits, self.norm_w, self.residual, scale, zero)
        return fn

    def cublas(self, k=None):
        k = self.K if k is None else k
        x = self.src[:, :k].contiguous()
        mats = [w.view(-1)[: self.N * k].view(self.N, k) for w, _, _ in self.bufs]  # contiguous (N, k)
        return lambda: F.linear(x, mats[next(self.step) % len(mats)])

    def bytes_touched(self, thr):
        """Weight rows read (and, quantized, their scales) + x + y."""
        io = (self.x.numel() + self.B * self.N) * self.dtype.itemsize
        if thr is None:  # dense: every row
            rows = self.K * self.N
        else:
            rows = sum(int((self.src.abs().float() > thr[s]).any(0).sum()) * width for s, width in enumerate(self.splits))
        scales = 0 if self.weights == "float" else 4 * self.N if self.weights == "int8" else \
            4 * self.N * self.K // self.group  # int4: a bf16 scale and zero per group (every group holds a kept row)
        return rows * self.elem_bytes + scales + io


def gpt_fast_anchor(prob: Problem):
    """The matvec as plain gpt-fast runs quantized weights, on the same shape, or None where torch has no
    such path: int8, torch.compile of F.linear(x, w_int8.to(dtype)) * scales on (N, K) weights; int4,
    torch's tinygemm op (aten._weight_int4pack_mm, the one gpt-fast's int4 calls) on repacked weights."""
    x = prob.src.contiguous()
    n_buf = max(2, math.ceil((1 << 30) / (prob.K * prob.N * prob.elem_bytes)))
    g = torch.Generator(device="cuda").manual_seed(1)
    if prob.weights == "int8":
        mats = [torch.randint(-127, 128, (prob.N, prob.K), device="cuda", generator=g, dtype=torch.int8)
                for _ in range(n_buf)]
        scales = torch.rand(prob.N, device="cuda", generator=g).to(prob.dtype)
        linear = torch.compile(lambda x, w, s: F.linear(x, w.to(x.dtype)) * s)
        return lambda: linear(x, mats[next(prob.step) % n_buf], scales)
    try:
        mats = [torch.ops.aten._convert_weight_to_int4pack(
            torch.randint(0, 256, (prob.N, prob.K // 2), device="cuda", generator=g, dtype=torch.int32).to(torch.uint8),
            8) for _ in range(n_buf)]
        scales_and_zeros = torch.rand(prob.K // prob.group, prob.N, 2, device="cuda", generator=g).to(prob.dtype)
        fn = lambda: torch.ops.aten._weight_int4pack_mm(x, mats[next(prob.step) % n_buf], prob.group,  # noqa: E731
                                                         scales_and_zeros)
        fn()
        return fn
    except (RuntimeError, AttributeError, NotImplementedError) as e:
        print(f"gpt-fast's int4 path does not run here ({type(e).__name__}: {str(e)[:200]})", flush=True)
        return None


def graph_time_us(fn, calls=24, replays=5):
    """Quick CUDA-graph timing for tuning: `calls` calls per graph, median replay / calls."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    g.replay()
    times = []
    for _ in range(replays):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        g.replay()
        e1.record()
        torch.cuda.synchronize()
        times.append(e0.elapsed_time(e1) * 1e3 / calls)
    del g
    return statistics.median(times)


def bench_us(fn, rep):
    import triton.testing

    fn()
    return triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median") * 1e3


# ---------------------------------------------------------------- checks (the CPU tests' checks, on the GPU)

def check_case(op, B, K, N, splits, dtype, p, cfg=None, seed=0, weights="float", group=0):
    """Kernel (poisoned output, explicit or table config) against the reference; returns an error or None.
    weights "int8" or "int4" (groups of `group` rows): random quantized weights with their scales."""
    from sparse_kernels import triton_kernels as tk

    g = torch.Generator(device="cuda").manual_seed(seed)
    x, norm_w, residual = fused_inputs(op, B, K, N, dtype, g)
    scale = zero = None
    if weights == "float":
        w = torch.randn(K, N, device="cuda", generator=g).mul_(K ** -0.5).to(dtype)
    else:
        w, scale, zero = random_quantized(K, N, weights, group, g)
    if "+wview" in op:  # a transposed view (unit row stride): the op copies it, and the dense launch waits first
        w = w.t().contiguous().t()
    thr = None if p is None else torch.full((len(splits),), gap_threshold(kernel_input(op, x, norm_w), p),
                                            device="cuda")  # None: dense
    ref = reference_op(op, x, w, thr, splits, norm_w, residual, scale, zero)
    if cfg is None:
        y = run_op(op, x, w, thr, splits, norm_w, residual, scale, zero)
    else:
        y = torch.full((B, N), float("nan"), device="cuda", dtype=dtype)
        ws = ops.workspace(x.device, *tk.workspace_sizes(B, K, N, cfg, group if weights == "int4" else 0))
        counts = ws[1]
        bounds = ops.segment_starts(splits)
        fused = dict(silu=op.startswith("silu_down"), norm_weight=norm_w, eps=EPS, residual=residual, scale=scale,
                     zero=zero)
        tk.launch(x, w, thr, bounds, y, *ws, cfg, **fused)
        y2 = y.clone()
        tk.launch(x, w, thr, bounds, y, *ws, cfg, **fused)  # counters were reset
        if not torch.equal(y, y2):
            return "second call differs (counters not reset or not deterministic)"
        if int(counts[: N].abs().sum()) != 0:
            return "arrival counters not reset to zero"
    if y.isnan().any():
        return "output not fully written (NaN left)"
    tol = TOL[dtype]
    if not torch.allclose(y.float(), ref.float(), atol=tol, rtol=tol):
        return f"max error {(y.float() - ref.float()).abs().max().item():.3g} > {tol}"
    return None


def check_cases():
    E = dict(DOT=False, num_warps=4, num_stages=1)
    D = dict(DOT=True, num_warps=4, num_stages=3)
    cases = []
    for dname, B in itertools.product(DTYPES, (1, 2, 3, 8)):
        for p in (0.0, 0.3, 0.5, 0.9, 1.0):
            cases.append(("linear", B, 576, 1536, [576, 480, 480], dname, p, None))
        cases.append(("linear", B, 576, 11008, [11008], dname, 0.5, None))
        cases.append(("silu_down", B, 1536, 1000, [1000], dname, 0.5, None))
        cases.append(("linear", B, 1000, 1000, [1000], dname, 0.9, dict(BLOCK_N=128, BLOCK_K=32, K_CHUNK=256, **E)))
        cases.append(("linear", B, 1000, 1000, [1000], dname, 0.5, dict(BLOCK_N=128, BLOCK_K=32, K_CHUNK=512, DEPTH=3, **E)))
        cases.append(("silu_down", B, 1536, 1000, [1000], dname, 0.3, dict(BLOCK_N=128, BLOCK_K=32, K_CHUNK=1024, DEPTH=3, **D)))
        cases.append(("silu_down", B, 576, 1000, [1000], dname, 0.3, dict(BLOCK_N=64, BLOCK_K=64, K_CHUNK=1024, **D)))
        cases.append(("linear", B, 4096, 6144, [4096, 1024, 1024], dname, 0.5, dict(BLOCK_N=256, BLOCK_K=64, K_CHUNK=512, **D)))
        if B == 1:
            cases.append(("linear", B, 4096, 6144, [4096, 1024, 1024], dname, 0.5, dict(BLOCK_N=1024, BLOCK_K=8, K_CHUNK=128, **E)))
            cases.append(("silu_down", B, 1536, 4096, [4096], dname, 0.5, dict(BLOCK_N=512, BLOCK_K=16, K_CHUNK=64, **E)))
        for p in (0.0, 0.5, 0.9):  # the block fusions, tabled and explicit configs
            cases.append(("linear+norm", B, 576, 1536, [576, 480, 480], dname, p, None))
            cases.append(("silu_down+res", B, 1536, 576, [576], dname, p, None))
        cases.append(("linear+norm+res", B, 4096, 4096, [4096], dname, 0.5, dict(BLOCK_N=128, BLOCK_K=64, K_CHUNK=512, **E)))
        cases.append(("linear+res", B, 4096, 6144, [4096, 1024, 1024], dname, 0.5, dict(BLOCK_N=256, BLOCK_K=64, K_CHUNK=512, **D)))
        for op, K, N, splits in (("linear+norm", 4096, 6144, [4096, 1024, 1024]), ("silu_down+res", 14336, 4096, [4096]),
                                 ("linear+norm", 576, 1536, [576, 480, 480]), ("silu_down", 1536, 1000, [1000]),
                                 ("linear+norm+wview", 576, 1536, [576, 480, 480]),
                                 ("silu_down+res+wview", 1536, 576, [576])):
            cases.append((op, B, K, N, splits, dname, None, None))  # dense, as the model's dense decode runs it
    cases.append(("linear", 9, 576, 1536, [576, 480, 480], "bf16", 0.5, None))  # B > 8: reference fallback
    cases.append(("linear+norm+res", 9, 576, 1536, [576, 480, 480], "bf16", 0.5, None))
    return [c + ("float", 0) for c in cases] + quantized_check_cases()


def quantized_check_cases():
    """int8 and int4 weights (int4: groups of 32, 64, 128 rows) through the tabled configs and explicit ones,
    every fusion, dense and sparse, B 1 to 8, as (..., weights, group)."""
    E = dict(DOT=False, num_warps=4, num_stages=1)
    cases = []
    for (weights, group), dname, B in itertools.product((("int8", 0), ("int4", 128), ("int4", 64), ("int4", 32)),
                                                        ("bf16", "fp16"), (1, 2, 3, 8)):
        q = (weights, group)
        for p in (0.0, 0.5, 0.9, None):
            cases.append(("linear+norm", B, 4096, 6144, [4096, 1024, 1024], dname, p, None) + q)
            cases.append(("silu_down+res", B, 1536, 576, [576], dname, p, None) + q)
        if group <= 64:  # K = 576 is 9 groups of 64
            cases.append(("linear", B, 576, 1536, [576, 480, 480], dname, 0.5, None) + q)
        cases.append(("linear+res", B, 4096, 4096, [4096], dname, 0.5, None) + q)
        cases.append(("linear", B, 1024, 11008, [11008], dname, 0.3, None) + q)
        # rows that are not whole int32 words: the kernels read them byte by byte
        n = 998 if weights == "int8" else 1004
        cases.append(("linear+res", B, 256, n, [n], dname, 0.5, None) + q)
        if B == 1:  # the 8B MLP's wide tiles, their int4 K chunks over 2-4 groups or capped at one
            cases.append(("linear", B, 4096, 6144, [4096, 1024, 1024], dname, 0.5,
                          dict(BLOCK_N=1024, BLOCK_K=8, K_CHUNK=128, **E)) + q)
            cases.append(("silu_down", B, 1536, 4096, [4096], dname, 0.5, dict(BLOCK_N=512, BLOCK_K=16, K_CHUNK=256,
                                                                               DEPTH=4, **E)) + q)
            # int4 chunks over 8 to 32 groups, scaled group by group in the stream, dense and sparse
            for p in (None, 0.5, 0.9):
                cases.append(("linear+norm", B, 4096, 6144, [4096, 1024, 1024], dname, p,
                              dict(BLOCK_N=512, BLOCK_K=16, K_CHUNK=1024, **E)) + q)
    return cases


def run_checks(chunk):
    torch.cuda.set_device(0)
    out = []
    for op, B, K, N, splits, dname, p, cfg, weights, group in chunk:
        err = check_case(op, B, K, N, splits, DTYPES[dname], p, cfg, weights=weights, group=group)
        out.append(((op, B, K, N, dname, p, cfg and cfg["DOT"], weights, group), err))
    return out


def parallel(fn, chunks, workers):
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        return [r for part in pool.map(fn, chunks) for r in part]


def check_compiled():
    """Both ops inside torch.compile(fullgraph, reduce-overhead): new thresholds and inputs,
    no recompilation, equal to the reference each time; then the dense chain (check_dense_chain)."""
    torch._dynamo.config.error_on_recompile = True
    K, I, N = 576, 1536, 576

    def block(x, w_qkv, thr, w13, w2, norm_w):  # fused as in model.Block: norm into qkv, residual into down
        qkv = sparse_linear(x, w_qkv, thr[0:3], [576, 192, 192], norm_weight=norm_w, eps=EPS)
        gate_up = sparse_linear(x, w13, thr[4:6], [I, I])
        return qkv, sparse_silu_down(gate_up, w2, thr[6:7], residual=x)

    f = torch.compile(block, fullgraph=True, mode="reduce-overhead")
    g = torch.Generator(device="cuda").manual_seed(1)
    w_qkv = torch.randn(K, 960, device="cuda", generator=g).div_(K ** 0.5).bfloat16()
    w13 = torch.randn(K, 2 * I, device="cuda", generator=g).div_(K ** 0.5).bfloat16()
    w2 = torch.randn(I, N, device="cuda", generator=g).div_(I ** 0.5).bfloat16()
    norm_w = (0.5 + torch.rand(K, device="cuda", generator=g)).bfloat16()
    thr = torch.zeros(7, device="cuda")
    errs = []
    for step, p in enumerate((0.0, 0.5, 0.9, 0.5, 0.3)):
        x = torch.randn(1, K, device="cuda", generator=g).bfloat16()
        thr.copy_(torch.full((7,), gap_threshold(x, p)))
        qkv, y = f(x, w_qkv, thr, w13, w2, norm_w)
        qkv, y = qkv.clone(), y.clone()
        rq = sparse_linear_ref(x, w_qkv, thr[0:3], [576, 192, 192], norm_weight=norm_w, eps=EPS)
        gu = sparse_linear_ref(x, w13, thr[4:6], [I, I])
        ry = sparse_silu_down_ref(gu, w2, thr[6:7], residual=x)
        errs.append(max((qkv.float() - rq.float()).abs().max().item(), (y.float() - ry.float()).abs().max().item()))
    torch._dynamo.config.error_on_recompile = False
    return errs + check_dense_chain()


def check_dense_chain(device="cuda", steps=3) -> list:
    """The dense block as the model's dense decode runs it, in one compiled CUDA graph: each op's
    input is the previous op's output, which a kernel launched with programmatic dependent launch
    must wait for. Last, a dense launch on weights the op copies right before it (a transposed view:
    launched without PDL, early_weights=False). Each output against the reference on the kernel's
    actual inputs (a stale read would be far off); max errors, one per step."""
    K, I = 576, 1536
    g = torch.Generator(device=device).manual_seed(2)
    w_qkv, w_o = (torch.randn(K, n, device=device, generator=g).div_(K ** 0.5).bfloat16() for n in (960, K))
    w13 = torch.randn(K, 2 * I, device=device, generator=g).div_(K ** 0.5).bfloat16()
    w2 = torch.randn(I, K, device=device, generator=g).div_(I ** 0.5).bfloat16()
    norm_w = (0.5 + torch.rand(K, device=device, generator=g)).bfloat16()

    w_view = w_o.t().contiguous().t()  # o's weights with unit row stride: the op copies them before its launch

    def block(x):  # (1, K) -> the five outputs
        qkv = sparse_linear(x, w_qkv, None, [960], norm_weight=norm_w, eps=EPS)
        h = sparse_linear(qkv[:, :K], w_o, None, [K], residual=x)
        gate_up = sparse_linear(h, w13, None, [2 * I], norm_weight=norm_w, eps=EPS)
        out = sparse_silu_down(gate_up, w2, None, residual=h)
        return qkv, h, gate_up, out, sparse_linear(out, w_view, None, [K])  # a dense launch right after a copy

    f = torch.compile(block, fullgraph=True, mode="reduce-overhead" if device == "cuda" else None)
    errs = []
    for _ in range(steps):
        x = torch.randn(1, K, device=device, generator=g).bfloat16()
        qkv, h, gate_up, out, y = (t.clone() for t in f(x))
        refs = (sparse_linear_ref(x, w_qkv, None, [960], norm_weight=norm_w, eps=EPS),
                sparse_linear_ref(qkv[:, :K].contiguous(), w_o, None, [K], residual=x),
                sparse_linear_ref(h, w13, None, [2 * I], norm_weight=norm_w, eps=EPS),
                sparse_silu_down_ref(gate_up, w2, None, residual=h), sparse_linear_ref(out, w_view, None, [K]))
        errs.append(max((a.float() - r.float()).abs().max().item() for a, r in zip((qkv, h, gate_up, out, y), refs)))
    return errs


# ---------------------------------------------------------------- tuning

def candidate_configs(op, K, N, B, n_sm, narrow=True, weights="float", group=128):
    """Tile shapes x W tiles in flight x K chunks that give between one and ~16 programs per SM.
    narrow=False: only the wide tiles (BLOCK_N >= 512) besides the config already in the table.
    Quantized rows are held as one byte an element, so their tiles may hold twice the elements of
    bf16's for the same registers and take twice the elements for one 16-byte load (int4: its
    packed bytes). int4 chunks lie inside a group except in B == 1 launches whose rounds divide a
    group (triton_kernels.chunk_plan), so its grids may be larger."""
    # (BLOCK_N, BLOCK_K, num_warps, num_stages, DOT, DEPTH)
    if B == 1:  # the elementwise path; 2-4 steps of rows in flight (DEPTH)
        variants = []
        if narrow:
            variants += [(bn, bk, nw, 1, 0, d) for bn, bk in ((32, 256), (64, 64), (64, 128), (128, 32), (128, 64),
                                                                (256, 32)) for nw in (4, 8) for d in (2, 3, 4)]
        # wide tiles: 1-4 KB of each gathered row per program (DRAM streams long segments better)
        variants += [(bn, bk, nw, 1, 0, d) for bn, bk in ((512, 8), (512, 16), (1024, 4), (1024, 8), (2048, 4))
                     + (((512, 32), (1024, 16), (2048, 8)) if weights != "float" else ())
                     for nw in (4, 8) for d in (2, 3, 4)]
        chunks = (64, 128, 256, 512, 1024, 2048, 4096)
    else:  # the elementwise path exists for B == 1 only; batches read nearly every row (union)
        variants = [(256, 32, 4, 4, 1, 2), (256, 32, 8, 3, 1, 2), (128, 64, 4, 3, 1, 2), (128, 32, 4, 3, 1, 2),
                    (256, 64, 8, 3, 1, 2)]
        chunks = (256, 512, 1024)
    if weights == "int4":  # other chunks above the group launch as one group's (chunk_plan): it stands for them
        from sparse_kernels.triton_kernels import chunk_plan

        chunks = sorted(set(chunks) | {group})
    most, fewest = (4 * 32, 8) if weights == "float" else (8 * 32, 16 if weights == "int8" else 32)
    out = []
    for bn, bk, nw, ns, dot, depth in variants:
        if depth * bn * bk > most * 32 * nw or bn * bk < fewest * 32 * nw:  # W tiles in registers: from one 16-byte
            continue  # load a thread a step to 256 bytes (bf16: 8 to 128 elements) a thread in flight
        n_tiles = -(-N // bn)
        max_prog = 32 * n_sm if weights == "int4" else (4 if bn >= 512 else 6) * n_sm if B == 1 else 16 * n_sm
        min_chunk = max(bk, 128 if bn < 512 else 64)
        if weights == "int4":  # batch launches cap chunks at the group (triton_kernels.chunk_plan)
            min_chunk = min(min_chunk, group)
        for kc in chunks:
            cfg = dict(BLOCK_N=bn, BLOCK_K=bk, K_CHUNK=kc, DEPTH=depth, DOT=bool(dot), num_warps=nw, num_stages=ns)
            if weights == "int4" and kc > group and (kc not in (256, 512, 1024, 2048)
                                                     or chunk_plan(cfg, group, B)[2] == 1):
                continue  # a repeat of the chunk of `group` rows (or a grouped chunk not searched)
            n_prog = n_tiles * -(-K // kc)
            if n_sm <= n_prog <= max_prog and kc * max(1, B) <= 4096 * 2 and kc >= min_chunk:
                out.append(cfg)
    return out


def precompile(jobs):
    """Compile (by running once) each (op, K, N, splits, B, cfg, weights, group) job; fills Triton's disk cache."""
    torch.cuda.set_device(0)
    bufs = {}
    g = torch.Generator(device="cuda").manual_seed(0)
    for op, K, N, splits, B, cfg, weights, group in jobs:
        if (op, K, N, B) not in bufs:
            x = torch.randn(B, 2 * K if op == "silu_down" else K, device="cuda").bfloat16()
            bufs[(op, K, N, B)] = x, ((torch.zeros(K, N, device="cuda", dtype=torch.bfloat16), None, None)
                                      if weights == "float" else random_quantized(K, N, weights, group, g))
        x, (w, scale, zero) = bufs[(op, K, N, B)]
        ops.run_triton(op, x, w, torch.zeros(len(splits), device="cuda"), splits, cfg, scale=scale, zero=zero)
        ops.run_triton(op, x, w, None, splits, cfg, scale=scale, zero=zero)  # the dense kernel: level 0
    torch.cuda.synchronize()
    return [None]


DENSE_GAIN = 0.95  # a quantized shape's dense kernel takes its own config where that is 5% faster than the chosen one


def tune(shapes, batches, workers, levels=(0.0, 0.5, 0.9), narrow=True, tabled=None, weights="float", group=128):
    """The best config of each shape and batch (weights: the format of W^T), by the geometric mean over
    levels of time / best time at that level; level None is the dense kernel (dense decode), which
    also gets the config fastest there where that beats the chosen one by 5%."""
    n_sm = torch.cuda.get_device_properties(0).multi_processor_count
    plan = {(name, B): candidate_configs(op, K, N, B, n_sm, narrow, weights, group) for name, op, K, N, splits in shapes
            for B in batches}
    for name, op, K, N, splits in shapes:  # the config in the table competes too
        for B in batches:
            cfg = (tabled or {}).get(ops.config_key(op, K, N, torch.bfloat16, B, weights))
            if cfg is not None and cfg not in plan[(name, B)]:
                plan[(name, B)].append(cfg)
    jobs = [(op, K, N, splits, B, cfg, weights, group) for name, op, K, N, splits in shapes for B in batches
            for cfg in plan[(name, B)]]
    t0 = time.time()
    by_variant = {}
    for j in jobs:  # one worker compiles all launches of a kernel variant
        key = (j[0], j[4] if not j[5]["DOT"] else 16, tuple(sorted(j[5].items())))
        by_variant.setdefault(key, []).append(j)
    chunks = [sum(list(by_variant.values())[i::workers], []) for i in range(workers)]
    parallel(precompile, [c for c in chunks if c], workers)
    print(f"tune {weights}: compiled {len(by_variant)} variants ({len(jobs)} launches) in {time.time() - t0:.0f} s",
          flush=True)
    table, record = {}, {}
    for name, op, K, N, splits in shapes:
        shape_levels = (None,) if name.endswith(" head") else levels  # an LM head runs dense only
        for B in batches:
            prob = Problem(op, K, N, splits, B, torch.bfloat16, weights=weights, group=group)
            cands = plan[(name, B)]
            times = {}
            for p in shape_levels:
                thr = prob.thresholds(p)
                times[p] = [graph_time_us(prob.ours(thr, cfg)) for cfg in cands]
            best = {p: min(ts) for p, ts in times.items()}
            score = [math.exp(statistics.mean(math.log(times[p][i] / best[p]) for p in shape_levels))
                     for i in range(len(cands))]
            i_best = min(range(len(cands)), key=score.__getitem__)
            table[ops.config_key(op, K, N, torch.bfloat16, B, weights)] = cands[i_best]
            i_dense = times[None].index(best[None]) if None in times and len(shape_levels) > 1 else i_best
            own_dense = i_dense != i_best and times[None][i_dense] < DENSE_GAIN * times[None][i_best]
            if weights != "float":  # the dense kernel gets its own config, or none (an earlier run's is dropped)
                table[ops.config_key(op, K, N, torch.bfloat16, B, weights, dense=True)] = (cands[i_dense] if own_dense
                                                                                           else None)
            tag = "" if weights == "float" else f" {weights}"
            record[f"{name}{tag} B{B}"] = dict(
                device=torch.cuda.get_device_name(0), chosen=cands[i_best],
                chosen_us={str(p): times[p][i_best] for p in shape_levels},
                best_per_level={str(p): dict(us=best[p], config=cands[times[p].index(best[p])]) for p in shape_levels},
                n_candidates=len(cands))
            print(f"tune {name:11s}{tag} B{B}: {cands[i_best]}  " +
                  "  ".join(f"p={p}: {times[p][i_best]:.1f} us (best {best[p]:.1f})" for p in shape_levels), flush=True)
            if own_dense:
                print(f"tune {name:11s}{tag} B{B} dense kernel: {cands[i_dense]}  {times[None][i_dense]:.1f} us")
            del prob
            torch.cuda.empty_cache()
    return table, record


# ---------------------------------------------------------------- main

def copy_bandwidth(device="cuda") -> float:
    """Bytes read + written per second by a copy kernel over 2 GiB, timed as the kernels are (CUDA
    graph). Not tensor.copy_: captured in a graph, a device copy becomes a memcpy node that runs
    well below the copy bandwidth (docs/kernels.md)."""
    src = torch.empty(1 << 30, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    with torch.cuda.device(device):
        us = bench_us(lambda: torch.add(src, 0, out=dst), rep=50)
    return 2 * src.numel() * src.element_size() / (us * 1e-6)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "results" / "bench_kernels.json"), help="JSON results path")
    ap.add_argument("--tune", action="store_true", help="search configs and write --configs before benchmarking")
    ap.add_argument("--configs", default=str(ops.CONFIG_PATH), help="where --tune writes the config table")
    ap.add_argument("--tune_wide", action="store_true",
                    help="B=1: search only the wide tiles (BLOCK_N >= 512) and the config already in --configs")
    ap.add_argument("--tune_batches", default="1,8", help="batch sizes to tune (comma separated)")
    ap.add_argument("--tune_shapes", default="block",
                    help="block: the benchmark's shapes; tp: Llama-3-8B's and 70B's shards over 2, 4 and 8 GPUs; "
                         "CONFIG[@WORLD] (e.g. Llama-2-7b or Llama-3-70B@4): that config's block matvecs "
                         "(rank 0's shards over WORLD GPUs)")
    ap.add_argument("--tune_only", action="store_true", help="with --tune: write --configs and stop")
    ap.add_argument("--batches", default="1", help="batch sizes to benchmark (comma separated)")
    ap.add_argument("--rep", type=int, default=20, help="do_bench_cudagraph rep (ms)")
    ap.add_argument("--workers", type=int, default=min(12, os.cpu_count() or 1), help="compile/check processes")
    ap.add_argument("--skip_checks", action="store_true", help="skip the GPU correctness checks")
    ap.add_argument("--weights", default="float",
                    help="comma-separated: float (the table above), int8, int4 (quantized weights in the same kernels, "
                         "beside gpt-fast's way of running them); with --tune, the formats to tune")
    ap.add_argument("--groupsize", type=int, default=128, help="int4 rows per scale")
    ap.add_argument("--table_shapes", default="all", help="all, or comma-separated shape names (e.g. '8B gate+up')")
    run_cli(run, ap.parse_args(argv), "benchmarking the sparse kernels")


def run(args):
    try:
        tune_shapes = shapes_to_tune(args.tune_shapes)
    except ValueError as e:
        raise SystemExit(f"error: --tune_shapes: {e}")
    if not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device; the kernel benchmark needs a GPU (the CPU tests are tests/test_kernels.py)")
    import triton

    result = dict(device=torch.cuda.get_device_name(0), torch=torch.__version__, triton=triton.__version__,
                  command=" ".join(sys.argv))
    t_start = time.time()
    if not args.skip_checks:
        cases = check_cases()
        res = parallel(run_checks, [cases[i::args.workers] for i in range(args.workers)], args.workers)
        bad = [(c, e) for c, e in res if e]
        for c, e in bad:
            print("CHECK FAILED", c, e)
        try:
            errs = check_compiled()
        except Exception as e:  # report, and still benchmark
            print(f"CHECK FAILED torch.compile: {type(e).__name__}: {str(e)[:2000]}")
            errs = [float("inf")]
        print(f"checks: {len(res) - len(bad)}/{len(res)} kernel cases pass; torch.compile(reduce-overhead) "
              f"max errors {['%.3g' % e for e in errs]} ({time.time() - t_start:.0f} s)", flush=True)
        result["checks"] = dict(cases=len(res), failed=[[str(c), e] for c, e in bad], compiled_max_err=errs)
        result["checks"]["ok"] = not bad and max(errs) <= TOL[torch.bfloat16]
    if args.tune:
        old = json.loads(Path(args.configs).read_text()) if Path(args.configs).exists() else {}
        table, record = {}, {}
        for weights in [w for w in args.weights.split(",") if w]:
            if weights == "float":
                levels, shapes = (0.0, 0.5, 0.9), tune_shapes
            else:  # level 0 is the dense kernel here (dense quantized decode); the LM head is quantized too
                levels, shapes = (None, 0.5, 0.9), tune_shapes + head_shapes(args.tune_shapes)
            t, r = tune(shapes, [int(b) for b in args.tune_batches.split(",")], args.workers, levels=levels,
                        narrow=not args.tune_wide, tabled=old.get("configs"), weights=weights, group=args.groupsize)
            table.update(t)
            record.update(r)
        # shapes and batches not tuned now keep their configs; None: a dense config not found again
        table = {key: cfg for key, cfg in {**old.get("configs", {}), **table}.items() if cfg is not None}
        record = {**old.get("tuning", {}), **record}
        # records of runs before records named their device were all tuned on the file's device(s) then
        devices = sorted({d for r in record.values() for d in r.get("device", old.get("device", "")).split("; ")}
                         - {""})
        Path(args.configs).parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(dict(
            device="; ".join(devices), torch=result["torch"], triton=result["triton"],
            note="written by scripts/bench_kernels.py --tune; key op:KxN:dtype:B; chosen by the geometric mean "
                 "over the levels (float: p in {0, 0.5, 0.9}; quantized: the dense kernel, 0.5, 0.9) of time / best "
                 "time at that level (tuning: the chosen and the best per level, and the device); op/FORMAT/dense: "
                 "the dense kernel's own config where its best is 5% faster than the chosen; entries not "
                 "tuned in the latest run are kept from earlier runs",
            configs=table, tuning=record), indent=1) + "\n"
        with atomic_write(args.configs) as tmp:  # ops.py reads it at import: never leave half of one
            tmp.write_text(text)
        ops._configs = table
        result["tuning"] = record
        print(f"tune: wrote {args.configs} ({time.time() - t_start:.0f} s)", flush=True)
        if args.tune_only:
            return

    bw = copy_bandwidth() / 1e9
    result["copy_GBps"] = bw
    shapes = SHAPES if args.table_shapes == "all" else [s for s in SHAPES if s[0] in args.table_shapes.split(",")]
    weights = [w for w in args.weights.split(",") if w]
    rows, dense = [], {}  # dense: cuBLAS and ideal times per (K, N, B, p), reused by the fused rows
    for name, op, K, N, splits in (shapes if "float" in weights else []):
        for B in [int(b) for b in args.batches.split(",")]:
            prob = Problem(op, K, N, splits, B, torch.bfloat16)
            for p in LEVELS + ([None] if "+" in op else []):  # None: the fused dense kernel (dense decode)
                thr = prob.thresholds(p)
                t_ours = bench_us(prob.ours(thr), args.rep)
                level = p or 0.0  # the dense kernel's cuBLAS and ideal are p = 0's
                if (K, N, B, level) not in dense:
                    dense[(K, N, B, level)] = (bench_us(prob.cublas(), args.rep),
                                               bench_us(prob.cublas(max(1, round((1 - level) * K))), args.rep))
                t_dense, t_ideal = dense[(K, N, B, level)]
                nbytes = prob.bytes_touched(thr)
                rows.append(dict(shape=name, op=op, K=K, N=N, B=B, p=p, cublas_us=t_dense, ideal_us=t_ideal,
                                 ours_us=t_ours, speedup=t_dense / t_ours, ideal_speedup=t_dense / t_ideal,
                                 bytes=nbytes, GBps=nbytes / t_ours / 1e3,
                                 config=ops.pick_config(op.split("+")[0], K, N, torch.bfloat16, B,
                                                        ops.sm_count(torch.device("cuda")))))
            del prob
            torch.cuda.empty_cache()
    result["rows"] = rows
    result["quantized_rows"] = quantized = quantized_table(shapes, [w for w in weights if w != "float"],
                                                           args.groupsize, args.rep)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(args.out) as tmp:
        tmp.write_text(json.dumps(result, indent=1) + "\n")
    if "checks" in result:
        print(f"\nGPU checks: {'all pass' if result['checks']['ok'] else 'FAILED (see above)'}")
    print(f"\n{result['device']}, torch {result['torch']}, triton {result['triton']}, bf16, "
          f"do_bench_cudagraph median; copy bandwidth {bw:.0f} GB/s; JSON: {args.out}")
    print(f"{'shape':11s} {'B':>1s} {'p':>3s} {'cuBLAS':>7s} {'ideal':>7s} {'ours':>7s} {'speedup':>7s} "
          f"{'ideal x':>7s} {'GB/s':>6s} {'%4.3TB/s':>8s}")
    for r in rows:
        level = "dns" if r["p"] is None else f"{r['p']:3.1f}"
        print(f"{r['shape']:11s} {r['B']:1d} {level:>3s} {r['cublas_us']:7.1f} {r['ideal_us']:7.1f} {r['ours_us']:7.1f} "
              f"{r['speedup']:7.2f} {r['ideal_speedup']:7.2f} {r['GBps']:6.0f} {100 * r['GBps'] / COPY_GBPS:8.0f}")
    if quantized:
        print("\nquantized weights, B=1 (gpt-fast: its way of running them on the same shape; vs dns: over our "
              "dense kernel on the same weights)")
        print(f"{'shape':11s} {'weights':>7s} {'p':>3s} {'gpt-fast':>8s} {'ours':>7s} {'vs gf':>6s} {'vs dns':>6s} "
              f"{'GB/s':>6s}")
        for r in quantized:
            level = "dns" if r["p"] is None else f"{r['p']:3.1f}"
            anchor = f"{r['gpt_fast_us']:8.1f}" if r["gpt_fast_us"] else f"{'n/a':>8s}"
            vs_gf = f"{r['gpt_fast_us'] / r['ours_us']:6.2f}" if r["gpt_fast_us"] else f"{'':>6s}"
            print(f"{r['shape']:11s} {r['weights']:>7s} {level:>3s} {anchor} {r['ours_us']:7.1f} {vs_gf} "
                  f"{r['vs_dense']:6.2f} {r['GBps']:6.0f}")


def quantized_table(shapes, formats, group, rep) -> list:
    """B = 1 rows of quantized weights: our dense kernel (p None) and the sparse one at a few levels, beside
    gpt-fast's way of running the same weights (gpt_fast_anchor)."""
    rows = []
    for weights, (name, op, K, N, splits) in itertools.product(formats, shapes):
        if weights == "int4" and K % group:
            continue
        prob = Problem(op, K, N, splits, 1, torch.bfloat16, weights=weights, group=group)
        anchor = gpt_fast_anchor(prob) if "+" not in op else None  # the fused rows: no gpt-fast counterpart
        t_anchor = bench_us(anchor, rep) if anchor else None
        t_dense = None
        for p in (None, 0.0, 0.5, 0.7, 0.9):
            thr = prob.thresholds(p)
            t = bench_us(prob.ours(thr), rep)
            t_dense = t_dense or t
            nbytes = prob.bytes_touched(thr)
            rows.append(dict(shape=name, op=op, K=K, N=N, B=1, weights=weights, group=group if weights == "int4" else
                             None, p=p, gpt_fast_us=t_anchor, ours_us=t, vs_dense=t_dense / t, bytes=nbytes,
                             GBps=nbytes / t / 1e3))
        del prob
        torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    main()
