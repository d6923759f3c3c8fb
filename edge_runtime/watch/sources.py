"""What ``infantino-edge watch SOURCE`` reads: a camera, a stream, a video file or a folder.

``parse_source`` decides what SOURCE names (``0`` or ``/dev/video0``: a camera; ``rtsp://``,
``http(s)://`` ...: a stream; a folder: its images in name order; any other existing path: a
video file) and refuses, in one line, anything that is none of these. ``open_source`` opens
it with OpenCV's ``VideoCapture`` (the headless wheel has FFmpeg and V4L2), or reads the
folder with the device's own guarded image decoder. Every source hands out RGB frames.

OpenCV and FFmpeg log to stderr on their own; they are silenced here (``verbose`` keeps
them) so that a source that cannot be opened is one line, ours.
"""
from __future__ import annotations

import os
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Protocol

import numpy as np

STREAM_SCHEMES = ("rtsp", "rtsps", "rtmp", "http", "https", "udp", "tcp", "srt")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
LIVE_KINDS = ("camera", "stream")


class SourceError(RuntimeError):
    """A source that cannot be opened or read; the message is one line."""


@dataclass(frozen=True)
class SourceSpec:
    kind: str  # "camera", "stream", "file" or "folder"
    target: Any  # camera index (int) or a path / URL (str)

    @property
    def live(self) -> bool:
        """A camera or stream runs on the wall clock and may drop; a file or folder has its own clock and ends."""
        return self.kind in LIVE_KINDS

    def describe(self) -> str:
        if self.kind == "camera":
            return f"camera {self.target}"
        if self.kind == "stream":
            return f"stream {redact(self.target)}"
        return f"{'video file' if self.kind == 'file' else 'image folder'} {self.target}"


def redact(url: str) -> str:
    """A stream URL without its password (cameras put credentials in the URL)."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def parse_source(text: str) -> SourceSpec:
    """What SOURCE names; ``SourceError`` when it names nothing that exists."""
    text = str(text).strip()
    if text.isdigit():
        return SourceSpec("camera", int(text))
    scheme = urllib.parse.urlsplit(text).scheme.lower()
    if scheme in STREAM_SCHEMES:
        return SourceSpec("stream", text)
    path = Path(text)
    if text.startswith("/dev/"):
        if not path.exists():
            raise SourceError(f"no camera at {text}")
        return SourceSpec("camera", text)
    if path.is_dir():
        return SourceSpec("folder", str(path))
    if path.is_file():
        return SourceSpec("file", str(path))
    raise SourceError(f"cannot open {text}: not a camera index, /dev/video device, stream URL, video file or image folder")


class FrameSource(Protocol):
    spec: SourceSpec
    fps: Optional[float]  # frames per second of the source's own clock, when it says

    def open(self) -> None: ...
    def grab(self) -> bool: ...
    def position_s(self) -> Optional[float]: ...
    def retrieve(self) -> Optional[np.ndarray]: ...  # None: the frame cannot be read; ``last_error`` says why
    def expected_frames(self) -> Optional[int]: ...  # what a file says it holds (None: unknown, or live)
    def close(self) -> None: ...


def _cv2(verbose: bool = False):
    """OpenCV, with its own and FFmpeg's logging off unless ``verbose``."""
    if not verbose:
        os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # read at FFmpeg's first use
        os.environ.setdefault("OPENCV_LOG_LEVEL", "SILENT")
    import cv2

    if not verbose:
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    return cv2


class CaptureSource:
    """A camera, stream or video file through ``cv2.VideoCapture``."""

    def __init__(self, spec: SourceSpec, *, timeout_s: float = 10.0, verbose: bool = False):
        self.spec = spec
        self.timeout_s = timeout_s
        self.cv2 = _cv2(verbose)
        self.cap: Any = None
        self.fps: Optional[float] = None
        self.last_error: Optional[str] = None
        self._index = -1
        self._last_pos = -1.0

    def open(self) -> None:
        cv2, spec = self.cv2, self.spec
        if spec.kind == "stream":
            ms = int(self.timeout_s * 1000)  # a stream that stalls must not hang the reader for ever
            cap = cv2.VideoCapture(spec.target, cv2.CAP_FFMPEG, [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, ms])
        else:
            cap = cv2.VideoCapture(spec.target)
        if not cap.isOpened():
            cap.release()
            raise SourceError(f"cannot open {spec.describe()}")
        if spec.kind == "camera":
            cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # V4L2: keep one frame, not seconds of old ones
        fps = cap.get(cv2.CAP_PROP_FPS)
        self.fps = float(fps) if fps and 0 < fps < 1000 else None
        self.cap, self._index, self._last_pos = cap, -1, -1.0

    def grab(self) -> bool:
        """Advance to the next frame without decoding its pixels into an array."""
        if self.cap is None or not self.cap.grab():
            return False
        self._index += 1
        return True

    def position_s(self) -> Optional[float]:
        """A file's position of the grabbed frame (its timestamp, else index / fps); None for a live source."""
        if self.spec.live:
            return None
        pos = self.cap.get(self.cv2.CAP_PROP_POS_MSEC) / 1000.0
        if pos <= self._last_pos and self.fps:
            pos = self._index / self.fps  # a container without timestamps
        self._last_pos = pos
        return pos

    def expected_frames(self) -> Optional[int]:
        """The frame count a video file's header states (a truncated file delivers fewer)."""
        if self.spec.live or self.cap is None:
            return None
        n = self.cap.get(self.cv2.CAP_PROP_FRAME_COUNT)
        return int(n) if n and 0 < n < 1e9 else None

    def retrieve(self) -> Optional[np.ndarray]:
        ok, bgr = self.cap.retrieve()
        if not ok or bgr is None:
            self.last_error = f"frame {self._index} of {self.spec.describe()} cannot be decoded"
            return None
        if bgr.ndim == 2:
            return self.cv2.cvtColor(bgr, self.cv2.COLOR_GRAY2RGB)
        return self.cv2.cvtColor(bgr, self.cv2.COLOR_BGR2RGB)

    def close(self) -> None:
        if self.cap is not None:
            self.cap.release()
            self.cap = None


class FolderSource:
    """The images of a folder in name order, ``fps`` of them per second of its clock."""

    def __init__(self, spec: SourceSpec, fps: float):
        self.spec = spec
        self.fps = fps
        self.files: list[Path] = []
        self.last_error: Optional[str] = None
        self._index = -1

    def open(self) -> None:
        folder = Path(self.spec.target)
        try:
            self.files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        except OSError as exc:
            raise SourceError(f"cannot open {self.spec.describe()}: {exc.strerror or exc}") from None
        if not self.files:
            raise SourceError(f"cannot open {self.spec.describe()}: no {'/'.join(s[1:] for s in IMAGE_SUFFIXES)} images in it")
        self._index = -1

    def grab(self) -> bool:
        if self._index + 1 >= len(self.files):
            return False
        self._index += 1
        return True

    def position_s(self) -> Optional[float]:
        return self._index / self.fps

    def retrieve(self) -> Optional[np.ndarray]:
        from ..core.preprocess import ImageError, decode_rgb

        path = self.files[self._index]
        try:
            return decode_rgb(path)  # the device's guarded decode: no decompression bombs
        except ImageError as exc:  # unreadable, truncated or oversized (the message names the file)
            self.last_error = str(exc)
        except OSError as exc:
            self.last_error = f"{path.name}: {exc.strerror or exc}"
        return None

    def expected_frames(self) -> Optional[int]:
        return len(self.files)

    def close(self) -> None:
        self._index = -1


def open_source(spec: SourceSpec, *, folder_fps: float = 2.0, timeout_s: float = 10.0, verbose: bool = False) -> FrameSource:
    """The opened source; ``SourceError`` (one line) when it cannot be opened or has no frame."""
    source: FrameSource = FolderSource(spec, folder_fps) if spec.kind == "folder" else CaptureSource(spec, timeout_s=timeout_s, verbose=verbose)
    source.open()
    return source
