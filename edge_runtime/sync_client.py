"""Device side of the sync protocol: push head updates, pull the current global model.

Standard library HTTP only (``urllib``); arrays travel as npz (``wire``), never pickles.

One ``sync`` does, in order:

1. **snapshot**: if the device learned from new labels since the last reference point,
   write one update (the head's *delta* since that point, ``kind="delta"``) to the
   on-disk outbox. Each outbox file also carries the head's weights at that moment, which
   become the next reference, so one atomic write both queues the update and moves the
   reference: no learning is sent twice, none is lost.
2. **push**: send the outbox oldest first. 2xx (new or duplicate) moves the entry to
   ``sent/``; a 4xx refusal (stale package, bad shape...) moves it to ``rejected/`` with
   the server's reason; a network error or 5xx stops the push (retried next sync, with the
   same idempotency key, so the server counts it once).
3. **pull**: ``GET /v1/model`` with ``If-None-Match``. A new package is downloaded to a
   temp folder, every file checked against the sha256 in ``/v1/model`` *and* the manifest,
   then swapped in atomically (a symlink flip), the previous package kept for rollback.
   A new global head is verified the same way.
4. **merge** (the policy): *adopt the global head, then replay the local buffer*. The
   global head already holds this device's uploaded learning (and everyone else's); a
   few epochs of replay over the device's kept labelled samples re-personalise it to this
   nursery. When the extractor changed, the kept samples are first re-embedded with the
   new extractor, so local learning survives an extractor upgrade. The replayed head is
   the new reference: replay is not uploaded again.

Timeouts on every request; retries with exponential backoff and jitter for connection
errors, 5xx and 429 (honouring ``Retry-After``); a device offline for days syncs cleanly
(its old updates are discounted or refused by the server, then it adopts the new head).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import random
import shutil
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Callable, Optional, Protocol

import numpy as np

from . import wire
from .atomic import atomic_write_bytes, atomic_write_text
from .consent import CROPS_FORMAT, CropOutbox, batch_key
from .head import OnlineHead
from .package import MANIFEST, PackageError, open_package
from .samples import SampleKeeper

USER_AGENT = "infantino-edge-sync/1"


class SyncError(RuntimeError):
    """Sync could not finish; the message is one line. Nothing local was lost."""


class AuthError(SyncError):
    """The server refused the token (401/403): retrying will not help."""


# --------------------------------------------------------------------------- HTTP


@dataclasses.dataclass(frozen=True)
class Response:
    status: int
    headers: dict
    body: bytes

    def json(self) -> dict:
        try:
            return json.loads(self.body.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return {}

    @property
    def reason(self) -> str:
        return str(self.json().get("error") or self.body[:200].decode("utf-8", "replace")).splitlines()[0] if self.body else ""


class Http:
    """A tiny HTTP client with timeouts and bounded, jittered exponential backoff."""

    def __init__(self, base_url: str, token: str, *, timeout_s: float = 15.0, retries: int = 4, backoff_s: float = 0.5,
                 max_backoff_s: float = 30.0, sleep: Callable[[float], None] = time.sleep):
        parsed = urllib.parse.urlparse(base_url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise SyncError(f"server URL must be http(s)://host[:port], not {base_url!r}")
        self.base = base_url.rstrip("/")
        self.token = token
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.sleep = sleep
        self.attempts = 0  # total HTTP attempts, for reports and tests

    def _once(self, method: str, path: str, body: Optional[bytes], headers: dict, max_bytes: int) -> Response:
        url = path if path.startswith("http") else f"{self.base}{path}"
        req = urllib.request.Request(url, data=body, method=method, headers={
            "Authorization": f"Bearer {self.token}", "User-Agent": USER_AGENT, **headers})
        self.attempts += 1
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                data = resp.read(max_bytes + 1)
                if len(data) > max_bytes:
                    raise SyncError(f"{path}: response larger than {max_bytes} bytes")
                return Response(resp.status, dict(resp.headers.items()), data)
        except urllib.error.HTTPError as exc:
            data = exc.read(64 * 1024) if exc.fp else b""
            return Response(exc.code, dict(exc.headers.items()) if exc.headers else {}, data)

    def request(self, method: str, path: str, body: Optional[bytes] = None, headers: Optional[dict] = None,
                max_bytes: int = 16 * 1024 * 1024) -> Response:
        """Retries connection errors, timeouts, 5xx and 429; returns any other response."""
        last = "no attempt"
        for attempt in range(self.retries + 1):
            try:
                resp = self._once(method, path, body, headers or {}, max_bytes)
            except (urllib.error.URLError, OSError, TimeoutError) as exc:
                reason = getattr(exc, "reason", exc)
                last = f"{type(reason).__name__}: {reason}"
                resp = None
            if resp is not None:
                if resp.status < 500 and resp.status != 429:
                    return resp
                last = f"HTTP {resp.status} {resp.reason}".strip()
            if attempt == self.retries:
                break
            delay = min(self.max_backoff_s, self.backoff_s * 2 ** attempt) * random.uniform(0.5, 1.0)
            if resp is not None and resp.headers.get("Retry-After", "").isdigit():
                delay = min(self.max_backoff_s, float(resp.headers["Retry-After"]))
            self.sleep(delay)
        raise SyncError(f"{method} {path}: server unreachable after {self.retries + 1} tries ({last})")

    def download(self, path: str, dest: Path, sha256: str, max_bytes: int, chunk: int = 1 << 20) -> None:
        """Stream into a temp file next to ``dest`` while hashing; rename into place only if the
        sha256 matches. Connection errors and 5xx are retried like any request."""
        last = "no attempt"
        for attempt in range(self.retries + 1):
            try:
                self._download_once(path, dest, sha256, max_bytes, chunk)
                return
            except _Retryable as exc:
                last = str(exc)
            if attempt < self.retries:
                self.sleep(min(self.max_backoff_s, self.backoff_s * 2 ** attempt) * random.uniform(0.5, 1.0))
        raise SyncError(f"GET {path}: download failed after {self.retries + 1} tries ({last})")

    def _download_once(self, path: str, dest: Path, sha256: str, max_bytes: int, chunk: int) -> None:
        url = path if path.startswith("http") else f"{self.base}{path}"
        req = urllib.request.Request(url, headers={"Authorization": f"Bearer {self.token}", "User-Agent": USER_AGENT})
        self.attempts += 1
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
        try:
            h, size = hashlib.sha256(), 0
            with os.fdopen(fd, "wb") as out:
                try:
                    with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                        while block := resp.read(chunk):
                            size += len(block)
                            if size > max_bytes:
                                raise SyncError(f"{path}: larger than {max_bytes} bytes")
                            h.update(block)
                            out.write(block)
                except urllib.error.HTTPError as exc:
                    body = exc.read(64 * 1024) if exc.fp else b""
                    reason = Response(exc.code, {}, body).reason
                    if exc.code >= 500 or exc.code == 429:
                        raise _Retryable(f"HTTP {exc.code} {reason}") from None
                    raise SyncError(f"GET {path}: HTTP {exc.code} {reason}") from None
                except (urllib.error.URLError, OSError, TimeoutError) as exc:
                    raise _Retryable(f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}") from None
                out.flush()
                os.fsync(out.fileno())
            if h.hexdigest() != sha256:
                raise SyncError(f"{path}: sha256 {h.hexdigest()[:12]}... does not match the announced {sha256[:12]}...")
            os.replace(tmp, dest)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


class _Retryable(Exception):
    """A transient download failure (connection, 5xx)."""


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
        """Make ``package_dir`` + ``head`` current (``replay`` refills the buffer after a package change)."""

    def metrics(self) -> dict:
        """Local numbers to report with an update."""

    # optional: ``crop_outbox() -> Optional[CropOutbox]``, the consented-crops outbox (None: never shares)
    # optional: ``change()``, a context manager holding the state folder's writer lock with the learner at
    # its newest snapshot (``Device.change``): snapshot and merge run inside it, so a caregiver page or
    # ``learn`` in another process neither loses its labels to the merge nor has them undone by an upload


# --------------------------------------------------------------------------- merge policy


@dataclasses.dataclass(frozen=True)
class MergePolicy:
    """Adopt the global head, then ``replay_epochs`` passes over the kept samples (0 = adopt only)."""

    replay_epochs: int = 3
    batch_size: int = 32
    max_samples: int = 2000
    seed: int = 0


def adopt_and_replay(global_head: OnlineHead, embeddings: Optional[np.ndarray], labels: Optional[np.ndarray],
                     policy: MergePolicy = MergePolicy()) -> OnlineHead:
    """The merge policy: a copy of the global head, fine-tuned for a few epochs on local samples."""
    head = global_head.copy()
    if embeddings is None or labels is None or len(labels) == 0 or policy.replay_epochs <= 0:
        return head
    rng = np.random.default_rng(policy.seed)
    x = np.asarray(embeddings, np.float32)
    y = np.asarray(labels, np.int64)
    if len(y) > policy.max_samples:
        keep = rng.choice(len(y), policy.max_samples, replace=False)
        x, y = x[keep], y[keep]
    version = head.version
    step = getattr(head, "learn_step", None) or head.partial_fit  # numpy Adam on the device when available
    for _ in range(policy.replay_epochs):
        order = rng.permutation(len(y))
        for start in range(0, len(y), policy.batch_size):
            idx = order[start:start + policy.batch_size]
            step(x[idx], y[idx])
    head.version = version  # the head still descends from this global version
    return head


# --------------------------------------------------------------------------- on-disk sync state


def _npz_bytes(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


@dataclasses.dataclass
class RefPoint:
    """A reference point: the weights the next delta is measured from, and its provenance."""

    seq: int
    layers: list
    base_head_version: int
    package_version: str
    labelled_total: int
    path: Optional[Path] = None


class SyncState:
    """``<state_dir>/sync/``: ``base.npz`` (last adoption), ``outbox/``, ``sent/``, ``rejected/``,
    ``packages/<version>/`` with ``current`` / ``previous`` links, ``state.json`` (ETag cache)."""

    def __init__(self, state_dir: Path):
        self.root = Path(state_dir) / "sync"
        for sub in ("outbox", "sent", "rejected", "packages"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------ reference points
    @staticmethod
    def _read(path: Path) -> RefPoint:
        with np.load(path, allow_pickle=False) as npz:
            meta = json.loads(str(npz["ref_meta"]))
            n = int(meta["n_layers"])
            layers = [np.array(npz[f"ref_{i}"]) for i in range(n)]
        return RefPoint(int(meta["seq"]), layers, int(meta["base_head_version"]), str(meta["package_version"]),
                        int(meta["labelled_total"]), path)

    @staticmethod
    def _ref_arrays(ref: RefPoint) -> dict:
        meta = {"seq": ref.seq, "n_layers": len(ref.layers), "base_head_version": ref.base_head_version,
                "package_version": ref.package_version, "labelled_total": ref.labelled_total}
        out = {f"ref_{i}": np.asarray(a, np.float32) for i, a in enumerate(ref.layers)}
        out["ref_meta"] = np.asarray(json.dumps(meta))
        return out

    def _candidates(self) -> list[Path]:
        files = [self.root / "base.npz"] if (self.root / "base.npz").exists() else []
        for sub in ("outbox", "sent", "rejected"):
            files += sorted((self.root / sub).glob("*.npz"))
        return files

    def reference(self) -> Optional[RefPoint]:
        """The newest reference point (largest seq), or None before the first adoption."""
        best: Optional[RefPoint] = None
        for path in self._candidates():
            try:
                ref = self._read(path)
            except (OSError, ValueError, KeyError) as exc:  # a torn file cannot exist (atomic writes); say so loudly
                raise SyncError(f"unreadable sync file {path}: {exc}") from None
            if best is None or ref.seq > best.seq:
                best = ref
        return best

    def next_seq(self) -> int:
        ref = self.reference()
        return 1 if ref is None else ref.seq + 1

    def write_base(self, ref: RefPoint) -> None:
        atomic_write_bytes(self.root / "base.npz", _npz_bytes(**self._ref_arrays(ref)))

    def queue(self, ref: RefPoint, body: bytes) -> Path:
        """Queue an update body together with the reference point it moves to (one atomic write)."""
        path = self.root / "outbox" / f"{ref.seq:010d}.npz"
        atomic_write_bytes(path, _npz_bytes(body=np.frombuffer(body, np.uint8), **self._ref_arrays(ref)))
        return path

    def pending(self) -> list[Path]:
        return sorted((self.root / "outbox").glob("*.npz"))

    @staticmethod
    def body(path: Path) -> bytes:
        with np.load(path, allow_pickle=False) as npz:
            return npz["body"].tobytes()

    def mark_sent(self, path: Path) -> None:
        dest = self.root / "sent" / path.name
        os.replace(path, dest)
        for old in sorted((self.root / "sent").glob("*.npz"))[:-1]:  # the newest carries the reference
            old.unlink(missing_ok=True)

    def mark_rejected(self, path: Path, status: int, reason: str) -> None:
        dest = self.root / "rejected" / path.name
        atomic_write_text(dest.with_suffix(".json"), json.dumps({"status": status, "reason": reason, "at": time.time()}) + "\n")
        os.replace(path, dest)
        kept = sorted((self.root / "rejected").glob("*.npz"))
        for old in kept[:-20]:
            old.unlink(missing_ok=True)
            old.with_suffix(".json").unlink(missing_ok=True)

    # ------------------------------------------------------------ ETag cache and packages
    def cached(self) -> dict:
        try:
            return json.loads((self.root / "state.json").read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def save_cached(self, **values) -> None:
        data = {**self.cached(), **values}
        atomic_write_text(self.root / "state.json", json.dumps(data, indent=1) + "\n")

    def package_dir(self, which: str = "current") -> Optional[Path]:
        link = self.root / "packages" / which
        return link.resolve() if link.exists() else None

    def swap_package(self, new_dir: Path) -> None:
        """``current`` -> new_dir atomically (symlink flip); the old target becomes ``previous``."""
        pk = self.root / "packages"
        old = self.package_dir("current")
        if old is not None and old != new_dir.resolve():
            _flip_link(pk / "previous", old.name)
        _flip_link(pk / "current", new_dir.name)
        keep = {p.name for p in (self.package_dir("current"), self.package_dir("previous")) if p is not None}
        for entry in pk.iterdir():
            if entry.is_dir() and not entry.is_symlink() and entry.name not in keep and not entry.name.startswith("."):
                shutil.rmtree(entry, ignore_errors=True)

    def rollback_package(self) -> Path:
        """Swap ``current`` and ``previous``; returns the package now current."""
        cur, prev = self.package_dir("current"), self.package_dir("previous")
        if prev is None:
            raise SyncError("no previous package to roll back to")
        _flip_link(self.root / "packages" / "current", prev.name)
        if cur is not None:
            _flip_link(self.root / "packages" / "previous", cur.name)
        return prev


def _flip_link(link: Path, target_name: str) -> None:
    tmp = link.with_name(f".{link.name}.{uuid.uuid4().hex[:8]}")
    os.symlink(target_name, tmp)
    os.replace(tmp, link)


def _safe_dir_name(version: str) -> str:
    clean = "".join(c if c.isalnum() or c in "._-" else "_" for c in version)[:80]
    return f"{clean}-{hashlib.sha256(version.encode()).hexdigest()[:8]}"


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
        resp = self.http.request("GET", "/v1/model")
        _raise_for_auth(resp)
        if resp.status != 200:
            raise SyncError(f"GET /v1/model: HTTP {resp.status} {resp.reason}")
        info = resp.json()
        boot = info.get("bootstrap_head_version")
        if boot is None or str(info["package_version"]) != self.learner.package_version():
            return  # another package: local samples are re-embedded and replayed on the pull instead
        head = self.learner.package_head()
        self.state.write_base(RefPoint(1, [np.asarray(a, np.float32) for a in head.weights()], int(boot),
                                       str(info["package_version"]), 0))

    def _change(self) -> contextlib.AbstractContextManager:
        """The learner's state change (its writer lock, newest snapshot loaded), when it has one."""
        change = getattr(self.learner, "change", None)
        return change() if change is not None else contextlib.nullcontext()

    # ------------------------------------------------------------ 1. snapshot
    def snapshot(self) -> bool:
        """Queue the learning since the last reference point; False when there is none.

        Under the learner's writer lock, on its newest snapshot: the delta is measured from the
        head as saved (labels another process learned included), never from a stale copy."""
        with self._change():
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
            resp = self.http.request("GET", "/v1/whoami")
            _raise_for_auth(resp)
            if resp.status != 200:
                raise SyncError(f"GET /v1/whoami: HTTP {resp.status} {resp.reason}")
            self.device_name = str(resp.json()["name"])
            self.state.save_cached(device=self.device_name)
        return self.device_name

    # ------------------------------------------------------------ 2. push
    def push(self, report: SyncReport) -> None:
        for path in self.state.pending():
            resp = self.http.request("POST", "/v1/updates", body=self.state.body(path),
                                     headers={"Content-Type": wire.CONTENT_TYPE})
            _raise_for_auth(resp)
            if resp.status in (200, 201, 202):
                self.state.mark_sent(path)
                report.pushed += 1
                report.duplicates += int(bool(resp.json().get("duplicate")))
            elif 400 <= resp.status < 500:
                self.state.mark_rejected(path, resp.status, resp.reason)
                report.rejected.append((resp.status, resp.reason))
            else:
                raise SyncError(f"POST /v1/updates: HTTP {resp.status} {resp.reason}")

    # ------------------------------------------------------------ 2b. consented crops
    def push_crops(self, report: SyncReport, batch: int = 128) -> None:
        """Upload labelled face crops, oldest first, only while the device's owner consents; after
        a withdrawal with erase, ask the server to delete this device's crops instead."""
        outbox = getattr(self.learner, "crop_outbox", lambda: None)()
        if outbox is None:
            return
        if outbox.erase_pending():
            resp = self.http.request("DELETE", "/v1/crops")
            _raise_for_auth(resp)
            if resp.status != 200:
                raise SyncError(f"DELETE /v1/crops: HTTP {resp.status} {resp.reason}")
            report.crops_erased = int(resp.json().get("deleted", 0))
            outbox.erase_done()
        while outbox.shared() and len(outbox):
            crops, labels, upto = outbox.batch(batch)
            meta = {"format": CROPS_FORMAT, "device": self._name(), "package_version": self.learner.package_version(),
                    "classes": [str(c) for c in self.learner.head().classes],
                    "idempotency_key": batch_key(self._name(), crops, labels)}
            resp = self.http.request("POST", "/v1/crops", body=wire.encode(meta, {"crops": crops, "labels": labels}),
                                     headers={"Content-Type": wire.CONTENT_TYPE})
            _raise_for_auth(resp)
            if resp.status in (200, 201):
                report.crops_sent += len(labels)
            elif 400 <= resp.status < 500 and resp.status not in (408, 429):
                # refused for good (e.g. crops of an older input size): dropped, or they would block the rest
                report.rejected.append((resp.status, f"crops: {resp.reason}"))
            else:
                raise SyncError(f"POST /v1/crops: HTTP {resp.status} {resp.reason}")
            outbox.acknowledge(upto)

    # ------------------------------------------------------------ 3 + 4. pull and merge
    def pull(self, report: SyncReport) -> None:
        self._name()
        cached = self.state.cached()
        ref = self.state.reference()
        headers = {"If-None-Match": cached["etag"]} if cached.get("etag") and ref is not None else {}
        resp = self.http.request("GET", "/v1/model", headers=headers)
        _raise_for_auth(resp)
        if resp.status == 304:
            report.package_version, report.head_version = ref.package_version, ref.base_head_version
            return
        if resp.status != 200:
            raise SyncError(f"GET /v1/model: HTTP {resp.status} {resp.reason}")
        info = resp.json()
        package_version, head_version = str(info["package_version"]), int(info["head_version"])
        current = self.state.package_dir("current")
        have_package = current is not None and ref is not None and ref.package_version == package_version
        if ref is not None and have_package and ref.base_head_version == head_version:
            self.state.save_cached(etag=resp.headers.get("ETag"))
            report.package_version, report.head_version = package_version, head_version
            return

        package_dir = current if have_package else self._download_package(info)
        head = self._download_head(info)
        if head.input_dim != int(info["embedding_dim"]):
            raise SyncError(f"global head takes {head.input_dim}-d embeddings, the package makes {info['embedding_dim']}-d ones")
        with self._change():  # downloads above, outside the lock; the merge is one state change
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

    def _download_package(self, info: dict) -> Path:
        files = info["files"]
        version = str(info["package_version"])
        final = self.state.root / "packages" / _safe_dir_name(version)
        if final.exists():
            try:
                open_package(final, verify=True)
                return final
            except PackageError:
                shutil.rmtree(final, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=".incoming-", dir=self.state.root / "packages"))
        try:
            for role, entry in files.items():
                if role == "global_head":
                    continue
                name = str(entry["name"])
                if Path(name).name != name or name.startswith("."):
                    raise SyncError(f"server named a package file {name!r}; refusing it")
                self.http.download(entry["url"], tmp / name, entry["sha256"], self.max_package_bytes)
            if not (tmp / MANIFEST).exists():
                raise SyncError("the server did not offer the package manifest")
            try:
                pkg = open_package(tmp, verify=True)
            except PackageError as exc:
                raise SyncError(f"downloaded package does not verify: {exc}") from None
            if pkg.version != version:
                raise SyncError(f"downloaded manifest says version {pkg.version}, the server announced {version}")
            os.replace(tmp, final)
            return final
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _download_head(self, info: dict) -> OnlineHead:
        entry = info["files"]["global_head"]
        with tempfile.TemporaryDirectory(dir=self.state.root) as tmp:
            path = Path(tmp) / "head.npz"
            self.http.download(entry["url"], path, entry["sha256"], 64 * 1024 * 1024)
            head = OnlineHead.load(path)
        if head.version != int(info["head_version"]):
            raise SyncError(f"global head file says version {head.version}, the server announced {info['head_version']}")
        return head

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


def _raise_for_auth(resp: Response) -> None:
    if resp.status in (401, 403) and ("token" in resp.reason or resp.status == 401):
        raise AuthError(f"server refused the token: {resp.reason or resp.status}")


def _finite(metrics: dict) -> dict:
    return {str(k)[:64]: float(v) for k, v in (metrics or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)}


class DeviceLearner:
    """``infantino.edge_runtime.device.Device`` as a sync ``Learner``.

    The device keeps the face crops of the frames it learned (``Device.samples``); after an
    extractor change they are re-embedded with the new extractor to refill the replay buffer
    and re-fit the adopted head.
    """

    def __init__(self, device):
        self.device = device

    @property
    def keeper(self) -> SampleKeeper:
        return self.device.samples

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
        return OnlineHead.load(self.device.package.path("head"))

    def _same_package(self, package_dir: Path) -> bool:
        try:
            return Path(package_dir).resolve() == Path(self.device.package.folder).resolve() or \
                open_package(package_dir, verify=False).version == self.device.package.version
        except PackageError:
            return False

    def replay_set(self, package_dir: Path) -> Optional[tuple[np.ndarray, np.ndarray]]:
        if self._same_package(package_dir):
            xs, ys = self.device.replay.all()
            hx, hy = self.device.holdout.all()
            return np.concatenate([xs, hx]), np.concatenate([ys, hy]).astype(np.int64)
        crops, labels = self.keeper.all()
        if not len(labels):
            return None
        from .extractor import Extractor
        from .preprocess import faces_tensor

        pkg = open_package(package_dir, verify=False)
        role = "extractor_int8" if self.device.config.precision in ("auto", "int8") and pkg.has("extractor_int8") else "extractor"
        extractor = Extractor(pkg.path(role), threads=self.device.config.threads)
        return extractor(faces_tensor(crops, pkg.manifest.preprocess)), labels

    def install(self, package_dir: Path, head: OnlineHead, replay: Optional[tuple[np.ndarray, np.ndarray]]) -> None:
        from .device import Device
        from .replay import ReplayBuffer

        if not self._same_package(package_dir):
            new = Device(package_dir, self.device.state_dir, self.device.config)
            if replay is not None:
                buf = ReplayBuffer(len(new.classes), new.dim, new.config.replay_per_class)
                rng = np.random.default_rng(new.config.seed)
                for x, y in zip(*replay):
                    buf.add(x, int(y), rng)
                new.replay = buf
            self.device = new
        self.device.adopt_head(head)
        if not self.device.config.autosave:
            self.device.save()

    def crop_outbox(self) -> Optional[CropOutbox]:
        return self.device.outbox

    def metrics(self) -> dict:
        c = self.device.counters
        return {"labels": c.get("labels", 0), "updates": c.get("updates", 0), "rollbacks": c.get("rollbacks", 0),
                "replay": len(self.device.replay)}


def managed_model_dir(state_dir: Path) -> Optional[Path]:
    """The package sync installed for this state folder, if any (``<state>/sync/packages/current``)."""
    link = Path(state_dir) / "sync" / "packages" / "current"
    return link if link.exists() else None


def sync_device(device, server_url: str, token: str, *, policy: MergePolicy = MergePolicy(), timeout_s: float = 15.0,
                retries: int = 4) -> tuple[SyncReport, object]:
    """Sync one ``Device`` with the server: returns the report and the device to use from now on
    (a new ``Device`` object when the package changed)."""
    learner = device if isinstance(device, DeviceLearner) else DeviceLearner(device)
    http = Http(server_url, token, timeout_s=timeout_s, retries=retries)
    syncer = Syncer(learner.device.state_dir, learner, http, policy=policy)
    report = syncer.sync()
    return report, learner.device
