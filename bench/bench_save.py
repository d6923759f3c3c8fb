"""What one ``Device.save`` costs after 1, 120 and 1000 labels (snapshot + kept crops + fsyncs).

Teaches a device labelled face crops with autosave off, and at each checkpoint times
``repeats`` saves, each right after one more label (so the kept crops changed, as after a
caregiver's label). Writes ``{tag: {labels: {"p50", "p95", "n"}}}`` into the results file,
keeping the other tags (e.g. ``before`` and ``after`` a change of the state format).

    python bench/bench_save.py [--model-dir data/models] [--tag after] [--no-fsync] [--out bench/results/save.json]

Under load the fsyncs dominate and vary by tens of ms: ``kib_written`` is the stable number,
``--no-fsync`` times the rest.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from infantino.edge_runtime.device import Device, DeviceConfig, default_model_dir
from infantino.export.tiny_package import synthetic_face

RESULTS = Path(__file__).parent / "results"


def _bytes_written() -> int:
    """Bytes this process has written so far (Linux ``/proc/self/io`` ``wchar``; 0 elsewhere)."""
    try:
        text = Path("/proc/self/io").read_text()
    except OSError:
        return 0
    return int(next(line.split()[1] for line in text.splitlines() if line.startswith("wchar")))


def measure(model_dir: Path, checkpoints: list[int], repeats: int, threads: int = 1) -> dict:
    """{labels: p50/p95 of a save right after one more label}, on a fresh state folder."""
    config = DeviceConfig(detect_faces=False, autosave=False, threads=threads)
    rng = np.random.default_rng(0)
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        device = Device(model_dir, Path(tmp) / "state", config)
        n_classes = len(device.classes)
        taught = 0
        for target in checkpoints:
            while taught < target - 1:
                device.learn(synthetic_face(taught % n_classes, rng), taught % n_classes, save=False)
                taught += 1
            times, written = [], []
            for _ in range(repeats):
                device.learn(synthetic_face(taught % n_classes, rng), taught % n_classes, save=False)
                taught += 1
                before, start = _bytes_written(), time.perf_counter()
                device.save()
                times.append(time.perf_counter() - start)
                written.append(_bytes_written() - before)
            ms = np.asarray(times) * 1e3
            out[str(target)] = {"p50": round(float(np.percentile(ms, 50)), 2), "p95": round(float(np.percentile(ms, 95)), 2),
                                "n": repeats, "kib_written": round(float(np.median(written)) / 1024, 1),
                                "kept_crops": len(device.samples)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, default=None, help="model package (default: the repository's data/models)")
    ap.add_argument("--labels", type=int, nargs="+", default=[1, 120, 1000], help="checkpoints, in labels taught")
    ap.add_argument("--repeats", type=int, default=9, help="saves timed at each checkpoint")
    ap.add_argument("--tag", default="current", help="key to file the numbers under (e.g. before, after)")
    ap.add_argument("--out", type=Path, default=RESULTS / "save.json")
    ap.add_argument("--no-fsync", action="store_true",
                    help="os.fsync made a no-op: the encoding and writing alone, without waiting for the disk")
    args = ap.parse_args()
    if args.no_fsync:
        os.fsync = lambda fd: None
    result = measure(args.model_dir or default_model_dir(), sorted(args.labels), args.repeats)
    for labels, row in result.items():
        print(f"save after {labels:>5} labels: p50 {row['p50']:7.2f} ms  p95 {row['p95']:7.2f} ms  {row['kib_written']:7.1f} KiB written  ({row['kept_crops']} crops kept)")
    old = json.loads(args.out.read_text()) if args.out.exists() else {}
    old[args.tag] = {"model_dir": str(args.model_dir or default_model_dir()), "unit": "ms", "saves": result,
                     "load_avg_1min": round(os.getloadavg()[0], 2), "cpus": os.cpu_count(), "fsync": not args.no_fsync}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(old, indent=2) + "\n")


if __name__ == "__main__":
    main()
