"""``Device``: what runs on the camera. Predict expressions, learn from caregivers, never lose it.

A device opens a verified model package (``package_runtime``) and a state folder. ``predict``
decodes a frame, crops the face, embeds it with ONNX Runtime and asks the head; frames the
head is unsure about go to the annotation queue. ``learn`` takes the caregiver's label and
makes one guarded update (``learner.GuardedLearner``, the learning policy), then saves the
state as one atomic, checksummed snapshot (``device_state``) and appends the label's face
crop to the kept samples (``samples``).

    device = Device("data/models", "state")     # Device.open(...) + device.recover()
    prediction, uncertainty = device.predict("frame.jpg")
    device.learn("frame.jpg", "happy")   # the embedding is reused from predict

Sync asks the device for what it needs (``kept_embeddings``, ``package_head``) and switches
it to a new package in place (``switch_package``), under the state folder's lock, so every
holder of the object runs the new model from its next call.
"""
from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from .annotation_queue import AnnotationQueue
from .config import DeviceConfig
from .consent import CropOutbox, record_consent
from .device_state import STATE_FORMAT
from .core.head import OnlineHead
from .learner import LearnResult
from .package_runtime import PackageRuntime, embed_crops, load_replay_seed
from .paths import default_model_dir, default_state_dir, model_dir_for
from .prediction import Cached, Prediction, frame_key, source_name
from .core.preprocess import ImageError, ImageSource, Prepared, has_contrast
from .queue_policy import QUEUE, QueuePolicy, QueueSettings
from .core.replay import ReplayBuffer
from .samples import SampleKeeper
from .state import StateStore
from .state_lock import StateLock
from .state_owner import InputError, StateOwner
from .core.uncertainty import Uncertainty

__all__ = ["Device", "DeviceConfig", "InputError", "LearnResult", "Prediction", "STATE_FORMAT", "default_model_dir", "model_dir_for",
           "default_state_dir", "load_replay_seed"]


class Device(StateOwner):
    """A model package plus a state folder: the predictor (this module) on the state it changes
    (``StateOwner``, state_owner.py); thread- and process-safe: each state change holds the
    folder's writer lock and starts from its newest snapshot (``change``, state_lock.py)."""

    def __init__(self, model_dir: str | os.PathLike | None = None, state_dir: str | os.PathLike | None = None,
                 config: DeviceConfig = DeviceConfig(), *, session: Any = None):
        """``Device.open`` then ``recover``: what a device needs after a crash is done before it is used."""
        self._open(model_dir, state_dir, config, session)
        self.recover()

    @classmethod
    def open(cls, model_dir: str | os.PathLike | None = None, state_dir: str | os.PathLike | None = None,
             config: DeviceConfig = DeviceConfig(), *, session: Any = None, recover: bool = True) -> "Device":
        """Open the package and the state folder; ``recover=False`` leaves ``recover`` to the caller."""
        device = cls.__new__(cls)
        device._open(model_dir, state_dir, config, session)
        if recover:
            device.recover()
        return device

    def _open(self, model_dir: str | os.PathLike | None, state_dir: str | os.PathLike | None, config: DeviceConfig,
              session: Any) -> None:
        """Package, stores and the newest snapshot; writes nothing but the consent record ``config`` states."""
        self._queue_policy = QueuePolicy(_queue_settings(config))  # which frames predict(enqueue=True) queues
        self._config = config  # the learner, made below, takes it too
        self._runtime = PackageRuntime.open(model_dir if model_dir is not None else model_dir_for(state_dir), config,
                                            session=session)
        self._epoch = 0  # bumped by every package switch: embeddings of another epoch are not comparable
        self.state_dir = Path(state_dir if state_dir is not None else default_state_dir())
        self.store = StateStore(self.state_dir, keep=config.keep_generations)
        self._writer = StateLock.of(self.state_dir)  # one writer per state folder, across processes (state_lock.py)
        self._lock = threading.RLock()
        self._seen_generation = 0  # the newest snapshot this object loaded or wrote
        self._saved_counters: dict[str, int] = {}  # the counters as that snapshot has them
        self._dirty = False  # changed since that snapshot (beyond prediction counts)
        self._pending_crops: list[tuple[np.ndarray, int]] = []  # consented crops, queued once their label is saved
        self._open_class_stores()
        if config.share_crops is not None:
            record_consent(self.state_dir, config.share_crops)  # False also deletes crops waiting to be sent
        self.outbox = CropOutbox(self.state_dir)  # takes crops only while consent is recorded (checked at each add)
        self._cache: OrderedDict[str, Cached] = OrderedDict()
        self.generation = 0
        self._source = self._load_source()
        self._load_state()

    def _open_class_stores(self) -> None:
        """The stores whose layout follows the package's classes: the queue and the kept face crops."""
        self.queue = AnnotationQueue(self.state_dir / "queue", self.config.queue_max, self.classes)
        # face crops of learned labels, re-embedded when a package with another extractor arrives (kept_embeddings)
        self.samples = SampleKeeper(self.state_dir, per_class=self.config.replay_per_class, n_classes=len(self.classes),
                                    seed=self.config.seed)

    # ---------------------------------------------------------------- what the package and the learner hold (read-only)
    # package (ModelPackage), classes, dim, spec, finder, extractor, extractor_role: the PackageRuntime's;
    # head (OnlineHead), replay (ReplayBuffer), holdout (HoldoutSet), counters, anchor_*: the GuardedLearner's
    package = property(lambda self: self._runtime.package)
    classes = property(lambda self: self._runtime.classes)
    dim = property(lambda self: self._runtime.dim)
    spec = property(lambda self: self._runtime.spec)
    finder = property(lambda self: self._runtime.finder)
    extractor = property(lambda self: self._runtime.extractor)
    extractor_role = property(lambda self: self._runtime.extractor_role)
    head = property(lambda self: self.learner.head)
    replay = property(lambda self: self.learner.replay)
    holdout = property(lambda self: self.learner.holdout)
    counters = property(lambda self: self.learner.counters)
    anchor_weights = property(lambda self: self.learner.anchor_weights)
    anchor_strength = property(lambda self: self.learner.anchor_strength)

    @property
    def config(self) -> DeviceConfig:
        return self._config

    @config.setter
    def config(self, config: DeviceConfig) -> None:
        """A new config applies from the next call on (the learner's and the queue's policies included)."""
        self._config = config
        self._queue_policy.settings = _queue_settings(config)
        self.learner.config = config

    @property
    def source(self) -> ReplayBuffer:
        """Source-domain (adult FER) embeddings replayed next to the caregiver's labels (the package's)."""
        return self._source

    @source.setter
    def source(self, buf: ReplayBuffer) -> None:
        self._source = self.learner.source = buf

    def _load_source(self) -> ReplayBuffer:
        return self._runtime.source(self.config.replay_seed)

    # ---------------------------------------------------------------- predict
    def prepare(self, image: ImageSource, detect: bool | None = None) -> Prepared:
        """Decode, crop and normalise a frame: ``facefinder.prepare`` with this package's face finder."""
        return self._runtime.prepare(image, self.config.detect_faces if detect is None else detect)

    def predict(self, image: ImageSource, *, enqueue: bool = True) -> Prediction:
        """Prediction, probabilities, uncertainty and face flag for one frame."""
        return self.predict_batch([image], enqueue=enqueue)[0]

    def predict_batch(self, images: Sequence[ImageSource], *, enqueue: bool = True) -> list[Prediction]:
        """Several frames with one extractor call; a bad frame raises before anything is recorded."""
        while True:
            runtime, epoch = self._runtime, self._epoch
            keys, preps = [], []
            for i, image in enumerate(images):
                keys.append(frame_key(image))
                try:
                    preps.append(runtime.prepare(image, self.config.detect_faces))
                except ImageError as exc:
                    raise ImageError(f"frame {i}: {exc}" if len(images) > 1 else str(exc)) from exc
            if not preps:
                return []
            emb = runtime.extractor(np.concatenate([p.tensor for p in preps]))
            self.refresh()  # predict with the head another process (sync, the page) may have saved since
            with self._lock:
                if epoch == self._epoch:  # else the package was switched meanwhile: embed again with the new one
                    # the shared head with this camera's own part; frames with a face are evidence of its class mix
                    probs = self.learner.predict_proba(emb, seen=np.array([p.face_found for p in preps], bool))
                    return [self._answer(*args, enqueue) for args in zip(images, keys, preps, emb, probs)]

    def _answer(self, image: ImageSource, key: str, prep: Prepared, e: np.ndarray, p: np.ndarray, enqueue: bool) -> Prediction:
        """One frame's prediction from its embedding and probabilities (the lock held); queued when unsure."""
        self._remember(key, Cached(e, prep.crop, prep.face_found, self._epoch))
        u = Uncertainty.of(p)
        idx = int(np.argmax(p))
        pred = Prediction(self.classes[idx], idx, p, u.score, u.entropy, u.margin, prep.face_found,
                          tuple(int(v) for v in prep.box), key, None, e, self.classes, self._epoch)
        now = time.monotonic()
        if enqueue and self._queue_policy.decide(now, prep.face_found, u.score, e) == QUEUE and has_contrast(prep.crop):
            pred.queued_id = self.queue.add(prep.crop, predicted=pred.label, uncertainty=u.score, probabilities=p.tolist(),
                                            face_found=prep.face_found, source=source_name(image), frame_key=key)
            if pred.queued_id is not None:
                self.counters["queued"] += 1
                self._queue_policy.queued(now, e)
        self.counters["predictions"] += 1
        return pred

    def queue_frame(self, pred: Prediction, source: str = "") -> str | None:
        """Queue a frame predicted with ``enqueue=False`` (a camera loop picks which: ``infantino.edge_runtime.watch``).

        Uses the face crop kept from that prediction; None when it is gone from the recent-frame
        cache, is blank, or the same frame waits already."""
        with self._lock:
            hit = self._cache.get(pred.frame_key)
            if hit is None or not has_contrast(hit.crop):
                return None
            item_id = self.queue.add(hit.crop, predicted=pred.label, uncertainty=pred.uncertainty,
                                     probabilities=[float(p) for p in pred.probabilities], face_found=pred.face_found,
                                     source=source, frame_key=pred.frame_key)
            if item_id is not None:
                pred.queued_id = item_id
                self.counters["queued"] += 1
                self._queue_policy.queued(time.monotonic(), pred.embedding)
            return item_id

    def _remember(self, key: str, entry: Cached) -> None:
        if entry.epoch != self._epoch:
            return  # embedded by a package the device no longer runs
        self._cache[key] = entry
        self._cache.move_to_end(key)
        while len(self._cache) > self.config.cache_size:
            self._cache.popitem(last=False)

    def embed(self, image: ImageSource) -> np.ndarray:
        """The embedding of one frame (from the cache when it was just predicted)."""
        return self._embedded(image).embedding

    def _embedded(self, image: ImageSource) -> Cached:
        """Embedding and crop of one frame, from the recent-frame cache or computed (and cached)."""
        key = frame_key(image)
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None:
            return hit
        runtime, epoch = self._runtime, self._epoch
        prep = runtime.prepare(image, self.config.detect_faces)
        entry = Cached(runtime.extractor(prep.tensor)[0], prep.crop, prep.face_found, epoch)
        with self._lock:
            self._remember(key, entry)
        return entry

    def package_head(self) -> OnlineHead:
        """The package's own (bootstrap) head, the one local learning started from."""
        return OnlineHead.load(self.package.path("head"))

    def runs_package(self, model_dir: str | os.PathLike) -> bool:
        """Whether ``model_dir`` is the package this device runs (the same folder or version)."""
        return self._runtime.runs(model_dir)

    def kept_embeddings(self, model_dir: str | os.PathLike | None = None) -> Optional[tuple[np.ndarray, np.ndarray]]:
        """(embeddings, labels) of the kept labelled samples in the space of ``model_dir``'s extractor:
        the replay buffer and holdout for this package, the kept face crops re-embedded by that
        package's extractor for another one; None when there are none."""
        if model_dir is None or self.runs_package(model_dir):
            with self._lock:
                return self.learner.kept()
        crops, labels = self.kept_samples()
        if not len(labels):
            return None
        return embed_crops(model_dir, crops, self.config), labels

    def switch_package(self, model_dir: str | os.PathLike, *, head: OnlineHead | None = None,
                       replay: Optional[tuple[np.ndarray, np.ndarray]] = None, session: Any = None) -> None:
        """Run ``model_dir``'s package from now on, in place, under the state folder's lock: every holder of
        this object predicts and learns with it from its next call. The state is the newest snapshot when
        it is of that package, else the package's own head; ``replay`` refills the replay buffer, ``head``
        is adopted, and the state saved. Nothing changes when the package or ``head`` does not fit."""
        runtime = PackageRuntime.open(model_dir, self.config, session=session)
        if head is not None:
            self._check_head(head, runtime.classes, runtime.dim)
        with self._lock, self._writer.hold():
            camera = self.learner.camera  # the camera's own part travels to the new package (personal.py)
            self._runtime, self._epoch = runtime, self._epoch + 1
            self._cache.clear()
            self._pending_crops, self._dirty = [], False  # unsaved learning of the old package cannot follow
            self._open_class_stores()
            self._source = self._load_source()
            self._load_state()
            carried = camera.carried_to(len(self.classes), self.dim)
            if carried is not None and not self.learner.camera.n_labels:
                self.learner.camera = carried
            self.recover()
            if replay is not None:
                self.learner.refill(*replay)
                if self.config.personalize and self.learner.camera.n_labels:
                    self.learner.camera.refresh(self.learner.predicting_head, self.learner.kept())
            if head is not None:
                self.adopt_head(head, save=True)


def _queue_settings(config: DeviceConfig) -> QueueSettings:
    """``predict(enqueue=True)``'s queue policy: any unsure frame, face or not, one per ``queue_min_interval_s``."""
    return QueueSettings(every_s=config.queue_min_interval_s, min_uncertainty=config.uncertainty_threshold,
                         duplicate_cosine=None, faces_only=False)
