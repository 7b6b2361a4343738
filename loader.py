"""Loading models, and the plumbing every command-line tool shares.

    model = load_model("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct", "cpu", torch.float32)
    model = random_model("Llama-3-8B", "cuda", torch.bfloat16)      # real shapes, random weights

A checkpoint directory holds config.json (every hyperparameter that changes the math, model.CHECKPOINT_FIELDS:
none is defaulted, see read_checkpoint_config) and model.safetensors in this project's layout (the converters
in scripts/ write both). Loading reads one tensor at a time and,
under tensor parallelism, keeps only this rank's shard.
"""
import argparse
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from fileio import read_json_object
from model import QUANTIZATION_MODES, ModelArgs, Transformer, keeps_stored_dtype
from teal import MAX_LEVEL
from tp import close_distributed, shard_model, shard_tensor

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct"
CONVERT_AGAIN = ("convert the checkpoint again (`bash scripts/quickstart.sh` for the default model, else "
                 "scripts/convert_gguf.py or scripts/convert_hf_checkpoint.py)")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ---------------------------------------------------------------------------- loading

def load_model(checkpoint_dir, device, dtype, tp=None) -> Transformer:
    """Build the model from checkpoint_dir/config.json and load model.safetensors, one tensor at a
    time; under tensor parallelism, tp=(rank, world_size), each rank keeps only its shard."""
    checkpoint_dir = Path(checkpoint_dir)
    config_path, weights_path = checkpoint_dir / "config.json", checkpoint_dir / "model.safetensors"
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: run `bash scripts/quickstart.sh` for the default model, "
                                    f"or convert a checkpoint with scripts/convert_hf_checkpoint.py")
    args = read_checkpoint_config(checkpoint_dir)
    with torch.device("meta"):
        model = Transformer(args)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    try:
        f = safe_open(str(weights_path), framework="pt", device="cpu")
    except Exception as e:  # safetensors' own error types: a truncated or foreign file
        raise ValueError(f"{weights_path} is not a readable safetensors file ({e}): convert the checkpoint "
                         f"again") from None
    with f:
        got = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
        if expected != got:
            missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
            wrong = sorted(n for n in set(expected) & set(got) if expected[n] != got[n])
            detail = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}" if extra else \
                f"{wrong[0]} has shape {got[wrong[0]]}, config.json implies {expected[wrong[0]]}"
            raise ValueError(f"{weights_path} does not match {config_path}: {detail}; re-run the converter")
        rank, world = tp or (0, 1)
        if tp is not None:
            shard_model(model, rank, world)
        state = {}
        for name in f.keys():  # quantized weights and their scales keep the dtype they were stored in
            t = shard_tensor(name, f.get_tensor(name), model, rank, world)
            state[name] = t.to(device) if keeps_stored_dtype(name, t) else t.to(device=device, dtype=dtype)
    model.load_state_dict(state, assign=True, strict=True)
    return finish_model(model, device)


def read_checkpoint_config(checkpoint_dir) -> ModelArgs:
    """The ModelArgs of a checkpoint: its config.json must be a JSON object giving every field of
    model.CHECKPOINT_FIELDS (the converters write them all); anything else is a one-line ValueError
    that names the file (and the key) and says how to make a good one."""
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {CONVERT_AGAIN}")
    config = read_json_object(path, CONVERT_AGAIN, "an object of model settings")
    try:
        return ModelArgs.from_dict(config)
    except ValueError as e:
        raise ValueError(f"{path}: {e}: {CONVERT_AGAIN}") from None


def random_model(config_name: str, device, dtype, seed: int = 0, tp=None) -> Transformer:
    """A model with a named config's real shapes and random weights (std 1/sqrt(fan_in)).
    Under tensor parallelism each rank draws only its own shard."""
    args = ModelArgs.from_name(config_name)
    with torch.device("meta"):
        model = Transformer(args)
    rank, world = tp or (0, 1)
    if tp is not None:
        shard_model(model, rank, world)
    model = model.to(dtype).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed + rank)
    replicated = torch.Generator(device=device).manual_seed(seed)  # the same draws on every rank
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(("embeddings.weight", "output.weight")):
                p.normal_(0.0, 1.0 / p.shape[1] ** 0.5, generator=replicated)
            else:
                full_fan_in = {"wo_t": args.n_head * args.head_dim, "w2_t": args.intermediate_size}
                fan_in = full_fan_in.get(name.rsplit(".", 1)[-1], p.shape[0])  # input-sharded: the full K
                p.normal_(0.0, 1.0 / fan_in ** 0.5, generator=gen)
    return finish_model(model, device)


def share_weights(model: Transformer) -> Transformer:
    """A second model over the same weight tensors (no copy) with its own KV cache, thresholds and flags:
    e.g. a self-speculative draft that keeps a cache of its own. Not under tensor parallelism."""
    if model.tp[1] > 1:
        raise ValueError("share_weights: a sharded model's twin would need its process group; run one process")
    with torch.device("meta"):
        twin = Transformer(model.args)
    twin.load_state_dict(model.state_dict(), assign=True, strict=True)
    return finish_model(twin, model.tok_embeddings.weight.device)


def finish_model(model: Transformer, device) -> Transformer:
    # Buffers (thresholds) were created on the meta device; give them real storage.
    for block in model.layers:
        block.thresholds = torch.zeros_like(block.thresholds, device=device, dtype=torch.float32)
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------------------- command-line plumbing

def run_cli(run, args, doing: str):
    """Run a CLI's body. Bad input (missing file, wrong shapes, bad level) becomes one line, `error: ...`.
    Ctrl-C (or SIGINT from elsewhere) becomes one line, `interrupted: <doing>` (what the tool was doing,
    e.g. "calibrating"), and exit status 130, as shells report a SIGINT; files are written whole or not at
    all (fileio.atomic_write), so an interrupted run leaves the previous ones as they were."""
    try:
        if hasattr(args, "device"):
            check_device(args.device)
        run(args)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        print(f"interrupted: {doing}", file=sys.stderr, flush=True)
        try:
            close_distributed()  # under torchrun every rank gets the signal: leave the process group
        except KeyboardInterrupt:
            pass  # a second Ctrl-C while leaving: exit all the same
        sys.exit(130)
    close_distributed()


def check_device(device: str) -> None:
    """A one-line error for a device torch does not know, or CUDA where there is none."""
    try:
        torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a device torch knows; use cpu or cuda[:N]") from None
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("CUDA is not available on this machine; use --device cpu")


def refuse_directory(path, example_name: str) -> None:
    """--out must name a file: say so before a long run, not after it."""
    if path is not None and Path(path).is_dir():
        raise ValueError(f"--out {path} is a directory; give a file path (e.g. {Path(path) / example_name})")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def synchronize(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


def add_model_args(parser: argparse.ArgumentParser):
    parser.add_argument("--checkpoint_path", type=Path, default=DEFAULT_CHECKPOINT,
                        help="checkpoint directory (config.json, model.safetensors, tokenizer)")
    parser.add_argument("--random_weights", metavar="CONFIG", default=None,
                        help="ignore the checkpoint; random weights with this config's shapes (e.g. Llama-3-8B)")
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--precision", choices=sorted(DTYPES), default=None,
                        help="weights/activations dtype (default: bf16 on cuda, fp32 on cpu)")
    parser.add_argument("--sparsity", type=float, default=None,
                        help=f"TEAL level: fraction of block linear weights skipped, 0 to {MAX_LEVEL} "
                             "(the calibrated range); omit (or 0) for dense")
    parser.add_argument("--sparsity_file", type=Path, default=None,
                        help="default: <checkpoint>/sparsity.json (calibrated on random tokens for --random_weights)")
    parser.add_argument("--sparsity_mode", choices=("greedy", "uniform"), default=None,
                        help="default: greedy for a checkpoint, uniform for random weights")
    parser.add_argument("--sparse_prefill", action="store_true", help="sparsify the prompt too (default: dense prefill)")
    parser.add_argument("--quantize", choices=QUANTIZATION_MODES, default=None,
                        help="with --random_weights: quantize them (a checkpoint is quantized once by quantize.py)")
    parser.add_argument("--groupsize", type=int, default=128, help="int4 rows per scale (with --quantize int4)")


def resolve_dtype(args) -> torch.dtype:
    if args.precision is not None:
        return DTYPES[args.precision]
    return torch.bfloat16 if str(args.device).startswith("cuda") else torch.float32


def configure_inductor():
    """Readable kernel names and cached graphs. (gpt-fast's coordinate_descent_tuning is left off:
    it turned the matvecs into Triton reductions slower than cuBLAS; docs/kernels.md.)"""
    import torch._inductor.config as inductor_config

    inductor_config.triton.unique_kernel_names = True
    inductor_config.fx_graph_cache = True
