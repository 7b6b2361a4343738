"""End-to-end decoding speed against TEAL sparsity, dense and every level in one process.

    python scripts/bench_sweep.py --config Llama-3-8B                  # random weights, real shapes (GPU)
    python scripts/bench_sweep.py --checkpoint_path checkpoints/...     # a real model and its sparsity file
    torchrun --nproc_per_node 2 scripts/bench_sweep.py --config Llama-3-8B
    python scripts/bench_sweep.py --device cpu --precision fp32 --max_new_tokens 100 \
        --checkpoint_path checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct --out results/sweep_smollm2_cpu_fp32.json

Protocol (the design page's, section 6): bf16, decode step compiled with mode="reduce-overhead" and
fullgraph, a 5-token prompt, 200 new tokens, median of 3 runs per level. Thresholds of a random
model come from calibrate.py's own code on random tokens. A level change is a copy into the
threshold buffers; the script counts recompilations to prove none happen. Writes JSON and a PNG.
tokens/s counts every generation's whole time, the prompt's forward included; the table also
gives that forward alone (prefill ms). --compile_prefill compiles it too (dynamic shapes).
On the CPU: the decode step compiled with inductor's C++ backend (mode None; fullgraph in one
process), torch's threads (--threads, default one per core), and the limit column from the read
bandwidth of a sum over 512 MB (decoding reads its weights and writes almost nothing).
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

from bench_cpu_kernels import read_bandwidth  # noqa: E402  (this script's folder)
from bench_kernels import copy_bandwidth  # noqa: E402
from calibrate import calibrate_random  # noqa: E402
from generate import decode_one_token, generate, prefill, run_prefill  # noqa: E402
from loader import DTYPES, configure_inductor, load_model, random_model, run_cli, synchronize  # noqa: E402
from teal import SparsityFile, measure_sparsity, weight_bytes_per_token  # noqa: E402
from tp import broadcast_thresholds, init_distributed  # noqa: E402


def time_generation(model, prompt, n_new, decode_fn, prefill_fn, runs, device) -> tuple:
    """Median tokens/s over `runs` generations (after one warm-up) and the last sequence."""
    rates = []
    for i in range(runs + 1):
        synchronize(device)
        t0 = time.perf_counter()
        seq = generate(model, prompt, n_new, decode_fn=decode_fn, prefill_fn=prefill_fn)
        synchronize(device)
        if i > 0:
            rates.append((seq.shape[1] - prompt.numel()) / (time.perf_counter() - t0))
    return statistics.median(rates), seq


def time_prefill(model, prompt, prefill_fn, device, runs: int = 3) -> float:
    """Median seconds of the prompt's forward and first sample alone (part of every generation's time),
    run as generate() runs it, so a prefill compiled here is the one generations run."""
    times = []
    for _ in range(runs):
        synchronize(device)
        t0 = time.perf_counter()
        run_prefill(model, prompt, prefill_fn=prefill_fn)
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def dynamo_compiles() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def cudagraph_skips() -> int:
    """Compiled graphs that inductor ran without CUDA graphs (it logs each reason as a warning)."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["cudagraph_skips"]


def prefill_layout_check(model, device, dtype, lengths=(512, 2048)) -> list:
    """Prompt matmuls in our (K, N) layout against gpt-fast's F.linear on (N, K), per block shape."""
    from triton.testing import do_bench

    block = model.layers[0]
    weights = {"qkv": block.attention.wqkv_t, "o": block.attention.wo_t, "gate_up": block.feed_forward.w13_t,
               "down": block.feed_forward.w2_t}
    rows = []
    for T in lengths:
        ours = theirs = 0.0
        for w_t in weights.values():
            x = torch.randn(T, w_t.shape[0], device=device, dtype=dtype)
            w = w_t.t().contiguous()
            ours += do_bench(lambda: x @ w_t, return_mode="median")
            theirs += do_bench(lambda: torch.nn.functional.linear(x, w), return_mode="median")
        rows.append(dict(tokens=T, ours_ms=ours, gpt_fast_layout_ms=theirs, ratio=ours / theirs))
    return rows


def cpu_name() -> str:
    """The CPU's model name (Linux), with the number of threads torch uses."""
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
    except OSError:
        names = []
    return f"{names[0] if names else 'cpu'}, {torch.get_num_threads()} threads"


def plot(results: list, limit_bw: float, bytes_fn, path: Path, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = [r["level"] for r in results]
    tok = [r["tokens_per_s"] for r in results]
    dense = results[0]["tokens_per_s"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(levels, tok, "o-", label="teal-fast")
    if limit_bw == limit_bw:  # not NaN: draw the bandwidth limit
        grid = [i / 100 for i in range(0, 91)]
        ax1.plot(grid, [limit_bw / bytes_fn(p) for p in grid], "--", color="gray", label="bandwidth limit")
    ax1.set_xlabel("sparsity")
    ax1.set_ylabel("tokens/s")
    ax1.legend()
    ax1.grid(alpha=0.3)
    ax2.plot(levels, [t / dense for t in tok], "o-", label="speedup over dense")
    ax2.plot(levels, [bytes_fn(0) / bytes_fn(p) for p in levels], "--", color="gray", label="ideal (bytes)")
    ax2.set_xlabel("sparsity")
    ax2.set_ylabel("speedup")
    ax2.legend()
    ax2.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="random weights with this config's shapes, e.g. Llama-3-8B")
    parser.add_argument("--checkpoint_path", type=Path, default=None)
    parser.add_argument("--sparsity_file", type=Path, default=None)
    parser.add_argument("--mode", choices=("greedy", "uniform"), default=None,
                        help="default: greedy for a checkpoint, uniform for random weights")
    parser.add_argument("--levels", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9")
    parser.add_argument("--max_new_tokens", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--no_compile", action="store_true")
    parser.add_argument("--compile_prefill", action="store_true",
                        help="also compile the prompt forward (dynamic shapes), as generate.py --compile_prefill")
    parser.add_argument("--prefill_check", action="store_true", help="time prompt matmuls vs gpt-fast's layout")
    parser.add_argument("--threads", type=int, default=None, help="CPU: torch's threads (default: one per core)")
    parser.add_argument("--out", type=Path, default=ROOT / "results/bench_sweep.json")
    run_cli(run, parser.parse_args(argv))


def run(args):
    if (args.config is None) == (args.checkpoint_path is None):
        raise ValueError("give exactly one of --config NAME (random weights) or --checkpoint_path DIR")
    rank, world, device = init_distributed(args.device)  # world 0: not under torchrun
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.precision]
    levels = [float(x) for x in args.levels.split(",") if x]
    t0 = time.perf_counter()
    if args.config:
        model = random_model(args.config, device, dtype, tp=(rank, world) if world else None)
        # Random weights have no structure for the greedy search to find: uniform levels by default.
        mode = args.mode or "uniform"
        sparsity = calibrate_random(model, greedy_seqs=4 if mode == "greedy" else 0)
        name = args.config
        prompt = torch.randint(0, model.args.vocab_size, (5,), generator=torch.Generator().manual_seed(0))
    else:
        from tokenizer import load_tokenizer

        model = load_model(args.checkpoint_path, device, dtype, tp=(rank, world) if world else None)
        sparsity = SparsityFile.load(args.sparsity_file or args.checkpoint_path / "sparsity.json", model,
                                     args.checkpoint_path)
        name, mode = args.checkpoint_path.name, args.mode or "greedy"
        prompt = torch.tensor(load_tokenizer(args.checkpoint_path).encode("The capital of France is", bos=True))
    prompt = prompt.to(device=device, dtype=torch.int)
    tp_label = f"TP={world}" if world else "single process"
    print(f"{name}: model ready in {time.perf_counter() - t0:.1f} s ({tp_label}, {device}, {dtype})", flush=True)

    on_cuda = str(device).startswith("cuda")
    configure_inductor()
    decode_fn = decode_one_token if args.no_compile else torch.compile(
        decode_one_token, mode="reduce-overhead" if on_cuda else None, fullgraph=on_cuda or not world)
    compile_prefill = args.compile_prefill and not args.no_compile
    prefill_fn = torch.compile(prefill, fullgraph=on_cuda, dynamic=True) if compile_prefill else prefill
    compile_s = {}
    if compile_prefill:  # compiled on its own, so that the decode step's compile time stays its own figure
        model.setup_caches(max_batch_size=1, max_seq_length=prompt.numel() + args.max_new_tokens)
        compile_s["prefill"] = time_prefill(model, prompt, prefill_fn, device, runs=1)

    results = []
    for level in [None] + levels:
        sparse = level is not None
        model.sparse_decode = sparse
        if sparse:
            model.set_thresholds(sparsity.thresholds(level, mode).to(device))
            broadcast_thresholds(model)
        first = "dense" if not sparse else "sparse"
        if first not in compile_s:  # the first generation of each path compiles it
            synchronize(device)
            t_c = time.perf_counter()
            generate(model, prompt, args.max_new_tokens, decode_fn=decode_fn, prefill_fn=prefill_fn)
            synchronize(device)
            compile_s[first] = time.perf_counter() - t_c
            compiles_after_warmup = dynamo_compiles()
        tok_s, seq = time_generation(model, prompt, args.max_new_tokens, decode_fn, prefill_fn, args.runs, device)
        prefill_ms = time_prefill(model, prompt, prefill_fn, device) * 1e3
        realized = measure_sparsity(model, seq, prompt.numel()) if sparse else None
        per_proj = realized.per_projection if sparse else None
        bytes_per_token = weight_bytes_per_token(model, per_proj)
        results.append(dict(level=0.0 if not sparse else level, label="dense" if not sparse else f"{level:.2f}",
                            tokens_per_s=tok_s, realized=realized.model_wide if sparse else 0.0,
                            gb_per_s_per_rank=bytes_per_token * tok_s / 1e9, tokens=seq.shape[1] - prompt.numel(),
                            prefill_ms=prefill_ms))
        print(f"  {results[-1]['label']:>6}: {tok_s:8.1f} tok/s (prefill {prefill_ms:.1f} ms)", flush=True)
    recompiles = dynamo_compiles() - compiles_after_warmup
    skips = cudagraph_skips()
    dense_tok = results[0]["tokens_per_s"]

    copy_bw = copy_bandwidth(device) if on_cuda else read_bandwidth() if str(device) == "cpu" else float("nan")
    dense_bytes = weight_bytes_per_token(model)
    head = model.tok_embeddings.weight if model.output is None else model.output.weight
    fixed = head.numel() * head.element_size()

    def bytes_at(p):  # per-token bytes if every block linear skips a fraction p
        return fixed + (dense_bytes - fixed) * (1 - p)

    prefill_rows = prefill_layout_check(model, device, dtype) if (args.prefill_check and on_cuda) else []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(model=name, mode=mode, world_size=world, device=torch.cuda.get_device_name(device) if on_cuda
                else cpu_name(), threads=torch.get_num_threads(), load_average=os.getloadavg(), dtype=str(dtype), torch=torch.__version__, prompt_tokens=prompt.numel(),
                new_tokens=args.max_new_tokens, runs=args.runs, compile_prefill=compile_prefill, compile_s=compile_s,
                recompiles_after_warmup=recompiles,
                cudagraph_skips=skips,
                copy_bandwidth=copy_bw, weight_bytes_per_token_per_rank=dense_bytes)
    if rank == 0:
        args.out.write_text(json.dumps(dict(meta=meta, results=results, prefill=prefill_rows), indent=2) + "\n")
        plot(results, copy_bw, bytes_at, args.out.with_suffix(".png"),
             f"{name}, {dtype}, {meta['device']}, {tp_label}")
    print(f"\ncompile: {', '.join(f'{k} {v:.1f} s' for k, v in compile_s.items())}; "
          f"recompilations after warm-up across level changes: {recompiles}; "
          f"{'copy' if on_cuda else 'read'} bandwidth {copy_bw / 1e12:.3f} TB/s")
    if on_cuda and not args.no_compile and skips:
        print(f"CUDA graphs were skipped for {skips} compiled graph(s) (inductor's log above says why): "
              f"their tokens/s include a host-side launch per kernel")
    for row in prefill_rows:
        print(f"prefill {row['tokens']} tokens, block matmuls: ours {row['ours_ms']:.3f} ms, "
              f"gpt-fast layout {row['gpt_fast_layout_ms']:.3f} ms ({row['ratio']:.3f}x)")
    prefill_label = "compiled" if compile_prefill else "eager"
    print(f"\n| {name} {tp_label} | tok/s | speedup | realized | GB/s per rank | limit tok/s | prefill ms ({prefill_label}) |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        limit = copy_bw / bytes_at(r["realized"])
        print(f"| {r['label']} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / dense_tok:.2f}x | {r['realized']:.3f} | "
              f"{r['gb_per_s_per_rank']:.0f} | {limit:.0f} | {r['prefill_ms']:.1f} |")
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
