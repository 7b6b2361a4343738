"""How fast can this CPU read the rows a sparse decode step keeps? The bound behind the CPU speedups.

    python scripts/bench_cpu_bound.py                                  # embedded SmolLM2, fp32, 40% and 50%
    python scripts/bench_cpu_bound.py --precision bf16 --levels 0.25,0.5,0.7

For each level: generates --tokens tokens of text greedily (bench_sweep's prompt), re-runs them to
record, for every decode step, the rows each projection keeps (|input| > its threshold, as the
kernels decide), then times on the model's own weights, one step after the other (so no cache
holds them), the levels' step i one after the other, then their steps i + 1:
  read    a plain sum (read_rows.c) of exactly the weight bytes the step needs: each block
          matrix's kept rows, segment by segment as the kernel reads them, and the whole LM head.
          No arithmetic: what the memory system gives, the most any kernel could reach.
  kernel  the CPU kernels on the same inputs and thresholds: the sparse matvec of every block
          matrix (inputs already normed) and the LM head.
"dense" keeps every row. Per level: weight MB a step, ms a step, GB/s, and the speedup over dense
each would give a decode step in which nothing else took time. JSON to --out.
"""
import argparse
import ctypes
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from generate import generate  # noqa: E402
from loader import DEFAULT_CHECKPOINT, DTYPES, load_model, run_cli  # noqa: E402
from model import PROJECTIONS  # noqa: E402
from sparse_kernels import cpu  # noqa: E402
from teal import SparsityFile, forward_window  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

READER = Path(__file__).with_name("read_rows.c")
PROMPT = "The capital of France is"  # bench_sweep's


def reader():
    """teal_read_rows from read_rows.c, built like the kernels (sparse_kernels/cpu.py)."""
    compiler = cpu.find_compiler()
    if compiler is None:
        raise ValueError("no C compiler (cc/gcc) found: install gcc to build scripts/read_rows.c")
    path = cpu.library_path(compiler, READER)
    if not path.exists():
        cpu.build(compiler, path, READER)
    fn = ctypes.CDLL(str(path)).teal_read_rows
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    fn.restype = ctypes.c_uint64
    return fn


class StateRecorder:
    """Observer (model.Transformer.observer) that keeps each layer's four projection inputs."""

    def __init__(self):
        self.states = {}  # (layer, state) -> (B, T, K)

    def __call__(self, layer: int, state: str, x: torch.Tensor):
        self.states[layer, state] = x.detach().clone()


def block_calls(model) -> list:
    """The block matvecs of a decode step, in order: (layer, W^T, input state, projections, splits)."""
    calls = []
    for i, layer in enumerate(model.layers):
        attn, mlp = layer.attention, layer.feed_forward
        calls += [(i, attn.wqkv_t, "attn_in", ("q", "k", "v"), attn.splits), (i, attn.wo_t, "attn_out", ("o",), None),
                  (i, mlp.w13_t, "mlp_in", ("gate", "up"), [mlp.hidden, mlp.hidden]),
                  (i, mlp.w2_t, "mlp_mid", ("down",), None)]
    return calls


def head_weight(model) -> torch.Tensor:
    """The LM head in nn.Linear's layout (V, D): the embedding table when tied."""
    return model.tok_embeddings.weight if model.output is None else model.output.weight


class Step:
    """One decode step's reads: per kernel call, slices (rows of a matrix, a byte range of each row),
    in the flat arrays read_rows.c takes; and the kernel calls that replay it."""

    def __init__(self):
        self.call_slices, self.slices, self.rows, self.n_rows, self.matvecs = [0], [], [], 0, []
        self.n_bytes = 0

    def add_call(self, w: torch.Tensor, parts: list):
        """parts: (first column, columns, kept rows (1-D int tensor)) of each segment of w (K, N)."""
        size = w.element_size()
        for col, width, rows in parts:
            self.slices += [w.data_ptr(), w.stride(0) * size, col * size, width * size, rows.numel(), self.n_rows]
            self.rows.append(rows.numpy().astype(np.int32))
            self.n_rows += rows.numel()
            self.n_bytes += rows.numel() * width * size
        self.call_slices.append(len(self.slices) // 6)

    def arrays(self):
        """(call_slices, slices, rows) as read_rows.c takes them."""
        return (np.array(self.call_slices, dtype=np.int64), np.array(self.slices, dtype=np.int64),
                np.concatenate(self.rows + [np.zeros(1, dtype=np.int32)]))


def record_steps(model, sparsity, level, prompt, n_tokens) -> list:
    """The Steps of n_tokens decode steps at level (None: dense) on generated text."""
    thresholds = None if level is None else sparsity.thresholds(level, "greedy")
    model.sparse_decode = level is not None
    if thresholds is not None:
        model.set_thresholds(thresholds)
    seq = generate(model, prompt, n_tokens + 1)  # the first new token comes from the prompt's forward
    recorder = StateRecorder()
    forward_window(model, seq, prompt.numel() + 1, sparse_tail=level is not None, meter=recorder)
    head = head_weight(model)
    steps = []
    for t in range(seq.shape[1] - prompt.numel() - 1):
        step = Step()
        for layer, w, state, projections, splits in block_calls(model):
            x = recorder.states[layer, state][0, t]  # (K,)
            splits = splits or [w.shape[1]]
            parts, col = [], 0
            for proj, width in zip(projections, splits):
                threshold = model.layers[layer].thresholds[PROJECTIONS.index(proj)]
                kept = torch.arange(x.numel()) if level is None else torch.nonzero(x.abs().float() > threshold).flatten()
                parts.append((col, width, kept))
                col += width
            step.add_call(w, parts)
            j = [PROJECTIONS.index(p) for p in projections]
            step.matvecs.append((x.view(1, -1), w, None if level is None else model.layers[layer].thresholds[j], splits))
        step.add_call(head, [(0, head.shape[1], torch.arange(head.shape[0]))])
        step.head = (recorder.states[len(model.layers) - 1, "mlp_in"][0, t].view(1, -1), head)  # any (1, D) input
        steps.append(step)
    return steps


def checksum(step: Step) -> int:
    """What read_rows.c returns for step, computed here: the XOR of every slice's 64-bit words (then its tail bytes)."""
    total = 0
    rows = step.arrays()[2]
    for i in range(len(step.slices) // 6):
        base, stride, offset, length, n, first = step.slices[6 * i:6 * i + 6]
        words = length // 8 * 8
        for r in rows[first:first + n].tolist():
            raw = np.ctypeslib.as_array((ctypes.c_uint8 * length).from_address(base + r * stride + offset))
            total ^= int(np.bitwise_xor.reduce(raw[:words].view(np.uint64))) if words else 0
            for byte in raw[words:].tolist():
                total ^= byte
    return total


def run_read(read_fn, step: Step, arrays, threads: int) -> int:
    call_slices, slices, rows = arrays
    return read_fn(len(step.call_slices) - 1, call_slices.ctypes.data, slices.ctypes.data, rows.ctypes.data, threads)


def run_kernels(step: Step):
    for x, w, thresholds, splits in step.matvecs:
        cpu.matvec(x, w, thresholds, splits)
    cpu.linear_rows(*step.head)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint_path", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--sparsity_file", type=Path, default=None, help="default: the checkpoint's sparsity.json")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--levels", default="0.4,0.5")
    parser.add_argument("--tokens", type=int, default=100, help="decode steps recorded per level")
    parser.add_argument("--rounds", type=int, default=3, help="timed passes over every level's steps")
    parser.add_argument("--threads", type=int, default=None, help="default: torch's (one per core)")
    parser.add_argument("--out", type=Path, default=None, help="default: results/cpu_read_bound_<precision>.json")
    run_cli(run, parser.parse_args(argv), "timing the CPU's reads")


def run(args):
    levels = [float(v) for v in args.levels.split(",")]
    if any(not 0 < v < 1 for v in levels):
        raise ValueError(f"--levels {args.levels}: every level must lie in (0, 1)")
    if not cpu.available():
        raise ValueError("the CPU kernel is not available (no C compiler, or TEAL_CPU_REFERENCE is set)")
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    read_fn = reader()
    model = load_model(args.checkpoint_path, torch.device("cpu"), DTYPES[args.precision])
    if model.args.quantization:
        raise ValueError(f"{args.checkpoint_path} is quantized: bench_cpu_bound.py times float weights (fp32/bf16)")
    sparsity = SparsityFile.load(args.sparsity_file or args.checkpoint_path / "sparsity.json", model,
                                 args.checkpoint_path)
    prompt = torch.tensor(load_tokenizer(args.checkpoint_path).encode(PROMPT, bos=True), dtype=torch.int)
    steps = {}
    with torch.no_grad():
        for level in [None] + levels:
            steps[level] = record_steps(model, sparsity, level, prompt, args.tokens)
            print(f"recorded {len(steps[level])} steps at {'dense' if level is None else level}", flush=True)
    head = head_weight(model)
    arrays = {level: [s.arrays() for s in ss] for level, ss in steps.items()}
    for level, ss in steps.items():  # read_rows.c reads exactly the bytes listed
        if run_read(read_fn, ss[0], arrays[level][0], threads) != checksum(ss[0]):
            raise RuntimeError("read_rows.c's checksum differs from the bytes it was given")
    times = {(level, kind): [] for level in steps for kind in ("read", "kernel")}
    with torch.no_grad():
        for _ in range(args.rounds):  # step i of every level, then step i + 1: the levels see the same host
            for i in range(min(len(ss) for ss in steps.values())):
                for level, ss in steps.items():
                    t0 = time.perf_counter()
                    run_read(read_fn, ss[i], arrays[level][i], threads)
                    t1 = time.perf_counter()
                    run_kernels(ss[i])
                    t2 = time.perf_counter()
                    times[level, "read"].append(t1 - t0)
                    times[level, "kernel"].append(t2 - t1)
    rows = []
    for level, ss in steps.items():
        mb = statistics.mean(s.n_bytes for s in ss) / 1e6
        row = dict(level=0.0 if level is None else level, mb_per_step=mb,
                   kept_fraction_blocks=statistics.mean((s.n_bytes - head.numel() * head.element_size()) for s in ss)
                   / (statistics.mean(s.n_bytes for s in steps[None]) - head.numel() * head.element_size()))
        for kind in ("read", "kernel"):
            ms = statistics.median(times[level, kind]) * 1e3
            row[f"{kind}_ms"], row[f"{kind}_gb_per_s"] = ms, mb / ms
        rows.append(row)
    dense = rows[0]
    print(f"\n{args.checkpoint_path.name}, {args.precision}, {threads} threads, {args.tokens} steps a level, "
          f"{args.rounds} rounds (medians); a step's block matrices (kept rows) and LM head\n")
    print("| level | kept (blocks) | MB a step | read ms | read GB/s | read speedup | kernel ms | kernel GB/s "
          "| kernel speedup |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        r["read_speedup"], r["kernel_speedup"] = dense["read_ms"] / r["read_ms"], dense["kernel_ms"] / r["kernel_ms"]
        print(f"| {'dense' if r['level'] == 0 else r['level']} | {r['kept_fraction_blocks']:.3f} | {r['mb_per_step']:.1f} "
              f"| {r['read_ms']:.2f} | {r['read_gb_per_s']:.1f} | {r['read_speedup']:.2f}x | {r['kernel_ms']:.2f} "
              f"| {r['kernel_gb_per_s']:.1f} | {r['kernel_speedup']:.2f}x |")
    out = args.out or ROOT / f"results/cpu_read_bound_{args.precision}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(checkpoint=args.checkpoint_path.name, precision=args.precision, threads=threads, cpus=os.cpu_count(),
                tokens=args.tokens, rounds=args.rounds, torch=torch.__version__, load_average=os.getloadavg())
    out.write_text(json.dumps(dict(meta=meta, results=rows), indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
