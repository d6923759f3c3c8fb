"""Jittered exponential backoff: the one retry schedule of the code base.

A server that is down, a camera that drops and a tracking server that is slow are all
normal; retrying at once hammers them and retrying on a fixed beat makes a fleet retry in
step. Every retry loop (the edge HTTP transport, the camera reader, the server's
aggregator and outbox worker) draws its waits from here. Pure: only ``random`` and
``math``; the caller sleeps.

Attempt ``n`` (0-based) waits ``min(cap_s, base_s * 2**n)`` times a factor drawn
uniformly from ``spread`` (``(0.5, 1.0)``: up to half shorter; ``(0.8, 1.2)``: 20 % either way).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Iterator, Optional, Tuple

Spread = Tuple[float, float]
DOWN_TO_HALF: Spread = (0.5, 1.0)
_MAX_DOUBLINGS = 60  # 2**60 * any sane base is far past any cap; keeps the float finite


def _check(base_s: float, cap_s: float, spread: Spread) -> None:
    low, high = spread
    if not (base_s > 0 and cap_s >= base_s):
        raise ValueError(f"backoff needs 0 < base_s <= cap_s, got base_s={base_s}, cap_s={cap_s}")
    if not 0.0 <= low <= high:
        raise ValueError(f"backoff spread needs 0 <= low <= high, got {spread}")


def jittered(delay_s: float, rng: Optional[random.Random] = None, *, spread: Spread = DOWN_TO_HALF) -> float:
    """``delay_s`` times a factor drawn uniformly from ``spread``."""
    low, high = spread
    return delay_s * (rng or random).uniform(low, high)


def backoff_delay(attempt: int, base_s: float, cap_s: float, *, spread: Spread = DOWN_TO_HALF,
                  rng: Optional[random.Random] = None) -> float:
    """The jittered wait after failed attempt ``attempt`` (0-based): ``min(cap_s, base_s * 2**attempt)``, jittered."""
    _check(base_s, cap_s, spread)
    if attempt < 0:
        raise ValueError(f"attempt must be >= 0, got {attempt}")
    return jittered(min(cap_s, base_s * 2.0 ** min(attempt, _MAX_DOUBLINGS)), rng, spread=spread)


def backoff_delays(base_s: float, cap_s: float, attempts: int, *, spread: Spread = DOWN_TO_HALF,
                   rng: Optional[random.Random] = None) -> Iterator[float]:
    """The ``attempts`` waits of a bounded retry loop, attempt 0 first."""
    _check(base_s, cap_s, spread)
    for attempt in range(attempts):
        yield backoff_delay(attempt, base_s, cap_s, spread=spread, rng=rng)


@dataclass
class Backoff:
    """The same schedule for loops that retry until they succeed: ``next_delay`` after each
    failure, ``reset`` after a success. ``jitter`` draws each delay down by up to that fraction."""

    base_s: float = 1.0
    max_s: float = 300.0
    jitter: float = 0.5
    failures: int = 0
    rng: random.Random = field(default_factory=random.Random, repr=False)

    def __post_init__(self) -> None:
        if self.base_s <= 0 or self.max_s < self.base_s or not 0.0 <= self.jitter < 1.0:
            raise ValueError("backoff needs 0 < base_s <= max_s and 0 <= jitter < 1")

    def next_delay(self) -> float:
        """The wait before the next attempt, after one more failure."""
        delay = backoff_delay(self.failures, self.base_s, self.max_s, spread=(1.0 - self.jitter, 1.0), rng=self.rng)
        self.failures += 1
        return delay

    def reset(self) -> None:
        """A success: the next failure starts from ``base_s`` again."""
        self.failures = 0
