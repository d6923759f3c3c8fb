"""Device side of the sync protocol: push head updates, pull the current global model.

One ``sync`` does, in order, under a file lock (one sync at a time per state folder):

1. **snapshot**: if the device learned from new labels since the last reference point,
   write one update (the head's *delta* since that point, ``kind="delta"``) to the
   on-disk outbox (``state.SyncState``), together with the next reference point.
2. **push**: send the outbox oldest first. 2xx (new or duplicate) moves the entry to
   ``sent/``; a 4xx refusal (stale package, bad shape...) moves it to ``rejected/`` with
   the server's reason; a network error or 5xx stops the push (retried next sync, with the
   same idempotency key, so the server counts it once).
3. **pull**: ``GET /v1/model`` with ``If-None-Match``. A new package is downloaded and
   verified (``fetch``), then swapped in atomically (a symlink flip), the previous package
   kept for rollback. A new global head is verified the same way.
4. **merge**: ``merge.adopt_and_replay``, then the device switches to the new package and
   head *in place* (``Device.switch_package``), so every holder of the device object (the
   annotation page, the camera loop) runs the new model from its next call. When the
   extractor changed, the device re-embeds its kept face crops with the new extractor first,
   so local learning survives an extractor upgrade.

HTTP, timeouts and retries are ``transport``'s; a device offline for days syncs cleanly
(its old updates are discounted or refused by the server, then it adopts the new head).
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
import uuid
from pathlib import Path
from typing import Optional, Protocol

import numpy as np

from ..core import wire
from ..consent import CROPS_FORMAT, CropOutbox, batch_key
from ..core.head import OnlineHead
from .fetch import fetch_head, fetch_package
from .merge import MergePolicy, adopt_and_replay
from .state import RefPoint, SyncState
from .transport import AuthError, Http, Response, SyncError, raise_for_auth

__all__ = ["DeviceLearner", "Learner", "SyncReport", "Syncer", "sync_device"]


# --------------------------------------------------------------------------- what sync needs from the device


class Learner(Protocol):
    """The device runtime as sync sees it (``DeviceLearner`` adapts ``infantino.edge_runtime.device.Device``)."""

    def head(self) -> OnlineHead:
        """The current local head."""

    def package_version(self) -> str:
        """Version of the package the device runs."""

    def package_head(self) -> OnlineHead:
        """That package's own (bootstrap) head, the one local learning started from."""

    def labelled_total(self) -> int:
        """How many labels the device was ever taught (monotonic)."""

    def replay_set(self, package_dir: Path) -> Optional[tuple[np.ndarray, np.ndarray]]:
        """(embeddings, labels) of the kept labelled samples *in the space of that package's
        extractor*: the replay buffer when it is the current package, the kept face crops
        re-embedded with the new extractor when it is not; None when there are none."""

    def install(self, package_dir: Path, head: OnlineHead, replay: Optional[tuple[np.ndarray, np.ndarray]]) -> None:
        """Make ``package_dir`` + ``head`` current, in place (``replay`` refills the buffer after a package change)."""

    def metrics(self) -> dict:
        """Local numbers to report with an update."""

    def crop_outbox(self) -> Optional[CropOutbox]:
        """The consented-crops outbox (None: the device never shares crops)."""

    def change(self) -> contextlib.AbstractContextManager:
        """The state folder's writer lock with the learner at its newest snapshot (``Device.change``):
        snapshot and merge run inside it, so a caregiver page or ``learn`` in another process neither
        loses its labels to the merge nor has them undone by an upload."""


# --------------------------------------------------------------------------- sync


@dataclasses.dataclass
class SyncReport:
    pushed: int = 0
    duplicates: int = 0
    rejected: list = dataclasses.field(default_factory=list)  # (status, reason)
    pending: int = 0
    queued: bool = False
    package_changed: bool = False
    head_changed: bool = False
    package_version: Optional[str] = None
    head_version: Optional[int] = None
    replayed: int = 0
    crops_sent: int = 0  # consented face crops the server stored (only when the device opted in)
    crops_erased: int = 0  # crops the server deleted after the owner withdrew consent with erase
    error: Optional[str] = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class Syncer:
    def __init__(self, state_dir: Path, learner: Learner, http: Http, device_name: Optional[str] = None,
                 policy: MergePolicy = MergePolicy(), max_package_bytes: int = 512 * 1024 * 1024):
        self.state = SyncState(state_dir)
        self.learner = learner
        self.http = http
        self.device_name = device_name
        self.policy = policy
        self.max_package_bytes = max_package_bytes

    # ------------------------------------------------------------ 0. first contact
    def first_contact(self) -> None:
        """Before the first adoption: if the device runs the served package, its learning started
        from that package's bootstrap head, a known global version: make that the reference, so
        what it learned before ever syncing is uploaded too."""
        if self.state.reference() is not None:
            return
        info = self._call("GET", "/v1/model").json()
        boot = info.get("bootstrap_head_version")
        if boot is None or str(info["package_version"]) != self.learner.package_version():
            return  # another package: local samples are re-embedded and replayed on the pull instead
        head = self.learner.package_head()
        self.state.write_base(RefPoint(1, [np.asarray(a, np.float32) for a in head.weights()], int(boot),
                                       str(info["package_version"]), 0))

    def _call(self, method: str, path: str, ok: tuple[int, ...] = (200,), *, refusals: bool = False,
              **kwargs) -> Response:
        """One request: a refused token raises ``AuthError``; a status outside ``ok`` raises ``SyncError``
        (retried at the next sync), except, with ``refusals``, a 4xx the server means for good, which
        the caller records (408 and 429 are never that: they mean "later")."""
        resp = self.http.request(method, path, **kwargs)
        raise_for_auth(resp)
        refused = refusals and 400 <= resp.status < 500 and resp.status not in (408, 429)
        if resp.status not in ok and not refused:
            raise SyncError(f"{method} {path}: HTTP {resp.status} {resp.reason}")
        return resp

    # ------------------------------------------------------------ 1. snapshot
    def snapshot(self) -> bool:
        """Queue the learning since the last reference point; False when there is none.

        Under the learner's writer lock, on its newest snapshot: the delta is measured from the
        head as saved (labels another process learned included), never from a stale copy."""
        with self.learner.change():
            return self._snapshot()

    def _snapshot(self) -> bool:
        ref = self.state.reference()
        if ref is None:
            return False  # never adopted a global head: the first pull sets the reference
        total = self.learner.labelled_total()
        new = total - ref.labelled_total
        if new <= 0:
            return False
        head = self.learner.head()
        layers = [np.asarray(a, np.float32) for a in head.weights()]
        if [a.shape for a in layers] != [a.shape for a in ref.layers]:
            return False  # the local head was replaced by something else; the next pull re-bases
        delta = [a - r for a, r in zip(layers, ref.layers)]
        key = f"{self._name()}-{ref.seq + 1}-{uuid.uuid4().hex[:16]}"
        body = wire.encode_update(device=self._name(), base_head_version=ref.base_head_version,
                                  base_package_version=ref.package_version, layers=delta, n_samples=new,
                                  idempotency_key=key, metrics=_finite(self.learner.metrics()), kind="delta")
        self.state.queue(RefPoint(ref.seq + 1, layers, ref.base_head_version, ref.package_version, total), body)
        return True

    def _name(self) -> str:
        """The device's name on the server (asked once, then remembered for offline snapshots)."""
        if self.device_name is None:
            self.device_name = self.state.cached().get("device")
        if self.device_name is None:
            self.device_name = str(self._call("GET", "/v1/whoami").json()["name"])
            self.state.save_cached(device=self.device_name)
        return self.device_name

    # ------------------------------------------------------------ 2. push
    def push(self, report: SyncReport) -> None:
        for path in self.state.pending():
            resp = self._call("POST", "/v1/updates", (200, 201, 202), refusals=True, body=self.state.body(path),
                              headers={"Content-Type": wire.CONTENT_TYPE})
            if resp.status < 300:
                self.state.mark_sent(path)
                report.pushed += 1
                report.duplicates += int(bool(resp.json().get("duplicate")))
            else:
                self.state.mark_rejected(path, resp.status, resp.reason)
                report.rejected.append((resp.status, resp.reason))

    # ------------------------------------------------------------ 2b. consented crops
    def push_crops(self, report: SyncReport, batch: int = 128) -> None:
        """Upload labelled face crops, oldest first, only while the device's owner consents; after
        a withdrawal with erase, ask the server to delete this device's crops instead."""
        outbox = self.learner.crop_outbox()
        if outbox is None:
            return
        if outbox.erase_pending():
            report.crops_erased = int(self._call("DELETE", "/v1/crops").json().get("deleted", 0))
            outbox.erase_done()
        while outbox.shared() and len(outbox):
            crops, labels, upto = outbox.batch(batch)
            meta = {"format": CROPS_FORMAT, "device": self._name(), "package_version": self.learner.package_version(),
                    "classes": [str(c) for c in self.learner.head().classes],
                    "idempotency_key": batch_key(self._name(), crops, labels)}
            resp = self._call("POST", "/v1/crops", (200, 201), refusals=True,
                              body=wire.encode(meta, {"crops": crops, "labels": labels}),
                              headers={"Content-Type": wire.CONTENT_TYPE})
            if resp.status < 300:
                report.crops_sent += len(labels)
            else:  # refused for good (e.g. crops of an older input size): dropped, or they would block the rest
                report.rejected.append((resp.status, f"crops: {resp.reason}"))
            outbox.acknowledge(upto)

    # ------------------------------------------------------------ 3 + 4. pull and merge
    def pull(self, report: SyncReport) -> None:
        self._name()
        cached = self.state.cached()
        ref = self.state.reference()
        headers = {"If-None-Match": cached["etag"]} if cached.get("etag") and ref is not None else {}
        resp = self._call("GET", "/v1/model", (200, 304), headers=headers)
        if resp.status == 304:
            report.package_version, report.head_version = ref.package_version, ref.base_head_version
            return
        info = resp.json()
        package_version, head_version = str(info["package_version"]), int(info["head_version"])
        current = self.state.package_dir("current")
        have_package = current is not None and ref is not None and ref.package_version == package_version
        if ref is not None and have_package and ref.base_head_version == head_version:
            self.state.save_cached(etag=resp.headers.get("ETag"))
            report.package_version, report.head_version = package_version, head_version
            return

        package_dir = current if have_package else fetch_package(self.http, self.state.root / "packages", info, self.max_package_bytes)
        head = fetch_head(self.http, self.state.root, info)
        if head.input_dim != int(info["embedding_dim"]):
            raise SyncError(f"global head takes {head.input_dim}-d embeddings, the package makes {info['embedding_dim']}-d ones")
        with self.learner.change():  # downloads above, outside the lock; the merge is one state change
            merged, replay = self._merge(package_dir, head, have_package, head_version, package_version, report)
        self.state.save_cached(etag=resp.headers.get("ETag"), package_version=package_version, head_version=head_version,
                               synced_at=time.time())
        report.package_changed = not have_package
        report.head_changed = True
        report.package_version, report.head_version = package_version, head_version
        report.replayed = 0 if replay is None else len(replay[1])

    def _merge(self, package_dir: Path, head: OnlineHead, have_package: bool, head_version: int, package_version: str,
               report: SyncReport) -> tuple[OnlineHead, Optional[tuple[np.ndarray, np.ndarray]]]:
        """Adopt ``head`` + replay the local samples, install, move the reference (the learner's lock held).

        Labels learned in another process since this sync's snapshot are queued as one more
        update first: the adoption replaces the head they moved, and they would never go up."""
        report.queued = self._snapshot() or report.queued
        replay = self.learner.replay_set(package_dir)
        if replay is not None and len(replay[1]) == 0:
            replay = None
        merged = adopt_and_replay(head, *(replay or (None, None)), policy=self.policy)
        if not have_package:
            self.state.swap_package(package_dir)
        try:
            self.learner.install(self.state.package_dir("current"), merged, replay)
        except Exception as exc:
            if not have_package and self.state.package_dir("previous") is not None:
                self.state.rollback_package()
            raise SyncError(f"the new model could not be installed ({exc}); kept the previous one") from exc
        seq = self.state.next_seq()
        self.state.write_base(RefPoint(seq, [np.asarray(a, np.float32) for a in merged.weights()], head_version,
                                       package_version, self.learner.labelled_total()))
        return merged, replay

    # ------------------------------------------------------------ all of it
    def sync(self) -> SyncReport:
        """Snapshot, push, pull, merge; one sync at a time per state folder (a file lock)."""
        import fcntl

        with open(self.state.root / ".lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                return self._sync()
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _sync(self) -> SyncReport:
        report = SyncReport()
        try:
            self.first_contact()
            report.queued = self.snapshot()
            self.push(report)
            self.push_crops(report)
            self.pull(report)
        except AuthError:
            raise
        except SyncError as exc:
            report.error = str(exc)
        report.pending = len(self.state.pending())
        return report


def _finite(metrics: dict) -> dict:
    return {str(k)[:64]: float(v) for k, v in (metrics or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)}


class DeviceLearner:
    """``infantino.edge_runtime.device.Device`` as a sync ``Learner``: every question goes to the device.

    The device keeps the face crops of the frames it learned; after an extractor change it
    re-embeds them with the new extractor (``Device.kept_embeddings``) to refill the replay
    buffer and re-fit the adopted head, and switches to the new package in place.
    """

    def __init__(self, device):
        self.device = device

    def learn(self, item, label, **kwargs):
        return self.device.learn(item, label, **kwargs)

    def change(self) -> contextlib.AbstractContextManager:
        """The device's state change: its folder's writer lock, the newest snapshot loaded."""
        return self.device.change()

    # ------------------------------------------------------------ Learner protocol
    def head(self) -> OnlineHead:
        return self.device.head

    def labelled_total(self) -> int:
        return int(self.device.counters["labels"])

    def package_version(self) -> str:
        return self.device.package.version

    def package_head(self) -> OnlineHead:
        return self.device.package_head()

    def replay_set(self, package_dir: Path) -> Optional[tuple[np.ndarray, np.ndarray]]:
        return self.device.kept_embeddings(package_dir)

    def install(self, package_dir: Path, head: OnlineHead, replay: Optional[tuple[np.ndarray, np.ndarray]]) -> None:
        if self.device.runs_package(package_dir):
            self.device.adopt_head(head, save=True)
        else:
            self.device.switch_package(package_dir, head=head, replay=replay)

    def crop_outbox(self) -> Optional[CropOutbox]:
        return self.device.outbox

    def metrics(self) -> dict:
        c, status = self.device.counters, self.device.status()
        return {"labels": c.get("labels", 0), "updates": c.get("updates", 0), "rollbacks": c.get("rollbacks", 0),
                "replay": status["replay"]}


def sync_device(device, server_url: str, token: str, *, policy: MergePolicy = MergePolicy(), timeout_s: float = 15.0,
                retries: int = 4) -> SyncReport:
    """Sync one ``Device`` (or its ``DeviceLearner``) with the server; the device switches in place
    to the new package when the server has one (``Device.switch_package``)."""
    learner = device if isinstance(device, DeviceLearner) else DeviceLearner(device)
    http = Http(server_url, token, timeout_s=timeout_s, retries=retries)
    return Syncer(learner.device.state_dir, learner, http, policy=policy).sync()
