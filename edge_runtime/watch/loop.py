"""``Watch``: the frame loop of a camera, and the one owner of its ``Device``.

Per sampled frame: predict (``Device.predict``, nothing queued by it), let ``QueuePolicy``
pick the frames worth a caregiver's label, feed the distress monitor, append the frame to
the timeline. Between two frames: notice a package that sync switched the device to (in
place, ``Device.switch_package``), write the status every ``status_every_s``. The reader, sync and alert hook
run in their own threads; nothing here waits on the network or on a camera.

Frames that cannot be read (unreadable, truncated, oversized) are skipped, each a warning
line, a timeline line and a count in the status (``skipped``); a video file that ends before
the frame count its header states makes ``run`` return ``INCOMPLETE_EXIT``.

SIGTERM / SIGINT finish the frame in flight, then the loop closes the timeline, saves the
state, syncs once more (bounded by ``exit_sync_timeout_s``) and returns 0. A second signal
skips that last sync. A kill -9 loses at most the frame in flight: every timeline line is
handed to the kernel when written, queued frames and labels are atomic files.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import signal
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from typing import IO, Any, Iterator, Optional

from ..core.preprocess import ImageError
from ..queue_policy import QUEUE, QueuePolicy, QueueSettings
from ..state import StateConflict, StateError
from ..state_lock import StateLockTimeout
from .distress import START, DistressEvent, DistressMonitor, DistressSettings, frame_negative
from .events import AlertHook, EventLog
from .live import watch_folder
from .reader import Frame, Reader
from .slot import LatestSlot
from .sources import FrameSource
from .status import StatusBoard, human, write_status_file
from .sync_worker import SyncSettings, SyncWorker
from .timeline import Timeline

log = logging.getLogger("infantino.edge_runtime.watch")
RUN_LOCK = ".watch.lock"
INCOMPLETE_EXIT = 3  # a file source ended before the frames it states: the run is not a clean end


class WatchBusy(RuntimeError):
    """Another watch runs on this state folder."""


@dataclass(frozen=True)
class WatchSettings:
    fps: float = 2.0
    fast: bool = False  # a file or folder as fast as it can be analysed, not in real time
    loop: bool = False  # a file or folder starts over at its end
    queue: QueueSettings = field(default_factory=QueueSettings)
    distress: DistressSettings = field(default_factory=DistressSettings)
    keep_days: int = 7
    max_timeline_bytes: Optional[int] = None
    fsync_every_s: float = 0.0  # timeline lines: 0 = each one durable at once (a power cut loses at most one)
    status_every_s: float = 60.0
    json: bool = False
    on_alert: Optional[str] = None
    on_alert_timeout_s: float = 10.0
    sync: Optional[SyncSettings] = None
    exit_sync_timeout_s: float = 30.0
    max_frames: Optional[int] = None  # stop after this many analysed frames (benchmarks)

    def __post_init__(self) -> None:
        if not self.fps > 0 or self.status_every_s <= 0 or self.fsync_every_s < 0 or self.on_alert_timeout_s <= 0:
            raise ValueError("--fps, --status-every and --on-alert-timeout must be above 0, --fsync-every at least 0")


class Watch:
    def __init__(self, device: Any, source: FrameSource, settings: WatchSettings = WatchSettings(), *, out: IO[str] = sys.stdout):
        self.device, self.source, self.settings, self.out = device, source, settings, out
        self.folder = watch_folder(device.state_dir)
        self.stop = threading.Event()
        self.slot: LatestSlot[Frame] = LatestSlot()
        self.reader = Reader(source, self.slot, settings.fps, self.stop, fast=settings.fast, loop=settings.loop)
        self.timeline = Timeline(self.folder, device.classes, keep_days=settings.keep_days, fsync_every_s=settings.fsync_every_s,
                                 max_bytes=settings.max_timeline_bytes)
        self.events = EventLog(self.folder)
        self.hook = AlertHook(settings.on_alert, settings.on_alert_timeout_s) if settings.on_alert else None
        queue = settings.queue  # one threshold: the device's, unless the watch names its own
        self.policy = QueuePolicy(queue if queue.min_uncertainty is not None else
                                  replace(queue, min_uncertainty=device.config.uncertainty_threshold))
        self.monitor = DistressMonitor(settings.distress)
        self.board = StatusBoard()
        self.sync = SyncWorker(settings.sync, lambda: self.device) if settings.sync else None
        self._running = device.package  # the package the loop's bookkeeping is for (sync switches the device in place)
        self._hurry = False
        self.swaps = 0

    # ------------------------------------------------------------ run
    def run(self) -> int:
        """Watch until the source ends, ``max_frames``, or a signal; 0 on a clean end."""
        with self._run_lock(), self._signals():
            self.reader.start()
            if self.sync is not None:
                self.sync.start()
            try:
                self._loop()
            finally:
                self._shutdown()
        if self.reader.error is not None:
            raise self.reader.error
        return INCOMPLETE_EXIT if self.reader.stats.ended_early else 0

    def _loop(self) -> None:
        every = self.settings.status_every_s
        next_status = time.monotonic() + every
        while True:
            self._follow_package()
            self._record_skips()
            frame = self.slot.take(timeout_s=0.5)
            if frame is not None:
                self._analyse(frame)
            if time.monotonic() >= next_status:
                self._report()
                next_status = max(next_status + every, time.monotonic())
            limit = self.settings.max_frames
            if self.stop.is_set() or (frame is None and self.slot.finished) or (limit is not None and self.board.frames >= limit):
                return

    # ------------------------------------------------------------ one frame
    def _analyse(self, frame: Frame) -> None:
        pred = self._predict(frame.image)
        if pred is None:
            return
        self._follow_package()  # sync may have switched the package while this frame was predicted
        t, face = frame.t, bool(pred.face_found)
        queued = None
        if self.policy.decide(t, face, pred.uncertainty, pred.embedding) == QUEUE:
            queued = self.device.queue_frame(pred, source=f"watch frame {frame.index}")
            if queued is not None:
                self.policy.queued(t, pred.embedding)
        event = self.monitor.update(t, frame_negative(pred.classes, pred.index, face))
        # in the classes of the package that predicted it: sync may have switched to another layout meanwhile
        self.timeline.record(t, face, pred.index, pred.probabilities, pred.uncertainty, queued, classes=pred.classes)
        self.board.frame(t, face, pred.label, float(pred.probabilities[pred.index]), queued is not None,
                         time.monotonic() - frame.grabbed)
        if event is not None:
            self._on_event(event, pred.label)

    def _record_skips(self) -> None:
        """Frames the reader could not read: into the timeline and the status count."""
        while self.reader.skips:
            t, why = self.reader.skips.popleft()
            self.timeline.record_skip(t, why)
            self.board.skipped += 1

    def _predict(self, image: Any) -> Any:
        """``Device.predict``; after another process moved the state folder to another package, on that one."""
        try:
            return self.device.predict(image, enqueue=False)
        except StateConflict:
            self._reopen_device()
            return self.device.predict(image, enqueue=False)
        except (ImageError, StateLockTimeout) as exc:
            log.warning("frame skipped: %s", exc)
            self.board.skipped += 1
            return None

    def _on_event(self, event: DistressEvent, label: str) -> None:
        rec = {**event.to_dict(), "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(event.t)),
               "last_expression": label, "package": self.device.package.version, "state_dir": str(self.device.state_dir)}
        self.events.append(rec)
        if event.kind == START:
            self.board.alerts += 1
            self.timeline.mark_alert(event.t)
            log.warning("DISTRESS: negative expressions for %.0f s (%.0f%% of faces now); alert raised", event.duration_s,
                        100 * (event.negative_share or 0))
            if self.hook is not None:
                self.hook.fire(rec)
        else:
            log.warning("distress over after %.0f s", event.duration_s)
        if self.settings.json:
            print(json.dumps({**rec, "type": f"event.{event.kind}"}), file=self.out, flush=True)

    # ------------------------------------------------------------ the device
    def _reopen_device(self) -> None:
        """Another process moved the state folder to another package: switch the device to it, in place."""
        from ..sync.state import managed_model_dir

        d = self.device
        d.switch_package(managed_model_dir(d.state_dir) or d.package.folder)
        self._follow_package()

    def _follow_package(self) -> None:
        """After a package switch (by sync, in place): the bookkeeping that depends on the package."""
        new = self.device.package
        if new is self._running:
            return
        old, self._running = self._running, new
        self.timeline.switch_classes(self.device.classes)
        self.policy.forget_embedding()  # another extractor: old embeddings are not comparable
        self.swaps += 1
        log.warning("now running model package %s (was %s)", new.version, old.version)

    # ------------------------------------------------------------ status, shutdown
    def _report(self) -> dict:
        rec = self.board.report(queue=len(self.device.queue), dropped=self.slot.dropped, alert_active=self.monitor.active,
                                package=self.device.package.version, head_version=self.device.head.version, swaps=self.swaps,
                                source=self.source.spec.describe(), sync=self.sync.status.to_dict() if self.sync else None,
                                camera=self.device.learner.camera.summary(self.device.classes))
        write_status_file(self.folder, rec)
        print(json.dumps(rec) if self.settings.json else human(rec), file=self.out, flush=True)
        return rec

    def _shutdown(self) -> None:
        self.stop.set()
        self.reader.join(timeout=10)
        self._record_skips()
        self.timeline.close()
        try:
            self.device.save()  # prediction counts; labels were saved as they came
        except (StateError, StateLockTimeout) as exc:
            log.warning("state not saved at exit: %s", exc)
        if self.sync is not None:
            timeout = 0.0 if self._hurry else self.settings.exit_sync_timeout_s
            if not self.sync.finish(timeout, final=not self._hurry):
                log.warning("the last sync did not finish within %g s; the outbox keeps its updates", timeout)
            self._follow_package()
        if self.hook is not None:
            self.hook.close()
        self._report()

    @contextlib.contextmanager
    def _run_lock(self) -> Iterator[None]:
        """One watch per state folder: two would queue and record every frame twice."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / RUN_LOCK, "a+b") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise WatchBusy(f"another `infantino-edge watch` runs on {self.device.state_dir}") from None
            yield

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def on_signal(signum: int, _frame: Any) -> None:
            if self.stop.is_set():
                self._hurry = True  # a second signal: do not wait for the last sync
            self.stop.set()

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
