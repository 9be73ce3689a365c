"""What our trainers share."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path


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
