"""Generate text with a Llama-architecture model, dense or TEAL-sparse, and time it.

    python generate.py --prompt "The capital of France is"
    python generate.py --sparsity 0.4 --compile
    python generate.py --random_weights Llama-3-8B --compile --device cuda
    python generate.py --speculate_k 2 --draft_sparsity 0.5     # the model drafts at 50%, its dense self verifies
    python generate.py --speculate_k 4 --draft_checkpoint_path DIR   # a separate draft with the same tokenizer
"""
import argparse
import time
from dataclasses import dataclass
from pathlib import Path
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


# ---------------------------------------------------------------------------- speculative decoding
#
# A draft proposes k tokens with k decode steps; one verify forward over the last accepted token and
# the k drafts (T = k+1, the prompt path over the static cache) scores them all, and the drafts the
# verifier agrees with are kept, plus one token of its own. The output is the verifier's: greedy,
# token for token (up to rounding: see speculative_generate); sampling, in distribution.
# Self-speculative: draft and verifier are one model at two sparsity levels (same weights and the same
# KV cache, a threshold copy between them); classic: a separate, smaller draft model with its own cache.

def draft_one_token(model: Transformer, x: Tensor, input_pos: Tensor, temperature: float,
                    top_k: Optional[int]):
    """A sampling draft step: x (B, 1) -> (token (B, 1), the distribution it was drawn from (B, V))."""
    probs = logits_to_probs(model(x, input_pos)[:, -1], temperature, top_k)
    return multinomial_sample_one_no_sync(probs), probs


def verify_pass(model: Transformer, tokens: Tensor, input_pos: Tensor, temperature: float,
                top_k: Optional[int]) -> Tensor:
    """One forward over tokens (B, k+1) at positions input_pos (k+1,): the last accepted token and k drafts.
    It rewrites their cache entries at the verifier's level before attending. Greedy: the verifier's token
    after each position (B, k+1), chosen as decode steps choose (argmax_last); sampling: its distributions
    after each position (B, k+1, V)."""
    logits = model(tokens, input_pos)  # (B, k+1, V)
    if temperature <= 0:
        B, T, V = logits.shape
        return argmax_last(logits.view(B * T, V)).view(B, T)
    return logits_to_probs(logits, temperature, top_k)


def compile_verify(on_cuda: bool):
    """verify_pass compiled once for every width k+1 (dynamic shapes: a new K is no recompile); on CUDA
    with CUDA graphs, one recorded per width."""
    return torch.compile(verify_pass, mode="reduce-overhead" if on_cuda else None, fullgraph=on_cuda, dynamic=True)


def accept_greedy(drafts: Tensor, targets: Tensor):
    """drafts (B, k), targets (B, k+1) the verifier's greedy tokens after each position -> (accepted (B,):
    the length of the drafts' prefix the verifier agrees with, next (B,): its own token after that prefix)."""
    accepted = (drafts == targets[:, :-1]).int().cumprod(dim=1).sum(dim=1)  # (B,)
    return accepted, targets.gather(1, accepted.long()[:, None]).squeeze(1)


def accept_sampled(drafts: Tensor, draft_probs: Tensor, target_probs: Tensor):
    """Speculative sampling. drafts (B, k) drawn from draft_probs (B, k, V); target_probs (B, k+1, V) the
    verifier's distributions after each position. Draft i is kept with probability min(1, p_i(x) / q_i(x))
    while every draft before it was; at the first rejection the next token is drawn from
    normalize(max(0, p_i - q_i)), after k acceptances from p_k (the bonus token). Every token produced is
    then distributed as the verifier's alone would draw it. Returns (accepted (B,), next (B,))."""
    B, k = drafts.shape
    index = drafts.long()[..., None]  # (B, k, 1)
    p = target_probs[:, :k].gather(-1, index).squeeze(-1)  # (B, k): p_i(x_i)
    q = draft_probs.gather(-1, index).squeeze(-1)  # (B, k): q_i(x_i) > 0, as x_i was drawn from q_i
    keep = torch.rand_like(p) * q < p  # u < p / q with u ~ U[0, 1)
    accepted = keep.int().cumprod(dim=1).sum(dim=1)  # (B,)
    residual = (target_probs[:, :k] - draft_probs).clamp_min(0)  # (B, k, V), unnormalized
    choices = torch.cat([residual, target_probs[:, k:]], dim=1)  # (B, k+1, V): row i after i acceptances
    weights = choices.gather(1, accepted.long()[:, None, None].expand(B, 1, choices.shape[-1])).squeeze(1)
    return accepted, multinomial_sample_one_no_sync(weights).view(B)  # the race needs no normalization


@dataclass
class SpeculativeStats:
    cycles: int = 0  # verify passes
    drafted: int = 0  # draft tokens proposed
    accepted: int = 0  # draft tokens the verifier kept

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / max(1, self.drafted)

    @property
    def tokens_per_verify(self) -> float:
        """Tokens each cycle produced: the accepted drafts and the verifier's own token."""
        return (self.accepted + self.cycles) / max(1, self.cycles)


def set_level(model: Transformer, thresholds: Optional[Tensor], sparse_prefill: bool = False):
    """Decode at these thresholds (n_layer, 7; None: dense), the prompt too if sparse_prefill, as generate()
    runs a level. A copy into the threshold buffers: compiled graphs stay valid."""
    model.sparse_decode = thresholds is not None
    model.sparse_prefill = sparse_prefill and thresholds is not None
    if thresholds is not None:
        model.set_thresholds(thresholds)


@torch.no_grad()
def speculative_generate(model: Transformer, draft_model: Transformer, prompt: Tensor, max_new_tokens: int, *,
                         speculate_k: int, verify_thresholds: Optional[Tensor] = None,
                         draft_thresholds: Optional[Tensor] = None, sparse_prefill: bool = False,
                         temperature: float = 0.0, top_k: Optional[int] = None, stop_ids=None,
                         decode_fn=decode_one_token, draft_fn=draft_one_token, verify_fn=verify_pass,
                         prefill_fn=prefill):
    """prompt (T,) -> ((1, T + n), SpeculativeStats) with n <= max_new_tokens, the tokens the verifier
    (model at verify_thresholds; None: dense) generates, fewer if a stop id came. draft_model proposes
    speculate_k tokens a cycle (fewer where fewer are missing) at draft_thresholds: `model` itself
    (self-speculative, one shared KV cache)
    or another model (its own cache; the same vocabulary). Greedy drafts are decode_fn steps, sampled
    ones draft_fn steps; the verification is one verify_fn forward. The prompt runs as generate() runs
    it (dense unless sparse_prefill), and the model is left at the verify level, as set_level leaves it.

    Levels: drafts are decode steps (T == 1, model.sparse_decode), the verify pass a multi-position forward
    (model.sparse_prefill), so one model holds both levels at once and its thresholds are copied between
    them only when both are sparse.

    Shared cache: a draft step writes its (sparse) k/v at its position; the verify pass rewrites positions
    pos .. pos+k with the verifier's k/v before attending. Of those, the accepted prefix pos .. pos+n is
    exactly what plain decoding leaves there; the rest are masked out (beyond the next step's position)
    until the next cycle's draft steps and verify pass rewrite them. An own draft cache holds the draft's
    k/v of every accepted token: its steps wrote pos .. pos+k-1, and after k acceptances one more draft
    step writes d_k at pos+k.

    Greedy exactness: the verify pass (T = k+1, the prompt path) and a decode step (T == 1) compute the
    same function in other summation orders (matmul blocking depends on the row count; SDPA against the
    decode attention), so their logits differ in the last bits (~4e-5 on the embedded model in fp32).
    A dense verifier's tokens differ only where its top two logits are that close. A sparse verifier's can differ
    more often: an activation within rounding of its threshold is kept by one order and dropped by the
    other, which moves the logits by up to ~1, so the output is the sparse verifier's greedy output as
    its multi-position pass computes it and parts from plain sparse decoding now and then (in fp64,
    where rounding cannot reach a threshold, the two are token for token the same: the tests)."""
    if prompt.dim() != 1 or prompt.numel() == 0:
        raise ValueError("speculative decoding takes one non-empty prompt (T,)")
    if speculate_k < 1:
        raise ValueError(f"--speculate_k must be at least 1, got {speculate_k}")
    if draft_model.args.vocab_size != model.args.vocab_size:
        raise ValueError(f"the draft model has {draft_model.args.vocab_size} tokens, the model "
                         f"{model.args.vocab_size}: the draft must share the model's tokenizer")
    device = prompt.device
    shared = draft_model is model
    T = prompt.numel()
    for m in {id(model): model, id(draft_model): draft_model}.values():  # the cache generate() sets up, whatever K
        m.setup_caches(max_batch_size=1, max_seq_length=T + max_new_tokens)
    loaded = {}  # id(model) -> the thresholds in its buffers

    def at_level(m, thresholds, steps: bool):
        """m's next forwards, decode steps (steps) or multi-position passes, at thresholds (None: dense)."""
        if steps:
            m.sparse_decode = thresholds is not None
        else:
            m.sparse_prefill = thresholds is not None
        if thresholds is not None and loaded.get(id(m)) is not thresholds:
            m.set_thresholds(thresholds)
            loaded[id(m)] = thresholds

    def run_prompt(m, thresholds):
        at_level(m, thresholds if sparse_prefill else None, steps=False)
        return run_prefill(m, prompt, 1, temperature, top_k, prefill_fn).clone()  # (1, 1)

    if not shared:  # the draft's own cache needs the prompt too
        run_prompt(draft_model, draft_thresholds)
    cur = run_prompt(model, verify_thresholds)
    out = [int(cur)]
    stops = set(stop_ids or ())
    stats = SpeculativeStats()
    greedy = temperature <= 0
    pos = T  # cur's position: not yet in any cache
    while len(out) < max_new_tokens and out[-1] not in stops:
        k = min(speculate_k, max_new_tokens - len(out))  # no drafts past the last token: pos + k < T + max_new_tokens
        at_level(draft_model, draft_thresholds, steps=True)
        base = torch.tensor([pos], device=device)
        tok, drafts, qs = cur, [], []
        for i in range(k):
            if greedy:
                tok = decode_fn(draft_model, tok, base + i, temperature, top_k).clone()
            else:
                tok, q = draft_fn(draft_model, tok, base + i, temperature, top_k)
                tok = tok.clone()
                qs.append(q.clone())
            drafts.append(tok)
        at_level(model, verify_thresholds, steps=False)
        tokens = torch.cat([cur] + drafts, dim=1)  # (1, k+1)
        target = verify_fn(model, tokens, torch.arange(pos, pos + k + 1, device=device), temperature, top_k)
        if greedy:
            accepted, nxt = accept_greedy(tokens[:, 1:], target)
        else:
            accepted, nxt = accept_sampled(tokens[:, 1:], torch.stack(qs, dim=1), target)
        n, nxt, *proposed = torch.cat([accepted, nxt, tokens[0, 1:]]).tolist()  # the cycle's one host sync
        if not shared and n == k:  # the draft has not seen its last token yet
            at_level(draft_model, draft_thresholds, steps=True)
            decode_fn(draft_model, drafts[-1], base + k, temperature, top_k)
        stats.cycles, stats.drafted, stats.accepted = stats.cycles + 1, stats.drafted + k, stats.accepted + n
        for t in proposed[:n] + [nxt]:
            out.append(t)
            if t in stops or len(out) == max_new_tokens:
                break
        cur = torch.tensor([[nxt]], dtype=torch.int, device=device)
        pos += n + 1
    set_level(model, verify_thresholds, sparse_prefill)
    seq = torch.cat([prompt.to(torch.int), torch.tensor(out, dtype=torch.int, device=device)])
    return seq.view(1, -1), stats


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


def load_sparsity(args, model: Transformer) -> SparsityFile:
    """The levels of the model's sparsity file (--sparsity_file, else the checkpoint's sparsity.json);
    for random weights, calibrated on random tokens here."""
    path = args.sparsity_file or (None if args.random_weights else args.checkpoint_path / "sparsity.json")
    sparsity = SparsityFile.load(path, model, None if args.random_weights else args.checkpoint_path) if path \
        else calibrate_random(model, greedy_seqs=4 if args.sparsity_mode == "greedy" else 0)
    if args.random_weights and sparsity.model.get("sha256"):
        raise ValueError(f"{path} was calibrated on a checkpoint's weights, not on random ones: drop "
                         f"--sparsity_file (random weights calibrate on random tokens at startup)")
    return sparsity


def check_level(name: str, level: Optional[float]):
    if level is not None and not 0.0 <= level <= MAX_LEVEL:
        raise ValueError(f"{name} must be in [0, 1) and at most {MAX_LEVEL}, the highest calibrated level; "
                         f"got {level}")


def build_model(args, tp=None) -> Transformer:
    """Model from CLI args (checkpoint or random weights), sparsity applied if asked."""
    check_level("--sparsity", args.sparsity)
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
        sparsity = load_sparsity(args, model)
        model.set_thresholds(sparsity.thresholds(args.sparsity, args.sparsity_mode).to(args.device))
        broadcast_thresholds(model)  # random-token calibration may differ per rank: use rank 0's
        # Level 0 is dense by definition: take the dense path, exact in every dtype.
        model.sparse_decode = args.sparsity > 0
        model.sparse_prefill = args.sparse_prefill and args.sparsity > 0
    return model


def tokenizer_files(checkpoint_dir: Path) -> dict:
    """name -> bytes of the tokenizer files a checkpoint directory holds."""
    names = ("tokenizer_bpe.json", "tokenizer.model")
    return {n: (checkpoint_dir / n).read_bytes() for n in names if (checkpoint_dir / n).is_file()}


def check_speculative_args(args):
    if args.speculate_k is None:
        if args.draft_sparsity is not None or args.draft_checkpoint_path is not None:
            raise ValueError("--draft_sparsity and --draft_checkpoint_path choose the draft of speculative "
                             "decoding: add --speculate_k K")
        return
    if args.speculate_k < 1:
        raise ValueError(f"--speculate_k must be at least 1, got {args.speculate_k}")
    if args.draft_sparsity is None and args.draft_checkpoint_path is None:
        raise ValueError("--speculate_k needs a draft: --draft_sparsity P (the model itself at level P) or "
                         "--draft_checkpoint_path DIR (a smaller model with the same tokenizer)")
    check_level("--draft_sparsity", args.draft_sparsity)
    if args.batch_size != 1:
        raise ValueError("speculative decoding runs one sequence: use --batch_size 1")


def build_draft(args, model: Transformer):
    """(draft model, its thresholds or None, the verifier's thresholds or None) for --speculate_k:
    --draft_checkpoint_path loads a separate draft (dense, or at --draft_sparsity from its own
    sparsity.json); otherwise the draft is the model itself at --draft_sparsity."""
    verify = model.get_thresholds() if args.sparsity else None  # build_model set them
    if args.draft_checkpoint_path is None:
        draft = load_sparsity(args, model).thresholds(args.draft_sparsity, args.sparsity_mode).to(args.device)
        return model, (draft if args.draft_sparsity > 0 else None), verify
    path = args.draft_checkpoint_path
    draft_model = load_model(path, args.device, resolve_dtype(args))
    if draft_model.args.vocab_size != model.args.vocab_size or (
            not args.random_weights and tokenizer_files(path) != tokenizer_files(args.checkpoint_path)):
        raise ValueError(f"the draft in {path} has another tokenizer than {args.checkpoint_path} "
                         f"({draft_model.args.vocab_size} tokens against {model.args.vocab_size}, or other "
                         f"tokenizer files): a draft must share the model's tokenizer")
    draft = None
    if args.draft_sparsity:
        draft = SparsityFile.load(path / "sparsity.json", draft_model, path).thresholds(
            args.draft_sparsity, args.sparsity_mode).to(args.device)
    return draft_model, draft, verify


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
    parser.add_argument("--speculate_k", type=int, default=None,
                        help="speculative decoding: the draft proposes K tokens, one forward of the model checks them")
    parser.add_argument("--draft_sparsity", type=float, default=None,
                        help="self-speculative draft: the model itself at this TEAL level (the verifier runs dense, "
                             "or at --sparsity); with --draft_checkpoint_path, the draft's own level")
    parser.add_argument("--draft_checkpoint_path", type=Path, default=None,
                        help="a separate draft model with the same tokenizer (gpt-fast's speculative decoding)")
    add_model_args(parser)
    run_cli(run, parser.parse_args(argv), "generating")


def run(args):
    torch.manual_seed(args.seed)
    if args.batch_size < 1 or args.max_new_tokens < 1 or (args.top_k is not None and args.top_k < 1):
        raise ValueError("--batch_size, --max_new_tokens and --top_k must be at least 1")
    check_speculative_args(args)
    rank, world, args.device = init_distributed(args.device)
    if world and args.speculate_k:
        raise ValueError("speculative decoding runs in one process: drop torchrun or --speculate_k")
    t0 = time.perf_counter()
    model = build_model(args, tp=(rank, world) if world else None)
    speculative = build_draft(args, model) if args.speculate_k else None
    synchronize(args.device)
    print(f"Loaded {'random ' + args.random_weights if args.random_weights else args.checkpoint_path} "
          f"in {time.perf_counter() - t0:.2f} s on {args.device}", flush=True)
    tokenizer = None if args.random_weights else load_tokenizer(args.checkpoint_path, model.args.vocab_size)

    decode_fn, prefill_fn, draft_fn, verify_fn = decode_one_token, prefill, draft_one_token, verify_pass
    if args.compile:
        configure_inductor()
        on_cuda = str(args.device).startswith("cuda")
        # fullgraph on one CPU process too: the CPU kernels are custom ops, so the step is one graph
        decode_fn, draft_fn = (torch.compile(f, mode="reduce-overhead" if on_cuda else None,
                                             fullgraph=on_cuda or not world) for f in (decode_one_token, draft_one_token))
        verify_fn = compile_verify(on_cuda)
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
        if speculative:
            draft_model, draft_thresholds, verify_thresholds = speculative
            seq, spec = speculative_generate(
                model, draft_model, prompt, args.max_new_tokens, speculate_k=args.speculate_k,
                verify_thresholds=verify_thresholds, draft_thresholds=draft_thresholds,
                sparse_prefill=args.sparse_prefill, temperature=args.temperature, top_k=args.top_k,
                stop_ids=stop_ids, decode_fn=decode_fn, draft_fn=draft_fn, verify_fn=verify_fn, prefill_fn=prefill_fn)
        else:
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
        line = f"Sample {len(stats)}: {new_tokens} tokens in {elapsed:.2f} s, {tok_s:.2f} tokens/s, "
        if speculative:  # a token reads no fixed number of weight bytes here
            draft = f"draft {args.draft_checkpoint_path or 'the model'} at " \
                    f"{args.draft_sparsity or 0:.2f} {args.sparsity_mode}"
            line += f"verifier at {level}, {draft}: K={args.speculate_k}, " \
                    f"{spec.acceptance_rate:.1%} of drafts accepted, {spec.tokens_per_verify:.2f} tokens per verify"
        else:
            line += f"{weight_bytes * tok_s / args.batch_size / 1e9:.1f} GB/s of weights{per_rank}, sparsity {level}"
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
