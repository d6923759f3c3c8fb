"""``StateOwner``: the state a ``Device`` changes, and every way it changes it.

The learner (head, replay, holdout, counters, the camera's own part), the annotation queue
and the kept face crops live in the device's state folder. Each change holds the folder's
writer lock (``state_lock``) and starts from the newest snapshot (``change``), so two
processes on one folder never save over each other's labels; ``save`` writes the next
snapshot (``device_state``, ``state.StateStore``); ``refresh`` picks up another process's
save before a frame is predicted; ``recover`` finishes what a crash left.

``Device`` (``device.py``) is the predictor on top: it opens the package and the folder and
sets the attributes this class works on (``_lock``, ``_writer``, ``store``, ``learner``,
``queue``, ``samples``, ``outbox``, ``_runtime`` and its ``_epoch``, the recent-frame cache);
the calls here reach back for the package and the settings (``package``, ``classes``, ``dim``,
``extractor``, ``spec``, ``config``, ``_source``) and for a frame's embedding (``_cache``,
``_embedded``), nothing else of the predictor.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator, Optional

import numpy as np

from .annotation_queue import QueueError
from .device_state import apply_snapshot, learner_arrays, learner_meta, of_another_package
from .core.head import OnlineHead
from .learner import GuardedLearner, LearnResult
from .prediction import Learnable, Prediction
from .core.preprocess import face_tensor, has_contrast, require_contrast
from .rollback import undo_on_failure
from .state import StateConflict

log = logging.getLogger("infantino.edge_runtime.device")


class InputError(ValueError):
    """A label or embedding the device cannot learn from; one line, nothing changed."""


class StateOwner:
    """The learning state of a ``Device``: load, refresh, change, save, recover; learn, resolve,
    dismiss, adopt. Thread- and process-safe: each change holds the folder's writer lock."""

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

    def _stale(self, *, by_stamp: bool = False) -> bool:
        """Another process (or another ``Device`` object) saved this folder since this object last read or wrote it
        (``by_stamp``: one stat of the folder when it has not changed, ``StateStore.latest_generation``)."""
        return self.store.latest_generation(by_stamp=by_stamp) > self._seen_generation

    def refresh(self) -> bool:
        """Load the newest snapshot when another process saved one since; True if it did.

        Cheap when nothing changed (one stat of the folder): a camera asks before every frame.
        Prediction counts made since the last save are kept. A device with unsaved learning
        (``autosave`` off) keeps it and does not reload; its next change or ``save`` refuses
        with ``StateConflict``.
        """
        if not self._stale(by_stamp=True):
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

    def kept_samples(self) -> tuple[list[np.ndarray], np.ndarray]:
        """The kept face crops of learned labels (uint8) and their class indices."""
        with self._lock:
            return self.samples.all()
