"""Shared pieces of the watch tests: videos written with cv2.VideoWriter, the watch CLI as a child process."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

from conftest import REPO, require_data
from infantino.export.tiny_package import synthetic_face

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def write_video(path: Path, frames: Iterable[np.ndarray], fps: float, size: tuple[int, int]) -> Path:
    """An MJPG AVI of RGB (or gray) frames, each resized to ``size`` (w, h)."""
    import cv2

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, size)
    assert writer.isOpened(), "OpenCV cannot write MJPG here"
    try:
        for f in frames:
            f = np.repeat(f[:, :, None], 3, axis=2) if f.ndim == 2 else f
            writer.write(cv2.cvtColor(cv2.resize(f, size, interpolation=cv2.INTER_AREA), cv2.COLOR_RGB2BGR))
    finally:
        writer.release()
    return path


def real_photos(n: int, seed: int = 0) -> list[np.ndarray]:
    """``n`` infant photos (RGB), a seeded pick from ../shared/data/infant; read only, never copied in."""
    from infantino.edge_runtime.core.preprocess import decode_rgb

    root = require_data("infant")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    pick = np.random.default_rng(seed).choice(len(files), size=min(n, len(files)), replace=False)
    return [decode_rgb(files[i]) for i in pick]


def read_frames(path: Path) -> list[np.ndarray]:
    """Every frame of a video as RGB, the way the watch reads it."""
    import cv2

    cap = cv2.VideoCapture(str(path))
    out = []
    while True:
        ok, bgr = cap.read()
        if not ok:
            break
        out.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    cap.release()
    return out


def synthetic_frames(labels: Sequence[int], seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [synthetic_face(int(y), rng) for y in labels]


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def frame_lines(state: Path) -> list[dict]:
    return [r for p in sorted((state / "watch").glob("frames-*.jsonl")) for r in records(p)]


def start_watch(args: Sequence[str], env: Optional[dict] = None) -> subprocess.Popen:
    """``infantino-edge watch ...`` as a child process (stdout, stderr piped, text)."""
    return subprocess.Popen([sys.executable, "-m", "infantino.edge_runtime.cli", "watch", *args], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **(env or {})})


def wait_for(check: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.1) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> tuple[int, str, str]:
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=timeout_s)
    return proc.returncode, out, err
