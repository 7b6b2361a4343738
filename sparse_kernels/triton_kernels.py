"""Triton kernels for the column-sparse matvec (thresholded and dense), and their launcher.

Two kernels, one per idea, share their phases (the @triton.jit helpers below). The grid of both is
(N tiles, K chunks); a program owns BLOCK_N output columns and K_CHUNK rows of W^T (K, N).

sparse_matvec_kernel: a program loads x of every batch row over its K chunk, finds the rows any
batch row keeps (|x| > t, t the threshold of the tile's segment) and compacts their indices
(cumsum, scattered to a small per-program scratch). It then streams only those rows of W^T,
BLOCK_K gathered rows per step (each a contiguous BLOCK_N slice), so bytes and steps scale with
1 - p. RANKED (B == 1 tiles where DEPTH * BLOCK_K * K_CHUNK is small: the MLP's tuned ones): the
first DEPTH steps' row indices are ranked in registers from the cumsum (the j-th kept row is the
number of rows placed before j), so those rows are requested before the scratch is written and
read back; the rest of the stream reads its indices from the scratch.

dense_matvec_kernel: every row, the plain product with the same fusions. The rows of a program's
chunk are known before its input is, so the first DEPTH steps' rows are requested first, ahead
of the input and its norm.

Shared by both:
- Products are accumulated in fp32 (tl.dot for batches, FMAs for B == 1).
- Fusions that save a launch each in a decoder block: SILU (the input is silu(gate) * up, formed
  from gate_up while loading, fp32 rounded once to the dtype), NORM (the input is RMSNorm(h) *
  weight, computed from h in the load: every program sums the squares of the whole row, which sits
  in L2), RESIDUAL (the output is residual + product).
- WEIGHTS: "float" (W^T in the activations' dtype), "int8" (W^T int8, one fp32 scale per output
  column: w = q * scale[n]) or "int4" (two 4-bit values a byte along N, the low nibble the even
  column; per group of GROUP rows and per column a scale and an offset: w = q * scale[g, n] +
  zero[g, n]). A row is loaded as stored, as int32 words where rows are whole words (WORDS), and
  converted in registers by integer arithmetic (_as_float, _unpacked). Scales are per column, so
  they multiply the program's sum once: int8 acc * scale (B == 1 words: less 128 times the kept
  inputs' sum, the offset of _unpacked's subnormal bytes); int4 (a chunk lies inside one group)
  acc * scale + zero * (the sum of the chunk's kept inputs); a B == 1 int4 chunk over GROUPS > 1
  groups scales each group's sum in the stream (a sparse one first places each group's kept rows
  from a round of the stream: _group_places). A program with no kept row reads no scale either.
- Split-K reduction without a memset: each program stores its fp32 partial tile to a persistent
  workspace (SPLIT, B, N) and increments the tile's arrival counter; the last to arrive sums the
  partials in split order (deterministic), writes y and resets the counter to 0 for the next call.
- On Hopper and newer (pdl_enabled) the kernels are launched with programmatic dependent launch:
  they are placed on the GPU while the kernel before them drains, and wait for it (gdc_wait)
  before their first load, except a dense kernel, which requests its first rows before it waits
  (and is launched without PDL right after the op's own copy of its weights). Every kernel lets
  its successor launch once all its programs have streamed their rows (TRIGGER), so the next
  matvec or the decode attention launches during the split-K tail.

INTERPRET, the one flag for Triton's CPU interpreter (the tests), changes three things, each in
one helper: loop bounds are static (_round_count: the interpreter cannot take a runtime range bound
with numpy >= 2.4), tl.dot widens its operands to fp32 (_accumulate: its bf16 tl.dot is wrong in
triton 3.6; the products are exact in fp32 either way), and fp32 -> bf16 rounds to nearest even by
integer arithmetic (_round: the interpreter truncates).
"""
import os

import torch
import triton
import triton.language as tl

try:  # programmatic dependent launch (recent Triton: 3.6 has it)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # older Triton: pdl_enabled is False, so the kernels never reach these names
    gdc_launch_dependents = gdc_wait = None


# Inputs times this (an exact power of two) meet int8 and int4 values read as fp32 subnormals
# (_unpacked: b = q + 128 for int8, q for int4): the products x * b * 2^(p - 85) (p: the value's bit
# in its word) are normal, so as exact as x * b, for 2^-41 <= |x| * b * 2^p and |x| < 2^64.
SUBNORMAL_LIFT = tl.constexpr(2.0 ** 64)


@triton.jit
def _program(SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_CHUNK: tl.constexpr):
    """This program's tile: (pid_n, pid_k, first column n0, first row k0 of its K chunk, its index among
    the grid's programs, the step's row offsets (BLOCK_K,))."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    return pid_n, pid_k, pid_n * BLOCK_N, pid_k * K_CHUNK, pid_n * SPLIT + pid_k, tl.arange(0, BLOCK_K)


@triton.jit
def sparse_matvec_kernel(
    x_ptr, w_ptr, scale_ptr, zero_ptr, thr_ptr, y_ptr, part_ptr, count_ptr, idx_ptr, xs_ptr, nw_ptr, res_ptr,
    B, K, N, stride_x, stride_w, stride_y, stride_r, eps,
    bound1, bound2, bound3,  # first columns of segments 1..3 (multiples of BLOCK_N; N if absent)
    SPLIT: tl.constexpr,  # K chunks: the grid's second axis
    B_X: tl.constexpr, B_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_CHUNK: tl.constexpr,
    DEPTH: tl.constexpr, DOT: tl.constexpr, RED_R: tl.constexpr, EVEN_N: tl.constexpr,
    SILU: tl.constexpr, NORM: tl.constexpr, NORM_BLOCK: tl.constexpr, NORM_STEPS: tl.constexpr,
    RESIDUAL: tl.constexpr, WEIGHTS: tl.constexpr, GROUP: tl.constexpr, GROUPS: tl.constexpr, WORDS: tl.constexpr,
    RANKED: tl.constexpr,
    PDL: tl.constexpr, TRIGGER: tl.constexpr, INTERPRET: tl.constexpr,
):
    """y = [residual +] x_kept @ W^T, keeping x[b, k] iff |x[b, k]| > the threshold of the column's segment."""
    pid_n, pid_k, n0, k0, prog, offs_j = _program(SPLIT, BLOCK_N, BLOCK_K, K_CHUNK)
    idx_base = idx_ptr + prog * K_CHUNK
    xs_base = xs_ptr + prog * (B_X * K_CHUNK)
    if PDL:  # the previous kernel's writes (x, the workspace) are visible from here on
        gdc_wait()
    # the segment's threshold, requested with the input (after the wait: a copy just before may have written it)
    seg = (n0 >= bound1).to(tl.int32) + (n0 >= bound2).to(tl.int32) + (n0 >= bound3).to(tl.int32)
    t = tl.load(thr_ptr + seg).to(tl.float32)

    # 1. Which rows of this K chunk does any batch row keep?
    offs_c = k0 + tl.arange(0, K_CHUNK)
    offs_bx = tl.arange(0, B_X)
    bc_ok = (offs_bx < B)[:, None] & (offs_c < K)[None, :]
    x_chunk = _chunk_input(x_ptr, nw_ptr, offs_bx, offs_c, bc_ok, B, K, stride_x, eps, B_X, SILU, NORM, NORM_BLOCK,
                           NORM_STEPS, INTERPRET)
    keep = (tl.abs(x_chunk.to(tl.float32)) > t) & bc_ok  # (B_X, K_CHUNK)
    need = tl.max(keep.to(tl.int32), axis=0)  # (K_CHUNK,) 0/1: any batch row keeps the row
    pos = tl.cumsum(need, axis=0) - 1  # (K_CHUNK,) each kept row's place in the compacted order
    count = tl.sum(need, axis=0)
    input_sum = _offset_sum(x_chunk, keep, WEIGHTS, DOT, WORDS)  # (int8 words, see _from_words)
    # where the kept rows go in the scratch, and the row each place holds (-1: a hole, nothing read)
    place, placed, row = pos, need > 0, offs_c
    first_group, first_count = 0, count  # the first group with a kept row; its kept rows
    group_sums = 0.0
    if GROUPS > 1:  # int4 over several groups: each group's kept rows start a round of the stream
        place, placed, count, first, first_count = _group_places(need, K_CHUNK, GROUP, GROUPS, DEPTH * BLOCK_K)
        row = tl.where(need > 0, offs_c, -1)
        first_group = k0 // GROUP + first
        group_sums = _group_sums(tl.where(keep, x_chunk, 0.0), GROUP, GROUPS)

    # 2. Compact the kept rows, then stream only those. The first round lies in the first group with rows.
    if RANKED:  # the first rows' indices from pos in registers: requested before the scratch round trip
        wa, wb, wc, wd = _first_rows(w_ptr, pos, first_count, k0, offs_j, n0, N, stride_w, BLOCK_N, BLOCK_K, DEPTH,
                                     EVEN_N, WEIGHTS, False, RANKED)
        tl.debug_barrier()  # a fence for the compiler, which would otherwise move the loads to their first use
    _compact(idx_base, xs_base, x_chunk, keep, place, placed, row, offs_bx, bc_ok, K_CHUNK)
    if not RANKED:
        wa, wb, wc, wd = _first_rows(w_ptr, idx_base, first_count, k0, offs_j, n0, N, stride_w, BLOCK_N, BLOCK_K,
                                     DEPTH, EVEN_N, WEIGHTS, False, RANKED)
    acc = _stream(wa, wb, wc, wd, w_ptr, idx_base, xs_base, count, k0, first_group, group_sums, offs_j, n0, N,
                  stride_w, B, scale_ptr, zero_ptr, B_PAD, BLOCK_N, BLOCK_K, K_CHUNK, DEPTH, DOT, EVEN_N, WEIGHTS,
                  GROUP, GROUPS, WORDS, False, INTERPRET)
    if TRIGGER:  # rows streamed: the next kernel, if launched with PDL, may launch during the split-K reduction
        gdc_launch_dependents()

    # 3. Scales, then the split-K reduction.
    _finish(acc, count, input_sum, k0, pid_n, pid_k, y_ptr, part_ptr, count_ptr, res_ptr, scale_ptr, zero_ptr,
            xs_base, B, N, stride_y, stride_r, SPLIT, B_PAD, BLOCK_N, K_CHUNK, DOT, RED_R, RESIDUAL, WEIGHTS, GROUP,
            GROUPS, WORDS)


@triton.jit
def dense_matvec_kernel(
    x_ptr, w_ptr, scale_ptr, zero_ptr, y_ptr, part_ptr, count_ptr, xs_ptr, nw_ptr, res_ptr,
    B, K, N, stride_x, stride_w, stride_y, stride_r, eps,
    SPLIT: tl.constexpr,
    B_X: tl.constexpr, B_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_CHUNK: tl.constexpr,
    DEPTH: tl.constexpr, DOT: tl.constexpr, RED_R: tl.constexpr, EVEN_N: tl.constexpr,
    SILU: tl.constexpr, NORM: tl.constexpr, NORM_BLOCK: tl.constexpr, NORM_STEPS: tl.constexpr,
    RESIDUAL: tl.constexpr, WEIGHTS: tl.constexpr, GROUP: tl.constexpr, GROUPS: tl.constexpr, WORDS: tl.constexpr,
    PDL: tl.constexpr, TRIGGER: tl.constexpr, INTERPRET: tl.constexpr,
):
    """y = [residual +] x @ W^T: every row of the chunk, the first DEPTH steps' rows requested before anything else."""
    pid_n, pid_k, n0, k0, prog, offs_j = _program(SPLIT, BLOCK_N, BLOCK_K, K_CHUNK)
    xs_base = xs_ptr + prog * (B_X * K_CHUNK)
    count = tl.minimum(K - k0, K_CHUNK)
    wa, wb, wc, wd = _first_rows(w_ptr, xs_base, count, k0, offs_j, n0, N, stride_w, BLOCK_N, BLOCK_K, DEPTH, EVEN_N,
                                 WEIGHTS, True, False)
    tl.debug_barrier()  # a fence for the compiler, which would otherwise move the loads to their first use
    if PDL:  # the previous kernel's writes (x, the workspace) are visible from here on
        gdc_wait()

    # 1. The chunk's inputs, stored as they are for the stream.
    offs_c = k0 + tl.arange(0, K_CHUNK)
    offs_bx = tl.arange(0, B_X)
    bc_ok = (offs_bx < B)[:, None] & (offs_c < K)[None, :]
    x_chunk = _chunk_input(x_ptr, nw_ptr, offs_bx, offs_c, bc_ok, B, K, stride_x, eps, B_X, SILU, NORM, NORM_BLOCK,
                           NORM_STEPS, INTERPRET)
    tl.store(xs_base + offs_bx[:, None] * K_CHUNK + (offs_c - k0)[None, :], x_chunk.to(xs_ptr.dtype.element_ty),
             mask=bc_ok)
    input_sum = _offset_sum(x_chunk, bc_ok, WEIGHTS, DOT, WORDS)  # (int8 words, see _from_words)
    tl.debug_barrier()  # the whole CTA's inputs are visible before they are read back

    # 2. Stream every row.
    first_group, group_sums = 0, 0.0
    if GROUPS > 1:
        first_group = k0 // GROUP
        group_sums = _group_sums(x_chunk, GROUP, GROUPS)
    acc = _stream(wa, wb, wc, wd, w_ptr, xs_base, xs_base, count, k0, first_group, group_sums, offs_j, n0, N,
                  stride_w, B, scale_ptr, zero_ptr, B_PAD, BLOCK_N, BLOCK_K, K_CHUNK, DEPTH, DOT, EVEN_N, WEIGHTS,
                  GROUP, GROUPS, WORDS, True, INTERPRET)
    if TRIGGER:
        gdc_launch_dependents()

    # 3. Scales, then the split-K reduction.
    _finish(acc, count, input_sum, k0, pid_n, pid_k, y_ptr, part_ptr, count_ptr, res_ptr, scale_ptr, zero_ptr,
            xs_base, B, N, stride_y, stride_r, SPLIT, B_PAD, BLOCK_N, K_CHUNK, DOT, RED_R, RESIDUAL, WEIGHTS, GROUP,
            GROUPS, WORDS)


# ---------------------------------------------------------------------------- phase 1: the input

@triton.jit
def _chunk_input(x_ptr, nw_ptr, offs_bx, offs_c, bc_ok, B, K, stride_x, eps, B_X: tl.constexpr, SILU: tl.constexpr,
                 NORM: tl.constexpr, NORM_BLOCK: tl.constexpr, NORM_STEPS: tl.constexpr, INTERPRET: tl.constexpr):
    """The chunk's inputs (B_X, K_CHUNK) in the activations' dtype: x, silu(gate) * up, or RMSNorm(h) * weight."""
    x_chunk = _input(x_ptr, offs_bx[:, None] * stride_x + offs_c[None, :], bc_ok, K, SILU, INTERPRET)
    if NORM:  # x is RMSNorm(h) * weight: the row's rstd from all of h (every program; K values from L2)
        x_chunk = _rms_normed(x_ptr, nw_ptr, x_chunk, offs_bx, offs_c, B, K, stride_x, eps, B_X, NORM_BLOCK,
                              NORM_STEPS, INTERPRET)
    return x_chunk


@triton.jit
def _input(x_ptr, offs, mask, K, SILU: tl.constexpr, INTERPRET: tl.constexpr):
    """x at offs; with SILU, h = silu(gate) * up from gate_up rows, in fp32, rounded to the dtype."""
    xv = tl.load(x_ptr + offs, mask=mask, other=0.0, eviction_policy="evict_last")
    if SILU:
        g = xv.to(tl.float32)
        u = tl.load(x_ptr + offs + K, mask=mask, other=0.0, eviction_policy="evict_last").to(tl.float32)
        xv = _round(g / (1.0 + tl.exp(-g)) * u, x_ptr.dtype.element_ty, INTERPRET)
    return xv


@triton.jit
def _rms_normed(x_ptr, nw_ptr, xc, offs_bx, offs_c, B, K, stride_x, eps,
                B_X: tl.constexpr, NORM_BLOCK: tl.constexpr, NORM_STEPS: tl.constexpr, INTERPRET: tl.constexpr):
    """RMSNorm of the chunk xc (B_X, K_CHUNK) of rows h: (h * rstd) rounded to the dtype, times
    the norm weight, rounded again (reference.rms_norm); rstd from the sum of squares of all K."""
    dtype = xc.dtype
    nw = tl.load(nw_ptr + offs_c, mask=offs_c < K, other=0.0).to(tl.float32)
    # A fence for the compiler: without it Triton moves each load to just before its first use, so
    # the weight's load (and the caller's of xc) would go out only after the row's reduction: two
    # more round trips to L2. With it every load of this phase is in flight at once.
    tl.debug_barrier()
    ss = tl.zeros((B_X,), dtype=tl.float32)
    b_ok = offs_bx < B
    for j in tl.static_range(NORM_STEPS):  # unrolled: all of the row's loads in flight at once
        offs = j * NORM_BLOCK + tl.arange(0, NORM_BLOCK)
        h = tl.load(x_ptr + offs_bx[:, None] * stride_x + offs[None, :], mask=b_ok[:, None] & (offs < K)[None, :],
                    other=0.0, eviction_policy="evict_last").to(tl.float32)
        ss += tl.sum(h * h, axis=1)
    rstd = tl.math.rsqrt(ss / K + eps)  # (B_X,)
    normed = _round(xc.to(tl.float32) * rstd[:, None], dtype, INTERPRET).to(tl.float32)
    return _round(normed * nw[None, :], dtype, INTERPRET)


@triton.jit
def _round(v, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """fp32 v rounded to dtype (nearest even). The interpreter truncates to bf16: there, by integer arithmetic."""
    if INTERPRET and dtype == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True).to(dtype)  # the low half is zero: exact
    return v.to(dtype)


@triton.jit
def _compact(idx_base, xs_base, x_chunk, keep, place, placed, row, offs_bx, bc_ok, K_CHUNK: tl.constexpr):
    """Store the rows `row` (-1 for a hole) and their inputs (zero where a batch row drops the row, and
    in holes) in this program's scratch at their places, where `placed`."""
    tl.store(idx_base + place, row, mask=placed)
    tl.store(xs_base + offs_bx[:, None] * K_CHUNK + place[None, :],
             tl.where(keep, x_chunk, 0.0).to(xs_base.dtype.element_ty), mask=placed[None, :] & bc_ok)
    tl.debug_barrier()  # the whole CTA's scratch stores are visible before they are read back


@triton.jit
def _group_places(need, K_CHUNK: tl.constexpr, GROUP: tl.constexpr, GROUPS: tl.constexpr, ROUND: tl.constexpr):
    """Places in the scratch for a chunk of GROUPS groups of GROUP rows, so that no round of the
    stream (ROUND places) holds two groups' rows: group g's kept rows, in order, from place
    start[g], a multiple of ROUND, then holes up to the next multiple. A dropped row writes a hole
    (the first dropped rows of a group, one hole each: a group has as many dropped rows as
    GROUP - kept >= its holes, for ROUND divides GROUP).
    Returns (place (K_CHUNK,), whether the row writes there, the places to stream, the chunk's first
    group with a kept row (GROUPS if none), its kept rows)."""
    need = tl.reshape(need, (GROUPS, GROUP))
    upto = tl.cumsum(need, axis=1)  # (GROUPS, GROUP) kept rows of the group up to and including each
    kept = tl.sum(need, axis=1)  # (GROUPS,)
    rounded = (kept + ROUND - 1) // ROUND * ROUND
    start = tl.cumsum(rounded, axis=0) - rounded
    i = tl.arange(0, GROUP)[None, :]
    place = tl.where(need > 0, start[:, None] + upto - 1, start[:, None] + kept[:, None] + i - upto)
    placed = (need > 0) | (i - upto < (rounded - kept)[:, None])
    gs = tl.arange(0, GROUPS)
    first = tl.min(tl.where(kept > 0, gs, GROUPS), axis=0)
    first_kept = tl.sum(tl.where(gs == first, kept, 0), axis=0)
    return (tl.reshape(place, (K_CHUNK,)), tl.reshape(placed, (K_CHUNK,)), tl.sum(rounded, axis=0), first,
            first_kept)


# ---------------------------------------------------------------------------- phase 2: the stream

@triton.jit
def _stream(wa, wb, wc, wd, w_ptr, idx_base, xs_base, count, k0, first_group, group_sums, offs_j, n0, N, stride_w, B,
            scale_ptr, zero_ptr,
            B_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_CHUNK: tl.constexpr,
            DEPTH: tl.constexpr, DOT: tl.constexpr, EVEN_N: tl.constexpr, WEIGHTS: tl.constexpr, GROUP: tl.constexpr,
            GROUPS: tl.constexpr, WORDS: tl.constexpr, DENSE: tl.constexpr, INTERPRET: tl.constexpr):
    """The product over the chunk's first `count` scratch positions, whose first DEPTH steps of
    rows wa, wb (, wc, wd) are already requested. (B_PAD, BLOCK_N) fp32.

    BLOCK_K gathered rows of W^T per step (each a contiguous BLOCK_N slice), DEPTH steps in
    flight. Buffers a, b (, c, d) take turns: a step is summed, then its buffer is refilled with
    the rows DEPTH steps ahead, whose indices were loaded a round earlier. A buffer is overwritten
    only after its last use, so no register copy at the loop's end waits on a load in flight
    (which the usual "w_cur = w_next" rotation compiles to: one step in flight, the whole latency
    paid every step).

    GROUPS > 1 (int4, B == 1: the chunk spans GROUPS groups of GROUP rows; no round holds rows of two
    groups, see _group_places): acc holds the current group's products. When the next round's rows
    are another group's (its first row's index, loaded a round ahead), acc times the group's scales
    is added to total elementwise (no reduction in the loop), and the next group's scales are
    requested, used a group later. The offsets' share, each group's kept inputs (group_sums, from
    phase 1) times its offsets, is computed before the loop and starts total."""
    HOLES: tl.constexpr = GROUPS > 1 and not DENSE  # places in the sparse scratch that hold no row
    offs_b = tl.arange(0, B_PAD)
    b_ok = offs_b < B
    if DOT:
        acc = tl.zeros((B_PAD, BLOCK_N), dtype=tl.float32)
    else:  # B_PAD == 1: products summed over K at the end, no cross-thread work in the loop
        acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    # each buffer's inputs, and the indices it is refilled with on its first turn
    # (the loads' arguments are spelled out: a constexpr inside a tuple would no longer be one)
    xa = _inputs(xs_base, offs_j, count, offs_b, b_ok, K_CHUNK, DOT)
    ka = _indices(idx_base, DEPTH * BLOCK_K + offs_j, count, k0, DENSE)
    xb = _inputs(xs_base, BLOCK_K + offs_j, count, offs_b, b_ok, K_CHUNK, DOT)
    kb = _indices(idx_base, (DEPTH + 1) * BLOCK_K + offs_j, count, k0, DENSE)
    if DEPTH >= 3:
        xc = _inputs(xs_base, 2 * BLOCK_K + offs_j, count, offs_b, b_ok, K_CHUNK, DOT)
        kc = _indices(idx_base, (DEPTH + 2) * BLOCK_K + offs_j, count, k0, DENSE)
    if DEPTH == 4:
        xd = _inputs(xs_base, 3 * BLOCK_K + offs_j, count, offs_b, b_ok, K_CHUNK, DOT)
        kd = _indices(idx_base, (DEPTH + 3) * BLOCK_K + offs_j, count, k0, DENSE)
    if GROUPS > 1:
        offsets = _offset_terms(zero_ptr, group_sums, k0 // GROUP, n0 + tl.arange(0, BLOCK_N), N, GROUPS)
        total = tl.where(offs_j[:, None] == 0, offsets[None, :], 0.0)  # (BLOCK_K, BLOCK_N): in its first row
        g = first_group
        scale = _group_scales(scale_ptr, g, count > 0, n0 + tl.arange(0, BLOCK_N), N, WEIGHTS, WORDS, DOT)
        g_next = _group_at(idx_base, DEPTH * BLOCK_K, count, k0, GROUP, DENSE)  # the group of round 1's rows
    for r in range(0, _round_count(count, BLOCK_K, K_CHUNK, DEPTH, INTERPRET)):
        j = (r + 1) * DEPTH * BLOCK_K + offs_j  # the rows buffer a is refilled with
        if GROUPS > 1:
            g_after = _group_at(idx_base, (r + 2) * DEPTH * BLOCK_K, count, k0, GROUP, DENSE)  # used a round on
        acc, wa, xa, ka = _turn(acc, wa, xa, ka, j, w_ptr, idx_base, xs_base, count, k0, offs_b, b_ok, n0, N,
                                stride_w, BLOCK_N, BLOCK_K, K_CHUNK, DEPTH, EVEN_N, DOT, WEIGHTS, DENSE, HOLES,
                                INTERPRET)
        acc, wb, xb, kb = _turn(acc, wb, xb, kb, j + BLOCK_K, w_ptr, idx_base, xs_base, count, k0, offs_b, b_ok, n0,
                                N, stride_w, BLOCK_N, BLOCK_K, K_CHUNK, DEPTH, EVEN_N, DOT, WEIGHTS, DENSE, HOLES,
                                INTERPRET)
        if DEPTH >= 3:
            acc, wc, xc, kc = _turn(acc, wc, xc, kc, j + 2 * BLOCK_K, w_ptr, idx_base, xs_base, count, k0, offs_b,
                                    b_ok, n0, N, stride_w, BLOCK_N, BLOCK_K, K_CHUNK, DEPTH, EVEN_N, DOT, WEIGHTS,
                                    DENSE, HOLES, INTERPRET)
        if DEPTH == 4:
            acc, wd, xd, kd = _turn(acc, wd, xd, kd, j + 3 * BLOCK_K, w_ptr, idx_base, xs_base, count, k0, offs_b,
                                    b_ok, n0, N, stride_w, BLOCK_N, BLOCK_K, K_CHUNK, DEPTH, EVEN_N, DOT, WEIGHTS,
                                    DENSE, HOLES, INTERPRET)
        if GROUPS > 1:
            if g_next != g:  # the group ends (-1: the stream does): scale it into total, request the next's scales
                total += acc * scale[None, :]
                acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
                g = g_next
                scale = _group_scales(scale_ptr, g, g >= 0, n0 + tl.arange(0, BLOCK_N), N, WEIGHTS, WORDS, DOT)
            g_next = g_after
    if GROUPS > 1:  # (the last group was scaled in the loop where the loop reaches count, else here)
        acc = total + acc * scale[None, :]
    if not DOT:
        acc = tl.sum(acc, axis=0)[None, :]  # (1, BLOCK_N)
    return acc


@triton.jit
def _round_count(count, BLOCK_K: tl.constexpr, K_CHUNK: tl.constexpr, DEPTH: tl.constexpr, INTERPRET: tl.constexpr):
    """Rounds of DEPTH steps the stream runs past its first: enough for `count` rows on a GPU; under
    the interpreter a static bound (a full chunk's rounds, the extra ones fully masked)."""
    if INTERPRET:
        return (K_CHUNK // BLOCK_K + DEPTH - 1) // DEPTH
    return tl.cdiv(tl.cdiv(count, BLOCK_K), DEPTH)


@triton.jit
def _group_at(idx_base, place, count, k0, GROUP: tl.constexpr, DENSE: tl.constexpr):
    """The group of the row at a round's first place (always a row, not a hole, below count); -1 past count."""
    if DENSE:
        k = k0 + place
    else:
        k = tl.load(idx_base + place, mask=place < count, other=0, cache_modifier=".cg")
    return tl.where(place < count, k // GROUP, -1)


@triton.jit
def _first_rows(w_ptr, where, count, k0, offs_j, n0, N, stride_w, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                DEPTH: tl.constexpr, EVEN_N: tl.constexpr, WEIGHTS: tl.constexpr, DENSE: tl.constexpr,
                RANKED: tl.constexpr):
    """The rows of the first DEPTH steps, one buffer each (c and d repeat a and b below DEPTH 3, 4).
    Their indices: k0 + j (DENSE), ranked from the places `where` = pos (RANKED), else loaded from
    the scratch at `where` = idx_base. (A sparse chunk over several groups: count is the first group's
    kept rows, so no hole of its first round is read.)"""
    wa = _rows(w_ptr, _first_indices(where, offs_j, count, k0, DENSE, RANKED), offs_j, count, n0, N, stride_w, BLOCK_N,
               EVEN_N, WEIGHTS, False)
    j = BLOCK_K + offs_j
    wb = _rows(w_ptr, _first_indices(where, j, count, k0, DENSE, RANKED), j, count, n0, N, stride_w, BLOCK_N, EVEN_N,
               WEIGHTS, False)
    wc, wd = wa, wb
    if DEPTH >= 3:
        j = 2 * BLOCK_K + offs_j
        wc = _rows(w_ptr, _first_indices(where, j, count, k0, DENSE, RANKED), j, count, n0, N, stride_w, BLOCK_N,
                   EVEN_N, WEIGHTS, False)
    if DEPTH == 4:
        j = 3 * BLOCK_K + offs_j
        wd = _rows(w_ptr, _first_indices(where, j, count, k0, DENSE, RANKED), j, count, n0, N, stride_w, BLOCK_N,
                   EVEN_N, WEIGHTS, False)
    return wa, wb, wc, wd


@triton.jit
def _first_indices(where, j, count, k0, DENSE: tl.constexpr, RANKED: tl.constexpr):
    """Row indices of the first steps' positions j. RANKED: the j-th kept row of the chunk is the
    number of rows placed before j (pos < j), a (len(j), K_CHUNK) compare and sum in registers."""
    if RANKED:
        kk = tl.where(j < count, k0 + tl.sum((where[None, :] < j[:, None]).to(tl.int32), axis=1), 0)
    else:
        kk = _indices(where, j, count, k0, DENSE)
    return kk


@triton.jit
def _turn(acc, w, xm, kk, j, w_ptr, idx_base, xs_base, count, k0, offs_b, b_ok, n0, N, stride_w,
          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_CHUNK: tl.constexpr, DEPTH: tl.constexpr,
          EVEN_N: tl.constexpr, DOT: tl.constexpr, WEIGHTS: tl.constexpr, DENSE: tl.constexpr, HOLES: tl.constexpr,
          INTERPRET: tl.constexpr):
    """A buffer's turn: sum its step into acc, then refill it with the rows of positions j (their
    indices kk were loaded a round earlier) and load the indices of the positions DEPTH steps on."""
    acc = _accumulate(acc, xm, w, DOT, WEIGHTS, INTERPRET)
    w = _rows(w_ptr, kk, j, count, n0, N, stride_w, BLOCK_N, EVEN_N, WEIGHTS, HOLES)
    xm = _inputs(xs_base, j, count, offs_b, b_ok, K_CHUNK, DOT)
    return acc, w, xm, _indices(idx_base, j + DEPTH * BLOCK_K, count, k0, DENSE)


@triton.jit
def _indices(idx_base, j, count, k0, DENSE: tl.constexpr):
    """Row indices of step positions j (0 past count): compacted in the scratch, or (DENSE) k0 + j."""
    if DENSE:
        kk = tl.where(j < count, k0 + j, 0)
    else:
        kk = tl.load(idx_base + j, mask=j < count, other=0, cache_modifier=".cg")
    return kk


@triton.jit
def _rows(w_ptr, kk, j, count, n0, N, stride_w, BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr,
          WEIGHTS: tl.constexpr, HOLES: tl.constexpr):
    """Rows kk of W^T over the tile's BLOCK_N columns, as stored (BLOCK_K, BLOCK_N); positions j past
    count, and holes (kk -1, HOLES: a sparse chunk over several groups), read nothing. int4: BLOCK_N
    / 2 bytes a row, unpacked in registers (low nibble first).
    Words (w_ptr int32: int8 or int4 rows whose bytes the launcher viewed four to an int32): the
    (BLOCK_K, BLOCK_N / 4 or / 8) words as loaded; _accumulate unpacks them."""
    ok = j < count
    if HOLES:
        ok = ok & (kk >= 0)
    if w_ptr.dtype.element_ty == tl.int32:  # int8 or int4 rows read as 32-bit words, unpacked by _accumulate
        per_word: tl.constexpr = 8 if WEIGHTS == "int4" else 4  # columns a word holds
        offs = n0 // per_word + tl.arange(0, BLOCK_N // per_word)
        mask = ok[:, None] if EVEN_N else ok[:, None] & (offs * per_word < N)[None, :]
        rows = tl.load(w_ptr + kk[:, None] * stride_w + offs[None, :], mask=mask, other=0,
                       eviction_policy="evict_first")
    elif WEIGHTS == "int4":
        offs = n0 // 2 + tl.arange(0, BLOCK_N // 2)
        mask = ok[:, None] if EVEN_N else ok[:, None] & (offs * 2 < N)[None, :]
        packed = tl.load(w_ptr + kk[:, None] * stride_w + offs[None, :], mask=mask, other=0,
                         eviction_policy="evict_first")
        rows = tl.interleave(packed & 0xF, packed >> 4)
    else:
        offs = n0 + tl.arange(0, BLOCK_N)
        mask = ok[:, None] if EVEN_N else ok[:, None] & (offs < N)[None, :]
        rows = tl.load(w_ptr + kk[:, None] * stride_w + offs[None, :], mask=mask, other=0,
                       eviction_policy="evict_first")
    return rows


@triton.jit
def _inputs(xs_base, j, count, offs_b, b_ok, K_CHUNK: tl.constexpr, DOT: tl.constexpr):
    """The scratch inputs of step positions j: (B_PAD, BLOCK_K) for tl.dot, else (BLOCK_K,) in
    the rows' layout (no shuffle through shared memory); 0 past count."""
    ok = j < count
    if DOT:
        xm = tl.load(xs_base + offs_b[:, None] * K_CHUNK + j[None, :], mask=b_ok[:, None] & ok[None, :], other=0.0,
                     cache_modifier=".cg")
    else:
        xm = tl.load(xs_base + j, mask=ok, other=0.0, cache_modifier=".cg")
    return xm


@triton.jit
def _accumulate(acc, xm, w, DOT: tl.constexpr, WEIGHTS: tl.constexpr, INTERPRET: tl.constexpr):
    """acc + this step's products: (B_PAD, BLOCK_N) by tl.dot, or (BLOCK_K, BLOCK_N) elementwise.
    Integer weights are exact in the activations' dtype (|q| <= 127, or 15 * 2^12 from words), so
    tl.dot takes them in it."""
    if w.dtype == tl.int32:
        w = _unpacked(w, WEIGHTS, DOT, INTERPRET)
        if not DOT:  # subnormal values: the inputs raised to keep the products normal
            xm = xm.to(tl.float32) * SUBNORMAL_LIFT
    if DOT and INTERPRET:
        acc = tl.dot(xm.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
    elif DOT:
        acc = tl.dot(xm, w.to(xm.dtype), acc, input_precision="ieee")
    else:
        acc += xm.to(tl.float32)[:, None] * _as_float(w)
    return acc


@triton.jit
def _unpacked(words, WEIGHTS: tl.constexpr, DOT: tl.constexpr, INTERPRET: tl.constexpr):
    """Words of stored rows (R, C) as fp32 values (R, 4 C) for int8, (R, 8 C) for int4, each value
    times a power of two (its place in the word), which _word_factors undoes, exactly, on the
    program's sum. Values in the upper half word are taken from the word shifted down 16 bits, once
    for all four.
    For tl.dot (whose operands are bf16): a value is masked where it lies and ORed under the bits of
    2^23 (see _as_float; the XOR also adds 128 to an int8), one integer op, then one fp32 subtract
    leaves q * 2^(8 (c % 2)) or q * 2^(4 (c % 4)) for column c.
    For FMAs, one integer op and no subtract: bits below 2^24 spell b * 2^-149 (subnormals and the
    first binade), so a value masked where it lies, at bit p <= 20, is the fp32 b * 2^(p - 149);
    values above are masked from the word shifted down. int4: b = q, the top two nibbles at p = 8,
    12. int8: b = q + 128 (the XOR), the top byte at p = 8; the sum then holds 128 times the sum of
    the inputs too, which _from_words takes off. _accumulate multiplies the inputs by SUBNORMAL_LIFT,
    so that every product is a normal number, as exact as b * x."""
    hi = words >> 16
    if WEIGHTS == "int8":  # bytes
        if DOT:  # q + 128 (XOR 0x80) under 2^23, minus 2^23 + 128 * 2^(8 (c % 2))
            b0 = _magic(_masked_xor(words, 0xFF, 0x4B000080, INTERPRET)) - 8388736.0
            b1 = _magic(_masked_xor(words, 0xFF00, 0x4B008000, INTERPRET)) - 8421376.0
            b2 = _magic(_masked_xor(hi, 0xFF, 0x4B000080, INTERPRET)) - 8388736.0
            b3 = _magic(_masked_xor(hi, 0xFF00, 0x4B008000, INTERPRET)) - 8421376.0
        else:  # q + 128 (XOR 0x80) where it lies, as a subnormal: bytes 0-2 in place, 3 from hi
            b0 = _magic(_masked_xor(words, 0xFF, 0x80, INTERPRET))
            b1 = _magic(_masked_xor(words, 0xFF00, 0x8000, INTERPRET))
            b2 = _magic(_masked_xor(words, 0xFF0000, 0x800000, INTERPRET))
            b3 = _magic(_masked_xor(hi, 0xFF00, 0x8000, INTERPRET))
        values = tl.interleave(tl.interleave(b0, b2), tl.interleave(b1, b3))
    else:  # nibbles, low first
        if DOT:  # 2^23 + q * 2^(4 (c % 4)), minus 2^23
            n0 = _magic(_masked_xor(words, 0xF, 0x4B000000, INTERPRET)) - 8388608.0
            n1 = _magic(_masked_xor(words, 0xF0, 0x4B000000, INTERPRET)) - 8388608.0
            n2 = _magic(_masked_xor(words, 0xF00, 0x4B000000, INTERPRET)) - 8388608.0
            n3 = _magic(_masked_xor(words, 0xF000, 0x4B000000, INTERPRET)) - 8388608.0
            n4 = _magic(_masked_xor(hi, 0xF, 0x4B000000, INTERPRET)) - 8388608.0
            n5 = _magic(_masked_xor(hi, 0xF0, 0x4B000000, INTERPRET)) - 8388608.0
            n6 = _magic(_masked_xor(hi, 0xF00, 0x4B000000, INTERPRET)) - 8388608.0
            n7 = _magic(_masked_xor(hi, 0xF000, 0x4B000000, INTERPRET)) - 8388608.0
        else:  # bits below 2^24 spell b * 2^-149 (subnormals and the first binade): nibbles 0-5 in place, 6-7 from hi
            # (the AND as lop3 with nothing to XOR: as plain IR the ANDs were placed so that ptxas copied
            # rows still in flight at the end of the sparse loop over several groups)
            n0, n1 = _magic(_masked_xor(words, 0xF, 0, INTERPRET)), _magic(_masked_xor(words, 0xF0, 0, INTERPRET))
            n2, n3 = _magic(_masked_xor(words, 0xF00, 0, INTERPRET)), _magic(_masked_xor(words, 0xF000, 0, INTERPRET))
            n4 = _magic(_masked_xor(words, 0xF0000, 0, INTERPRET))
            n5 = _magic(_masked_xor(words, 0xF00000, 0, INTERPRET))
            n6, n7 = _magic(_masked_xor(hi, 0xF00, 0, INTERPRET)), _magic(_masked_xor(hi, 0xF000, 0, INTERPRET))
        values = tl.interleave(tl.interleave(tl.interleave(n0, n4), tl.interleave(n2, n6)),
                               tl.interleave(tl.interleave(n1, n5), tl.interleave(n3, n7)))
    return values


@triton.jit
def _masked_xor(v, mask: tl.constexpr, bits: tl.constexpr, INTERPRET: tl.constexpr):
    """(v & mask) ^ bits as one PTX lop3 (truth table 0x6A), which ptxas would otherwise split in two
    instructions (an SM instruction holds one immediate); the interpreter runs no PTX."""
    if INTERPRET:
        out = (v & mask) ^ bits
    else:
        out = tl.inline_asm_elementwise(f"lop3.b32 $0, $1, {mask}, {bits}, 0x6A;", "=r,r", [v], dtype=tl.int32,
                                        is_pure=True, pack=1)
    return out


@triton.jit
def _magic(bits):
    """int32 bits as the fp32 they spell."""
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _word_factors(offs_n, WEIGHTS: tl.constexpr, DOT: tl.constexpr):
    """Per column, the power of two that undoes _unpacked's, made from its bits. Read for tl.dot:
    2^-(8 (c % 2)) for int8, 2^-(4 (c % 4)) for int4. For FMAs, a value at bit p of its word times
    lifted inputs: 2^(149 - p) / SUBNORMAL_LIFT = 2^(85 - p), int8 p = 8 (c % 4) below 24, else 8;
    int4 p = 4 (c % 8) below 24, else 4 (c % 8) - 16."""
    if WEIGHTS == "int8" and DOT:
        exponent = 127 - 8 * (offs_n % 2)
    elif WEIGHTS == "int8":
        place = offs_n % 4
        exponent = 127 + 85 - 8 * tl.where(place < 3, place, 1)
    elif DOT:
        exponent = 127 - 4 * (offs_n % 4)
    else:
        place = offs_n % 8
        exponent = 127 + 85 - 4 * tl.where(place < 6, place, place - 4)
    return _magic(exponent << 23)


@triton.jit
def _as_float(w):
    """Stored weights as fp32. Integers (int8, or int4 values unpacked to uint8) by integer arithmetic
    instead of a conversion instruction (I2F), of which an SM issues far fewer a clock than adds:
    the bits 0x4B000000 + v are the fp32 2^23 + v for 0 <= v < 2^23, so q = (0x4B000080 + q as
    fp32) - (2^23 + 128) for int8 and (0x4B000000 | q as fp32) - 2^23 for int4, both exact."""
    if w.dtype == tl.int8:
        v = (w.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0
    elif w.dtype == tl.uint8:
        v = (w.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
    else:
        v = w.to(tl.float32)
    return v


# ---------------------------------------------------------------------------- phase 3: scales, split-K sum

@triton.jit
def _finish(acc, count, input_sum, k0, pid_n, pid_k, y_ptr, part_ptr, count_ptr, res_ptr, scale_ptr, zero_ptr, xs_base,
            B, N, stride_y, stride_r, SPLIT: tl.constexpr, B_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
            K_CHUNK: tl.constexpr, DOT: tl.constexpr, RED_R: tl.constexpr, RESIDUAL: tl.constexpr,
            WEIGHTS: tl.constexpr, GROUP: tl.constexpr, GROUPS: tl.constexpr, WORDS: tl.constexpr):
    """Scale the program's sum (integer weights), then store y, or publish the partial and, if last
    to arrive, sum the tile's partials in split order and store y."""
    offs_b = tl.arange(0, B_PAD)
    b_ok = offs_b < B
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    if WEIGHTS != "float" and GROUPS == 1:  # (GROUPS > 1: scaled group by group in the stream)
        acc = _dequantized(acc, count, input_sum, k0, scale_ptr, zero_ptr, xs_base, offs_b, b_ok, offs_n, n_ok, N,
                           K_CHUNK, DOT, WEIGHTS, GROUP, WORDS)
    out_ok = b_ok[:, None] & n_ok[None, :]
    y_ptrs = y_ptr + offs_b[:, None] * stride_y + offs_n[None, :]
    r_ptrs = res_ptr + offs_b[:, None] * stride_r + offs_n[None, :]
    if SPLIT == 1:
        _store_out(y_ptrs, _residual(r_ptrs, out_ok, RESIDUAL), acc, out_ok, y_ptr.dtype.element_ty, RESIDUAL)
    else:
        tile = offs_b[:, None] * N + offs_n[None, :]  # (B_PAD, BLOCK_N) offsets inside one split's (B, N)
        tl.store(part_ptr + pid_k * B * N + tile, acc, mask=out_ok)
        tl.debug_barrier()  # every thread's partial is written before the arrival is published
        arrived = tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT - 1:  # last to arrive: sum the partials in split order
            res = _residual(r_ptrs, out_ok, RESIDUAL)
            if RESIDUAL:  # a fence for the compiler: the residual's load goes out with the partials' (see _rms_normed)
                tl.debug_barrier()
            offs_r = tl.arange(0, RED_R)
            total = tl.zeros((B_PAD, BLOCK_N), dtype=tl.float32)
            for s0 in tl.static_range(0, SPLIT, RED_R):  # unrolled: every partial's load in flight at once
                s = s0 + offs_r
                ptrs = part_ptr + s[:, None, None] * (B * N) + tile[None, :, :]
                ok = (s < SPLIT)[:, None, None] & out_ok[None, :, :]
                total += tl.sum(tl.load(ptrs, mask=ok, other=0.0, cache_modifier=".cg"), axis=0)
            _store_out(y_ptrs, res, total, out_ok, y_ptr.dtype.element_ty, RESIDUAL)
            tl.store(count_ptr + pid_n, 0)  # ready for the next call


@triton.jit
def _dequantized(acc, count, input_sum, k0, scale_ptr, zero_ptr, xs_base, offs_b, b_ok, offs_n, n_ok, N,
                 K_CHUNK: tl.constexpr, DOT: tl.constexpr, WEIGHTS: tl.constexpr, GROUP: tl.constexpr,
                 WORDS: tl.constexpr):
    """The program's sum of x * q (B_PAD, BLOCK_N; from words: of _unpacked's values, see _from_words)
    turned into the sum of x * w: int8 times the column scales; int4 (the chunk lies inside group
    k0 // GROUP) times the group's scales, plus its offsets times the sum of the chunk's kept inputs.
    A chunk with no kept row reads no scale."""
    ok = n_ok & (count > 0)
    if WEIGHTS == "int8":
        scale = tl.load(scale_ptr + offs_n, mask=ok, other=0.0).to(tl.float32)
        if WORDS:
            acc = _from_words(acc, input_sum, offs_n, WEIGHTS, DOT)
        return acc * scale[None, :]
    scale = _group_scales(scale_ptr, k0 // GROUP, count > 0, offs_n, N, WEIGHTS, WORDS, DOT)
    zero = tl.load(zero_ptr + (k0 // GROUP) * N + offs_n, mask=ok, other=0.0).to(tl.float32)
    offs = tl.arange(0, K_CHUNK)
    kept = tl.load(xs_base + offs_b[:, None] * K_CHUNK + offs[None, :], mask=b_ok[:, None] & (offs < count)[None, :],
                   other=0.0, cache_modifier=".cg").to(tl.float32)  # (B_PAD, K_CHUNK): 0 where a row is dropped
    return acc * scale[None, :] + tl.sum(kept, axis=1)[:, None] * zero[None, :]


@triton.jit
def _from_words(acc, input_sum, offs_n, WEIGHTS: tl.constexpr, DOT: tl.constexpr):
    """A sum (B_PAD, BLOCK_N) of inputs times _unpacked's values as the sum of inputs times the stored
    integers: each column's power of two undone (exact), and for int8 read for FMAs (q + 128) 128
    times the sum of the inputs input_sum (B_PAD,) taken off."""
    acc = acc * _word_factors(offs_n, WEIGHTS, DOT)[None, :]
    if WEIGHTS == "int8" and not DOT:
        acc -= 128.0 * input_sum[:, None]
    return acc


@triton.jit
def _offset_sum(x_chunk, keep, WEIGHTS: tl.constexpr, DOT: tl.constexpr, WORDS: tl.constexpr):
    """The sum of the chunk's kept inputs (B_X,) fp32 where int8 rows are read as words for FMAs
    (_from_words takes 128 times it off), else 0."""
    total = 0.0
    if WEIGHTS == "int8" and WORDS and not DOT:
        total = tl.sum(tl.where(keep, x_chunk.to(tl.float32), 0.0), axis=1)
    return total


@triton.jit
def _group_scales(scale_ptr, g, ok, offs_n, N, WEIGHTS: tl.constexpr, WORDS: tl.constexpr, DOT: tl.constexpr):
    """int4 group g's scales over columns offs_n (times _word_factors' powers of two where rows are
    read as words), fp32; 0 where not ok."""
    scale = tl.load(scale_ptr + g * N + offs_n, mask=(offs_n < N) & ok, other=0.0).to(tl.float32)
    if WORDS:
        scale *= _word_factors(offs_n, WEIGHTS, DOT)
    return scale


@triton.jit
def _group_sums(kept, GROUP: tl.constexpr, GROUPS: tl.constexpr):
    """A B == 1 chunk's kept inputs (1, GROUPS * GROUP), 0 where dropped, summed by group: (GROUPS,) fp32."""
    return tl.sum(tl.reshape(kept.to(tl.float32), (GROUPS, GROUP)), axis=1)


@triton.jit
def _offset_terms(zero_ptr, group_sums, g0, offs_n, N, GROUPS: tl.constexpr):
    """The offsets' share of x @ W^T over a chunk of GROUPS groups from group g0: the sum over its
    groups of their kept inputs times their offsets, (BLOCK_N,) fp32. A group with no kept input
    reads no offset."""
    g = g0 + tl.arange(0, GROUPS)
    ok = (group_sums != 0.0)[:, None] & (offs_n < N)[None, :]
    zero = tl.load(zero_ptr + g[:, None] * N + offs_n[None, :], mask=ok, other=0.0).to(tl.float32)
    return tl.sum(group_sums[:, None] * zero, axis=0)


@triton.jit
def _residual(r_ptrs, ok, RESIDUAL: tl.constexpr):
    """The residual tile in fp32 (0 without RESIDUAL)."""
    if RESIDUAL:
        res = tl.load(r_ptrs, mask=ok, other=0.0).to(tl.float32)
    else:
        res = 0.0
    return res


@triton.jit
def _store_out(y_ptrs, res, acc, ok, dtype: tl.constexpr, RESIDUAL: tl.constexpr):
    """y = acc rounded to the dtype; with RESIDUAL, plus the residual res (fp32 sum, rounded once more)."""
    y = acc.to(dtype)
    if RESIDUAL:
        y = (y.to(tl.float32) + res).to(dtype)
    tl.store(y_ptrs, y, mask=ok)


# ---------------------------------------------------------------------------- the launcher

def next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def prev_pow2(v: int) -> int:
    return 1 << (max(1, v).bit_length() - 1)


def is_interpreted(kernel) -> bool:
    """Whether a @triton.jit kernel runs in Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return type(kernel).__name__ == "InterpretedFunction"


def check_int32_offsets(elements: int, what: str):
    """The kernels address with int32 offsets: refuse a tensor that spans 2^31 elements or more."""
    if elements >= 2 ** 31:
        raise ValueError(f"{what} of 2^31 elements or more are not supported (int32 offsets)")


_pdl_devices = {}
RANK_WORK = 128  # compares per thread up to which a sparse launch ranks its first rows' indices in registers


def pdl_enabled(device: torch.device, interpreted: bool = False) -> bool:
    """Whether the kernels use programmatic dependent launch: CUDA devices of compute capability
    9.0 and newer, a Triton that has it, not under the interpreter, unless TEAL_NO_PDL is set."""
    if interpreted or device.type != "cuda" or os.environ.get("TEAL_NO_PDL") or gdc_wait is None:
        return False
    if device.index not in _pdl_devices:
        _pdl_devices[device.index] = torch.cuda.get_device_capability(device)[0] >= 9
    return _pdl_devices[device.index]


def weight_format(w_t: torch.Tensor, x_dtype: torch.dtype) -> str:
    """WEIGHTS of a stored W^T: "float" (the activations' dtype), "int8", or "int4" (uint8, two values a byte)."""
    if w_t.dtype == torch.int8:
        return "int8"
    if w_t.dtype == torch.uint8:
        return "int4"
    if w_t.dtype != x_dtype:
        raise ValueError(f"sparse_kernels: weights {w_t.dtype} with activations {x_dtype}")
    return "float"


def launch(x, w_t, thresholds, bounds, y, part, counts, idx, xs, cfg, silu=False, norm_weight=None, eps=0.0,
           residual=None, early_weights=True, scale=None, zero=None):
    """Run the sparse kernel (thresholds given) or the dense one (thresholds None: keep every input).
    x (B, K) [or gate_up (B, 2K) if silu]; w_t row stride free: (K, N) in x's dtype, (K, N) int8
    with scale (N,), or (K, N / 2) uint8 (int4) with scale and zero (K / group, N); y (B, N) row
    stride free; bounds: first columns of segments 1.. (multiples of BLOCK_N); workspaces (see
    workspace_sizes): part fp32, counts int32 zeros, idx int32, xs fp32 (holds x.dtype).
    norm_weight (K,): the input is rms_norm(x, norm_weight, eps); residual (B, N), unit column
    stride: y = residual + the product. cfg: dict BLOCK_N, BLOCK_K, K_CHUNK, DEPTH (2, 3 or 4 steps
    of rows in flight), DOT, num_warps, num_stages. On Hopper every launch is placed while the kernel
    before it drains (PDL) and waits for it before its loads, except that a dense launch reads its
    first rows of w_t before it waits; early_weights=False when that kernel wrote w_t (a copy made
    just before, say): the dense launch then goes without PDL."""
    kernel, grid, args, meta = launch_plan(x, w_t, thresholds, bounds, y, part, counts, idx, xs, cfg, silu,
                                           norm_weight, eps, residual, is_interpreted(sparse_matvec_kernel),
                                           early_weights, scale, zero)
    kernel[grid](*args, **meta)
    return y


def launch_plan(x, w_t, thresholds, bounds, y, part, counts, idx, xs, cfg, silu=False, norm_weight=None, eps=0.0,
                residual=None, interpreted=False, early_weights=True, scale=None, zero=None):
    """launch's kernel, grid, positional arguments and keyword arguments (constexprs and launch
    options), for Triton's interpreter or for a GPU; the tests also compile the GPU variant from it."""
    B = x.shape[0]
    K, N = w_t.shape[0], y.shape[1]
    weights = weight_format(w_t, x.dtype)
    check_int32_offsets(K * w_t.stride(0), "sparse_kernels: weights")
    group = 0
    if weights == "int4":
        group = K // scale.shape[0]
        if K % scale.shape[0] or group & (group - 1) or group < 16:
            raise ValueError(f"sparse_kernels: int4 groups of {K}/{scale.shape[0]} rows; a power of two >= 16 dividing "
                             f"K is supported")
    dense = thresholds is None
    bn, depth = cfg["BLOCK_N"], cfg.get("DEPTH", 2)
    kc, bk, groups = chunk_plan(cfg, group, B)
    if depth not in (2, 3, 4):
        raise ValueError(f"sparse_kernels: DEPTH={depth} steps in flight is not supported; use 2, 3 or 4")
    if any(t is not None and t.stride(-1) != 1 for t in (thresholds, norm_weight, scale, zero)):
        raise ValueError("sparse_kernels: thresholds, norm_weight and scales must have unit stride (.contiguous())")
    if weights != "float" and (scale is None or (weights == "int4") != (zero is not None)):
        raise ValueError(f"sparse_kernels: {weights} weights need their scales" + (" and zeros" if weights == "int4"
                                                                                   else " (no zeros)"))
    bounds = [] if dense else bounds  # segments only choose thresholds
    if len(bounds) > 3 or any(b % bn for b in bounds):
        raise ValueError(f"segment starts {list(bounds)} must be at most 3 multiples of BLOCK_N={bn}")
    if silu and norm_weight is not None:
        raise ValueError("sparse_kernels: silu and a fused norm do not combine")
    dot = bool(cfg["DOT"]) or B > 1  # the elementwise path is for B == 1
    b_pad = max(16, next_pow2(B)) if dot else 1
    split, n_tiles = triton.cdiv(K, kc), triton.cdiv(N, bn)
    red_r = prev_pow2(max(1, min(8, split, (1024 * cfg["num_warps"]) // (b_pad * bn))))  # partials per load
    norm_block = min(next_pow2(K), max(64, 4096 // next_pow2(B)))
    trigger = pdl_enabled(x.device, interpreted)  # every kernel lets a PDL-launched successor start early
    # launched with PDL: placed early, waits before its loads (dense: after its first rows); not a dense launch
    # right after this op's own copy of w_t
    pdl = trigger and (early_weights or not dense)
    words = weights != "float" and readable_as_words(w_t, bn, weights)
    if words:  # int8 or int4 rows read four bytes to a load element (_rows, _unpacked)
        w_t = w_t.view(torch.int32)
    meta = dict(SPLIT=split, B_X=next_pow2(B), B_PAD=b_pad, BLOCK_N=bn, BLOCK_K=bk, K_CHUNK=kc, DEPTH=depth, DOT=dot,
                RED_R=red_r, EVEN_N=(N % bn == 0), SILU=silu, NORM=norm_weight is not None, NORM_BLOCK=norm_block,
                NORM_STEPS=triton.cdiv(K, norm_block), RESIDUAL=residual is not None, WEIGHTS=weights, GROUP=group,
                GROUPS=groups, WORDS=words)
    pointers = (x, w_t, x if scale is None else scale, x if zero is None else zero)
    tail = (x if norm_weight is None else norm_weight, y if residual is None else residual,
            B, K, N, x.stride(0), w_t.stride(0), y.stride(0), y.stride(0) if residual is None else residual.stride(0),
            float(eps))
    xs = xs.view(x.dtype)
    if dense:
        kernel, args = dense_matvec_kernel, (*pointers, y, part, counts, xs, *tail)
    else:
        b = list(bounds) + [N] * (3 - len(bounds))
        # B == 1 (the measured path): the first steps' row indices ranked in registers where that costs at most
        # RANK_WORK compares a thread
        meta["RANKED"] = not dot and depth * bk * kc <= RANK_WORK * 32 * cfg["num_warps"]
        kernel, args = sparse_matvec_kernel, (*pointers, thresholds, y, part, counts, idx, xs, *tail, *b)
    meta.update(PDL=pdl, TRIGGER=trigger, INTERPRET=interpreted, num_warps=cfg["num_warps"],
                num_stages=cfg["num_stages"])
    if pdl:
        meta["launch_pdl"] = True
    return kernel, (n_tiles, split), args, meta


def readable_as_words(w_t: torch.Tensor, block_n: int, weights: str) -> bool:
    """Whether int8 or int4 W^T (bytes) can be read as int32 words: every row starts on 4 bytes and
    holds whole words, and a tile of block_n columns is whole words. Else the kernels read bytes."""
    per_word = 8 if weights == "int4" else 4
    return (w_t.stride(1) == 1 and w_t.shape[1] % 4 == 0 and w_t.stride(0) % 4 == 0 and block_n % per_word == 0
            and w_t.storage_offset() % 4 == 0)


def chunk_plan(cfg: dict, group: int, B: int):
    """(K_CHUNK, BLOCK_K, groups a chunk spans) as launched. int4 (group: its rows per group): a chunk
    lies inside one group, its scales applied once to its sum, except where a B == 1 launch's chunk
    spans whole groups and a round of DEPTH steps divides a group (_stream scales each group's sum
    as it ends; a sparse launch starts each group's kept rows on a round, _group_places)."""
    kc, bk = cfg["K_CHUNK"], cfg["BLOCK_K"]
    if not group:
        return kc, bk, 1
    if not cfg["DOT"] and B == 1 and kc > group and group % (cfg.get("DEPTH", 2) * bk) == 0:
        return kc, bk, kc // group
    kc = min(kc, group)
    return kc, min(bk, kc), 1


def workspace_sizes(B: int, K: int, N: int, cfg: dict, group: int = 0):
    """Elements a launch needs, sparse or dense: fp32 partials, int32 counters, int32 row indices,
    fp32 inputs (group: int4's rows per group; see chunk_plan)."""
    kc = chunk_plan(cfg, group, B)[0]
    split, n_tiles = triton.cdiv(K, kc), triton.cdiv(N, cfg["BLOCK_N"])
    n_idx = n_tiles * split * kc
    return (split * B * N if split > 1 else 0), n_tiles, n_idx, n_idx * next_pow2(B)


@triton.jit
def dequantize_int4_kernel(w_ptr, scale_ptr, zero_ptr, out_ptr, K, N, stride_w, stride_s, stride_z, stride_o,
                           GROUP: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                           INTERPRET: tl.constexpr):
    """out (K, N) = q * scale + zero in fp32, rounded once to out's dtype, from int4 W^T (K, N / 2): a
    program writes a (BLOCK_K, BLOCK_N) tile. Both columns of a byte read it; the second read is a hit."""
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)  # (BLOCK_K,)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    ok = (offs_k[:, None] < K) & (offs_n[None, :] < N)
    byte = tl.load(w_ptr + offs_k[:, None] * stride_w + offs_n[None, :] // 2, mask=ok, other=0)
    q = (byte.to(tl.int32) >> ((offs_n[None, :] % 2) * 4)) & 0xF  # the low nibble is the even column
    g = offs_k[:, None] // GROUP
    scale = tl.load(scale_ptr + g * stride_s + offs_n[None, :], mask=ok, other=0).to(tl.float32)
    zero = tl.load(zero_ptr + g * stride_z + offs_n[None, :], mask=ok, other=0).to(tl.float32)
    w = q.to(tl.float32) * scale + zero
    tl.store(out_ptr + offs_k[:, None] * stride_o + offs_n[None, :],
             _round(w, out_ptr.dtype.element_ty, INTERPRET), mask=ok)


def dequantize_int4(w_t: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Write the weights int4 w_t (K, N / 2) uint8 with scale and zero (K / group, N) stand for into out
    (K, N) (bf16, fp16 or fp32; every tensor of unit column stride), exactly as reference.dequantize and a
    cast round them: the multiply and the add are not fused into one FMA (enable_fp_fusion)."""
    interp = is_interpreted(dequantize_int4_kernel)
    K, N = out.shape
    check_int32_offsets(K * max(out.stride(0), w_t.stride(0)), "sparse_kernels: weights")
    block_k, block_n = 16, 256
    grid = (triton.cdiv(K, block_k), triton.cdiv(N, block_n))
    dequantize_int4_kernel[grid](w_t, scale, zero, out, K, N, w_t.stride(0), scale.stride(0), zero.stride(0),
                                 out.stride(0), GROUP=K // scale.shape[0], BLOCK_K=block_k, BLOCK_N=block_n,
                                 INTERPRET=interp, **({} if interp else dict(enable_fp_fusion=False)))
    return out
