"""Exponential backoff with jitter, the one schedule for retrying a camera and a server.

A camera that drops and a server that is down are both normal on a nursery network; retrying
at once hammers them and retrying at a fixed interval makes many devices retry in step.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """Delays ``base_s, 2*base_s, 4*base_s ...`` capped at ``max_s``, each drawn down by up to ``jitter``."""

    base_s: float = 1.0
    max_s: float = 300.0
    jitter: float = 0.5  # a delay d is drawn uniformly from [d * (1 - jitter), d]
    failures: int = 0
    rng: random.Random = field(default_factory=random.Random, repr=False)

    def __post_init__(self) -> None:
        if self.base_s <= 0 or self.max_s < self.base_s or not 0.0 <= self.jitter < 1.0:
            raise ValueError("backoff needs 0 < base_s <= max_s and 0 <= jitter < 1")

    def next_delay(self) -> float:
        """The wait before the next attempt, after one more failure."""
        delay = min(self.max_s, self.base_s * 2.0 ** min(self.failures, 60))
        self.failures += 1
        return delay * self.rng.uniform(1.0 - self.jitter, 1.0)

    def reset(self) -> None:
        """A success: the next failure starts from ``base_s`` again."""
        self.failures = 0


def jittered(period_s: float, fraction: float, rng: random.Random) -> float:
    """``period_s`` moved by up to ``fraction`` either way, so a fleet does not sync in lockstep."""
    return period_s * rng.uniform(1.0 - fraction, 1.0 + fraction)
