"""Triton kernels against their torch references; prints one JSON object.

    .venv/bin/python benchmarks/kernels.py [--quick]

On a CUDA GPU each kernel and its reference are timed with `triton.testing.do_bench`: APE attention at
an 8K-token cache (question prefill and one decoding step), the Hamming top-k scan over 10M 256-bit
codes with its bandwidth against the GPU's peak (and faiss `GpuIndexBinaryFlat` where faiss has GPU
support), and int8 KV dequantisation with its bandwidth. Without a GPU only the torch references are
timed, on small sizes (about a minute on 2 cores, a few seconds with --quick), and `"gpu": false`.
The sizes and settings of each run are in the kernel files' `benchmark` functions.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from kvrag.kernels import ape_attention, hamming_topk, kv_dequant  # noqa: E402
from kvrag.kernels._triton import HAS_TRITON  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller CPU sizes (no effect on a GPU)")
    args = ap.parse_args(argv)

    gpu = HAS_TRITON and torch.cuda.is_available()
    out: dict = {
        "benchmark": "kernels",
        "gpu": gpu,
        "device": torch.cuda.get_device_name() if gpu else platform.processor() or platform.machine(),
        "triton": HAS_TRITON,
        "torch_threads": torch.get_num_threads(),
    }
    if not gpu:
        out["note"] = (
            "no CUDA GPU (or no triton): only the torch references are timed, on CPU at small sizes; "
            "the Triton timings, APE speed-up at 8K, Hamming bandwidth on 10M codes and the faiss GPU "
            "comparison need a GPU"
        )
    t0 = time.perf_counter()
    for name, mod in (
        ("ape_attention", ape_attention),
        ("hamming_topk", hamming_topk),
        ("kv_dequant", kv_dequant),
    ):
        out[name] = mod.benchmark(quick=args.quick)
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
