"""Generate text with a Llama-architecture model, dense or TEAL-sparse, and time it.

    python generate.py --prompt "The capital of France is"
    python generate.py --sparsity 0.4 --compile
    python generate.py --random_weights Llama-3-8B --compile --device cuda
"""
import argparse
import time
from typing import Optional

import torch
from torch import Tensor

from calibrate import calibrate_random
from loader import (add_model_args, configure_inductor, load_model, random_model, resolve_dtype, run_cli,
                    synchronize)
from model import Transformer
from quantize import quantize_model
from teal import MAX_LEVEL, SparsityFile, measure_sparsity, weight_bytes_per_token
from tokenizer import load_tokenizer
from tp import broadcast_thresholds, init_distributed


# ---------------------------------------------------------------------------- sampling

def argmax_last(x: Tensor) -> Tensor:
    """torch.argmax(x, -1, keepdim=True) as int32 for x (B, V): the first index of the maximum.
    In two stages when V has a power-of-two factor c >= 16: the maximum of each of c chunks, then
    of the chunk maxima. Compiled, a single reduction over a large vocabulary runs in one program;
    the two stages spread it over many (timed in docs/kernels.md)."""
    B, V = x.shape
    c = min(256, V & -V)  # the largest power of two dividing V, at most 256
    if c < 16:
        return torch.argmax(x, dim=-1, keepdim=True).to(dtype=torch.int)
    chunk_max, chunk_idx = x.view(B, c, V // c).max(dim=-1)  # (B, c): first index within each chunk
    best = torch.argmax(chunk_max, dim=-1, keepdim=True)  # (B, 1): first chunk holding the maximum
    return (best * (V // c) + chunk_idx.gather(-1, best)).to(dtype=torch.int)


def multinomial_sample_one_no_sync(probs: Tensor) -> Tensor:
    # Exponential race: argmax(p / E) with E ~ Exp(1) samples from p without a host sync.
    q = torch.empty_like(probs).exponential_(1)
    return argmax_last(probs / q)


def logits_to_probs(logits: Tensor, temperature: float, top_k: Optional[int]) -> Tensor:
    logits = logits / max(temperature, 1e-5)
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits = torch.where(logits < v[..., -1:], -float("inf"), logits)
    return torch.softmax(logits, dim=-1)


def sample(logits: Tensor, temperature: float = 0.0, top_k: Optional[int] = None) -> Tensor:
    # logits (B, T, V) -> next token (B, 1) from the last position; temperature 0 is greedy
    last = logits[:, -1]
    if temperature <= 0:
        return argmax_last(last)
    return multinomial_sample_one_no_sync(logits_to_probs(last, temperature, top_k))


def prefill(model: Transformer, x: Tensor, input_pos: Tensor, temperature: float, top_k: Optional[int]) -> Tensor:
    # x (B, T) prompt; returns (B, 1)
    return sample(model(x, input_pos), temperature, top_k)


def decode_one_token(model: Transformer, x: Tensor, input_pos: Tensor, temperature: float,
                     top_k: Optional[int]) -> Tensor:
    # x (B, 1), input_pos (1,)
    return sample(model(x, input_pos), temperature, top_k)


@torch.no_grad()
def run_prefill(model: Transformer, prompt: Tensor, batch_size: int = 1, temperature: float = 0.0,
                top_k: Optional[int] = None, prefill_fn=prefill) -> Tensor:
    """The prompt's forward and first sample as every generation runs them: prompt (T,) -> (B, 1). Its input
    is a fresh contiguous (B, T) tensor under no_grad; a compiled prefill guards on the grad mode, the layout
    and whether the input is a view, so a caller that compiles or times the prefill through here gets the
    graph generate() runs."""
    rows = prompt.view(1, -1).repeat(batch_size, 1)  # (B, T)
    return prefill_fn(model, rows, torch.arange(0, prompt.numel(), device=prompt.device), temperature, top_k)


@torch.no_grad()
def generate(model: Transformer, prompt: Tensor, max_new_tokens: int, *, batch_size: int = 1,
             temperature: float = 0.0, top_k: Optional[int] = None, stop_ids=None,
             decode_fn=decode_one_token, prefill_fn=prefill) -> Tensor:
    """prompt (T,) -> (batch_size, T + n) with n <= max_new_tokens (fewer if every row hit a stop id)."""
    device = prompt.device
    if model.tp[1] > 1:  # the prompt's eager all-reduces must not overlap the last step's graph (tp.py)
        synchronize(device)
    T = prompt.numel()
    total = T + max_new_tokens
    model.setup_caches(max_batch_size=batch_size, max_seq_length=total)
    seq = torch.empty(batch_size, total, dtype=torch.int, device=device)
    seq[:, :T] = prompt.view(1, -1)
    next_token = run_prefill(model, prompt, batch_size, temperature, top_k, prefill_fn).clone()
    seq[:, T:T + 1] = next_token
    n = 1
    stops = torch.tensor(sorted(stop_ids), device=device) if stop_ids else None
    done = torch.zeros(batch_size, dtype=torch.bool, device=device)
    input_pos = torch.tensor([T], device=device, dtype=torch.long)
    while n < max_new_tokens:
        if stops is not None:
            done |= torch.isin(next_token.view(-1), stops)
            if bool(done.all()):
                break
        next_token = decode_fn(model, next_token.view(batch_size, 1), input_pos, temperature, top_k).clone()
        seq[:, T + n:T + n + 1] = next_token
        input_pos += 1
        n += 1
    return seq[:, :T + n]


# ---------------------------------------------------------------------------- CLI

def shown_ids(ids: list, prompt_len: int, stop_ids, answer_only: bool, skip_id: Optional[int] = None) -> list:
    """The ids of a generated row to print: the answer alone (answer_only) or the prompt and the answer, which
    ends before its first stop token; skip_id (the bos token) is not text either."""
    answer = ids[prompt_len:]
    stop = next((i for i, t in enumerate(answer) if stop_ids and t in stop_ids), len(answer))
    shown = answer[:stop] if answer_only else ids[:prompt_len] + answer[:stop]
    return [t for t in shown if t != skip_id] if skip_id is not None else shown


def ask_prompt():
    """One prompt from stdin; None (end of the loop) at end of input."""
    try:
        return input("What is your prompt? ")
    except EOFError:
        return None


def build_model(args, tp=None) -> Transformer:
    """Model from CLI args (checkpoint or random weights), sparsity applied if asked."""
    if args.sparsity is not None and not 0.0 <= args.sparsity <= MAX_LEVEL:
        raise ValueError(f"--sparsity must be in [0, 1) and at most {MAX_LEVEL}, the highest calibrated level; "
                         f"got {args.sparsity}")
    if args.sparsity is None and (args.sparsity_file or args.sparse_prefill or args.sparsity_mode):
        raise ValueError("--sparsity_file, --sparsity_mode and --sparse_prefill apply to a sparsity level: "
                         "add --sparsity P")
    if getattr(args, "sparsity_mode", None) is None:  # random weights have no structure for greedy to find
        args.sparsity_mode = "uniform" if args.random_weights else "greedy"
    if args.quantize and not args.random_weights:
        raise ValueError(f"--quantize applies to --random_weights; quantize a checkpoint once with `python quantize.py "
                         f"--checkpoint_path {args.checkpoint_path} --mode {args.quantize}` and load the result")
    dtype = resolve_dtype(args)
    if args.random_weights:
        model = random_model(args.random_weights, args.device, dtype, tp=tp)
        if args.quantize:
            quantize_model(model, args.quantize, args.groupsize)
    else:
        model = load_model(args.checkpoint_path, args.device, dtype, tp=tp)
    if args.sparsity is not None:
        path = args.sparsity_file or (None if args.random_weights else args.checkpoint_path / "sparsity.json")
        sparsity = SparsityFile.load(path, model, None if args.random_weights else args.checkpoint_path) if path \
            else calibrate_random(model, greedy_seqs=4 if args.sparsity_mode == "greedy" else 0)
        if args.random_weights and sparsity.model.get("sha256"):
            raise ValueError(f"{path} was calibrated on a checkpoint's weights, not on random ones: drop "
                             f"--sparsity_file (random weights calibrate on random tokens at startup)")
        model.set_thresholds(sparsity.thresholds(args.sparsity, args.sparsity_mode).to(args.device))
        broadcast_thresholds(model)  # random-token calibration may differ per rank: use rank 0's
        # Level 0 is dense by definition: take the dense path, exact in every dtype.
        model.sparse_decode = args.sparsity > 0
        model.sparse_prefill = args.sparse_prefill and args.sparsity > 0
    return model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    parser.add_argument("--interactive", action="store_true", help="chat in a loop, reading prompts from stdin")
    parser.add_argument("--num_samples", type=int, default=5)
    parser.add_argument("--max_new_tokens", type=int, default=100)
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    parser.add_argument("--top_k", type=int, default=200)
    parser.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    parser.add_argument("--compile_prefill", action="store_true", help="also compile the prompt forward")
    parser.add_argument("--ignore_eos", action="store_true", help="always generate max_new_tokens (benchmarking)")
    parser.add_argument("--seed", type=int, default=1234)
    add_model_args(parser)
    run_cli(run, parser.parse_args(argv), "generating")


def run(args):
    torch.manual_seed(args.seed)
    if args.batch_size < 1 or args.max_new_tokens < 1 or (args.top_k is not None and args.top_k < 1):
        raise ValueError("--batch_size, --max_new_tokens and --top_k must be at least 1")
    rank, world, args.device = init_distributed(args.device)
    t0 = time.perf_counter()
    model = build_model(args, tp=(rank, world) if world else None)
    synchronize(args.device)
    print(f"Loaded {'random ' + args.random_weights if args.random_weights else args.checkpoint_path} "
          f"in {time.perf_counter() - t0:.2f} s on {args.device}", flush=True)
    tokenizer = None if args.random_weights else load_tokenizer(args.checkpoint_path, model.args.vocab_size)

    decode_fn, prefill_fn = decode_one_token, prefill
    if args.compile:
        configure_inductor()
        on_cuda = str(args.device).startswith("cuda")
        # fullgraph on one CPU process too: the CPU kernels are custom ops, so the step is one graph
        decode_fn = torch.compile(decode_one_token, mode="reduce-overhead" if on_cuda else None,
                                  fullgraph=on_cuda or not world)
        if args.compile_prefill:
            prefill_fn = torch.compile(prefill, fullgraph=on_cuda, dynamic=True)

    def encode(text):
        if tokenizer is None:  # random weights: a fixed pseudo-prompt of the same length as gpt-fast's benchmark
            return torch.randint(0, model.args.vocab_size, (5,), generator=torch.Generator().manual_seed(0))
        ids = tokenizer.encode_chat(text) if (args.chat or args.interactive) else tokenizer.encode(text, bos=True)
        if not ids:
            raise ValueError("the prompt encodes to no tokens; give a non-empty --prompt")
        return torch.tensor(ids, dtype=torch.int)

    stop_ids = None if (args.ignore_eos or tokenizer is None) else tokenizer.stop_ids
    weight_bytes = weight_bytes_per_token(model)
    level = "dense" if args.sparsity is None else f"{args.sparsity:.2f} {args.sparsity_mode}"
    prompts = iter(ask_prompt, None) if args.interactive else \
        ([args.prompt] * (args.num_samples + (1 if args.compile else 0)))
    stats = []
    for i, text in enumerate(prompts):
        warmup = args.compile and not args.interactive and i == 0
        prompt = encode(text).to(args.device)
        synchronize(args.device)
        t0 = time.perf_counter()
        seq = generate(model, prompt, args.max_new_tokens, batch_size=args.batch_size,
                       temperature=args.temperature, top_k=args.top_k, stop_ids=stop_ids,
                       decode_fn=decode_fn, prefill_fn=prefill_fn)
        synchronize(args.device)
        elapsed = time.perf_counter() - t0
        if warmup:
            print(f"Compilation time: {elapsed:.2f} s", flush=True)
            continue
        new_tokens = seq.shape[1] - prompt.numel()
        if tokenizer is not None:  # chat shows the answer alone; the text ends before the first stop token
            print(tokenizer.decode(shown_ids(seq[0].tolist(), prompt.numel(), stop_ids, args.chat or args.interactive,
                                             skip_id=tokenizer.bos_id if tokenizer.add_bos else None)))
        realized = None
        if model.sparse_decode:
            realized = measure_sparsity(model, seq[:1], prompt.numel())
            weight_bytes = weight_bytes_per_token(model, realized.per_projection)
        tok_s = new_tokens * args.batch_size / elapsed
        stats.append(tok_s)
        per_rank = f" per rank ({world} ranks)" if world else ""
        line = f"Sample {len(stats)}: {new_tokens} tokens in {elapsed:.2f} s, {tok_s:.2f} tokens/s, " \
               f"{weight_bytes * tok_s / args.batch_size / 1e9:.1f} GB/s of weights{per_rank}, sparsity {level}"
        if realized is not None:
            line += f" (realized {realized.model_wide:.3f})"
        print(line, flush=True)
        if args.interactive:
            print()
    if stats:
        mean = sum(stats) / len(stats)
        print(f"Average tokens/s: {mean:.2f}  ({level}, batch {args.batch_size}, {args.device})")
        if str(args.device).startswith("cuda"):
            print(f"Memory used: {torch.cuda.max_memory_allocated() / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
