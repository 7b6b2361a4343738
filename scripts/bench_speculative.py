"""Self-speculative decoding with a TEAL-sparse draft: acceptance on a real model, costs on a GPU, and
the tokens/s they imply.

    python scripts/bench_speculative.py                  # acceptance: the embedded model, held-out text (CPU)
    python scripts/bench_speculative.py --device cuda --config Llama-3-8B    # costs + projection (GPU)

Acceptance mode (a checkpoint, fp32, greedy): prompts of --prompt_len tokens cut from held-out
Wikipedia (wiki-eval) and botchan, --new_tokens each; for every verifier level V (--verify_levels,
0 dense), draft level P (--levels) and K (--ks): the fraction of drafts accepted and the tokens each
verify pass yields (accepted drafts + the verifier's own token), with the draft on the verifier's
KV cache (shared) and on a cache of its own (own, dense verifier only). Greedy speculative decoding
emits the verifier's greedy sequence, so the acceptance is measured by replaying the draft on it:
from every position s of the verifier's plain greedy run, with the verifier's cache before s, the
draft's steps until the first that disagrees give L(s), the drafts a cycle from s keeps (capped at
K); cycles then start at T, T + min(L(T), K) + 1, ... One replay serves every K. In fp32 the
replay's cache (written by decode steps) and a real run's (written by verify passes) differ in the
last bits, which can move a sparse draft's activation across its threshold and, rarely, its token;
in fp64 the replay's counts are the run's (tests/test_speculative.py). A run of
generate.speculative_generate at the best (P, K) checks the replay (its accepted counts) and times
plain and speculative decoding on this machine (the CPU reference skips no weights: a sparse draft
step costs a dense one there). JSON: results/speculative_acceptance_smollm2.json (with every replay's
L(s), so any K up to the largest can be recounted); PNG beside it.

GPU mode (--config NAME: random weights, bf16, uniform thresholds calibrated on random tokens as in
bench_sweep.py; decode step compiled with mode="reduce-overhead", the verify pass compiled once with
dynamic shapes): plain decoding tokens/s dense and at each verifier level; the draft step at every P
and the verify pass at every K + 1 (dense and sparse verifier); the cycle (K draft steps, the verify
pass, the acceptance, the host sync), timed in speculative_generate itself on the random model; the
dense projections of K + 1 rows through cuBLAS and through the fused dense kernel. The PROJECTION:
tokens/s = (tokens per verify, read from the acceptance JSON of a real model) / (cycle time measured
here). Also the random model's own end-to-end speculative run (its acceptance is its own, not a real
model's) and whether its greedy tokens equal plain greedy decoding's. No checkpoint or data needed:
the GPU machine gets only the committed acceptance JSON.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_sweep import cudagraph_skips, dynamo_compiles, time_generation  # noqa: E402  (this script's folder)
from calibrate import calibrate_random  # noqa: E402
from generate import (SpeculativeStats, compile_verify, decode_one_token, generate, prefill, run_prefill,  # noqa: E402
                      set_level, speculative_generate, verify_pass)
from loader import (DEFAULT_CHECKPOINT, DTYPES, configure_inductor, load_model, random_model, run_cli,  # noqa: E402
                    synchronize)
from teal import SparsityFile, weight_bytes_per_token  # noqa: E402

ACCEPTANCE_JSON = ROOT / "results/speculative_acceptance_smollm2.json"


def floats(text: str) -> list:
    return [float(x) for x in text.split(",") if x]


# ---------------------------------------------------------------------------- acceptance (a real model)

def cache_snapshot(model) -> list:
    return [(b.attention.kv_cache.k_cache.clone(), b.attention.kv_cache.v_cache.clone()) for b in model.layers]


def restore_cache(model, snapshot: list, lo: int, hi: int):
    """Positions lo .. hi-1 of every block's cache back to the snapshot's."""
    for block, (k, v) in zip(model.layers, snapshot):
        block.attention.kv_cache.k_cache[:, :, lo:hi] = k[:, :, lo:hi]
        block.attention.kv_cache.v_cache[:, :, lo:hi] = v[:, :, lo:hi]


@torch.no_grad()
def own_draft_cache(model, seq, prompt_len: int, thresholds) -> list:
    """The cache a draft with a cache of its own holds over seq: the prompt dense (as speculative_generate
    prefills it), every later token written by a draft step at its level."""
    model.setup_caches(1, seq.shape[1])
    set_level(model, thresholds)
    run_prefill(model, seq[0, :prompt_len])
    for p in range(prompt_len, seq.shape[1] - 1):
        decode_one_token(model, seq[:, p:p + 1], torch.tensor([p]), 0.0, None)
    return cache_snapshot(model)


@torch.no_grad()
def draft_runs(model, seq, prompt_len: int, n_starts: int, max_k: int, snapshot: list, thresholds) -> list:
    """L(s) for the n_starts positions s from prompt_len on: how many greedy draft steps from seq[s] at
    position s (the cache before s as in snapshot) agree with seq[s+1], seq[s+2], ..., at most max_k.
    The steps from s write positions s .. s+max_k-1, restored before the next start (position s as
    the verify pass would rewrite it)."""
    set_level(model, thresholds)
    runs = []
    for s in range(prompt_len, prompt_len + n_starts):
        restore_cache(model, snapshot, s - 1, s + max_k)
        n = 0
        while n < max_k:
            token = decode_one_token(model, seq[:, s + n:s + n + 1], torch.tensor([s + n]), 0.0, None)
            if int(token) != int(seq[0, s + n + 1]):
                break
            n += 1
        runs.append(n)
    return runs


def cycles_of(runs: list, k: int, new_tokens: int) -> SpeculativeStats:
    """The cycles speculative_generate runs with K = k over a sequence whose replay gave runs: the prompt's
    forward yields one token, each cycle from position s drafts k' = min(k, tokens still missing) and
    keeps min(L(s), k') drafts and one token more."""
    stats, s, produced = SpeculativeStats(), 0, 1
    while produced < new_tokens:
        k_cycle = min(k, new_tokens - produced)
        n = min(runs[s], k_cycle)
        stats.cycles, stats.drafted, stats.accepted = stats.cycles + 1, stats.drafted + k_cycle, stats.accepted + n
        produced += n + 1
        s += n + 1
    return stats


def held_out_prompts(tokenizer, sources: list, n: int, length: int) -> list:
    """(source, prompt (length,)) pairs: n windows of each source at fixed random places."""
    from data import load_text, token_windows

    return [(source, w.to(torch.int)) for source in sources
            for w in token_windows(tokenizer.encode(load_text(source)), n, length, seed=1)]


def ideal_speedup(tokens_per_verify: float, k: int, draft_bytes: float, dense_bytes: float) -> float:
    """Over plain dense decoding, if every forward cost the weight bytes it reads: a cycle reads k drafts
    of draft_bytes and one verify pass of dense_bytes, and yields tokens_per_verify tokens."""
    return tokens_per_verify * dense_bytes / (k * draft_bytes + dense_bytes)


def acceptance_mode(args):
    from tokenizer import load_tokenizer

    torch.manual_seed(0)
    checkpoint = args.checkpoint_path or DEFAULT_CHECKPOINT
    dtype = DTYPES[args.precision or "fp32"]
    model = load_model(checkpoint, args.device, dtype)
    sparsity = SparsityFile.load(args.sparsity_file or checkpoint / "sparsity.json", model, checkpoint)
    mode = args.mode or "greedy"
    prompts = held_out_prompts(load_tokenizer(checkpoint), args.sources.split(","), args.prompts, args.prompt_len)
    levels, ks, verify_levels = floats(args.levels), [int(k) for k in args.ks.split(",")], floats(args.verify_levels)
    max_k, n_new, T = max(ks), args.new_tokens, args.prompt_len
    if min(verify_levels, default=0) < 0 or any(v >= min(levels) for v in verify_levels):
        raise ValueError("--verify_levels must be at least 0 and below every draft level in --levels")
    level_t = {p: sparsity.thresholds(p, mode) if p > 0 else None for p in levels + verify_levels}
    dense_bytes = weight_bytes_per_token(model)
    draft_bytes = {p: weight_bytes_per_token(model, sparsity.sparsities(p, mode)) for p in levels}

    runs = {}  # (verify level, cache, P) -> per prompt, L(s) for each start
    trajectories, plain_s = {}, {}
    t_start = time.perf_counter()
    for v in verify_levels:
        for i, (source, prompt) in enumerate(prompts):
            set_level(model, level_t[v])
            t0 = time.perf_counter()
            seq = generate(model, prompt, n_new + max_k)  # replays look up to max_k tokens past the last start
            plain_s[v, i] = (time.perf_counter() - t0) / (seq.shape[1] - T)
            trajectories[v, i] = seq
            snapshot = cache_snapshot(model)
            for p in levels:
                runs.setdefault((v, "shared", p), []).append(
                    draft_runs(model, seq, T, n_new, max_k, snapshot, level_t[p]))
            if v == 0 and args.own_cache:
                for p in levels:
                    own = own_draft_cache(model, seq, T, level_t[p])
                    runs.setdefault((v, "own", p), []).append(draft_runs(model, seq, T, n_new, max_k, own, level_t[p]))
            print(f"  verifier {v:.2f}, prompt {i + 1}/{len(prompts)} ({source}): "
                  f"{time.perf_counter() - t_start:.0f} s", flush=True)

    rows = []
    for (v, cache, p), per_prompt in runs.items():
        for k in ks:
            per = [cycles_of(r, k, n_new) for r in per_prompt]
            total = SpeculativeStats(sum(s.cycles for s in per), sum(s.drafted for s in per),
                                     sum(s.accepted for s in per))
            by_source = {}
            for (source, _), s in zip(prompts, per):
                by_source.setdefault(source, []).append(s)
            rows.append(dict(verify=v, cache=cache, P=p, K=k, cycles=total.cycles, drafted=total.drafted,
                             accepted=total.accepted, acceptance_rate=total.acceptance_rate,
                             tokens_per_verify=total.tokens_per_verify,
                             tokens_per_verify_by_source={
                                 src: sum(s.accepted + s.cycles for s in ss) / sum(s.cycles for s in ss)
                                 for src, ss in by_source.items()},
                             ideal_speedup=ideal_speedup(total.tokens_per_verify, k, draft_bytes[p], dense_bytes)))
    dense_shared = [r for r in rows if r["verify"] == 0 and r["cache"] == "shared"]
    best = max(dense_shared, key=lambda r: r["ideal_speedup"]) if dense_shared else None

    check = None
    if best is not None and args.check_runs:  # the replay against speculative_generate itself, and speed
        p, k = best["P"], best["K"]
        spec_s, real, replayed, agree, same_tokens = [], SpeculativeStats(), SpeculativeStats(), 0, 0
        for i, (_, prompt) in enumerate(prompts):
            t0 = time.perf_counter()
            seq, stats = speculative_generate(model, model, prompt, n_new, speculate_k=k, draft_thresholds=level_t[p])
            spec_s.append((time.perf_counter() - t0) / n_new)
            replay = cycles_of(runs[0, "shared", p][i], k, n_new)
            for total, s in ((real, stats), (replayed, replay)):
                total.cycles, total.drafted, total.accepted = (total.cycles + s.cycles, total.drafted + s.drafted,
                                                               total.accepted + s.accepted)
            agree += (stats.cycles, stats.accepted) == (replay.cycles, replay.accepted)
            same_tokens += torch.equal(seq[0], trajectories[0, i][0, :T + n_new])
        plain = [plain_s[0, i] for i in range(len(prompts))]
        check = dict(P=p, K=k, prompts=len(prompts), replay_counts_equal=agree, tokens_equal_plain=same_tokens,
                     real_tokens_per_verify=real.tokens_per_verify, replay_tokens_per_verify=replayed.tokens_per_verify,
                     real_acceptance_rate=real.acceptance_rate, replay_acceptance_rate=replayed.acceptance_rate,
                     plain_tokens_per_s=1 / statistics.mean(plain), speculative_tokens_per_s=1 / statistics.mean(spec_s))

    meta = dict(model=checkpoint.name, device=str(args.device), dtype=str(dtype), torch=torch.__version__,
                threads=torch.get_num_threads(), mode=mode, sources=sorted({s for s, _ in prompts}),
                prompts=len(prompts), prompt_len=T, new_tokens=n_new, levels=levels, ks=ks,
                verify_levels=verify_levels, decoding="greedy", method="replay of the draft on the verifier's greedy "
                "sequence (see scripts/bench_speculative.py); checked against speculative_generate at the best (P, K)",
                dense_bytes_per_token=dense_bytes, seconds=time.perf_counter() - t_start)
    out = args.out or ACCEPTANCE_JSON
    out.parent.mkdir(parents=True, exist_ok=True)
    replays = [dict(verify=v, cache=cache, P=p, runs=per_prompt) for (v, cache, p), per_prompt in runs.items()]
    out.write_text(json.dumps(dict(meta=meta, acceptance=rows, best=best, check=check), indent=1)[:-2]
                   + ',\n "replays": ' + json.dumps(replays, separators=(",", ":")).replace("},{", "},\n  {")
                   + "\n}\n")
    plot_acceptance(rows, out.with_suffix(".png"), f"{checkpoint.name}: greedy self-speculative acceptance, "
                                                    f"{len(prompts)} held-out prompts x {n_new} tokens")
    print_acceptance(rows, best, check)
    print(f"wrote {out} and {out.with_suffix('.png')}")


def print_acceptance(rows, best, check):
    for (v, cache) in sorted({(r["verify"], r["cache"]) for r in rows}, key=lambda x: (x[0], x[1] != "shared")):
        sel = [r for r in rows if (r["verify"], r["cache"]) == (v, cache)]
        ks = sorted({r["K"] for r in sel})
        print(f"\nverifier {'dense' if v == 0 else f'{v:.2f}'}, draft cache {cache}: acceptance rate / tokens per verify")
        print("| P | " + " | ".join(f"K={k}" for k in ks) + " |")
        print("|---|" + "---|" * len(ks))
        for p in sorted({r["P"] for r in sel}):
            cells = {r["K"]: r for r in sel if r["P"] == p}
            print(f"| {p:.2f} | " + " | ".join(f"{cells[k]['acceptance_rate']:.2f} / {cells[k]['tokens_per_verify']:.2f}"
                                                for k in ks) + " |")
    if best:
        print(f"\nbest (P, K) by ideal speedup (weight bytes), dense verifier, shared cache: P={best['P']:.2f} "
              f"K={best['K']}: {best['tokens_per_verify']:.2f} tokens per verify, {best['acceptance_rate']:.2f} "
              f"accepted, ideal speedup {best['ideal_speedup']:.2f}x")
    if check:
        print(f"check at P={check['P']:.2f} K={check['K']}: speculative_generate's counts equal the replay's on "
              f"{check['replay_counts_equal']}/{check['prompts']} prompts (tokens per verify "
              f"{check['real_tokens_per_verify']:.3f} run, {check['replay_tokens_per_verify']:.3f} replayed: a sparse "
              f"draft step can move with the last bits of the cache), its tokens equal plain greedy on "
              f"{check['tokens_equal_plain']}/{check['prompts']}; on this CPU plain {check['plain_tokens_per_s']:.2f} "
              f"tok/s, speculative {check['speculative_tokens_per_s']:.2f} tok/s")


def plot_acceptance(rows, path: Path, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["verify"], r["cache"]) for r in rows}, key=lambda x: (x[0], x[1] != "shared"))
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
    for ax, (v, cache) in zip(axes[0], groups):
        sel = [r for r in rows if (r["verify"], r["cache"]) == (v, cache)]
        for k in sorted({r["K"] for r in sel}):
            pts = sorted((r["P"], r["tokens_per_verify"]) for r in sel if r["K"] == k)
            ax.plot(*zip(*pts), "o-", label=f"K={k}")
        ax.set_xlabel("draft sparsity P")
        ax.set_ylabel("tokens per verify pass")
        ax.set_title(f"verifier {'dense' if v == 0 else v}, {cache} cache", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ---------------------------------------------------------------------------- costs and projection (GPU)

def median_ms(fn, device, runs: int) -> float:
    times = []
    for _ in range(runs):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


@torch.no_grad()
def draft_step_ms(model, decode_fn, prompt, steps: int, device) -> float:
    """One compiled decode step as the draft loop runs it (its output cloned), averaged over `steps`."""
    T = prompt.numel()
    model.setup_caches(1, T + steps + 1)
    token = run_prefill(model, prompt).clone()
    base = torch.tensor([T], device=device)

    def loop():
        tok = token
        for i in range(steps):
            tok = decode_fn(model, tok, base + i, 0.0, None).clone()

    loop()  # warm-up: CUDA graph recording
    return median_ms(loop, device, 3) / steps


@torch.no_grad()
def verify_ms(model, verify_fn, prompt, k: int, device, runs: int = 20) -> float:
    """The compiled verify pass over k + 1 positions right after the prompt, with its greedy targets."""
    T = prompt.numel()
    tokens = torch.randint(0, model.args.vocab_size, (1, k + 1), device=device, dtype=torch.int)
    positions = torch.arange(T, T + k + 1, device=device)
    for _ in range(3):  # warm-up and CUDA graph recording for this width
        verify_fn(model, tokens, positions, 0.0, None)
    return median_ms(lambda: verify_fn(model, tokens, positions, 0.0, None), device, runs)


def read_acceptance(path: Path):
    """(acceptance JSON, {(verifier level, P, K): its shared-cache row})."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run this script without --config on the real model first "
                                f"(it writes the acceptance JSON the projection reads)")
    data = json.loads(path.read_text())
    rows = {(round(r["verify"], 4), round(r["P"], 4), r["K"]): r for r in data["acceptance"] if r["cache"] == "shared"}
    return data, rows


def project(report: dict, acceptance_path: Path) -> dict:
    """report (the GPU mode's measurements) with the PROJECTION: for each measured (verifier, P, K), the
    acceptance model's tokens per verify over the cycle time measured on the GPU."""
    data, acceptance = read_acceptance(acceptance_path)
    plain = {float(v): t for v, t in report["plain_tokens_per_s"].items()}
    for row in report["results"]:
        for key in ("projected_tokens_per_s", "real_tokens_per_verify", "real_acceptance_rate",
                    "projected_speedup_vs_dense", "projected_speedup_vs_plain_at_verify"):
            row.pop(key, None)
        rates = acceptance.get((round(row["verify"], 4), round(row["P"], 4), row["K"]))
        if rates is not None:
            row["real_tokens_per_verify"], row["real_acceptance_rate"] = (rates["tokens_per_verify"],
                                                                          rates["acceptance_rate"])
            row["projected_tokens_per_s"] = rates["tokens_per_verify"] / row["cycle_ms"] * 1e3
            row["projected_speedup_vs_dense"] = row["projected_tokens_per_s"] / plain[0.0]
            row["projected_speedup_vs_plain_at_verify"] = row["projected_tokens_per_s"] / plain[row["verify"]]
    projected = [r for r in report["results"] if "projected_tokens_per_s" in r]
    report["best"] = {str(v): max((r for r in projected if r["verify"] == v),
                                  key=lambda r: r["projected_tokens_per_s"], default=None) for v in plain}
    report["meta"]["acceptance_from"] = str(acceptance_path.relative_to(ROOT) if acceptance_path.is_relative_to(ROOT)
                                            else acceptance_path)
    report["meta"]["acceptance_model"] = data["meta"]["model"]
    report["meta"]["acceptance_prompts"] = data["meta"]["prompts"]
    report["meta"]["acceptance_new_tokens"] = data["meta"]["new_tokens"]
    return report


def write_projection(report: dict, out: Path):
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    meta = report["meta"]
    plain = {float(v): t for v, t in report["plain_tokens_per_s"].items()}
    label = ("UPPER BOUND of the PROJECTION: step times of a bench_sweep run" if "from_sweep" in meta else
             "PROJECTION: cycle times") + f" ({meta['model']}, {meta['device']})"
    plot_projection(report["results"], plain, out.with_suffix(".png"),
                    f"{label} x acceptance measured on {meta['acceptance_model']}")
    print_projection(report["results"], plain, report["best"], report["projection_paths"],
                     meta["recompiles_across_levels_and_k"], "UPPER BOUND" if "from_sweep" in meta else "PROJECTION")
    print(f"wrote {out} and {out.with_suffix('.png')}")


def projection_path_ms(model, ks, device) -> list:
    """The block's dense projections over k + 1 rows (the verify pass's matmuls): cuBLAS (the model's
    multi-position path) against the fused dense kernel (a decode step's path), per width."""
    from triton.testing import do_bench_cudagraph

    from sparse_kernels import sparse_linear, sparse_silu_down

    block = model.layers[0]
    attn, ffn = block.attention, block.feed_forward
    rows = []
    for k in ks:
        B = k + 1
        x = torch.randn(B, attn.wqkv_t.shape[0], device=device, dtype=attn.wqkv_t.dtype)
        y = torch.randn(B, attn.wo_t.shape[0], device=device, dtype=x.dtype)
        gu = torch.randn(B, ffn.w13_t.shape[1], device=device, dtype=x.dtype)
        h = torch.randn(B, ffn.w2_t.shape[0], device=device, dtype=x.dtype)

        def cublas():
            return x @ attn.wqkv_t, y @ attn.wo_t, x @ ffn.w13_t, h @ ffn.w2_t

        def fused():
            return (sparse_linear(x, attn.wqkv_t, None, attn.splits), sparse_linear(y, attn.wo_t, None, [attn.wo_t.shape[1]]),
                    sparse_linear(x, ffn.w13_t, None, [ffn.hidden, ffn.hidden]), sparse_silu_down(gu, ffn.w2_t, None))

        fused()  # workspaces grown outside capture
        rows.append(dict(K=k, rows=B, cublas_us=1e3 * do_bench_cudagraph(cublas, rep=100),
                         fused_dense_us=1e3 * do_bench_cudagraph(fused, rep=100) if B <= 8 else None))
    return rows


def gpu_mode(args):
    device = args.device
    on_cuda = str(device).startswith("cuda")
    dtype = DTYPES[args.precision or ("bf16" if on_cuda else "fp32")]
    acceptance_path = args.acceptance or ACCEPTANCE_JSON
    read_acceptance(acceptance_path)  # fail before the long part
    levels, ks, verify_levels = floats(args.levels), [int(k) for k in args.ks.split(",")], floats(args.verify_levels)
    t_start = time.perf_counter()
    model = random_model(args.config, device, dtype)
    sparsity = calibrate_random(model, greedy_seqs=0)  # uniform levels, as bench_sweep.py
    level_t = {p: sparsity.thresholds(p, "uniform").to(device) if p > 0 else None for p in levels + verify_levels}
    prompt = torch.randint(0, model.args.vocab_size, (5,), generator=torch.Generator().manual_seed(0))
    prompt = prompt.to(device=device, dtype=torch.int)
    print(f"{args.config}: model ready in {time.perf_counter() - t_start:.1f} s ({device}, {dtype})", flush=True)

    configure_inductor()
    compiled = not args.no_compile
    decode_fn = torch.compile(decode_one_token, mode="reduce-overhead" if on_cuda else None,
                              fullgraph=on_cuda) if compiled else decode_one_token
    verify_fn = compile_verify(on_cuda) if compiled else verify_pass

    # One cache for every run, as long as the longest needs: a decode step's graph holds the cache's shape.
    model.setup_caches(1, prompt.numel() + max(args.new_tokens + max(ks), args.steps) + 1)
    plain = {}  # decode steps per second, the prompt's forward left out (as a cycle's time leaves it out)
    for v in verify_levels:
        set_level(model, level_t[v])
        generate(model, prompt, args.new_tokens, decode_fn=decode_fn, prefill_fn=prefill)  # compile / record
        rate, plain_seq = time_generation(model, prompt, args.new_tokens, decode_fn, prefill, args.runs, device)
        prefill_ms = median_ms(lambda: run_prefill(model, prompt), device, 3)
        plain[v] = (args.new_tokens - 1) / (args.new_tokens / rate - prefill_ms / 1e3)
        if v == 0:
            dense_seq = plain_seq
        print(f"  plain decoding at {v:.2f}: {plain[v]:.1f} tok/s (decode steps; {rate:.1f} with the prompt)",
              flush=True)
    count = dynamo_compiles if compiled else (lambda: 0)
    recompiles = compiled_at = 0  # graphs traced after the first P, the first K of each verifier level, in the runs
    draft_ms = {}
    for i, p in enumerate(levels):
        set_level(model, level_t[p])
        draft_ms[p] = draft_step_ms(model, decode_fn, prompt, args.steps, device)
        recompiles += count() - compiled_at if i else 0
        compiled_at = count()
        print(f"  draft step at {p:.2f}: {draft_ms[p]:.3f} ms", flush=True)
    verify = {}
    run_prefill(model, prompt)
    for v in verify_levels:
        for i, k in enumerate(ks):
            set_level(model, level_t[v], sparse_prefill=v > 0)  # the verify pass is a multi-position forward
            verify[v, k] = verify_ms(model, verify_fn, prompt, k, device, runs=args.steps)
            recompiles += count() - compiled_at if i else 0
            compiled_at = count()
            print(f"  verify pass at {v:.2f}, K={k}: {verify[v, k]:.3f} ms", flush=True)

    results = []
    for v in verify_levels:
        for p in levels:
            if p <= v:
                continue
            for k in ks:
                run = lambda: speculative_generate(  # noqa: E731
                    model, model, prompt, args.new_tokens, speculate_k=k, verify_thresholds=level_t[v],
                    draft_thresholds=level_t[p], decode_fn=decode_fn, verify_fn=verify_fn)
                run()  # this width's CUDA graph, if not yet recorded
                times, stats = [], None
                for _ in range(args.runs):
                    synchronize(device)
                    t0 = time.perf_counter()
                    seq, stats = run()
                    synchronize(device)
                    times.append(time.perf_counter() - t0)
                elapsed = statistics.median(times)
                prefill_ms = median_ms(lambda: run_prefill(model, prompt), device, 3)
                cycle_ms = (elapsed * 1e3 - prefill_ms) / stats.cycles
                row = dict(verify=v, P=p, K=k, draft_step_ms=draft_ms[p], verify_ms=verify[v, k], cycle_ms=cycle_ms,
                           random_model=dict(tokens_per_s=(seq.shape[1] - prompt.numel()) / elapsed,
                                             acceptance_rate=stats.acceptance_rate,
                                             tokens_per_verify=stats.tokens_per_verify,
                                             tokens_equal_plain=bool(torch.equal(seq, dense_seq)) if v == 0 else None),
                           **{"tokens_per_verify_for_1.5x_dense": 1.5 * plain[0] * cycle_ms / 1e3})
                results.append(row)
                print(f"  V={v:.2f} P={p:.2f} K={k}: cycle {cycle_ms:.2f} ms", flush=True)
    recompiles += count() - compiled_at
    paths = projection_path_ms(model, ks, device) if on_cuda else []

    meta = dict(model=args.config, device=torch.cuda.get_device_name(device) if on_cuda else "cpu", dtype=str(dtype),
                torch=torch.__version__, compiled=compiled, new_tokens=args.new_tokens, runs=args.runs,
                recompiles_across_levels_and_k=recompiles, cudagraph_skips=cudagraph_skips() if compiled else 0,
                projection="tokens/s = tokens per verify measured on the acceptance model (greedy, shared cache) / "
                           "cycle time measured here (K compiled draft steps, the compiled verify pass, acceptance, "
                           "one host sync) on random weights",
                seconds=time.perf_counter() - t_start)
    report = dict(meta=meta, plain_tokens_per_s={str(v): t for v, t in plain.items()}, results=results,
                  projection_paths=paths)
    out = args.out or ROOT / f"results/speculative_{args.config.lower().replace('-', '_').replace('.', '_')}.json"
    write_projection(project(report, acceptance_path), out)


def step_ms_from_sweep(row: dict, new_tokens: int) -> float:
    """A decode step's time from a bench_sweep.py row: its generation minus the prompt's forward (which
    also gives the first token) over the remaining new_tokens - 1 steps."""
    return (new_tokens / row["tokens_per_s"] * 1e3 - row["prefill_ms"]) / (new_tokens - 1)


def bound_mode(args):
    """--bound SWEEP_JSON: an upper bound of the projection from a bench_sweep.py run (no GPU needed): its
    decode step times are the draft steps, and a verify pass is taken to cost one plain step at the
    verifier's level, its floor (it reads the same weights, for k + 1 positions at once); the host work
    of a cycle is left out. The tokens per verify come from --acceptance."""
    sweep = json.loads(args.bound.read_text())
    n = sweep["meta"]["new_tokens"]
    step = {round(r["level"], 4): step_ms_from_sweep(r, n) for r in sweep["results"]}
    levels, ks, verify_levels = floats(args.levels), [int(k) for k in args.ks.split(",")], floats(args.verify_levels)
    missing = sorted({round(v, 4) for v in levels + verify_levels} - set(step))
    if missing:
        raise ValueError(f"{args.bound} has no level {missing}: run bench_sweep.py with them in --levels")
    plain = {v: 1e3 / step[round(v, 4)] for v in verify_levels}
    results = [dict(verify=v, P=p, K=k, draft_step_ms=step[round(p, 4)], verify_ms=step[round(v, 4)],
                    cycle_ms=k * step[round(p, 4)] + step[round(v, 4)],
                    **{"tokens_per_verify_for_1.5x_dense": 1.5 * plain[0] * (k * step[round(p, 4)] + step[round(v, 4)])
                       / 1e3})
               for v in verify_levels for p in levels if p > v for k in ks]
    meta = dict(sweep["meta"], from_sweep=str(args.bound), recompiles_across_levels_and_k=None,
                projection="UPPER BOUND: tokens/s = tokens per verify measured on the acceptance model / (K decode "
                           "steps at P + one decode step at the verifier's level), step times from the sweep; the "
                           "verify pass at its floor and no host work per cycle")
    report = dict(meta=meta, plain_tokens_per_s={str(v): t for v, t in plain.items()}, results=results,
                  projection_paths=[])
    write_projection(project(report, args.acceptance or ACCEPTANCE_JSON), args.out or ROOT / "results/speculative_bound.json")


def reproject(args):
    """--reproject GPU_JSON: the projection of its measured costs with another acceptance JSON."""
    report = project(json.loads(args.reproject.read_text()), args.acceptance or ACCEPTANCE_JSON)
    write_projection(report, args.out or args.reproject)


def acceptance_for(tokens_per_verify: float, k: int) -> float:
    """The per-draft acceptance a that yields tokens_per_verify tokens a cycle if every draft is kept with
    probability a independently (1 + a + ... + a^k); nan if even a = 1 (k + 1 tokens) is too few."""
    if tokens_per_verify > k + 1:
        return float("nan")
    lo, hi = 0.0, 1.0
    for _ in range(50):
        a = (lo + hi) / 2
        lo, hi = (a, hi) if sum(a ** i for i in range(k + 1)) < tokens_per_verify else (lo, a)
    return (lo + hi) / 2


def print_projection(results, plain, best, paths, recompiles, label="PROJECTION"):
    print("\nplain decoding: " + ", ".join(f"{'dense' if v == 0 else f'{v:.2f}'} {t:.1f} tok/s"
                                         for v, t in plain.items()))
    measured = any("random_model" in r for r in results)
    print(f"\n| verifier | P | K | draft ms | verify ms | cycle ms | real tokens/verify | {label} tok/s | vs dense | "
          "vs plain at verifier | tokens/verify (acceptance) for 1.5x dense |"
          + (" random model tok/s (its acceptance) |" if measured else ""))
    print("|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if measured else ""))
    for r in results:
        proj = (f"{r['real_tokens_per_verify']:.2f} | {r['projected_tokens_per_s']:.1f} | "
                f"{r['projected_speedup_vs_dense']:.2f}x | {r['projected_speedup_vs_plain_at_verify']:.2f}x"
                if "projected_tokens_per_s" in r else "- | - | - | -")
        need = r["tokens_per_verify_for_1.5x_dense"]
        line = (f"| {'dense' if r['verify'] == 0 else r['verify']} | {r['P']:.2f} | {r['K']} | {r['draft_step_ms']:.3f} | "
                f"{r['verify_ms']:.3f} | {r['cycle_ms']:.2f} | {proj} | {need:.2f} ({acceptance_for(need, r['K']):.2f}) |")
        if measured:
            rm = r["random_model"]
            line += f" {rm['tokens_per_s']:.1f} ({rm['acceptance_rate']:.2f}) |"
        print(line)
    for v, r in best.items():
        if r:
            print(f"best {label}, verifier {v}: P={r['P']:.2f} K={r['K']}: {r['projected_tokens_per_s']:.1f} tok/s "
                  f"({r['projected_speedup_vs_dense']:.2f}x dense, {r['projected_speedup_vs_plain_at_verify']:.2f}x "
                  f"plain at the verifier's level)")
    for r in paths:
        fused = f"{r['fused_dense_us']:.1f}" if r["fused_dense_us"] is not None else "-"
        print(f"block projections over {r['rows']} rows: cuBLAS {r['cublas_us']:.1f} us, fused dense kernel {fused} us")
    if recompiles is not None:
        print(f"recompilations across P, K and verifier changes: {recompiles}")


def plot_projection(results, plain, path: Path, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    verify_levels = sorted({r["verify"] for r in results})
    fig, axes = plt.subplots(1, len(verify_levels), figsize=(5.5 * len(verify_levels), 4), squeeze=False)
    for ax, v in zip(axes[0], verify_levels):
        sel = [r for r in results if r["verify"] == v and "projected_tokens_per_s" in r]
        for k in sorted({r["K"] for r in sel}):
            pts = sorted((r["P"], r["projected_tokens_per_s"]) for r in sel if r["K"] == k)
            ax.plot(*zip(*pts), "o-", label=f"K={k} (projected)")
        ax.axhline(plain[0], color="black", ls="--", label=f"plain dense {plain[0]:.0f}")
        if v > 0:
            ax.axhline(plain[v], color="gray", ls=":", label=f"plain at {v} {plain[v]:.0f}")
        ax.set_xlabel("draft sparsity P")
        ax.set_ylabel("tokens/s")
        ax.set_title(f"verifier {'dense' if v == 0 else v}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ---------------------------------------------------------------------------- CLI

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="GPU mode: random weights with this config's shapes")
    parser.add_argument("--checkpoint_path", type=Path, default=None, help="acceptance mode: default the embedded model")
    parser.add_argument("--sparsity_file", type=Path, default=None)
    parser.add_argument("--mode", choices=("greedy", "uniform"), default=None,
                        help="acceptance mode's levels (default greedy); GPU mode: uniform")
    parser.add_argument("--levels", default="0.5,0.6,0.7,0.8,0.9", help="draft levels P")
    parser.add_argument("--ks", default="1,2,4,6,8", help="draft lengths K")
    parser.add_argument("--verify_levels", default="0,0.4", help="verifier levels (0: dense)")
    parser.add_argument("--sources", default="wiki-eval,botchan", help="acceptance mode: held-out text sources")
    parser.add_argument("--prompts", type=int, default=4, help="acceptance mode: prompts per source")
    parser.add_argument("--prompt_len", type=int, default=64)
    parser.add_argument("--new_tokens", type=int, default=None, help="default 64 (acceptance), 120 (GPU)")
    parser.add_argument("--own_cache", action=argparse.BooleanOptionalAction, default=True,
                        help="acceptance mode: also the draft on a cache of its own (dense verifier)")
    parser.add_argument("--check_runs", action=argparse.BooleanOptionalAction, default=True,
                        help="acceptance mode: check the replay with speculative_generate at the best (P, K)")
    parser.add_argument("--acceptance", type=Path, default=None, help=f"GPU mode: default {ACCEPTANCE_JSON}")
    parser.add_argument("--bound", type=Path, default=None,
                        help="a bench_sweep.py JSON: the projection's upper bound from its step times (no GPU needed)")
    parser.add_argument("--reproject", type=Path, default=None,
                        help="a GPU mode JSON: redo its projection with --acceptance (no GPU needed)")
    parser.add_argument("--steps", type=int, default=100, help="GPU mode: draft steps (verify passes) per timing")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=sorted(DTYPES), default=None,
                        help="default fp32 (acceptance), bf16 on CUDA (GPU mode)")
    parser.add_argument("--no_compile", action="store_true", help="GPU mode: eager (CPU smoke runs)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    args.new_tokens = args.new_tokens or (120 if args.config else 64)
    run_cli(reproject if args.reproject else bound_mode if args.bound else gpu_mode if args.config else acceptance_mode,
            args, "benchmarking speculative decoding")


if __name__ == "__main__":
    main()
