"""HTTP for sync, publishing and the server's own tools: standard library ``urllib`` only.

Timeouts on every request; retries with jittered exponential backoff (``edge_runtime.backoff``)
for connection errors, 5xx and 429 (honouring ``Retry-After``); downloads streamed into a temp
file, hashed on the way and renamed into place only when the sha256 matches.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable, Optional

from ..core.backoff import backoff_delay

USER_AGENT = "infantino-edge-sync/1"


class SyncError(RuntimeError):
    """Sync could not finish; the message is one line. Nothing local was lost."""


class AuthError(SyncError):
    """The server refused the token (401/403): retrying will not help."""


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


def raise_for_auth(resp: Response) -> None:
    """``AuthError`` when the server refused the token."""
    if resp.status in (401, 403) and ("token" in resp.reason or resp.status == 401):
        raise AuthError(f"server refused the token: {resp.reason or resp.status}")


class _Retryable(Exception):
    """A transient download failure (connection, 5xx)."""


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

    def _url(self, path: str) -> str:
        return path if path.startswith("http") else f"{self.base}{path}"

    def _headers(self, extra: Optional[dict] = None) -> dict:
        return {"Authorization": f"Bearer {self.token}", "User-Agent": USER_AGENT, **(extra or {})}

    def _wait(self, attempt: int, retry_after: str = "") -> None:
        """Sleep before retry ``attempt + 1``: the server's ``Retry-After`` when it gave one, else the backoff."""
        if retry_after.isdigit():
            self.sleep(min(self.max_backoff_s, float(retry_after)))
        else:
            self.sleep(backoff_delay(attempt, self.backoff_s, self.max_backoff_s))

    def _once(self, method: str, path: str, body: Optional[bytes], headers: dict, max_bytes: int) -> Response:
        req = urllib.request.Request(self._url(path), data=body, method=method, headers=self._headers(headers))
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
            self._wait(attempt, resp.headers.get("Retry-After", "") if resp is not None else "")
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
                self._wait(attempt)
        raise SyncError(f"GET {path}: download failed after {self.retries + 1} tries ({last})")

    def _download_once(self, path: str, dest: Path, sha256: str, max_bytes: int, chunk: int) -> None:
        req = urllib.request.Request(self._url(path), headers=self._headers())
        self.attempts += 1
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                digest = self._stream(req, path, out, max_bytes, chunk)
                out.flush()
                os.fsync(out.fileno())
            if digest != sha256:
                raise SyncError(f"{path}: sha256 {digest[:12]}... does not match the announced {sha256[:12]}...")
            os.replace(tmp, dest)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def _stream(self, req: urllib.request.Request, path: str, out, max_bytes: int, chunk: int) -> str:
        """Copy the response body into ``out``; its sha256. ``_Retryable`` for what a retry may cure."""
        h, size = hashlib.sha256(), 0
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
        return h.hexdigest()
