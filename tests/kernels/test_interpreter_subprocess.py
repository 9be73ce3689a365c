"""Runs the kernel tests in a fresh process with TRITON_INTERPRET=1 when this one imported triton
without the interpreter (so they were skipped here); otherwise they already ran in this process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.kernels.conftest import SUBPROCESS_REASON

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
FILES = ["test_hamming_topk.py", "test_ape_attention_triton.py", "test_kv_dequant.py"]


def test_kernel_tests_pass_under_the_interpreter_in_a_fresh_process():
    pytest.importorskip("triton", reason="the Triton kernels need the triton package")
    from kvrag.kernels._triton import interpreting

    if torch.cuda.is_available() or interpreting():
        pytest.skip("the kernel tests ran in this process")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-rs",
        "-p",
        "no:cacheprovider",
        *(str(HERE / f) for f in FILES),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    report = proc.stdout[-6000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, report
    assert SUBPROCESS_REASON not in proc.stdout, report  # the kernels really ran there
    assert " passed" in proc.stdout, report
