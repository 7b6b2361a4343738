"""The sparse matvec kernels against the torch reference.

The Triton kernel runs under Triton's interpreter on the CPU, in one child process
(tests/interpreted.py says why).

Tolerances (outputs are O(1): x ~ N(0, 1), w ~ N(0, 1/K)), atol = rtol per dtype:
bf16 2e-2 (1-2 ulps of the rounded output), fp16 4e-3, fp32 2e-4 (summation order only).
"""
import json
import os

import pytest
import torch

from sparse_kernels import (dequantize, dequantize_int4, ops, silu_mul, sparse_linear, sparse_linear_ref,
                            sparse_silu_down, sparse_silu_down_ref, weight_columns)
from sparse_kernels.checks import EPS, TOL, kernel_input, random_quantized, reference_op  # shared with the GPU checks
from sparse_kernels.reference import gap_threshold
from tests.interpreted import compare, run_child


def make_inputs(op, B, K, N, S, dtype, p, seed, weights="float", group=0):
    """x, w, thresholds, the fusion inputs the op names (None otherwise): the RMSNorm weight
    ("+norm": x is then the raw hidden state, 3x larger than unit scale) and a residual ("+res"),
    and the scales of quantized weights (weights "int8" or "int4" with groups of `group` rows)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 2 * K if op.startswith("silu_down") else K, generator=g).to(dtype)
    scale = zero = None
    if weights == "float":
        w = (torch.randn(K, N, generator=g) / K ** 0.5).to(dtype)
    else:
        w, scale, zero = random_quantized(K, N, weights, group, g, device="cpu")
    norm_w = residual = None
    if "+norm" in op:
        x = x * 3
        norm_w = (0.5 + torch.rand(K, generator=g)).to(dtype)
    if "+res" in op:
        residual = torch.randn(B, N, generator=g).to(dtype)
    if p is None:  # dense: no thresholds, every entry kept
        return x, w, None, norm_w, residual, scale, zero
    src = kernel_input(op, x, norm_w)
    # one threshold per segment, each in a gap of |src|: Triton's interpreter rounds fp32 -> bf16
    # by truncation, so a kernel-formed input (silu, norm) can be an ulp off the reference's
    levels = [p if p in (0.0, 1.0) else min(0.95, p + 0.05 * s) for s in range(S)]
    thr = torch.tensor([gap_threshold(src, q) for q in levels])
    return x, w, thr.float(), norm_w, residual, scale, zero


def run_kernel(tk, op, x, w, thr, splits, cfg, norm_w=None, residual=None, scale=None, zero=None):
    B, K, N = x.shape[0], w.shape[0], sum(splits)
    y = torch.full((B, N), float("nan"), dtype=x.dtype)  # poisoned: every entry must be written
    group = K // scale.shape[0] if zero is not None else 0
    n_part, n_count, n_idx, n_xs = tk.workspace_sizes(B, K, N, cfg, group)
    part = torch.full((max(n_part, 1),), float("nan"))
    counts = torch.zeros(n_count, dtype=torch.int32)
    idx, xs = torch.full((n_idx,), -1, dtype=torch.int32), torch.full((n_xs,), float("nan"))
    bounds = ops.segment_starts(splits)
    tk.launch(x, w, thr, bounds, y, part, counts, idx, xs, cfg, silu=op.startswith("silu_down"), norm_weight=norm_w,
              eps=EPS, residual=residual, scale=scale, zero=zero)
    return y, int(counts.abs().sum())


def _child():
    """Run in a process with TRITON_INTERPRET=1: every case, results as one JSON line."""
    assert os.environ.get("TRITON_INTERPRET") == "1"  # in the environment from the start: before any import of triton
    from sparse_kernels import triton_kernels as tk

    torch.set_num_threads(1)
    out = {}
    for i, case in enumerate(CASES + QUANTIZED_CASES):
        op, B, K, N, splits, dtype, p, cfg, *quantized = case
        x, w, thr, norm_w, residual, scale, zero = make_inputs(op, B, K, N, len(splits), dtype, p, i, *quantized)
        y, counters = run_kernel(tk, op, x, w, thr, splits, cfg, norm_w, residual, scale, zero)
        ref = reference_op(op, x, w, thr, splits, norm_w, residual, scale, zero)
        out[case_id(case)] = dict(compare(y, ref, TOL[dtype]), counters=counters)
    # the comparison has teeth: a slightly lower threshold is a different result, and so is a
    # fused norm without its weight or a missing residual
    x, w, thr, _, _, _, _ = make_inputs("linear", 1, 256, 512, 1, torch.float32, 0.5, seed=99)
    y, _ = run_kernel(tk, "linear", x, w, thr, [512], dict(BLOCK_N=128, BLOCK_K=32, K_CHUNK=128, **E))
    out["wrong_threshold"] = compare(y, sparse_linear_ref(x, w, thr * 0.9, [512]), TOL[torch.float32])
    x, w, thr, norm_w, residual, _, _ = make_inputs("linear+norm+res", 2, 256, 512, 1, torch.float32, 0.5, seed=98)
    y, _ = run_kernel(tk, "linear", x, w, thr, [512], dict(BLOCK_N=128, BLOCK_K=32, K_CHUNK=128, **D), norm_w, residual)
    out["unweighted_norm"] = compare(y, reference_op("linear", x, w, thr, [512], torch.ones_like(norm_w), residual),
                                     TOL[torch.float32])
    out["no_residual"] = compare(y, reference_op("linear", x, w, thr, [512], norm_w, None), TOL[torch.float32])
    # and so are int4 offsets read from the wrong group (the scales of the first group for every chunk)
    x, w, thr, _, _, scale, zero = make_inputs("linear", 1, 256, 512, 1, torch.float32, 0.5, 97, "int4", 64)
    y, _ = run_kernel(tk, "linear", x, w, thr, [512], dict(BLOCK_N=128, BLOCK_K=16, K_CHUNK=64, **E), None, None,
                      scale, zero)
    out["int4_wrong_group"] = compare(y, reference_op("linear", x, w, thr, [512], None, None, scale[:1].expand_as(scale),
                                                      zero[:1].expand_as(zero)), TOL[torch.float32])
    out["as_float"] = stored_values_as_float()
    out["dequantize_int4"] = dequantized_mismatches(tk)
    print(json.dumps(out))


# (K, N, group, dtype, columns): odd K, N not a multiple of the tile, groups of 40 rows, a column view
DEQUANTIZE_CASES = [(200, 1004, 40, torch.bfloat16, None), (96, 512, 32, torch.float16, None),
                    (256, 1536, 128, torch.float32, None), (192, 1536, 64, torch.bfloat16, (576, 1056))]


def dequantized_mismatches(tk) -> dict:
    """Entries of the int4 dequantization kernel's output (poisoned first) unequal to the reference's,
    per case; "wrong group": the first case against the reference with the first group's scales everywhere."""
    out = {}
    for i, (K, N, group, dtype, columns) in enumerate(DEQUANTIZE_CASES):
        w, scale, zero = random_quantized(K, N, "int4", group, torch.Generator().manual_seed(i), device="cpu")
        if columns is not None:
            w, scale, zero = weight_columns(w, scale, zero, *columns)
        y = tk.dequantize_int4(w, scale, zero, torch.full((K, scale.shape[1]), float("nan"), dtype=dtype))
        out[f"{K}x{N}g{group}-{str(dtype)[6:]}"] = int((y != dequantize(w, scale, zero).to(dtype)).sum())
        if i == 0:
            first = scale[:1].expand_as(scale), zero[:1].expand_as(zero)
            out["wrong group"] = int((y != dequantize(w, *first).to(dtype)).sum())
    return out


def stored_values_as_float() -> dict:
    """The kernels' conversion of stored integers to fp32 (by integer arithmetic, not a conversion
    instruction) over every int8 value and every int4 nibble, against torch's: mismatches per format."""
    mismatches = {}
    for name, values in (("int8", torch.arange(-128, 128, dtype=torch.int32).to(torch.int8)),
                         ("int4", torch.arange(0, 16, dtype=torch.uint8))):
        out = torch.full((len(values),), float("nan"))
        _convert_kernel[(1,)](values, out, N=len(values))
        mismatches[name] = int((out != values.float()).sum())
    # rows read as int32 words: every value at every place in a word, as tl.dot takes it and as the FMAs do
    # (subnormals times lifted inputs), through _from_words (powers of two undone, int8's offset taken off)
    for name, values, per_word in (("int8 words", torch.arange(-128, 128), 4), ("int4 words", torch.arange(16), 8)):
        columns = torch.cat([values.roll(c) for c in range(per_word)])  # (per_word * len(values),)
        stored = columns.to(torch.int8) if name == "int8 words" else (columns[0::2] | columns[1::2] << 4).to(torch.uint8)
        for dot in (False, True):
            out = torch.full((len(columns),), float("nan"))
            _unpack_kernel[(1,)](stored.view(torch.int32), out, WORDS=len(columns) // per_word, PER_WORD=per_word,
                                 WEIGHTS=name.split()[0], DOT=dot)
            mismatches[name + (" dot" if dot else "")] = int((out != columns.float()).sum())
    return mismatches


try:  # a kernel of one helper; Triton present (the child runs it under the interpreter)
    import triton
    import triton.language as tl

    from sparse_kernels.triton_kernels import _accumulate, _as_float, _from_words, _unpacked

    @triton.jit
    def _convert_kernel(w_ptr, out_ptr, N: tl.constexpr):
        offs = tl.arange(0, N)
        tl.store(out_ptr + offs, _as_float(tl.load(w_ptr + offs)))

    @triton.jit
    def _unpack_kernel(words_ptr, out_ptr, WORDS: tl.constexpr, PER_WORD: tl.constexpr, WEIGHTS: tl.constexpr,
                       DOT: tl.constexpr):
        words = tl.load(words_ptr + tl.arange(0, WORDS))[None, :]  # (1, WORDS)
        columns = tl.arange(0, WORDS * PER_WORD)
        ones = tl.full((1,), 1.0, tl.float32)
        if DOT:
            values = _unpacked(words, WEIGHTS, True, True)  # (1, WORDS * PER_WORD)
        else:  # one FMA step with inputs of 1, as the B == 1 stream takes it
            values = _accumulate(tl.zeros((1, WORDS * PER_WORD), tl.float32), ones, words, False, WEIGHTS, True)
        # powers of two undone; int8 FMAs: 128 times the inputs' sum taken off
        tl.store(out_ptr + columns[None, :], _from_words(values, ones, columns, WEIGHTS, DOT))
except ImportError:
    _convert_kernel = _unpack_kernel = None


@pytest.fixture(scope="module")
def interpreted():
    return run_child("tests.test_kernels", timeout=1200)


E = dict(DOT=False, num_warps=4, num_stages=1)  # the B == 1 elementwise path
D = dict(DOT=True, num_warps=4, num_stages=1)
# (op, B, K, N, splits, dtype, p, cfg): every p, B, dtype and odd shape appears; K is small where
# the shape is not the point (the interpreter runs each program in numpy).
CASES = [
    ("linear", 1, 576, 1536, [576, 480, 480], torch.bfloat16, 0.5, dict(BLOCK_N=32, BLOCK_K=32, K_CHUNK=256, **E)),
    ("linear", 2, 576, 1536, [768, 768], torch.float16, 0.3, dict(BLOCK_N=128, BLOCK_K=32, K_CHUNK=128, **D)),
    ("linear", 3, 576, 1536, [1536], torch.float32, 0.9, dict(BLOCK_N=128, BLOCK_K=16, K_CHUNK=1024, **D)),
    ("linear", 8, 576, 1536, [576, 480, 480], torch.bfloat16, 0.0, dict(BLOCK_N=32, BLOCK_K=64, K_CHUNK=256, **D)),
    ("linear", 1, 96, 11008, [11008], torch.float16, 1.0, dict(BLOCK_N=256, BLOCK_K=32, K_CHUNK=64, **E)),
    ("linear", 8, 64, 11008, [5504, 5504], torch.float32, 0.5, dict(BLOCK_N=128, BLOCK_K=16, K_CHUNK=32, **D)),
    ("linear", 3, 200, 1000, [1000], torch.bfloat16, 0.3, dict(BLOCK_N=64, BLOCK_K=32, K_CHUNK=64, **D)),
    ("linear", 1, 1000, 1000, [1000], torch.float32, 0.0, dict(BLOCK_N=128, BLOCK_K=64, K_CHUNK=512, **E)),
    ("linear", 1, 300, 1000, [1000], torch.bfloat16, 0.3, dict(BLOCK_N=128, BLOCK_K=16, K_CHUNK=256, DEPTH=3, **E)),
    ("linear", 2, 150, 1000, [1000], torch.bfloat16, 1.0, dict(BLOCK_N=128, BLOCK_K=16, K_CHUNK=64, **D)),
    ("silu_down", 1, 1536, 576, [576], torch.bfloat16, 0.9, dict(BLOCK_N=64, BLOCK_K=64, K_CHUNK=512, **E)),
    ("silu_down", 2, 1536, 576, [576], torch.float32, 0.5, dict(BLOCK_N=64, BLOCK_K=32, K_CHUNK=1024, **D)),
    ("silu_down", 3, 100, 1000, [1000], torch.float16, 0.0, dict(BLOCK_N=128, BLOCK_K=32, K_CHUNK=64, **D)),
    ("silu_down", 8, 576, 1000, [1000], torch.bfloat16, 0.3, dict(BLOCK_N=256, BLOCK_K=32, K_CHUNK=256, DEPTH=3, **D)),
    ("silu_down", 1, 64, 1000, [1000], torch.float16, 1.0, dict(BLOCK_N=256, BLOCK_K=16, K_CHUNK=32, **E)),
    ("linear", 1, 500, 3072, [2048, 512, 512], torch.bfloat16, 0.5, dict(BLOCK_N=512, BLOCK_K=8, K_CHUNK=64, **E)),
    ("silu_down", 1, 1000, 1536, [1536], torch.bfloat16, 0.5, dict(BLOCK_N=1024, BLOCK_K=8, K_CHUNK=128, **E)),
    # the block fusions: RMSNorm in the input (q/k/v, gate/up), the residual add in the output (o, down)
    ("linear+norm", 1, 576, 1536, [576, 480, 480], torch.bfloat16, 0.5, dict(BLOCK_N=32, BLOCK_K=32, K_CHUNK=256, **E)),
    ("linear+norm", 3, 1000, 512, [256, 256], torch.float32, 0.3, dict(BLOCK_N=128, BLOCK_K=16, K_CHUNK=256, **D)),
    ("linear+norm", 8, 576, 1000, [1000], torch.float16, 0.9, dict(BLOCK_N=128, BLOCK_K=32, K_CHUNK=128, **D)),
    ("linear+res", 1, 576, 576, [576], torch.bfloat16, 0.5, dict(BLOCK_N=64, BLOCK_K=32, K_CHUNK=128, **E)),
    ("linear+res", 2, 300, 1000, [1000], torch.float32, 0.0, dict(BLOCK_N=128, BLOCK_K=16, K_CHUNK=512, **D)),
    ("silu_down+res", 1, 1536, 576, [576], torch.bfloat16, 0.5, dict(BLOCK_N=64, BLOCK_K=64, K_CHUNK=512, **E)),
    ("silu_down+res", 8, 200, 1000, [1000], torch.float16, 1.0, dict(BLOCK_N=256, BLOCK_K=32, K_CHUNK=64, **D)),
    ("linear+norm+res", 1, 300, 1000, [1000], torch.float16, 0.5, dict(BLOCK_N=128, BLOCK_K=16, K_CHUNK=128, **E)),
    ("linear", 1, 700, 1000, [1000], torch.float16, 0.5, dict(BLOCK_N=64, BLOCK_K=16, K_CHUNK=512, DEPTH=4, **E)),
    # RANKED with four steps in flight, as the 8B down projection runs (K not a multiple of K_CHUNK)
    ("silu_down+res", 1, 1000, 1000, [1000], torch.bfloat16, 0.5, dict(BLOCK_N=128, BLOCK_K=8, K_CHUNK=256, DEPTH=4,
                                                                       **E)),
    # dense (thresholds None, p None here): every row, its first steps requested before the input
    ("linear+norm", 1, 576, 1536, [576, 480, 480], torch.bfloat16, None, dict(BLOCK_N=64, BLOCK_K=16, K_CHUNK=256,
                                                                             DEPTH=3, **E)),
    ("linear+res", 3, 300, 1000, [1000], torch.float32, None, dict(BLOCK_N=128, BLOCK_K=16, K_CHUNK=128, **D)),
    ("silu_down+res", 1, 1536, 576, [576], torch.float16, None, dict(BLOCK_N=64, BLOCK_K=32, K_CHUNK=512, DEPTH=4,
                                                                    **E)),
    ("silu_down", 8, 1000, 1000, [1000], torch.bfloat16, None, dict(BLOCK_N=256, BLOCK_K=32, K_CHUNK=256, **D)),
]


# Quantized weights (..., weights, group): int8 per column; int4 in groups of `group` rows. A batch's chunk
# never crosses a group (the launcher caps K_CHUNK at the group), so a group may span several chunks (K_CHUNK 64
# in groups of 128 below). A B == 1 chunk spans whole groups where a round of DEPTH steps divides a group
# (triton_kernels.chunk_plan; K need not be a multiple of K_CHUNK: 576 in chunks of 256, 4 groups of 64 each).
# Rows of whole int32 words are read as words (triton_kernels.readable_as_words), others by bytes.
QUANTIZED_CASES = [
    ("linear", 1, 576, 1536, [576, 480, 480], torch.bfloat16, 0.5, dict(BLOCK_N=32, BLOCK_K=32, K_CHUNK=256, **E),
     "int8", 0),
    ("linear", 3, 576, 1000, [1000], torch.float16, 0.0, dict(BLOCK_N=128, BLOCK_K=16, K_CHUNK=128, **D), "int8", 0),
    ("linear+norm", 1, 300, 1000, [1000], torch.bfloat16, 0.9, dict(BLOCK_N=128, BLOCK_K=16, K_CHUNK=128, DEPTH=3,
                                                                   **E), "int8", 0),
    ("silu_down+res", 2, 1536, 576, [576], torch.bfloat16, 0.5, dict(BLOCK_N=64, BLOCK_K=32, K_CHUNK=512, **D),
     "int8", 0),
    ("linear", 1, 256, 11008, [11008], torch.bfloat16, None, dict(BLOCK_N=256, BLOCK_K=16, K_CHUNK=128, **E),
     "int8", 0),
    # B == 1 int8 words (subnormal bytes, the offset taken off per chunk) with the fusions, fp16 and fp32 inputs
    ("silu_down+res", 1, 1536, 576, [576], torch.float16, 0.5, dict(BLOCK_N=64, BLOCK_K=32, K_CHUNK=512, DEPTH=4,
                                                                   **E), "int8", 0),
    ("linear+res", 1, 576, 1000, [1000], torch.float32, None, dict(BLOCK_N=128, BLOCK_K=16, K_CHUNK=256, **E),
     "int8", 0),
    ("linear", 1, 576, 1536, [576, 480, 480], torch.bfloat16, 0.5, dict(BLOCK_N=32, BLOCK_K=32, K_CHUNK=256, **E),
     "int4", 64),
    ("linear", 2, 512, 1000, [1000], torch.float16, 0.9, dict(BLOCK_N=128, BLOCK_K=16, K_CHUNK=64, **D), "int4", 128),
    ("silu_down+res", 1, 1536, 576, [576], torch.bfloat16, 0.0, dict(BLOCK_N=64, BLOCK_K=64, K_CHUNK=512, DEPTH=4,
                                                                    **E), "int4", 128),
    ("linear+norm", 8, 256, 1000, [1000], torch.bfloat16, 0.5, dict(BLOCK_N=256, BLOCK_K=32, K_CHUNK=256, **D),
     "int4", 32),
    ("linear", 1, 512, 1000, [1000], torch.float32, None, dict(BLOCK_N=128, BLOCK_K=16, K_CHUNK=128, **E), "int4", 32),
    ("silu_down", 3, 640, 1000, [1000], torch.bfloat16, None, dict(BLOCK_N=128, BLOCK_K=32, K_CHUNK=128, **D),
     "int4", 128),
    # rows that are not whole int32 words (N % 4 != 0 bytes): read byte by byte
    ("linear+res", 1, 320, 254, [254], torch.bfloat16, 0.5, dict(BLOCK_N=128, BLOCK_K=16, K_CHUNK=128, **E), "int8",
     0),
    ("linear", 2, 256, 268, [268], torch.bfloat16, None, dict(BLOCK_N=128, BLOCK_K=16, K_CHUNK=64, **D), "int4", 64),
    # B == 1 int4 chunks over several groups, each group scaled as the stream leaves it (chunk_plan), dense
    # and sparse (each group's kept rows start a round, holes after them): 8 groups of 32 a chunk, the last
    # chunk shorter; rows read by bytes, 4 groups of 64; at p = 0.9 groups with no kept row, at 1.0 chunks
    ("linear+norm", 1, 384, 504, [504], torch.bfloat16, None, dict(BLOCK_N=128, BLOCK_K=8, K_CHUNK=256, DEPTH=4,
                                                                   **E), "int4", 32),
    ("silu_down+res", 1, 512, 268, [268], torch.bfloat16, None, dict(BLOCK_N=128, BLOCK_K=16, K_CHUNK=256, **E),
     "int4", 64),
    ("linear+norm", 1, 384, 504, [504], torch.bfloat16, 0.5, dict(BLOCK_N=128, BLOCK_K=8, K_CHUNK=256, DEPTH=4,
                                                                  **E), "int4", 32),
    ("linear", 1, 256, 504, [504], torch.float16, 0.9, dict(BLOCK_N=128, BLOCK_K=16, K_CHUNK=256, **E), "int4", 32),
    ("silu_down+res", 1, 512, 268, [268], torch.bfloat16, 0.5, dict(BLOCK_N=128, BLOCK_K=16, K_CHUNK=256, DEPTH=4,
                                                                   **E), "int4", 64),
    ("linear", 1, 256, 504, [504], torch.bfloat16, 1.0, dict(BLOCK_N=128, BLOCK_K=8, K_CHUNK=256, DEPTH=4, **E),
     "int4", 32),
]


def case_id(c):
    quantized = f"-{c[8]}" + (f"g{c[9]}" if c[9] else "") if len(c) > 8 else ""
    return f"{c[0]}-B{c[1]}-{c[2]}x{c[3]}-S{len(c[4])}-{str(c[5])[6:]}-p{c[6]}{quantized}"


@pytest.mark.parametrize("case", CASES + QUANTIZED_CASES, ids=[case_id(c) for c in CASES + QUANTIZED_CASES])
def test_kernel_matches_reference(interpreted, case):
    dtype, p = case[5], case[6]
    r = interpreted[case_id(case)]
    assert not r["nan"], "output not fully written (poison left)"
    assert r["counters"] == 0, "arrival counters must be left at zero for the next call"
    assert r["n_bad"] == 0, f"{r['n_bad']} outputs beyond atol=rtol={TOL[dtype]}; max error {r['max_err']:.3g}"
    if p == 1.0 and "+res" not in case[0]:
        assert r["all_zero"], "every input dropped: the output must be exactly 0"


def test_cases_cover_both_ways_to_find_the_first_rows():
    """Sparse B == 1 launches rank their first rows' indices in registers where that is cheap
    (RANKED) and read them back from the compacted scratch otherwise: the cases above run both,
    RANKED with DEPTH 2, 3 and 4."""
    from tests.test_gpu_compile import matvec_plan  # launch_plan on meta tensors

    ranked = set()
    for op, B, K, N, splits, dtype, p, cfg in CASES:
        if p is not None:
            meta = matvec_plan(op.split("+")[0], B, K, N, splits, dtype, cfg)[3]
            ranked.add((meta["RANKED"], meta["DEPTH"] if meta["RANKED"] else 0))
    assert ranked == {(False, 0), (True, 2), (True, 3), (True, 4)}


def test_quantized_cases_read_both_words_and_bytes():
    """int8 and int4 rows of whole int32 words are read as words, other rows byte by byte: the cases run
    both, and int4 chunks over several groups both ways, dense and sparse."""
    from tests.test_gpu_compile import matvec_plan

    paths, grouped = set(), set()
    for op, B, K, N, splits, dtype, p, cfg, weights, group in QUANTIZED_CASES:
        meta = matvec_plan(op.split("+")[0], B, K, N, splits, dtype, cfg, dense=p is None, weights=weights,
                           group=group or 128)[3]
        paths.add((weights, meta["WORDS"]))
        if meta["GROUPS"] > 1:
            grouped.add((p is None, meta["WORDS"]))
    assert paths == {("int8", True), ("int8", False), ("int4", True), ("int4", False)}
    assert grouped == {(True, True), (True, False), (False, True), (False, False)}  # int4 over several groups


def test_stored_integers_convert_exactly(interpreted):
    """Every int8 value and every int4 nibble comes out of the kernels' integer-arithmetic conversion
    as torch's conversion gives it (a wrong magic constant shifts every value), from bytes and, at
    every place in a word, from int32 words (their powers of two undone by _word_factors)."""
    assert interpreted["as_float"] == {"int8": 0, "int4": 0, "int8 words": 0, "int8 words dot": 0, "int4 words": 0,
                                       "int4 words dot": 0}


def test_int4_dequantization_kernel_matches_reference(interpreted):
    """The prompt's int4 weights from the Triton kernel are the reference's, value for value (NaN poison
    left anywhere counts too); scales read from the wrong group are caught."""
    found = interpreted["dequantize_int4"]
    assert found.pop("wrong group") > 0
    assert found == {f"{K}x{N}g{g}-{str(d)[6:]}": 0 for K, N, g, d, _ in DEQUANTIZE_CASES}


def test_dequantize_int4_checks_its_arguments():
    w, scale, zero = random_quantized(64, 256, "int4", 32, torch.Generator().manual_seed(0), device="cpu")
    assert torch.equal(dequantize_int4(w, scale, zero, torch.float32), dequantize(w, scale, zero))  # the CPU's way
    with pytest.raises(ValueError, match="uint8"):
        dequantize_int4(w.view(torch.int8), scale, zero, torch.bfloat16)
    with pytest.raises(ValueError, match="K / group"):
        dequantize_int4(w[:47], scale, zero, torch.bfloat16)  # 47 rows are not whole groups


def test_kernel_comparison_can_fail(interpreted):
    assert interpreted["wrong_threshold"]["n_bad"] > 0
    assert interpreted["unweighted_norm"]["n_bad"] > 0
    assert interpreted["no_residual"]["n_bad"] > 0
    assert interpreted["int4_wrong_group"]["n_bad"] > 0


def test_reference_semantics():
    """Strict |x| > t per segment, t compared in fp32 (not rounded to bf16), fp32 sums."""
    x = torch.tensor([[1.0, -2.0, 0.5, 3.0]], dtype=torch.bfloat16)
    w = torch.arange(12, dtype=torch.bfloat16).view(4, 3)
    t = torch.tensor([1.0, 0.49, 1.999])  # 1.999 rounds to 2.0 in bf16, which would drop the -2.0
    y = sparse_linear_ref(x, w, t, [1, 1, 1])
    expect = [(-2 * 3 + 3 * 9), (1 * 1 - 2 * 4 + 0.5 * 7 + 3 * 10), (-2 * 5 + 3 * 11)]
    assert y.tolist() == [expect]
    dense = [sum(float(x[0, k]) * float(w[k, n]) for k in range(4)) for n in range(3)]
    assert sparse_linear_ref(x, w, None, [1, 1, 1]).tolist() == [dense]  # no thresholds: every entry
    assert sparse_linear(x, w, None, [3]).tolist() == [dense]
    h = silu_mul(torch.tensor([[1.0, -1.0, 2.0, 3.0]]))
    assert torch.allclose(h, torch.tensor([[2 * 0.7310586, -3 * 0.2689414]]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_ops_compile_on_cpu(dtype):
    """The custom ops inside torch.compile(fullgraph=True) equal the reference; new threshold
    values reuse the compiled graph; the fake implementations give the right shapes."""
    g = torch.Generator().manual_seed(0)
    K, I = 64, 96
    w_qkv = (torch.randn(K, 128, generator=g) / 8).to(dtype)
    w13 = (torch.randn(K, 2 * I, generator=g) / 8).to(dtype)
    w2 = (torch.randn(I, K, generator=g) / 10).to(dtype)
    norm_w = (0.5 + torch.rand(K, generator=g)).to(dtype)

    def block(x, thr):  # the fused norm on q/k/v and the fused residual on down, as in model.Block
        qkv = sparse_linear(x, w_qkv, thr[0:3], [64, 32, 32], norm_weight=norm_w, eps=1e-5)
        gate_up = sparse_linear(x, w13, thr[4:6], [I, I])
        dense = sparse_silu_down(gate_up, w2, None, residual=x)  # no thresholds: the dense product
        return qkv, sparse_silu_down(gate_up, w2, thr[6:7], residual=x), dense

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True)
    thr = torch.zeros(7)
    for level in (0.0, 0.4, 0.8):
        x = torch.randn(2, K, generator=g).to(dtype)
        thr.copy_(torch.rand(7, generator=g) * level * 2)
        qkv, y, yd = compiled(x, thr)
        rq = sparse_linear_ref(x, w_qkv, thr[0:3], [64, 32, 32], norm_weight=norm_w, eps=1e-5)
        gate_up = sparse_linear_ref(x, w13, thr[4:6], [I, I])
        ry = sparse_silu_down_ref(gate_up, w2, thr[6:7], residual=x)
        torch.testing.assert_close(qkv, rq, atol=TOL[dtype], rtol=TOL[dtype])
        torch.testing.assert_close(y, ry, atol=TOL[dtype], rtol=TOL[dtype])
        torch.testing.assert_close(yd, x + (silu_mul(gate_up).float() @ w2.float()).to(dtype), atol=TOL[dtype],
                                   rtol=TOL[dtype])

    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        fx = torch.empty(5, K, dtype=dtype)
        assert torch.ops.teal.sparse_linear(fx, torch.empty(K, 128, dtype=dtype), torch.empty(3), [64, 32, 32]).shape == (5, 128)
        assert torch.ops.teal.sparse_silu_down(torch.empty(5, 2 * I, dtype=dtype), torch.empty(I, K, dtype=dtype),
                                               torch.empty(1)).shape == (5, K)


def test_bad_arguments():
    x, w = torch.randn(1, 8), torch.randn(8, 6)
    with pytest.raises(ValueError, match="sum to N"):
        sparse_linear(x, w, torch.zeros(2), [3, 2])
    with pytest.raises(ValueError, match="one entry per split"):
        sparse_linear(x, w, torch.zeros(1), [3, 3])
    with pytest.raises(ValueError, match="rows"):
        sparse_linear(torch.randn(1, 7), w, torch.zeros(1), [6])
    with pytest.raises(ValueError, match="cast"):
        sparse_linear(x.double(), w, torch.zeros(1), [6])
    with pytest.raises(ValueError, match="norm_weight must be"):
        sparse_linear(x, w, torch.zeros(1), [6], norm_weight=torch.ones(7))
    with pytest.raises(ValueError, match="residual must be"):
        sparse_linear(x, w, torch.zeros(1), [6], residual=torch.zeros(1, 5))
    with pytest.raises(ValueError, match="eps"):
        sparse_linear(x, w, torch.zeros(1), [6], norm_weight=torch.ones(8))
    with pytest.raises(ValueError, match="K=0"):
        sparse_linear(torch.randn(1, 0), torch.randn(0, 6), torch.zeros(1), [6])
    with pytest.raises(ValueError, match="device"):
        sparse_linear(x, w.to("meta"), torch.zeros(1), [6])


def test_launcher_takes_unit_stride_thresholds_and_norm_weights_only():
    """The kernel reads thresholds[s] and norm_weight[k] at unit stride, so the launcher refuses any other
    (the ops make them contiguous first): a strided view would otherwise give wrong results silently. It
    also refuses weights whose rows span 2^31 elements, past the kernels' int32 offsets."""
    pytest.importorskip("triton")
    from sparse_kernels import triton_kernels as tk
    from tests.test_gpu_compile import matvec_plan, meta_tensor

    cfg = dict(BLOCK_N=64, BLOCK_K=16, K_CHUNK=128, DOT=False, num_warps=4, num_stages=1)
    matvec_plan("linear", 1, 256, 512, [512], torch.bfloat16, cfg, norm=True)  # unit stride: fine
    x, w = meta_tensor(1, 256), meta_tensor(256, 512)
    ws = (meta_tensor(4 * 512, dtype=torch.float32), meta_tensor(8, dtype=torch.int32),
          meta_tensor(8 * 256, dtype=torch.int32), meta_tensor(8 * 256, dtype=torch.float32))
    strided = meta_tensor(2, dtype=torch.float32)[::2]
    with pytest.raises(ValueError, match="unit stride"):
        tk.launch_plan(x, w, strided, [], meta_tensor(1, 512), *ws, cfg)
    with pytest.raises(ValueError, match="unit stride"):
        tk.launch_plan(x, w, meta_tensor(1, dtype=torch.float32), [], meta_tensor(1, 512), *ws, cfg,
                       norm_weight=meta_tensor(512)[::2], eps=1e-5)
    # rows 2^20 elements apart: 256 of them span 2^28, fine; 4096 span 2^32, past int32 offsets
    tk.launch_plan(x, torch.empty_strided((256, 512), (2 ** 20, 1), device="meta", dtype=x.dtype), None, [],
                   meta_tensor(1, 512), *ws, cfg)
    x_long = meta_tensor(1, 4096)
    far_rows = torch.empty_strided((4096, 512), (2 ** 20, 1), device="meta", dtype=x.dtype)
    with pytest.raises(ValueError, match="int32 offsets"):
        tk.launch_plan(x_long, far_rows, None, [], meta_tensor(1, 512), *ws, cfg)


def test_untuned_shapes_take_the_nearest_tuned_tile(monkeypatch):
    """Shapes nobody tuned once fell to a tl.dot heuristic: Llama-3-8B's shards over two GPUs ran several
    times slower than cuBLAS (results/tp2_shards.json), the sparse step slower than dense. Now they take the elementwise
    tile of the nearest tuned shape, with about as many programs as that shape's grid. The shards
    are tuned now too, so the tensor-parallel shapes are taken out of the table here."""
    from tp import shard_matvec_shapes

    # the shards of Llama-3-8B and 70B over 2, 4 and 8 ranks, less the shapes of the benchmark's own table
    # (the 8B block and 70B's up and down)
    table_shapes = {(op, K, N) for _, op, K, N, _ in shard_matvec_shapes("Llama-3-8B", 1)} | \
        {("linear", 8192, 28672), ("silu_down", 28672, 8192)}
    shard_keys = {ops.config_key(op, K, N, torch.bfloat16, 1) for config in ("Llama-3-8B", "Llama-3-70B")
                  for world in (2, 4, 8) for _, op, K, N, _ in shard_matvec_shapes(config, world)
                  if (op, K, N) not in table_shapes}
    assert shard_keys <= set(ops.tuned_configs())
    table = {key: cfg for key, cfg in ops.tuned_configs().items() if key not in shard_keys}
    monkeypatch.setattr(ops, "_configs", table)

    def programs(K, N, cfg):
        return -(-K // cfg["K_CHUNK"]) * -(-N // cfg["BLOCK_N"])

    dense_keys = 0
    for key, tuned in table.items():  # a tuned shape gets its own config (quantized keys: "op/int8", "op/int4/dense")
        op, K, N, dtype, b = ops.parse_config_key(key)
        op, _, weights = op.partition("/")
        weights, _, dense = weights.partition("/")
        dt = torch.bfloat16 if dtype == "bf16" else torch.float16
        assert ops.pick_config(op, K, N, dt, b, 132, weights or "float", dense=bool(dense)) == tuned
        if dense:  # the dense kernel's own config, and only the dense kernel's
            dense_keys += 1
            assert ops.pick_config(op, K, N, dt, b, 132, weights) == table[ops.config_key(op, K, N, dt, b, weights)]
            assert tuned != table[ops.config_key(op, K, N, dt, b, weights)]
    assert dense_keys > 0
    shards = [("linear", 4096, 3072, 4096, 4096), ("linear", 2048, 4096, 4096, 4096),
              ("linear", 4096, 14336, 4096, 28672), ("silu_down", 7168, 4096, 14336, 4096)]
    for op, K, N, K_near, N_near in shards:
        near = table[ops.config_key(op, K_near, N_near, torch.bfloat16, 1)]
        for dtype in (torch.bfloat16, torch.float16):
            cfg = ops.pick_config(op, K, N, dtype, 1, 132)
            assert not cfg["DOT"] and {k: cfg[k] for k in ("BLOCK_K", "DEPTH", "num_warps")} == \
                {k: near[k] for k in ("BLOCK_K", "DEPTH", "num_warps")}, (op, K, N, cfg)
            assert 0.5 <= programs(K, N, cfg) / programs(K_near, N_near, near) <= 2, (op, K, N, cfg)
        assert ops.pick_config(op, K, N, torch.bfloat16, 3, 132)["DOT"]  # B > 1: a tl.dot tile
    for op, K, N in [("linear", 576, 1536), ("linear", 100, 1000), ("silu_down", 1536, 576), ("linear", 8192, 1000)]:
        for B in (1, 2, 8):  # launchable: K_CHUNK a power of two of at least BLOCK_K, BLOCK_N no wider than N needs
            cfg = ops.pick_config(op, K, N, torch.bfloat16, B, 132)
            kc = cfg["K_CHUNK"]
            assert kc & (kc - 1) == 0 and kc >= cfg["BLOCK_K"] and cfg["BLOCK_N"] <= max(16, 1 << (N - 1).bit_length())


def test_int4_tuning_candidates_launch_differently():
    """No two int4 candidates of a shape launch alike (triton_kernels.chunk_plan caps a chunk above the
    group at the group, unless a B == 1 launch spans groups): the tuner times each launch once, and the
    chunk of one group is among them."""
    from scripts.bench_kernels import candidate_configs
    from sparse_kernels.triton_kernels import chunk_plan

    for group, B in ((32, 1), (128, 1), (128, 8)):  # (a batch's tiles over groups of 32 make too many programs)
        for op, K, N in (("linear", 4096, 28672), ("silu_down", 14336, 4096)):
            cands = candidate_configs(op, K, N, B, 132, weights="int4", group=group)
            launches = {(tuple(sorted((k, v) for k, v in c.items() if k not in ("K_CHUNK", "BLOCK_K"))),
                         chunk_plan(c, group, B)) for c in cands}
            assert cands and len(launches) == len(cands), (group, B, op)
            assert any(c["K_CHUNK"] == group for c in cands), (group, B, op)


def test_tune_shapes_from_a_config():
    """--tune_shapes CONFIG[@WORLD] builds the block's matvecs from tp.shard_of: at world 1 they are
    the hand-written Llama-3-8B shapes of the benchmark table."""
    from scripts.bench_kernels import TUNED_SHAPES, shapes_to_tune

    assert [s[1:] for s in shapes_to_tune("Llama-3-8B")] == [s[1:] for s in TUNED_SHAPES if s[0].startswith("8B")]
    qkv, o, gate_up, down = shapes_to_tune("Llama-3-70B@4")
    assert qkv[2:] == (8192, 2560, [2048, 256, 256]) and o[2:4] == (2048, 8192) and down[2:4] == (7168, 8192)
    for bad in ("Llama-3-8B@9", "Llama-3-8B@0", "Llama-3-8B@two", "NoSuchModel"):
        with pytest.raises(ValueError):
            shapes_to_tune(bad)
