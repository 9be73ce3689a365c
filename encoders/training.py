"""What our trainers share."""

from __future__ import annotations

import math
from collections.abc import Callable


def warmup_cosine(total_steps: int, warmup_share: float) -> Callable[[int], float]:
    """Learning-rate factor per step (for `LambdaLR`): linear warm-up over `warmup_share` of the steps
    (at least one), then cosine decay to 0 at `total_steps`."""
    warm = max(1, int(total_steps * warmup_share))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total_steps - warm))))

    return factor
