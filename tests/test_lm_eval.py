"""lm_eval_adapter.py: lm-eval's LM interface over the embedded model (SmolLM2-135M-Instruct), and a
local task run through lm-eval end to end. CI installs lm-eval (requirements-dev.txt)."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402

from data import load_text, token_windows  # noqa: E402
from eval import window_nll  # noqa: E402
from lm_eval_adapter import TealLM, evaluate_tasks, rolling_requests, task_manager  # noqa: E402
from loader import load_model  # noqa: E402
from teal import forward_window  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def smollm2_lm(smollm2_checkpoint):
    model = load_model(smollm2_checkpoint, "cpu", torch.float32)
    return TealLM(model, load_tokenizer(smollm2_checkpoint, model.args.vocab_size), batch_size=3)


@pytest.fixture
def at_level(smollm2_lm, smollm2_sparsity):
    """Set the model's thresholds for (level, mode); dense again afterwards."""
    def set_level(level, mode="uniform"):
        smollm2_lm.model.set_thresholds(smollm2_sparsity.thresholds(level, mode))
        smollm2_lm.sparse = level > 0

    yield set_level
    set_level(0.0)


@pytest.mark.parametrize("n, max_length", [(50, 16), (50, 50), (50, 49), (7, 64), (33, 1)])
def test_rolling_requests_score_every_token_once(n, max_length):
    ids = torch.randint(100, 1000, (n,), generator=torch.Generator().manual_seed(n + max_length)).tolist()
    seq = [7] + ids
    pairs = rolling_requests(ids, 7, max_length)
    assert [t for _, continuation in pairs for t in continuation] == ids
    scored = 0
    for context, continuation in pairs:
        assert context and len(context) + len(continuation) - 1 <= max_length  # inputs fit
        end = scored + 1 + len(continuation)  # context + continuation is the slice of seq ending there
        assert context + continuation == seq[end - len(context) - len(continuation):end]
        scored += len(continuation)
    if n > max_length:  # the last chunk sees a full window
        assert len(pairs[-1][0]) + len(pairs[-1][1]) - 1 == max_length


@pytest.mark.parametrize("level, rel", [(0.0, 1e-4), (0.5, 1e-2)])
def test_batched_scores_match_eval_window_nll(smollm2_lm, at_level, level, rel):
    """Windows of four lengths, scored in padded batches of 3, against eval.py's perplexity
    machinery run on each window alone. Sparse, rounding that differs with the batch's shape moves
    a few entries across their threshold (0.4 nats in 105 seen): a looser bound, still far below
    what scoring the wrong positions gives."""
    at_level(level)
    lm = smollm2_lm
    windows = token_windows(lm.tokenizer.encode(load_text("wiki-eval")[:20000]), 4, 48, seed=3)
    rows = [w[:n] for w, n in zip(windows, (48, 21, 40, 33))]
    scores = lm.score([(row[:1].tolist(), row[1:].tolist()) for row in rows])
    for row, (logprob, greedy) in zip(rows, scores):
        logits = forward_window(lm.model, row[None], 0, sparse_tail=level > 0)
        nll = float(window_nll(logits, row[None], len(row) - 1)[0])
        assert logprob == pytest.approx(-nll, rel=rel, abs=1e-3)
        if level == 0:
            assert greedy == bool((logits[0, :-1].argmax(-1) == row[1:]).all())


def test_rolling_loglikelihood_is_the_whole_text(smollm2_lm):
    lm = smollm2_lm
    text = load_text("wiki-eval")[:400]
    ids = torch.tensor([lm.prefix_id] + lm.tokenizer.encode(text))
    nll = float(window_nll(forward_window(lm.model, ids[None], 0, sparse_tail=False), ids[None], len(ids) - 1)[0])
    (total,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    assert total == pytest.approx(-nll, rel=1e-4)


def test_encode_pair_splits_at_the_word(smollm2_lm):
    lm, tok = smollm2_lm, smollm2_lm.tokenizer
    context, continuation = lm.encode_pair("The capital of France is", " Paris")
    assert context == tok.encode("The capital of France is") and context + continuation == tok.encode(
        "The capital of France is Paris")
    assert tok.decode(continuation) == " Paris"
    assert lm.encode_pair("The capital of France is ", "Paris") == (context, continuation)  # the space moves
    assert lm.encode_pair("", "Paris") == ([lm.prefix_id], tok.encode("Paris"))


def test_generate_until_cuts_at_the_stop_string(smollm2_lm):
    lm = smollm2_lm
    full = lm.generate_text("The capital of France is", {"max_gen_toks": 12})
    assert "Paris" in full
    stop = full.split()[1]
    cut = lm.generate_text("The capital of France is", {"until": [stop, "never there"], "max_gen_toks": 12})
    assert cut == full[:full.index(stop)] and len(cut) < len(full)


def test_local_task_end_to_end(smollm2_lm, at_level, monkeypatch):
    """wiki_ending (four choices) through lm-eval's simple_evaluate on its first 12 documents (48
    requests): dense well above chance (0.25), 90% uniform sparsity worse."""
    monkeypatch.setattr(smollm2_lm, "batch_size", 16)
    manager = task_manager(include_defaults=False)
    dense = evaluate_tasks(smollm2_lm, ["wiki_ending"], manager, limit=12)["wiki_ending"]
    at_level(0.9)
    sparse = evaluate_tasks(smollm2_lm, ["wiki_ending"], manager, limit=12)["wiki_ending"]
    assert dense["docs"] == sparse["docs"] == 12
    assert dense["acc_norm"] >= 0.5, dense
    assert sparse["acc_norm"] < dense["acc_norm"] - 0.1, (dense, sparse)


def test_unknown_task_and_bad_cli_input(smollm2_checkpoint):
    with pytest.raises(ValueError, match="unknown lm-eval task.*wiki_nonsense.*wiki_cloze"):
        evaluate_tasks(None, ["wiki_cloze", "wiki_nonsense"], task_manager(include_defaults=False))
    r = subprocess.run([sys.executable, "eval.py", "--device", "cpu", "--checkpoint_path", str(smollm2_checkpoint),
                        "--lm_eval", "wiki_cloze", "--limit", "0"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1 and "--limit must be at least 1" in lines[0], r.stderr


def test_loglikelihood_prefers_the_fact(smollm2_lm):
    requests = [Instance("loglikelihood", {}, ("The capital of France is", city), i)
                for i, city in enumerate([" Paris", " London"])]
    (paris, paris_greedy), (london, london_greedy) = smollm2_lm.loglikelihood(requests)
    assert paris > london + 1 and paris_greedy and not london_greedy
