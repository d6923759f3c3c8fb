"""What a frame costs on top of its models: ``Device.predict`` against the bare models, in one run.

    python bench/bench_frame_cost.py [--model-dir data/models] [--frames 400] [--photos 40] [--quick]
                                     [--out bench/results/frame_cost.json]

At 1 thread (ONNX Runtime and numpy's BLAS), on 640x480 RGB camera arrays cut from real infant
photos (../shared/data/infant, never copied into the repository):

* **bare**: the package's own BlazeFace session on the letterboxed frame (the detector's resize
  included) and its own extractor session (int8 when the package has it) on the face crop the
  device cuts from that frame, resized to the model input and normalised: the models and the two
  resizes, nothing else;
* **predict**: ``Device.predict(frame)`` with a camera's config (1 thread, at most one queued frame
  per 10 s): decoding, face finding, cropping, embedding, the head, the camera's own adaptation,
  the uncertainty, the frame key, the check for another process's snapshot (one stat of the
  state folder once its last change is ``SETTLED_NS`` old, as on a camera that runs for hours).

Both are timed frame by frame, alternating, over the same frames, so load from other processes
lands on both alike; the ratio of the p50s is the overhead. ``--quick`` is the CI size.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # numpy's BLAS at one thread, like the models
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from infantino.edge_runtime.core.datasets import data_root  # noqa: E402
from infantino.edge_runtime.device import Device, DeviceConfig  # noqa: E402
from infantino.edge_runtime.core.preprocess import decode_rgb, normalize, resize_face  # noqa: E402
from infantino.edge_runtime.state import SETTLED_NS  # noqa: E402

from _timing import percentiles  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SIZE = (640, 480)


def camera_frames(photos: int, seed: int = 0) -> list[np.ndarray]:
    """640x480 RGB frames: each photo scaled to cover the frame and cut at its centre."""
    import cv2

    root = data_root() / "infant"
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp"))
    if not files:
        raise SystemExit(f"bench_frame_cost: no infant photos under {root} (set INFANTINO_DATA)")
    pick = np.random.default_rng(seed).choice(len(files), size=min(photos, len(files)), replace=False)
    frames = []
    for i in pick:
        rgb = decode_rgb(files[i])
        scale = max(SIZE[0] / rgb.shape[1], SIZE[1] / rgb.shape[0])
        big = cv2.resize(rgb, (max(SIZE[0], round(rgb.shape[1] * scale)), max(SIZE[1], round(rgb.shape[0] * scale))),
                         interpolation=cv2.INTER_AREA)
        y0, x0 = (big.shape[0] - SIZE[1]) // 2, (big.shape[1] - SIZE[0]) // 2
        frames.append(np.ascontiguousarray(big[y0: y0 + SIZE[1], x0: x0 + SIZE[0]]))
    return frames


class BareModels:
    """The device's own two sessions, called directly: the floor a frame cannot go below."""

    def __init__(self, device: Device):
        self.detector = device.finder.blazeface
        if self.detector is None:
            raise SystemExit("bench_frame_cost: the package has no BlazeFace detector")
        self.extractor, self.spec = device.extractor, device.spec

    def __call__(self, frame: np.ndarray, crop: np.ndarray) -> None:
        x, _ = self.detector.tensor(frame)  # letterbox: the detector's resize
        self.detector.session.run(None, {self.detector.input_name: x})
        face = normalize(resize_face(crop, self.spec), self.spec)[None]  # the crop's resize to the model input
        self.extractor.session.run([self.extractor.output_name], {self.extractor.input_name: face})


def measure(model_dir: Path, frames: list[np.ndarray], n: int, warmup: int = 20) -> dict:
    """p50/p95 of the bare models and of ``Device.predict``, alternating frame by frame."""
    with tempfile.TemporaryDirectory() as state:
        device = Device(model_dir, state, DeviceConfig(threads=1, queue_min_interval_s=10.0))
        bare = BareModels(device)
        crops = [device.finder.crop(f).pixels for f in frames]  # the crop the device cuts, cut once here
        for f in frames[:warmup]:
            device.predict(f)
        time.sleep(SETTLED_NS / 1e9)  # a camera runs for hours: the state folder's last change is older than this
        t_bare, t_pred = [], []
        for k in range(warmup + n):
            i = k % len(frames)
            t0 = time.perf_counter()
            bare(frames[i], crops[i])
            t1 = time.perf_counter()
            device.predict(frames[i])
            t2 = time.perf_counter()
            if k >= warmup:
                t_bare.append(t1 - t0)
                t_pred.append(t2 - t1)
        faces = sum(device.predict(f, enqueue=False).face_found for f in frames)
    bare_p, pred_p = percentiles(t_bare), percentiles(t_pred)
    return {"bare_ms": bare_p, "predict_ms": pred_p, "ratio_p50": round(pred_p["p50"] / bare_p["p50"], 3),
            "overhead_ms_p50": round(pred_p["p50"] - bare_p["p50"], 4), "frames_with_face": faces,
            "distinct_frames": len(frames), "extractor": device.extractor_role}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, default=Path(__file__).resolve().parents[1] / "data" / "models")
    ap.add_argument("--frames", type=int, default=400, help="timed frames (each timed bare and predicted)")
    ap.add_argument("--photos", type=int, default=40, help="distinct camera frames, cycled")
    ap.add_argument("--quick", action="store_true", help="CI size: 30 frames of 5 photos")
    ap.add_argument("--out", type=Path, default=RESULTS / "frame_cost.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.frames, args.photos = 30, 5
    try:
        from threadpoolctl import threadpool_limits
        limits = threadpool_limits(limits=1)
    except ImportError:  # the env variables above hold then
        limits = None
    result = {"size": list(SIZE), "threads": 1, **measure(args.model_dir, camera_frames(args.photos), args.frames)}
    if limits is not None:
        limits.restore_original_limits()
    print(f"bare models p50 {result['bare_ms']['p50']:.2f} ms, Device.predict p50 {result['predict_ms']['p50']:.2f} ms: "
          f"{result['ratio_p50']:.2f}x ({result['frames_with_face']}/{result['distinct_frames']} frames with a face)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
