"""What the kernel files share: the optional Triton import, backend choice and timing helpers.

Triton runs kernels either compiled (GPU) or on its CPU interpreter, and the choice is made once per
process: `TRITON_INTERPRET=1` must be set before `triton` is first imported, because Triton's own
library functions (`tl.max`, `tl.sort`, ...) are wrapped for one mode at that import. `interpreting()`
reports the mode the process got; `launchable` re-wraps a kernel of ours that was decorated while the
variable said otherwise, so the two always agree.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any, Literal

import torch

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # CPU installs may lack Triton: every dispatcher then runs its torch reference
    triton = None
    tl = None
    libdevice = None

HAS_TRITON = triton is not None
Backend = Literal["auto", "torch", "triton"]
BACKENDS: tuple[str, ...] = ("auto", "torch", "triton")


def jit(fn: Callable) -> Any:
    """`triton.jit` where Triton is installed; the plain function otherwise (it is then never launched)."""
    return triton.jit(fn) if HAS_TRITON else fn


def interpreting() -> bool:
    """Whether Triton runs kernels on the CPU interpreter in this process (fixed at its import)."""
    if not HAS_TRITON:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.max, InterpretedFunction)


@functools.cache
def _rejit(fn: Callable, interpret: bool) -> Any:
    from triton.runtime.interpreter import InterpretedFunction

    return InterpretedFunction(fn) if interpret else triton.runtime.jit.JITFunction(fn)


def launchable(kernel: Any) -> Any:
    """The kernel wrapped for the process's mode (compiled or interpreted)."""
    from triton.runtime.interpreter import InterpretedFunction

    interpret = interpreting()
    if isinstance(kernel, InterpretedFunction) == interpret:
        return kernel
    return _rejit(kernel.fn, interpret)


def pick_backend(backend: str, tensors: tuple[torch.Tensor, ...]) -> str:
    """Resolve `backend` to "torch" or "triton": "auto" is Triton when every tensor is on CUDA.

    Forcing "triton" on CPU tensors needs the interpreter (see `interpreting`); without it a clear
    error is raised.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if HAS_TRITON and on_cuda else "torch"
    if not HAS_TRITON:
        raise RuntimeError("backend='triton' needs the triton package; install it or use backend='torch'")
    if not on_cuda and not interpreting():
        raise RuntimeError(
            "backend='triton' on CPU tensors needs the Triton interpreter (TRITON_INTERPRET=1 set before "
            "triton is imported); use CUDA tensors or backend='torch'"
        )
    return "triton"


def next_pow2(n: int) -> int:
    """The smallest power of two >= max(n, 1)."""
    return 1 << max(int(n) - 1, 0).bit_length()


def cpu_time_ms(fn: Callable[[], Any], *, repeat: int = 5, min_time_s: float = 0.2) -> float:
    """Median wall time of `fn` in milliseconds on CPU (do_bench needs a GPU): one warm-up call, then
    at least `repeat` calls and about `min_time_s` seconds."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeat or time.perf_counter() - start < min_time_s:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= 1000:
            break
    times.sort()
    return times[len(times) // 2] * 1000


def gpu_peak_bandwidth_gbs(device: torch.device | int | None = None) -> float | None:
    """Theoretical DRAM bandwidth of a CUDA device in GB/s (2 x memory clock x bus width), when the
    driver reports both; None otherwise."""
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(device if device is not None else torch.cuda.current_device())
    clock_khz = getattr(props, "memory_clock_rate", 0)
    bus_bits = getattr(props, "memory_bus_width", 0)
    if not clock_khz or not bus_bits:
        return None
    return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9
