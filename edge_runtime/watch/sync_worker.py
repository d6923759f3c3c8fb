"""Periodic sync in a background thread: the frame loop never waits on the network.

Push and pull at start, every ``every_s`` seconds (jittered, so a fleet spreads out) and
once more at a clean exit. Offline is normal: a failed sync is retried with exponential
backoff (capped at ``every_s``) and the outbox keeps every update meanwhile (each goes up
once: the server deduplicates by idempotency key).

A new package is installed *in place*: ``Device.switch_package`` runs inside the sync's state
change (the state folder's writer lock held), so the loop's device object runs the new model
from its next frame; the loop notices the new package between two frames (``Watch``).
"""
from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from ..core.backoff import Backoff, jittered
from ..sync.client import sync_device
from ..sync.transport import AuthError, Http, SyncError

log = logging.getLogger("infantino.edge_runtime.watch")


@dataclass(frozen=True)
class SyncSettings:
    server: str
    token: str
    every_s: float = 900.0
    jitter: float = 0.1
    timeout_s: float = 10.0  # per request
    retries: int = 1  # per request, inside one sync; the worker's own backoff does the rest
    retry_base_s: float = 5.0  # first retry after a failed sync

    def __post_init__(self) -> None:
        if self.every_s <= 0 or self.timeout_s <= 0 or self.retries < 0 or self.retry_base_s <= 0:
            raise ValueError("--sync-every and timeouts must be above 0")
        Http(self.server, self.token)  # a malformed URL is refused now, in one line, not in the background


@dataclass
class SyncStatus:
    attempts: int = 0
    last_at: Optional[float] = None  # epoch seconds of the last attempt's end
    ok_at: Optional[float] = None  # ... of the last sync that finished without error
    error: Optional[str] = None  # of the last attempt
    pushed: int = 0  # updates the server took, all syncs together
    pending: int = 0  # in the outbox after the last attempt
    package_version: Optional[str] = None
    head_version: Optional[int] = None
    installed: int = 0  # new packages the device switched to

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("attempts", "last_at", "ok_at", "error", "pushed", "pending", "package_version",
                                               "head_version", "installed")}


class SyncWorker(threading.Thread):
    """Syncs ``current()`` (the loop's device) until ``finish``; then syncs once more and ends."""

    def __init__(self, settings: SyncSettings, current: Callable[[], Any], rng: Optional[random.Random] = None):
        super().__init__(name="watch-sync", daemon=True)
        self.settings, self.current = settings, current
        self.rng = rng or random.Random()
        self.backoff = Backoff(base_s=min(settings.retry_base_s, settings.every_s), max_s=settings.every_s, rng=self.rng)
        self.status = SyncStatus()
        self._exit = threading.Event()
        self._final = True

    def run(self) -> None:
        delay = 0.0
        while not self._exit.wait(delay):
            ok = self.sync_once()
            j = self.settings.jitter
            delay = jittered(self.settings.every_s, self.rng, spread=(1.0 - j, 1.0 + j)) if ok else self.backoff.next_delay()
            if ok:
                self.backoff.reset()
        if self._final:
            self.sync_once()

    def finish(self, timeout_s: float, final: bool = True) -> bool:
        """Stop after one last sync (``final``); False if it did not end within ``timeout_s``."""
        self._final = final
        self._exit.set()
        self.join(timeout_s)
        return not self.is_alive()

    def sync_once(self) -> bool:
        """One push + pull; True when it finished without error."""
        s, st = self.settings, self.status
        st.attempts += 1
        try:
            report = sync_device(self.current(), s.server, s.token, timeout_s=s.timeout_s, retries=s.retries)
            error = report.error
            st.installed += int(report.package_changed)
            st.pushed += report.pushed
            st.pending = report.pending
            st.package_version, st.head_version = report.package_version or st.package_version, report.head_version or st.head_version
            for status, reason in report.rejected:
                log.warning("sync: the server refused an update (%s): %s", status, reason)
        except (AuthError, SyncError, OSError, ValueError, RuntimeError) as exc:
            error = f"{type(exc).__name__}: {exc}" if not isinstance(exc, SyncError) else str(exc)
        was_ok = st.error is None
        st.error, st.last_at = error, time.time()
        if error is None:
            st.ok_at = st.last_at
            if not was_ok:
                log.warning("sync: back in touch with the server")
        elif was_ok or st.attempts == 1:
            log.warning("sync failed, will retry (offline is fine, the outbox keeps every update): %s", error)
        return error is None
