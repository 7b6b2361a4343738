"""Tensor parallelism for teal-fast, started with torchrun.

    torchrun --nproc_per_node 2 generate.py --sparsity 0.5 --compile

Sharding (Megatron style, one all-reduce per attention and one per MLP):
  q, k, v, gate, up   by output columns: each rank holds the full input, thresholds it
                      with the block's threshold and reads the kept rows of its columns;
  o, down             by input rows: each rank thresholds its own slice of the input with the
                      same threshold, which drops exactly the entries one GPU would drop;
                      the partial outputs are summed by an all-reduce (rank 0's includes the
                      residual, added in its kernel).
So TEAL's semantics are those of one GPU, and each rank skips its own share of bytes.
Head counts need not divide by the world size: ranks get whole kv-head groups, as evenly as
possible (SmolLM2-135M's 3 kv heads over 2 ranks: 2 and 1); at most one rank per kv head.
NCCL on CUDA, gloo on CPU. Only rank 0 prints.
"""
import gc
import os
import sys
from dataclasses import dataclass
import torch
import torch.distributed as dist
from torch import Tensor

from model import ModelArgs, Transformer, add_weight


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(device: str) -> tuple:
    """Join the process group when started by torchrun (any world size, 1 included, so that the
    tensor-parallel path can be timed on one GPU); returns (rank, world_size, device), where
    world_size is 0 outside torchrun. On CUDA each rank takes the GPU of its LOCAL_RANK."""
    if not under_torchrun():
        return 0, 0, device
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    on_cuda = str(device).startswith("cuda")
    if on_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"rank {rank} wants GPU {local_rank} but only {torch.cuda.device_count()} are visible")
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
        # Without NCCL's support for mixing captured and uncaptured collectives, a compiled step's
        # all-reduces in CUDA graphs ran faster on two GPUs (docs/design.md, "Tensor parallelism").
        # What it then asks of us: no uncaptured NCCL call while a graph launch is
        # outstanding (generate() synchronizes before each prompt). NCCL_GRAPH_MIXING_SUPPORT=1 restores it.
        os.environ.setdefault("NCCL_GRAPH_MIXING_SUPPORT", "0")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if on_cuda else "gloo")
    if rank != 0:  # only rank 0 talks
        sys.stdout = open(os.devnull, "w")
    return rank, world, device


def close_distributed():
    """Leave the process group, if this process joined one, before the interpreter exits (PyTorch asks
    this of NCCL users). CUDA graphs that captured an NCCL collective keep its communicator in use,
    and destroying it then never returns (pytorch/pytorch#115388; a two-GPU run hung here): free
    torch.compile's CUDA graphs first."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        from torch._inductor.cudagraph_trees import reset_cudagraph_trees

        torch.cuda.synchronize()
        reset_cudagraph_trees()
        gc.collect()
    dist.destroy_process_group()


@dataclass
class Shard:
    """Which slices of a block one rank holds: [start, start + size) of the query-head columns,
    of the key/value-head columns (whole kv groups, so GQA stays local) and of the MLP hidden units."""
    q: tuple
    kv: tuple
    hidden: tuple


def even_split(n: int, world: int, rank: int) -> tuple:
    """(start, size) of rank's part when n items are dealt out as evenly as possible."""
    base, extra = divmod(n, world)
    size = base + (rank < extra)
    return rank * base + min(rank, extra), size


def shard_of(args, rank: int, world: int) -> Shard:
    if world > args.n_local_heads:
        raise ValueError(f"cannot split {args.n_local_heads} key/value heads over {world} ranks; "
                         f"use --nproc_per_node of at most {args.n_local_heads}")
    kv_start, kv_size = even_split(args.n_local_heads, world, rank)
    group, hd = args.n_head // args.n_local_heads, args.head_dim
    return Shard(q=(kv_start * group * hd, kv_size * group * hd), kv=(kv_start * hd, kv_size * hd),
                 hidden=even_split(args.intermediate_size, world, rank))


def shard_matvec_shapes(config: str, world: int) -> list:
    """Rank 0's matvecs when a named config's blocks are sharded over world ranks: (name, op, K, N,
    splits) for q/k/v, o, gate/up and down (the shapes scripts/bench_kernels.py tunes)."""
    args = ModelArgs.from_name(config)
    shard = shard_of(args, 0, world)
    D, q, kv, h = args.dim, shard.q[1], shard.kv[1], shard.hidden[1]
    tag = config.rsplit("-", 1)[-1] + (f"/{world}" if world > 1 else "")
    return [(f"{tag} qkv", "linear", D, q + 2 * kv, [q, kv, kv]), (f"{tag} o", "linear", q, D, [D]),
            (f"{tag} gate+up", "linear", D, 2 * h, [h, h]), (f"{tag} down", "silu_down", h, D, [D])]


def shard_model(model: Transformer, rank: int, world: int, group=None) -> Transformer:
    """Give every block its local shapes (on any device, meta included) and its all-reduce group.
    Weights are then loaded with shard_tensor, or initialised randomly. Head counts that do not
    divide by the world size are dealt out by whole kv groups (e.g. 3 kv heads over 2 ranks: 2 + 1)."""
    shard = shard_of(model.args, rank, world)
    hd = model.args.head_dim
    for block in model.layers:
        attn, ffn = block.attention, block.feed_forward
        attn.n_head, attn.n_kv_head = shard.q[1] // hd, shard.kv[1] // hd
        attn.splits = [shard.q[1], shard.kv[1], shard.kv[1]]
        quant, device = model.args.quantization, attn.wqkv_t.device
        add_weight(attn, "wqkv_t", attn.wqkv_t.shape[0], sum(attn.splits), quant, device)
        add_weight(attn, "wo_t", shard.q[1], model.args.dim, quant, device)
        ffn.hidden = shard.hidden[1]
        add_weight(ffn, "w13_t", ffn.w13_t.shape[0], 2 * ffn.hidden, quant, device)
        add_weight(ffn, "w2_t", ffn.hidden, model.args.dim, quant, device)
        # One rank has nothing to sum: no collective at all, so TP=1 runs the plain path's kernels
        # (a 1-rank all-reduce measurably slowed the step: docs/design.md).
        attn.tp_group = ffn.tp_group = None if world == 1 else (group if group is not None else dist.group.WORLD)
        # The residual goes into rank 0's kernel (fused there, as on one GPU): the all-reduce then
        # sums x + rank 0's share + the others', and no separate add runs after it.
        attn.adds_residual = ffn.adds_residual = rank == 0
    model.tp = (rank, world)
    return model


def take_columns(t: Tensor, segments) -> Tensor:
    """Concatenate column ranges [(start, size), ...] of t (along its last axis)."""
    return torch.cat([t[..., start:start + size] for start, size in segments], dim=-1)


def shard_tensor(name: str, t: Tensor, model: Transformer, rank: int, world: int) -> Tensor:
    """This rank's part of a full checkpoint tensor, by the rules in the module docstring. Quantized
    weights shard as their float form: an int4 row holds two columns a byte, and int4 scales are per
    group of rows, so a row shard must start and end on a group boundary; int8 scales are per output
    column, which o and down do not split."""
    if world == 1:
        return t
    args = model.args
    shard = shard_of(args, rank, world)
    weight = name.removesuffix("_scale").removesuffix("_zero")
    packed = 2 if name == weight and t.dtype == torch.uint8 else 1  # int4: two columns a byte
    if weight.endswith(("attention.wqkv_t", "feed_forward.w13_t")):
        if weight.endswith("attention.wqkv_t"):
            n_q, n_kv = args.n_head * args.head_dim, args.n_local_heads * args.head_dim
            (q0, qs), (k0, ks) = shard.q, shard.kv
            segments = [(q0, qs), (n_q + k0, ks), (n_q + n_kv + k0, ks)]
        else:
            (h0, hs), n_h = shard.hidden, args.intermediate_size
            segments = [(h0, hs), (n_h + h0, hs)]
        if any(a % packed or n % packed for a, n in segments):
            raise ValueError(f"{weight}: an int4 shard must start and end on an even column; use another world size")
        return take_columns(t, [(a // packed, n // packed) for a, n in segments])
    if weight.endswith(("attention.wo_t", "feed_forward.w2_t")):
        (start, size), rows = (shard.q, args.n_head * args.head_dim) if weight.endswith("attention.wo_t") else \
            (shard.hidden, args.intermediate_size)
        if name == weight:
            return t[start:start + size]
        if t.dim() == 1:  # int8: one scale per output column
            return t
        group = rows // t.shape[0]
        if start % group or size % group:
            raise ValueError(f"{weight}: rows {start}..{start + size} of this rank's shard split an int4 group of "
                             f"{group} rows; quantize with a smaller --groupsize or use another world size")
        return t[start // group:(start + size) // group]
    return t  # embeddings, norms, LM head: replicated


def broadcast_thresholds(model: Transformer, src: int = 0):
    """Make every rank use rank src's thresholds (e.g. after calibrating on random tokens)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = model.get_thresholds()
        if t.is_cuda:  # an uncaptured NCCL call must not overlap a graph launch (init_distributed)
            torch.cuda.synchronize(t.device)
        dist.broadcast(t, src)
        model.set_thresholds(t)
