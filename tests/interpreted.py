"""Helpers for kernel tests that run under Triton's interpreter on the CPU.

TRITON_INTERPRET=1 must be set before triton is first imported (its own library functions are
compiled at import), so a test module's cases run in one child process that has it; this
process, other test modules and their subprocesses never see the variable.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_child(module: str, timeout: int) -> dict:
    """Run `module._child()` with TRITON_INTERPRET=1; it prints its results as one JSON line."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", f"from {module} import _child; _child()"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare(y, ref, tol: float) -> dict:
    """Kernel output y against the reference with atol = rtol = tol (poison shows up as nan)."""
    y, ref = y.float(), ref.float()
    err = (y - ref).abs()
    return dict(nan=bool(y.isnan().any()), n_bad=int((err > tol + tol * ref.abs()).sum()),
                max_err=float(err.nan_to_num(float("inf")).max()), all_zero=bool((y == 0).all()))
