"""Device benchmark: the predict path, learn, and the peak memory of a device process.

    python bench/bench_edge.py [--model-dir data/models] [--n 200]
        latency at 1 thread (decode, Haar, extractor int8/fp32, whole predict on a 640x480
        JPEG and on a camera array, learn with a cached embedding, learn + save, queueing a
        frame), peak RSS of a process that predicts and learns, scikit-learn's partial_fit
        for comparison. Prints a table, writes bench/results/edge.json.

    python bench/bench_edge.py --sweep [--model-dir data/models]
        the learning settings on real data: infant photos split 75/25 (three seeded splits,
        three stream orders each), accuracy on held-out infant photos and on held-out adult
        FER faces after streaming the infant training part. Writes bench/results/edge_sweep.json.

    python bench/bench_edge.py --prepare-real /tmp/edge-real
        folders for `infantino-edge evaluate` on real data, outside the repository: the infant
        split (symbolic links), the package's held-out FER faces as PNG, and a replay seed of
        FER training embeddings (64 per class) for packages that do not carry one yet.

Real data is read from ../shared/data and never copied into the repository.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
RESULTS = Path(__file__).parent / "results"
sys.path.insert(0, str(REPO))

from edge_runtime.device import Device, DeviceConfig  # noqa: E402
from edge_runtime.imagefolder import list_image_folder, split_items, write_split  # noqa: E402
from edge_runtime.metrics import confusion_matrix, macro_f1  # noqa: E402
from edge_runtime.preprocess import CLASSES, ImageError, faces_tensor  # noqa: E402
from edge_runtime.replay import balanced_indices  # noqa: E402
from edge_runtime.splits import stratified_split  # noqa: E402


def _ms(times: list[float]) -> dict:
    a = np.asarray(times) * 1e3
    return {"p50": round(float(np.percentile(a, 50)), 3), "p95": round(float(np.percentile(a, 95)), 3), "n": len(a)}


def _timeit(fn, n: int, warmup: int = 5) -> dict:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return _ms(out)


def camera_frame(seed: int = 0) -> np.ndarray:
    """A 640x480 RGB frame: a real infant photo scaled to cover it when the data is here, else noise."""
    from PIL import Image

    from edge_runtime.preprocess import crop_face, decode_gray

    root = SHARED / "infant"
    if root.is_dir():
        for path, _ in list_image_folder(root):
            try:
                if not crop_face(decode_gray(path)).face_found:
                    continue
                img = Image.open(path).convert("RGB")
            except (ImageError, OSError):
                continue
            scale = max(640 / img.width, 480 / img.height)
            img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BILINEAR)
            left, top = (img.width - 640) // 2, (img.height - 480) // 2
            return np.asarray(img.crop((left, top, left + 640, top + 480)))
    return np.random.default_rng(seed).integers(0, 255, (480, 640, 3), dtype=np.uint8)


def jpeg(frame: np.ndarray, quality: int = 90) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return float("nan")


# --------------------------------------------------------------------------- latency (child process)


def device_process(model_dir: str, n: int, frame_path: str, threads: int = 1) -> dict:
    """Everything a device does, at ``threads`` threads, in a fresh process: its peak RSS is the device's.

    The device work runs first and the peak is read before the per-stage timings, which
    load a second (fp32) extractor a device would not hold."""
    import cv2

    from edge_runtime.extractor import Extractor
    from edge_runtime.preprocess import crop_face, decode_gray, detect_faces, prepare

    cv2.setNumThreads(threads)
    rss_imports = _rss_mb()
    data = Path(frame_path).read_bytes()
    frame = np.load(frame_path + ".npy")
    out: dict = {"frame": {"size": f"{frame.shape[1]}x{frame.shape[0]}", "jpeg_bytes": len(data)}}
    with tempfile.TemporaryDirectory() as tmp:
        device = Device(model_dir, Path(tmp) / "state", DeviceConfig(threads=threads))
        rss_open = _rss_mb()
        out["predict_jpeg_ms"] = _timeit(lambda: device.predict(data, enqueue=False), n)
        out["predict_camera_array_ms"] = _timeit(lambda: device.predict(frame, enqueue=False), n)
        empty = jpeg(np.ascontiguousarray(frame[::-1]))  # the same photo upside down: a frontal detector finds no face
        out["no_face_frame_face_found"] = device.predict(empty, enqueue=False).face_found
        out["predict_jpeg_no_face_ms"] = _timeit(lambda: device.predict(empty, enqueue=False), max(10, n // 4))
        batch = [frame] * 8
        t8 = _timeit(lambda: device.predict_batch(batch, enqueue=False), max(10, n // 8))
        out["predict_batch8_ms_per_frame"] = {"p50": t8["p50"] / 8, "p95": t8["p95"] / 8, "n": t8["n"]}
        # learn: distinct frames (shifted), each predicted first, as a caregiver would label them
        frames = [jpeg(np.roll(frame, 3 * i, axis=1), 85) for i in range(n)]
        learn_t, save_t = [], []
        for i, f in enumerate(frames):
            device.predict(f, enqueue=False)
            t = time.perf_counter()
            device.learn(f, CLASSES[i % 7], save=False)
            learn_t.append(time.perf_counter() - t)
            t = time.perf_counter()
            device.save()
            save_t.append(time.perf_counter() - t)
        out["learn_cached_ms"] = _ms(learn_t)
        out["save_state_ms"] = _ms(save_t)
        q = []
        for i in range(min(n, 100)):
            crop = np.full((64, 64), i, np.uint8)
            t = time.perf_counter()
            device.queue.add(crop, predicted="sad", uncertainty=0.9, probabilities=[1 / 7] * 7, face_found=True, frame_key=f"{i:08x}")
            q.append(time.perf_counter() - t)
        out["queue_add_ms"] = _ms(q)
        out["counters"] = dict(device.counters)
        out["snapshot_bytes"] = device.store.generations()[0][1].stat().st_size
        out["rss_mb"] = {"after_imports": round(rss_imports, 1), "after_open": round(rss_open, 1),
                         "peak_device": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
        out["sklearn_imported"] = "sklearn" in sys.modules or "scipy" in sys.modules
        # the stages one by one
        gray = decode_gray(data)
        out["frame"]["face_found"] = crop_face(gray).face_found
        out["decode_jpeg_ms"] = _timeit(lambda: decode_gray(data), n)
        out["haar_detect_ms"] = _timeit(lambda: detect_faces(gray), n)
        out["haar_coarse_ms"] = _timeit(lambda: detect_faces(gray, max_side=device.config.detect_coarse_side or 160), n)
        out["haar_full_frame_ms"] = _timeit(lambda: detect_faces(gray, max_side=10_000), max(10, n // 10))
        tensor = prepare(data, device.spec).tensor
        from edge_runtime.uncertainty import Uncertainty

        emb = device.extractor(tensor)
        out["head_and_uncertainty_ms"] = _timeit(lambda: Uncertainty.of(device.head.predict_proba(emb)[0]), n)
        for role in ("extractor_int8", "extractor"):
            if device.package.has(role):
                ex = Extractor(device.package.path(role), threads=threads)
                out[f"{role}_ms_per_face"] = _timeit(lambda: ex(tensor), n)
    return out


def sklearn_comparison(model_dir: str, n: int) -> dict:
    """The same update through MLPClassifier.partial_fit, and our numpy step, in this process."""
    from edge_runtime.head import OnlineHead
    from edge_runtime.package import open_package

    head = OnlineHead.load(open_package(model_dir).path("head"))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(25, head.input_dim)).astype(np.float32)  # 1 new + 8 replayed + 16 source
    y = rng.integers(0, 7, 25)
    ref, fast = head.copy(), head.copy()
    ref.clf  # build the sklearn object outside the timing
    return {"partial_fit_ms": _timeit(lambda: ref.clf.partial_fit(x, y), n),
            "learn_step_ms": _timeit(lambda: fast.learn_step(x, y), n),
            "predict_proba_sklearn_ms": _timeit(lambda: ref.clf.predict_proba(x[:1]), n),
            "predict_proba_numpy_ms": _timeit(lambda: fast.predict_proba(x[:1]), n)}


def latency(args: argparse.Namespace) -> None:
    t = str(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": t, "OPENBLAS_NUM_THREADS": t}
    with tempfile.TemporaryDirectory() as tmp:
        frame = camera_frame()
        frame_path = Path(tmp) / "frame.jpg"
        frame_path.write_bytes(jpeg(frame))
        np.save(str(frame_path) + ".npy", frame)
        r = subprocess.run([sys.executable, __file__, "--child", str(frame_path), "--model-dir", str(args.model_dir), "--n", str(args.n),
                            "--threads", t],
                           capture_output=True, text=True, env=env, cwd=REPO)
    if r.returncode:
        sys.exit(f"device process failed: {r.stderr.strip()[-2000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res["sklearn"] = sklearn_comparison(str(args.model_dir), args.n)
    from edge_runtime.package import open_package

    res["package"] = open_package(args.model_dir, verify=False).version
    res["machine"] = {"cpus": os.cpu_count(), "loadavg_1min": os.getloadavg()[0], "threads": args.threads}
    rows = [("decode 640x480 JPEG", res["decode_jpeg_ms"]), ("Haar on 160 px copy", res["haar_coarse_ms"]),
            ("Haar on 320 px copy", res["haar_detect_ms"]),
            ("Haar on the full frame", res["haar_full_frame_ms"])]
    rows += [(f"{r} per face", res[f"{r}_ms_per_face"]) for r in ("extractor_int8", "extractor") if f"{r}_ms_per_face" in res]
    rows += [("predict, JPEG bytes", res["predict_jpeg_ms"]), ("predict, camera array", res["predict_camera_array_ms"]),
             ("predict, JPEG without a face", res["predict_jpeg_no_face_ms"]),
             ("predict, batch of 8, per frame", res["predict_batch8_ms_per_frame"]),
             ("head + uncertainty", res["head_and_uncertainty_ms"]),
             ("learn, cached embedding", res["learn_cached_ms"]), ("save state snapshot", res["save_state_ms"]),
             ("queue an uncertain frame", res["queue_add_ms"]),
             ("sklearn partial_fit (same batch)", res["sklearn"]["partial_fit_ms"]),
             ("numpy learn_step (same batch)", res["sklearn"]["learn_step_ms"])]
    print(f"package {res['package']}, {args.threads} thread(s), load average {res['machine']['loadavg_1min']:.1f} on {res['machine']['cpus']} CPUs")
    print(f"{'step':36s} {'p50 ms':>8s} {'p95 ms':>8s}")
    for name, t in rows:
        print(f"{name:36s} {t['p50']:8.2f} {t['p95']:8.2f}")
    rss = res["rss_mb"]
    print(f"RSS of the device process: {rss['after_imports']} MB after imports, {rss['after_open']} MB after opening, "
          f"{rss['peak_device']} MB peak after {args.n} predicts, learns and saves (sklearn/scipy imported: {res['sklearn_imported']})")
    out = Path(args.out or RESULTS / ("edge.json" if args.threads == 1 else f"edge_t{args.threads}.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"written to {out}")


# --------------------------------------------------------------------------- real data


def _fer(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """FER images, labels, and the package's split: 10 % per class held out, seed 0 (see its manifest)."""
    with np.load(path, allow_pickle=False) as d:
        images, labels = d["images"], d["labels"]
    keep, held = stratified_split(labels, 0.1, 0)
    return images, labels, keep, held


def _embed_faces(device: Device, pixels: np.ndarray) -> np.ndarray:
    return np.concatenate([device.extractor(faces_tensor(list(pixels[i : i + 256]), device.spec)) for i in range(0, len(pixels), 256)])


def make_replay_seed(device: Device, fer: Path, out: Path, per_class: int = 64) -> Path:
    """64 FER *training* faces per class, embedded with the device's extractor."""
    images, labels, keep, _ = _fer(fer)
    idx = keep[balanced_indices(labels[keep], per_class, np.random.default_rng(0))]
    np.savez(out, x=_embed_faces(device, images[idx]), y=labels[idx].astype(np.int64))
    return out


def prepare_real(args: argparse.Namespace) -> None:
    from PIL import Image

    out = Path(args.prepare_real)
    if out.resolve().is_relative_to(REPO):
        sys.exit("write real-data folders outside the repository")
    parts = split_items(list_image_folder(SHARED / "infant"), {"train": 0.75, "test": 0.25}, seed=args.seed)
    roots = write_split(parts, out / "infant")
    images, labels, _, held = _fer(SHARED / "fer2013" / "fer2013_train.npz")
    for i in held:
        p = out / "fer_heldout" / CLASSES[labels[i]] / f"{i:05d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(p)
    with tempfile.TemporaryDirectory() as tmp:
        device = Device(args.model_dir, tmp, DeviceConfig(threads=2))
        seed = make_replay_seed(device, SHARED / "fer2013" / "fer2013_train.npz", out / "replay_seed.npz")
    print(f"infant split: {len(parts['train'])} train / {len(parts['test'])} test under {out / 'infant'}; "
          f"{len(held)} held-out FER faces under {out / 'fer_heldout'}; replay seed {seed}")
    print(f"infantino-edge evaluate --test {roots['test']} --crop-test {out / 'fer_heldout'} --stream {roots['train']} "
          f"--model-dir {args.model_dir} --seed 0 [--replay-seed {seed}] --json OUT.json --plot OUT.png")


def sweep(args: argparse.Namespace) -> None:
    """Embed once, then replay the stream under each setting through the real Device code."""
    t0 = time.time()
    items = list_image_folder(SHARED / "infant")
    with tempfile.TemporaryDirectory() as tmp:
        base = DeviceConfig(threads=2, autosave=False)
        device = Device(args.model_dir, Path(tmp) / "state", base)
        emb, ok = np.zeros((len(items), device.dim), np.float32), np.zeros(len(items), bool)
        for i, (path, _) in enumerate(items):
            try:
                emb[i] = device.embed(path)
                ok[i] = True
            except ImageError:
                pass
        index = {str(p): i for i, (p, _) in enumerate(items)}
        y_all = np.array([y for _, y in items])
        images, labels, _, held = _fer(SHARED / "fer2013" / "fer2013_train.npz")
        fer_x, fer_y = _embed_faces(device, images[held]), labels[held]
        seed_path = make_replay_seed(device, SHARED / "fer2013" / "fer2013_train.npz", Path(tmp) / "seed.npz")
        print(f"embedded {ok.sum()} infant photos and {len(fer_y)} held-out FER faces in {time.time() - t0:.0f} s")

        splits = []
        for s in range(3):
            parts = split_items(items, {"train": 0.75, "test": 0.25}, seed=s)
            tr = np.array([index[str(p)] for p, _ in parts["train"] if ok[index[str(p)]]])
            te = np.array([index[str(p)] for p, _ in parts["test"] if ok[index[str(p)]]])
            splits.append((tr, te))

        def acc(x, y) -> float:
            return float(np.mean(device.head.predict_proba(x).argmax(1) == y))

        def f1(x, y) -> float:
            return macro_f1(confusion_matrix(y, device.head.predict_proba(x).argmax(1), len(CLASSES)))

        grid = [("no replay, no anchor", dict(replay_mix=0, source_mix=0, anchor_strength=0.0), False)]
        grid += [(f"replay {r}", dict(replay_mix=r, source_mix=0, anchor_strength=0.0), False) for r in (8, 16)]
        grid += [(f"replay 8 + L2-SP {a}", dict(replay_mix=8, source_mix=0, anchor_strength=a), False) for a in (0.3, 1.0, 3.0)]
        grid += [(f"replay {r} + source {m}", dict(replay_mix=r, source_mix=m, anchor_strength=0.0), True) for r in (8, 16) for m in (8, 16, 32)]
        grid += [("replay 8 + source 16 + L2-SP 1", dict(replay_mix=8, source_mix=16, anchor_strength=1.0), True)]
        grid += [("defaults, no holdout/guard", dict(holdout_every=0), True), ("defaults, no holdout/guard, no seed", dict(holdout_every=0), False)]
        grid += [("defaults", {}, True), ("defaults, no seed", {}, False)]
        rows = []
        device._fresh_state()
        before = [(acc(emb[te], y_all[te]), acc(fer_x, fer_y), f1(emb[te], y_all[te])) for _, te in splits]
        for name, kw, use_seed in grid:
            cfg = replace(base, **kw, replay_seed=str(seed_path) if use_seed else None)
            device.config = cfg
            device.source = device._load_source()
            res = []
            for si, (tr, te) in enumerate(splits):
                for order in range(3):
                    device.config = replace(cfg, seed=order)
                    device._fresh_state()
                    seq = tr[np.random.default_rng(order).permutation(len(tr))]
                    first = seq[: len(seq) // 2]
                    for k, i in enumerate(seq, start=1):
                        device.learn(emb[i], int(y_all[i]), save=False)
                        if k == len(first):
                            known_mid = acc(emb[first], y_all[first])
                    res.append((acc(emb[te], y_all[te]), acc(fer_x, fer_y), device.counters["rollbacks"], f1(emb[te], y_all[te]),
                                known_mid, acc(emb[first], y_all[first])))
            r = np.array(res)
            rows.append({"name": name, "settings": kw, "source_replay": use_seed, "infant_after": float(r[:, 0].mean()),
                         "infant_after_std": float(r[:, 0].std()), "infant_macro_f1_after": float(r[:, 3].mean()),
                         "fer_after": float(r[:, 1].mean()), "rollbacks": float(r[:, 2].mean()),
                         "first_half_known_at_half": float(r[:, 4].mean()), "first_half_known_at_end": float(r[:, 5].mean())})
            print(f"{name:40s} infant {rows[-1]['infant_after']:.3f} ± {rows[-1]['infant_after_std']:.3f} (F1 {rows[-1]['infant_macro_f1_after']:.3f})  "
                  f"FER {rows[-1]['fer_after']:.3f}  first half known {rows[-1]['first_half_known_at_half']:.3f} -> "
                  f"{rows[-1]['first_half_known_at_end']:.3f}  rollbacks {rows[-1]['rollbacks']:.1f}", flush=True)
    b = np.array(before)
    result = {"package": device.package.version, "splits": 3, "orders": 3, "infant_before": float(b[:, 0].mean()),
              "infant_macro_f1_before": float(b[:, 2].mean()),
              "fer_before": float(b[:, 1].mean()), "n_fer_heldout": int(len(fer_y)), "base_config": asdict(base), "rows": rows,
              "seconds": round(time.time() - t0, 1)}
    print(f"before streaming: infant {result['infant_before']:.3f} (F1 {result['infant_macro_f1_before']:.3f}), FER {result['fer_before']:.3f}")
    out = Path(args.out or RESULTS / "edge_sweep.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {out}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", type=Path, default=REPO / "data" / "models")
    p.add_argument("--n", type=int, default=200, help="timed repetitions per step")
    p.add_argument("--out", type=Path, help="JSON output (default: bench/results/edge.json or edge_sweep.json)")
    p.add_argument("--sweep", action="store_true", help="learning settings on real data instead of latency")
    p.add_argument("--prepare-real", metavar="DIR", help="write real-data folders for `infantino-edge evaluate` here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime / OpenCV / BLAS threads of the device process")
    p.add_argument("--child", metavar="FRAME", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(device_process(str(args.model_dir), args.n, args.child, args.threads)))
    elif args.prepare_real:
        prepare_real(args)
    elif args.sweep:
        sweep(args)
    else:
        latency(args)


if __name__ == "__main__":
    main()
