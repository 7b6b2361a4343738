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
from fileio import atomic_write  # noqa: E402
from generate import decode_one_token, generate, prefill, run_prefill  # noqa: E402
from loader import DTYPES, configure_inductor, load_model, random_model, run_cli, synchronize  # noqa: E402
from model import QUANTIZATION_MODES  # noqa: E402
from quantize import quantize_model  # noqa: E402
from teal import SparsityFile, measure_sparsity, weight_bytes_per_token  # noqa: E402
from tp import broadcast_thresholds, init_distributed  # noqa: E402


def time_generation(model, prompt, n_new, decode_fn, prefill_fn, runs, device, warmup=True) -> tuple:
    """Median tokens/s over `runs` generations (after one warm-up unless warmup is False) and the last sequence."""
    rates = []
    for i in range(runs + 1):
        if i == 0 and not warmup:
            continue
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


def plot(results: list, limit_bw: float, bytes_fns: dict, path: Path, title: str):
    """tok/s against sparsity (one line per weight format, its bandwidth limit dashed) and the speedup
    over the first format's dense."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    base = results[0]["tokens_per_s"]
    for i, (weights, bytes_fn) in enumerate(bytes_fns.items()):
        rows = [r for r in results if r["weights"] == weights and not r.get("anchor")]
        levels, tok = [r["level"] for r in rows], [r["tokens_per_s"] for r in rows]
        color = f"C{i}"
        ax1.plot(levels, tok, "o-", color=color, label=f"teal-fast {weights}")
        ax2.plot(levels, [t / base for t in tok], "o-", color=color, label=f"{weights}")
        if limit_bw == limit_bw:  # not NaN: draw the bandwidth limit
            grid = [p / 100 for p in range(0, 91)]
            ax1.plot(grid, [limit_bw / bytes_fn(p) for p in grid], "--", color=color, alpha=0.5,
                     label=f"bandwidth limit {weights}")
        for r in results:
            if r["weights"] == weights and r.get("anchor"):
                ax1.plot([0.0], [r["tokens_per_s"]], "x", color=color, markersize=9, label=r["label"])
    ax1.set_xlabel("sparsity")
    ax1.set_ylabel("tokens/s")
    ax1.legend(fontsize=7)
    ax1.grid(alpha=0.3)
    ax2.set_xlabel("sparsity")
    ax2.set_ylabel(f"speedup over {results[0]['weights']} dense")
    ax2.legend(fontsize=7)
    ax2.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="random weights with this config's shapes, e.g. Llama-3-8B")
    parser.add_argument("--checkpoint_path", type=Path, default=None)
    parser.add_argument("--sparsity_file", type=Path, default=None)
    parser.add_argument("--mode", choices=("greedy", "uniform"), default=None,
                        help="default: greedy for a checkpoint, uniform for random weights")
    parser.add_argument("--levels", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9")
    parser.add_argument("--weights", default=None,
                        help="with --config: comma-separated weight formats, each in the same process: the "
                             "precision's own (e.g. bf16), int8, int4 (quantized as quantize.py does)")
    parser.add_argument("--groupsize", type=int, default=128, help="int4 rows per scale")
    parser.add_argument("--anchor", action="store_true",
                        help="also time each format's dense decode the way plain gpt-fast runs it: torch's products "
                             "(int8: F.linear(x, w.to(dtype)) * scales) compiled by inductor, not the fused kernels")
    parser.add_argument("--max_new_tokens", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--interleave", action="store_true",
                        help="time the levels round-robin, one generation of each per round (--runs rounds), so that a "
                             "machine whose speed drifts over minutes (a shared host) favours no level")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--no_compile", action="store_true")
    parser.add_argument("--compile_prefill", action="store_true",
                        help="also compile the prompt forward (dynamic shapes), as generate.py --compile_prefill")
    parser.add_argument("--prefill_check", action="store_true", help="time prompt matmuls vs gpt-fast's layout")
    parser.add_argument("--threads", type=int, default=None, help="CPU: torch's threads (default: one per core)")
    parser.add_argument("--out", type=Path, default=ROOT / "results/bench_sweep.json")
    run_cli(run, parser.parse_args(argv), "benchmarking the sparsity sweep")


def build(args, weights: str, device, dtype, tp):
    """(model, sparsity file, name, prompt) for one weight format."""
    if args.config:
        model = random_model(args.config, device, dtype, tp=tp)
        if weights in QUANTIZATION_MODES:
            quantize_model(model, weights, args.groupsize)
        # Random weights have no structure for the greedy search to find: uniform levels by default.
        sparsity = calibrate_random(model, greedy_seqs=4 if (args.mode or "uniform") == "greedy" else 0)
        prompt = torch.randint(0, model.args.vocab_size, (5,), generator=torch.Generator().manual_seed(0))
        return model, sparsity, args.config, prompt
    from tokenizer import load_tokenizer

    model = load_model(args.checkpoint_path, device, dtype, tp=tp)
    sparsity = SparsityFile.load(args.sparsity_file or args.checkpoint_path / "sparsity.json", model,
                                 args.checkpoint_path)
    prompt = torch.tensor(load_tokenizer(args.checkpoint_path).encode("The capital of France is", bos=True))
    return model, sparsity, args.checkpoint_path.name, prompt


def run(args):
    if (args.config is None) == (args.checkpoint_path is None):
        raise ValueError("give exactly one of --config NAME (random weights) or --checkpoint_path DIR")
    formats = [w for w in (args.weights or args.precision).split(",") if w]
    if args.checkpoint_path is not None and args.weights:
        raise ValueError("--weights is for --config (random weights); a checkpoint's weights are what quantize.py made")
    unknown = [w for w in formats if w not in QUANTIZATION_MODES and w not in DTYPES]
    if unknown:
        raise ValueError(f"--weights {','.join(unknown)}: choose from {', '.join([*DTYPES, *QUANTIZATION_MODES])}")
    rank, world, device = init_distributed(args.device)  # world 0: not under torchrun
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.precision]
    levels = [float(x) for x in args.levels.split(",") if x]
    on_cuda = str(device).startswith("cuda")
    configure_inductor()
    tp = (rank, world) if world else None
    mode = args.mode or ("greedy" if args.checkpoint_path else "uniform")
    results, compile_s, bytes_fns, meta_runs = [], {}, {}, {}
    copy_bw = copy_bandwidth(device) if on_cuda else read_bandwidth() if str(device) == "cpu" else float("nan")
    tp_label = f"TP={world}" if world else "single process"
    for weights in formats:
        t0 = time.perf_counter()
        model, sparsity, name, prompt = build(args, weights, device, dtype if weights not in DTYPES else
                                              DTYPES[weights], tp)
        prompt = prompt.to(device=device, dtype=torch.int)
        print(f"{name} {weights}: model ready in {time.perf_counter() - t0:.1f} s ({tp_label}, {device})", flush=True)
        rows, seconds, recompiles, skips = sweep(model, sparsity, mode, levels, prompt, args, device, on_cuda, weights)
        compile_s[weights] = seconds
        meta_runs[weights] = dict(recompiles_after_warmup=recompiles, cudagraph_skips=skips,
                                  weight_bytes_per_token_per_rank=weight_bytes_per_token(model))
        results += rows
        bytes_fns[weights] = bytes_per_token_fn(model)
        if args.prefill_check and on_cuda and weights == formats[0]:
            meta_runs["prefill"] = prefill_layout_check(model, device, dtype)
        del model
        if on_cuda:
            torch.cuda.empty_cache()
        meta = dict(model=name, mode=mode, world_size=world,
                    device=torch.cuda.get_device_name(device) if on_cuda else cpu_name(),
                    threads=torch.get_num_threads(), load_average=os.getloadavg(), dtype=str(dtype),
                    torch=torch.__version__, prompt_tokens=prompt.numel(), new_tokens=args.max_new_tokens,
                    runs=args.runs, compile_prefill=args.compile_prefill and not args.no_compile, compile_s=compile_s,
                    groupsize=args.groupsize if "int4" in formats else None, copy_bandwidth=copy_bw,
                    per_format=meta_runs)
        if rank == 0:  # after each format, so that a run cut short keeps the formats it finished
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with atomic_write(args.out) as tmp:
                tmp.write_text(json.dumps(dict(meta=meta, results=results), indent=2) + "\n")
            plot(results, copy_bw, bytes_fns, args.out.with_suffix(".png"), f"{name}, {meta['device']}, {tp_label}")
    for weights, seconds in compile_s.items():
        runs = meta_runs[weights]
        print(f"{weights}: compile {', '.join(f'{k} {v:.1f} s' for k, v in seconds.items())}; recompilations after "
              f"warm-up across level changes: {runs['recompiles_after_warmup']}")
        if on_cuda and not args.no_compile and runs["cudagraph_skips"]:
            print(f"  CUDA graphs were skipped for {runs['cudagraph_skips']} compiled graph(s) (inductor's log above "
                  f"says why): their tokens/s include a host-side launch per kernel")
    print(f"{'copy' if on_cuda else 'read'} bandwidth {copy_bw / 1e12:.3f} TB/s")
    for row in meta_runs.get("prefill", []):
        print(f"prefill {row['tokens']} tokens, block matmuls: ours {row['ours_ms']:.3f} ms, "
              f"gpt-fast layout {row['gpt_fast_layout_ms']:.3f} ms ({row['ratio']:.3f}x)")
    prefill_label = "compiled" if meta["compile_prefill"] else "eager"
    base = results[0]
    print(f"\n| {name} {tp_label} | weights | tok/s | vs {base['weights']} dense | realized | GB/s per rank | limit tok/s "
          f"| prefill ms ({prefill_label}) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        limit = copy_bw / bytes_fns[r["weights"]](r["realized"])
        print(f"| {r['label']} | {r['weights']} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / base['tokens_per_s']:.2f}x "
              f"| {r['realized']:.3f} | {r['gb_per_s_per_rank']:.0f} | {limit:.0f} | {r['prefill_ms']:.1f} |")
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


def bytes_per_token_fn(model):
    """p -> weight bytes a token reads if every block linear skips a fraction p (the LM head and norms never)."""
    dense_bytes = weight_bytes_per_token(model)
    fixed = weight_bytes_per_token(model, torch.ones(model.args.n_layer, 7))  # what no sparsity removes
    return lambda p: fixed + (dense_bytes - fixed) * (1 - p)


def label_of(level, anchor) -> str:
    return "gpt-fast way" if anchor else "dense" if level is None else f"{level:.2f}"


def report(run, tok_s, weights):
    print(f"  {weights:>5} {label_of(*run):>12}: {tok_s:8.1f} tok/s", flush=True)


def sweep(model, sparsity, mode, levels, prompt, args, device, on_cuda, weights) -> tuple:
    """Dense and every level of one model, in this process: (rows, compile seconds, recompilations, CUDA-graph skips).
    With args.anchor, also the dense decode through torch's products (model.use_fused_kernels(False))."""
    # A new model starts from empty compile caches: dynamo's limit of 8 graphs per function then counts one
    # weight format's paths (dense, anchor, sparse, ...), not every format's of the run (three formats with
    # anchors made nine and stopped the third); the recompilation and CUDA-graph counts become per format.
    torch._dynamo.reset()
    decode_fn = decode_one_token if args.no_compile else torch.compile(
        decode_one_token, mode="reduce-overhead" if on_cuda else None, fullgraph=on_cuda or not torch.distributed.is_initialized())
    compile_prefill = args.compile_prefill and not args.no_compile
    prefill_fn = torch.compile(prefill, fullgraph=on_cuda, dynamic=True) if compile_prefill else prefill
    compile_s = {}
    if compile_prefill:  # compiled on its own, so that the decode step's compile time stays its own figure
        model.setup_caches(max_batch_size=1, max_seq_length=prompt.numel() + args.max_new_tokens)
        compile_s["prefill"] = time_prefill(model, prompt, prefill_fn, device, runs=1)
    # the anchor right after dense, so that the recompilations counted after the sparse path's warm-up are the
    # level changes'
    runs = [(None, False)] + ([(None, True)] if args.anchor else []) + [(level, False) for level in levels]

    def select(level, anchor):
        model.sparse_decode = level is not None
        model.use_fused_kernels(not anchor)
        if level is not None:
            model.set_thresholds(sparsity.thresholds(level, mode).to(device))
            broadcast_thresholds(model)

    rates, last_seq = {}, {}  # run index -> tokens/s of each time_generation call; its last sequence

    def time_run(i, n, warmup=True):
        rate, last_seq[i] = time_generation(model, prompt, args.max_new_tokens, decode_fn, prefill_fn, n, device,
                                            warmup=warmup)
        rates.setdefault(i, []).append(rate)

    for i, (level, anchor) in enumerate(runs):
        select(level, anchor)
        first = "anchor" if anchor else "dense" if level is None else "sparse"
        if first not in compile_s:  # the first generation of each path compiles it
            synchronize(device)
            t_c = time.perf_counter()
            generate(model, prompt, args.max_new_tokens, decode_fn=decode_fn, prefill_fn=prefill_fn)
            synchronize(device)
            compile_s[first] = time.perf_counter() - t_c
            compiles_after_warmup = dynamo_compiles()
        if not args.interleave:  # the median of args.runs generations in a row
            time_run(i, args.runs)
            report(runs[i], rates[i][0], weights)
    for _ in range(args.runs if args.interleave else 0):  # round-robin: one generation of each run per round
        for i, run in enumerate(runs):
            select(*run)
            time_run(i, 1, warmup=False)
    rows = []
    for i, (level, anchor) in enumerate(runs):
        select(level, anchor)
        tok_s, seq = statistics.median(rates[i]), last_seq[i]
        prefill_ms = time_prefill(model, prompt, prefill_fn, device) * 1e3
        sparse = level is not None
        realized = measure_sparsity(model, seq, prompt.numel()) if sparse else None
        bytes_per_token = weight_bytes_per_token(model, realized.per_projection if sparse else None)
        rows.append(dict(weights=weights, level=0.0 if not sparse else level, label=label_of(level, anchor),
                         anchor=anchor, tokens_per_s=tok_s, realized=realized.model_wide if sparse else 0.0,
                         gb_per_s_per_rank=bytes_per_token * tok_s / 1e9, tokens=seq.shape[1] - prompt.numel(),
                         prefill_ms=prefill_ms))
        if args.interleave:
            report(runs[i], tok_s, weights)
    model.use_fused_kernels(True)
    recompiles = dynamo_compiles() - compiles_after_warmup
    return rows, compile_s, recompiles, cudagraph_skips()


if __name__ == "__main__":
    main()
