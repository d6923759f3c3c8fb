"""``GuardedLearner``: the learning policy of a device, numpy only (no ONNX Runtime, no I/O).

Two parts, kept apart: the *shared* head the fleet aggregates (this device's update of it is
what sync uploads) and the *camera's own* adaptation on top of it (``camera.CameraModel``:
its class mix and its lean, guarded on its own labels; never uploaded, kept across new
global heads and packages). The device predicts with both (``predict_proba``).

One caregiver label makes one guarded update of the head: the new embedding (weighted
``new_weight``) with a class-balanced draw from the replay of earlier labels and from the
package's source-domain (adult FER) embeddings, a few Adam steps pulled toward the starting
head (L2-SP), then the guard: on a holdout of recent labels kept out of training, an update
that makes the mean log-loss clearly worse (or any weight non-finite) is undone. Every
``holdout_every``-th label is held back for the guard; when the holdout is full, the class's
oldest held-back label is learned instead.

    learner = GuardedLearner(head, DeviceConfig())
    result = learner.learn(embedding, class_index)

Saving and loading the learner's state is ``device_state``'s job; embedding frames is the
``Device``'s.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from .config import DeviceConfig
from .core.head import OnlineHead
from .camera import CameraModel
from .core.personal import PersonalSettings
from .core.replay import HoldoutSet, ReplayBuffer

COUNTERS = ("predictions", "queued", "labels", "updates", "rollbacks", "held_out", "from_queue", "adopted")


@dataclass
class LearnResult:
    """What one ``learn`` did: an accepted update, a rollback, or holding the label back."""

    label: str
    updated: bool  # the head changed
    rolled_back: bool  # an update was made and undone by the guard
    held_out: bool  # this label went to the guard's holdout
    head_version: int
    holdout_loss_before: float | None = None
    holdout_loss_after: float | None = None


class GuardedLearner:
    """A head plus what guards and feeds its updates: replay, holdout, anchor, counters."""

    def __init__(self, head: OnlineHead, config: DeviceConfig = DeviceConfig(), source: Optional[ReplayBuffer] = None):
        self.config = config
        self.head = head
        self.classes: tuple[str, ...] = tuple(head.classes)
        self.dim = int(head.input_dim)
        n = len(self.classes)
        self.source = source if source is not None else ReplayBuffer(n, self.dim, 0)
        self.anchor_weights = [w.copy() for w in head.weights()]
        self.replay = ReplayBuffer(n, self.dim, config.replay_per_class)
        self.holdout = HoldoutSet(n, self.dim, config.holdout_per_class)
        self.counters: dict[str, int] = {k: 0 for k in COUNTERS}
        self.learned_queue_ids: list[str] = []
        self.camera = CameraModel(n, self.dim, PersonalSettings(), pool_size=config.frame_pool)
        self._shared: tuple[list[np.ndarray], OnlineHead] | None = None  # (the anchor it was built from, the head)

    @property
    def shared_head(self) -> OnlineHead:
        """The fleet's head as this device adopted it (the L2-SP anchor), before any local update."""
        cached = self._shared
        if cached is None or cached[0] is not self.anchor_weights:  # adopted, restored or loaded since
            n = len(self.head.coefs)
            head = OnlineHead.from_arrays(self.anchor_weights[:n], self.anchor_weights[n:], self.classes, self.head.params)
            self._shared = cached = (self.anchor_weights, head)
        return cached[1]

    @property
    def predicting_head(self) -> OnlineHead:
        """The head the camera's part sits on: the fleet's head as adopted (``personal_on="shared"``, the
        default), or this device's locally updated copy ("learned", the behaviour before issue 19)."""
        return self.head if self.config.personal_on == "learned" else self.shared_head

    def predict_proba(self, x: np.ndarray, seen: np.ndarray | None = None) -> np.ndarray:
        """The camera's probabilities for embeddings ``x`` (N, dim): shared head, then the camera's own part.
        Rows flagged in ``seen`` (frames the camera saw with a face) also go to its frame pool, with the
        shared head's probabilities computed here once: evidence of its class mix."""
        x = np.asarray(x, np.float32).reshape(-1, self.dim)
        if not self.config.personalize:
            return self.head.predict_proba(x)
        shared = self.predicting_head.predict_proba(x)
        out = self.camera.apply(shared, x)  # answered with the adaptation as it stood before these frames
        for i in np.flatnonzero(seen) if seen is not None else ():
            self.camera.observe(x[i], shared[i])
        return out

    def observe(self, x: np.ndarray) -> None:
        """A frame the camera saw (a face was found), without a prediction wanted."""
        if self.config.personalize:
            x = np.asarray(x, np.float32).reshape(1, self.dim)
            self.camera.observe(x[0], self.predicting_head.predict_proba(x)[0])

    def _personal_label(self, x: np.ndarray, y: int) -> None:
        if self.config.personalize:
            self.camera.labelled(x, y, self.predicting_head, self.kept)

    @property
    def anchor_strength(self) -> float:
        """L2-SP strength: measured best at 1.0 when there are no source-domain embeddings to replay,
        and unneeded (it only slows learning) when there are (docs/edge.md)."""
        if self.config.anchor_strength is not None:
            return float(self.config.anchor_strength)
        return 0.0 if len(self.source) and self.config.source_mix else 1.0

    def _rng(self) -> np.random.Generator:
        """Seeded by the label count, so a restarted device draws the same replay as one that never stopped."""
        return np.random.default_rng([self.config.seed, self.counters["labels"]])

    def _hold_back(self, x: np.ndarray, y: int) -> tuple[bool, Optional[np.ndarray]]:
        """(held, embedding to learn now): every ``holdout_every``-th label enters the holdout,
        which gives back its oldest one of that class when full (None: nothing to learn now)."""
        c = self.config
        held = bool(c.holdout_every and c.holdout_per_class and self.counters["labels"] % c.holdout_every == 0)
        if not held:
            return False, x
        self.counters["held_out"] += 1
        return True, self.holdout.push(x, y)

    def _batch(self, x: np.ndarray, y: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The new sample, a replay draw and a source-domain draw, with their weights."""
        c = self.config
        rx, ry = self.replay.sample(c.replay_mix, rng)
        ax, ay = self.source.sample(c.source_mix, rng)
        xb = np.concatenate([x[None], rx, ax])
        yb = np.concatenate([[y], ry, ay]).astype(np.int64)
        return xb, yb, np.concatenate([[c.new_weight * self._balance(y)], np.ones(len(ry) + len(ay))])

    def _balance(self, y: int) -> float:
        """The new label's weight in the shared update, against this camera's class mix: the mix is the
        camera's own (its prior, ``camera``), the shared head should learn what an expression looks like,
        so a label of the camera's everyday class counts less, a rare one more (1/K over the label
        frequency, Laplace-smoothed, within [1/4, 4]; ``balance_shared``)."""
        if not self.config.balance_shared:
            return 1.0
        counts = self.camera.recent
        freq = (counts[y] + 1.0) / (counts.sum() + len(counts))
        return float(np.clip(1.0 / (len(counts) * freq), 0.25, 4.0))

    def learn(self, x: np.ndarray, y: int) -> LearnResult:
        """One guarded update from a checked embedding ``x`` (float32, ``dim``) of class index ``y``."""
        c = self.config
        self.counters["labels"] += 1
        rng = self._rng()
        labelled = x
        held, x = self._hold_back(x, y)
        if x is None:
            self._personal_label(labelled, y)
            return LearnResult(self.classes[y], False, False, True, self.head.version)
        try:
            return self._shared_update(x, y, held, rng)
        finally:
            self._personal_label(labelled, y)

    def _shared_update(self, x: np.ndarray, y: int, held: bool, rng: np.random.Generator) -> LearnResult:
        """The guarded update of the shared head (what sync uploads)."""
        c = self.config
        xb, yb, weights = self._batch(x, y, rng)
        hx, hy = self.holdout.all()
        judge = len(hy) >= c.guard_min_holdout
        before = float(self.head.log_loss(hx, hy).mean()) if judge else None
        version = self.head.version  # a learning step leaves the version alone; an accepted update counts
        cp = self.head.checkpoint()
        self.head.learn_step(xb, yb, steps=c.learn_steps, sample_weight=weights, learning_rate=c.learning_rate,
                             anchor=self.anchor_weights, anchor_strength=self.anchor_strength)
        finite = all(np.all(np.isfinite(w)) for w in self.head.weights())
        after = float(self.head.log_loss(hx, hy).mean()) if judge and finite else None
        if not finite or (judge and after - before > c.guard_tolerance):
            self.head.restore(cp)
            self.counters["rollbacks"] += 1
            return LearnResult(self.classes[y], False, True, held, self.head.version, before, after)
        self.replay.add(x, y, rng)
        self.counters["updates"] += 1
        self.head.version = version + 1
        return LearnResult(self.classes[y], True, False, held, self.head.version, before, after)

    def adopt(self, head: OnlineHead) -> None:
        """Replace the head (e.g. the fleet's); learning now stays close to it. Replay and holdout stay."""
        if tuple(head.classes) != self.classes or head.input_dim != self.dim:
            raise ValueError("head does not match this learner's classes or embedding size")
        self.head = head
        self.anchor_weights = [w.copy() for w in head.weights()]
        self.counters["adopted"] += 1
        if self.config.personalize and self.camera.n_labels:  # the camera's own part stays, refitted on the new head
            self.camera.refresh(self.predicting_head, self.kept())

    def kept(self) -> tuple[np.ndarray, np.ndarray]:
        """(embeddings, labels) of every kept label: the replay buffer and the holdout."""
        xs, ys = self.replay.all()
        hx, hy = self.holdout.all()
        return np.concatenate([xs, hx]), np.concatenate([ys, hy]).astype(np.int64)

    def refill(self, embeddings: np.ndarray, labels: np.ndarray) -> None:
        """A new replay buffer from (embeddings, labels), e.g. kept crops re-embedded by a new extractor."""
        buf = ReplayBuffer(len(self.classes), self.dim, self.config.replay_per_class)
        rng = np.random.default_rng(self.config.seed)
        for x, y in zip(embeddings, labels):
            buf.add(x, int(y), rng)
        self.replay = buf
        self.camera.forget_frames()  # embeddings of another extractor; the class mix and the label counts stay
