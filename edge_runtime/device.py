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

import contextlib
import logging
import os
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from .annotation_queue import AnnotationQueue, QueueError
from .config import DeviceConfig, default_model_dir, default_state_dir, model_dir_for
from .consent import CropOutbox, record_consent
from .device_state import STATE_FORMAT, apply_snapshot, learner_arrays, learner_meta, of_another_package
from .head import OnlineHead
from .learner import GuardedLearner, LearnResult
from .package_runtime import PackageRuntime, embed_crops, load_replay_seed
from .prediction import Cached, Learnable, Prediction, frame_key, source_name
from .preprocess import ImageError, ImageSource, Prepared, face_tensor, has_contrast, require_contrast
from .replay import ReplayBuffer
from .rollback import undo_on_failure
from .samples import SampleKeeper
from .state import StateConflict, StateStore
from .state_lock import StateLock
from .uncertainty import Uncertainty

__all__ = ["Device", "DeviceConfig", "InputError", "LearnResult", "Prediction", "STATE_FORMAT", "default_model_dir", "model_dir_for",
           "default_state_dir", "load_replay_seed"]
log = logging.getLogger(__name__)


class InputError(ValueError):
    """A label or embedding the device cannot learn from; one line, nothing changed."""


class Device:
    """A model package plus a state folder; thread- and process-safe: each state change holds the
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
        self.config = config
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
        self._last_queued = float("-inf")
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

    def recover(self) -> None:
        """Finish what a crash (or an older version) left: learn the queue labels given just before it that
        the saved state has not seen, and move kept crops from ``samples.npz`` to their append-only log."""
        with self.change():
            self.samples.migrate()
            for item in self.queue.resolved():
                if item.id in self.learner.learned_queue_ids:
                    self.queue.remove(item.id, keep_label=True)
                elif not has_contrast(self.queue.crop(item.id)):
                    log.warning("queued frame %s is blank: dropped without learning", item.id)
                    self.queue.remove(item.id, keep_label=True)
                else:
                    self._learn_queued(item.id, str(item.label))

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
        """A new config applies from the next call on (the learner's policy included)."""
        self._config = config
        if "learner" in self.__dict__:
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

    # ---------------------------------------------------------------- state
    def _fresh_state(self) -> None:
        """The package's own head, empty buffers and counters (the learner before any snapshot)."""
        self.learner = GuardedLearner(self._runtime.head(), self.config, self._source)

    def _load_state(self) -> None:
        """The newest snapshot, read under the folder's writer lock (never half of another process's save)."""
        with self._lock, self._writer.hold():
            self._fresh_state()
            self._saved_counters = dict(self.counters)
            snap = self.store.load()
            if snap is None:
                return
            self._seen_generation = snap.generation
            if of_another_package(snap, self.package.version):
                log.warning("state was learned on model package %s, this is %s: starting from the new package's head",
                            snap.meta.get("package_version"), self.package.version)
                return
            self._apply(snap)
            self.samples.reload()

    def _apply(self, snap: Any) -> None:
        apply_snapshot(self.learner, snap)
        self._saved_counters = dict(self.counters)
        self.generation = self._seen_generation = snap.generation
        self._dirty = False

    def _stale(self) -> bool:
        """Another process (or another ``Device`` object) saved this folder since this object last read or wrote it."""
        return self.store.latest_generation() > self._seen_generation

    def refresh(self) -> bool:
        """Load the newest snapshot when another process saved one since; True if it did.

        Cheap when nothing changed (a folder listing). Prediction counts made since the last
        save are kept. A device with unsaved learning (``autosave`` off) keeps it and does
        not reload; its next change or ``save`` refuses with ``StateConflict``.
        """
        if not self._stale():
            return False
        with self._lock, self._writer.hold():
            if self._dirty:
                return False
            return self._reload()

    def _reload(self) -> bool:
        """Under the writer lock: the newest snapshot, plus this object's unsaved prediction counts."""
        snap = self.store.load()
        if snap is None or snap.generation <= self._seen_generation:
            return False
        if snap.meta.get("package_version") != self.package.version:
            raise StateConflict(f"another process moved {self.state_dir} to model package {snap.meta.get('package_version')} "
                                f"(this device runs {self.package.version}): reopen the device")
        unsaved = {k: self.counters.get(k, 0) - self._saved_counters.get(k, 0) for k in ("predictions", "queued")}
        pool = self.learner.camera.pool  # the frames this process saw: newer than any other process's save
        self._apply(snap)
        if len(pool):
            self.learner.camera.pool = pool
        for k, n in unsaved.items():
            self.counters[k] = self.counters.get(k, 0) + n
        self.samples.reload()
        return True

    @contextlib.contextmanager
    def change(self) -> Iterator[None]:
        """One read-modify-write of the state: the folder's writer lock for the change only, with this
        object at the newest snapshot first, so no process saves over another's labels (state_lock.py).

        A camera loop or a page learns through ``learn`` / ``resolve`` / ``adopt_head``, which
        use this; code that changes the state itself wraps the change and its ``save`` in it.
        """
        with self._lock, self._writer.hold():
            if self._stale():
                if self._dirty:
                    raise StateConflict(f"another process saved {self.state_dir} while this device held unsaved changes "
                                        "(autosave off): they cannot be merged, reopen the device")
                self._reload()
            yield

    def _meta(self) -> dict[str, Any]:
        return learner_meta(self.learner, package_version=self.package.version, extractor_role=self.extractor_role)

    def save(self) -> int:
        """Write the whole state as the next snapshot generation (atomic, checksummed), then append the
        new kept crops, then queue the consented crops of the labels it holds: never a crop for a label
        the state could still lose. Refuses (``StateConflict``) to write unsaved changes over a snapshot
        another process saved meanwhile."""
        with self.change():
            self.generation = self._seen_generation = self.store.save(learner_arrays(self.learner), self._meta())
            self._saved_counters, self._dirty = dict(self.counters), False
            try:  # the labels are durable now: crops that cannot be written (a full disk) wait for the next save
                self.samples.save()  # appends only the crops kept since the last save (nothing when there are none)
                while self._pending_crops:
                    self.outbox.add(*self._pending_crops[0])  # only while consent is recorded (checked at each add)
                    self._pending_crops.pop(0)
            except OSError as exc:
                log.warning("state saved, but kept face crops were not (retried at the next save): %s", exc)
            return self.generation

    def status(self) -> dict[str, Any]:
        """Versions, counters and sizes, for the CLI and a status page."""
        with self._lock:
            return {"model_dir": str(self.package.folder), "state_dir": str(self.state_dir), **self._meta(),
                    "generation": self.generation, "replay": len(self.replay), "holdout": len(self.holdout),
                    "queue": len(self.queue), "camera": self.learner.camera.summary(self.classes)}

    # ---------------------------------------------------------------- predict
    def prepare(self, image: ImageSource, detect: bool | None = None) -> Prepared:
        """Decode, crop and normalise a frame: ``preprocess.prepare`` with this package's face finder."""
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
                    probs = self.learner.predict_proba(emb)  # the shared head with this camera's own adaptation
                    for prep, e in zip(preps, emb):
                        if prep.face_found:
                            self.learner.observe(e)  # evidence of this camera's class mix
                    return [self._answer(*args, enqueue) for args in zip(images, keys, preps, emb, probs)]

    def _answer(self, image: ImageSource, key: str, prep: Prepared, e: np.ndarray, p: np.ndarray, enqueue: bool) -> Prediction:
        """One frame's prediction from its embedding and probabilities (the lock held); queued when unsure."""
        self._remember(key, Cached(e, prep.crop, prep.face_found, self._epoch))
        u = Uncertainty.of(p)
        idx = int(np.argmax(p))
        pred = Prediction(self.classes[idx], idx, p, u.score, u.entropy, u.margin, prep.face_found,
                          tuple(int(v) for v in prep.box), key, None, e, self.classes, self._epoch)
        if enqueue and u.score >= self.config.uncertainty_threshold and self._queue_open() and has_contrast(prep.crop):
            pred.queued_id = self.queue.add(prep.crop, predicted=pred.label, uncertainty=u.score, probabilities=p.tolist(),
                                            face_found=prep.face_found, source=source_name(image), frame_key=key)
            if pred.queued_id is not None:
                self.counters["queued"] += 1
                self._last_queued = time.monotonic()
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
                self._last_queued = time.monotonic()
            return item_id

    def _queue_open(self) -> bool:
        interval = self.config.queue_min_interval_s
        return interval <= 0 or time.monotonic() - self._last_queued >= interval

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

    # ---------------------------------------------------------------- learn
    def label_index(self, label: str | int) -> int:
        if isinstance(label, str) and label in self.classes:
            return self.classes.index(label)
        if isinstance(label, (int, np.integer)) and not isinstance(label, bool) and 0 <= int(label) < len(self.classes):
            return int(label)
        raise InputError(f"unknown label {label!r}; expected one of {', '.join(self.classes)}")

    def _learnable(self, item: Learnable | np.ndarray) -> tuple[np.ndarray, Optional[np.ndarray], int]:
        """(embedding, face crop or None, package epoch) of what a caregiver labelled; a blank crop is refused."""
        if isinstance(item, np.ndarray) and item.ndim == 1:
            return self._check_embedding(item), None, self._epoch
        if isinstance(item, Prediction):
            with self._lock:
                hit = self._cache.get(item.frame_key)
            epoch = self._epoch if item.epoch < 0 else item.epoch
            x, crop = self._check_embedding(item.embedding), hit.crop if hit is not None else None
        else:
            hit = self._embedded(item)
            x, crop, epoch = hit.embedding, hit.crop, hit.epoch
        if crop is not None:
            require_contrast(crop)
        return x, crop, epoch

    def _check_embedding(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if x.shape != (self.dim,):
            raise InputError(f"embedding of shape {x.shape} does not match this package's {self.dim}-d embeddings")
        if not np.all(np.isfinite(x)):
            raise InputError("embedding holds NaN or infinite values")
        return x

    def learn(self, item: Learnable | np.ndarray, label: str | int, *, save: bool | None = None) -> LearnResult:
        """One guarded update from a caregiver's label of a frame (path, bytes, PIL, array),
        a ``Prediction`` or a 1-D embedding. Saves the state unless ``autosave`` is off."""
        y = self.label_index(label)
        x, crop, epoch = self._learnable(item)  # decode and embed outside the writer lock
        saving = self.config.autosave if save is None else save
        with self.change(), undo_on_failure(self, enabled=saving):  # a label whose save fails is neither counted nor learned later
            if epoch != self._epoch:  # the package was switched meanwhile
                if isinstance(item, Prediction):
                    raise StateConflict(f"this frame was predicted on another model package; the device now runs "
                                        f"{self.package.version}: predict it again")
                x, crop, _ = self._learnable(item)
            result = self._update(x, y)
            if crop is not None and (result.updated or result.held_out):
                self._keep_crop(crop, y)
            if saving:
                self.save()
            return result

    def _update(self, x: np.ndarray, y: int) -> LearnResult:
        self._dirty = True
        return self.learner.learn(x, y)

    def _keep_crop(self, crop: np.ndarray, y: int) -> None:
        """Keep the face crop of a learned frame: for re-embedding (appended with the next snapshot)
        and, with consent, for upload (queued right after that snapshot, see ``save``)."""
        self.samples.add(crop, y, save=False)
        self._pending_crops.append((crop, y))

    # ---------------------------------------------------------------- annotation queue
    def resolve(self, item_id: str, label: str) -> LearnResult | None:
        """A caregiver labels a queued frame: learn it once; None if it was already labelled."""
        self.label_index(label)
        with self.change():  # label file, learning and snapshot as one change: no other process learns it too
            self._refuse_blank_queued(item_id)
            _, first = self.queue.resolve(item_id, label)
            if not first:  # labelled before (a second caregiver, a retried request): counted once
                return None
            with undo_on_failure(self, also=lambda: self.queue.unresolve(item_id)):  # not saved: back in the queue
                return self._learn_queued(item_id, label)

    def _refuse_blank_queued(self, item_id: str) -> None:
        """A blank queued crop (queued before blank frames were kept out) is refused before its label is recorded."""
        try:
            crop = self.queue.crop(item_id)
        except QueueError:
            return  # unknown, or learned already (a tombstone): resolve says which
        require_contrast(crop, "queued face crop")

    def _learn_queued(self, item_id: str, label: str) -> LearnResult:
        crop = self.queue.crop(item_id)
        y = self.label_index(label)
        emb = self.extractor(face_tensor(crop, self.spec))[0]
        result = self._update(emb, y)
        if result.updated or result.held_out:
            self._keep_crop(crop, y)
        self.counters["from_queue"] += 1
        self.learner.learned_queue_ids = (self.learner.learned_queue_ids + [item_id])[-100:]
        self.save()
        self.queue.remove(item_id, keep_label=True)
        return result

    def dismiss(self, item_id: str) -> bool:
        """"Not a face": the frame leaves the queue unlearned; False if it was labelled already."""
        with self.change():
            if self.queue.get(item_id).label is not None:  # QueueError for an unknown id
                return False
            self.queue.remove(item_id)
            return True

    # ---------------------------------------------------------------- what sync asks
    def adopt_head(self, head: OnlineHead, *, save: bool | None = None) -> None:
        """Replace the head (e.g. a refreshed one from the sync server); replay and holdout stay.
        Saves unless ``autosave`` is off (``save`` decides when given)."""
        self._check_head(head, self.classes, self.dim)
        with self.change(), undo_on_failure(self):
            self.learner.adopt(head)  # learning now stays close to the adopted head
            self._dirty = True
            if self.config.autosave if save is None else save:
                self.save()

    @staticmethod
    def _check_head(head: OnlineHead, classes: tuple[str, ...], dim: int) -> None:
        if head.classes != classes or head.input_dim != dim:
            raise InputError("head does not match this package's classes or embedding size")

    def package_head(self) -> OnlineHead:
        """The package's own (bootstrap) head, the one local learning started from."""
        return OnlineHead.load(self.package.path("head"))

    def runs_package(self, model_dir: str | os.PathLike) -> bool:
        """Whether ``model_dir`` is the package this device runs (the same folder or version)."""
        return self._runtime.runs(model_dir)

    def kept_samples(self) -> tuple[list[np.ndarray], np.ndarray]:
        """The kept face crops of learned labels (uint8) and their class indices."""
        with self._lock:
            return self.samples.all()

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
            self._runtime, self._epoch = runtime, self._epoch + 1
            self._cache.clear()
            self._pending_crops, self._dirty = [], False  # unsaved learning of the old package cannot follow
            self._open_class_stores()
            self._source = self._load_source()
            self._load_state()
            self.recover()
            if replay is not None:
                self.learner.refill(*replay)
            if head is not None:
                self.adopt_head(head, save=True)
