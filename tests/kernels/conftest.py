"""Where the Triton kernels run in these tests: the GPU when there is one, else Triton's CPU
interpreter.

The interpreter must be chosen before `triton` is first imported (see kernels/_triton.py). When this
folder is collected before anything imported triton, `TRITON_INTERPRET=1` is set here and the kernel
tests run in this process. When something imported it earlier (e.g. the generation tests, through the
generator), the kernel tests skip here and `test_interpreter_subprocess.py` runs them again in a fresh
process with the interpreter on, so the outcome never depends on collection order.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SUBPROCESS_REASON = "triton was imported without the interpreter in this process; run in a subprocess"


@pytest.fixture
def kernel_device() -> str:
    """ "cuda" on a GPU machine; "cpu" where this process runs Triton on its interpreter."""
    pytest.importorskip("triton", reason="the Triton kernels need the triton package")
    from kvrag.kernels._triton import interpreting

    if torch.cuda.is_available():
        return "cuda"
    if not interpreting():
        pytest.skip(SUBPROCESS_REASON)
    return "cpu"


@pytest.fixture
def no_interpreter(monkeypatch) -> None:
    """Behave as a plain CPU process without the Triton interpreter."""
    import kvrag.kernels._triton as triton_mod

    monkeypatch.setattr(triton_mod, "interpreting", lambda: False)
