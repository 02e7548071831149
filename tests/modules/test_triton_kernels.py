"""The lookup's Triton kernels (launched on CUDA) checked on CPU through Triton's interpreter against
the torch reference that CPU lookups use; the GPU tests check it end to end on the device."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_triton_kernels_equal_torch_references():
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-m", "tests.modules.triton_kernel_check"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "probe and admission kernels match the torch reference" in out.stdout
    assert "offsets kernels match the torch reference" in out.stdout
    assert "resident kernel matches the torch reference" in out.stdout
