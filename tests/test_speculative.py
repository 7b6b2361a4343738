"""Speculative decoding: the greedy output is the verifier's, token for token, and the sampling rule
draws from the verifier's distribution. CPU, no Triton interpreter."""
import argparse
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from generate import (accept_greedy, accept_sampled, check_speculative_args, decode_one_token, generate,
                      multinomial_sample_one_no_sync, set_level, speculative_generate, verify_pass)
from loader import load_model, share_weights
from model import ModelArgs, Transformer

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------- the acceptance rules

def chi_square_critical(df: int, z: float = 3.09) -> float:
    """The chi-square quantile at the normal quantile z (3.09: p = 0.999), Wilson-Hilferty approximation."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


def chi_square(counts: torch.Tensor, expected_probs: torch.Tensor) -> float:
    expected = expected_probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


# A context-free target and draft over a vocabulary of 5: the distribution of each position does not
# depend on the tokens before it, so the tokens speculative sampling produces must be independent draws
# from p[0], p[1], ... whatever the draft proposes.
V = 5
P = torch.tensor([[0.40, 0.25, 0.15, 0.15, 0.05],
                  [0.05, 0.10, 0.20, 0.30, 0.35],
                  [0.20, 0.20, 0.20, 0.20, 0.20],
                  [0.10, 0.50, 0.10, 0.20, 0.10]], dtype=torch.float64)  # the target at positions 0 .. 3
Q = torch.tensor([[0.10, 0.10, 0.50, 0.20, 0.10],
                  [0.30, 0.30, 0.10, 0.10, 0.20],
                  [0.25, 0.05, 0.40, 0.05, 0.25]], dtype=torch.float64)  # the draft at positions 0 .. 2


def one_cycle(rule, k: int, offset: int, n: int):
    """n independent cycles whose first drafted position is `offset`: k drafts from Q, the rule's verdict."""
    q = Q[offset:offset + k].expand(n, k, V)
    drafts = torch.multinomial(q.reshape(-1, V), 1).view(n, k)
    accepted, nxt = rule(drafts, q.contiguous(), P[offset:offset + k + 1].expand(n, k + 1, V).contiguous())
    return drafts, accepted, nxt


def first_two_tokens(rule, k: int, n: int) -> torch.Tensor:
    """The first two tokens speculative sampling produces with k drafts a cycle, n times -> (n, 2). A
    cycle that accepts nothing yields one token, and a second cycle from position 1 the other; with
    k = 1 the second token is the bonus where the draft was kept."""
    drafts, accepted, nxt = one_cycle(rule, k, 0, n)
    first = torch.where(accepted >= 1, drafts[:, 0], nxt)
    second = torch.where(accepted >= 2, drafts[:, -1], nxt)
    drafts2, accepted2, nxt2 = one_cycle(rule, k, 1, n)  # used where the first cycle gave one token
    second = torch.where(accepted == 0, torch.where(accepted2 >= 1, drafts2[:, 0], nxt2), second)
    return torch.stack([first, second], dim=1)


def resample_from_target(drafts, draft_probs, target_probs):
    """A wrong rule for the test to catch: on a rejection, draw from p_i instead of max(0, p_i - q_i)."""
    accepted, _ = accept_sampled(drafts, draft_probs, target_probs)
    rows = target_probs[torch.arange(len(accepted)), accepted.long()]  # (n, V)
    return accepted, multinomial_sample_one_no_sync(rows).view(-1)


def joint_chi_square(rule, k: int, n: int = 40000, seed: int = 0) -> float:
    """Chi-square of the first two tokens' joint counts against p[0] x p[1] (V * V cells)."""
    torch.manual_seed(seed)
    tokens = first_two_tokens(rule, k, n)
    counts = torch.bincount(tokens[:, 0].long() * V + tokens[:, 1].long(), minlength=V * V).double()
    return chi_square(counts, torch.outer(P[0], P[1]).flatten())


@pytest.mark.parametrize("k", [1, 2])
def test_speculative_sampling_draws_from_the_target(k):
    critical = chi_square_critical(V * V - 1)
    assert joint_chi_square(accept_sampled, k) < critical
    assert joint_chi_square(resample_from_target, k) > critical  # the test can tell a wrong rule


def test_speculative_sampling_accepts_every_draft_of_the_target_itself():
    torch.manual_seed(0)
    k = 3
    p = torch.softmax(torch.randn(64, k + 1, V, dtype=torch.float64), dim=-1)
    drafts = torch.multinomial(p[:, :k].reshape(-1, V), 1).view(64, k)
    accepted, _ = accept_sampled(drafts, p[:, :k], p)
    assert torch.equal(accepted, torch.full_like(accepted, k))


def test_greedy_acceptance_is_the_agreeing_prefix():
    torch.manual_seed(0)
    targets = torch.randint(0, 3, (200, 5), dtype=torch.int)
    drafts = torch.randint(0, 3, (200, 4), dtype=torch.int)
    accepted, nxt = accept_greedy(drafts, targets)
    for d, t, a, x in zip(drafts.tolist(), targets.tolist(), accepted.tolist(), nxt.tolist()):
        n = next((i for i in range(4) if d[i] != t[i]), 4)
        assert (a, x) == (n, t[n])


# ---------------------------------------------------------------------------- the embedded model

@pytest.fixture(scope="module")
def smollm2(smollm2_checkpoint, smollm2_sparsity):
    return load_model(smollm2_checkpoint, "cpu", torch.float32), smollm2_sparsity


@pytest.fixture(scope="module")
def smollm2_fp64(smollm2_checkpoint):
    """The embedded model in fp64: its rounding cannot reach a TEAL threshold (see the sparse verifier test)."""
    return load_model(smollm2_checkpoint, "cpu", torch.float64)


def held_out_prompts(checkpoint, n: int, length: int) -> list:
    """n prompts of `length` tokens, half from held-out Wikipedia articles, half from botchan."""
    from data import load_text, token_windows
    from tokenizer import load_tokenizer

    tok = load_tokenizer(checkpoint)
    windows = [token_windows(tok.encode(load_text(source)), n // 2, length, seed=1) for source in
               ("wiki-eval", "botchan")]
    return [w.to(torch.int) for w in torch.cat(windows)]


def plain_greedy(model, prompt, n_new, thresholds):
    set_level(model, thresholds)
    return generate(model, prompt, n_new)


def check_greedy_equals_plain(model, sparsity, prompts, cases, n_new):
    """Speculative greedy against plain greedy at the verifier's level, cases (draft P, K, verifier level or
    None for dense) cycled over the prompts; the drafts must be neither all rejected nor all kept."""
    accepted = drafted = 0
    for i, prompt in enumerate(prompts):
        p, k, verify = cases[i % len(cases)]
        verify_t = None if verify is None else sparsity.thresholds(verify, "greedy")
        seq, stats = speculative_generate(model, model, prompt, n_new, speculate_k=k, verify_thresholds=verify_t,
                                          draft_thresholds=sparsity.thresholds(p, "greedy"))
        expected = plain_greedy(model, prompt, n_new, verify_t)
        assert torch.equal(seq, expected), (i, p, k, verify, seq[0, -n_new:].tolist(), expected[0, -n_new:].tolist())
        accepted, drafted = accepted + stats.accepted, drafted + stats.drafted
    assert 0 < accepted < drafted


def test_self_speculative_greedy_is_dense_greedy_on_20_prompts(smollm2, smollm2_checkpoint):
    """fp32, the dense verifier: its pass over k+1 positions and plain decode steps sum in other orders
    (logits ~4e-5 apart), far below the gaps between the top two logits on these prompts."""
    model, sparsity = smollm2
    cases = [(0.5, 2, None), (0.6, 3, None), (0.4, 4, None), (0.7, 2, None), (0.5, 3, None)]
    check_greedy_equals_plain(model, sparsity, held_out_prompts(smollm2_checkpoint, 20, 16), cases, 8)


def test_self_speculative_greedy_at_a_sparse_verifier_in_fp64(smollm2_fp64, smollm2_checkpoint, smollm2_sparsity):
    """A sparse verifier: an activation within rounding of its threshold is kept by one summation order and
    dropped by another, which moves the logits by up to ~1 in fp32 (the verify pass and decode steps sum
    in different orders), so fp32 outputs part now and then. In fp64 rounding cannot reach the
    thresholds: the tokens must be plain sparse decoding's."""
    cases = [(0.5, 3, 0.4), (0.6, 2, 0.4), (0.7, 4, 0.5)]
    check_greedy_equals_plain(smollm2_fp64, smollm2_sparsity, held_out_prompts(smollm2_checkpoint, 4, 16)[:3], cases, 8)


def test_own_draft_cache_and_separate_drafts_keep_the_output(smollm2, smollm2_checkpoint):
    """A draft with a cache of its own (the model's weights at level 0.5; then a small random model
    over the same vocabulary): still the plain greedy output. The dense model as its own draft is
    always right."""
    model, sparsity = smollm2
    prompt = held_out_prompts(smollm2_checkpoint, 2, 16)[1]
    expected = plain_greedy(model, prompt, 10, None)
    twin = share_weights(model)
    seq, stats = speculative_generate(model, twin, prompt, 10, speculate_k=3,
                                      draft_thresholds=sparsity.thresholds(0.5, "greedy"))
    assert torch.equal(seq, expected) and 0 < stats.accepted < stats.drafted

    torch.manual_seed(0)
    tiny = Transformer(ModelArgs(vocab_size=model.args.vocab_size, n_layer=2, n_head=2, dim=32,
                                 intermediate_size=64, block_size=256))
    with torch.no_grad():
        for w in tiny.parameters():
            w.normal_(0.0, 0.2)
    seq, stats = speculative_generate(model, tiny.eval(), prompt, 10, speculate_k=2)
    assert torch.equal(seq, expected) and stats.accepted < stats.drafted

    seq, stats = speculative_generate(model, twin, prompt, 10, speculate_k=4)  # the dense model drafting
    assert torch.equal(seq, expected) and stats.accepted == stats.drafted
    # Every draft kept: the draft's cache holds its last draft only through the step after the verdict.
    for ours, its in zip(model.layers, twin.layers):
        for a, b in ((ours.attention.kv_cache.k_cache, its.attention.kv_cache.k_cache),
                     (ours.attention.kv_cache.v_cache, its.attention.kv_cache.v_cache)):
            torch.testing.assert_close(b[:, :, :seq.shape[1] - 1], a[:, :, :seq.shape[1] - 1], atol=1e-4, rtol=1e-4)

    with pytest.raises(ValueError, match="tokenizer"):
        wrong = Transformer(ModelArgs(vocab_size=1000, n_layer=1, n_head=2, dim=32, block_size=256))
        speculative_generate(model, wrong, prompt, 4, speculate_k=2)


def test_self_speculative_sampling_runs_and_a_dense_draft_is_accepted(smollm2, smollm2_checkpoint):
    model, sparsity = smollm2
    prompt = held_out_prompts(smollm2_checkpoint, 2, 16)[0]
    torch.manual_seed(0)
    seq, stats = speculative_generate(model, model, prompt, 10, speculate_k=3, temperature=0.8, top_k=50,
                                      draft_thresholds=sparsity.thresholds(0.5, "greedy"))
    assert seq.shape == (1, 16 + 10) and 0 < stats.accepted < stats.drafted
    assert torch.equal(seq[0, :16], prompt) and int(seq.max()) < model.args.vocab_size
    # The dense model drafting for itself: p / q is 1 up to the last bits, so every draft is kept.
    seq, stats = speculative_generate(model, model, prompt, 10, speculate_k=3, temperature=0.8, top_k=50)
    assert stats.accepted == stats.drafted


def run_generate(*flags):
    return subprocess.run([sys.executable, "generate.py", "--device", "cpu", "--num_samples", "1", *flags],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("flags, message", [
    (dict(speculate_k=2), "--draft_sparsity P"),
    (dict(draft_sparsity=0.5), "add --speculate_k"),
    (dict(speculate_k=0, draft_sparsity=0.5), "at least 1"),
    (dict(speculate_k=2, draft_sparsity=0.95), "--draft_sparsity must be"),
    (dict(speculate_k=2, draft_sparsity=0.5, batch_size=2), "--batch_size 1"),
])
def test_speculative_flags_are_checked(flags, message):
    args = argparse.Namespace(**{**dict(speculate_k=None, draft_sparsity=None, draft_checkpoint_path=None,
                                        batch_size=1), **flags})
    with pytest.raises(ValueError, match=message):
        check_speculative_args(args)


def test_speculative_cli_bad_input_is_one_line():
    r = run_generate("--speculate_k", "2")
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1 and "--draft_sparsity P" in lines[0], r.stderr


def test_speculative_cli_with_a_draft_checkpoint(smollm2_checkpoint, tmp_path):
    """The model as its own draft checkpoint keeps every draft; a draft with other tokenizer files is refused."""
    r = run_generate("--checkpoint_path", str(smollm2_checkpoint), "--max_new_tokens", "6", "--speculate_k", "3",
                     "--draft_checkpoint_path", str(smollm2_checkpoint))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Paris" in r.stdout and "100.0% of drafts accepted" in r.stdout, r.stdout
    other = tmp_path / "draft"
    other.mkdir()
    for name in ("config.json", "model.safetensors"):
        (other / name).symlink_to(smollm2_checkpoint / name)
    (other / "tokenizer_bpe.json").write_text("{}")
    r = run_generate("--checkpoint_path", str(smollm2_checkpoint), "--speculate_k", "3",
                     "--draft_checkpoint_path", str(other))
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1 and "share the model's tokenizer" in lines[0], r.stderr


# ---------------------------------------------------------------------------- scripts/bench_speculative.py

def test_acceptance_replay_counts_what_speculative_generate_does(smollm2_fp64, smollm2_checkpoint, smollm2_sparsity):
    """The benchmark's replay of the draft on the verifier's greedy run gives the cycles and accepted drafts
    of speculative_generate itself, for every K from one replay. In fp64: in fp32 the replay's cache and
    a run's differ in the last bits, enough to move a sparse draft's activation across a threshold."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_speculative import cache_snapshot, cycles_of, draft_runs

    model, sparsity = smollm2_fp64, smollm2_sparsity
    prompt, n_new, max_k = held_out_prompts(smollm2_checkpoint, 2, 16)[0], 8, 3
    draft = sparsity.thresholds(0.5, "greedy")
    seq = plain_greedy(model, prompt, n_new + max_k, None)
    runs = draft_runs(model, seq, 16, n_new, max_k, cache_snapshot(model), draft)
    for k in (2, 3):
        out, stats = speculative_generate(model, model, prompt, n_new, speculate_k=k, draft_thresholds=draft)
        replay = cycles_of(runs, k, n_new)
        assert (replay.cycles, replay.drafted, replay.accepted) == (stats.cycles, stats.drafted, stats.accepted)
        assert torch.equal(out[0], seq[0, :16 + n_new])
    assert 0 < sum(runs) < len(runs) * max_k


def test_bench_speculative_gpu_mode_runs_on_a_cpu(tmp_path):
    """The GPU mode's whole path (eager, a random SmolLM2-shaped model, one P, K and verifier level): its
    projection is the acceptance file's tokens per verify over the cycle time it measured."""
    import json

    acceptance = tmp_path / "acceptance.json"
    acceptance.write_text(json.dumps(dict(meta=dict(model="test", prompts=1, new_tokens=8), acceptance=[
        dict(verify=0.0, cache="shared", P=0.5, K=2, tokens_per_verify=2.5, acceptance_rate=0.75)])))
    out = tmp_path / "projection.json"
    r = subprocess.run([sys.executable, "scripts/bench_speculative.py", "--device", "cpu", "--config", "SmolLM2-135M",
                        "--no_compile", "--acceptance", str(acceptance), "--levels", "0.5", "--ks", "2",
                        "--verify_levels", "0", "--new_tokens", "6", "--runs", "1", "--steps", "2", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(out.read_text())
    (row,) = report["results"]
    assert row["cycle_ms"] > 0 and row["draft_step_ms"] > 0 and row["verify_ms"] > 0
    assert row["projected_tokens_per_s"] == pytest.approx(2.5 / row["cycle_ms"] * 1e3)
    assert report["best"]["0.0"]["K"] == 2 and out.with_suffix(".png").exists()


def test_bench_speculative_bound_from_a_sweep(tmp_path):
    """--bound: a cycle is K draft steps at P and one step at the verifier's level, each step the sweep's
    generation time less its prompt over the remaining tokens."""
    import json

    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_speculative import acceptance_for, main

    sweep = tmp_path / "sweep.json"
    sweep.write_text(json.dumps(dict(meta=dict(model="m", device="d", new_tokens=11), results=[
        dict(level=0.0, tokens_per_s=100.0, prefill_ms=10.0), dict(level=0.5, tokens_per_s=200.0, prefill_ms=5.0)])))
    acceptance = tmp_path / "acceptance.json"
    acceptance.write_text(json.dumps(dict(meta=dict(model="a", prompts=1, new_tokens=8), acceptance=[
        dict(verify=0.0, cache="shared", P=0.5, K=2, tokens_per_verify=2.5, acceptance_rate=0.75)])))
    out = tmp_path / "bound.json"
    main(["--bound", str(sweep), "--acceptance", str(acceptance), "--levels", "0.5", "--ks", "2,3",
          "--verify_levels", "0", "--out", str(out)])
    rows = json.loads(out.read_text())["results"]
    dense_ms, half_ms = (110 - 10) / 10, (55 - 5) / 10  # (11 tokens' time - the prompt) / 10 steps
    assert [r["cycle_ms"] for r in rows] == pytest.approx([2 * half_ms + dense_ms, 3 * half_ms + dense_ms])
    assert rows[0]["projected_tokens_per_s"] == pytest.approx(2.5 / (2 * half_ms + dense_ms) * 1e3)
    assert "projected_tokens_per_s" not in rows[1]  # no acceptance measured for K = 3
    assert acceptance_for(1 + 0.5 + 0.25, 2) == pytest.approx(0.5) and math.isnan(acceptance_for(3.5, 2))


def test_new_draft_levels_and_lengths_trace_no_new_graph():
    """A new P is a threshold copy and a new K another width of the dynamic-shape verify pass: after the
    first run at each verifier level, the traced graphs stay as they were (dynamo's eager backend: the
    guards, without inductor's compile time)."""
    from torch._dynamo.utils import counters

    from calibrate import calibrate
    from test_calibrate import random_tokens, small_model

    torch._dynamo.reset()
    model = small_model()
    sparsity = calibrate(model, random_tokens(model), greedy_seqs=0, progress=False)
    decode_fn = torch.compile(decode_one_token, backend="eager")
    verify_fn = torch.compile(verify_pass, backend="eager", dynamic=True)
    prompt = torch.tensor([5, 7, 11, 13, 17], dtype=torch.int)

    def run(p, k, verify):
        verify_t = None if verify is None else sparsity.thresholds(verify, "uniform")
        seq, _ = speculative_generate(model, model, prompt, 8, speculate_k=k, verify_thresholds=verify_t,
                                      draft_thresholds=sparsity.thresholds(p, "uniform"), decode_fn=decode_fn,
                                      verify_fn=verify_fn)
        return seq

    run(0.5, 2, None), run(0.5, 2, 0.3)  # the dense and the sparse verify pass, the sparse decode step
    traced = counters["stats"]["unique_graphs"]
    for p, k, verify in [(0.7, 3, None), (0.6, 4, 0.3), (0.8, 6, None), (0.5, 5, 0.4)]:
        run(p, k, verify)
    assert counters["stats"]["unique_graphs"] == traced
