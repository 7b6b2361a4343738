"""The GPU variants of the Triton kernels compile for Hopper (sm_90), here on the CPU.

The other kernel tests run Triton's interpreter, which never compiles a kernel and runs the
interpreter variant: static loop bounds, fp32 dots, bf16 rounding by integer arithmetic. The
GPU variant differs in exactly those places, so a type error there would otherwise first show
on the GPU. Each case takes its grid arguments from the launcher itself (launch_plan, with meta
tensors of the real shapes) and compiles to a cubin with the ptxas that ships with Triton.
Nothing runs; the GPU checks of scripts/bench_kernels.py and bench_attention.py test results.
The SASS (Triton's nvdisasm) of the tuned configs is also checked for two silent slowdowns: in
the streaming loop, register copies that wait for the loads just issued; in the split-K
reduction, a loop that waits for each load of partials before the next (docs/kernels.md).
"""
import functools
import json
import math
import os
import re
import subprocess
import tempfile

import pytest
import torch

triton = pytest.importorskip("triton")

from sparse_kernels import attention, ops  # noqa: E402
from sparse_kernels import triton_kernels as tk  # noqa: E402

TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32",
         torch.int64: "i64", torch.uint8: "u8", torch.int8: "i8"}
LAUNCH_OPTIONS = ("num_warps", "num_stages")


def compile_for_hopper(kernel, args, meta, aligned=True):
    """Compile kernel for sm_90 from a launch plan's positional arguments and keywords; aligned=False:
    the variant the JIT builds for pointers that are not 16-byte aligned (column views, say)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = kernel.arg_names
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, value) in enumerate(zip(names, args)):
        # As the JIT specializes on a GPU: pointers 16-byte aligned (torch's allocations are),
        # integers divisible by 16 marked so, integers equal to 1 made constants.
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + TYPES[value.dtype]
            if aligned:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif int(value) == 1:
            signature[name] = "constexpr"
            constexprs[(i,)] = 1
        else:
            signature[name] = "i32" if abs(int(value)) < 2 ** 31 else "i64"
            if int(value) % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    for name, value in meta.items():
        if name not in LAUNCH_OPTIONS:
            signature[name] = "constexpr"
            constexprs[(names.index(name),)] = value
    assert len(signature) == len(names), f"unfilled kernel arguments: {set(names) - set(signature)}"
    source = ASTSource(kernel, {n: signature[n] for n in names}, constexprs=constexprs, attrs=attrs)
    options = {k: meta[k] for k in LAUNCH_OPTIONS if k in meta}
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def meta_tensor(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, dtype=dtype, device="meta")


def matvec_plan(op, B, K, N, splits, dtype, cfg, norm=False, residual=False, dense=False, weights="float",
                group=128):
    """launch_plan (kernel, grid, args, meta) for meta tensors (dense: no thresholds), launched with PDL
    as on a Hopper GPU; weights "int8" or "int4" (groups of `group` rows) store W^T quantized."""
    silu = op == "silu_down"
    x = meta_tensor(B, 2 * K if silu else K, dtype=dtype)
    sizes = tk.workspace_sizes(B, K, N, cfg, group if weights == "int4" else 0)
    workspaces = (meta_tensor(max(1, sizes[0]), dtype=torch.float32), meta_tensor(sizes[1], dtype=torch.int32),
                  meta_tensor(sizes[2], dtype=torch.int32), meta_tensor(sizes[3], dtype=torch.float32))
    bounds = ops.segment_starts(splits)
    thresholds = None if dense else meta_tensor(len(splits), dtype=torch.float32)
    w, scale, zero = meta_tensor(K, N, dtype=dtype), None, None
    if weights == "int8":
        w, scale = meta_tensor(K, N, dtype=torch.int8), meta_tensor(N, dtype=torch.float32)
    elif weights == "int4":
        w = meta_tensor(K, N // 2, dtype=torch.uint8)
        scale = zero = meta_tensor(K // group, N, dtype=torch.bfloat16)
    kernel, grid, args, meta = tk.launch_plan(x, w, thresholds, bounds, meta_tensor(B, N, dtype=dtype), *workspaces,
                                              cfg, silu=silu, norm_weight=meta_tensor(K, dtype=dtype) if norm else None,
                                              eps=1e-5, residual=meta_tensor(B, N, dtype=dtype) if residual else None,
                                              scale=scale, zero=zero)
    return kernel, grid, args, dict(meta, PDL=True, TRIGGER=True)  # as on Hopper (pdl_enabled is False for meta)


# The tuned configs of the Llama-3-8B block, fused as the model runs them, plus a tl.dot batch
# config, fp16 (configs derived from the tuned ones), fp32 (heuristic) and odd shapes.
LLAMA3_8B = [("linear", 4096, 6144, [4096, 1024, 1024], dict(norm=True)), ("linear", 4096, 4096, [4096],
             dict(residual=True)), ("linear", 4096, 28672, [14336, 14336], dict(norm=True)),
             ("silu_down", 14336, 4096, [4096], dict(residual=True))]
MATVEC_CASES = [(op, 1, K, N, splits, torch.bfloat16, None, fused) for op, K, N, splits, fused in LLAMA3_8B] + [
    ("linear", 8, 4096, 4096, [4096], torch.bfloat16, None, {}),
    ("silu_down", 3, 1536, 1000, [1000], torch.float16, None, {}),
    ("linear", 1, 576, 1536, [576, 480, 480], torch.float32, None, dict(norm=True)),
    ("linear", 1, 1000, 1000, [1000], torch.bfloat16,
     dict(BLOCK_N=128, BLOCK_K=32, K_CHUNK=512, DEPTH=3, DOT=False, num_warps=4, num_stages=1), {}),
    ("linear", 1, 5120, 27648, [13824, 13824], torch.bfloat16, None, dict(norm=True)),  # untuned: wide heuristic
    ("silu_down", 1, 13824, 5120, [5120], torch.float16, None, dict(residual=True)),
    # Llama-3-8B over two GPUs (tensor parallel): configs derived from the nearest tuned shapes
    ("linear", 1, 4096, 3072, [2048, 512, 512], torch.bfloat16, None, dict(norm=True)),
    ("silu_down", 1, 7168, 4096, [4096], torch.bfloat16, None, {}),
    ("linear", 8, 4096, 12288, [4096, 4096, 4096], torch.bfloat16, None, dict(norm=True)),  # Llama-2-7B, derived
    # dense (no thresholds, PDL), as the model's dense decode runs them
    ("linear", 8, 4096, 6144, [4096, 1024, 1024], torch.bfloat16, None, dict(norm=True, dense=True)),
    ("silu_down", 1, 1536, 1000, [1000], torch.float16, None, dict(residual=True, dense=True)),
    # quantized weights: int8 and int4 rows, tl.dot batches, dense and sparse
    ("linear", 1, 4096, 28672, [14336, 14336], torch.bfloat16, None, dict(norm=True, weights="int8")),
    ("linear", 8, 4096, 6144, [4096, 1024, 1024], torch.bfloat16, None, dict(norm=True, weights="int8")),
    ("silu_down", 1, 14336, 4096, [4096], torch.bfloat16, None, dict(residual=True, weights="int4")),
    ("linear", 3, 4096, 4096, [4096], torch.float16, None, dict(residual=True, weights="int4", group=64)),
    ("linear", 1, 4096, 6144, [4096, 1024, 1024], torch.bfloat16, None, dict(norm=True, dense=True, weights="int4")),
]


def test_tuned_configs_are_the_ones_compiled_here():
    table = json.loads(ops.CONFIG_PATH.read_text())["configs"]
    for op, K, N, splits, _ in LLAMA3_8B:
        assert ops.config_key(op, K, N, torch.bfloat16, 1) in table  # else the cases fall back to a heuristic


@pytest.mark.parametrize("case", MATVEC_CASES, ids=lambda c: f"{c[0]}-B{c[1]}-{c[2]}x{c[3]}-{TYPES[c[5]]}")
def test_matvec_kernel_compiles_for_sm90(case):
    op, B, K, N, splits, dtype, cfg, fused = case
    cfg = cfg or ops.pick_config(op, K, N, dtype, B, n_sm=132)  # as ops.run_triton on an H100/H200
    cfg = ops.fit_to_segments(cfg, ops.segment_starts(splits, fused.get("dense", False)))  # as ops.run_triton
    kernel, grid, args, meta = matvec_plan(op, B, K, N, splits, dtype, cfg, **fused)
    assert not meta["INTERPRET"]  # the GPU variant
    assert kernel is (tk.dense_matvec_kernel if fused.get("dense") else tk.sparse_matvec_kernel)
    compiled = compile_for_hopper(kernel, args, meta)
    assert len(compiled.asm["cubin"]) > 0 and grid[0] * grid[1] >= 1


@pytest.mark.parametrize("dtype,G,hd,S,rope", [(torch.bfloat16, 4, 128, 2048, True), (torch.bfloat16, 4, 128, 205, False),
                                               (torch.float32, 3, 64, 100, True), (torch.float16, 1, 96, 300, False),
                                               (torch.float32, 4, 256, 200, True), (torch.float32, 4, 256, 2048, True)])
def test_attention_kernel_compiles_for_sm90(dtype, G, hd, S, rope):
    B, KV = 1, 8
    q = meta_tensor(B, KV, G, hd, dtype=dtype)
    k, v = meta_tensor(B, KV, S, hd, dtype=dtype), meta_tensor(B, KV, S, hd, dtype=dtype)
    out = meta_tensor(B * KV, G, hd, dtype=dtype)
    n_words, n_counts = attention.workspace_sizes(B * KV, G, hd, S, step=rope)
    part, counts = meta_tensor(n_words, dtype=torch.float32), meta_tensor(n_counts, dtype=torch.int32)
    extra = (meta_tensor(B, KV, hd, dtype=dtype), meta_tensor(B, KV, hd, dtype=dtype),
             meta_tensor(S, hd // 2, 2, dtype=torch.float32), meta_tensor(1, dtype=torch.int64)) if rope else None
    mask = None if rope else meta_tensor(S, dtype=torch.bool)
    grid, args, meta = attention.launch_plan(q, k, v, mask, out, part, counts, rope=extra)
    assert meta["STATIC_STEPS"] == 0 and not meta["RTNE_BY_BITS"]
    assert meta["DOT_F32"] == (dtype == torch.float32)
    compiled = compile_for_hopper(attention.decode_attention_kernel, args, meta)
    assert len(compiled.asm["cubin"]) > 0 and math.prod(grid) >= 1
    assert compiled.metadata.shared <= 227 * 1024  # what one H100/H200 block may have


@pytest.mark.parametrize("S", [205, 2048])  # one program per head; splits with a merge
def test_attention_step_requests_the_cache_before_it_waits(S):
    """With PDL the decode step loads the position, its angles and the first cache tile (k and v:
    16-byte loads) before griddepcontrol.wait (SASS ACQBULK): none of them comes from the q/k/v
    projection it waits for. The merge is preceded by the trigger for the next kernel."""
    B, KV, G, hd, dtype = 1, 8, 4, 128, torch.bfloat16
    q, out = meta_tensor(B, KV, G, hd, dtype=dtype), meta_tensor(B * KV, G, hd, dtype=dtype)
    k, v = meta_tensor(B, KV, S, hd, dtype=dtype), meta_tensor(B, KV, S, hd, dtype=dtype)
    n_words, n_counts = attention.workspace_sizes(B * KV, G, hd, S, step=True)
    part, counts = meta_tensor(n_words, dtype=torch.float32), meta_tensor(n_counts, dtype=torch.int32)
    rope = (meta_tensor(B, KV, hd, dtype=dtype), meta_tensor(B, KV, hd, dtype=dtype),
            meta_tensor(S, hd // 2, 2, dtype=torch.float32), meta_tensor(1, dtype=torch.int64))
    grid, args, meta = attention.launch_plan(q, k, v, None, out, part, counts, rope=rope)
    sass = disassemble(compile_for_hopper(attention.decode_attention_kernel, args, dict(meta, PDL=True, TRIGGER=True)))
    head = [op for op, _ in INSTRUCTION.findall(sass[:sass.index("ACQBULK")]) if op.startswith("LDG")]
    tile_loads = 2 * meta["BLOCK_S"] * hd * 2 // 16 // (32 * meta["num_warps"])
    # The rest are 32-bit: the position and the fp32 angles, as many as the layouts that use them ask
    # for (3 with the split geometry's 4 warps, 35 with one program's 8). q and the new k and v are
    # 16-bit, so loading them before the wait would add 16-byte loads or another width; the other
    # 32-bit data (the merge's partials) is read only after the atomic.
    assert head.count("LDG.E.128") == tile_loads and set(head) == {"LDG.E", "LDG.E.128"}, head
    assert sass.index("ACQBULK") < sass.index("PREEXIT") < sass.index("ATOM")  # wait, trigger, then the merge


INSTRUCTION = re.compile(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
REGISTER = re.compile(r"\bR(\d+)\b")


def disassemble(compiled) -> str:
    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    if not os.path.exists(nvdisasm):
        pytest.skip("this Triton has no bundled nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        return subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True, check=True).stdout


def is_weight_load(opcode: str) -> bool:  # the rows of W^T: 16-byte loads with the evict_first policy
    return opcode.startswith("LDG") and ".EF" in opcode and opcode.endswith(".128")


def streaming_loop(sass: str) -> list:
    """(opcode, operands) of the loop (label to its backward branch) with the most weight-row loads."""
    bodies = []
    for label in re.finditer(r"^(\.L_x_\d+):", sass, re.M):
        end = sass.find(f"BRA `({label.group(1)})", label.end())
        if end > 0:
            bodies.append(INSTRUCTION.findall(sass[label.end():end]))
    return max(bodies, key=lambda body: sum(is_weight_load(op) for op, _ in body), default=[])


def tuned_sass(kernel_module, op, K, N, splits, fused) -> tuple:
    """The tuned B=1 bf16 config of a shape, fitted to its segments as ops.run_triton does, its
    launch plan's keywords and its SASS (compiled once per case: several tests read the same)."""
    return _tuned_sass(kernel_module, op, K, N, tuple(splits), tuple(sorted(fused.items())))


@functools.lru_cache(maxsize=None)
def _tuned_sass(kernel_module, op, K, N, splits, fused) -> tuple:
    fused = dict(fused)
    key = ops.config_key(op, K, N, torch.bfloat16, 1)
    if fused.pop("own_config", False):  # the weight format's tuned config, as ops.run_triton takes it
        table, weights, dense = ops.tuned_configs(), fused["weights"], fused.get("dense", False)
        key = ops.config_key(op, K, N, torch.bfloat16, 1, weights, dense)
        key = key if key in table else ops.config_key(op, K, N, torch.bfloat16, 1, weights)
    cfg = ops.fit_to_segments(ops.tuned_configs()[key], ops.segment_starts(list(splits), fused.get("dense", False)))
    kernel, grid, args, meta = matvec_plan(op, 1, K, N, list(splits), torch.bfloat16, cfg, **fused)
    return cfg, meta, disassemble(compile_for_hopper(kernel, args, meta))


def row_loads_per_step(cfg, weights="float") -> int:
    """16-byte loads of W^T rows a thread issues per step of BLOCK_K rows (bf16, int8 or int4 weights)."""
    bits = {"float": 16, "int8": 8, "int4": 4}[weights]
    return cfg["BLOCK_N"] * cfg["BLOCK_K"] * bits // 128 // (32 * cfg["num_warps"])


def loop_stalls(kernel_module, op, K, N, splits, fused) -> dict:
    """What in the tuned config's streaming loop would serialize it: a register copy of a weight
    load's destination while that load may be pending (after the load, before anything else writes
    the register: the copy waits for the load, so the next rows are not in flight while this step
    is summed), and CTA barriers. Also the weight loads per iteration against DEPTH tiles' worth."""
    cfg, meta, sass = tuned_sass(kernel_module, op, K, N, splits, fused)
    cfg = dict(cfg, BLOCK_K=meta["BLOCK_K"])  # as launched (int4 caps the K chunk at its group)
    body = streaming_loop(sass)
    pending, copied, loads = set(), [], 0
    for opcode, operands in body:
        regs = [int(r) for r in REGISTER.findall(operands)]
        if is_weight_load(opcode):
            loads += 1
            pending |= set(range(regs[0], regs[0] + 4))
            continue
        if opcode.startswith(("MOV", "IMAD.MOV")):
            copied += [r for r in regs[1:] if r in pending]
        if regs and not opcode.startswith(("ST", "RED", "BAR", "BRA")):
            pending.discard(regs[0])  # written: no longer the loaded value
    return dict(weight_loads=loads, expected_loads=cfg.get("DEPTH", 2) * row_loads_per_step(cfg, meta["WEIGHTS"]),
                barriers=sum(op.startswith("BAR") for op, _ in body), copies_of_loads=sorted(copied),
                groups=meta["GROUPS"])


@pytest.mark.parametrize("case,dense", [(c, d) for c in LLAMA3_8B for d in (False, True)],
                         ids=lambda c: f"{c[0]}-{c[1]}x{c[2]}" if isinstance(c, tuple) else ("dense" if c else "sparse"))
def test_streaming_loop_keeps_its_loads_in_flight(case, dense):
    op, K, N, splits, fused = case
    stalls = loop_stalls(tk, op, K, N, splits, dict(fused, dense=dense))
    assert stalls["weight_loads"] == stalls["expected_loads"] > 0, stalls  # all DEPTH tiles' loads in the loop
    assert stalls["barriers"] == 0 and stalls["copies_of_loads"] == [], stalls


@pytest.mark.parametrize("case,dense,weights,own", [
    pytest.param(c, d, w, own, id=f"{c[0]}-{c[1]}x{c[2]}-{d and 'dense' or 'sparse'}-{w}-{own and 'own' or 'bf16'}")
    for c in LLAMA3_8B for d in (False, True) for w in ("int8", "int4") for own in (False, True)
    if own or c in LLAMA3_8B[2:]])
def test_quantized_streaming_loop_keeps_its_loads_in_flight(case, dense, weights, own):
    """int8 and int4 rows (int4: groups of 128 rows), read as int32 words, in the MLP's wide bf16
    tiles and in every 8B shape's config tuned for the format (own): the same loop, its loads of
    stored rows as wide and as many steps ahead as with bf16 rows, and no register copy of a row in
    flight. An int4 chunk over several groups (chunk_plan; the tuned configs' GROUPS) scales each
    group as it ends: the group's scales reach the tile's layout through shared memory, so that
    branch of the loop holds CTA barriers (docs/kernels.md); the loads still stay in flight."""
    op, K, N, splits, fused = case
    stalls = loop_stalls(tk, op, K, N, splits, dict(fused, dense=dense, weights=weights, own_config=own))
    assert stalls["weight_loads"] == stalls["expected_loads"] > 0, stalls
    assert stalls["copies_of_loads"] == [], stalls
    if not own:  # (some tuned narrow tiles take their inputs through shared memory: barriers every step)
        assert (stalls["barriers"] > 0) == (stalls["groups"] > 1), stalls


@pytest.mark.parametrize("case,pdl", [(c, p) for c in LLAMA3_8B for p in (True, False)],
                         ids=lambda c: f"{c[0]}-{c[1]}x{c[2]}" if isinstance(c, tuple) else ("pdl" if c else "no_pdl"))
def test_dense_kernel_requests_its_first_rows_first(case, pdl):
    """Dense: the first DEPTH steps' rows are the kernel's first global loads. With PDL they go out
    before griddepcontrol.wait (SASS ACQBULK) and nothing else does: the input comes from the
    kernel before, so it must be read after the wait."""
    op, K, N, splits, fused = case
    cfg = ops.tuned_configs()[ops.config_key(op, K, N, torch.bfloat16, 1)]
    kernel, grid, args, meta = matvec_plan(op, 1, K, N, splits, torch.bfloat16, cfg, **fused, dense=True)
    sass = disassemble(compile_for_hopper(kernel, args, dict(meta, PDL=pdl)))
    assert ("ACQBULK" in sass) == pdl
    loads = [op for op, _ in INSTRUCTION.findall(sass) if op.startswith("LDG")]
    first = cfg.get("DEPTH", 2) * row_loads_per_step(cfg)
    assert all(is_weight_load(op) for op in loads[:first]) and not is_weight_load(loads[first]), loads[:first + 1]
    if pdl:
        head = INSTRUCTION.findall(sass[:sass.index("ACQBULK")])
        assert [op for op, _ in head if op.startswith("LDG")] == loads[:first]


@pytest.mark.parametrize("case", LLAMA3_8B, ids=lambda c: f"{c[0]}-{c[1]}x{c[2]}")
def test_sparse_kernel_ranks_its_first_rows_where_cheap(case):
    """Sparse: a launch whose first DEPTH steps hold few rows (the MLP's tuned configs) finds their
    indices in registers, so their loads go out before the compacted scratch is written (STG) and
    read back; the attention's wide steps (64 x 64 tiles) go through the scratch."""
    cfg, meta, sass = tuned_sass(tk, *case)
    op, N = case[0], case[2]
    assert meta["RANKED"] == (N == 28672 or op == "silu_down")
    ops_in_order = [o for o, _ in INSTRUCTION.findall(sass)]
    first_store = next(i for i, o in enumerate(ops_in_order) if o.startswith("STG"))
    first = cfg["DEPTH"] * row_loads_per_step(cfg)
    rows_before_store = sum(is_weight_load(o) for o in ops_in_order[:first_store])
    assert rows_before_store == (first if meta["RANKED"] else 0), (rows_before_store, first)


@pytest.mark.parametrize("case", LLAMA3_8B, ids=lambda c: f"{c[0]}-{c[1]}x{c[2]}")
def test_sparse_kernel_waits_before_its_first_load(case):
    """Sparse, launched with PDL: nothing is read before griddepcontrol.wait (ACQBULK), not even the
    threshold (a copy right before the launch may have written it), and the threshold's load goes
    out with the input's, before the first CTA barrier."""
    ops_in_order = [o for o, _ in INSTRUCTION.findall(tuned_sass(tk, *case)[2])]
    wait = ops_in_order.index("ACQBULK")
    assert not any(o.startswith("LDG") for o in ops_in_order[:wait])
    first_barrier = next(i for i, o in enumerate(ops_in_order) if o.startswith("BAR"))
    assert "LDG.E" in ops_in_order[wait:first_barrier]  # the 4-byte threshold


@pytest.mark.parametrize("case", LLAMA3_8B, ids=lambda c: f"{c[0]}-{c[1]}x{c[2]}")
def test_kernel_lets_its_successor_launch_after_streaming(case):
    """griddepcontrol.launch_dependents (SASS PREEXIT) after the last weight-row load, before the
    split-K arrival: a PDL-launched successor may start during the reduction, not earlier."""
    op, K, N, splits, fused = case
    _, _, sass = tuned_sass(tk, op, K, N, splits, fused)
    last_row_load = max(m.start() for m in re.finditer(r"LDG\.E\.EF\.128", sass))
    assert sass.count("PREEXIT") == 1 and last_row_load < sass.index("PREEXIT") < sass.index("ATOM")


def test_launch_plans_choose_pdl_as_documented(monkeypatch):
    """On Hopper: every matvec triggers its successor and is launched with PDL (and waits), but a
    dense one whose weights were just written; the decode attention step is launched with PDL."""
    monkeypatch.setattr(tk, "pdl_enabled", lambda device, interpreted=False: True)
    monkeypatch.setattr(attention, "pdl_enabled", lambda device, interpreted=False: True)
    cfg = ops.tuned_configs()[ops.config_key("linear", 4096, 4096, torch.bfloat16, 1)]
    x, w, y = meta_tensor(1, 4096), meta_tensor(4096, 4096), meta_tensor(1, 4096)
    sizes = tk.workspace_sizes(1, 4096, 4096, cfg)
    ws = [meta_tensor(max(1, n), dtype=dt) for n, dt in zip(sizes, (torch.float32, torch.int32, torch.int32,
                                                                     torch.float32))]
    plans = {name: tk.launch_plan(x, w, thr, [], y, *ws, cfg, early_weights=early)[3] for name, thr, early in
             [("sparse", meta_tensor(1, dtype=torch.float32), True), ("dense", None, True),
              ("dense, weights just written", None, False)]}
    assert {name: (m["PDL"], m.get("launch_pdl", False), m["TRIGGER"]) for name, m in plans.items()} == {
        "sparse": (True, True, True), "dense": (True, True, True), "dense, weights just written": (False, False, True)}
    B, KV, G, hd, S = 1, 8, 4, 128, 205
    q, out = meta_tensor(B, KV, G, hd), meta_tensor(B * KV, G, hd)
    k, v = meta_tensor(B, KV, S, hd), meta_tensor(B, KV, S, hd)
    part, counts = (meta_tensor(n, dtype=dt) for n, dt in zip(attention.workspace_sizes(B * KV, G, hd, S, step=True),
                                                                (torch.float32, torch.int32)))
    rope = (meta_tensor(B, KV, hd), meta_tensor(B, KV, hd), meta_tensor(S, hd // 2, 2, dtype=torch.float32),
            meta_tensor(1, dtype=torch.int64))
    step = attention.launch_plan(q, k, v, None, out, part, counts, rope=rope)[2]
    plain = attention.launch_plan(q, k, v, meta_tensor(S, dtype=torch.bool), out, part, counts)[2]
    assert (step["PDL"], step.get("launch_pdl"), step["TRIGGER"]) == (True, True, True)
    assert (plain["PDL"], plain.get("launch_pdl", False), plain["TRIGGER"]) == (False, False, True)


def loops_after_arrival(kernel_module, op, K, N, splits, fused) -> list:
    """Labels that a later branch jumps back to, after the split-K arrival (the atomic): loops in the
    last arriver's reduction, which then waits for each load of partials before issuing the next."""
    _, _, sass = tuned_sass(kernel_module, op, K, N, splits, fused)
    tail = sass[sass.index("ATOM"):]
    loops = []
    for label in re.finditer(r"^(\.L_x_\d+):", tail, re.M):
        end = tail.find(f"BRA `({label.group(1)})", label.end())
        if end > 0 and INSTRUCTION.search(tail[label.end():end]):  # (not the kernel's closing self-branch)
            loops.append(label.group(1))
    return loops


@pytest.mark.parametrize("case", LLAMA3_8B, ids=lambda c: f"{c[0]}-{c[1]}x{c[2]}")
def test_split_k_reduction_loads_all_partials_at_once(case):
    op, K, N, splits, fused = case
    assert loops_after_arrival(tk, op, K, N, splits, fused) == []  # unrolled over the SPLIT partials


def test_matvec_kernel_compiles_for_unaligned_pointers():
    op, K, N, splits, fused = LLAMA3_8B[3]
    cfg = ops.tuned_configs()[ops.config_key(op, K, N, torch.bfloat16, 1)]
    kernel, grid, args, meta = matvec_plan(op, 1, K, N, splits, torch.bfloat16, cfg, **fused)
    assert len(compile_for_hopper(kernel, args, meta, aligned=False).asm["cubin"]) > 0


def test_launcher_rejects_an_unsupported_depth():
    cfg = dict(BLOCK_N=64, BLOCK_K=64, K_CHUNK=1024, DOT=False, num_warps=4, num_stages=1)
    for depth in (1, 5):
        with pytest.raises(ValueError, match="DEPTH"):
            matvec_plan("linear", 1, 4096, 4096, [4096], torch.bfloat16, dict(cfg, DEPTH=depth))
