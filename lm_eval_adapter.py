"""lm-evaluation-harness over our model, dense or at any TEAL sparsity level and mode.

    python eval.py --lm_eval wiki_cloze,wiki_ending --sparsity 0.25,0.4,0.5 --modes uniform,greedy
    python eval.py --lm_eval hellaswag,arc_easy --limit 200      # hub tasks, where the hub is reachable

TealLM implements lm-eval's LM interface (loglikelihood, loglikelihood_rolling, generate_until)
over a loaded Transformer; evaluate_tasks runs lm-eval's simple_evaluate with the local tasks of
lm_eval_tasks/ (documents built by scripts/prepare_data.py) beside lm-eval's own.

Regime: every token sparse (eval.py's `all`). A loglikelihood request scores a few tokens after a
long context; in the decode regime the context would be a dense prefill and the first scored
token comes out of that prefill, so a one-token answer would be scored by the dense model at
every level. Scoring every token sparse measures the sparse model itself (TEAL's protocol), and a
batch of padded requests is then one forward. generate_until runs its prompt sparse too.
Level 0 is the dense path (sparse=False), exact in every dtype.

lm-eval is optional at runtime (pip install lm_eval==0.4.13): this module imports it, eval.py
imports this module only for --lm_eval.
"""
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM

from generate import generate
from model import Transformer
from teal import forward_window
from tokenizer import Tokenizer

LOCAL_TASKS = Path(__file__).resolve().parent / "lm_eval_tasks"  # YAML of the tasks built from data/
LOCAL_TASK_NAMES = ("wiki_cloze", "wiki_ending", "wiki_local")  # the tasks there and their group


# ---------------------------------------------------------------------------- token-level pieces

def rolling_requests(ids: list, prefix_id: int, max_length: int) -> list:
    """(context, continuation) token pairs that score every token of ids exactly once, each pair at
    most max_length + 1 tokens: chunks of max_length scored tokens, the first after prefix_id
    alone, each later one after the tokens just before it (the last chunk, shorter, gets the most)."""
    seq = [prefix_id] + list(ids)  # seq[j + 1] is ids[j]
    pairs = []
    for start in range(0, len(ids), max_length):
        end = min(start + max_length, len(ids))  # score ids[start:end] = seq[start + 1:end + 1]
        first = max(0, end - max_length)  # inputs seq[first:end], at most max_length of them
        pairs.append((seq[first:start + 1], seq[start + 1:end + 1]))
    return pairs


class TealLM(LM):
    """lm-eval's LM over our Transformer. sparse=True scores at the thresholds the model holds
    (model.set_thresholds), every token sparse; batch_size requests of similar length share a
    forward (right-padded: causal attention keeps padding out of the real positions)."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, *, sparse: bool = False, batch_size: int = 8,
                 max_length: Optional[int] = None):
        super().__init__()
        self.model, self.tokenizer, self.sparse, self.batch_size = model, tokenizer, sparse, batch_size
        self.max_length = min(max_length or model.args.block_size, model.args.block_size)
        self._device = model.tok_embeddings.weight.device  # lm-eval's LM.device
        # Conditions an empty context and the first token of a document: bos where the model's tokenizer
        # starts with one, else GPT-2-style vocabularies' document separator, else eos.
        endoftext = tokenizer.special_id("<|endoftext|>")
        self.prefix_id = tokenizer.bos_id if tokenizer.add_bos else endoftext if endoftext is not None \
            else tokenizer.eos_id
        if self.prefix_id is None:
            raise ValueError("the tokenizer has no bos, <|endoftext|> or eos token to start a document with")

    # lm-eval's interface -------------------------------------------------------------------

    def loglikelihood(self, requests) -> list:
        pairs = [self.encode_pair(context, continuation) for context, continuation in (r.args for r in requests)]
        results = self.score(pairs)
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", request.args, result)
        return results

    def loglikelihood_rolling(self, requests) -> list:
        pairs, owner = [], []
        for i, request in enumerate(requests):
            chunks = rolling_requests(self.tokenizer.encode(request.args[0]), self.prefix_id, self.max_length)
            pairs += chunks
            owner += [i] * len(chunks)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self.score(pairs)):
            totals[i] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests) -> list:
        out = []
        for request in requests:
            context, kwargs = request.args[0], dict(request.args[1] or {})
            text = self.generate_text(context, kwargs)
            self.cache_hook.add_partial("generate_until", request.args, text)
            out.append(text)
        return out

    # tokens -----------------------------------------------------------------------------

    def encode_pair(self, context: str, continuation: str) -> tuple:
        """(context ids, continuation ids). Spaces ending the context belong to the continuation
        (" word" is one token); the pair is cut from the encoding of the whole text, so a token
        spanning the boundary counts as continuation. An empty context is the prefix token."""
        if not context:
            return [self.prefix_id], self.tokenizer.encode(continuation)
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole = self.tokenizer.encode(context + continuation, bos=True)
        n_context = len(self.tokenizer.encode(context, bos=True))
        return whole[:n_context], whole[n_context:]

    @torch.no_grad()
    def score(self, pairs: list) -> list:
        """(log-probability of the continuation given the context, whether greedy decoding gives
        exactly it) for each (context ids, continuation ids) pair; the context is cut from the left
        to fit max_length inputs."""
        for context, continuation in pairs:
            if not context or not continuation:
                raise ValueError("a request needs at least one context and one continuation token")
            if len(continuation) > self.max_length:
                raise ValueError(f"a continuation of {len(continuation)} tokens exceeds the context "
                                 f"of {self.max_length}")
        seqs = [(list(c) + list(x))[-(self.max_length + 1):] for c, x in pairs]  # inputs seq[:-1]
        order = sorted(range(len(pairs)), key=lambda i: -len(seqs[i]))  # longest first: one cache size
        results = [None] * len(pairs)
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            L = len(seqs[batch[0]]) - 1
            tokens = torch.zeros(len(batch), L, dtype=torch.long)  # (B, L) right-padded with token 0
            for row, i in enumerate(batch):
                tokens[row, :len(seqs[i]) - 1] = torch.tensor(seqs[i][:-1])
            logits = forward_window(self.model, tokens.to(self.device), 0, sparse_tail=self.sparse)  # (B, L, V)
            for row, i in enumerate(batch):
                n_inputs, target = len(seqs[i]) - 1, torch.tensor(pairs[i][1], device=self.device)
                logprobs = F.log_softmax(logits[row, n_inputs - len(target):n_inputs].float(), dim=-1)  # (C, V)
                results[i] = (float(logprobs.gather(1, target[:, None]).sum()),
                              bool((logprobs.argmax(-1) == target).all()))
        return results

    # generation -------------------------------------------------------------------------

    def generate_text(self, context: str, kwargs: dict) -> str:
        """Greedy (or sampled, if asked) continuation of context up to max_gen_toks tokens or an end
        token, cut before the first of the `until` strings."""
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(kwargs.pop("max_gen_toks", 256))
        temperature = float(kwargs.pop("temperature", 0.0)) if kwargs.pop("do_sample", False) else 0.0
        if max_new >= self.max_length:
            raise ValueError(f"max_gen_toks {max_new} leaves no room for a prompt in {self.max_length} tokens")
        ids = self.tokenizer.encode(context, bos=True)[-(self.max_length - max_new):] if context else [self.prefix_id]
        prompt = torch.tensor(ids, dtype=torch.int, device=self.device)
        saved = (self.model.sparse_prefill, self.model.sparse_decode)
        self.model.sparse_prefill = self.model.sparse_decode = self.sparse
        try:
            seq = generate(self.model, prompt, max_new, temperature=temperature, top_k=kwargs.get("top_k"),
                           stop_ids=self.tokenizer.stop_ids)
        finally:
            self.model.sparse_prefill, self.model.sparse_decode = saved
        new = seq[0, len(ids):].tolist()
        end = next((i for i, t in enumerate(new) if t in self.tokenizer.stop_ids), len(new))
        text = self.tokenizer.decode(new[:end])
        cut = min((text.find(s) for s in until if s and s in text), default=len(text))
        return text[:cut]


# ---------------------------------------------------------------------------- running tasks

def task_manager(include_defaults: bool = True):
    """lm-eval's task index: the local tasks, and lm-eval's own unless include_defaults is False
    (indexing its thousands of YAML files takes seconds to a minute)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(LOCAL_TASKS), include_defaults=include_defaults)


def check_tasks(tasks: list, manager):
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown lm-eval task(s) {', '.join(unknown)}: the local ones are "
                         f"{', '.join(LOCAL_TASK_NAMES)}; lm-eval's own (hellaswag, arc_easy, mmlu, ...) are "
                         f"looked up when a task is not local")


def evaluate_tasks(lm: TealLM, tasks: list, manager, *, limit: Optional[int] = None,
                   num_fewshot: Optional[int] = None) -> dict:
    """{task: {metric: value, metric + "_stderr": value, "docs": n}} of one lm-eval run."""
    from lm_eval import simple_evaluate

    check_tasks(tasks, manager)
    out = simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                          bootstrap_iters=1000, log_samples=False)
    results = {}
    for task, metrics in out["results"].items():
        results[task] = {key.split(",")[0]: value for key, value in metrics.items()
                         if "," in key and isinstance(value, (int, float))}
        results[task]["docs"] = out["n-samples"].get(task, {}).get("effective")
    return results
