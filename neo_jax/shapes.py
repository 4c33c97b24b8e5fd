"""Shape bucketing shared by generation and scoring: lengths are rounded up so that nearby lengths share one
compiled program."""

from __future__ import annotations

import math


def bucket(n: int) -> int:
    """Round a sequence length up: 16, 32, 64, 128, 256, then multiples of 256."""
    return max(16, 2 ** math.ceil(math.log2(n))) if n <= 256 else 256 * math.ceil(n / 256)
