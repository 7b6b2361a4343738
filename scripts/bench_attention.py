"""Check and time the decode attention kernel (teal::decode_attention) on a GPU.

    python scripts/bench_attention.py          # checks, then the table; JSON to results/bench_attention.json

Checks: the op against decode_attention_ref (7 shapes, bf16/fp16/fp32, partial masks, two calls
equal), the decode step op (RoPE + cache write + attention) against decode_attention_step_ref
(output and caches; 8 shapes and positions), both inside torch.compile(fullgraph, reduce-overhead)
with new inputs per call (the step at positions that change its number of splits within one graph).
Timing: Llama-3-8B heads (8 kv x 4 q heads, hd 128), bf16, one CUDA graph over 32 layers' caches (as
in a decode step), median per call, for cache lengths S with the first `valid` fraction attended:
the compiled reference (bmm + softmax + bmm, what inductor makes of it) against the kernel at
each (BLOCK_S, num_warps, programs per SM) tried; the op uses the defaults of attention.launch.
Then the decode step op against its compiled reference at three positions per S, and the step's
cost in a chain of q/k/v -> step -> o launches, as the model runs it (step_in_context).
"""
import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sparse_kernels import (decode_attention, decode_attention_ref, decode_attention_step,  # noqa: E402
                            decode_attention_step_ref, ops)
from bench_kernels import graph_time_us  # noqa: E402  (scripts/ is on the path when this script runs)
from fileio import atomic_write  # noqa: E402
from loader import run_cli  # noqa: E402

TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 1e-4}
CHECKS = [  # B, KV, G, S, hd, dtype, attended fraction
    (1, 8, 4, 205, 128, torch.bfloat16, 0.5), (1, 8, 4, 2048, 128, torch.bfloat16, 0.99),
    (1, 8, 4, 8192, 128, torch.bfloat16, 0.3), (2, 3, 3, 300, 64, torch.float16, 0.7),
    (1, 8, 8, 1000, 128, torch.float32, 0.6), (8, 8, 4, 205, 128, torch.bfloat16, 1.0),
    (1, 2, 2, 130, 80, torch.bfloat16, 0.5),
]
# the decode step: B, KV, G, S, hd, dtype, position (one program per head up to S = 256, then splits of the
# positions up to the step's: one, several, all)
STEP_CHECKS = [(1, 8, 4, 205, 128, torch.bfloat16, 140), (2, 3, 3, 100, 64, torch.float16, 0),
               (1, 8, 4, 8192, 128, torch.bfloat16, 8191), (2, 2, 1, 130, 80, torch.float32, 64),
               (1, 8, 4, 256, 128, torch.bfloat16, 255), (1, 8, 4, 257, 128, torch.bfloat16, 256),
               (1, 8, 4, 2048, 128, torch.bfloat16, 20), (1, 8, 4, 2048, 128, torch.bfloat16, 300)]
# (BLOCK_S, num_warps, programs per SM that plan() aims at; the op's plan aims at 4)
CONFIGS = [(32, 2, 4), (64, 2, 4), (64, 2, 2), (64, 4, 4), (128, 4, 4), (128, 8, 4), (128, 8, 2), (128, 4, 1)]


def check_op() -> list:
    g = torch.Generator(device="cuda").manual_seed(0)
    failures = []
    for B, KV, G, S, hd, dtype, frac in CHECKS:
        q = (torch.randn(B, KV, G, hd, device="cuda", generator=g) * 2).to(dtype)
        k, v = (torch.randn(B, KV, S, hd, device="cuda", generator=g).to(dtype) for _ in range(2))
        mask = torch.arange(S, device="cuda") <= int(S * frac)
        ref = decode_attention_ref(q, k, v, mask).float()
        y1, y2 = decode_attention(q, k, v, mask), decode_attention(q, k, v, mask)
        err = (y1.float() - ref).abs().max().item()
        if not (err <= TOL[dtype] and torch.equal(y1, y2)):
            failures.append(dict(shape=[B, KV, G, S, hd, str(dtype), frac], max_err=err, same=torch.equal(y1, y2)))
    return failures


def step_inputs(B, KV, G, S, hd, dtype, pos, g):
    """As the model passes them: qkv (B, 1, N), n_head, caches, the RoPE table (S, hd/2, 2), position."""
    qkv = torch.randn(B, 1, (KV * G + 2 * KV) * hd, device="cuda", generator=g).to(dtype)
    caches = [torch.randn(B, KV, S, hd, device="cuda", generator=g).to(dtype) for _ in range(2)]
    angles = torch.rand(S, hd // 2, device="cuda", generator=g) * 6.0
    table = torch.stack([angles.cos(), angles.sin()], dim=-1)
    return qkv, KV * G, caches, table, torch.tensor([pos], device="cuda")


def check_step() -> list:
    """The decode step op: output and the written cache entries against the reference."""
    g = torch.Generator(device="cuda").manual_seed(3)
    failures = []
    for B, KV, G, S, hd, dtype, pos in STEP_CHECKS:
        qkv, n_head, (kc, vc), table, input_pos = step_inputs(B, KV, G, S, hd, dtype, pos, g)
        if not ops.use_attention_kernel(qkv, hd):  # else the op would only be checking its own fallback
            failures.append(dict(shape=[B, KV, G, S, hd, str(dtype), pos], error="the Triton kernel is not used"))
        kr, vr = kc.clone(), vc.clone()
        ref = decode_attention_step_ref(qkv, n_head, kr, vr, table, input_pos).float()
        y = decode_attention_step(qkv, n_head, kc, vc, table, input_pos)
        err = (y.float() - ref).abs().max().item()
        cache_err = max((kc.float() - kr.float()).abs().max().item(), (vc.float() - vr.float()).abs().max().item())
        if not (err <= TOL[dtype] and cache_err <= 4 * TOL[dtype]):
            failures.append(dict(shape=[B, KV, G, S, hd, str(dtype), pos], max_err=err, cache_err=cache_err))
    return failures


def check_compiled() -> list:
    """Two layers' attention in one compiled CUDA graph, a new mask each call, no recompiles."""
    torch._dynamo.config.error_on_recompile = True

    def two_layers(q, k1, v1, k2, v2, mask):
        return decode_attention(q, k1, v1, mask) + decode_attention(q, k2, v2, mask)

    f = torch.compile(two_layers, fullgraph=True, mode="reduce-overhead")
    S = 205
    g = torch.Generator(device="cuda").manual_seed(1)
    caches = [torch.randn(1, 8, S, 128, device="cuda", generator=g).bfloat16() for _ in range(4)]
    errs = []
    for step in range(4):
        q = (torch.randn(1, 8, 4, 128, device="cuda", generator=g) * 2).bfloat16()
        mask = torch.arange(S, device="cuda") <= 10 + 40 * step
        y = f(q, *caches, mask).clone()
        r = decode_attention_ref(q, caches[0], caches[1], mask) + decode_attention_ref(q, caches[2], caches[3], mask)
        errs.append((y.float() - r.float()).abs().max().item())
    # the decode step with caches as module buffers, as in the model: written in place, no copies
    class Step(torch.nn.Module):
        def __init__(self, kc, vc):
            super().__init__()
            self.register_buffer("kc", kc)
            self.register_buffer("vc", vc)

        def forward(self, qkv, table, pos):
            return decode_attention_step(qkv, 32, self.kc, self.vc, table, pos)

    # one program per head (S = 205); splits whose number follows the position, in one graph (S = 1024)
    for S_step, positions in ((S, (3, 4, 5, 6)), (1024, (3, 40, 500, 1023))):
        torch._dynamo.reset()  # a new cache length is a new graph, not a recompile of the one before
        qkv, _, (kc, vc), table, _ = step_inputs(1, 8, 4, S_step, 128, torch.bfloat16, 0, g)
        step = Step(kc, vc)
        f_step = torch.compile(step, fullgraph=True, mode="reduce-overhead")
        kr, vr = kc.clone(), vc.clone()
        for pos in positions:
            qkv2 = torch.randn_like(qkv)
            input_pos = torch.tensor([pos], device="cuda")
            y = f_step(qkv2, table, input_pos).clone()
            r = decode_attention_step_ref(qkv2, 32, kr, vr, table, input_pos)
            errs.append(max((y.float() - r.float()).abs().max().item(),
                            (step.kc.float() - kr.float()).abs().max().item()))
    torch._dynamo.config.error_on_recompile = False
    return errs


def graph_us(fn, calls: int) -> float:
    """One CUDA graph of `calls` calls, fn(i) for the i-th cache set: median replay time per call."""
    step = itertools.count()
    return graph_time_us(lambda: fn(next(step) % calls), calls=calls, replays=9)


def step_positions(S: int) -> list:
    """The decode step's positions timed per cache length: early, the middle, the last."""
    return sorted({min(S - 1, 20), S // 2, S - 1})


def step_in_context(lengths, layers: int = 24, device: str = "cuda", timed: bool = True) -> list:
    """The decode step's cost where the model runs it: one CUDA graph of `layers` x [q/k/v + RMSNorm -> step ->
    o + residual] (Llama-3-8B shapes, B = 1, bf16, our matvec ops) against the same chain without the step (o
    reads q's rows from q/k/v's output), per layer, at three positions per cache length, dense and with every
    matvec input at about 50% (thresholds: the median |x| of the first layer's inputs, o's taken after a dense
    q/k/v; in the sparse chain o then keeps 47-49% of its inputs). With PDL the step requests its cache tiles
    while q/k/v drains and o launches during its merge, which timing it alone misses.
    timed=False (CPU smoke): each chain runs once and the rows hold its output's mean magnitude."""
    from sparse_kernels import sparse_linear
    from sparse_kernels.reference import rms_norm

    D, N_QKV, KV, HD, bf = 4096, 6144, 8, 128, torch.bfloat16
    g = torch.Generator(device=device).manual_seed(4)
    w_qkv = [(torch.randn(D, N_QKV, device=device, generator=g) / 64).to(bf) for _ in range(layers)]
    w_o = [(torch.randn(D, D, device=device, generator=g) / 64).to(bf) for _ in range(layers)]
    norm_w = (0.5 + torch.rand(D, device=device, generator=g)).to(bf)
    x0 = (torch.randn(1, D, device=device, generator=g) * 3).to(bf)
    rows = []
    for S in lengths:
        caches = [[torch.randn(1, KV, S, HD, device=device, generator=g).to(bf) for _ in range(2)]
                  for _ in range(layers)]
        angles = torch.rand(S, HD // 2, device=device, generator=g) * 6.0
        table = torch.stack([angles.cos(), angles.sin()], dim=-1)
        for pos in step_positions(S):
            pos_t = torch.tensor([pos], device=device)

            def o_input(qkv, i, attend):
                return (decode_attention_step(qkv, 32, *caches[i], table, pos_t).view(1, D) if attend
                        else qkv[:, :D])

            def chain(thr_qkv, thr_o, attend):
                x = x0
                for i in range(layers):
                    qkv = sparse_linear(x, w_qkv[i], thr_qkv, [4096, 1024, 1024], norm_weight=norm_w, eps=1e-5)
                    x = sparse_linear(o_input(qkv, i, attend), w_o[i], thr_o, [D], residual=x)
                return x

            row = dict(S=S, pos=pos)
            for p in (None, 0.5):
                per_layer = {}
                for attend in (True, False):
                    thr_qkv = thr_o = None
                    if p is not None:
                        thr_qkv = rms_norm(x0, norm_w, 1e-5).float().abs().quantile(p).expand(3).contiguous()
                        qkv0 = sparse_linear(x0, w_qkv[0], None, [N_QKV], norm_weight=norm_w, eps=1e-5)
                        thr_o = o_input(qkv0, 0, attend).float().abs().quantile(p).reshape(1)
                    run = lambda: chain(thr_qkv, thr_o, attend)  # noqa: E731
                    per_layer[attend] = (min(graph_time_us(run, calls=1, replays=9) for _ in range(2)) / layers
                                         if timed else run().float().abs().mean().item())
                row["dense" if p is None else f"p{p}"] = dict(with_step=per_layer[True], without=per_layer[False],
                                                              step=per_layer[True] - per_layer[False])
            rows.append(row)
    return rows


def time_kernel(q, caches, mask, block_s, num_warps, per_sm):
    from sparse_kernels import attention

    import triton

    H, G, hd = q.shape[1], q.shape[2], q.shape[3]
    S = caches[0][0].shape[2]
    n_sm = max(1, ops.sm_count(q.device) * per_sm // 4)  # plan() aims at 4 programs per n_sm
    part, counts, _, _ = ops.workspace(q.device, *attention.workspace_sizes(H, G, hd, S, block_s, n_sm), 0, 0)
    out = torch.empty(H, G, hd, device="cuda", dtype=q.dtype)
    try:
        return graph_us(lambda i: attention.launch(q, *caches[i], mask, out, part, counts, block_s, num_warps, n_sm),
                        len(caches))
    except triton.runtime.errors.OutOfResources:
        return float("nan")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "results" / "bench_attention.json"), help="JSON results path")
    ap.add_argument("--lengths", default="205,1024,2048,8192", help="cache lengths S (comma separated)")
    run_cli(run, ap.parse_args(argv), "benchmarking decode attention")


def run(args):
    if not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device; the attention benchmark needs a GPU (CPU tests: tests/test_attention.py)")
    import triton

    t0 = time.time()
    result = dict(device=torch.cuda.get_device_name(0), torch=torch.__version__, triton=triton.__version__,
                  command=" ".join(sys.argv))
    if not ops.use_attention_kernel(torch.empty(1, device="cuda"), 128):
        raise SystemExit("error: the attention ops would not run the Triton kernel here (TEAL_NO_TRITON set?)")
    failures, errs = check_op() + check_step(), check_compiled()
    result["checks"] = dict(failures=failures, compiled_max_err=errs,  # a sum of two outputs: twice the tolerance
                            ok=not failures and max(errs) <= 2 * TOL[torch.bfloat16])
    n_shapes, n_bad = len(CHECKS) + len(STEP_CHECKS), len({str(f["shape"]) for f in failures})
    print(f"checks: {n_shapes - n_bad}/{n_shapes} shapes pass {failures or ''}; compiled "
          f"reduce-overhead max errors {['%.3g' % e for e in errs]} ({time.time() - t0:.0f} s)", flush=True)

    ref_compiled = torch.compile(decode_attention_ref, fullgraph=True)
    g = torch.Generator(device="cuda").manual_seed(2)
    rows = []
    for S in [int(s) for s in args.lengths.split(",")]:
        q = (torch.randn(1, 8, 4, 128, device="cuda", generator=g) * 2).bfloat16()
        caches = [tuple(torch.randn(1, 8, S, 128, device="cuda", generator=g).bfloat16() for _ in range(2))
                  for _ in range(32)]
        for frac in (0.5, 1.0):
            mask = torch.arange(S, device="cuda") < max(1, int(S * frac))
            row = dict(S=S, valid=frac, compiled_ref_us=graph_us(lambda i: ref_compiled(q, *caches[i], mask), 32),
                       op_us=graph_us(lambda i: decode_attention(q, *caches[i], mask), 32),
                       kernel_us={f"{bs}/{nw}/{ps}": time_kernel(q, caches, mask, bs, nw, ps) for bs, nw, ps in CONFIGS})
            rows.append(row)
            print(f"S={S} valid={frac}: ref {row['compiled_ref_us']:.1f} op {row['op_us']:.1f} " +
                  " ".join(f"{k}:{v:.1f}" for k, v in row["kernel_us"].items()), flush=True)
    result["rows"] = rows
    step_rows = []  # the decode step: rope + cache write + attention, compiled reference vs the op
    ref_step = torch.compile(decode_attention_step_ref, fullgraph=True)
    for S in [int(s) for s in args.lengths.split(",")]:
        qkv, n_head, _, table, _ = step_inputs(1, 8, 4, S, 128, torch.bfloat16, 0, g)
        caches = [tuple(torch.randn(1, 8, S, 128, device="cuda", generator=g).bfloat16() for _ in range(2))
                  for _ in range(32)]
        for pos in step_positions(S):
            pos_t = torch.tensor([pos], device="cuda")
            row = dict(S=S, pos=pos,
                       compiled_ref_us=graph_us(lambda i: ref_step(qkv, n_head, *caches[i], table, pos_t), 32),
                       op_us=graph_us(lambda i: decode_attention_step(qkv, n_head, *caches[i], table, pos_t), 32))
            step_rows.append(row)
    result["step_rows"] = step_rows
    context_rows = step_in_context([int(s) for s in args.lengths.split(",")])
    result["step_in_context"] = context_rows
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(args.out) as tmp:
        tmp.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\n{result['device']}, torch {result['torch']}, triton {result['triton']}; bf16, Llama-3-8B heads, "
          f"32 caches per CUDA graph, median us per call; checks {'pass' if result['checks']['ok'] else 'FAILED'}; "
          f"JSON: {args.out}")
    names = [f"{bs}/{nw}/{ps}" for bs, nw, ps in CONFIGS]
    print(f"{'S':>5} {'valid':>5} {'compiled':>8} {'op':>6} " + " ".join(f"{n:>8}" for n in names) +
          "  (BLOCK_S/warps/programs per SM)")
    for r in rows:
        print(f"{r['S']:5d} {r['valid']:5.2f} {r['compiled_ref_us']:8.1f} {r['op_us']:6.1f} " +
              " ".join(f"{r['kernel_us'][n]:8.1f}" for n in names))
    print("decode step (RoPE + cache write + attention) at position pos:")
    print(f"{'S':>5} {'pos':>5} {'compiled':>8} {'op':>6}")
    for r in step_rows:
        print(f"{r['S']:5d} {r['pos']:5d} {r['compiled_ref_us']:8.1f} {r['op_us']:6.1f}")
    print("the step in context: us per layer of q/k/v + step + o minus q/k/v + o (24 layers in one CUDA graph):")
    print(f"{'S':>5} {'pos':>5} {'dense':>6} {'p=0.5':>6}")
    for r in context_rows:
        print(f"{r['S']:5d} {r['pos']:5d} {r['dense']['step']:6.2f} {r['p0.5']['step']:6.2f}")


if __name__ == "__main__":
    main()
