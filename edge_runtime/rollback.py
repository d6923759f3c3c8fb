"""Undo a state change in memory when its snapshot could not be written.

``Device.learn`` changes the learner (head, replay, holdout, counters), the kept crops and
the crops waiting for consent, then saves. When the save fails (a full disk, a read-only
card) the label is not durable and the caller is told so; before issue 20 the memory kept
it anyway, so the next successful save stored a label reported as failed, and a caregiver's
retry taught it twice. ``Undo.of(device)`` remembers what such a change touches; ``restore``
puts it back. Only when the newest snapshot on disk is still the one the change started from:
a snapshot that did land holds the change, and memory must then agree with it.
"""
from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class _Learner:
    head: Any
    replay: Any
    holdout: Any
    anchor_weights: list
    counters: dict
    learned_queue_ids: list
    camera: Any

    @classmethod
    def of(cls, learner: Any) -> "_Learner":
        return cls(copy.deepcopy(learner.head), copy.deepcopy(learner.replay), copy.deepcopy(learner.holdout),
                   list(learner.anchor_weights), dict(learner.counters), list(learner.learned_queue_ids),
                   copy.deepcopy(learner.camera))

    def restore(self, learner: Any) -> None:
        learner.head, learner.replay, learner.holdout = self.head, self.replay, self.holdout
        learner.camera = self.camera
        learner.anchor_weights = self.anchor_weights
        learner.counters.clear()
        learner.counters.update(self.counters)
        learner.learned_queue_ids = self.learned_queue_ids


@dataclass
class _Samples:
    """A ``SampleKeeper``'s memory: crops per class (lists copied, arrays are replaced, never changed), counts, rng, pending records."""

    crops: list
    seen: np.ndarray
    rng_state: dict
    pending: list

    @classmethod
    def of(cls, samples: Any) -> "_Samples":
        return cls([list(c) for c in samples.crops], samples.seen.copy(), copy.deepcopy(samples.rng.bit_generator.state),
                   list(samples._pending))

    def restore(self, samples: Any) -> None:
        samples.crops, samples.seen, samples._pending = self.crops, self.seen, self.pending
        samples.rng.bit_generator.state = self.rng_state


@dataclass
class Undo:
    """What one device change may touch, as it was before, and the snapshot generation it started from."""

    learner: Any  # the GuardedLearner object itself: restored in place, every holder sees it
    learner_memo: _Learner
    samples_memo: _Samples
    pending_crops: list
    dirty: bool
    generation: int

    @classmethod
    def of(cls, device: Any) -> "Undo":
        return cls(device.learner, _Learner.of(device.learner), _Samples.of(device.samples), list(device._pending_crops),
                   device._dirty, device.store.latest_generation())

    def restore(self, device: Any) -> bool:
        """Put memory back unless a newer snapshot landed after all; True if it did put it back."""
        if device.store.latest_generation() != self.generation or device.learner is not self.learner:
            return False
        self.learner_memo.restore(self.learner)
        self.samples_memo.restore(device.samples)
        device._pending_crops, device._dirty = self.pending_crops, self.dirty
        return True


@contextlib.contextmanager
def undo_on_failure(device: Any, also: Optional[Callable[[], None]] = None, *, enabled: bool = True) -> Iterator[None]:
    """Run a device change; if it raises, put memory back (``Undo``) and then call ``also``
    (e.g. take back the queue label the change recorded) before the error goes on.
    ``enabled=False`` (a change that does not save, e.g. ``autosave`` off) copies nothing."""
    if not enabled:
        yield
        return
    undo = Undo.of(device)
    try:
        yield
    except BaseException:
        if undo.restore(device) and also is not None:
            try:
                also()
            except OSError as exc:
                log.warning("could not take back the failed change on disk: %s", exc)
        raise
