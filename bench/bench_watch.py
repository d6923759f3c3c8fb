"""Camera runtime benchmark: `infantino-edge watch` on a 640x480 video of real infant photos.

    python bench/bench_watch.py [--model-dir data/models] [--frames 20000] [--seconds 120] [--quick]
                                [--out bench/results/watch.json]

At 1 ONNX Runtime thread, in this process, with the real ``Watch`` (reader thread, device,
queue policy, distress monitor, timeline files with an fsync per line):

* **sustained fps**: the video looped ``--fast`` with every frame analysed, ``--frames`` of
  them (default 20,000); frames / wall time, and that run's CPU share;
* **RSS** sampled along that run: at 10 % of the frames (warm) and at the end, the growth;
* **CPU share at 2 fps**: the video played in real time at ``--fps 2`` for ``--seconds``;
  process CPU time (all threads: decoding the 25 fps video included) / wall time, as a share
  of one core; and the frame-to-timeline latency p50/p95 (grab -> line written);
* **timeline bytes per day at 2 fps**: mean frame-line and minute-line sizes of the run,
  times 172,800 frames and 1,440 minutes.

The video (``--photos`` photos, 1 s each at 25 fps, a slow pan across each) is written to a
temporary folder; the photos are read from ../shared/data/infant and never copied into the
repository. ``--quick`` is the CI size (60 frames, 3 s).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
from infantino.edge_runtime.core.datasets import data_root
from infantino.edge_runtime.device import Device, DeviceConfig
from infantino.edge_runtime.watch.loop import Watch, WatchSettings
from infantino.edge_runtime.watch.sources import open_source, parse_source
from infantino.edge_runtime.watch.status import rss_mb

from _timing import percentiles

SIZE = (640, 480)
SOURCE_FPS = 25


def make_video(path: Path, photos: int, seconds_each: float = 1.0, seed: int = 0) -> dict:
    """A 640x480 MJPG video: each photo scaled to cover the frame, panned slowly for ``seconds_each``."""
    import cv2

    from infantino.edge_runtime.core.preprocess import decode_rgb

    root = data_root() / "infant"
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp"))
    if not files:
        raise SystemExit(f"bench_watch: no infant photos under {root} (set INFANTINO_DATA)")
    pick = np.random.default_rng(seed).choice(len(files), size=min(photos, len(files)), replace=False)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), SOURCE_FPS, SIZE)
    n = int(seconds_each * SOURCE_FPS)
    for i in pick:
        rgb = decode_rgb(files[i])
        scale = max(SIZE[0] * 1.1 / rgb.shape[1], SIZE[1] * 1.1 / rgb.shape[0])
        big = cv2.resize(rgb, (int(rgb.shape[1] * scale) + 1, int(rgb.shape[0] * scale) + 1), interpolation=cv2.INTER_AREA)
        for k in range(n):  # a pan of ~10 % of the frame over the photo's second
            dx = int((big.shape[1] - SIZE[0]) * k / max(n - 1, 1))
            writer.write(cv2.cvtColor(big[: SIZE[1], dx: dx + SIZE[0]], cv2.COLOR_RGB2BGR))
    writer.release()
    return {"photos": len(pick), "frames": len(pick) * n, "fps": SOURCE_FPS, "size": list(SIZE), "codec": "MJPG"}


def run_watch(model: Path, state: Path, video: Path, settings: WatchSettings, sample_every_s: float = 0.5) -> dict:
    """One ``Watch`` over ``video``; wall time, CPU time, RSS along the run, the watch's own counts."""
    device = Device(model, state, DeviceConfig(threads=1))
    watch = Watch(device, open_source(parse_source(str(video))), settings, out=io.StringIO())
    trace: list[tuple[int, float]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(sample_every_s):
            trace.append((watch.board.frames, rss_mb()))

    sampler = threading.Thread(target=sample, daemon=True)
    rss_open = rss_mb()
    cpu0, t0 = time.process_time(), time.perf_counter()
    sampler.start()
    watch.run()
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    done.set()
    sampler.join()
    trace.append((watch.board.frames, rss_mb()))
    return {"wall_s": wall, "cpu_s": cpu, "frames": watch.board.frames, "faces": watch.board.faces,
            "queued": watch.board.queued, "dropped": watch.slot.dropped, "latency_s": list(watch.board.latency_s),
            "rss_open_mb": rss_open, "trace": trace, "folder": watch.folder}


def timeline_bytes_per_day(folder: Path, fps: float = 2.0) -> dict:
    """Mean line sizes of the run's frame and minute files, scaled to a day at ``fps``."""
    def mean_line(pattern: str) -> tuple[float, int]:
        sizes = [len(line) for p in folder.glob(pattern) for line in p.read_bytes().splitlines(keepends=True)]
        return (float(np.mean(sizes)) if sizes else 0.0), len(sizes)

    frame, n_frames = mean_line("frames-*.jsonl")
    minute, n_minutes = mean_line("minutes-*.jsonl")
    per_day = frame * fps * 86400 + minute * 1440
    return {"frame_line_bytes": round(frame, 1), "minute_line_bytes": round(minute, 1), "frame_lines": n_frames,
            "minute_lines": n_minutes, "bytes_per_day": int(per_day), "mb_per_day": round(per_day / 2**20, 2)}


def rss_growth(trace: list[tuple[int, float]], frames: int) -> dict:
    """RSS once warm (10 % of the frames) and at the end."""
    warm = next((r for f, r in trace if f >= 0.1 * frames), trace[0][1])
    end = trace[-1][1]
    return {"warm_mb": round(warm, 1), "end_mb": round(end, 1), "growth_mb": round(end - warm, 2),
            "peak_mb": round(max(r for _, r in trace), 1), "samples": len(trace)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", type=Path, default=REPO / "data" / "models")
    ap.add_argument("--frames", type=int, default=20_000, help="frames analysed in the sustained run")
    ap.add_argument("--seconds", type=float, default=120.0, help="length of the real-time 2 fps run")
    ap.add_argument("--photos", type=int, default=40)
    ap.add_argument("--quick", action="store_true", help="CI size: 60 frames, 3 s, 4 photos")
    ap.add_argument("--out", type=Path, default=RESULTS / "watch.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.frames, args.seconds, args.photos = 60, 3.0, 4
    import cv2

    with tempfile.TemporaryDirectory(prefix="bench-watch-") as tmp:
        tmp = Path(tmp)
        video_info = make_video(tmp / "nursery.avi", args.photos)
        fast = run_watch(args.model_dir, tmp / "state-fast", tmp / "nursery.avi",
                         WatchSettings(fps=1000.0, fast=True, loop=True, max_frames=args.frames, status_every_s=3600))
        paced = run_watch(args.model_dir, tmp / "state-2fps", tmp / "nursery.avi",
                          WatchSettings(fps=2.0, loop=True, max_frames=max(2, int(args.seconds * 2)), status_every_s=3600))
        report = {
            "machine": {"cpus": os.cpu_count(), "load_avg": [round(x, 2) for x in os.getloadavg()], "onnx_threads": 1,
                        "opencv_threads": cv2.getNumThreads()},
            "package": str(args.model_dir), "video": video_info,
            "sustained": {"frames": fast["frames"], "wall_s": round(fast["wall_s"], 2),
                          "fps": round(fast["frames"] / fast["wall_s"], 2), "cpu_share_of_one_core": round(fast["cpu_s"] / fast["wall_s"], 3),
                          "face_share": round(fast["faces"] / max(fast["frames"], 1), 3), "queued": fast["queued"],
                          "latency_ms": percentiles(fast["latency_s"])},
            "rss": {"frames": fast["frames"], "after_open_mb": round(fast["rss_open_mb"], 1), **rss_growth(fast["trace"], fast["frames"])},
            "at_2fps": {"seconds": round(paced["wall_s"], 2), "frames": paced["frames"], "dropped": paced["dropped"],
                        "cpu_share_of_one_core": round(paced["cpu_s"] / paced["wall_s"], 4),
                        "latency_ms": percentiles(paced["latency_s"])},
            "timeline": timeline_bytes_per_day(fast["folder"]),
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    s, r, p, t = report["sustained"], report["rss"], report["at_2fps"], report["timeline"]
    print(f"sustained: {s['fps']:.1f} frames/s analysed over {s['frames']} frames (1 ONNX thread, CPU {s['cpu_share_of_one_core']:.0%} of a core)")
    print(f"RSS: {r['warm_mb']:.0f} MB warm -> {r['end_mb']:.0f} MB after {r['frames']} frames (growth {r['growth_mb']:+.1f} MB)")
    print(f"2 fps real time: CPU {p['cpu_share_of_one_core']:.1%} of one core; frame-to-timeline latency "
          f"p50 {p['latency_ms']['p50']:.1f} ms, p95 {p['latency_ms']['p95']:.1f} ms")
    print(f"timeline: {t['mb_per_day']:.1f} MB/day at 2 fps ({t['frame_line_bytes']:.0f} B a frame line); wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
