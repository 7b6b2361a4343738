"""Benchmark the CPU matvec kernel (sparse_kernels/cpu_kernels.c) against torch's dense matmul.

    python scripts/bench_cpu_kernels.py                          # SmolLM2-135M's block, fp32 and bf16
    python scripts/bench_cpu_kernels.py --config Llama-3.2-1B --precision bf16 --threads 2

Shapes: the config's decode matvecs with the fusions the model uses (qkv and gate+up with the
RMSNorm of their input, o and down with the residual add; down from [gate | up]); B = 1; p in
0, 0.1, .., 0.9 plus "dns" (no thresholds: the path the model's dense decode takes); x random,
thresholds the exact p-quantile of the kernel's input (|rms_norm(x)|, |silu(g)*up|, |x|).
Times: median of single calls (time.perf_counter), cycling through enough weight copies
(>= 256 MB) that the last-level cache holds none of them. Columns: torch dense (x @ w_t, the
unfused matmul on the ready input: MKL/oneDNN), ideal (the same over a contiguous (1-p)K slice of
rows), ours, the speedups over torch dense, and GB/s of the weight bytes ours reads (kept rows).
Also the CPU's read bandwidth (a sum over 512 MB) for context. Each case is checked against the
reference first. JSON to --out.
"""
import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from loader import DTYPES, run_cli  # noqa: E402
from model import ModelArgs  # noqa: E402
from sparse_kernels import cpu  # noqa: E402
from sparse_kernels.checks import EPS, TOL, fused_inputs, kernel_input, reference_op, run_op  # noqa: E402

LEVELS = [round(0.1 * i, 1) for i in range(10)]


def block_shapes(config: str) -> list:
    """(name, op, K, N, splits) of one block's decode matvecs, fused as the model runs them."""
    a = ModelArgs.from_name(config)
    q, kv, hidden = a.n_head * a.head_dim, a.n_local_heads * a.head_dim, a.intermediate_size
    return [("qkv+norm", "linear+norm", a.dim, q + 2 * kv, [q, kv, kv]), ("o+res", "linear+res", q, a.dim, [a.dim]),
            ("gate+up+norm", "linear+norm", a.dim, 2 * hidden, [hidden, hidden]),
            ("down+res", "silu_down+res", hidden, a.dim, [a.dim])]


def median_us(fn, calls: int) -> float:
    fn()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def read_bandwidth(n_bytes: int = 512 << 20) -> float:
    """Bytes per second a sum over a tensor far larger than the caches reads, with torch's threads."""
    x = torch.ones(n_bytes // 4)
    return n_bytes / (median_us(lambda: x.sum(), 9) * 1e-6)


def bench_shape(name, op, K, N, splits, dtype, calls, min_bytes=256 << 20) -> list:
    g = torch.Generator().manual_seed(0)
    n_buf = max(2, -(-min_bytes // (K * N * dtype.itemsize)))
    bufs = [(torch.randn(K, N, generator=g) * K ** -0.5).to(dtype) for _ in range(n_buf)]
    x, norm_w, residual = fused_inputs(op, 1, K, N, dtype, g, device="cpu")
    src = kernel_input(op, x, norm_w)  # (1, K): what the thresholds apply to
    step = iter(range(1 << 62))

    def weights():
        return bufs[next(step) % n_buf]

    dense_us = median_us(lambda: src @ weights(), calls)
    rows = []
    for p in [None] + LEVELS:
        thr = None if p is None else torch.full((len(splits),), torch.quantile(src.abs().float(), p).item())
        y = run_op(op, x, bufs[0], thr, splits, norm_w, residual)
        ref = reference_op(op, x, bufs[0], thr, splits, norm_w, residual)
        if not torch.allclose(y.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype]):
            raise SystemExit(f"error: {name} {dtype} p={p}: the kernel does not match the reference")
        ours_us = median_us(lambda: run_op(op, x, weights(), thr, splits, norm_w, residual), calls)
        kept = K if thr is None else int((src.abs().float() > thr[0]).sum())
        ideal_us = median_us(lambda k=max(kept, 1): src[:, :k] @ weights()[:k], calls)
        rows.append(dict(shape=name, op=op, K=K, N=N, dtype=str(dtype).removeprefix("torch."),
                         p="dns" if p is None else p, kept_rows=kept, torch_dense_us=dense_us, ideal_us=ideal_us,
                         ours_us=ours_us, speedup=dense_us / ours_us, ideal_speedup=dense_us / ideal_us,
                         gb_per_s=kept * N * dtype.itemsize / (ours_us * 1e-6) / 1e9))
        print(f"| {name} | {rows[-1]['dtype']} | {rows[-1]['p']} | {dense_us:.1f} | {ideal_us:.1f} | {ours_us:.1f} | "
              f"{rows[-1]['ideal_speedup']:.2f}x | {rows[-1]['speedup']:.2f}x | {rows[-1]['gb_per_s']:.1f} |", flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="SmolLM2-135M", help="model config whose block shapes to time")
    parser.add_argument("--precision", default="fp32,bf16", help="comma-separated: fp32, bf16")
    parser.add_argument("--threads", type=int, default=None, help="default: torch's (the number of cores)")
    parser.add_argument("--calls", type=int, default=200, help="timed calls per case (the median is reported)")
    parser.add_argument("--out", type=Path, default=ROOT / "results/bench_cpu_kernels.json")
    run_cli(run, parser.parse_args(argv), "benchmarking the CPU kernels")


def run(args):
    dtypes = [DTYPES.get(name) for name in args.precision.split(",")]
    if any(d not in cpu.DTYPE_CODES for d in dtypes):
        raise ValueError(f"--precision takes fp32 and/or bf16 (the kernel's dtypes); got {args.precision}")
    if not cpu.available():
        raise ValueError("the CPU kernel is not available (no C compiler, or TEAL_CPU_REFERENCE is set)")
    if args.threads:
        torch.set_num_threads(args.threads)
    bandwidth = read_bandwidth()
    print(f"{args.config}, {torch.get_num_threads()} threads ({os.cpu_count()} CPUs); read bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s\n")
    print("| shape | dtype | p | torch dense us | ideal us | ours us | ideal speedup | ours speedup | GB/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = [row for dtype in dtypes for shape in block_shapes(args.config)
            for row in bench_shape(*shape, dtype, args.calls)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(config=args.config, threads=torch.get_num_threads(), cpus=os.cpu_count(), torch=torch.__version__,
                read_bandwidth=bandwidth, eps=EPS, calls=args.calls, load_average=os.getloadavg())
    args.out.write_text(json.dumps(dict(meta=meta, results=rows), indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
