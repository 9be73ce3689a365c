"""Run the retrieval evaluations and benchmarks behind docs/benchmarks.md; prints one JSON object per line.

    python benchmarks/run_all.py [--quick]

Needs ../shared/data beside the checkout. The first run encodes the SciFact corpus once (about 15-30
minutes on 2 CPU cores); later runs read the embedding cache.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def kvrag(*args: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "kvrag.service.cli", *args, "--json"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="skip the 1M-vector benchmark")
    args = ap.parse_args()
    scifact = str(DATA / "scifact")
    xq = DATA / "xquad" / "retrieval"
    runs = [
        ["eval", "retrieval", "--data", scifact],
        ["eval", "retrieval", "--data", scifact, "--precision", "ubinary"],
        ["eval", "retrieval", "--data", scifact, "--precision", "ubinary", "--rescore", "4"],
        ["eval", "retrieval", "--data", scifact, "--precision", "ubinary", "--binary-method", "mean"],
        [
            "eval",
            "retrieval",
            "--data",
            scifact,
            "--precision",
            "ubinary",
            "--binary-method",
            "mean",
            "--rescore",
            "4",
        ],
        ["eval", "retrieval", "--data", scifact, "--precision", "ubinary", "--binary-method", "none"],
        [
            "eval",
            "retrieval",
            "--data",
            scifact,
            "--precision",
            "ubinary",
            "--rescore",
            "4",
            "--rescore-with",
            "int8",
        ],
        ["eval", "retrieval", "--data", scifact, "--precision", "int8"],
        ["eval", "retrieval", "--data", scifact, "--precision", "int8", "--rescore", "4"],
        ["eval", "retrieval", "--data", scifact, "--hybrid"],
        ["eval", "retrieval", "--data", scifact, "--hybrid", "--bm25-language", "english"],
        *[["eval", "retrieval", "--data", scifact, "--dim", str(d)] for d in (256, 128, 64)],
        *[["eval", "retrieval", "--data", str(xq / lang)] for lang in ("en", "de", "zh")],
        *[
            ["eval", "retrieval", "--data", str(xq / lang), "--corpus", str(xq / "en")]
            for lang in ("de", "zh")
        ],
    ]
    if not args.quick:
        runs.append(["bench", "index", "--n", "1000000", "--dim", "384"])
    for run in runs:
        result = kvrag(*run)
        print(json.dumps({"command": "kvrag " + " ".join(run) + " --json", **result}), flush=True)


if __name__ == "__main__":
    main()
