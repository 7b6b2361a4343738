"""Convert a Hugging Face Llama/Mistral checkpoint into a teal-fast checkpoint directory.

    python scripts/convert_hf_checkpoint.py --checkpoint_dir checkpoints/meta-llama/Meta-Llama-3-8B/hf

Reads config.json and the weights (*.safetensors, sharded or not; else pytorch_model*.bin
through torch.load(weights_only=True)) of an HF snapshot, and writes into --out (default: the
snapshot's parent when the snapshot dir is named hf/, as scripts/download.py lays it out; the
snapshot itself is never overwritten):
model.safetensors (our names; block linears transposed to (K_in, N_out); q/k rows
permuted from HF's rotate-half layout to gpt-fast's interleaved pairs), config.json
(every ModelArgs field, all read from the HF config) and the tokenizer file(s).
"""
import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fileio import atomic_write, read_json_object  # noqa: E402
from loader import run_cli  # noqa: E402
from model import ModelArgs  # noqa: E402

TOKENIZER_FILES = ("tokenizer.model", "original/tokenizer.model", "tokenizer.json", "tokenizer_config.json")


def model_args_from_hf(cfg: dict) -> ModelArgs:
    """Every hyperparameter from the HF config (transformers 4 and 5 spellings). A key the HF config
    may omit takes the value transformers itself gives it (Llama and Mistral agree: no rope_theta is
    10000, as in Llama-2's config; no num_key_value_heads is no GQA; untied embeddings, which the
    weights then confirm); any other key missing is an error, never a guess."""
    def need(key):
        if key not in cfg:
            raise ValueError(f"the HF config.json has no {key!r}: is it a Llama-architecture model's?")
        return cfg[key]

    if cfg.get("model_type") not in ("llama", "mistral", None):
        raise ValueError(f"model_type {cfg.get('model_type')!r} is not a Llama-architecture model")
    rope = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or rope
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        if any(k not in scaling for k in keys):
            raise ValueError(f"the HF config's llama3 rope scaling lacks {[k for k in keys if k not in scaling]}")
        scaling = {k: scaling[k] for k in keys}
    elif kind == "default":
        scaling = None
    else:
        raise ValueError(f"unsupported rope scaling type {kind!r} (supported: default, llama3)")
    n_head = need("num_attention_heads")
    return ModelArgs(
        block_size=need("max_position_embeddings"),
        vocab_size=need("vocab_size"),
        n_layer=need("num_hidden_layers"),
        n_head=n_head,
        dim=need("hidden_size"),
        intermediate_size=need("intermediate_size"),
        n_local_heads=cfg.get("num_key_value_heads") or n_head,
        head_dim=cfg.get("head_dim") or need("hidden_size") // n_head,
        rope_base=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
        norm_eps=need("rms_norm_eps"),
        rope_scaling=scaling,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )


def read_hf_weights(src: Path) -> dict:
    from safetensors.torch import load_file

    shards = sorted(src.glob("*.safetensors"))
    if shards:
        state = {}
        for shard in shards:
            state.update(load_file(str(shard)))
        return state
    bins = sorted(src.glob("pytorch_model*.bin"))
    if not bins:
        raise FileNotFoundError(f"no *.safetensors or pytorch_model*.bin in {src}")
    state = {}
    for shard in bins:
        state.update(torch.load(shard, map_location="cpu", weights_only=True, mmap=True))
    return state


def permute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF rotate-half rows (first half | second half of each head) -> adjacent (2j, 2j+1) pairs."""
    out_dim, in_dim = w.shape
    head_dim = out_dim // n_heads
    return w.view(n_heads, 2, head_dim // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def convert_state(hf: dict, args: ModelArgs) -> dict:
    hf = {k.removeprefix("model."): v for k, v in hf.items()}

    def take(name):
        if name not in hf:
            raise ValueError(f"the checkpoint has no tensor {name!r}: is it a Llama-architecture model?")
        return hf.pop(name)

    out = {"tok_embeddings.weight": take("embed_tokens.weight"), "norm.weight": take("norm.weight")}
    for i in range(args.n_layer):
        p = f"layers.{i}."
        q = permute_rotary(take(p + "self_attn.q_proj.weight"), args.n_head)
        k = permute_rotary(take(p + "self_attn.k_proj.weight"), args.n_local_heads)
        v = take(p + "self_attn.v_proj.weight")
        out[p + "attention.wqkv_t"] = torch.cat([q, k, v]).t().contiguous()
        out[p + "attention.wo_t"] = take(p + "self_attn.o_proj.weight").t().contiguous()
        gate, up = take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")
        out[p + "feed_forward.w13_t"] = torch.cat([gate, up]).t().contiguous()
        out[p + "feed_forward.w2_t"] = take(p + "mlp.down_proj.weight").t().contiguous()
        out[p + "attention_norm.weight"] = take(p + "input_layernorm.weight")
        out[p + "ffn_norm.weight"] = take(p + "post_attention_layernorm.weight")
    head = hf.pop("lm_head.weight", None)
    if not args.tie_embeddings:
        if head is None:
            raise ValueError("config says untied embeddings but the checkpoint has no lm_head.weight")
        out["output.weight"] = head
    leftover = [k for k in hf if not k.endswith("rotary_emb.inv_freq")]
    if leftover:
        raise ValueError(f"unexpected tensors in the checkpoint: {leftover[:5]}")
    return out


def convert(src: Path, out: Path, dtype=None):
    from safetensors.torch import save_file

    if Path(src).resolve() == Path(out).resolve():
        raise ValueError(f"--out must differ from the HF snapshot {src}: converting in place would overwrite "
                         f"its config.json and weights")
    config_path = src / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: download the model first (scripts/download.py)")
    args = model_args_from_hf(read_json_object(config_path, "download the model again"))
    print(f"Converting {src} ({args.n_layer} layers, dim {args.dim}) ...", flush=True)
    state = convert_state(read_hf_weights(src), args)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    out.mkdir(parents=True, exist_ok=True)
    # Each file whole or not at all (an interrupted run leaves no half file), config.json last: a
    # folder with a config.json was converted to the end.
    with atomic_write(out / "model.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    write_tokenizer(src, out)
    with atomic_write(out / "config.json") as tmp:
        tmp.write_text(json.dumps(args.to_dict(), indent=2) + "\n")
    print(f"Wrote {out}/model.safetensors and config.json", flush=True)


def write_tokenizer(src: Path, out: Path):
    """Copy the tokenizer files (over older ones: a folder converted into again must not keep another
    model's tokenizer); a byte-level BPE that only has tokenizer.json (SmolLM2 on the hub) is also
    written as tokenizer_bpe.json, the form tokenizer.py reads first, so an old one is removed otherwise."""
    written = set()
    for name in TOKENIZER_FILES:  # in order of preference: tokenizer.model before original/tokenizer.model
        dest = out / Path(name).name
        if (src / name).is_file() and dest.name not in written:
            with atomic_write(dest) as tmp:
                shutil.copy(src / name, tmp)
            written.add(dest.name)
    has_model = (src / "tokenizer.model").is_file() or (src / "original/tokenizer.model").is_file()
    if not has_model and (src / "tokenizer.json").is_file():
        spec = bpe_spec_from_hf(src)
        with atomic_write(out / "tokenizer_bpe.json") as tmp:
            tmp.write_text(json.dumps(spec) + "\n")
    else:
        (out / "tokenizer_bpe.json").unlink(missing_ok=True)


def bpe_spec_from_hf(src: Path) -> dict:
    """HF tokenizer.json (+ tokenizer_config.json) of a GPT-2 byte-level BPE -> tokenizer_bpe.json:
    tokens by id with their kind (3 = special, 1 = normal), merges, bos/eos, chat template."""
    tok = json.loads((src / "tokenizer.json").read_text())
    cfg_path = src / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    model, pre = tok.get("model") or {}, json.dumps(tok.get("pre_tokenizer"))
    if model.get("type") != "BPE" or '"ByteLevel"' not in pre:
        raise ValueError(f"{src}/tokenizer.json is not a byte-level BPE tokenizer; convert from GGUF instead")
    if '"Split"' in pre:  # a custom split regex (e.g. Llama-3's): only GGUF's named pre-tokenizers are known
        raise ValueError(f"{src}/tokenizer.json splits with a custom regex; convert from GGUF instead")
    pre_name = "smollm" if '"individual_digits": true' in pre else "gpt-2"
    vocab = dict(model["vocab"])
    special = {t["content"] for t in tok.get("added_tokens", []) if t.get("special")}
    vocab.update({t["content"]: t["id"] for t in tok.get("added_tokens", [])})
    tokens = [None] * (max(vocab.values()) + 1)
    for token, i in vocab.items():
        tokens[i] = token
    if None in tokens:
        raise ValueError(f"{src}/tokenizer.json leaves token id {tokens.index(None)} unassigned")

    def token_id(entry):
        name = entry.get("content") if isinstance(entry, dict) else entry
        return vocab.get(name) if name else None

    return dict(format="gguf-gpt2-bpe", pre=pre_name, tokens=tokens,
                token_types=[3 if t in special else 1 for t in tokens],
                merges=[m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])],
                bos_id=token_id(cfg.get("bos_token")), eos_id=token_id(cfg.get("eos_token")),
                add_bos=bool(cfg.get("add_bos_token", False)), chat_template=cfg.get("chat_template"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint_dir", type=Path, required=True, help="HF snapshot directory")
    parser.add_argument("--out", type=Path, default=None,
                        help="output directory (default: the parent of --checkpoint_dir if that is named hf)")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None, help="cast weights (default: keep)")
    args = parser.parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, None: None}[args.dtype]
    out = args.out or (args.checkpoint_dir.parent if args.checkpoint_dir.name == "hf" else None)
    if out is None:
        sys.exit("error: give --out, a directory other than the HF snapshot (or name the snapshot dir hf/)")
    args.out, args.dtype = out, dtype
    run_cli(run, args, "converting the checkpoint")


def run(args):
    convert(args.checkpoint_dir, args.out, args.dtype)


if __name__ == "__main__":
    main()
