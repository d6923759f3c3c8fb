"""A ``GuardedLearner`` to and from one state snapshot (``state.StateStore``): the device state format.

Payload arrays: ``head_npz`` (the head's own npz bytes), ``replay_*`` and ``holdout_*``
(``replay.py``), ``anchor_<i>`` (the L2-SP anchor, which is also the fleet's head as adopted),
``pool_*`` and ``personal_*`` (the camera's own part, ``camera.CameraModel``); meta: ``format``, the package version,
the counters and the ids of the last queued frames learned. A snapshot of another package
is not applied (its embeddings mean nothing to this extractor): the device starts from
the new package's head, its kept face crops re-embedded by sync.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np

from .core.head import OnlineHead
from .learner import GuardedLearner
from .core.replay import HoldoutSet, ReplayBuffer
from .state import Snapshot, StateError

STATE_FORMAT = "infantino-device-state/1"


def learner_arrays(learner: GuardedLearner) -> dict[str, np.ndarray]:
    """The arrays of one snapshot: head, replay, holdout, anchor."""
    return {"head_npz": np.frombuffer(learner.head.to_bytes(), np.uint8), **learner.replay.to_arrays(),
            **learner.holdout.to_arrays(), **{f"anchor_{i}": a for i, a in enumerate(learner.anchor_weights)},
            **learner.camera.to_arrays()}


def learner_meta(learner: GuardedLearner, *, package_version: str, extractor_role: str) -> dict[str, Any]:
    """The meta of one snapshot (also mirrored in ``state.json`` and ``Device.status``)."""
    return {
        "format": STATE_FORMAT, "package_version": package_version, "head_version": learner.head.version,
        "extractor": extractor_role, "source_samples": len(learner.source), "counters": dict(learner.counters),
        "learned_queue_ids": learner.learned_queue_ids[-100:], "saved_at": time.time(),
    }


def of_another_package(snap: Snapshot, package_version: str) -> bool:
    """A snapshot of this format learned on another package (not to be applied)."""
    return snap.meta.get("format") == STATE_FORMAT and snap.meta.get("package_version") != package_version


def apply_snapshot(learner: GuardedLearner, snap: Snapshot) -> None:
    """Head, buffers, counters and queue bookkeeping of ``learner`` from one verified snapshot of its
    package; ``StateError`` (nothing changed) for one that does not fit."""
    meta = snap.meta
    if meta.get("format") != STATE_FORMAT:
        raise StateError(f"{snap.path.name}: unknown state format {meta.get('format')!r}")
    try:
        head = OnlineHead.from_bytes(snap.arrays["head_npz"].tobytes())
        replay = ReplayBuffer.from_arrays(snap.arrays)
        holdout = HoldoutSet.from_arrays(snap.arrays)
    except (KeyError, ValueError) as exc:
        raise StateError(f"{snap.path.name}: {exc}") from exc
    if head.input_dim != learner.dim or replay.dim != learner.dim or head.classes != learner.classes:
        raise StateError(f"{snap.path.name}: state does not fit this package's embedding size or classes")
    c = learner.config
    if replay.per_class != c.replay_per_class or holdout.x.shape[1] != c.holdout_per_class:
        replay, holdout = _resize(replay, c.replay_per_class, c.seed), _resize_holdout(holdout, c.holdout_per_class)
    anchor = [np.asarray(snap.arrays[f"anchor_{i}"], np.float64) for i in range(len(head.weights())) if f"anchor_{i}" in snap.arrays]
    if anchor and [a.shape for a in anchor] == [w.shape for w in head.weights()]:
        learner.anchor_weights = anchor
    try:
        learner.camera.load_arrays(snap.arrays)  # the camera's own part (absent in snapshots before issue 19)
    except ValueError as exc:
        raise StateError(f"{snap.path.name}: {exc}") from exc
    learner.head, learner.replay, learner.holdout = head, replay, holdout
    learner.counters.update({k: int(v) for k, v in meta.get("counters", {}).items()})
    learner.learned_queue_ids = [str(i) for i in meta.get("learned_queue_ids", [])]


def _resize(buf: ReplayBuffer, per_class: int, seed: int) -> ReplayBuffer:
    """The same samples in a buffer of another size (a config change between runs)."""
    out = ReplayBuffer(buf.n_classes, buf.dim, per_class)
    x, y = buf.all()
    rng = np.random.default_rng(seed)
    for i in rng.permutation(len(y)):
        out.add(x[i], int(y[i]), rng)
    out.seen = np.maximum(out.seen, buf.seen)
    return out


def _resize_holdout(h: HoldoutSet, per_class: int) -> HoldoutSet:
    out = HoldoutSet(h.x.shape[0], h.dim, per_class)
    x, y = h.all()
    for xi, yi in zip(x, y):
        out.push(xi, int(yi))
    return out
