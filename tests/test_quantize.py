"""quantize.py: int8 and int4 weights, the quantized model against its dequantized float twin, the CLI.

The kernels' own checks of quantized weights (under Triton's interpreter) are in test_kernels.py.
"""
import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from loader import load_model
from model import ModelArgs, Transformer, scales_of
from quantize import BLOCK_WEIGHTS, quantize_int4, quantize_int8, quantize_model
from sparse_kernels import dequantize, pack_int4, unpack_int4
from teal import SparsityFile, weight_bytes_per_token
from tests.test_calibrate import small_model

ROOT = Path(__file__).resolve().parent.parent


def test_pack_unpack_int4_round_trip():
    q = torch.randint(0, 16, (7, 10), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.shape == (7, 5) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), q)
    assert torch.equal(packed[0, 0] & 0xF, q[0, 0])  # the low nibble is the even column


def test_int8_error_is_at_most_half_a_step():
    w = torch.randn(96, 40, generator=torch.Generator().manual_seed(1))
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (40,) and int(q.abs().max()) == 127
    err = (dequantize(q, scale) - w).abs()
    assert (err <= scale / 2 * (1 + 1e-5)).all()


@pytest.mark.parametrize("group", [16, 32])
def test_int4_error_is_at_most_half_a_step(group):
    w = torch.randn(64, 30, generator=torch.Generator().manual_seed(2))
    packed, scale, zero = quantize_int4(w, group)
    assert packed.shape == (64, 15) and scale.shape == zero.shape == (64 // group, 30)
    q = unpack_int4(packed)
    assert int(q.min()) == 0 and int(q.max()) == 15  # the range of each group is used
    step = scale.float().repeat_interleave(group, 0)
    err = (dequantize(packed, scale, zero) - w).abs()
    # half a step, plus what rounding the bf16 zero and scale can move a value at q = 15
    assert (err <= step / 2 + 16 * step * 2 ** -8 + zero.float().abs().repeat_interleave(group, 0) * 2 ** -8).all()


@pytest.mark.parametrize("mode", ["int8", "int4"])
@torch.no_grad()
def test_quantized_model_is_its_dequantized_twin(mode):
    """The quantized model computes exactly what the float model with the dequantized weights does:
    the prompt's forward, a sparse decode step (the ops' reference path on the CPU) and the head."""
    float_model = small_model()
    quantized = quantize_model(copy.deepcopy(float_model), mode, groupsize=32)
    assert quantized.args.quantization["mode"] == mode and quantized.output is None
    twin = copy.deepcopy(float_model)
    for block_q, block_f in zip(quantized.layers, twin.layers):
        for part, name in BLOCK_WEIGHTS:
            module_q = getattr(block_q, part)
            getattr(getattr(block_f, part), name).copy_(dequantize(getattr(module_q, name), *scales_of(module_q, name)))
    twin.output.weight.copy_(dequantize(quantized.output_t, *scales_of(quantized, "output_t")).t())
    idx = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    for model in (quantized, twin, float_model):
        model.setup_caches(2, 16)
    prompt_q, prompt_f = quantized(idx, torch.arange(12)), twin(idx, torch.arange(12))
    torch.testing.assert_close(prompt_q, prompt_f, rtol=1e-5, atol=1e-5)
    assert (prompt_q - float_model(idx, torch.arange(12))).abs().max() > 1e-4  # quantization did change something
    for model in (quantized, twin):
        model.set_thresholds(torch.full((2, 7), 0.3))
        model.sparse_decode = True
    step_q, step_f = quantized(idx[:, :1], torch.tensor([12])), twin(idx[:, :1], torch.tensor([12]))
    torch.testing.assert_close(step_q, step_f, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["int8", "int4"])
@torch.no_grad()
def test_a_tied_head_reads_an_int8_copy_of_the_table(mode, tmp_path):
    """A tied model's logits come from an int8 copy of the embedding table in either mode (the head
    is the largest matrix of a small model), while the token lookups keep the float table; the
    config records it, the checkpoint loads with it, and a tied quantized checkpoint without the
    copy (as written before) still loads with the float head."""
    float_model = small_model(seed=5, tie_embeddings=True)
    table = float_model.tok_embeddings.weight.clone()
    quantized = quantize_model(copy.deepcopy(float_model), mode, groupsize=32)
    assert quantized.args.quantization["tied_head"] == "int8" and quantized.args.quantization["mode"] == mode
    assert torch.equal(quantized.tok_embeddings.weight, table)  # the lookups: the float table
    q, scale = quantize_int8(table.t())
    assert torch.equal(quantized.output_t, q) and torch.equal(quantized.output_t_scale, scale)
    untied = copy.deepcopy(quantized.args)  # the twin: every weight the quantized model's, the head its own Linear
    untied.tie_embeddings, untied.quantization = False, None
    twin = Transformer(untied)
    floats = {k: v for k, v in quantized.state_dict().items() if k.endswith(("norm.weight", "tok_embeddings.weight"))}
    twin.load_state_dict({**floats, "output.weight": dequantize(q, scale).t()}, strict=False)
    for block_q, block_f in zip(quantized.layers, twin.layers):
        for part, name in BLOCK_WEIGHTS:
            module_q = getattr(block_q, part)
            getattr(getattr(block_f, part), name).copy_(dequantize(getattr(module_q, name), *scales_of(module_q, name)))
    idx = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(6))
    for model in (quantized, twin):
        model.setup_caches(1, 8)
    torch.testing.assert_close(quantized(idx, torch.arange(6)), twin(idx, torch.arange(6)), rtol=1e-5, atol=1e-5)

    path = save_checkpoint(quantized, tmp_path / f"tied-{mode}")
    loaded = load_model(path, "cpu", torch.float32)
    assert loaded.output_t.dtype == torch.int8 and torch.equal(loaded.tok_embeddings.weight, table)
    older = tmp_path / f"tied-{mode}-older"  # no copy of the table, no tied_head in the config
    older.mkdir()
    state = {k: v.contiguous() for k, v in quantized.state_dict().items() if not k.startswith("output_t")}
    save_file(state, str(older / "model.safetensors"))
    config = dict(quantized.args.to_dict())
    del config["quantization"]["tied_head"]
    (older / "config.json").write_text(json.dumps(config))
    assert not hasattr(load_model(older, "cpu", torch.float32), "output_t")


def test_quantized_weights_read_fewer_bytes():
    float_model = small_model()
    dense = weight_bytes_per_token(float_model)
    int8 = weight_bytes_per_token(quantize_model(copy.deepcopy(float_model), "int8"))
    int4 = weight_bytes_per_token(quantize_model(copy.deepcopy(float_model), "int4", groupsize=32))
    assert int4 < int8 < dense / 3  # fp32 weights: a quarter and an eighth, plus scales, norms and the embedding row


def test_quantize_model_refuses_bad_input():
    model = quantize_model(small_model(), "int8")
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(model, "int8")
    with pytest.raises(ValueError, match="groupsize 48 must be a power of two"):
        quantize_model(small_model(), "int4", groupsize=48)
    with pytest.raises(ValueError, match=r"groupsize 128 does not divide K of wqkv_t \(64\)"):
        quantize_model(small_model(), "int4", groupsize=128)
    args = small_model().args.to_dict()
    with pytest.raises(ValueError, match="tied_head is for a model whose head is its embedding table"):
        ModelArgs.from_dict(dict(args, quantization={"mode": "int8", "tied_head": "int8"}))  # SMALL is untied
    with pytest.raises(ValueError, match='tied_head must be "int8"'):
        ModelArgs.from_dict(dict(args, tie_embeddings=True, quantization={"mode": "int8", "tied_head": "int4"}))


def save_checkpoint(model: Transformer, path: Path) -> Path:
    path.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(model.args.to_dict()))
    (path / "tokenizer_bpe.json").write_text("{}")  # a stand-in: the CLI copies the tokenizer files
    return path


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "quantize.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


@torch.no_grad()
def test_cli_writes_a_checkpoint_that_loads_and_refuses_bad_input(tmp_path):
    float_model = small_model(seed=4)
    ckpt = save_checkpoint(float_model, tmp_path / "tiny")
    r = cli("--checkpoint_path", ckpt, "--mode", "int4", "--groupsize", "32")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "tiny-int4-g32"
    assert json.loads((out / "config.json").read_text())["quantization"] == {"mode": "int4", "groupsize": 32}
    assert (out / "tokenizer_bpe.json").is_file()
    assert (out / "model.safetensors").stat().st_size < (ckpt / "model.safetensors").stat().st_size / 4
    model = load_model(out, "cpu", torch.float32)
    assert model.layers[0].attention.wqkv_t.dtype == torch.uint8
    assert model.layers[0].attention.wqkv_t_scale.dtype == torch.bfloat16  # scales keep their stored dtype
    in_memory = quantize_model(copy.deepcopy(float_model), "int4", groupsize=32)
    idx = torch.randint(0, 128, (1, 8))
    for m in (model, in_memory):
        m.setup_caches(1, 8)
    torch.testing.assert_close(model(idx, torch.arange(8)), in_memory(idx, torch.arange(8)), rtol=0, atol=0)

    for args, message in [((out, "int8"), "already quantized"),
                          ((ckpt, "int4", "--groupsize", "128"), "groupsize 128 does not divide"),
                          ((ckpt, "int4", "--groupsize", "24"), "power of two"),
                          ((tmp_path / "nowhere", "int8"), "not found")]:
        r = cli("--checkpoint_path", args[0], "--mode", *args[1:])
        lines = r.stderr.strip().splitlines()
        assert r.returncode != 0 and len(lines) == 1 and message in lines[0] and "Traceback" not in r.stderr, r.stderr


def test_a_float_models_sparsity_file_is_refused_for_its_quantized_checkpoint(tmp_path):
    from calibrate import calibrate

    float_model = small_model(seed=5)
    ckpt = save_checkpoint(float_model, tmp_path / "tiny")
    tokens = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    sf = calibrate(float_model, tokens, greedy_seqs=0, progress=False, checkpoint_dir=ckpt)
    sf.save(tmp_path / "sparsity.json")
    assert cli("--checkpoint_path", ckpt, "--mode", "int8").returncode == 0
    quantized = load_model(tmp_path / "tiny-int8", "cpu", torch.float32)
    with pytest.raises(ValueError, match=r"other weights.*calibrate\.py --checkpoint_path .*tiny-int8"):
        SparsityFile.load(tmp_path / "sparsity.json", quantized, tmp_path / "tiny-int8")
