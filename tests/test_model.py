"""The dense model against transformers' LlamaForCausalLM, the KV cache, and loading errors."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from generate import argmax_last, generate, shown_ids
from loader import load_model, random_model
from model import ModelArgs, Transformer, transformer_configs
from scripts.convert_hf_checkpoint import convert, permute_rotary

ROOT = Path(__file__).resolve().parent.parent

HF_CONFIGS = {
    # Llama-2-like: multi-head attention, untied head
    "llama2": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False, rope_theta=10000.0),
    # Llama-3.1-like: grouped-query attention and llama3 rope scaling
    "llama3": dict(num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False, rope_theta=500000.0,
                   rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                     original_max_position_embeddings=32)),
    # SmolLM2 / Llama-3.2-like: tied embeddings
    "tied": dict(num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=100000.0),
}


def make_hf_checkpoint(tmp_path, name):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=96, intermediate_size=176, num_hidden_layers=3,
                                   max_position_embeddings=256, rms_norm_eps=1e-5, **HF_CONFIGS[name])
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger weights than HF's 0.02 init, so attention and rotary really matter
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 1.0 / p.shape[-1] ** 0.5 if "embed" not in n else 1.0)
    hf_dir = tmp_path / "hf"
    hf.save_pretrained(hf_dir)
    convert(hf_dir, tmp_path / "ours")
    return hf, tmp_path / "ours"


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_logits_match_transformers(tmp_path, name):
    hf, ckpt = make_hf_checkpoint(tmp_path, name)
    model = load_model(ckpt, "cpu", torch.float32)
    assert model.args.tie_embeddings == (name == "tied")
    tokens = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(1))
    model.setup_caches(2, 64)
    ours = model(tokens, torch.arange(64))
    with torch.no_grad():
        ref = hf(tokens).logits
    # fp32 both sides; differences are summation order only.
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_rotary_permute_matters(tmp_path):
    """Without the q/k permute the logits must differ: the comparison above can fail."""
    hf, ckpt = make_hf_checkpoint(tmp_path, "llama3")
    model = load_model(ckpt, "cpu", torch.float32)
    n_q = model.args.n_head * model.args.head_dim
    with torch.no_grad():  # undo the permute of q: back to HF's rotate-half rows
        w = model.layers[0].attention.wqkv_t
        q_hf = hf.model.layers[0].self_attn.q_proj.weight
        assert torch.equal(w[:, :n_q], permute_rotary(q_hf, model.args.n_head).t())
        w[:, :n_q] = q_hf.t()
    tokens = torch.randint(0, 512, (1, 32), generator=torch.Generator().manual_seed(2))
    model.setup_caches(1, 32)
    with torch.no_grad():
        assert (model(tokens, torch.arange(32)) - hf(tokens).logits).abs().max() > 1e-2


# Real head layouts (GQA ratio, head_dim) with fewer layers and a smaller MLP and vocabulary.
SMALL_LAYOUTS = {
    "SmolLM2-135M": dict(n_layer=2, n_head=9, n_local_heads=3, dim=576, head_dim=64),
    "Llama-3-8B": dict(n_layer=2, n_head=8, n_local_heads=2, dim=1024, head_dim=128),
}


@pytest.mark.parametrize("config", sorted(SMALL_LAYOUTS))
def test_kv_cache_decode_equals_full_forward(config):
    args = dict(ModelArgs.from_name(config).to_dict(), intermediate_size=256, vocab_size=1000,
                **SMALL_LAYOUTS[config])
    torch.manual_seed(0)
    model = Transformer(ModelArgs.from_dict(args))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05) if p.dim() == 2 else p.fill_(1.0)
    model.eval()
    T, P = 24, 7
    tokens = torch.randint(0, 1000, (2, T))
    model.setup_caches(2, T)
    with torch.no_grad():
        full = model(tokens, torch.arange(T))
        model.setup_caches(2, T)
        step_logits = [model(tokens[:, :P], torch.arange(P))]
        for t in range(P, T):
            step_logits.append(model(tokens[:, t:t + 1], torch.tensor([t])))
    torch.testing.assert_close(torch.cat(step_logits, 1), full, rtol=1e-4, atol=1e-4)


def test_generate_greedy_is_deterministic_and_stops():
    model = random_model("SmolLM2-135M", "cpu", torch.float32)  # real shapes, random weights
    prompt = torch.tensor([1, 2, 3, 4, 5], dtype=torch.int)
    a = generate(model, prompt, 6)
    b = generate(model, prompt, 6)
    assert a.shape == (1, 11) and torch.equal(a, b)
    first = int(a[0, 5])
    c = generate(model, prompt, 6, stop_ids={first})
    assert c.shape[1] == 6  # stopped right after the stop token


def test_shown_text_ends_at_the_first_stop_token():
    """Row 0 of a sampled batch goes on after its stop token while other rows run: the printed text ends at
    the first one; a prepended bos is not text."""
    ids = [7, 1, 2, 3, 9, 4, 9, 5]  # prompt [7, 1, 2], then 3, stop 9, 4 ...
    assert shown_ids(ids, 3, {9}, answer_only=True) == [3]
    assert shown_ids(ids, 3, {9}, answer_only=False) == [7, 1, 2, 3]
    assert shown_ids(ids, 3, {9}, answer_only=False, skip_id=7) == [1, 2, 3]
    assert shown_ids(ids, 3, None, answer_only=True) == [3, 9, 4, 9, 5]


def test_random_weights_leave_the_global_rng_alone():
    """generate.py seeds torch before it builds the model: random weights must not reseed it, or --seed
    would no longer change what is sampled."""
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    random_model("SmolLM2-135M", "cpu", torch.bfloat16)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("V", [128256, 49152, 32000, 1000, 37])  # two stages (256, 256, 256, 8 -> one) or one
def test_argmax_last_is_torch_argmax_with_ties(V):
    g = torch.Generator().manual_seed(V)
    x = torch.randn(3, V, generator=g).to(torch.bfloat16)  # bf16: many exact ties
    x[1, V // 3] = x[1, V - 1] = x[1, 2 * V // 3] = 100.0  # a three-way tie for the maximum in row 1
    x[2] = x[2].round()  # whole numbers: ties everywhere
    expected = torch.argmax(x, dim=-1, keepdim=True).to(torch.int)
    got = argmax_last(x)
    assert got.dtype == torch.int32 and torch.equal(got, expected)
    assert int(got[1]) == V // 3


def test_all_configs_build_on_meta():
    for name, cfg in transformer_configs.items():
        args = ModelArgs.from_name(name)
        assert args.n_head % args.n_local_heads == 0, name
        with torch.device("meta"):
            model = Transformer(args)
        assert model.layers[0].attention.wqkv_t.shape == (
            args.dim, (args.n_head + 2 * args.n_local_heads) * args.head_dim), name
    assert ModelArgs.from_name("meta-llama/Meta-Llama-3-8B-Instruct").intermediate_size == 14336
    assert ModelArgs.from_name("Llama-3.1-8B").rope_scaling["factor"] == 8.0


def run_generate(*args):
    return subprocess.run([sys.executable, str(ROOT / "generate.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def test_missing_checkpoint_is_one_line_error(tmp_path):
    r = run_generate("--checkpoint_path", str(tmp_path / "nope"), "--device", "cpu")
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "not found" in lines[0], r.stderr


def test_config_weight_mismatch_is_one_line_error(tmp_path):
    _, ckpt = make_hf_checkpoint(tmp_path, "tied")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="does not match"):
        load_model(ckpt, "cpu", torch.float32)
    (ckpt / "config.json").write_text(json.dumps(dict(cfg, dim="x")))
    with pytest.raises(ValueError, match="config.json: .dim. must be a positive integer"):
        load_model(ckpt, "cpu", torch.float32)
    (ckpt / "config.json").write_text(json.dumps(cfg))
    r = run_generate("--checkpoint_path", str(ckpt), "--device", "cpu")
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1 and "does not match" in lines[0], r.stderr


def test_truncated_weights_and_unknown_device_are_one_line_errors(tmp_path):
    _, ckpt = make_hf_checkpoint(tmp_path, "tied")
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    for flags, message in (((), "not a readable safetensors file"), (("--device", "foo"), "not a device")):
        r = run_generate("--checkpoint_path", str(ckpt), "--device", "cpu", *flags)
        lines = r.stderr.strip().splitlines()
        assert r.returncode != 0 and len(lines) == 1 and message in lines[0], r.stderr


def test_convert_refuses_to_overwrite_the_snapshot(tmp_path):
    make_hf_checkpoint(tmp_path, "tied")
    with pytest.raises(ValueError, match="must differ"):
        convert(tmp_path / "hf", tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "llama"  # untouched
