"""Triton kernel for the thresholded column-sparse matvec, and its launcher.

One kernel serves every op. The grid is (N tiles, K chunks). A program first loads x of
every batch row over its K chunk, finds the rows any batch row keeps (|x| > t, t of the
tile's segment) and compacts their indices (cumsum, scattered to a small per-program
scratch). It then streams only those rows of W^T, BLOCK_K gathered rows per step (each a
contiguous BLOCK_N slice), so both bytes and steps scale with 1 - p. Products are
accumulated in fp32 (tl.dot for batches, FMAs for B == 1). With SILU the input is
silu(gate) * up, formed from gate_up while loading (fp32, rounded once to the dtype).

Fusions that save a launch each in a decoder block: with NORM the input is RMSNorm(h) * weight,
computed from h in the load (every program sums the squares of the whole row, which sits in
L2); with RESIDUAL the output is residual + product (the residual add of the block).

Split-K reduction without a memset: each program stores its fp32 partial tile to a
persistent workspace (SPLIT, B, N) and increments the tile's arrival counter; the last
to arrive sums the partials in split order (deterministic), writes y and resets the
counter to 0 for the next call.

RANKED (sparse B == 1 tiles where DEPTH * BLOCK_K * K_CHUNK is small: the MLP's tuned ones): the first
DEPTH steps' row indices are ranked in registers from the cumsum (the j-th kept row is the
number of rows placed before j), so those rows are requested before the scratch is written and
read back; the rest of the stream reads its indices from the scratch.

DENSE (no thresholds: every row is read, the plain product with the same fusions): the rows
of a program's chunk are known before its input is, so the first DEPTH steps' rows are
requested first, ahead of the input and its norm.

On Hopper and newer (pdl_enabled) the kernels are launched with programmatic dependent launch:
they are placed on the GPU while the kernel before them drains, and wait for it (gdc_wait) before
their first load, except a dense kernel, which requests its first rows before it waits (and is
launched without PDL right after the op's own copy of its weights). Every
kernel lets its successor launch once all its programs have streamed their rows (TRIGGER), so the
next matvec or the decode attention launches during the split-K tail.
"""
import os

import torch
import triton
import triton.language as tl

try:  # programmatic dependent launch (recent Triton: 3.6 has it)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # older Triton: pdl_enabled is False, so the kernels never reach these names
    gdc_launch_dependents = gdc_wait = None


@triton.jit
def sparse_matvec_kernel(
    x_ptr, w_ptr, thr_ptr, y_ptr, part_ptr, count_ptr, idx_ptr, xs_ptr, nw_ptr, res_ptr,
    B, K, N, stride_x, stride_w, stride_y, stride_r, eps,
    bound1, bound2, bound3,  # first columns of segments 1..3 (multiples of BLOCK_N; N if absent)
    SPLIT: tl.constexpr,  # K chunks: the grid's second axis
    B_X: tl.constexpr, B_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    K_CHUNK: tl.constexpr, DEPTH: tl.constexpr, DOT: tl.constexpr, SILU: tl.constexpr, RED_R: tl.constexpr,
    EVEN_N: tl.constexpr, STATIC_ITERS: tl.constexpr, DOT_F32: tl.constexpr,
    NORM: tl.constexpr, NORM_BLOCK: tl.constexpr, NORM_STEPS: tl.constexpr, RESIDUAL: tl.constexpr,
    RTNE_BY_BITS: tl.constexpr, DENSE: tl.constexpr, RANKED: tl.constexpr, PDL: tl.constexpr,
    TRIGGER: tl.constexpr,
):
    # Loop bounds are runtime values on GPUs. Triton's interpreter cannot take a runtime range
    # bound with numpy >= 2.4 (int() of a 1-element array; it also turns every assigned value
    # into a tensor), so there the launcher passes static bounds, used inline in range(), and
    # the extra iterations are fully masked. Its bf16 tl.dot is wrong (triton 3.6), so there
    # DOT_F32 widens the operands first: the same products (exact in fp32) and fp32 sums. It also
    # truncates fp32 -> bf16, so there RTNE_BY_BITS rounds the inputs the kernel forms itself
    # (silu, norm) to nearest even by integer arithmetic, as the GPU's conversion does.
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_j = tl.arange(0, BLOCK_K)
    k0 = pid_k * K_CHUNK
    prog = pid_n * SPLIT + pid_k
    idx_base = idx_ptr + prog * K_CHUNK
    xs_base = xs_ptr + prog * (B_X * K_CHUNK)
    if DENSE:  # every row of the chunk: the first DEPTH steps' rows go out before anything else
        count = tl.minimum(K - k0, K_CHUNK)
        wa, wb, wc, wd = _first_rows(w_ptr, idx_base, count, k0, offs_j, offs_n, n_ok, stride_w, BLOCK_K, DEPTH, EVEN_N,
                                     DENSE, False)
        tl.debug_barrier()  # a fence for the compiler, which would otherwise move the loads to their first use
    if PDL:  # the previous kernel's writes (x, the workspace) are visible from here on
        gdc_wait()
    if not DENSE:  # the segment's threshold, requested with the input (after the wait: a copy just before may
        # have written it)
        seg = (n0 >= bound1).to(tl.int32) + (n0 >= bound2).to(tl.int32) + (n0 >= bound3).to(tl.int32)
        t = tl.load(thr_ptr + seg).to(tl.float32)

    # 1. Which rows of this K chunk does any batch row keep?
    offs_c = k0 + tl.arange(0, K_CHUNK)
    offs_bx = tl.arange(0, B_X)
    bc_ok = (offs_bx < B)[:, None] & (offs_c < K)[None, :]
    x_chunk = _input(x_ptr, offs_bx[:, None] * stride_x + offs_c[None, :], bc_ok, K, SILU,
                     w_ptr.dtype.element_ty, RTNE_BY_BITS)
    if NORM:  # x is RMSNorm(h) * weight: the row's rstd from all of h (every program; K values from L2)
        x_chunk = _rms_normed(x_ptr, nw_ptr, x_chunk, offs_bx, offs_c, B, K, stride_x, eps, B_X, NORM_BLOCK,
                              NORM_STEPS, RTNE_BY_BITS)
    offs_b = tl.arange(0, B_PAD)
    b_ok = offs_b < B

    # 2. Compact the kept rows (dense: store the inputs as they are), then stream only those.
    if DENSE:
        tl.store(xs_base + offs_bx[:, None] * K_CHUNK + (offs_c - k0)[None, :], x_chunk.to(xs_ptr.dtype.element_ty),
                 mask=bc_ok)
        tl.debug_barrier()  # the whole CTA's inputs are visible before they are read back
    else:
        keep = (tl.abs(x_chunk.to(tl.float32)) > t) & bc_ok  # (B_X, K_CHUNK)
        need = tl.max(keep.to(tl.int32), axis=0)  # (K_CHUNK,) 0/1: any batch row keeps the row
        pos = tl.cumsum(need, axis=0) - 1  # (K_CHUNK,) each kept row's place in the compacted order
        count = tl.sum(need, axis=0)
        if RANKED:  # the first rows' indices from pos in registers: requested before the scratch round trip
            wa, wb, wc, wd = _first_rows(w_ptr, pos, count, k0, offs_j, offs_n, n_ok, stride_w, BLOCK_K, DEPTH,
                                         EVEN_N, DENSE, RANKED)
            tl.debug_barrier()  # a fence for the compiler (see DENSE above)
        _compact(idx_base, xs_base, x_chunk, keep, need, pos, offs_c, offs_bx, bc_ok, K_CHUNK)
        if not RANKED:
            wa, wb, wc, wd = _first_rows(w_ptr, idx_base, count, k0, offs_j, offs_n, n_ok, stride_w, BLOCK_K, DEPTH,
                                         EVEN_N, DENSE, RANKED)
    acc = _stream(wa, wb, wc, wd, w_ptr, idx_base, xs_base, count, k0, offs_j, offs_b, b_ok, offs_n, n_ok, stride_w,
                  B_PAD, BLOCK_N, BLOCK_K, K_CHUNK, DEPTH, DOT, DOT_F32, EVEN_N, STATIC_ITERS, DENSE)
    if TRIGGER:  # rows streamed: the next kernel, if launched with PDL, may launch during the split-K reduction
        gdc_launch_dependents()

    # 3. Split-K reduction: partials to the workspace, the last program to arrive sums them.
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
def _compact(idx_base, xs_base, x_chunk, keep, need, pos, offs_c, offs_bx, bc_ok, K_CHUNK: tl.constexpr):
    """Store the kept rows' indices and inputs (zero where a batch row drops the row) in this
    program's scratch at their places pos."""
    tl.store(idx_base + pos, offs_c, mask=need > 0)
    tl.store(xs_base + offs_bx[:, None] * K_CHUNK + pos[None, :],
             tl.where(keep, x_chunk, 0.0).to(xs_base.dtype.element_ty), mask=(need > 0)[None, :] & bc_ok)
    tl.debug_barrier()  # the whole CTA's scratch stores are visible before they are read back


@triton.jit
def _stream(wa, wb, wc, wd, w_ptr, idx_base, xs_base, count, k0, offs_j, offs_b, b_ok, offs_n, n_ok, stride_w,
            B_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_CHUNK: tl.constexpr,
            DEPTH: tl.constexpr, DOT: tl.constexpr, DOT_F32: tl.constexpr, EVEN_N: tl.constexpr,
            STATIC_ITERS: tl.constexpr, DENSE: tl.constexpr):
    """The product over the chunk's first `count` scratch positions, whose first DEPTH steps of
    rows wa, wb (, wc, wd) are already requested. (B_PAD, BLOCK_N) fp32.

    BLOCK_K gathered rows of W^T per step (each a contiguous BLOCK_N slice), DEPTH steps in
    flight. Buffers a, b (, c, d) take turns: a step is summed, then its buffer is refilled with
    the rows DEPTH steps ahead, whose indices were loaded a round earlier. A buffer is overwritten
    only after its last use, so no register copy at the loop's end waits on a load in flight
    (which the usual "w_cur = w_next" rotation compiles to: one step in flight, the whole latency
    paid every step)."""
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
    for r in range(0, STATIC_ITERS if STATIC_ITERS > 0 else tl.cdiv(tl.cdiv(count, BLOCK_K), DEPTH)):
        j = (r + 1) * DEPTH * BLOCK_K + offs_j  # the rows buffer a is refilled with
        acc, wa, xa, ka = _turn(acc, wa, xa, ka, j, w_ptr, idx_base, xs_base, count, k0, offs_b, b_ok, offs_n, n_ok,
                                stride_w, BLOCK_K, K_CHUNK, DEPTH, EVEN_N, DOT, DOT_F32, DENSE)
        acc, wb, xb, kb = _turn(acc, wb, xb, kb, j + BLOCK_K, w_ptr, idx_base, xs_base, count, k0, offs_b, b_ok,
                                offs_n, n_ok, stride_w, BLOCK_K, K_CHUNK, DEPTH, EVEN_N, DOT, DOT_F32, DENSE)
        if DEPTH >= 3:
            acc, wc, xc, kc = _turn(acc, wc, xc, kc, j + 2 * BLOCK_K, w_ptr, idx_base, xs_base, count, k0, offs_b,
                                    b_ok, offs_n, n_ok, stride_w, BLOCK_K, K_CHUNK, DEPTH, EVEN_N, DOT, DOT_F32, DENSE)
        if DEPTH == 4:
            acc, wd, xd, kd = _turn(acc, wd, xd, kd, j + 3 * BLOCK_K, w_ptr, idx_base, xs_base, count, k0, offs_b,
                                    b_ok, offs_n, n_ok, stride_w, BLOCK_K, K_CHUNK, DEPTH, EVEN_N, DOT, DOT_F32, DENSE)
    if not DOT:
        acc = tl.sum(acc, axis=0)[None, :]  # (1, BLOCK_N)
    return acc


@triton.jit
def _first_rows(w_ptr, where, count, k0, offs_j, offs_n, n_ok, stride_w, BLOCK_K: tl.constexpr,
                DEPTH: tl.constexpr, EVEN_N: tl.constexpr, DENSE: tl.constexpr, RANKED: tl.constexpr):
    """The rows of the first DEPTH steps, one buffer each (c and d repeat a and b below DEPTH 3, 4).
    Their indices: k0 + j (DENSE), ranked from the places `where` = pos (RANKED), else loaded from
    the scratch at `where` = idx_base."""
    wa = _rows(w_ptr, _first_indices(where, offs_j, count, k0, DENSE, RANKED), offs_j, count, offs_n, n_ok, stride_w,
               EVEN_N)
    j = BLOCK_K + offs_j
    wb = _rows(w_ptr, _first_indices(where, j, count, k0, DENSE, RANKED), j, count, offs_n, n_ok, stride_w, EVEN_N)
    wc, wd = wa, wb
    if DEPTH >= 3:
        j = 2 * BLOCK_K + offs_j
        wc = _rows(w_ptr, _first_indices(where, j, count, k0, DENSE, RANKED), j, count, offs_n, n_ok, stride_w,
                   EVEN_N)
    if DEPTH == 4:
        j = 3 * BLOCK_K + offs_j
        wd = _rows(w_ptr, _first_indices(where, j, count, k0, DENSE, RANKED), j, count, offs_n, n_ok, stride_w,
                   EVEN_N)
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
def _turn(acc, w, xm, kk, j, w_ptr, idx_base, xs_base, count, k0, offs_b, b_ok, offs_n, n_ok, stride_w,
          BLOCK_K: tl.constexpr, K_CHUNK: tl.constexpr, DEPTH: tl.constexpr, EVEN_N: tl.constexpr, DOT: tl.constexpr,
          DOT_F32: tl.constexpr, DENSE: tl.constexpr):
    """A buffer's turn: sum its step into acc, then refill it with the rows of positions j (their
    indices kk were loaded a round earlier) and load the indices of the positions DEPTH steps on."""
    acc = _accumulate(acc, xm, w, DOT, DOT_F32)
    w = _rows(w_ptr, kk, j, count, offs_n, n_ok, stride_w, EVEN_N)
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
def _rows(w_ptr, kk, j, count, offs_n, n_ok, stride_w, EVEN_N: tl.constexpr):
    """Rows kk of W^T over columns offs_n (BLOCK_K, BLOCK_N); positions j past count read nothing."""
    ok = j < count
    ptrs = w_ptr + kk[:, None] * stride_w + offs_n[None, :]
    if EVEN_N:
        w = tl.load(ptrs, mask=ok[:, None], other=0.0, eviction_policy="evict_first")
    else:
        w = tl.load(ptrs, mask=ok[:, None] & n_ok[None, :], other=0.0, eviction_policy="evict_first")
    return w


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
def _accumulate(acc, xm, w, DOT: tl.constexpr, DOT_F32: tl.constexpr):
    """acc + this step's products: (B_PAD, BLOCK_N) by tl.dot, or (BLOCK_K, BLOCK_N) elementwise."""
    if DOT_F32:
        acc = tl.dot(xm.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
    elif DOT:
        acc = tl.dot(xm, w, acc, input_precision="ieee")
    else:
        acc += xm.to(tl.float32)[:, None] * w.to(tl.float32)
    return acc


@triton.jit
def _input(x_ptr, offs, mask, K, SILU: tl.constexpr, dtype: tl.constexpr, RTNE_BY_BITS: tl.constexpr):
    """x at offs; with SILU, h = silu(gate) * up from gate_up rows, in fp32, rounded to dtype."""
    xv = tl.load(x_ptr + offs, mask=mask, other=0.0, eviction_policy="evict_last")
    if SILU:
        g = xv.to(tl.float32)
        u = tl.load(x_ptr + offs + K, mask=mask, other=0.0, eviction_policy="evict_last").to(tl.float32)
        xv = _round(g / (1.0 + tl.exp(-g)) * u, dtype, RTNE_BY_BITS)
    return xv


@triton.jit
def _round(v, dtype: tl.constexpr, RTNE_BY_BITS: tl.constexpr):
    """fp32 v rounded to dtype (nearest even). RTNE_BY_BITS: bf16 only, by integer arithmetic."""
    if RTNE_BY_BITS:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True).to(dtype)  # the low half is zero: exact
    return v.to(dtype)


@triton.jit
def _rms_normed(x_ptr, nw_ptr, xc, offs_bx, offs_c, B, K, stride_x, eps,
                B_X: tl.constexpr, NORM_BLOCK: tl.constexpr, NORM_STEPS: tl.constexpr, RTNE_BY_BITS: tl.constexpr):
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
    normed = _round(xc.to(tl.float32) * rstd[:, None], dtype, RTNE_BY_BITS).to(tl.float32)
    return _round(normed * nw[None, :], dtype, RTNE_BY_BITS)


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


def next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


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


def launch(x, w_t, thresholds, bounds, y, part, counts, idx, xs, cfg, silu=False, norm_weight=None, eps=0.0,
           residual=None, early_weights=True):
    """Run the kernel: x (B, K) [or gate_up (B, 2K) if silu], w_t (K, N) row stride free,
    y (B, N) row stride free; thresholds: one per segment, or None to keep every input (dense);
    bounds: first columns of segments 1.. (multiples of BLOCK_N);
    workspaces (see workspace_sizes): part fp32, counts int32 zeros, idx int32, xs fp32 (holds x.dtype).
    norm_weight (K,): the input is rms_norm(x, norm_weight, eps); residual (B, N), unit column
    stride: y = residual + the product. cfg: dict BLOCK_N, BLOCK_K, K_CHUNK, DEPTH (2, 3 or 4 steps
    of rows in flight), DOT, num_warps, num_stages. On Hopper every launch is placed while the kernel
    before it drains (PDL) and waits for it before its loads, except that a dense launch reads its
    first rows of w_t before it waits; early_weights=False when that kernel wrote w_t (a copy made
    just before, say): the dense launch then goes without PDL."""
    interp = type(sparse_matvec_kernel).__name__ == "InterpretedFunction"  # TRITON_INTERPRET=1
    grid, args, meta = launch_plan(x, w_t, thresholds, bounds, y, part, counts, idx, xs, cfg, silu, norm_weight,
                                   eps, residual, interp, early_weights)
    sparse_matvec_kernel[grid](*args, **meta)
    return y


def launch_plan(x, w_t, thresholds, bounds, y, part, counts, idx, xs, cfg, silu=False, norm_weight=None, eps=0.0,
                residual=None, interpreted=False, early_weights=True):
    """launch's grid, positional arguments and keyword arguments (constexprs and launch options),
    for Triton's interpreter or for a GPU; the tests also compile the GPU variant from it."""
    B = x.shape[0]
    K, N = w_t.shape
    if K * w_t.stride(0) >= 2 ** 31:
        raise ValueError("sparse_kernels: weights of 2^31 elements or more are not supported (int32 offsets)")
    bn, bk, kc = cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["K_CHUNK"]
    depth = cfg.get("DEPTH", 2)
    if depth not in (2, 3, 4):
        raise ValueError(f"sparse_kernels: DEPTH={depth} steps in flight is not supported; use 2, 3 or 4")
    dense = thresholds is None
    if any(t is not None and t.stride(-1) != 1 for t in (thresholds, norm_weight)):
        raise ValueError("sparse_kernels: thresholds and norm_weight must have unit stride (.contiguous())")
    bounds = [] if dense else bounds  # segments only choose thresholds
    if len(bounds) > 3 or any(b % bn for b in bounds):
        raise ValueError(f"segment starts {list(bounds)} must be at most 3 multiples of BLOCK_N={bn}")
    dot = bool(cfg["DOT"]) or B > 1  # the elementwise path is for B == 1
    b_pad = max(16, next_pow2(B)) if dot else 1
    split, n_tiles = triton.cdiv(K, kc), triton.cdiv(N, bn)
    red_r = prev_pow2(max(1, min(8, split, (1024 * cfg["num_warps"]) // (b_pad * bn))))  # partials per load
    b = list(bounds) + [N] * (3 - len(bounds))
    if silu and norm_weight is not None:
        raise ValueError("sparse_kernels: silu and a fused norm do not combine")
    norm_block = min(next_pow2(K), max(64, 4096 // next_pow2(B)))
    trigger = pdl_enabled(x.device, interpreted)  # every kernel lets a PDL-launched successor start early
    # launched with PDL: placed early, waits before its loads (dense: after its first rows); not a dense launch
    # right after this op's own copy of w_t
    pdl = trigger and (early_weights or not dense)
    # B == 1 (the measured path): the first steps' row indices ranked in registers where that costs at most
    # RANK_WORK compares a thread
    ranked = not dense and not dot and depth * bk * kc <= RANK_WORK * 32 * cfg["num_warps"]
    args = (x, w_t, x if dense else thresholds, y, part, counts, idx, xs.view(x.dtype),
            x if norm_weight is None else norm_weight, y if residual is None else residual,
            B, K, N, x.stride(0), w_t.stride(0), y.stride(0), y.stride(0) if residual is None else residual.stride(0),
            float(eps), b[0], b[1], b[2])
    meta = dict(
        SPLIT=split, B_X=next_pow2(B), B_PAD=b_pad, BLOCK_N=bn, BLOCK_K=bk, K_CHUNK=kc, DEPTH=depth, DOT=dot,
        SILU=silu, RED_R=red_r, EVEN_N=(N % bn == 0),
        STATIC_ITERS=triton.cdiv(kc // bk, depth) if interpreted else 0,  # rounds of DEPTH steps
        DOT_F32=interpreted and dot and x.dtype == torch.bfloat16,
        NORM=norm_weight is not None, NORM_BLOCK=norm_block, NORM_STEPS=triton.cdiv(K, norm_block),
        RESIDUAL=residual is not None, RTNE_BY_BITS=interpreted and x.dtype == torch.bfloat16,
        DENSE=dense, RANKED=ranked, PDL=pdl, TRIGGER=trigger, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if pdl:
        meta["launch_pdl"] = True
    return (n_tiles, split), args, meta


def workspace_sizes(B: int, K: int, N: int, cfg: dict):
    """Elements one launch needs: fp32 partials, int32 counters, int32 row indices, fp32 inputs."""
    split, n_tiles = triton.cdiv(K, cfg["K_CHUNK"]), triton.cdiv(N, cfg["BLOCK_N"])
    n_idx = n_tiles * split * cfg["K_CHUNK"]
    return (split * B * N if split > 1 else 0), n_tiles, n_idx, n_idx * next_pow2(B)


def prev_pow2(v: int) -> int:
    return 1 << (max(1, v).bit_length() - 1)
