"""Weight-only quantization of a checkpoint, combined with TEAL sparsity in the same kernels.

    python quantize.py --checkpoint_path checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct --mode int8
    python quantize.py --checkpoint_path DIR --mode int4 --groupsize 128

int8: symmetric, one scale per output column (w = q * scale, q in -127..127).
int4: per group of `groupsize` input rows and per output column, a scale and an offset
      (w = q * scale + zero, q in 0..15: the group's minimum and maximum map to 0 and 15), two
      values a byte along the output axis, so that a kept input row is one contiguous run of bytes.
Every block projection (q/k/v, o, gate/up, down) is quantized, and the LM head too. A tied head
gets an int8 copy of the embedding table (transposed, like a block's W^T; int8 in both modes: an
int4 head cost SmolLM2-135M 10% perplexity, the int8 one 0.3%), which the logits read; the table
itself stays in the checkpoint's dtype for the token lookups, as do the norms.

Writes a new checkpoint directory beside the original (default DIR-int8, DIR-int4-g128):
model.safetensors, config.json (recording the mode) and the tokenizer files. generate.py, eval.py,
calibrate.py, tp.py and the benchmarks load it like any checkpoint. Its sparsity file is
calibrated on the quantized model: `python calibrate.py --checkpoint_path DIR-int8`.
"""
import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from fileio import atomic_write
from loader import load_model, read_checkpoint_config, run_cli
from model import QUANTIZATION_MODES, ModelArgs, Transformer, add_weight, check_quantization, scales_of
from sparse_kernels import pack_int4

# W^T of every block: (module within a block, weight name)
BLOCK_WEIGHTS = (("attention", "wqkv_t"), ("attention", "wo_t"), ("feed_forward", "w13_t"), ("feed_forward", "w2_t"))


def quantize_int8(w_t: Tensor) -> tuple:
    """(K, N) float -> q (K, N) int8 and scale (N,) fp32: the largest |w| of a column maps to 127."""
    w = w_t.float()
    scale = w.abs().amax(dim=0).clamp(min=1e-12) / 127.0  # (N,)
    q = torch.round(w / scale).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4(w_t: Tensor, groupsize: int) -> tuple:
    """(K, N) float -> packed (K, N / 2) uint8, scale and zero (K / groupsize, N) bf16. In each group
    of rows and column the minimum maps to 0 and the maximum to 15 (w = q * scale + zero), with q
    rounded against the bf16 scale and zero that are stored."""
    K, N = w_t.shape
    w = w_t.float().view(K // groupsize, groupsize, N)  # (G, groupsize, N)
    lo, hi = w.amin(dim=1), w.amax(dim=1)  # (G, N)
    scale = ((hi - lo) / 15.0).clamp(min=1e-8).to(torch.bfloat16)
    zero = lo.to(torch.bfloat16)
    q = torch.round((w - zero.float()[:, None]) / scale.float()[:, None]).clamp(0, 15)
    return pack_int4(q.view(K, N)), scale, zero


def quantize_weight(module: torch.nn.Module, name: str, quantization: dict) -> None:
    """Replace float W^T `name` of module by its quantized form (model.add_weight's layout)."""
    w_t = getattr(module, name).detach()
    K, N = w_t.shape
    add_weight(module, name, K, N, quantization, device=w_t.device)
    if quantization["mode"] == "int8":
        q, scale, zero = *quantize_int8(w_t), None
    else:
        q, scale, zero = quantize_int4(w_t, quantization["groupsize"])
    getattr(module, name).copy_(q)
    stored_scale, stored_zero = scales_of(module, name)
    stored_scale.copy_(scale)
    if zero is not None:
        stored_zero.copy_(zero)


def target_quantization(args: ModelArgs, mode: str, groupsize: int) -> dict:
    """The quantization a float model of args gets (its config's record), checked against its shapes."""
    quantization = {"mode": mode} if mode == "int8" else {"mode": mode, "groupsize": groupsize}
    if args.tie_embeddings:
        quantization["tied_head"] = "int8"
    check_quantization(quantization, args.weight_rows())
    return quantization


@torch.no_grad()
def quantize_model(model: Transformer, mode: str, groupsize: int = 128, progress: bool = False) -> Transformer:
    """Quantize a float model in place (random weights or a loaded checkpoint); the model's args
    record the mode, so its state_dict and config are a quantized checkpoint."""
    if model.args.quantization is not None:
        raise ValueError(f"the model is already quantized ({model.args.quantization}): quantize the original checkpoint")
    quantization = target_quantization(model.args, mode, groupsize)
    rows = model.args.weight_rows()
    if model.tp[1] > 1:  # a rank's shard: its own K of o and down
        rows.update(wo_t=model.layers[0].attention.wo_t.shape[0], w2_t=model.layers[0].feed_forward.w2_t.shape[0])
    check_quantization(quantization, rows)
    for i, block in enumerate(model.layers):
        for part, name in BLOCK_WEIGHTS:
            quantize_weight(getattr(block, part), name, quantization)
        if progress:
            print(f"\r  quantized block {i + 1}/{len(model.layers)}", end="", flush=True)
    model.args.quantization = quantization
    # the head, stored transposed like a block's W^T (an untied one as the blocks, a tied table's int8 copy)
    head = (model.tok_embeddings.weight if model.output is None else model.output.weight).detach()
    model.output = None
    model.output_t = torch.nn.Parameter(head.t().contiguous(), requires_grad=False)  # (D, V)
    quantize_weight(model, "output_t", model.args.head_quantization())
    if progress:
        print()
    return model


def quantized_dir(checkpoint: Path, mode: str, groupsize: int) -> Path:
    suffix = "int8" if mode == "int8" else f"int4-g{groupsize}"
    return checkpoint.with_name(f"{checkpoint.name}-{suffix}")


def stored_dtype(checkpoint: Path) -> torch.dtype:
    """The dtype the checkpoint stores its float weights in (its embedding table's)."""
    with safe_open(str(checkpoint / "model.safetensors"), framework="pt", device="cpu") as f:
        name = f.get_slice("tok_embeddings.weight").get_dtype()
    return {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}[name]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint_path", type=Path, required=True, help="a float checkpoint directory")
    parser.add_argument("--mode", choices=QUANTIZATION_MODES, required=True)
    parser.add_argument("--groupsize", type=int, default=128, help="int4: input rows per scale (32, 64, 128, 256)")
    parser.add_argument("--out", type=Path, default=None, help="default: CHECKPOINT-int8 or CHECKPOINT-int4-gG beside it")
    run_cli(run, parser.parse_args(argv), "quantizing")


def run(args):
    config = read_checkpoint_config(args.checkpoint_path)
    if config.quantization:
        raise ValueError(f"{args.checkpoint_path} is already quantized ({config.quantization}): quantize the "
                         f"original float checkpoint")
    out = args.out or quantized_dir(args.checkpoint_path, args.mode, args.groupsize)
    if out.resolve() == args.checkpoint_path.resolve():
        raise ValueError("--out must be another directory than --checkpoint_path")
    target_quantization(config, args.mode, args.groupsize)  # checked against the shapes before reading the weights
    t0 = time.perf_counter()
    dtype = stored_dtype(args.checkpoint_path)
    model = load_model(args.checkpoint_path, "cpu", dtype)
    print(f"Loaded {args.checkpoint_path} ({dtype}) in {time.perf_counter() - t0:.1f} s; quantizing to {args.mode}"
          + (f", groups of {args.groupsize} rows" if args.mode == "int4" else ""), flush=True)
    quantize_model(model, args.mode, args.groupsize, progress=True)
    out.mkdir(parents=True, exist_ok=True)
    state = {name: t.contiguous() for name, t in model.state_dict().items()}
    # Each file whole or not at all (an interrupted run leaves no half file), config.json last, as the converters.
    with atomic_write(out / "model.safetensors") as tmp:
        save_file(state, str(tmp))
    skip = {"model.safetensors", "config.json", "sparsity.json"}
    for f in args.checkpoint_path.iterdir():  # the tokenizer and anything else that is not weights (nor hidden)
        if f.is_file() and f.name not in skip and not f.name.endswith(".sha256.json") and not f.name.startswith("."):
            with atomic_write(out / f.name) as tmp:
                shutil.copy2(f, tmp)
    with atomic_write(out / "config.json") as tmp:
        tmp.write_text(json.dumps(model.args.to_dict(), indent=2) + "\n")
    size = (out / "model.safetensors").stat().st_size
    before = (args.checkpoint_path / "model.safetensors").stat().st_size
    print(f"Wrote {out} in {time.perf_counter() - t0:.1f} s: model.safetensors {size / 1e6:.1f} MB "
          f"({before / 1e6:.1f} MB before)")
    print(f"Next: python calibrate.py --checkpoint_path {out}   (its sparsity file, calibrated on the quantized weights)")


if __name__ == "__main__":
    main()
