"""Triton decode attention (one query position, grouped heads), split over the cache length.

With ROPE (the decode step, teal::decode_attention_step) the kernel also does the work around
it: it reads the step's position and its angles from the RoPE table, rotates q and the new k
(fp32, rounded once), the one program whose positions contain the step's position writes the
new k and v into the cache, and every program uses them for that position from registers (no
ordering between programs). The step is causal: positions up to the step's attend, no mask is read.

Program (b * KV + kv, split) holds the G query heads that share kv head `kv` and walks its
share of the cache positions, BLOCK_S at a time, with an online softmax in fp32: scores by
tl.dot (the G rows padded to 16), masked positions are never loaded. It stores its running
max, sum and (G, hd) accumulator as fp32 partials and increments the head's arrival counter;
the last program to arrive merges the partials (all splits' m and l in one load, the
accumulators a few splits per load, summed in split order: deterministic), writes the output
and resets the counter to 0 for the next call (no memset, CUDA-graph safe). The decode step
splits only the positions it attends (0..pos, read from the device, so one CUDA graph serves
every position): programs left without positions store nothing, and a single live split writes the
output without a merge; caches of up to 256 positions take one program per head (geometry).

On Hopper and newer the decode step is launched with programmatic dependent launch: the
position, its angles and the first cache tile (all written long before) are requested before
the kernel waits for the q/k/v projection (gdc_wait), and once every program has attended, the
o projection may launch during the merge. The matvec kernels let a successor launched this way
start early too (triton_kernels.py). A caller must therefore not write the caches, the RoPE
table or the position in the kernel right before the step (TEAL_NO_PDL=1 turns this off): the
number of splits that merge follows the position, so every program must read the same one.
"""
import torch
import triton
import triton.language as tl

from .triton_kernels import (_round, check_int32_offsets, gdc_launch_dependents, gdc_wait, is_interpreted, next_pow2,
                             pdl_enabled)


@triton.jit
def decode_attention_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, part_ptr, ml_ptr, count_ptr,
    kn_ptr, vn_ptr, freqs_ptr, pos_ptr,  # ROPE only: the new k and v (B, KV, HD), RoPE table (S, HD/2, 2), position
    S, G, HD, KV, per_split, n_split, scale,
    stride_qb, stride_qkv, stride_qg,  # q[b, kv, g, :] at b * stride_qb + kv * stride_qkv + g * stride_qg
    stride_nb, stride_nkv, stride_f,  # the new k/v [b, kv, :]; the RoPE table's rows
    stride_kh, stride_ks, stride_oh,  # cache rows of head b * KV + kv; out rows: G x HD contiguous per head
    G_PAD: tl.constexpr, G_M: tl.constexpr, HD_PAD: tl.constexpr, BLOCK_S: tl.constexpr, SPLIT_PAD: tl.constexpr,
    RS: tl.constexpr, ROPE: tl.constexpr,
    STATIC_STEPS: tl.constexpr, DOT_F32: tl.constexpr, RTNE_BY_BITS: tl.constexpr,
    PDL: tl.constexpr, TRIGGER: tl.constexpr,
):
    # As in the matvec kernel: static loop bounds, fp32 dots and bit-exact bf16 rounding under
    # Triton's interpreter.
    head = tl.program_id(0)  # b * KV + kv
    split = tl.program_id(1)
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, HD_PAD)
    g_ok, d_ok = offs_g < G, offs_d < HD
    b = head // KV
    q_ptrs = q_ptr + b * stride_qb + (head % KV) * stride_qkv + offs_g[:, None] * stride_qg
    q_ok = g_ok[:, None] & d_ok[None, :]
    offs_b = tl.arange(0, BLOCK_S)
    # What does not come from the kernel before (the position, its angles and the first cache
    # tile, written by earlier steps) is requested first; with PDL, before the wait for q/k/v.
    if ROPE:
        pos = tl.load(pos_ptr).to(tl.int32)
        cos = tl.load(freqs_ptr + pos * stride_f + (offs_d // 2) * 2, mask=d_ok, other=0.0)
        sin = tl.load(freqs_ptr + pos * stride_f + (offs_d // 2) * 2 + 1, mask=d_ok, other=0.0)
        # Only positions 0..pos are split, n_live <= n_split splits of per_split positions (a multiple of
        # BLOCK_S, at most the launch's per_split): a program that gets none stores nothing and takes no
        # part in the merge, and with a single live split nothing is merged at all. A position past the
        # cache (a caller's error) reads and writes nothing beyond it.
        n_pos = tl.minimum(pos + 1, S)
        n_live = tl.minimum(n_split, tl.cdiv(n_pos, BLOCK_S))
        per_split = tl.cdiv(tl.cdiv(n_pos, n_live), BLOCK_S) * BLOCK_S
        n_live = tl.cdiv(n_pos, per_split)
        start = split * per_split
        end = tl.minimum(start + per_split, n_pos)
    else:
        pos = 0  # (unused without ROPE)
        n_live = n_split
        start = split * per_split
        end = tl.minimum(start + per_split, S)
    k, v, valid = _cache_tile(k_ptr, v_ptr, mask_ptr, head, start, end, pos, offs_b, offs_d, d_ok, stride_kh,
                              stride_ks, ROPE)
    if ROPE:
        tl.debug_barrier()  # a fence for the compiler, which would otherwise move the loads to their first use
    if PDL:  # the kernel before (q/k/v) has finished writing from here on
        gdc_wait()
    if ROPE:  # rotate adjacent channel pairs (2j, 2j+1) by the position's angle j
        sin = tl.where(offs_d % 2 == 0, -sin, sin)
        partner = offs_d ^ 1
        q = _rotate(q_ptrs + offs_d[None, :], q_ptrs + partner[None, :], q_ok, cos[None, :], sin[None, :], RTNE_BY_BITS)
        n_off = b * stride_nb + (head % KV) * stride_nkv
        k_new = _rotate(kn_ptr + n_off + offs_d, kn_ptr + n_off + partner, d_ok, cos, sin, RTNE_BY_BITS)
        v_new = tl.load(vn_ptr + n_off + offs_d, mask=d_ok, other=0.0)
        mine = d_ok & (pos >= start) & (pos < end)  # the one program whose positions hold pos writes the cache
        tl.store(k_ptr + head * stride_kh + pos * stride_ks + offs_d, k_new, mask=mine)
        tl.store(v_ptr + head * stride_kh + pos * stride_ks + offs_d, v_new, mask=mine)
    else:
        k_new = tl.zeros((HD_PAD,), q_ptr.dtype.element_ty)  # (unused without ROPE)
        v_new = k_new
        q = tl.load(q_ptrs + offs_d[None, :], mask=q_ok, other=0.0)  # (G_PAD, HD_PAD)
    m_i = tl.full((G_PAD,), float("-inf"), tl.float32)
    l_i = tl.zeros((G_PAD,), tl.float32)
    acc = tl.zeros((G_PAD, HD_PAD), tl.float32)
    m_i, l_i, acc = _attend(q, k, v, valid, start + offs_b, pos, k_new, v_new, m_i, l_i, acc, scale, ROPE, DOT_F32)
    for i in range(1, STATIC_STEPS if STATIC_STEPS > 0 else tl.cdiv(end - start, BLOCK_S)):
        k, v, valid = _cache_tile(k_ptr, v_ptr, mask_ptr, head, start + i * BLOCK_S, end, pos, offs_b, offs_d, d_ok,
                                  stride_kh, stride_ks, ROPE)
        m_i, l_i, acc = _attend(q, k, v, valid, start + i * BLOCK_S + offs_b, pos, k_new, v_new, m_i, l_i, acc, scale,
                                ROPE, DOT_F32)
    if TRIGGER:  # the next kernel may launch during the merge
        gdc_launch_dependents()

    # Merge the splits: partials (m, l, acc) per split; the last to arrive combines them, reading
    # every split's m and l in one load and the accumulators RS splits per load (unrolled, so all
    # the loads are in flight together).
    out_ptrs = out_ptr + head * stride_oh + offs_g[:, None] * HD + offs_d[None, :]
    out_ok = g_ok[:, None] & d_ok[None, :]
    if n_live == 1:
        tl.store(out_ptrs, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=out_ok & (split == 0))
    elif split < n_live:
        row = (head * n_split + split) * G_PAD + offs_g  # (G_PAD,) partial rows
        tl.store(ml_ptr + row * 2, m_i)
        tl.store(ml_ptr + row * 2 + 1, l_i)
        tl.store(part_ptr + row[:, None] * HD_PAD + offs_d[None, :], acc)
        tl.debug_barrier()  # every thread's partial is written before the arrival is published
        arrived = tl.atomic_add(count_ptr + head, 1, sem="acq_rel", scope="gpu")
        if arrived == n_live - 1:  # only the G real rows now (G_M of them, not the 16 of tl.dot)
            offs_gm = tl.arange(0, G_M)
            gm_ok = offs_gm < G
            offs_sp = tl.arange(0, SPLIT_PAD)
            rows = (head * n_split + offs_sp[:, None]) * G_PAD + offs_gm[None, :]  # (SPLIT_PAD, G_M)
            sp_ok = (offs_sp < n_live)[:, None] & gm_ok[None, :]
            m_s = tl.load(ml_ptr + rows * 2, mask=sp_ok, other=float("-inf"), cache_modifier=".cg")
            l_s = tl.load(ml_ptr + rows * 2 + 1, mask=sp_ok, other=0.0, cache_modifier=".cg")
            m_all = tl.max(m_s, axis=0)  # (G_M,)
            m_all = tl.where(m_all == float("-inf"), 0.0, m_all)
            l_all = tl.sum(tl.exp(m_s - m_all[None, :]) * l_s, axis=0)
            total = tl.zeros((G_M, HD_PAD), tl.float32)
            offs_r = tl.arange(0, RS)
            for c in tl.static_range(0, SPLIT_PAD, RS):
                sp = c + offs_r
                rc = (head * n_split + sp[:, None]) * G_PAD + offs_gm[None, :]  # (RS, G_M)
                rc_ok = (sp < n_live)[:, None] & gm_ok[None, :]
                m_c = tl.load(ml_ptr + rc * 2, mask=rc_ok, other=float("-inf"), cache_modifier=".cg")
                a = tl.load(part_ptr + rc[:, :, None] * HD_PAD + offs_d[None, None, :],
                            mask=rc_ok[:, :, None], other=0.0, cache_modifier=".cg")  # (RS, G_M, HD_PAD)
                total += tl.sum(tl.exp(m_c - m_all[None, :])[:, :, None] * a, axis=0)
            merged_ptrs = out_ptr + head * stride_oh + offs_gm[:, None] * HD + offs_d[None, :]
            tl.store(merged_ptrs, (total / l_all[:, None]).to(out_ptr.dtype.element_ty),
                     mask=gm_ok[:, None] & d_ok[None, :])
            tl.store(count_ptr + head, 0)  # ready for the next call


@triton.jit
def _cache_tile(k_ptr, v_ptr, mask_ptr, head, s0, end, pos, offs_b, offs_d, d_ok, stride_kh, stride_ks,
                ROPE: tl.constexpr):
    """The BLOCK_S cache positions from s0 (k and v, (BLOCK_S, HD_PAD)) and which of them attend:
    below end and, causal (ROPE), up to pos, else where the mask is set. The rest are not loaded."""
    offs_s = s0 + offs_b
    if ROPE:
        valid = (offs_s < end) & (offs_s <= pos)
    else:
        valid = (offs_s < end) & (tl.load(mask_ptr + offs_s, mask=offs_s < end, other=0) != 0)
    kv_off = head * stride_kh + offs_s[:, None] * stride_ks + offs_d[None, :]
    kv_ok = valid[:, None] & d_ok[None, :]
    k = tl.load(k_ptr + kv_off, mask=kv_ok, other=0.0)
    v = tl.load(v_ptr + kv_off, mask=kv_ok, other=0.0)
    return k, v, valid


@triton.jit
def _attend(q, k, v, valid, offs_s, pos, k_new, v_new, m_i, l_i, acc, scale, ROPE: tl.constexpr,
            DOT_F32: tl.constexpr):
    """One tile's step of the online softmax: (m_i, l_i, acc) updated with positions offs_s."""
    if ROPE:  # this step's position, if here, from registers (the cache write may still be in flight)
        here = (offs_s == pos)[:, None]
        k = tl.where(here, k_new[None, :], k)
        v = tl.where(here, v_new[None, :], v)
    if DOT_F32:
        s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))  # (G_PAD, BLOCK_S) fp32
    s = tl.where(valid[None, :], s * scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing valid yet: keep sums at 0
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if DOT_F32:
        pv = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc * alpha[:, None] + pv


@triton.jit
def _rotate(x_ptrs, partner_ptrs, ok, cos, sin, RTNE_BY_BITS: tl.constexpr):
    """RoPE of x: x * cos + partner * sin (sin negated on even channels) in fp32, rounded to x's dtype."""
    x = tl.load(x_ptrs, mask=ok, other=0.0)
    partner = tl.load(partner_ptrs, mask=ok, other=0.0).to(tl.float32)
    return _round(x.to(tl.float32) * cos + partner * sin, x.dtype, RTNE_BY_BITS)


def head_stride(k) -> int:
    """Elements from the cache of head b * KV + kv to the next one's: stride(1), or stride(0) with one kv head
    (torch's contiguity ignores the stride of a size-1 dim, so it can be anything there)."""
    return k.stride(1) if k.shape[1] > 1 else k.stride(0)


def walkable(k, v) -> bool:
    """Whether the kernel walks caches k and v (B, KV, S, hd) as they are: one set of strides for
    both, unit stride along hd, each batch row's heads right after the previous row's."""
    batch_ok = k.shape[0] == 1 or k.stride(0) == k.shape[1] * head_stride(k)
    return k.stride() == v.stride() and k.stride(3) == 1 and batch_ok


def default_block_s(S: int) -> int:
    """Cache positions per step of the plain op: 32 timed fastest up to S = 512, 64 from S = 1024 on
    (scripts/bench_attention.py, 2 warps, Llama-3-8B heads; figures in docs/kernels.md)."""
    return 32 if S <= 512 else 64


def plan(S: int, n_heads: int, block_s: int, n_sm: int = 132, max_split: int = 32):
    """(per_split, n_split): positions per program (a multiple of block_s) and programs per head,
    about four programs per SM of the device in all and at most max_split partials to merge."""
    n_split = max(1, min(max_split, -(-S // block_s), -(-4 * n_sm // max(1, n_heads))))
    per_split = -(-(-(-S // n_split)) // block_s) * block_s
    return per_split, -(-S // per_split)


# The decode step's geometry, chosen by the step's cost in a CUDA graph of q/k/v -> step -> o (Llama-3-8B heads,
# B = 1, bf16; figures in docs/kernels.md, "Decode attention"): with caches of up to 256 positions one program per
# head walks them 128 at a time (8 warps, no pipelining), since a merge of splits or a second tile costs a few
# times what a single tile does; longer caches are split 32 positions at a time (4 warps) over as many programs
# as the step's position needs.
STEP_ONE_PROGRAM_MAX_S = 256


def geometry(S: int, n_heads: int, n_sm: int = 132, step: bool = False, block_s: int = 0, num_warps: int = 0,
             row_bytes: int = 256):
    """dict(block_s, num_warps, num_stages (0: Triton's default), per_split, n_split) of a launch over caches
    of S positions; block_s and num_warps override the defaults (0: the defaults). step: the decode step's
    geometry, whose kernel splits only the positions up to the step's, in at most per_split positions a
    program; row_bytes (padded hd x element size) bounds its one-program tile."""
    if step and S <= STEP_ONE_PROGRAM_MAX_S:  # tiles of at most 64 KB of k (the dots stage k and v in shared memory)
        block_s = block_s or min(128, max(16, next_pow2(S)), max(16, 65536 // row_bytes))
        return dict(block_s=block_s, num_warps=num_warps or 8, num_stages=1, per_split=-(-S // block_s) * block_s,
                    n_split=1)
    block_s = block_s or (32 if step else default_block_s(S))
    per_split, n_split = plan(S, n_heads, block_s, n_sm)
    return dict(block_s=block_s, num_warps=num_warps or (4 if step else 2), num_stages=0, per_split=per_split,
                n_split=n_split)


def workspace_sizes(n_heads: int, G: int, hd: int, S: int, block_s: int = 0, n_sm: int = 132, step: bool = False):
    """fp32 partial words (accumulators, then m and l) and int32 counters one call needs."""
    n_split = geometry(S, n_heads, n_sm, step, block_s)["n_split"]
    rows = n_heads * n_split * max(16, next_pow2(G))  # as launch pads G
    return rows * (max(16, next_pow2(hd)) + 2), n_heads


def launch(q, k, v, mask, out, part, counts, block_s: int = 0, num_warps: int = 0, n_sm: int = 132,
           rope=None):
    """q (B, KV, G, hd) with unit stride in hd, out (B * KV, G, hd) contiguous; k, v: the caches
    (B, KV, S, hd), contiguous per (b, kv) head with unit stride in hd; mask (S,) bool/uint8
    (None with rope); n_sm: the device's SM count; block_s, num_warps 0: geometry's defaults. rope: None, or
    (k_new, v_new (B, KV, hd) with unit stride in hd, the RoPE table (>= S, hd/2, 2) fp32 cos/sin
    with unit inner strides, pos (1,) int) for the causal decode step (q and k_new unrotated;
    k_new, v_new written to the caches at pos; positions <= pos attend).
    Workspaces: see workspace_sizes (same block_s and n_sm, step=rope is not None)."""
    grid, args, meta = launch_plan(q, k, v, mask, out, part, counts, block_s, num_warps, n_sm, rope,
                                   interpreted=is_interpreted(decode_attention_kernel))
    decode_attention_kernel[grid](*args, **meta)
    return out


def launch_plan(q, k, v, mask, out, part, counts, block_s: int = 0, num_warps: int = 0, n_sm: int = 132,
                rope=None, interpreted=False):
    """launch's grid, positional arguments and keyword arguments, for Triton's interpreter or a GPU."""
    B, KV, G, hd = q.shape
    S = k.shape[2]
    if not walkable(k, v) or q.stride(3) != 1:
        raise ValueError("decode attention: k and v must share one layout, with unit stride along hd and each "
                         "batch row's heads after the previous row's; q needs unit stride along hd")
    H = B * KV
    geo = geometry(S, H, n_sm, rope is not None, block_s, num_warps, max(16, next_pow2(hd)) * q.element_size())
    block_s, per_split, n_split = geo["block_s"], geo["per_split"], geo["n_split"]
    g_pad, hd_pad = max(16, next_pow2(G)), max(16, next_pow2(hd))
    rows = H * n_split * g_pad
    split_pad = next_pow2(n_split)
    g_m = next_pow2(G)
    rs = min(split_pad, max(1, 4096 // (g_m * hd_pad)))  # splits per merge load: 16 KB of fp32
    check_int32_offsets(max(B * KV * head_stride(k), q.shape[0] * q.stride(0)), "decode attention: caches")
    k_new, v_new, freqs, pos = rope if rope is not None else (q, q, q, q)  # unused without rope
    if rope is not None and (k_new.stride() != v_new.stride() or k_new.stride(2) != 1 or freqs.stride(1) != 2
                             or freqs.stride(2) != 1):
        raise ValueError("decode attention: the new k and v must share one layout with unit stride along hd, "
                         "and the RoPE table must be contiguous per row")
    mask = q if mask is None else mask.view(torch.uint8)  # the step reads no mask
    args = (q, k, v, mask, out, part, part[rows * hd_pad:], counts, k_new, v_new, freqs, pos,
            S, G, hd, KV, per_split, n_split, hd ** -0.5,
            q.stride(0), q.stride(1), q.stride(2), k_new.stride(0), k_new.stride(1) if rope is not None else 0,
            freqs.stride(0) if rope is not None else 0,
            head_stride(k), k.stride(2), out.stride(0))
    trigger = pdl_enabled(q.device, interpreted)  # the o projection may launch during the merge
    pdl = trigger and rope is not None  # the decode step waits for q/k/v only after its cache loads
    meta = dict(G_PAD=g_pad, G_M=g_m, HD_PAD=hd_pad, BLOCK_S=block_s, SPLIT_PAD=split_pad, RS=rs, ROPE=rope is not None,
                # the interpreter's static loop bound: per_split also bounds the step's splits of 0..pos
                STATIC_STEPS=per_split // block_s if interpreted else 0,
                DOT_F32=q.dtype == torch.float32 or interpreted,  # fp32: exact (ieee) dots
                RTNE_BY_BITS=interpreted and q.dtype == torch.bfloat16, num_warps=geo["num_warps"],
                PDL=pdl, TRIGGER=trigger)
    if geo["num_stages"]:
        meta["num_stages"] = geo["num_stages"]
    if pdl:
        meta["launch_pdl"] = True
    return (H, n_split), args, meta
