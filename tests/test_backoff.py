"""The one backoff schedule (infantino.edge_runtime.core.backoff): doubling, cap, jitter bounds, validation."""
import random

import pytest

from infantino.edge_runtime.core.backoff import Backoff, backoff_delay, backoff_delays, jittered


def test_delays_double_up_to_the_cap_and_stay_inside_the_spread():
    # Prepare
    rng = random.Random(0)
    # Execute
    delays = list(backoff_delays(0.5, 3.0, 6, rng=rng))
    # Assert
    nominal = [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]
    assert len(delays) == 6
    assert all(n * 0.5 <= d <= n for d, n in zip(delays, nominal)), delays


def test_a_symmetric_spread_moves_both_ways():
    draws = [backoff_delay(2, 5.0, 120.0, spread=(0.8, 1.2), rng=random.Random(i)) for i in range(200)]
    assert 16.0 <= min(draws) < 20.0 < max(draws) <= 24.0


def test_the_same_seed_gives_the_same_schedule():
    assert list(backoff_delays(1, 60, 5, rng=random.Random(7))) == list(backoff_delays(1, 60, 5, rng=random.Random(7)))


def test_huge_attempt_numbers_stay_at_the_cap():
    assert backoff_delay(10_000, 1.0, 30.0, spread=(1.0, 1.0)) == 30.0


def test_jittered_without_rng_uses_the_module_generator():
    assert 45.0 <= jittered(50.0, spread=(0.9, 1.0)) <= 50.0


def test_stateful_backoff_resets_after_success():
    b = Backoff(base_s=1.0, max_s=8.0, jitter=0.5, rng=random.Random(0))
    delays = [b.next_delay() for _ in range(5)]
    assert all(c / 2 <= d <= c for d, c in zip(delays, [1, 2, 4, 8, 8])), delays
    b.reset()
    assert 0.5 <= b.next_delay() <= 1.0


@pytest.mark.parametrize("kwargs, message", [
    ({"attempt": 0, "base_s": 0.0, "cap_s": 1.0}, "0 < base_s <= cap_s"),
    ({"attempt": 0, "base_s": 2.0, "cap_s": 1.0}, "0 < base_s <= cap_s"),
    ({"attempt": 0, "base_s": 1.0, "cap_s": 2.0, "spread": (1.2, 0.8)}, "low <= high"),
    ({"attempt": -1, "base_s": 1.0, "cap_s": 2.0}, "attempt must be >= 0"),
])
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        backoff_delay(**kwargs)


def test_bad_stateful_settings_are_refused():
    with pytest.raises(ValueError, match="0 <= jitter < 1"):
        Backoff(base_s=1, max_s=2, jitter=1.0)
