"""Perplexity of a model, dense and at TEAL sparsity levels, with the sparsity it really reached.

    python eval.py                                     # dense, 64 windows x 512 tokens of held-out Wikipedia
    python eval.py --sparsity 0.25,0.4,0.5 --modes uniform,greedy
    python eval.py --paper                             # 128 windows, 2048-token context, last 512 scored
    python eval.py --lm_eval wiki_cloze,wiki_ending --sparsity 0.25,0.4,0.5 --modes uniform,greedy
                                                       # lm-evaluation-harness tasks (lm_eval_adapter.py)

Two regimes for every sparse level:
  all     every token of the window goes through the sparse model; scored on the last --scored tokens;
  decode  what generate.py does: the first part of the window is a dense prompt (prefill), the last
          --scored tokens are processed sparsely and scored (default: second half of the window).
Realized sparsity is measured on the evaluation text: per state, and model-wide weighted by the
parameters each projection holds.

--lm_eval runs lm-evaluation-harness tasks instead (pip install lm_eval==0.4.13): the local ones of
lm_eval_tasks/ (wiki_cloze, wiki_ending; group wiki_local), or any of lm-eval's own where its
dataset hub is reachable, dense and at every level and mode, every token sparse (see
lm_eval_adapter.py).
"""
import argparse
import importlib.metadata
import importlib.util
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from data import load_text, token_windows
from fileio import atomic_write
from loader import DEFAULT_CHECKPOINT, DTYPES, default_device, load_model, refuse_directory, resolve_dtype, run_cli
from model import STATES, Transformer
from teal import SparsityFile, SparsityMeter, forward_window
from tokenizer import load_tokenizer


# ---------------------------------------------------------------------------- perplexity

def window_nll(logits: Tensor, tokens: Tensor, scored: int) -> Tensor:
    """Summed negative log-likelihood of the last `scored` tokens of each window. (B,)"""
    L = tokens.shape[1]
    pred = logits[:, L - scored - 1:L - 1].float()  # positions that predict the scored tokens
    target = tokens[:, L - scored:].long()
    return F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), reduction="none").view(
        tokens.shape[0], scored).sum(1)


@torch.no_grad()
def perplexity(model: Transformer, windows: Tensor, *, scored: int, regime: str, sparse: bool,
               batch_size: int = 8, desc: str = "") -> tuple:
    """Perplexity over the last `scored` tokens of each window, and the realized sparsity.
    regime 'all': the whole window sparse (if sparse); 'decode': the first L - scored tokens dense."""
    L = windows.shape[1]
    if not 0 < scored < L:
        raise ValueError(f"scored tokens must be in [1, {L - 1}] for windows of {L}, got {scored}")
    prompt_len = 0 if regime == "all" else L - scored
    meter = SparsityMeter(model) if sparse else None
    nll, count = 0.0, 0
    for start in tqdm(range(0, len(windows), batch_size), desc=desc, leave=False, disable=None):
        batch = windows[start:start + batch_size].to(model.tok_embeddings.weight.device)
        logits = forward_window(model, batch, prompt_len, sparse_tail=sparse, meter=meter)
        nll += float(window_nll(logits, batch, scored).sum())
        count += batch.shape[0] * scored
    return math.exp(nll / count), (meter.result() if meter else None)


# ---------------------------------------------------------------------------- CLI

def parse_levels(text: str) -> list:
    levels = [float(x) for x in text.split(",") if x.strip()]
    for p in levels:
        if not 0.0 <= p < 1.0:
            raise ValueError(f"sparsity levels must be in [0, 1), got {p}")
    return levels


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint_path", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--data", default="wiki-eval", help="wiki-eval (default), news, botchan, a file, hf:wikitext2")
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--window_len", type=int, default=512)
    parser.add_argument("--scored", type=int, default=None,
                        help="tokens scored at the end of each window (default: all for 'all', half for 'decode')")
    parser.add_argument("--paper", action="store_true", help="the paper's protocol: 128 x 2048, last 512 scored")
    parser.add_argument("--sparsity", default="", help="comma-separated levels, e.g. 0.25,0.4,0.5")
    parser.add_argument("--modes", default="greedy,uniform")
    parser.add_argument("--regimes", default="all,decode")
    parser.add_argument("--sparsity_file", type=Path, default=None, help="default: <checkpoint>/sparsity.json")
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--precision", choices=sorted(DTYPES), default=None, help="default: bf16 cuda, fp32 cpu")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--lm_eval", default="", metavar="TASKS",
                        help="comma-separated lm-eval tasks or groups instead of perplexity, e.g. wiki_local")
    parser.add_argument("--limit", type=int, default=None, help="--lm_eval: at most this many documents a task")
    parser.add_argument("--num_fewshot", type=int, default=None, help="--lm_eval: examples in each prompt")
    args = parser.parse_args(argv)
    run_cli(run, args, "running lm-eval tasks" if args.lm_eval else "evaluating perplexity")


def load_for_eval(args, levels: list, modes: list):
    """(model, tokenizer, sparsity file or None without levels); a bad level or mode is refused now,
    not after the dense pass."""
    model = load_model(args.checkpoint_path, args.device, resolve_dtype(args))
    tokenizer = load_tokenizer(args.checkpoint_path, model.args.vocab_size)
    sparsity_file = None
    if levels:
        path = args.sparsity_file or args.checkpoint_path / "sparsity.json"
        sparsity_file = SparsityFile.load(path, model, args.checkpoint_path)
        for mode in modes:
            for level in levels:
                sparsity_file.thresholds(level, mode)
    return model, tokenizer, sparsity_file


def run(args):
    if args.lm_eval:
        return run_lm_eval(args)
    if args.paper:
        args.windows, args.window_len, args.scored = 128, 2048, 512
    if args.batch_size < 1 or args.windows < 1:
        raise ValueError("--batch_size and --windows must be at least 1")
    refuse_directory(args.out, "eval.json")
    levels = parse_levels(args.sparsity)
    modes = [m for m in args.modes.split(",") if m]
    regimes = [r for r in args.regimes.split(",") if r]
    for r in regimes:
        if r not in ("all", "decode"):
            raise ValueError(f"unknown regime {r!r}; use all and/or decode")
    model, tokenizer, sparsity_file = load_for_eval(args, levels, modes)
    dtype = model.tok_embeddings.weight.dtype  # the activations'
    ids = tokenizer.encode(load_text(args.data))
    windows = token_windows(ids, args.windows, args.window_len, args.seed)
    print(f"{args.data}: {len(ids)} tokens, {len(windows)} windows x {args.window_len}", flush=True)

    def scored_for(regime):
        if args.scored is not None:
            return args.scored
        return args.window_len - 1 if regime == "all" else args.window_len // 2

    rows = []
    t0 = time.perf_counter()
    for regime in regimes:
        scored = scored_for(regime)
        ppl, _ = perplexity(model, windows, scored=scored, regime=regime, sparse=False,
                            batch_size=args.batch_size, desc=f"dense {regime}")
        rows.append(dict(regime=regime, mode="dense", level=0.0, scored=scored, perplexity=ppl))
        print(f"{regime:>6} dense          ppl {ppl:8.3f}", flush=True)
        for mode in modes:
            for level in levels:
                model.set_thresholds(sparsity_file.thresholds(level, mode).to(args.device))
                # Level 0 is dense by definition: the dense path, exact in every dtype.
                ppl, realized = perplexity(model, windows, scored=scored, regime=regime, sparse=level > 0,
                                           batch_size=args.batch_size, desc=f"{mode} {level:.2f} {regime}")
                dropped = realized.model_wide if realized else 0.0
                per_state = realized.per_state() if realized else {state: 0.0 for state in STATES}
                rows.append(dict(regime=regime, mode=mode, level=level, scored=scored, perplexity=ppl,
                                 realized=dropped, realized_per_state=per_state))
                print(f"{regime:>6} {mode:>7} {level:.2f}   ppl {ppl:8.3f}   realized {dropped:.3f}", flush=True)
    model.set_thresholds(torch.zeros_like(model.get_thresholds()))
    print(f"\nEvaluated in {time.perf_counter() - t0:.0f} s on {args.device} ({dtype})")
    print_table(rows)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = dict(checkpoint=str(args.checkpoint_path), data=args.data, windows=len(windows),
                    window_len=args.window_len, seed=args.seed, device=args.device, dtype=str(dtype))
        with atomic_write(args.out) as tmp:
            tmp.write_text(json.dumps(dict(meta=meta, results=rows), indent=2) + "\n")
        print(f"Wrote {args.out}")


def print_table(rows):
    print("\n| regime | mode | level | scored | perplexity | realized | attn_in | attn_out | mlp_in | mlp_mid |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        states = r.get("realized_per_state") or {}
        cells = " | ".join(f"{states[s]:.3f}" if s in states else "-" for s in STATES)
        realized = f"{r['realized']:.3f}" if "realized" in r else "-"
        print(f"| {r['regime']} | {r['mode']} | {r['level']:.2f} | {r['scored']} | {r['perplexity']:.3f} | "
              f"{realized} | {cells} |")



# ---------------------------------------------------------------------------- lm-eval tasks

def run_lm_eval(args):
    if importlib.util.find_spec("lm_eval") is None:
        raise ValueError("--lm_eval needs lm-evaluation-harness: pip install lm_eval==0.4.13")
    from lm_eval_adapter import LOCAL_TASK_NAMES, TealLM, check_tasks, evaluate_tasks, task_manager  # imports lm_eval

    tasks = [t for t in args.lm_eval.split(",") if t]
    if args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        raise ValueError("--batch_size and --limit must be at least 1")
    refuse_directory(args.out, "lm_eval.json")
    manager = task_manager(include_defaults=not all(t in LOCAL_TASK_NAMES for t in tasks))  # lm-eval's own: seconds
    check_tasks(tasks, manager)
    levels = [p for p in parse_levels(args.sparsity) if p > 0]  # level 0 is the dense row
    modes = [m for m in args.modes.split(",") if m] if levels else []
    model, tokenizer, sparsity_file = load_for_eval(args, levels, modes)
    dtype = model.tok_embeddings.weight.dtype  # the activations'
    lm = TealLM(model, tokenizer, batch_size=args.batch_size)

    rows = []
    meta = dict(checkpoint=str(args.checkpoint_path), tasks=tasks, limit=args.limit, num_fewshot=args.num_fewshot,
                regime="all", batch_size=args.batch_size, device=args.device, dtype=str(dtype),
                lm_eval=importlib.metadata.version("lm_eval"))
    for mode, level in [("dense", 0.0)] + [(m, p) for p in levels for m in modes]:
        thresholds = sparsity_file.thresholds(level, mode) if level > 0 else torch.zeros_like(model.get_thresholds())
        model.set_thresholds(thresholds.to(args.device))
        lm.sparse = level > 0
        t0 = time.perf_counter()
        results = evaluate_tasks(lm, tasks, manager, limit=args.limit, num_fewshot=args.num_fewshot)
        seconds = time.perf_counter() - t0
        for task, metrics in results.items():
            rows.append(dict(task=task, mode=mode, level=level, seconds=seconds, **metrics))
        print(f"{mode:>7} {level:.2f}  " + "  ".join(f"{task} {metric_summary(m)}" for task, m in results.items())
              + f"  ({seconds:.0f} s)", flush=True)
        if args.out:  # after every level: a long run that stops keeps what it measured
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with atomic_write(args.out) as tmp:
                tmp.write_text(json.dumps(dict(meta=meta, results=rows), indent=2) + "\n")
    model.set_thresholds(torch.zeros_like(model.get_thresholds()))
    print_lm_eval_table(rows)
    if args.out:
        print(f"Wrote {args.out}")


METRICS = ("acc", "acc_norm", "perplexity")  # shown first, in this order; any others after


def metric_names(rows) -> list:
    names = {k for r in rows for k in r if k not in ("task", "mode", "level", "seconds", "docs")
             and not k.endswith("_stderr")}
    return [m for m in METRICS if m in names] + sorted(names - set(METRICS))


def metric_summary(metrics: dict) -> str:
    return " ".join(f"{name} {metrics[name]:.4g}" for name in metric_names([metrics]))


def print_lm_eval_table(rows):
    names = metric_names(rows)
    print("\n| task | mode | level | docs | " + " | ".join(names) + " |")
    print("|---|---|---|---|" + "---|" * len(names))
    for r in rows:
        cells = " | ".join(f"{r[n]:.4f} ± {r[n + '_stderr']:.4f}" if n + "_stderr" in r
                           else f"{r[n]:.4f}" if n in r else "-" for n in names)
        print(f"| {r['task']} | {r['mode']} | {r['level']:.2f} | {r.get('docs', '-')} | {cells} |")


if __name__ == "__main__":
    main()
