"""What the trainers share: the learning-rate schedule, JSON Lines caches and the command-line runner."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from kvrag.errors import KvragError

DEFAULT_HOME = "~/.local/share/kvrag"  # as the product's settings: KVRAG_HOME, else this


def kvrag_home() -> Path:
    """`$KVRAG_HOME` (default ~/.local/share/kvrag): where the product keeps models and caches."""
    return Path(os.environ.get("KVRAG_HOME") or DEFAULT_HOME).expanduser()


def default_models_dir() -> Path:
    """`$KVRAG_HOME/models`, where `kvrag models` prepares the bundled models."""
    return kvrag_home() / "models"


def warmup_cosine(total_steps: int, warmup_share: float) -> Callable[[int], float]:
    """Learning-rate factor per step (for `LambdaLR`): linear warm-up over `warmup_share` of the steps
    (at least one), then cosine decay to 0 at `total_steps`."""
    warm = max(1, int(total_steps * warmup_share))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total_steps - warm))))

    return factor


def cached_rows(path: Path) -> Iterator[dict]:
    """The JSON objects of a JSON Lines cache, one per line; none when the file does not exist. A
    line that does not parse (cut short by an interrupted run) or is not an object is skipped: its
    entry is computed again."""
    if not path.is_file():
        return
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                yield row


def add_common_args(p: argparse.ArgumentParser) -> None:
    """The options every trainer takes: the models folder, torch threads and JSON output."""
    p.add_argument(
        "--models-dir",
        help="folder of the prepared bundled models (default: $KVRAG_HOME/models, as `kvrag models` uses)",
    )
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", action="store_true", help="print only the report, as one JSON object")


def run_job(train: Callable[..., dict], cfg, args: argparse.Namespace, **kwargs) -> int:
    """Run a training job with the common options (progress bars on a terminal) and print its report;
    errors you can fix print `error: ...` and exit with status 2."""
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    models_dir = Path(args.models_dir).expanduser() if args.models_dir else default_models_dir()
    progress = not args.json and sys.stderr.isatty()
    try:
        report = train(
            cfg,
            models_dir=models_dir,
            show_progress=progress,
            log=(lambda *_: None) if args.json else print,
            **kwargs,
        )
    except KvragError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print(json.dumps(report, indent=2 if args.json else 1, ensure_ascii=False, default=str))
    return 0


def command_line(module: str, argv: list[str]) -> str:
    """How a run was started, for its recipe."""
    return " ".join([f"python -m {module}", *argv])
