"""The decode attention kernel against its torch reference, under Triton's interpreter on the CPU
(in a child process, as in test_kernels.py), plain and as the fused decode step (RoPE of q and
the new k, their cache write, attention). Tolerances (atol = rtol; outputs are O(1)): bf16 2e-2
and fp16 4e-3 (the kernel rounds unnormalised probabilities, the reference normalised ones),
fp32 1e-4 (summation order only); the written cache entries: one ulp of the dtype (2^-7, 2^-10
and 1e-6 relative: the rotation's fp32 arithmetic may be fused differently)."""
import json
import os

import pytest
import torch

from sparse_kernels import (decode_attention, decode_attention_ref, decode_attention_step, decode_attention_step_ref,
                            rope)
from tests.interpreted import compare, run_child

TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 1e-4}
CACHE_TOL = {torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10, torch.float32: 1e-6}
# (B, KV, G, S, hd, dtype, mask): several splits, one split, G of 1 to 8, hd not a power of two
CASES = [
    (1, 2, 4, 205, 128, torch.bfloat16, "prefix"),
    (2, 3, 3, 100, 64, torch.float32, "random"),
    (1, 1, 8, 1000, 128, torch.float16, "prefix"),
    (1, 2, 1, 40, 32, torch.bfloat16, "all"),
    (1, 2, 2, 130, 80, torch.float32, "prefix"),
    (1, 1, 2, 3000, 32, torch.float32, "prefix"),  # 32 splits of two blocks: the online rescale
    (1, 2, 2, 50, 8, torch.bfloat16, "random"),  # hd below the 16-wide padding
    (2, 2, 4, 150, 64, torch.float16, "slice"),  # k and v are views into longer caches
    (1, 2, 1, 700, 64, torch.float32, "random"),  # one query row per kv head, several splits
    (2, 1, 4, 150, 64, torch.bfloat16, "transposed"),  # one kv head from a (B, S, 1, hd) layout: torch calls it
    # contiguous, though its head stride is hd; the kernel steps from batch row to batch row by stride(0)
]
# the fused decode step: (B, KV, G, S, hd, dtype, position); causal: positions <= position attend
STEP_CASES = [
    (1, 2, 4, 205, 128, torch.bfloat16, 140),
    (2, 3, 3, 100, 64, torch.float16, 0),  # the first position: only the new k/v attend
    (1, 2, 2, 3000, 32, torch.float32, 2999),  # the last position of the last of 32 splits
    (2, 2, 1, 130, 80, torch.bfloat16, 128),  # hd not a power of two; the position starts the second tile
    (1, 2, 4, 600, 64, torch.bfloat16, 300),  # split: 10 of the 19 programs per head hold positions, 9 idle
    (1, 2, 2, 400, 32, torch.float32, 20),  # split, but one program holds every position: nothing to merge
]


def make_inputs(B, KV, G, S, hd, dtype, pattern, seed):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, KV, G, hd, generator=g) * 2).to(dtype)  # peaked softmax: the mask matters
    k, v = (torch.randn(B, KV, S, hd, generator=g).to(dtype) for _ in range(2))
    if pattern == "slice":
        k, v = (torch.randn(B, KV, S + 37, hd, generator=g).to(dtype)[:, :, :S] for _ in range(2))
    if pattern == "transposed":
        k, v = (torch.randn(B, S, KV, hd, generator=g).to(dtype).transpose(1, 2) for _ in range(2))
    if pattern in ("prefix", "slice", "transposed"):
        mask = torch.arange(S) <= int(S * 0.7)
    elif pattern == "random":
        mask = torch.rand(S, generator=g) < 0.5
        mask[0] = True
    else:
        mask = torch.ones(S, dtype=torch.bool)
    return q, k, v, mask


def _child():
    assert os.environ.get("TRITON_INTERPRET") == "1"  # in the environment from the start: before any import of triton
    from sparse_kernels import attention

    torch.set_num_threads(1)
    out = {}
    for i, (B, KV, G, S, hd, dtype, pattern) in enumerate(CASES):
        q, k, v, mask = make_inputs(B, KV, G, S, hd, dtype, pattern, seed=i)
        y = torch.full((B * KV, G, hd), float("nan"), dtype=dtype)  # poisoned
        n_part, n_count = attention.workspace_sizes(B * KV, G, hd, S)
        part, counts = torch.full((n_part,), float("nan")), torch.zeros(n_count, dtype=torch.int32)
        attention.launch(q, k, v, mask, y, part, counts)
        if pattern == "slice":
            assert k.stride(1) == (S + 37) * hd  # a real strided view reached the kernel
        if pattern == "transposed":
            assert k.is_contiguous() and k.stride(1) == hd and attention.walkable(k, v)
        ref = decode_attention_ref(q, k, v, mask).reshape(B * KV, G, hd).float()
        wrong = decode_attention_ref(q, k, v, torch.ones_like(mask)).reshape(B * KV, G, hd).float()
        out[str(i)] = dict(compare(y, ref, TOL[dtype]), counters=int(counts.abs().sum()),
                           differs_from_unmasked=float((ref - wrong).abs().max()))
    for i, case in enumerate(STEP_CASES):
        out[f"step{i}"] = run_step(attention, *case, seed=100 + i)
    out["past_the_cache"] = step_past_the_cache(attention)
    print(json.dumps(out))


def step_past_the_cache(attention):
    """A position at or past the cache's end (a caller's error the op cannot check without a sync):
    nothing outside the cache is read or written, and the counters stay at zero."""
    B, KV, G, S, hd, dtype = 1, 2, 2, 300, 32, torch.float32
    qkv, n_head, (k_cache, v_cache), table, _ = make_step_inputs(B, KV, G, S, hd, dtype, 0, seed=7)
    from sparse_kernels.reference import split_qkv
    q, k, v = split_qkv(qkv, n_head, KV, hd)
    store = torch.randn(2, B, KV, S + 1, hd)  # one guard row after each cache
    k_cache, v_cache = store[0, :, :, :S], store[1, :, :, :S]
    before = store.clone()
    y = torch.full((B * KV, G, hd), float("nan"), dtype=dtype)
    n_part, n_count = attention.workspace_sizes(B * KV, G, hd, S, step=True)
    part, counts = torch.full((n_part,), float("nan")), torch.zeros(n_count, dtype=torch.int32)
    attention.launch(q, k_cache, v_cache, None, y, part, counts, rope=(k, v, table, torch.tensor([S])))
    return dict(untouched=bool(torch.equal(store, before)), counters=int(counts.abs().sum()),
                finite=bool(torch.isfinite(y).all()))


def make_step_inputs(B, KV, G, S, hd, dtype, pos, seed):
    """qkv (B, 1, N) as the model's projection gives it, n_head, caches, a RoPE table (S + 3, hd/2, 2), position."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, 1, (KV * G + 2 * KV) * hd, generator=g).to(dtype)
    qkv[..., :KV * G * hd] *= 2  # a peaked softmax: the causal mask and the rotation matter
    caches = [torch.randn(B, KV, S, hd, generator=g).to(dtype) for _ in range(2)]
    angles = torch.rand(S + 3, hd // 2, generator=g) * 6.0
    table = torch.stack([angles.cos(), angles.sin()], dim=-1)  # (S + 3, hd/2, 2)
    return qkv, KV * G, caches, table, torch.tensor([pos])


def run_step(attention, B, KV, G, S, hd, dtype, pos, seed):
    from sparse_kernels.reference import split_qkv

    qkv, n_head, (k_cache, v_cache), table, input_pos = make_step_inputs(B, KV, G, S, hd, dtype, pos, seed)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    ref = decode_attention_step_ref(qkv, n_head, k_ref, v_ref, table, input_pos).reshape(B * KV, G, hd)
    q, k, v = split_qkv(qkv, n_head, KV, hd)  # the views the op hands the kernel
    unrotated = decode_attention_ref(q, k_ref, v_ref, torch.arange(S) <= pos).reshape(B * KV, G, hd)
    y = torch.full((B * KV, G, hd), float("nan"), dtype=dtype)
    n_part, n_count = attention.workspace_sizes(B * KV, G, hd, S, step=True)
    part, counts = torch.full((n_part,), float("nan")), torch.zeros(n_count, dtype=torch.int32)
    before = k_cache.clone()
    attention.launch(q, k_cache, v_cache, None, y, part, counts, rope=(k, v, table, input_pos))
    others = torch.ones(S, dtype=torch.bool)
    others[pos] = False
    cache_err = max(float(((c - r).abs().float() / r.abs().float().clamp_min(1e-3))[:, :, pos].max())
                    for c, r in ((k_cache, k_ref), (v_cache, v_ref)))
    return dict(compare(y, ref, TOL[dtype]), counters=int(counts.abs().sum()), cache_rel_err=cache_err,
                others_untouched=bool(torch.equal(k_cache[:, :, others], before[:, :, others])),
                cache_changed=bool((k_cache[:, :, pos] != before[:, :, pos]).any()),
                differs_unrotated=float((ref.float() - unrotated.float()).abs().max()))


@pytest.fixture(scope="module")
def interpreted():
    return run_child("tests.test_attention", timeout=900)


@pytest.mark.parametrize("i", range(len(CASES)), ids=[f"B{c[0]}-KV{c[1]}-G{c[2]}-S{c[3]}-hd{c[4]}-{str(c[5])[6:]}-{c[6]}"
                                                      for c in CASES])
def test_decode_attention_matches_reference(interpreted, i):
    r = interpreted[str(i)]
    assert not r["nan"], "output not fully written (poison left)"
    assert r["counters"] == 0, "arrival counters must be left at zero for the next call"
    assert r["n_bad"] == 0, f"{r['n_bad']} outputs off; max error {r['max_err']:.3g}"
    if CASES[i][6] != "all":  # the check has teeth: ignoring the mask is a different result
        assert r["differs_from_unmasked"] > 10 * TOL[CASES[i][5]]


@pytest.mark.parametrize("i", range(len(STEP_CASES)), ids=[f"B{c[0]}-KV{c[1]}-G{c[2]}-S{c[3]}-hd{c[4]}-"
                                                           f"{str(c[5])[6:]}-pos{c[6]}" for c in STEP_CASES])
def test_decode_attention_step_matches_reference(interpreted, i):
    r, dtype = interpreted[f"step{i}"], STEP_CASES[i][5]
    assert not r["nan"], "output not fully written (poison left)"
    assert r["counters"] == 0, "arrival counters must be left at zero for the next call"
    assert r["n_bad"] == 0, f"{r['n_bad']} outputs off; max error {r['max_err']:.3g}"
    assert r["cache_changed"] and r["others_untouched"], "only the step's position of the cache is written"
    assert r["cache_rel_err"] <= CACHE_TOL[dtype], f"cache entry off by {r['cache_rel_err']:.3g} (relative)"
    if STEP_CASES[i][6] > 0:  # the check has teeth: RoPE changes the result (one position: softmax = 1)
        assert r["differs_unrotated"] > 10 * TOL[dtype]


def test_decode_attention_step_past_the_cache_touches_nothing_outside(interpreted):
    r = interpreted["past_the_cache"]
    assert r["untouched"] and r["counters"] == 0 and r["finite"], r


def test_decode_attention_step_op_on_cpu_is_the_reference(monkeypatch):
    """The op (CPU without its kernel: the reference) writes the caches in place and equals the
    reference; RoPE of the model's layout (B, T, heads, hd) is the same function. (The CPU kernel is
    checked against the reference in test_cpu_kernels.py.)"""
    from sparse_kernels.reference import split_qkv

    monkeypatch.setenv("TEAL_CPU_REFERENCE", "1")

    qkv, n_head, (k_cache, v_cache), table, input_pos = make_step_inputs(2, 2, 3, 40, 16, torch.float32, 17, seed=3)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    y = decode_attention_step(qkv, n_head, k_cache, v_cache, table, input_pos)
    ref = decode_attention_step_ref(qkv, n_head, k_ref, v_ref, table, input_pos)
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    torch.testing.assert_close(k_cache, k_ref, rtol=0, atol=0)
    q, k, v = split_qkv(qkv, n_head, 2, 16)
    torch.testing.assert_close(k_cache[:, :, 17], rope(k, table[17]), rtol=0, atol=0)
    torch.testing.assert_close(v_cache[:, :, 17], v, rtol=0, atol=0)
    causal = torch.arange(40) <= 17  # the same as the plain op with the causal mask and a rotated q
    torch.testing.assert_close(y, decode_attention_ref(rope(q, table[17]), k_cache, v_cache, causal), rtol=0, atol=0)
    with pytest.raises(ValueError, match="RoPE table"):
        decode_attention_step(qkv, n_head, k_cache, v_cache, table[:, :-1], input_pos)
    with pytest.raises(ValueError, match="RoPE table"):
        decode_attention_step(qkv, n_head, k_cache, v_cache, table[:39], input_pos)
    with pytest.raises(ValueError, match="qkv must hold"):
        decode_attention_step(qkv, n_head, k_cache[:, :1], v_cache[:, :1], table, input_pos)
    with pytest.raises(ValueError, match="cast them"):
        decode_attention_step(qkv.double(), n_head, k_cache, v_cache, table, input_pos)
    with pytest.raises(ValueError, match="no positions"):
        decode_attention_step(qkv, n_head, k_cache[:, :, :0], v_cache[:, :, :0], table, input_pos)
    from sparse_kernels.ops import _decode_attention_step_op

    torch.library.opcheck(_decode_attention_step_op, (qkv, n_head, k_cache, v_cache, table, input_pos))


def test_decode_attention_op_registration():
    """Fake and real implementations agree on shapes and strides (also for a non-contiguous q)."""
    from sparse_kernels.ops import _decode_attention_op

    q, k, v, mask = make_inputs(1, 2, 4, 33, 16, torch.float32, "prefix", seed=8)
    torch.library.opcheck(_decode_attention_op, (q, k, v, mask))
    q_t = q.transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
    torch.library.opcheck(_decode_attention_op, (q_t, k, v, mask))


def test_decode_attention_rejects_bad_inputs():
    """One-line errors, not a failure deep in the op: wrong mask, a cache that is not 4-D, mixed dtypes."""
    q, k, v, mask = make_inputs(1, 2, 4, 33, 16, torch.float32, "prefix", seed=7)
    with pytest.raises(ValueError, match="mask must be"):
        decode_attention(q, k, v, mask[:-1])
    with pytest.raises(ValueError, match="expected"):
        decode_attention(q, k[0], v[0], mask)
    with pytest.raises(ValueError, match="cast them"):
        decode_attention(q, k.bfloat16(), v.bfloat16(), mask)
