"""The embedded default model (SmolLM2-135M-Instruct) end to end: text, chat, perplexity, sparsity."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from eval import perplexity
from generate import generate
from loader import load_model

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def smollm2(smollm2_checkpoint):
    from tokenizer import load_tokenizer

    return load_model(smollm2_checkpoint, "cpu", torch.float32), load_tokenizer(smollm2_checkpoint)


def greedy_text(model, tokenizer, ids, n=20):
    seq = generate(model, torch.tensor(ids, dtype=torch.int), n, stop_ids=tokenizer.stop_ids)
    return tokenizer.decode(seq[0, len(ids):].tolist())


def test_france_and_chat(smollm2):
    model, tok = smollm2
    assert "Paris" in greedy_text(model, tok, tok.encode("The capital of France is", bos=True))
    answer = greedy_text(model, tok, tok.encode_chat("What is the capital of Germany?"), n=30)
    assert "Berlin" in answer, answer


def test_perplexity_in_expected_range(smollm2):
    """The design page expects about 25 on 64 x 512 held-out Wikipedia tokens; a broken rotary layout gives ~300.
    Here 8 windows to keep CI fast; the README reports 16 windows."""
    from data import load_text, token_windows

    model, tok = smollm2
    windows = token_windows(tok.encode(load_text("wiki-eval")), 8, 512, seed=0)
    ppl, _ = perplexity(model, windows, scored=511, regime="all", sparse=False, batch_size=4)
    assert 12 < ppl < 45, ppl


def test_level_zero_is_exactly_dense(smollm2, smollm2_sparsity, monkeypatch):
    """Level 0 (every nonzero entry kept) is bitwise the dense forward, in the reference and in the CPU
    kernel (which this short prompt's matvecs take: at most 8 rows), each with its own sums."""
    model, tok = smollm2
    ids = torch.tensor([tok.encode("Sparse activations make decoding faster because", bos=True)])
    assert ids.shape[1] <= 8  # the CPU kernel's rows
    model.setup_caches(1, ids.shape[1])
    pos = torch.arange(ids.shape[1])

    def dense_and_level(level):
        model.sparse_prefill = False
        dense = model(ids, pos)
        model.set_thresholds(smollm2_sparsity.thresholds(level, "greedy"))
        model.sparse_prefill = True
        try:
            return dense, model(ids, pos)
        finally:
            model.sparse_prefill = False
            model.set_thresholds(torch.zeros_like(model.get_thresholds()))

    dense, sparse0 = dense_and_level(0.0)
    assert torch.equal(dense, sparse0)
    assert not torch.allclose(dense, dense_and_level(0.5)[1])
    with monkeypatch.context() as m:
        m.setenv("TEAL_CPU_REFERENCE", "1")
        dense_ref, sparse0_ref = dense_and_level(0.0)
    assert torch.equal(dense_ref, sparse0_ref)
    torch.testing.assert_close(dense, dense_ref, atol=1e-3, rtol=1e-4)  # the two sum in different orders


def test_generate_cli_sparse_answers_france(smollm2_checkpoint):
    r = subprocess.run([sys.executable, "generate.py", "--device", "cpu", "--checkpoint_path", str(smollm2_checkpoint),
                        "--max_new_tokens", "15", "--num_samples", "1", "--sparsity", "0.4"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Paris" in r.stdout and "realized" in r.stdout, r.stdout


def test_generate_cli_rejects_bad_sparsity(smollm2_checkpoint):
    r = subprocess.run([sys.executable, "generate.py", "--device", "cpu", "--checkpoint_path", str(smollm2_checkpoint),
                        "--sparsity", "1.0"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1 and "[0, 1)" in lines[0], r.stderr


@pytest.mark.parametrize("mode", ["uniform", "greedy"])
def test_realized_sparsity_on_held_out_text(smollm2, smollm2_sparsity, mode):
    """Thresholds from calibration text reach the requested model-wide level on evaluation text."""
    from data import load_text, token_windows

    model, tok = smollm2
    windows = token_windows(tok.encode(load_text("wiki-eval")), 4, 512, seed=1)
    model.set_thresholds(smollm2_sparsity.thresholds(0.4, mode))
    try:
        _, realized = perplexity(model, windows, scored=511, regime="all", sparse=True, batch_size=4)
    finally:
        model.set_thresholds(torch.zeros_like(model.get_thresholds()))
    assert abs(realized.model_wide - 0.4) <= 0.02, realized.model_wide


@pytest.mark.parametrize("flags, message", [(["--prompt", ""], "no tokens"), (["--top_k", "0", "--temperature", "0.5"],
                                                                            "at least 1")])
def test_generate_cli_bad_input_is_one_line(smollm2_checkpoint, flags, message):
    r = subprocess.run([sys.executable, "generate.py", "--device", "cpu", "--checkpoint_path", str(smollm2_checkpoint),
                        "--num_samples", "1", "--max_new_tokens", "2", *flags],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1 and message in lines[0], r.stderr


def test_bench_sweep_on_random_weights(tmp_path):
    """scripts/bench_sweep.py end to end on a CPU (eager, tiny run): one JSON row per level, the prompt's
    forward timed, and the sweep's 50% level skipping about half the block weights."""
    import json

    out = tmp_path / "sweep.json"
    subprocess.run([sys.executable, str(ROOT / "scripts/bench_sweep.py"), "--config", "SmolLM2-135M", "--device", "cpu",
                    "--precision", "fp32", "--no_compile", "--levels", "0.5", "--max_new_tokens", "6", "--runs", "1",
                    "--out", str(out)], check=True, capture_output=True, text=True)
    report = json.loads(out.read_text())
    dense, half = report["results"]
    assert (dense["label"], half["label"]) == ("dense", "0.50")
    assert dense["realized"] == 0.0 and abs(half["realized"] - 0.5) < 0.05, half
    assert all(r["tokens_per_s"] > 0 and r["prefill_ms"] > 0 and r["tokens"] == 6 for r in (dense, half))
    assert half["gb_per_s_per_rank"] / half["tokens_per_s"] < 0.7 * dense["gb_per_s_per_rank"] / dense["tokens_per_s"]
    assert report["meta"]["compile_prefill"] is False and out.with_suffix(".png").exists()


def test_bench_sweep_compiles_the_prefill_that_generate_runs():
    """bench_sweep compiles --compile_prefill's prompt forward on its own (to time it apart from the decode
    step's compile): generate() must then run that graph, not trace a second one (the grad mode and the
    prompt's layout are guarded). Dynamo's eager backend: the guards without inductor's compile time."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from torch._dynamo.utils import counters

    from bench_sweep import time_prefill
    from generate import prefill
    from test_calibrate import small_model

    torch._dynamo.reset()
    model, prompt = small_model(), torch.tensor([5, 7, 11, 13, 17], dtype=torch.int)
    prefill_fn = torch.compile(prefill, backend="eager", dynamic=True)
    model.setup_caches(max_batch_size=1, max_seq_length=prompt.numel() + 4)
    time_prefill(model, prompt, prefill_fn, "cpu", runs=1)
    traced = counters["stats"]["unique_graphs"]
    assert traced >= 1
    generate(model, prompt, 4, prefill_fn=prefill_fn)
    assert counters["stats"]["unique_graphs"] == traced
