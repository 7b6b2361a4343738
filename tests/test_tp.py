"""Tensor parallelism on CPU: two gloo processes must reproduce one process, dense and sparse."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import save_file

from loader import load_model
from teal import forward_window, measure_sparsity
from model import ModelArgs, Transformer

ROOT = Path(__file__).resolve().parent.parent
# SmolLM2's head layout (9 query heads over 3 kv heads), so 2 ranks get an uneven 2 + 1 kv split.
TINY = dict(n_layer=2, n_head=9, n_local_heads=3, dim=144, head_dim=16, intermediate_size=190, vocab_size=500,
            block_size=64, rope_base=100000.0, norm_eps=1e-5, rope_scaling=None, tie_embeddings=True)


def write_checkpoint(path: Path) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelArgs.from_dict(TINY))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 1.0 / p.shape[-1] ** 0.5 if "embeddings" in name else 1.0 / p.shape[0] ** 0.5) \
                if p.dim() == 2 else p.uniform_(0.5, 1.5)
    path.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(model.args.to_dict()))
    return model


def thresholds_for(model: Transformer) -> torch.Tensor:
    # Nonzero, different per projection and layer: roughly 30-60% of entries dropped.
    g = torch.Generator().manual_seed(3)
    return 0.3 + 0.5 * torch.rand(model.args.n_layer, 7, generator=g)


def logits_pair(model: Transformer, tokens: torch.Tensor) -> dict:
    model.set_thresholds(thresholds_for(model))
    return {"dense": forward_window(model, tokens, 0, sparse_tail=False),
            "sparse": forward_window(model, tokens, 0, sparse_tail=True),
            "decode": forward_window(model, tokens, 10, sparse_tail=True),
            "realized": realized_of(measure_sparsity(model, tokens, 10))}  # every rank calls it


def realized_of(r) -> torch.Tensor:
    """(n_layer + 2, 7): per-projection sparsity, the parameter weights, the model-wide figure."""
    return torch.cat([r.per_projection, r.weights[None], torch.full((1, 7), r.model_wide, dtype=torch.float64)])


def worker(rank: int, world: int, port: int, ckpt: str, out: str):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from tp import close_distributed, init_distributed

    init_distributed("cpu")
    model = load_model(ckpt, "cpu", torch.float32, tp=(rank, world))
    tokens = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(5))
    result = logits_pair(model, tokens)
    # the traced path (a functional all-reduce, as generate.py --compile runs it), against the eager one
    result["compiled"] = forward_window(torch.compile(model, backend="eager", fullgraph=True), tokens, 10,
                                        sparse_tail=True)
    if rank == 0:
        torch.save(result, out)
    close_distributed()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_match_one_process(tmp_path):
    write_checkpoint(tmp_path / "ckpt")
    single = logits_pair(load_model(tmp_path / "ckpt", "cpu", torch.float32),
                         torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(5)))
    mp.spawn(worker, args=(2, free_port(), str(tmp_path / "ckpt"), str(tmp_path / "tp.pt")), nprocs=2, join=True)
    sharded = torch.load(tmp_path / "tp.pt", weights_only=True)
    assert (single["sparse"] - single["dense"]).abs().max() > 1e-2  # the sparse run really is sparse
    for kind in ("dense", "sparse", "decode"):
        # fp32; only the summation order differs (sharded matmuls + all-reduce)
        torch.testing.assert_close(sharded[kind], single[kind], rtol=1e-4, atol=1e-4, msg=kind)
    torch.testing.assert_close(sharded["compiled"], single["decode"], rtol=1e-4, atol=1e-4, msg="compiled")
    # realized sparsity counts every rank's slice of the o and down inputs, not rank 0's alone
    torch.testing.assert_close(sharded["realized"], single["realized"], rtol=0, atol=1e-3)


def test_too_many_ranks_is_a_clear_error():
    from tp import shard_of

    with pytest.raises(ValueError, match="cannot split 3 key/value heads over 4 ranks"):
        shard_of(ModelArgs.from_dict(TINY), 0, 4)
    sizes = [shard_of(ModelArgs.from_dict(TINY), r, 2) for r in range(2)]
    assert [s.kv[1] for s in sizes] == [32, 16] and sum(s.hidden[1] for s in sizes) == 190


def test_torchrun_default_model_answers(smollm2_checkpoint):
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "generate.py", "--device", "cpu", "--checkpoint_path", str(smollm2_checkpoint),
                        "--max_new_tokens", "12", "--num_samples", "1", "--sparsity", "0.4"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Paris" in r.stdout and r.stdout.count("Average tokens/s") == 1, r.stdout  # rank 0 alone prints


def test_close_distributed_can_free_cuda_graphs():
    """close_distributed frees torch.compile's CUDA graphs before destroying an NCCL group (else
    ncclCommDestroy hangs). That uses a private torch function: it must exist in this torch and
    be callable where no graph was ever captured."""
    from torch._inductor.cudagraph_trees import reset_cudagraph_trees

    reset_cudagraph_trees()
