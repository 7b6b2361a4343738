"""Where a compiled decode step's time goes: CUDA kernels per generated token (GPU only).

    python scripts/profile_decode.py                          # Llama-3-8B shapes, dense and level 0.5
    python scripts/profile_decode.py --config Llama-3-70B --levels 0.4 --tokens 100
    torchrun --nproc_per_node 2 scripts/profile_decode.py      # tensor parallel: rank 0's GPU

Random weights with the config's shapes, thresholds from calibrate.py's code on random tokens
(uniform levels), decode step compiled as in generate.py (reduce-overhead, fullgraph). For each
path: one timed generation without the profiler (wall us/token), then one under torch.profiler:
kernels per token, the sum of kernel times (busy) and first-to-last kernel (span), and a table of
kernels by time per token, all divided by the tokens - 1 decode steps. The prompt's eager prefill
(and any memcpy/memset) is inside every figure, once per generation, so use --tokens >= 100 for
per-token numbers. Also counts the compiled graphs that ran without CUDA graphs. JSON to --out.
"""
import argparse
import collections
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_sweep import cudagraph_skips  # noqa: E402  (this script's folder)
from calibrate import calibrate_random  # noqa: E402
from fileio import atomic_write  # noqa: E402
from generate import decode_one_token, generate  # noqa: E402
from loader import configure_inductor, random_model, run_cli, synchronize  # noqa: E402
from quantize import quantize_model  # noqa: E402
from tp import broadcast_thresholds, init_distributed  # noqa: E402


def profile_path(model, prompt, decode_fn, n_tokens: int, rows: int) -> dict:
    device = prompt.device
    generate(model, prompt, n_tokens, decode_fn=decode_fn)  # warm-up (compiles the path the first time)
    generate(model, prompt, n_tokens, decode_fn=decode_fn)
    synchronize(device)
    t0 = time.perf_counter()
    generate(model, prompt, n_tokens, decode_fn=decode_fn)
    synchronize(device)
    steps = n_tokens - 1  # decode steps; the first token comes from the prefill
    wall = (time.perf_counter() - t0) / steps * 1e6
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        generate(model, prompt, n_tokens, decode_fn=decode_fn)
        synchronize(device)
    kernels = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                      and e.device_index == device.index), key=lambda e: e.time_range.start)
    busy = sum(e.time_range.elapsed_us() for e in kernels)
    span = kernels[-1].time_range.end - kernels[0].time_range.start if kernels else 0
    by_name = collections.defaultdict(lambda: [0, 0.0])
    for e in kernels:
        entry = by_name[e.name[:70]]
        entry[0] += 1
        entry[1] += e.time_range.elapsed_us()
    table = sorted(by_name.items(), key=lambda kv: -kv[1][1])
    return dict(wall_us=wall, kernels_per_token=len(kernels) / steps, busy_us=busy / steps, span_us=span / steps,
                rows=[dict(name=k, per_token=n / steps, us_per_token=t / steps) for k, (n, t) in table][:rows])


def run(args):
    if not torch.cuda.is_available():
        raise ValueError("no CUDA device: profile_decode.py times GPU kernels (run it on a GPU machine)")
    if args.tokens < 2:
        raise ValueError("--tokens must be at least 2 (the first token comes from the prefill)")
    levels = [float(x) for x in args.levels.split(",") if x]
    rank, world, device = init_distributed("cuda")  # world 0: not under torchrun
    device = torch.device(device)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    model = random_model(args.config, device, torch.bfloat16, tp=(rank, world) if world else None)
    if args.quantize:
        quantize_model(model, args.quantize, args.groupsize)
    sparsity = calibrate_random(model, greedy_seqs=0)
    prompt = torch.randint(0, model.args.vocab_size, (5,), generator=torch.Generator().manual_seed(0))
    prompt = prompt.to(device, torch.int)
    configure_inductor()
    decode_fn = torch.compile(decode_one_token, mode="reduce-overhead", fullgraph=True)
    out = dict(config=args.config, quantize=args.quantize, tokens=args.tokens, device=torch.cuda.get_device_name(device), world_size=world,
               paths={})
    for level in [None] + levels:
        model.sparse_decode = level is not None
        if level is not None:
            model.set_thresholds(sparsity.thresholds(level, "uniform").to(device))
            broadcast_thresholds(model)
        label = "dense" if level is None else f"sparse {level}"
        skips = cudagraph_skips()
        r = out["paths"][label] = profile_path(model, prompt, decode_fn, args.tokens, args.rows)
        r["cudagraph_skips"] = cudagraph_skips() - skips
        print(f"\n== {label}{f' (TP={world}, rank 0)' if world else ''}: wall {r['wall_us']:.0f} us/token "
              f"(no profiler); {r['kernels_per_token']:.0f} kernels/token, busy {r['busy_us']:.0f} us/token, "
              f"span {r['span_us']:.0f} us/token; compiled graphs run without CUDA graphs: {r['cudagraph_skips']}")
        print(f"{'us/tok':>7} {'n/tok':>6} {'us each':>7}  kernel")
        for row in r["rows"]:
            print(f"{row['us_per_token']:7.1f} {row['per_token']:6.1f} "
                  f"{row['us_per_token'] / row['per_token']:7.2f}  {row['name']}")
    if rank == 0:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(args.out) as tmp:
            tmp.write_text(json.dumps(out, indent=1) + "\n")
        print(f"\nwrote {args.out}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="Llama-3-8B")
    parser.add_argument("--levels", default="0.5", help="sparsity levels to profile after dense (comma separated)")
    parser.add_argument("--tokens", type=int, default=100, help="tokens per generation")
    parser.add_argument("--rows", type=int, default=28, help="kernels listed per path")
    parser.add_argument("--quantize", choices=("int8", "int4"), default=None, help="weight-only quantized weights")
    parser.add_argument("--groupsize", type=int, default=128, help="int4 rows per scale")
    parser.add_argument("--out", type=Path, default=ROOT / "results/profile_decode.json")
    run_cli(run, parser.parse_args(argv), "profiling the decode step")


if __name__ == "__main__":
    main()
