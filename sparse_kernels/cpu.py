"""The CPU kernels (cpu_kernels.c): built with the system C compiler at first use, called through ctypes.

    y = cpu.matvec(x, w_t, thresholds, splits, norm_weight=None, eps=0.0, residual=None, silu=False)
    out = cpu.attention_step(qkv, n_head, k_cache, v_cache, rope_table, input_pos)
    y = cpu.linear_rows(x, w)        # x @ w.T, w (N, K) in nn.Linear's layout: the tied LM head

The semantics are reference.py's; ops.py calls these where usable() / takes_attention() say so
(sparse_linear / decode_attention_step below: through their own light ops when compiling). The
shared library is cached under $TEAL_CACHE_DIR (default ~/.cache/teal-fast), keyed by a hash of the
source, the compiler flags and the machine's CPU flags (-march=native code must not run on another
CPU). Without a compiler (or with TEAL_CPU_REFERENCE=1) nothing is usable and the ops run the torch
reference; a failed build warns once. The kernels run on torch.get_num_threads() threads (their
own small pool, cpu_kernels.c says why not OpenMP's).
"""
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import List, Optional

import torch
from torch import Tensor

from .reference import contiguous_rows, out_features

SOURCE = Path(__file__).with_name("cpu_kernels.c")
FLAGS = ["-O3", "-march=native", "-fno-trapping-math", "-pthread", "-shared", "-fPIC"]
PORTABLE_FLAGS = [f for f in FLAGS if f != "-march=native"]  # for compilers without -march=native
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}
WEIGHT_CODES = {torch.int8: 2, torch.uint8: 3}  # the kernel's codes for int8 (column scales) and int4 weights
MAX_B = 8  # more rows (larger batches, longer prompts) are matmuls: the reference's torch math

_lib = None  # the loaded library, False once a build failed


def cpu_flags() -> str:
    """The CPU's feature flags (Linux), or the platform's processor name elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def library_path(compiler: str, source: Path = SOURCE) -> Path:
    key = hashlib.sha256("\n".join([source.read_text(), compiler, *FLAGS, platform.machine(), cpu_flags()])
                         .encode()).hexdigest()[:16]
    root = Path(os.environ.get("TEAL_CACHE_DIR") or Path.home() / ".cache" / "teal-fast")
    return root / f"{source.stem}-{key}.so"


def find_compiler() -> Optional[str]:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def build(compiler: str, out: Path, source: Path = SOURCE) -> None:
    """Compile into a temporary file, then rename: concurrent first uses never load half a file. Without
    -march=native if the compiler refuses it (Apple's clang on arm64 did)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        for flags in (FLAGS, PORTABLE_FLAGS):
            result = subprocess.run([compiler, *flags, str(source), "-o", tmp, "-lm"], capture_output=True, text=True)
            if result.returncode == 0:
                break
        result.check_returncode()
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def library():
    """The loaded kernel library, building it first if needed; None without a compiler or after a failed build."""
    global _lib
    if _lib is None:
        compiler = find_compiler()
        _lib = False
        if compiler is None:
            warnings.warn("sparse_kernels: no C compiler (cc/gcc) found, so sparse decoding on the CPU runs the "
                          "slower torch reference; install gcc for the CPU kernel", stacklevel=3)
            return None
        path = library_path(compiler)
        try:
            if not path.exists():
                build(compiler, path)
            lib = ctypes.CDLL(str(path))
        except (OSError, subprocess.CalledProcessError) as e:
            detail = getattr(e, "stderr", None) or str(e)
            warnings.warn(f"sparse_kernels: building the CPU kernel failed, so the CPU runs the slower torch "
                          f"reference ({detail.strip()[-500:]})", stacklevel=3)
            return None
        P, L, I = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
        lib.teal_sparse_matvec.argtypes = [I, I, I, P, L, P, L, I, I, P, P, I, I, P, P, I, I, P, ctypes.c_float, P, L,
                                           P, I]
        lib.teal_decode_attention_step.argtypes = [I, I, I, I, P, L, P, P, L, L, L, P, L, P, I, I]
        lib.teal_linear_rows.argtypes = [I, I, I, P, L, P, L, I, P, I]
        lib.teal_sparse_matvec.restype = lib.teal_decode_attention_step.restype = lib.teal_linear_rows.restype = I
        _lib = lib
    return _lib or None


@torch.compiler.assume_constant_result
def available() -> bool:
    """Whether the kernel runs at all: the library built and TEAL_CPU_REFERENCE unset (the switch that
    makes the CPU run the torch reference, e.g. to compare the two). A constant to torch.compile."""
    return not os.environ.get("TEAL_CPU_REFERENCE") and library() is not None


def usable(x: Tensor, w_t: Tensor, splits: Optional[List[int]] = None) -> bool:
    """Whether the matvec ops run the kernel for input x (B, K), weights w_t and output segments splits
    (None: one): CPU, fp32 or bf16, 1 to MAX_B rows, weights stored in x's dtype, int8 (with their column
    scales) or int4 (uint8, two values a byte, with group scales and offsets; segments of even width)."""
    return (x.device.type == "cpu" and x.dtype in DTYPE_CODES and 0 < x.shape[0] <= MAX_B and
            (w_t.dtype in (x.dtype, torch.int8) or
             (w_t.dtype == torch.uint8 and all(n % 2 == 0 for n in splits or ()))) and available())


def takes_attention(qkv: Tensor, k_cache: Tensor, v_cache: Tensor, rope_table: Tensor) -> bool:
    """Whether the decode attention step runs the kernel: CPU, fp32 or bf16, caches of one layout with
    unit stride along hd (the kernel writes them in place), an fp32 RoPE table."""
    return (qkv.device.type == "cpu" and qkv.dtype in DTYPE_CODES and k_cache.stride() == v_cache.stride() and
            k_cache.stride(-1) == 1 and rope_table.dtype == torch.float32 and available())


_segments = {}  # splits -> the ctypes int array the kernel reads


def _ptr(t: Optional[Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def _check(status: int):
    """A kernel's return value: nonzero when it could not allocate its scratch."""
    if status:
        raise MemoryError("sparse_kernels: the CPU kernel could not allocate its scratch")


def matvec(x: Tensor, w_t: Tensor, thresholds: Optional[Tensor], splits: List[int], norm_weight: Optional[Tensor] = None,
           eps: float = 0.0, residual: Optional[Tensor] = None, silu: bool = False, scale: Optional[Tensor] = None,
           zero: Optional[Tensor] = None, out: Optional[Tensor] = None, n_threads: Optional[int] = None) -> Tensor:
    """The reference's sparse_linear (silu=False) or sparse_silu_down (x = [gate | up], thresholds[:1]) on
    checked arguments (reference.check_args); int8 w_t with its column scales (N,), int4 w_t (K, N / 2)
    with its scales and offsets (K / group, N). out: a contiguous
    (B, N) tensor to write (default: a new one); n_threads: default torch.get_num_threads(). Lean: a
    decode step makes 120 of these calls."""
    B, K, N = x.shape[0], w_t.shape[0], out_features(w_t)
    x, w_t, norm_weight, residual = (contiguous_rows(x), contiguous_rows(w_t), contiguous_rows(norm_weight),
                                     contiguous_rows(residual))
    if thresholds is None:  # segments only choose thresholds: a dense product is one segment
        splits = (N,)
    elif thresholds.dtype != torch.float32 or thresholds.stride(-1) != 1:
        thresholds = thresholds.to(torch.float32).contiguous()
    key = tuple(splits)
    seg = _segments.get(key)
    if seg is None:
        seg = _segments[key] = (ctypes.c_int * len(key))(*key)
    group, scale_dtype = 0, DTYPE_CODES[torch.float32]  # int8: fp32 column scales (below)
    if w_t.dtype == torch.uint8:  # int4: scales and offsets read as stored (fp32 or bf16)
        group = K // scale.shape[0]
        if scale.dtype not in DTYPE_CODES or zero.dtype != scale.dtype:
            scale, zero = scale.float(), zero.float()
        scale, zero, scale_dtype = scale.contiguous(), zero.contiguous(), DTYPE_CODES[scale.dtype]
    elif scale is not None and (scale.dtype != torch.float32 or scale.stride(-1) != 1):
        scale = scale.to(torch.float32).contiguous()
    y = torch.empty(B, N, dtype=x.dtype) if out is None else out
    status = library().teal_sparse_matvec(B, K, N, x.data_ptr(), x.stride(0), w_t.data_ptr(), w_t.stride(0),
                                          DTYPE_CODES[x.dtype], WEIGHT_CODES.get(w_t.dtype, DTYPE_CODES[x.dtype]),
                                          _ptr(scale), _ptr(zero), group, scale_dtype, _ptr(thresholds), seg, len(key),
                                          silu,
                                          _ptr(norm_weight), eps, _ptr(residual),
                                          0 if residual is None else residual.stride(0), y.data_ptr(),
                                          n_threads or torch.get_num_threads())
    _check(status)
    return y


def linear_rows(x: Tensor, w: Tensor, out: Optional[Tensor] = None, n_threads: Optional[int] = None) -> Tensor:
    """x (B, K) @ w.T for w (N, K) in nn.Linear's layout (a tied LM head: the embedding table), where
    usable(x, w): fp32 sums rounded once to x's dtype, as F.linear -> (B, N)."""
    B, (N, K) = x.shape[0], w.shape
    x, w = contiguous_rows(x), contiguous_rows(w)
    y = torch.empty(B, N, dtype=x.dtype) if out is None else out
    status = library().teal_linear_rows(B, K, N, x.data_ptr(), x.stride(0), w.data_ptr(), w.stride(0),
                                        DTYPE_CODES[x.dtype], y.data_ptr(), n_threads or torch.get_num_threads())
    _check(status)
    return y


def attention_step(qkv: Tensor, n_head: int, k_cache: Tensor, v_cache: Tensor, rope_table: Tensor,
                   input_pos: Tensor, out: Optional[Tensor] = None, n_threads: Optional[int] = None) -> Tensor:
    """reference.decode_attention_step_ref on checked arguments (ops.decode_attention_step) that
    takes_attention accepts: RoPE, the cache write at input_pos and the attention of one position per
    sequence -> (B, KV, G, hd)."""
    B, KV, S, hd = k_cache.shape
    pos = int(input_pos.reshape(()))
    if not 0 <= pos < S:
        raise ValueError(f"decode_attention_step: position {pos} is outside the cache's {S} positions")
    rows = contiguous_rows(qkv.reshape(B, -1))
    table = rope_table.contiguous()
    out = torch.empty(B, KV, n_head // KV, hd, dtype=qkv.dtype) if out is None else out
    status = library().teal_decode_attention_step(B, KV, n_head // KV, hd, rows.data_ptr(), rows.stride(0),
                                                  k_cache.data_ptr(), v_cache.data_ptr(), *k_cache.stride()[:3],
                                                  table.data_ptr(), pos, out.data_ptr(), DTYPE_CODES[qkv.dtype],
                                                  n_threads or torch.get_num_threads())
    _check(status)
    return out


# ---- the kernels as ops of their own, for compiled graphs ----
# teal::cpu_matvec, cpu_linear_rows and cpu_decode_attention_step are registered with
# torch.library.Library, not torch.library.custom_op: the latter's Python dispatch layers (autograd,
# redispatch, the dynamo-disabled backend wrapper) cost ~70 us a call, ~10 ms a token over a decode
# step's 150 calls; a Library kernel is reached in ~8 us. Outside torch.compile the functions below
# call the kernels directly.
_library = torch.library.Library("teal", "FRAGMENT")
_library.define("cpu_matvec(Tensor x, Tensor w_t, Tensor? thresholds, int[] splits, Tensor? norm_weight, float eps, "
                "Tensor? residual, bool silu, Tensor? scale, Tensor? zero) -> Tensor")
_library.define("cpu_decode_attention_step(Tensor qkv, int n_head, Tensor(a!) k_cache, Tensor(b!) v_cache, "
                "Tensor rope_table, Tensor input_pos) -> Tensor")
_library.define("cpu_linear_rows(Tensor x, Tensor w) -> Tensor")
_library.impl("cpu_matvec", matvec, "CPU")
_library.impl("cpu_linear_rows", linear_rows, "CPU")
_library.impl("cpu_decode_attention_step", attention_step, "CPU")


@torch.library.register_fake("teal::cpu_matvec")
def _(x, w_t, thresholds, splits, norm_weight, eps, residual, silu, scale, zero):
    return x.new_empty(x.shape[0], out_features(w_t))


@torch.library.register_fake("teal::cpu_linear_rows")
def _(x, w):
    return x.new_empty(x.shape[0], w.shape[0])


@torch.library.register_fake("teal::cpu_decode_attention_step")
def _(qkv, n_head, k_cache, v_cache, rope_table, input_pos):
    B, KV, _, hd = k_cache.shape
    return qkv.new_empty(B, KV, n_head // KV, hd)


def sparse_linear(x: Tensor, w_t: Tensor, thresholds: Optional[Tensor], splits: List[int],
                  norm_weight: Optional[Tensor] = None, eps: float = 0.0, residual: Optional[Tensor] = None,
                  silu: bool = False, scale: Optional[Tensor] = None, zero: Optional[Tensor] = None) -> Tensor:
    """matvec, through its op when compiling (ops.sparse_linear and ops.sparse_silu_down call this where
    usable(x, w_t))."""
    if torch.compiler.is_compiling():
        return torch.ops.teal.cpu_matvec(x, w_t, thresholds, splits, norm_weight, eps, residual, silu, scale, zero)
    return matvec(x, w_t, thresholds, splits, norm_weight, eps, residual, silu, scale, zero)


def linear(x: Tensor, w: Tensor) -> Tensor:
    """linear_rows, through its op when compiling."""
    if torch.compiler.is_compiling():
        return torch.ops.teal.cpu_linear_rows(x, w)
    return linear_rows(x, w)


def decode_attention_step(qkv: Tensor, n_head: int, k_cache: Tensor, v_cache: Tensor, rope_table: Tensor,
                          input_pos: Tensor) -> Tensor:
    """attention_step, through its op when compiling (ops.decode_attention_step calls this where
    takes_attention)."""
    if torch.compiler.is_compiling():
        return torch.ops.teal.cpu_decode_attention_step(qkv, n_head, k_cache, v_cache, rope_table, input_pos)
    return attention_step(qkv, n_head, k_cache, v_cache, rope_table, input_pos)
