"""calibrate.py: quantile tables, the block-wise greedy, levels, and the sparsity file's checks."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import calibrate
import teal
from calibrate import BlockProbe, MagnitudeHistogram, calibrate_random, greedy_block, projection_shares
from loader import finish_model
from teal import QUANTILE_P, SparsityFile, greedy_path, threshold_from_table
from model import PROJECTIONS, ModelArgs, Transformer

ROOT = Path(__file__).resolve().parent.parent
SMALL = dict(block_size=256, vocab_size=128, n_layer=2, n_head=4, n_local_heads=2, dim=64, intermediate_size=128)


def small_model(seed=0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(**{**SMALL, **overrides}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 1.0 / p.shape[1 if "embeddings" in name else 0] ** 0.5)
    return finish_model(model, "cpu")


def random_tokens(model, n_seq=4, seq_len=64, seed=0):
    return torch.randint(0, model.args.vocab_size, (n_seq, seq_len), generator=torch.Generator().manual_seed(seed))


def quick_calibration(model, checkpoint_dir=None, **kw):
    kw = {**dict(greedy_seqs=2, greedy_positions=16, step=0.01, progress=False), **kw}
    return calibrate.calibrate(model, random_tokens(model), checkpoint_dir=checkpoint_dir,
                               provenance=dict(source="random tokens"), **kw)


@pytest.fixture(scope="module")
def model():
    return small_model()


@pytest.fixture(scope="module")
def sparsity(model):
    return quick_calibration(model)


# ---------------------------------------------------------------------------- quantile tables

def skewed_sample(n, rng):
    """A mixture whose two sides differ: 30% negative shifted lognormal, 70% positive gamma (float32)."""
    neg = -(0.02 + rng.lognormal(-1.0, 1.2, n))
    pos = rng.gamma(0.6, 1 / 3.0, n)
    return torch.from_numpy(np.where(rng.random(n) < 0.3, neg, pos)).float()


def test_quantile_table_reproduces_fractions_on_fresh_samples():
    rng = np.random.default_rng(0)
    hist = MagnitudeHistogram("cpu")
    for _ in range(8):  # streamed in chunks, as the observer sees activations
        hist.add(skewed_sample(250_000, rng).view(500, 500))
    table = np.array([float(f"{q:.4g}") for q in hist.quantiles(QUANTILE_P).tolist()])  # as stored
    assert table[0] == 0.0 and np.all(np.diff(table) >= 0)
    fresh = skewed_sample(2_000_000, rng).abs()
    for p in (0.01, 0.1, 0.25, 0.4, 0.5, 0.6, 0.75, 0.9, 0.95, 0.99):
        t = float(threshold_from_table(table, p))
        dropped = float((fresh <= t).double().mean())  # TEAL drops |x| <= t
        assert abs(dropped - p) < 0.002, (p, dropped)
    assert threshold_from_table(table, 0.0) == 0.0


def test_histogram_quantiles_match_exact_quantiles():
    x = skewed_sample(400_000, np.random.default_rng(1))
    hist = MagnitudeHistogram("cpu")
    hist.add(x)
    p = torch.tensor([0.05, 0.3, 0.5, 0.8, 0.99], dtype=torch.float64)
    exact = torch.quantile(x.abs().double(), p)
    torch.testing.assert_close(hist.quantiles(p), exact, rtol=5e-3, atol=0)


# ---------------------------------------------------------------------------- the greedy

def probe_for(model, layer=0, seed=0):
    tokens = random_tokens(model, n_seq=2, seq_len=48, seed=seed)
    model.setup_caches(2, 48)
    x = model.tok_embeddings(tokens)
    for block in model.layers[:layer]:
        pos = torch.arange(48)
        x = block(x, model.freqs_cis[pos], torch.arange(model.max_seq_length)[None] <= pos[:, None], pos, False)
    positions = torch.tensor([0, 5, 17, 30, 47])
    return BlockProbe(model.layers[layer], x, positions, model.freqs_cis), x, positions


@torch.no_grad()
def test_block_probe_matches_the_model_block(model, sparsity):
    """The greedy's own block evaluation has the model's sparse semantics exactly."""
    probe, x, positions = probe_for(model, layer=1)
    t = sparsity.thresholds(0.5, "uniform")[1] * torch.linspace(0.8, 1.4, 7)  # seven different thresholds
    pos = torch.arange(48)
    block = model.layers[1]
    block.thresholds.copy_(t)
    try:
        ref = block(x, model.freqs_cis[pos], torch.arange(model.max_seq_length)[None] <= pos[:, None], pos, True)
    finally:
        block.thresholds.zero_()
    out = probe.full(t.tolist())["out"]
    torch.testing.assert_close(out, ref[:, positions], rtol=1e-5, atol=1e-5)
    dense = probe.full([0.0] * 7)["out"]
    assert not torch.allclose(dense, out, atol=1e-3)


def steps_to_dense_zero(increment):
    """Greedy steps that take one projection from dense to sparsity 1 (the last may be shorter)."""
    return int(np.ceil(teal.MAX_PROJECTION_SPARSITY / increment - 1e-6))


@torch.no_grad()
def test_greedy_takes_free_projections_first_when_keys_are_zero():
    """With all-zero key weights every attention score is 0: sparsifying q or k changes nothing,
    so the greedy must spend q's and then k's steps (exactly zero error) before anything else."""
    model = small_model(seed=1)
    attn = model.layers[0].attention
    n_q, n_kv, _ = attn.splits
    attn.wqkv_t[:, n_q:n_q + n_kv] = 0.0
    probe, _, _ = probe_for(model)
    table = quick_calibration(model).quantiles[0]
    shares = projection_shares(model)
    choices = greedy_block(probe, table, shares, step=0.01)
    steps_q = steps_to_dense_zero(0.01 / shares[0])
    steps_k = steps_to_dense_zero(0.01 / shares[1])
    assert choices[:steps_q + steps_k] == [0] * steps_q + [1] * steps_k, choices[:30]
    assert 0 not in choices[steps_q:] and 1 not in choices[steps_q + steps_k:]


@torch.no_grad()
def test_greedy_sparsifies_the_mlp_first_when_its_output_is_zero():
    model = small_model(seed=2)
    model.layers[0].feed_forward.w2_t.zero_()
    probe, _, _ = probe_for(model)
    table = quick_calibration(model).quantiles[0]
    choices = greedy_block(probe, table, projection_shares(model), step=0.01)
    steps_gate = steps_to_dense_zero(0.01 / projection_shares(model)[4])
    assert choices[:steps_gate] == [4] * steps_gate  # gate is tried first among equals (error exactly 0)
    assert set(choices[:3 * steps_gate]) == {4, 5, 6}


def test_greedy_path_rises_by_the_base_step_to_0_9(sparsity, model):
    shares = projection_shares(model)
    assert np.isclose(shares.sum(), 1.0) and shares[1] == shares[2] < shares[0]  # GQA: k, v smaller than q
    for choices in sparsity.data["greedy"]["choices"]:
        path = greedy_path(choices, shares, 0.01)
        block = path @ shares
        full = np.isclose(np.diff(block), 0.01, rtol=0, atol=1e-12)
        last_steps = np.isclose(path[1:][~full].max(axis=1), teal.MAX_PROJECTION_SPARSITY)
        assert full.sum() >= len(full) - 7 and np.all(last_steps)  # shorter only where a projection hits 1
        assert 0.9 - 1e-9 <= block[-1] < 0.91 and path.max() <= teal.MAX_PROJECTION_SPARSITY + 1e-9
        assert np.all(np.diff(path, axis=0) >= 0) and np.all(np.diff(block) > 0)


# ---------------------------------------------------------------------------- levels

@pytest.mark.parametrize("mode", ["uniform", "greedy"])
def test_levels_give_their_block_sparsity(sparsity, model, mode):
    shares = projection_shares(model)
    for level in (0.0, 0.1, 0.25, 0.4137, 0.5, 0.9):
        s = sparsity.sparsities(level, mode).double().numpy()
        np.testing.assert_allclose(s @ shares, level, atol=1e-6)
        t = sparsity.thresholds(level, mode)
        assert t.shape == (model.args.n_layer, len(PROJECTIONS)) and t.dtype == torch.float32
    assert torch.all(sparsity.thresholds(0.5, mode) >= sparsity.thresholds(0.4, mode))


@torch.no_grad()
@pytest.mark.parametrize("mode", ["uniform", "greedy"])
def test_level_zero_is_exactly_dense(sparsity, model, mode):
    t0 = sparsity.thresholds(0.0, mode)
    assert torch.equal(t0, torch.zeros_like(t0))
    tokens = random_tokens(model, n_seq=2, seq_len=40, seed=3)
    model.setup_caches(2, 40)
    pos = torch.arange(40)
    dense = model(tokens, pos)
    try:
        model.sparse_prefill = True
        model.set_thresholds(t0)
        level0 = model(tokens, pos)
        model.set_thresholds(sparsity.thresholds(0.5, mode))
        level5 = model(tokens, pos)
    finally:
        model.sparse_prefill = False
        model.set_thresholds(torch.zeros_like(t0))
    assert torch.equal(dense, level0)
    assert not torch.allclose(dense, level5, atol=1e-3)


@pytest.mark.parametrize("level", [1.0, -0.1, 0.95, float("nan")])
def test_levels_out_of_range_are_refused(sparsity, level):
    with pytest.raises(ValueError, match="level"):
        sparsity.thresholds(level, "greedy")


def test_unknown_mode_is_refused(sparsity):
    with pytest.raises(ValueError, match="mode"):
        sparsity.thresholds(0.5, "magic")


# ---------------------------------------------------------------------------- the file

def test_save_load_round_trip(tmp_path, sparsity, model):
    path = tmp_path / "sparsity.json"
    sparsity.save(path)
    assert path.stat().st_size < 400_000
    again = SparsityFile.load(path, model)
    assert again.modes == sparsity.modes and again.levels == sparsity.levels
    for mode in ("uniform", "greedy"):
        for level in (0.0, 0.25, 0.4137, 0.9):
            assert torch.equal(again.thresholds(level, mode), sparsity.thresholds(level, mode))
            assert torch.equal(again.sparsities(level, mode), sparsity.sparsities(level, mode))
    # the stored level tables are the same numbers the loader computes
    table = again.data["modes"]["greedy"][16]  # 0.4 = 16 x 0.025
    assert table["level"] == 0.4
    np.testing.assert_allclose(table["threshold"], again.thresholds(0.4, "greedy").numpy(), rtol=1e-3)


def test_file_for_another_model_is_refused(tmp_path, sparsity):
    path = tmp_path / "sparsity.json"
    sparsity.save(path)
    other = small_model(dim=96, n_head=4)
    with pytest.raises(ValueError, match=r"dim 64, this model has dim 96.*calibrate\.py"):
        SparsityFile.load(path, other)


def test_file_for_other_weights_is_refused(tmp_path):
    from safetensors.torch import save_file

    ckpt_a, ckpt_b = tmp_path / "a", tmp_path / "b"
    for ckpt, seed in ((ckpt_a, 0), (ckpt_b, 1)):
        ckpt.mkdir()
        save_file({k: v.contiguous() for k, v in small_model(seed=seed).state_dict().items()},
                  str(ckpt / "model.safetensors"))
    model_a = small_model(seed=0)
    sf = quick_calibration(model_a, checkpoint_dir=ckpt_a, greedy_seqs=0)
    assert len(sf.model["sha256"]) == 64 and sf.modes == ("uniform",)
    path = tmp_path / "sparsity.json"
    sf.save(path)
    SparsityFile.load(path, model_a, ckpt_a)  # its own weights: fine
    with pytest.raises(ValueError, match=r"other weights.*calibrate\.py --checkpoint_path"):
        SparsityFile.load(path, small_model(seed=1), ckpt_b)


def test_missing_and_broken_files(tmp_path, model):
    with pytest.raises(FileNotFoundError, match=r"not found.*calibrate\.py"):
        SparsityFile.load(tmp_path / "nope.json", model)
    bad = tmp_path / "bad.json"
    bad.write_text('{"hello": 1}')
    with pytest.raises(ValueError, match="not a teal-fast sparsity file"):
        SparsityFile.load(bad, model)


def test_calibrate_random_is_quick_and_complete(model):
    sf = calibrate_random(model, n_seq=2, seq_len=64, greedy_seqs=2, greedy_positions=16)
    assert sf.modes == ("uniform", "greedy") and sf.model["sha256"] is None
    assert torch.all(sf.thresholds(0.5, "greedy") >= 0) and torch.any(sf.thresholds(0.5, "uniform") > 0)


def test_cli_error_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "calibrate.py", "--checkpoint_path", str(tmp_path / "none")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1 and lines[0].startswith("error:"), r.stderr


def test_truncated_sparsity_file_is_refused(tmp_path):
    """A file whose tables cover fewer layers than it names is refused in one line, not an IndexError."""
    import json

    src = Path(__file__).resolve().parent.parent / "sparsity" / "SmolLM2-135M-Instruct.json"
    data = json.loads(src.read_text())
    for state in data["quantiles"]:
        data["quantiles"][state] = data["quantiles"][state][:-1]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with torch.device("meta"):
        model = Transformer(ModelArgs.from_name("SmolLM2-135M"))
    with pytest.raises(ValueError, match="not a teal-fast sparsity file.*layers"):
        SparsityFile.load(bad, model)


def test_weights_hash_is_remembered_until_the_file_changes(tmp_path):
    import hashlib
    import json
    import os

    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"first weights")
    assert teal.file_sha256(weights) == hashlib.sha256(b"first weights").hexdigest()
    sidecar = tmp_path / "model.safetensors.sha256.json"
    entry = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps(dict(entry, sha256="f" * 64)))  # the remembered value is what comes back
    assert teal.file_sha256(weights) == "f" * 64
    weights.write_bytes(b"other weights")  # same size, new mtime: hashed again
    os.utime(weights, ns=(entry["mtime_ns"] + 10**9, entry["mtime_ns"] + 10**9))
    assert teal.file_sha256(weights) == hashlib.sha256(b"other weights").hexdigest()
    sidecar.write_text("{broken")
    assert teal.file_sha256(weights) == hashlib.sha256(b"other weights").hexdigest()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model.safetensors", sidecar.name])  # no temp file left
