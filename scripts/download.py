"""Download a model from the Hugging Face hub and convert it for teal-fast.

    python scripts/download.py --repo_id meta-llama/Meta-Llama-3-8B --hf_token hf_...

Fetches config, weights (safetensors preferred) and tokenizer files into
checkpoints/<repo_id>/hf/ with huggingface_hub.snapshot_download, then converts them into
checkpoints/<repo_id>/ (model.safetensors, config.json, tokenizer), the directory the other
scripts take as --checkpoint_path.
"""
import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from loader import run_cli  # noqa: E402
from scripts.convert_hf_checkpoint import convert  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def hf_download(repo_id: str, out: Path, token=None):
    from huggingface_hub import list_repo_files, snapshot_download

    files = list_repo_files(repo_id, token=token)
    weights = ["*.safetensors"] if any(f.endswith(".safetensors") for f in files) else ["pytorch_model*.bin"]
    patterns = ["config.json", "*.safetensors.index.json", "tokenizer.model", "original/tokenizer.model",
                "tokenizer.json", "tokenizer_config.json", *weights]
    snapshot_download(repo_id, local_dir=out, allow_patterns=patterns, token=token)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo_id", required=True, help="e.g. meta-llama/Meta-Llama-3-8B")
    parser.add_argument("--hf_token", default=os.environ.get("HF_TOKEN"), help="for gated models (or set HF_TOKEN)")
    parser.add_argument("--checkpoint_dir", type=Path, default=ROOT / "checkpoints")
    run_cli(run, parser.parse_args(argv), "downloading and converting")


def run(args):
    out = args.checkpoint_dir / args.repo_id
    try:
        hf_download(args.repo_id, out / "hf", args.hf_token)
    except Exception as e:  # hub errors come in many classes; one line is what the user needs
        raise ValueError(f"could not download {args.repo_id} ({type(e).__name__}: {(str(e).splitlines() or [''])[0]}); "
                         f"check the repo id, your network and --hf_token for gated models") from None
    convert(out / "hf", out)


if __name__ == "__main__":
    main()
