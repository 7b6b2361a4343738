"""The CPU kernels (sparse_kernels/cpu_kernels.c) against the torch reference.

Tolerances as in test_kernels.py (checks.TOL): the kernel sums in another order than the
reference's matmul, and its exp (silu, softmax) is its own; the bf16 roundings are the reference's.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparse_kernels import (cpu, decode_attention_step, decode_attention_step_ref, out_features, sparse_linear,
                            sparse_silu_down)
from sparse_kernels.checks import TOL, reference_op
from tests.test_kernels import make_inputs

needs_kernel = pytest.mark.skipif(not cpu.available(), reason="no C compiler: the CPU kernel is not built")

ROOT = Path(__file__).resolve().parent.parent
F32, BF16 = torch.float32, torch.bfloat16
# (op, B, K, N, splits, dtype, p, threads); p None: dense (no thresholds). Every fusion, B in 1 2 3 8,
# the model's shapes and odd ones (odd segment widths, an N the threads cannot share evenly).
CASES = [
    ("linear", 1, 576, 1536, [576, 480, 480], F32, 0.5, 2),
    ("linear", 2, 576, 1536, [768, 768], BF16, 0.9, 2),
    ("linear", 3, 576, 1536, [1536], F32, 0.0, 1),
    ("linear", 8, 576, 1000, [1000], BF16, 0.5, 3),
    ("linear", 1, 200, 11008, [5504, 5504], BF16, 0.9, 2),
    ("linear", 1, 300, 1001, [500, 333, 168], BF16, 0.5, 2),
    ("linear", 2, 64, 40, [40], F32, 0.5, 5),  # more threads than 16-column units
    ("linear", 1, 576, 1536, [1536], F32, None, 2),
    ("linear", 1, 128, 1000, [1000], BF16, 1.0, 2),
    ("linear+norm", 1, 576, 960, [576, 192, 192], BF16, 0.5, 2),
    ("linear+norm", 3, 576, 1536, [768, 768], F32, 0.9, 2),
    ("linear+norm", 8, 576, 3072, [1536, 1536], BF16, None, 2),
    ("linear+res", 1, 576, 576, [576], F32, 0.5, 2),
    ("linear+res", 2, 576, 576, [576], BF16, None, 1),
    ("linear+norm+res", 2, 1000, 1001, [1001], BF16, 0.0, 2),
    ("silu_down", 1, 1536, 576, [576], BF16, 0.5, 2),
    ("silu_down", 8, 1536, 576, [576], F32, 0.9, 2),
    ("silu_down", 1, 1536, 576, [576], BF16, None, 2),
    ("silu_down+res", 3, 1536, 576, [576], F32, 0.0, 2),
    ("silu_down+res", 2, 1000, 1000, [1000], BF16, 0.5, 3),
    ("silu_down+res", 1, 1536, 576, [576], F32, None, 2),
]


# int8 weights with their column scales, fp32 and bf16 activations, every fusion and batch sizes
INT8_CASES = [
    ("linear+norm", 1, 576, 960, [576, 192, 192], F32, 0.5, 2),
    ("linear+norm", 3, 576, 1536, [768, 768], BF16, 0.9, 2),
    ("linear+res", 1, 576, 576, [576], BF16, None, 2),
    ("linear", 8, 300, 1001, [500, 333, 168], F32, 0.0, 3),
    ("silu_down+res", 1, 1536, 576, [576], F32, 0.5, 2),
    ("silu_down", 2, 1000, 1000, [1000], BF16, None, 1),
]


# int4 weights (two values a byte, groups of G rows with scales and offsets): (case..., G)
INT4_CASES = [
    ("linear+norm", 1, 576, 960, [576, 192, 192], F32, 0.5, 2, 64),
    ("linear+norm", 3, 576, 1536, [768, 768], BF16, 0.9, 2, 32),
    ("linear+res", 1, 576, 576, [576], BF16, None, 2, 64),
    ("linear", 8, 320, 1002, [500, 334, 168], F32, 0.0, 3, 32),
    ("silu_down+res", 1, 1536, 576, [576], F32, 0.5, 2, 128),
    ("silu_down", 2, 1536, 1000, [1000], BF16, None, 1, 64),
]


def case_id(c):
    return f"{c[0]}-B{c[1]}-{c[2]}x{c[3]}-S{len(c[4])}-{str(c[5])[6:]}-p{c[6]}-T{c[7]}"


def run_kernel(op, x, w, thr, splits, norm_w, residual, n_threads, scale=None, zero=None):
    """The kernel writing into a NaN-poisoned output: every entry must be written."""
    N = out_features(w)
    out = torch.full((x.shape[0], N), float("nan"), dtype=x.dtype)
    if op.startswith("silu_down"):
        return cpu.matvec(x, w, None if thr is None else thr[:1], [N], residual=residual, silu=True,
                          scale=scale, zero=zero, out=out, n_threads=n_threads)
    return cpu.matvec(x, w, thr, splits, norm_w, 1e-5, residual, scale=scale, zero=zero, out=out, n_threads=n_threads)


def n_bad(y, ref, tol):
    y, ref = y.float(), ref.float()
    return int((~((y - ref).abs() <= tol + tol * ref.abs())).sum())  # nan (poison) counts as bad


@needs_kernel
@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_matvec_matches_reference(case):
    op, B, K, N, splits, dtype, p, threads = case
    x, w, thr, norm_w, residual, _, _ = make_inputs(op, B, K, N, len(splits), dtype, p, seed=len(case_id(case)))
    y = run_kernel(op, x, w, thr, splits, norm_w, residual, threads)
    ref = reference_op(op, x, w, thr, splits, norm_w, residual)
    assert n_bad(y, ref, TOL[dtype]) == 0, f"max error {(y.float() - ref.float()).abs().max():.3g}"
    if p == 1.0 and "+res" not in op:
        assert not y.any(), "every input dropped: the output must be exactly 0"


@needs_kernel
@pytest.mark.parametrize("case", INT8_CASES, ids=[case_id(c) for c in INT8_CASES])
def test_int8_matvec_matches_reference(case):
    """int8 rows read as integers, the column scales applied to the sums: the reference dequantizes
    first (w = q * scale); one column scale doubled is caught."""
    op, B, K, N, splits, dtype, p, threads = case
    x, w, thr, norm_w, residual, scale, _ = make_inputs(op, B, K, N, len(splits), dtype, p,
                                                        seed=len(case_id(case)), weights="int8")
    assert cpu.usable(x, w)
    y = run_kernel(op, x, w, thr, splits, norm_w, residual, threads, scale=scale)
    ref = reference_op(op, x, w, thr, splits, norm_w, residual, scale=scale)
    assert n_bad(y, ref, TOL[dtype]) == 0, f"max error {(y.float() - ref.float()).abs().max():.3g}"
    off = scale.clone()
    off[N // 3] *= 2.0
    assert n_bad(y, reference_op(op, x, w, thr, splits, norm_w, residual, scale=off), TOL[dtype]) > 0


@needs_kernel
@pytest.mark.parametrize("case", INT4_CASES, ids=[f"{case_id(c)}-g{c[8]}" for c in INT4_CASES])
def test_int4_matvec_matches_reference(case):
    """int4 rows unpacked and summed as integers per group, the group's scales and offsets applied to
    its sums: the reference dequantizes first (w = q * scale + zero). One group's offsets of one column
    changed, or the scales of the group before used, is caught."""
    op, B, K, N, splits, dtype, p, threads, group = case
    x, w, thr, norm_w, residual, scale, zero = make_inputs(op, B, K, N, len(splits), dtype, p,
                                                           seed=len(case_id(case)), weights="int4", group=group)
    assert cpu.usable(x, w, splits) and not cpu.usable(x, w, [N - 1, 1])  # odd segments: the reference
    y = run_kernel(op, x, w, thr, splits, norm_w, residual, threads, scale=scale, zero=zero)
    ref = reference_op(op, x, w, thr, splits, norm_w, residual, scale=scale, zero=zero)
    assert n_bad(y, ref, TOL[dtype]) == 0, f"max error {(y.float() - ref.float()).abs().max():.3g}"
    off = zero.clone()
    off[1, N // 3] += 4 * scale[1, N // 3]
    assert n_bad(y, reference_op(op, x, w, thr, splits, norm_w, residual, scale=scale, zero=off), TOL[dtype]) > 0
    shifted = torch.cat([scale[:1], scale[:-1]])
    assert n_bad(y, reference_op(op, x, w, thr, splits, norm_w, residual, scale=shifted, zero=zero), TOL[dtype]) > 0


@needs_kernel
def test_matvec_comparison_can_fail():
    """A slightly lower threshold, a norm without its weight or a missing residual is a different result."""
    x, w, thr, norm_w, residual, _, _ = make_inputs("linear+norm+res", 2, 576, 576, 1, F32, 0.5, seed=3)
    y = run_kernel("linear", x, w, thr, [576], norm_w, residual, 2)
    tol = TOL[F32]
    assert n_bad(y, reference_op("linear", x, w, thr, [576], norm_w, residual), tol) == 0
    assert n_bad(y, reference_op("linear", x, w, thr * 0.9, [576], norm_w, residual), tol) > 0
    assert n_bad(y, reference_op("linear", x, w, thr, [576], torch.ones_like(norm_w), residual), tol) > 0
    assert n_bad(y, reference_op("linear", x, w, thr, [576], norm_w, None), tol) > 0


@needs_kernel
def test_public_ops_run_the_kernel_and_the_switch_turns_it_off(monkeypatch):
    """sparse_linear / sparse_silu_down (eager, and the custom ops) take the kernel on the CPU; with
    TEAL_CPU_REFERENCE=1 they take the reference, which here gives bitwise the reference's result."""
    x, w, thr, _, residual, _, _ = make_inputs("silu_down+res", 1, 1536, 576, 1, F32, 0.5, seed=5)
    xl, wl, thrl, norm_w, _, _, _ = make_inputs("linear+norm", 1, 576, 960, 3, F32, 0.5, seed=6)
    calls = []
    real = cpu.matvec
    monkeypatch.setattr(cpu, "matvec", lambda *a, **k: calls.append(1) or real(*a, **k))
    y = sparse_silu_down(x, w, thr, residual=residual)
    yl = sparse_linear(xl, wl, thrl, [576, 192, 192], norm_weight=norm_w, eps=1e-5)
    yo = torch.ops.teal.sparse_linear(xl, wl, thrl, [576, 192, 192], norm_w, 1e-5, None)
    assert len(calls) == 3
    ref = reference_op("silu_down+res", x, w, thr, [576], None, residual)
    refl = reference_op("linear+norm", xl, wl, thrl, [576, 192, 192], norm_w, None)
    assert n_bad(y, ref, TOL[F32]) == 0 and n_bad(yl, refl, TOL[F32]) == 0 and torch.equal(yo, yl)
    monkeypatch.setenv("TEAL_CPU_REFERENCE", "1")
    assert torch.equal(sparse_silu_down(x, w, thr, residual=residual), ref)
    assert torch.equal(sparse_linear(xl, wl, thrl, [576, 192, 192], norm_weight=norm_w, eps=1e-5), refl)
    assert len(calls) == 3


@needs_kernel
@pytest.mark.parametrize("B,K,N,dtype,threads", [
    (1, 576, 4099, F32, 2), (1, 576, 4099, BF16, 2), (3, 100, 1000, F32, 3), (8, 577, 333, BF16, 2),
    (2, 7, 64, F32, 1),  # K shorter than the 16 partial sums
])
def test_linear_rows_matches_f_linear(B, K, N, dtype, threads):
    """The LM head's product in nn.Linear's layout against F.linear on the same values (fp32 sums
    rounded once); a row of w changed changes its output alone (every row read, none twice)."""
    g = torch.Generator().manual_seed(B * K + N)
    x = torch.randn(B, 2 * K, generator=g).to(dtype)[:, ::2]  # rows 2K apart, last-axis stride 2: made contiguous
    w = torch.randn(N, K + 3, generator=g).to(dtype)[:, :K]  # rows K + 3 apart
    out = torch.full((B, N), float("nan"), dtype=dtype)
    y = cpu.linear_rows(x, w, out=out, n_threads=threads)
    ref = torch.nn.functional.linear(x.float(), w.float()).to(dtype)
    assert n_bad(y, ref, TOL[dtype]) == 0, f"max error {(y.float() - ref.float()).abs().max():.3g}"
    w2 = w.clone()
    w2[N // 2] += 1.0
    y2 = cpu.linear_rows(x, w2, n_threads=threads)
    changed = (y2 != y).any(dim=0).nonzero().flatten().tolist()
    assert changed == [N // 2]


@needs_kernel
def test_model_head_takes_the_kernel_on_the_cpu(monkeypatch):
    """A tied head of up to 8 rows runs linear_rows; the logits match F.linear's."""
    from model import ModelArgs, Transformer

    torch.manual_seed(0)
    model = Transformer(ModelArgs(n_layer=1, n_head=2, dim=64, intermediate_size=96, vocab_size=300,
                                  block_size=32, tie_embeddings=True))
    calls = []
    real = cpu.linear_rows
    monkeypatch.setattr(cpu, "linear_rows", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(1, 3, 64)
    logits = model.head(x)
    assert calls == [1] and logits.shape == (1, 3, 300)
    ref = torch.nn.functional.linear(x, model.tok_embeddings.weight)
    assert n_bad(logits, ref, TOL[F32]) == 0


def attention_inputs(B, KV, G, hd, S, dtype, seed, strided=False):
    """qkv, caches full of random values (the kernel must write only position pos), a RoPE table."""
    from model import precompute_freqs_cis

    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, 1, (KV * G + 2 * KV) * hd, generator=g).to(dtype)
    shape = (B, KV, S + 5 if strided else S, hd)  # strided: a view of the first S positions of a longer cache
    k_cache, v_cache = (torch.randn(shape, generator=g).to(dtype)[:, :, :S] for _ in range(2))
    return qkv, k_cache, v_cache, precompute_freqs_cis(S, hd, 10000.0)


@needs_kernel
@pytest.mark.parametrize("B,KV,G,hd,S,pos,dtype,threads,strided", [
    (1, 3, 3, 64, 40, 17, F32, 1, False),
    (1, 3, 3, 64, 40, 39, BF16, 2, False),
    (2, 3, 3, 64, 40, 0, F32, 2, True),
    (3, 2, 1, 8, 9, 5, BF16, 3, True),
    (1, 3, 3, 64, 3000, 2999, BF16, 2, False),  # long enough to split the heads between threads
    (8, 1, 4, 16, 70, 33, F32, 2, False),
])
def test_attention_step_matches_reference(B, KV, G, hd, S, pos, dtype, threads, strided):
    qkv, k_cache, v_cache, table = attention_inputs(B, KV, G, hd, S, dtype, seed=pos, strided=strided)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    ref = decode_attention_step_ref(qkv, KV * G, k_ref, v_ref, table, torch.tensor([pos]))
    out = torch.full((B, KV, G, hd), float("nan"), dtype=dtype)
    cpu.attention_step(qkv, KV * G, k_cache, v_cache, table, torch.tensor([pos]), out=out, n_threads=threads)
    tol = TOL[dtype]
    assert n_bad(out, ref, tol) == 0, f"max error {(out.float() - ref.float()).abs().max():.3g}"
    assert n_bad(k_cache, k_ref, tol) == 0 and torch.equal(v_cache, v_ref)
    assert torch.equal(k_cache[:, :, pos + 1:], k_ref[:, :, pos + 1:])  # untouched past pos
    # the comparison has teeth: another position's step differs
    other = decode_attention_step_ref(qkv, KV * G, k_ref.clone(), v_ref.clone(), table, torch.tensor([pos // 2]))
    assert pos == 0 or n_bad(out, other, tol) > 0


@needs_kernel
def test_attention_step_takes_the_kernel_and_refuses_a_bad_position():
    qkv, k_cache, v_cache, table = attention_inputs(1, 3, 3, 64, 20, F32, seed=0)
    assert cpu.takes_attention(qkv, k_cache, v_cache, table)
    assert not cpu.takes_attention(qkv, k_cache.transpose(2, 3), v_cache, table)
    with pytest.raises(ValueError, match="outside the cache"):
        decode_attention_step(qkv, 9, k_cache, v_cache, table, torch.tensor([20]))


@needs_kernel
def test_greedy_text_at_40_percent_is_the_reference_paths(smollm2_checkpoint, smollm2_sparsity, monkeypatch):
    """The embedded model at 40%: the kernels' greedy text is the reference's (TEAL_CPU_REFERENCE=1).
    The two sum in different orders, so a value within rounding of its threshold can fall on the
    other side in one path and the texts part after that step; on the default prompt they agree for
    the first 50 tokens (fp32, this machine), so 24 are compared."""
    from generate import generate
    from loader import load_model
    from tokenizer import load_tokenizer

    model = load_model(smollm2_checkpoint, "cpu", torch.float32)
    model.set_thresholds(smollm2_sparsity.thresholds(0.4, "greedy"))
    model.sparse_decode = True
    prompt = torch.tensor(load_tokenizer(smollm2_checkpoint).encode("The capital of France is", bos=True),
                          dtype=torch.int)
    calls = []
    real = cpu.matvec
    monkeypatch.setattr(cpu, "matvec", lambda *a, **k: calls.append(1) or real(*a, **k))
    ours = generate(model, prompt, 24)
    assert len(calls) >= 23 * 30 * 4  # every decode step's matvecs ran the kernel
    monkeypatch.setenv("TEAL_CPU_REFERENCE", "1")
    assert torch.equal(generate(model, prompt, 24), ours)


def test_without_a_compiler_the_ops_run_the_reference(tmp_path):
    """No C compiler (CC pointing nowhere, an empty cache): one warning, then the reference's results."""
    script = """
import warnings, torch
from sparse_kernels import cpu, sparse_linear, sparse_linear_ref
x, w, t = torch.randn(1, 64), torch.randn(64, 32), torch.tensor([0.5])
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    ys = [sparse_linear(x, w, t, [32]) for _ in range(3)]
assert not cpu.available() and len(caught) == 1 and "torch reference" in str(caught[0].message), caught
assert all(torch.equal(y, sparse_linear_ref(x, w, t, [32])) for y in ys)
print("ok")
"""
    env = dict(os.environ, CC=str(tmp_path / "no-such-compiler"), TEAL_CACHE_DIR=str(tmp_path / "cache"))
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_read_rows_reads_exactly_the_listed_bytes():
    """scripts/read_rows.c (the CPU read bound): its checksum is the one computed here from the listed
    slices (odd widths, a tail of bytes past the last whole word, a segment of no rows, 1 and 2
    threads); a changed byte inside a listed slice changes it, one outside does not."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_cpu_bound import Step, checksum, reader, run_read

    g = torch.Generator().manual_seed(0)
    a = torch.randint(-2**31, 2**31 - 1, (37, 29), dtype=torch.int32, generator=g).view(torch.float32)  # (K, N)
    b = torch.randn(11, 5, generator=g).to(torch.bfloat16)
    step = Step()
    step.add_call(a, [(0, 17, torch.tensor([0, 3, 4, 36])), (17, 5, torch.tensor([], dtype=torch.long)),
                      (22, 7, torch.arange(0, 37, 2))])
    step.add_call(b, [(1, 3, torch.tensor([2, 10]))])  # 6 bytes a row: no whole word
    read = reader()
    for threads in (1, 2):
        assert run_read(read, step, step.arrays(), threads) == checksum(step)
    before = run_read(read, step, step.arrays(), 2)
    a.view(torch.int32)[35, 10] ^= 1 << 7  # row 35 is in no list
    a.view(torch.int32)[3, 20] ^= 1 << 7  # row 3 is listed, but column 20 lies in the segment of no rows
    assert run_read(read, step, step.arrays(), 2) == before
    a.view(torch.int32)[4, 16] ^= 1 << 9  # row 4, the first segment's last column
    assert run_read(read, step, step.arrays(), 2) != before
    b.view(torch.int16)[10, 3] ^= 1  # the last byte pair of a bf16 slice
    assert run_read(read, step, step.arrays(), 1) == checksum(step)


def test_bench_cpu_bound_on_the_embedded_model(smollm2_checkpoint, tmp_path):
    """scripts/bench_cpu_bound.py end to end (2 steps, 1 round): dense reads every row of the blocks,
    the 50% step about half of them; the reported bytes are what the rows add up to."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import json

    from bench_cpu_bound import main

    out = tmp_path / "bound.json"
    main(["--checkpoint_path", str(smollm2_checkpoint), "--sparsity_file",
          str(ROOT / "sparsity" / "SmolLM2-135M-Instruct.json"), "--levels", "0.5", "--tokens", "2", "--rounds", "1",
          "--out", str(out)])
    dense, half = json.loads(out.read_text())["results"]
    assert dense["level"] == 0 and dense["kept_fraction_blocks"] == 1.0 and half["level"] == 0.5
    assert 0.3 < half["kept_fraction_blocks"] < 0.7
    head_mb = 49152 * 576 * 4 / 1e6
    blocks_mb = dense["mb_per_step"] - head_mb
    assert abs(blocks_mb - 30 * 576 * (960 + 576 + 2 * 1536) * 4 / 1e6 - 1536 * 576 * 4 * 30 / 1e6) < 1e-6
    assert abs(half["mb_per_step"] - head_mb - half["kept_fraction_blocks"] * blocks_mb) < 1e-6
    assert all(r["read_ms"] > 0 and r["kernel_ms"] > 0 for r in (dense, half))
