"""``Device``: what runs on the camera. Predict expressions, learn from caregivers, never lose it.

A device opens a verified model package and a state folder. ``predict`` decodes a frame,
crops the face, embeds it with ONNX Runtime and asks the head; frames the head is unsure
about go to the annotation queue. ``learn`` takes the caregiver's label and makes one
guarded update of the head, mixing in a class-balanced replay of earlier answers so the
new one does not overwrite the old ones, and saves the whole state as one atomic,
checksummed snapshot.

    device = Device("data/models", "state")
    prediction, uncertainty = device.predict("frame.jpg")
    device.learn("frame.jpg", "happy")   # the embedding is reused from predict
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
from PIL import Image

from .annotation_queue import DEFAULT_MAX_ITEMS, AnnotationQueue, QueueError
from .consent import CropOutbox, record_consent
from .extractor import DEFAULT_THREADS, Extractor
from .head import HeadFormatError, OnlineHead
from .package import ModelPackage, PackageError, open_package
from .facefinder import FaceFinder, uses_blazeface
from .preprocess import ImageError, ImageSource, PreprocessSpec, Prepared, face_tensor, has_contrast, prepare, require_contrast
from .replay import HoldoutSet, ReplayBuffer
from .samples import SampleKeeper
from .state import StateConflict, StateError, StateStore
from .state_lock import StateLock
from .uncertainty import DEFAULT_THRESHOLD, Uncertainty

STATE_FORMAT = "infantino-device-state/1"
log = logging.getLogger(__name__)


class InputError(ValueError):
    """A label or embedding the device cannot learn from; one line, nothing changed."""


def default_model_dir() -> Path:
    """``$INFANTINO_MODEL_DIR``, else ``./data/models``, else the repository's ``data/models``."""
    env = os.environ.get("INFANTINO_MODEL_DIR")
    if env:
        return Path(env)
    here = Path("data/models")
    return here if here.is_dir() else Path(__file__).resolve().parents[1] / "data" / "models"


def _model_dir_for(state_dir: str | os.PathLike | None) -> Path:
    """The package ``infantino-edge sync`` installed for this state folder, else ``default_model_dir()``."""
    managed = Path(state_dir if state_dir is not None else default_state_dir()) / "sync" / "packages" / "current"
    return managed if managed.exists() else default_model_dir()


def default_state_dir() -> Path:
    """``$INFANTINO_STATE_DIR``, else ``~/.infantino-edge/state``."""
    return Path(os.environ.get("INFANTINO_STATE_DIR") or Path.home() / ".infantino-edge" / "state")


@dataclass(frozen=True)
class DeviceConfig:
    """Settings of one device; the learning defaults were chosen by measurement (docs/edge.md)."""

    threads: int = DEFAULT_THREADS  # ONNX Runtime intra-op threads
    precision: str = "auto"  # "int8", "fp32", or "auto" (int8 when the package has it)
    detect_faces: bool = True
    detect_max_side: int | None = None  # Haar runs on a copy this size; None: the manifest's (320)
    detect_coarse_side: int | None = 160  # look for a face at this size first, then at detect_max_side; None: one pass
    uncertainty_threshold: float = DEFAULT_THRESHOLD  # frames scoring >= this are queued
    queue_max: int = DEFAULT_MAX_ITEMS
    queue_min_interval_s: float = 0.0  # a camera loop should set e.g. 10: one queued frame per interval at most
    replay_per_class: int = 32  # reservoir slots per class
    replay_mix: int = 8  # replayed caregiver labels in each update
    source_mix: int = 16  # replayed source-domain (adult FER) embeddings per update, when the package has them
    replay_seed: str | None = None  # npz of source-domain embeddings (x, y); default: the package's replay_seed role
    anchor_strength: float | None = None  # L2-SP pull toward the starting head; None: 1.0 without source replay, else 0
    new_weight: float = 4.0  # weight of the new label against one replayed sample
    learn_steps: int = 1  # Adam steps per update
    learning_rate: float | None = None  # None: the head's own learning_rate_init
    holdout_per_class: int = 3  # labels per class kept back for the guard
    holdout_every: int = 5  # every n-th label goes to the holdout
    guard_min_holdout: int = 7  # the guard judges once it holds this many labels
    guard_tolerance: float = 0.05  # holdout mean log-loss rise that counts as "clearly worse"
    cache_size: int = 16  # recent frames whose embedding learn() can reuse
    autosave: bool = True  # save the state after every learn
    keep_generations: int = 3
    share_crops: bool | None = None  # consent to upload labelled face crops at sync; None: as recorded in the state folder (off unless given)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.precision not in ("auto", "int8", "fp32"):
            raise ValueError(f"precision must be auto, int8 or fp32, not {self.precision!r}")
        if self.learn_steps < 1 or min(self.replay_mix, self.source_mix, self.replay_per_class, self.holdout_per_class) < 0:
            raise ValueError("learn_steps must be >= 1 and buffer sizes >= 0")
        if not 0.0 <= self.uncertainty_threshold <= 1.0:
            raise ValueError("uncertainty_threshold must be in [0, 1]")


@dataclass
class Prediction:
    """One frame's answer. Unpacks like the seed's API: ``label, uncertainty = prediction``."""

    label: str
    index: int
    probabilities: np.ndarray  # float32, in ``classes`` order
    uncertainty: float
    entropy: float
    margin: float
    face_found: bool
    box: tuple[int, int, int, int]
    frame_key: str
    queued_id: str | None = None
    embedding: np.ndarray = field(default=None, repr=False)  # type: ignore[assignment]
    classes: tuple[str, ...] = field(default=(), repr=False)

    def __iter__(self) -> Iterator[Any]:
        return iter((self.label, self.uncertainty))

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "probabilities": {c: round(float(p), 6) for c, p in zip(self.classes, self.probabilities)},
                "uncertainty": round(self.uncertainty, 6), "entropy": round(self.entropy, 6), "margin": round(self.margin, 6),
                "face_found": self.face_found, "box": list(self.box), "queued_id": self.queued_id}


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


@dataclass
class _Cached:
    embedding: np.ndarray
    crop: np.ndarray
    face_found: bool


Learnable = Union[ImageSource, Prediction]


class Device:
    """A model package plus a state folder; thread- and process-safe: each state change holds the
    folder's writer lock and starts from its newest snapshot (``change``, state_lock.py)."""

    def __init__(self, model_dir: str | os.PathLike | None = None, state_dir: str | os.PathLike | None = None,
                 config: DeviceConfig = DeviceConfig(), *, session: Any = None):
        self.config = config
        self.package: ModelPackage = open_package(model_dir if model_dir is not None else _model_dir_for(state_dir))
        manifest = self.package.manifest
        self.classes: tuple[str, ...] = tuple(manifest.classes)
        self.spec = _device_spec(manifest.preprocess, config)
        self.finder = FaceFinder.for_package(self.package, self.spec, threads=1)
        self.extractor_role = self._extractor_role()
        self.extractor = Extractor(self.package.path(self.extractor_role), threads=config.threads, session=session,
                                   flip_average=self.spec.flip_average)
        if self.extractor.dim is not None and self.extractor.dim != manifest.embedding_dim:
            raise PackageError(f"extractor gives {self.extractor.dim}-d embeddings, the manifest says {manifest.embedding_dim}")
        self.dim = manifest.embedding_dim
        self.state_dir = Path(state_dir if state_dir is not None else default_state_dir())
        self.store = StateStore(self.state_dir, keep=config.keep_generations)
        self._writer = StateLock.of(self.state_dir)  # one writer per state folder, across processes (state_lock.py)
        self._seen_generation = 0  # the newest snapshot this object loaded or wrote
        self._saved_counters: dict[str, int] = {}  # the counters as that snapshot has them
        self._dirty = False  # changed since that snapshot (beyond prediction counts)
        self._pending_crops: list[tuple[np.ndarray, int]] = []  # consented crops, queued once their label is saved
        self.queue = AnnotationQueue(self.state_dir / "queue", config.queue_max, self.classes)
        # face crops of learned labels, re-embedded by sync when a new extractor arrives (sync_client)
        self.samples = SampleKeeper(self.state_dir, per_class=config.replay_per_class, n_classes=len(self.classes), seed=config.seed)
        self._samples_dirty = False
        if config.share_crops is not None:
            record_consent(self.state_dir, config.share_crops)  # False also deletes crops waiting to be sent
        self.outbox = CropOutbox(self.state_dir)  # takes crops only while consent is recorded (checked at each add)
        self._last_queued = float("-inf")
        self._lock = threading.RLock()
        self._cache: OrderedDict[str, _Cached] = OrderedDict()
        self.generation = 0
        self.source = self._load_source()
        self._load_state()
        self._learn_resolved_queue()

    # ---------------------------------------------------------------- state
    def _extractor_role(self) -> str:
        want = self.config.precision
        if want == "auto":
            return "extractor_int8" if self.package.has("extractor_int8") else "extractor"
        role = "extractor_int8" if want == "int8" else "extractor"
        if not self.package.has(role):
            raise PackageError(f"package {self.package.folder} has no {want} extractor")
        return role

    def _load_source(self) -> ReplayBuffer:
        """Source-domain (adult FER) embeddings replayed next to the caregiver's labels, so the
        head keeps what it knew about adult faces; fixed, part of the package, not of the state."""
        path = self.config.replay_seed or (self.package.path("replay_seed") if self.package.has("replay_seed") else None)
        if path is None:
            return ReplayBuffer(len(self.classes), self.dim, 0)
        try:
            x, y = load_replay_seed(path)
        except (OSError, KeyError, ValueError) as exc:
            raise PackageError(f"replay seed {Path(path).name}: {exc}") from exc
        if x.shape[1] != self.dim or y.max(initial=0) >= len(self.classes):
            raise PackageError(f"replay seed {Path(path).name} does not fit {self.dim}-d embeddings of {len(self.classes)} classes")
        buf = ReplayBuffer(len(self.classes), self.dim, int(np.bincount(y, minlength=len(self.classes)).max(initial=0)))
        rng = np.random.default_rng(0)
        for xi, yi in zip(x, y):
            buf.add(xi, int(yi), rng)
        return buf

    def _fresh_state(self) -> None:
        try:
            self.head = OnlineHead.load(self.package.path("head"))
        except HeadFormatError as exc:
            raise PackageError(f"package head: {exc}") from exc
        if self.head.classes != self.classes or self.head.input_dim != self.dim:
            raise PackageError("package head does not match the manifest's classes or embedding size")
        self.anchor_weights = [w.copy() for w in self.head.weights()]
        n, c = len(self.classes), self.config
        self.replay = ReplayBuffer(n, self.dim, c.replay_per_class)
        self.holdout = HoldoutSet(n, self.dim, c.holdout_per_class)
        self.counters: dict[str, int] = {k: 0 for k in ("predictions", "queued", "labels", "updates", "rollbacks", "held_out", "from_queue", "adopted")}
        self.learned_queue_ids: list[str] = []

    def _load_state(self) -> None:
        """The newest snapshot, read under the folder's writer lock (never half of another process's save)."""
        with self._lock, self._writer.hold():
            self._fresh_state()
            self._saved_counters = dict(self.counters)
            snap = self.store.load()
            if snap is None:
                return
            self._seen_generation = snap.generation
            if snap.meta.get("format") == STATE_FORMAT and snap.meta.get("package_version") != self.package.version:
                log.warning("state was learned on model package %s, this is %s: starting from the new package's head",
                            snap.meta.get("package_version"), self.package.version)
                return
            self._apply_snapshot(snap)
            self.samples.reload()

    def _apply_snapshot(self, snap: Any) -> None:
        """Head, buffers, counters and queue bookkeeping from one verified snapshot of this package."""
        meta = snap.meta
        if meta.get("format") != STATE_FORMAT:
            raise StateError(f"{snap.path.name}: unknown state format {meta.get('format')!r}")
        try:
            head = OnlineHead.from_bytes(snap.arrays["head_npz"].tobytes())
            replay = ReplayBuffer.from_arrays(snap.arrays)
            holdout = HoldoutSet.from_arrays(snap.arrays)
        except (KeyError, ValueError) as exc:
            raise StateError(f"{snap.path.name}: {exc}") from exc
        if head.input_dim != self.dim or replay.dim != self.dim or head.classes != self.classes:
            raise StateError(f"{snap.path.name}: state does not fit this package's embedding size or classes")
        if replay.per_class != self.config.replay_per_class or holdout.x.shape[1] != self.config.holdout_per_class:
            replay, holdout = _resize(replay, self.config.replay_per_class, self.config.seed), _resize_holdout(holdout, self.config.holdout_per_class)
        anchor = [np.asarray(snap.arrays[f"anchor_{i}"], np.float64) for i in range(len(head.weights())) if f"anchor_{i}" in snap.arrays]
        if anchor and [a.shape for a in anchor] == [w.shape for w in head.weights()]:
            self.anchor_weights = anchor
        self.head, self.replay, self.holdout = head, replay, holdout
        self.counters.update({k: int(v) for k, v in meta.get("counters", {}).items()})
        self._saved_counters = dict(self.counters)
        self.learned_queue_ids = [str(i) for i in meta.get("learned_queue_ids", [])]
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
        self._apply_snapshot(snap)
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
        return {
            "format": STATE_FORMAT, "package_version": self.package.version, "head_version": self.head.version,
            "extractor": self.extractor_role, "source_samples": len(self.source), "counters": dict(self.counters),
            "learned_queue_ids": self.learned_queue_ids[-100:], "saved_at": time.time(),
        }

    def save(self) -> int:
        """Write the whole state as the next snapshot generation (atomic, checksummed), then the kept
        crops, then queue the consented crops of the labels it holds: never a crop for a label the
        state could still lose. Refuses (``StateConflict``) to write unsaved changes over a snapshot
        another process saved meanwhile."""
        with self.change():
            arrays = {"head_npz": np.frombuffer(self.head.to_bytes(), np.uint8), **self.replay.to_arrays(), **self.holdout.to_arrays(),
                      **{f"anchor_{i}": a for i, a in enumerate(self.anchor_weights)}}
            self.generation = self._seen_generation = self.store.save(arrays, self._meta())
            self._saved_counters, self._dirty = dict(self.counters), False
            if self._samples_dirty:
                self.samples.save()
                self._samples_dirty = False
            pending, self._pending_crops = self._pending_crops, []
            for crop, y in pending:
                self.outbox.add(crop, y)  # only while consent is recorded (checked at each add)
            return self.generation

    def status(self) -> dict[str, Any]:
        """Versions, counters and sizes, for the CLI and a status page."""
        with self._lock:
            return {"model_dir": str(self.package.folder), "state_dir": str(self.state_dir), **self._meta(),
                    "generation": self.generation, "replay": len(self.replay), "holdout": len(self.holdout),
                    "queue": len(self.queue)}

    # ---------------------------------------------------------------- predict
    def _key(self, image: ImageSource) -> str:
        """A content key for the embedding cache: the same frame gives the same key."""
        h = hashlib.blake2b(digest_size=16)
        if isinstance(image, (str, os.PathLike)):
            try:
                st = os.stat(image)
            except OSError:
                raise ImageError(f"no such image file: {image}") from None
            h.update(f"path:{os.path.abspath(image)}:{st.st_size}:{st.st_mtime_ns}".encode())
        elif isinstance(image, (bytes, bytearray, memoryview)):
            h.update(b"bytes:")
            h.update(image)
        elif isinstance(image, np.ndarray):
            h.update(f"array:{image.shape}:{image.dtype}:".encode())
            h.update(np.ascontiguousarray(image).data)
        elif isinstance(image, Image.Image):
            h.update(f"pil:{image.mode}:{image.size}:".encode())
            h.update(image.tobytes())
        else:
            raise ImageError(f"cannot read an image from a {type(image).__name__}")
        return h.hexdigest()

    def prepare(self, image: ImageSource, detect: bool | None = None) -> Prepared:
        """Decode, crop and normalise a frame: ``preprocess.prepare`` with this package's face finder."""
        detect = self.config.detect_faces if detect is None else detect
        return prepare(image, self.spec, detect=detect, finder=self.finder)

    def predict(self, image: ImageSource, *, enqueue: bool = True) -> Prediction:
        """Prediction, probabilities, uncertainty and face flag for one frame."""
        return self.predict_batch([image], enqueue=enqueue)[0]

    def predict_batch(self, images: Sequence[ImageSource], *, enqueue: bool = True) -> list[Prediction]:
        """Several frames with one extractor call; a bad frame raises before anything is recorded."""
        keys, preps = [], []
        for i, image in enumerate(images):
            keys.append(self._key(image))
            try:
                preps.append(self.prepare(image))
            except ImageError as exc:
                raise ImageError(f"frame {i}: {exc}" if len(images) > 1 else str(exc)) from exc
        if not preps:
            return []
        emb = self.extractor(np.concatenate([p.tensor for p in preps]))
        self.refresh()  # predict with the head another process (sync, the page) may have saved since
        with self._lock:
            probs = self.head.predict_proba(emb)
            out = []
            for image, key, prep, e, p in zip(images, keys, preps, emb, probs):
                self._remember(key, _Cached(e, prep.crop, prep.face_found))
                u = Uncertainty.of(p)
                idx = int(np.argmax(p))
                pred = Prediction(self.classes[idx], idx, p, u.score, u.entropy, u.margin, prep.face_found,
                                  tuple(int(v) for v in prep.box), key, None, e, self.classes)
                if enqueue and u.score >= self.config.uncertainty_threshold and self._queue_open() and has_contrast(prep.crop):
                    pred.queued_id = self.queue.add(prep.crop, predicted=pred.label, uncertainty=u.score, probabilities=p.tolist(),
                                                    face_found=prep.face_found, source=_source_name(image), frame_key=key)
                    if pred.queued_id is not None:
                        self.counters["queued"] += 1
                        self._last_queued = time.monotonic()
                self.counters["predictions"] += 1
                out.append(pred)
        return out

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

    def _remember(self, key: str, entry: _Cached) -> None:
        self._cache[key] = entry
        self._cache.move_to_end(key)
        while len(self._cache) > self.config.cache_size:
            self._cache.popitem(last=False)

    def embed(self, image: ImageSource) -> np.ndarray:
        """The embedding of one frame (from the cache when it was just predicted)."""
        return self._embedded(image).embedding

    def _embedded(self, image: ImageSource) -> _Cached:
        """Embedding and crop of one frame, from the recent-frame cache or computed (and cached)."""
        key = self._key(image)
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None:
            return hit
        prep = self.prepare(image)
        entry = _Cached(self.extractor(prep.tensor)[0], prep.crop, prep.face_found)
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

    def _learnable(self, item: Learnable | np.ndarray) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """(embedding, face crop or None) of what a caregiver labelled; a blank crop is refused."""
        if isinstance(item, np.ndarray) and item.ndim == 1:
            return self._check_embedding(item), None
        if isinstance(item, Prediction):
            with self._lock:
                hit = self._cache.get(item.frame_key)
            x, crop = self._check_embedding(item.embedding), hit.crop if hit is not None else None
        else:
            hit = self._embedded(item)
            x, crop = hit.embedding, hit.crop
        if crop is not None:
            require_contrast(crop)
        return x, crop

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
        x, crop = self._learnable(item)  # decode and embed outside the writer lock
        with self.change():
            result = self._update(x, y)
            if crop is not None and (result.updated or result.held_out):
                self._keep_crop(crop, y)
            if self.config.autosave if save is None else save:
                self.save()
            return result

    def _keep_crop(self, crop: np.ndarray, y: int) -> None:
        """Keep the face crop of a learned frame: for re-embedding (written with the next snapshot)
        and, with consent, for upload (queued right after that snapshot, see ``save``)."""
        self.samples.add(crop, y, save=False)
        self._samples_dirty = True
        self._pending_crops.append((crop, y))

    def _rng(self) -> np.random.Generator:
        """Seeded by the label count, so a restarted device draws the same replay as one that never stopped."""
        return np.random.default_rng([self.config.seed, self.counters["labels"]])

    def _update(self, x: np.ndarray, y: int) -> LearnResult:
        c = self.config
        self._dirty = True
        self.counters["labels"] += 1
        rng = self._rng()
        held = bool(c.holdout_every and c.holdout_per_class and self.counters["labels"] % c.holdout_every == 0)
        if held:
            self.counters["held_out"] += 1
            evicted = self.holdout.push(x, y)
            if evicted is None:
                return LearnResult(self.classes[y], False, False, True, self.head.version)
            x = evicted  # the class's oldest held-back label is learned now instead
        rx, ry = self.replay.sample(c.replay_mix, rng)
        ax, ay = self.source.sample(c.source_mix, rng)
        xb = np.concatenate([x[None], rx, ax])
        yb = np.concatenate([[y], ry, ay]).astype(np.int64)
        weights = np.concatenate([[c.new_weight], np.ones(len(ry) + len(ay))])
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

    @property
    def anchor_strength(self) -> float:
        """L2-SP strength: measured best at 1.0 when there are no source-domain embeddings to replay,
        and unneeded (it only slows learning) when there are (docs/edge.md)."""
        if self.config.anchor_strength is not None:
            return float(self.config.anchor_strength)
        return 0.0 if len(self.source) and self.config.source_mix else 1.0

    # ---------------------------------------------------------------- annotation queue
    def resolve(self, item_id: str, label: str) -> LearnResult | None:
        """A caregiver labels a queued frame: learn it once; None if it was already labelled."""
        self.label_index(label)
        with self.change():  # label file, learning and snapshot as one change: no other process learns it too
            self._refuse_blank_queued(item_id)
            _, first = self.queue.resolve(item_id, label)
            if not first:  # labelled before (a second caregiver, a retried request): counted once
                return None
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
        self.learned_queue_ids = (self.learned_queue_ids + [item_id])[-100:]
        self.save()
        self.queue.remove(item_id, keep_label=True)
        return result

    def _learn_resolved_queue(self) -> None:
        """Labels given just before a crash: learn those the saved state has not seen yet."""
        with self.change():
            for item in self.queue.resolved():
                if item.id in self.learned_queue_ids:
                    self.queue.remove(item.id, keep_label=True)
                elif not has_contrast(self.queue.crop(item.id)):
                    log.warning("queued frame %s is blank: dropped without learning", item.id)
                    self.queue.remove(item.id, keep_label=True)
                else:
                    self._learn_queued(item.id, str(item.label))

    def dismiss(self, item_id: str) -> bool:
        """"Not a face": the frame leaves the queue unlearned; False if it was labelled already."""
        with self.change():
            if self.queue.get(item_id).label is not None:  # QueueError for an unknown id
                return False
            self.queue.remove(item_id)
            return True

    # ---------------------------------------------------------------- sync
    def adopt_head(self, head: OnlineHead) -> None:
        """Replace the head (e.g. a refreshed one from the sync server); replay and holdout stay."""
        if head.classes != self.classes or head.input_dim != self.dim:
            raise InputError("head does not match this package's classes or embedding size")
        with self.change():
            self.head = head
            self.anchor_weights = [w.copy() for w in head.weights()]  # learning now stays close to the adopted head
            self.counters["adopted"] += 1
            self._dirty = True
            if self.config.autosave:
                self.save()


def _device_spec(spec: PreprocessSpec, config: DeviceConfig) -> PreprocessSpec:
    """The manifest's spec with this device's Haar sizes (they only matter for Haar packages)."""
    if uses_blazeface(spec):
        return spec
    coarse = config.detect_coarse_side or 0
    return replace(spec, detect_max_side=config.detect_max_side or spec.detect_max_side, detect_coarse_side=coarse)


def load_replay_seed(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """``x`` float32 (N, D) and ``y`` class indices (N,) from an npz of plain arrays."""
    with np.load(path, allow_pickle=False) as npz:
        x = np.asarray(npz["x"], np.float32)
        y = np.asarray(npz["y"], np.int64)
    if x.ndim != 2 or y.shape != (len(x),) or y.min(initial=0) < 0 or not np.all(np.isfinite(x)):
        raise ValueError("expects x (N, D) finite floats and y (N,) class indices")
    return x, y


def _source_name(image: ImageSource) -> str:
    return Path(image).name if isinstance(image, (str, os.PathLike)) else type(image).__name__


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
