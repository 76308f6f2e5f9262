"""Accuracy / pass@1 with a 95% confidence interval.

The interval is Wilson's score interval for a binomial proportion, not the normal approximation
p ± z·sqrt(p(1-p)/n): Wilson's stays inside [0, 1] and keeps its coverage near 0 and 1 and for the few
hundred problems a benchmark has. With greedy decoding there is one sample per problem, so pass@1 is
the fraction of problems whose single program passes, and the same interval applies.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

Z_95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson_interval(correct: int, total: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of `correct` successes in `total` trials; (0, 1) when total is 0."""
    if total < 0 or not 0 <= correct <= total:
        raise ValueError(f"need 0 <= correct <= total, got correct={correct}, total={total}")
    if total == 0:
        return 0.0, 1.0
    p, z2 = correct / total, z * z
    denominator = 1 + z2 / total
    centre = (p + z2 / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z2 / (4 * total * total)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class Score:
    """One model's result on one benchmark: `accuracy` = correct / total, and its 95% Wilson interval."""

    correct: int
    total: int
    accuracy: float
    low: float
    high: float

    @classmethod
    def of(cls, correct: int, total: int) -> "Score":
        low, high = wilson_interval(correct, total)
        return cls(correct, total, correct / total if total else 0.0, low, high)

    def to_dict(self) -> dict:
        return asdict(self)
