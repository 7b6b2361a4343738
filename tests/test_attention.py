"""The decode attention kernel against its torch reference, under Triton's interpreter on the CPU
(in a child process, as in test_kernels.py). Tolerances (atol = rtol; outputs are O(1)): bf16
2e-2 and fp16 4e-3 (the kernel rounds unnormalised probabilities, the reference normalised ones),
fp32 1e-4 (summation order only)."""
import json
import os
import sys

import pytest
import torch

from sparse_kernels import decode_attention, decode_attention_ref
from tests.interpreted import compare, run_child

TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 1e-4}
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
]


def make_inputs(B, KV, G, S, hd, dtype, pattern, seed):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, KV, G, hd, generator=g) * 2).to(dtype)  # peaked softmax: the mask matters
    k, v = (torch.randn(B, KV, S, hd, generator=g).to(dtype) for _ in range(2))
    if pattern == "slice":
        k, v = (torch.randn(B, KV, S + 37, hd, generator=g).to(dtype)[:, :, :S] for _ in range(2))
    if pattern in ("prefix", "slice"):
        mask = torch.arange(S) <= int(S * 0.7)
    elif pattern == "random":
        mask = torch.rand(S, generator=g) < 0.5
        mask[0] = True
    else:
        mask = torch.ones(S, dtype=torch.bool)
    return q, k, v, mask


def _child():
    assert os.environ.get("TRITON_INTERPRET") == "1" and "triton" not in sys.modules
    from sparse_kernels import attention

    torch.set_num_threads(1)
    out = {}
    for i, (B, KV, G, S, hd, dtype, pattern) in enumerate(CASES):
        q, k, v, mask = make_inputs(B, KV, G, S, hd, dtype, pattern, seed=i)
        y = torch.full((B * KV, G, hd), float("nan"), dtype=dtype)  # poisoned
        n_part, n_count = attention.workspace_sizes(B * KV, G, hd, S)
        part, counts = torch.full((n_part,), float("nan")), torch.zeros(n_count, dtype=torch.int32)
        attention.launch(q.reshape(B * KV, G, hd), k.reshape(B * KV, S, hd), v.reshape(B * KV, S, hd), mask, y,
                         part, counts)
        if pattern == "slice":
            assert k.reshape(B * KV, S, hd).stride(0) == (S + 37) * hd  # a real strided view reached the kernel
        ref = decode_attention_ref(q, k, v, mask).reshape(B * KV, G, hd).float()
        wrong = decode_attention_ref(q, k, v, torch.ones_like(mask)).reshape(B * KV, G, hd).float()
        out[str(i)] = dict(compare(y, ref, TOL[dtype]), counters=int(counts.abs().sum()),
                           differs_from_unmasked=float((ref - wrong).abs().max()))
    print(json.dumps(out))


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


def test_decode_attention_op_registration():
    """Fake and real implementations agree on shapes and strides (also for a non-contiguous q)."""
    from sparse_kernels.ops import _decode_attention_op

    q, k, v, mask = make_inputs(1, 2, 4, 33, 16, torch.float32, "prefix", seed=8)
    torch.library.opcheck(_decode_attention_op, (q, k, v, mask))
    q_t = q.transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
    torch.library.opcheck(_decode_attention_op, (q_t, k, v, mask))


def test_decode_attention_op_on_cpu_is_the_reference():
    q, k, v, mask = make_inputs(1, 2, 4, 33, 16, torch.float32, "prefix", seed=7)
    torch.testing.assert_close(decode_attention(q, k, v, mask), decode_attention_ref(q, k, v, mask), rtol=0, atol=0)
    with pytest.raises(ValueError, match="mask must be"):
        decode_attention(q, k, v, mask[:-1])
