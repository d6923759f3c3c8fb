"""Device benchmark: the predict path, learn, and the peak memory of a device process.

    python bench/bench_edge.py [--model-dir data/models] [--n 200] [--threads 1 2]
                               [--torch-checkpoint CKPT] [--quick] [--out bench/results/edge.json]
        latency, p50/p95, in one fresh device process per thread count: decode, face crop,
        preprocess, extractor int8/fp32 in ONNX Runtime, head predict, whole predict on a
        640x480 JPEG (and on a camera array, without a face, in batches), learn with a cached
        embedding, save, queueing a frame; the peak RSS of that process after it predicts and
        learns; scikit-learn's partial_fit for comparison; and, in the same run, the package's
        ONNX extractors against the same network in PyTorch eager (the checkpoint's weights
        when given, skipped with a note without torch) with FLOPs, achieved GFLOP/s and a
        float32 matmul peak. Prints a table, writes bench/results/edge.json.

    python bench/bench_edge.py --sweep [--model-dir data/models]
        the learning settings on real data: infant photos split 75/25 (three seeded splits,
        three stream orders each), accuracy on held-out infant photos and on held-out adult
        FER faces after streaming the infant training part. Writes bench/results/edge_sweep.json.

    python bench/bench_edge.py --prepare-real /tmp/edge-real [--three-way]
        folders for `infantino-edge evaluate` on real data, outside the repository: the infant
        split (symbolic links), the package's held-out FER faces as PNG, and a replay seed of
        FER training embeddings (64 per class) for packages that do not carry one yet.

Real data is read from ../shared/data and never copied into the repository.
"""
from __future__ import annotations

import argparse
import importlib.util
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
from infantino.edge_runtime.device import Device, DeviceConfig
from infantino.edge_runtime.core.imagefolder import list_image_folder, split_items, write_split
from infantino.edge_runtime.core.metrics import confusion_matrix, macro_f1
from infantino.edge_runtime.core.preprocess import CLASSES, ImageError, faces_tensor
from infantino.edge_runtime.core.replay import balanced_indices
from infantino.edge_runtime.core.splits import stratified_split

from _timing import percentiles, timeit


def camera_frame(seed: int = 0) -> np.ndarray:
    """A 640x480 RGB frame: a real infant photo scaled to cover it when the data is here, else noise."""
    from PIL import Image

    from infantino.edge_runtime.core.preprocess import crop_face, decode_gray

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


def empty_room(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """A 640x480-like frame with no face: smooth shading and a few soft blobs (a cot, a wall),
    the same size and JPEG cost as the camera frame."""
    import cv2

    rng = np.random.default_rng(seed)
    h, w = shape[:2]
    small = rng.uniform(40, 200, (6, 8, 3)).astype(np.float32)
    room = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    room += rng.normal(0, 6, room.shape).astype(np.float32)  # sensor noise
    return np.clip(room, 0, 255).astype(np.uint8)


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

    from infantino.edge_runtime.core.extractor import Extractor
    from infantino.edge_runtime.core.preprocess import decode_gray, decode_rgb, detect_faces, face_tensor, rgb_to_gray

    cv2.setNumThreads(threads)
    rss_imports = _rss_mb()
    data = Path(frame_path).read_bytes()
    frame = np.load(frame_path + ".npy")
    out: dict = {"frame": {"size": f"{frame.shape[1]}x{frame.shape[0]}", "jpeg_bytes": len(data)}}
    with tempfile.TemporaryDirectory() as tmp:
        device = Device(model_dir, Path(tmp) / "state", DeviceConfig(threads=threads))
        rss_open = _rss_mb()
        out["predict_jpeg_ms"] = timeit(lambda: device.predict(data, enqueue=False), n)
        out["predict_camera_array_ms"] = timeit(lambda: device.predict(frame, enqueue=False), n)
        empty = jpeg(empty_room(frame.shape))  # (the photo upside down is not empty: BlazeFace still finds the face)
        out["no_face_frame_face_found"] = device.predict(empty, enqueue=False).face_found
        out["predict_jpeg_no_face_ms"] = timeit(lambda: device.predict(empty, enqueue=False), max(10, n // 4))
        batch = [frame] * 8
        t8 = timeit(lambda: device.predict_batch(batch, enqueue=False), max(10, n // 8))
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
        out["learn_cached_ms"] = percentiles(learn_t)
        out["save_state_ms"] = percentiles(save_t)
        q = []
        for i in range(min(n, 100)):
            crop = np.full((64, 64), i, np.uint8)
            t = time.perf_counter()
            device.queue.add(crop, predicted="sad", uncertainty=0.9, probabilities=[1 / 7] * 7, face_found=True, frame_key=f"{i:08x}")
            q.append(time.perf_counter() - t)
        out["queue_add_ms"] = percentiles(q)
        out["counters"] = dict(device.counters)
        out["snapshot_bytes"] = device.store.generations()[0][1].stat().st_size
        out["rss_mb"] = {"after_imports": round(rss_imports, 1), "after_open": round(rss_open, 1),
                         "peak_device": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
        out["sklearn_imported"] = "sklearn" in sys.modules or "scipy" in sys.modules
        # the stages one by one, as the device runs them on this frame
        finder = device.finder
        bf = finder.blazeface is not None
        rgb = decode_rgb(data)
        gray = rgb_to_gray(rgb)
        face = finder.crop_arrays(rgb if bf else None, gray)
        out["frame"]["face_found"] = face.face_found
        out["face_detector"] = device.spec.face_detector
        out["decode_jpeg_ms"] = timeit(lambda: decode_rgb(data) if bf else decode_gray(data), n)
        out["face_crop_ms"] = timeit(lambda: finder.crop_arrays(rgb if bf else None, gray), n)  # detector + square crop
        out["preprocess_ms"] = timeit(lambda: face_tensor(face.pixels, device.spec), n)  # resize to 64x64 + normalise
        out["prepare_ms"] = timeit(lambda: device.prepare(data), n)  # the three above, through the device
        if bf:
            out["blazeface_detect_ms"] = timeit(lambda: finder.blazeface.detect(rgb), n)
        out["haar_detect_ms"] = timeit(lambda: detect_faces(gray), n)
        out["haar_coarse_ms"] = timeit(lambda: detect_faces(gray, max_side=160), n)
        out["haar_full_frame_ms"] = timeit(lambda: detect_faces(gray, max_side=10_000), max(10, n // 10))
        tensor = face_tensor(face.pixels, device.spec)
        from infantino.edge_runtime.core.uncertainty import Uncertainty

        emb = device.extractor(tensor)
        out["head_predict_ms"] = timeit(lambda: device.head.predict_proba(emb), n)
        out["head_and_uncertainty_ms"] = timeit(lambda: Uncertainty.of(device.head.predict_proba(emb)[0]), n)
        for role in ("extractor_int8", "extractor"):
            if device.package.has(role):
                ex = Extractor(device.package.path(role), threads=threads)
                out[f"{role}_ms_per_face"] = timeit(lambda: ex(tensor), n)
        out["device_extractor_ms_per_face"] = timeit(lambda: device.extractor(tensor), n)  # with its mirror when flip-averaged
    return out


def sklearn_comparison(model_dir: str, n: int) -> dict:
    """The same update through MLPClassifier.partial_fit, and our numpy step, in this process."""
    from infantino.edge_runtime.core.head import OnlineHead
    from infantino.edge_runtime.core.package import open_package

    head = OnlineHead.load(open_package(model_dir).path("head"))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(25, head.input_dim)).astype(np.float32)  # 1 new + 8 replayed + 16 source
    y = rng.integers(0, 7, 25)
    ref, fast = head.to_sklearn(), head.copy()  # the sklearn object is built outside the timing
    return {"partial_fit_ms": timeit(lambda: ref.partial_fit(x, y), n),
            "learn_step_ms": timeit(lambda: fast.learn_step(x, y), n),
            "predict_proba_sklearn_ms": timeit(lambda: ref.predict_proba(x[:1]), n),
            "predict_proba_numpy_ms": timeit(lambda: fast.predict_proba(x[:1]), n)}


STEPS = [  # (table row, JSON key), in the order a frame meets them
    ("decode 640x480 JPEG", "decode_jpeg_ms"), ("face crop (the package's detector + crop)", "face_crop_ms"),
    ("  BlazeFace alone", "blazeface_detect_ms"),
    ("preprocess (resize 64x64 + normalise)", "preprocess_ms"), ("  all three, through the device", "prepare_ms"),
    ("  Haar on a 320 px copy (fallback)", "haar_detect_ms"), ("  Haar on the full frame", "haar_full_frame_ms"),
    ("extractor int8 (ORT), one face", "extractor_int8_ms_per_face"), ("extractor fp32 (ORT), one face", "extractor_ms_per_face"),
    ("the device's extractor call (with the mirror when flip-averaged)", "device_extractor_ms_per_face"),
    ("head predict", "head_predict_ms"), ("head + uncertainty", "head_and_uncertainty_ms"),
    ("whole predict, 640x480 JPEG", "predict_jpeg_ms"), ("whole predict, camera array", "predict_camera_array_ms"),
    ("whole predict, JPEG without a face", "predict_jpeg_no_face_ms"), ("whole predict, batch of 8, per frame", "predict_batch8_ms_per_frame"),
    ("learn, cached embedding", "learn_cached_ms"), ("save state snapshot", "save_state_ms"), ("queue an uncertain frame", "queue_add_ms"),
]


def device_run(args: argparse.Namespace, frame_path: Path, threads: int) -> dict:
    """``device_process`` in a fresh child with every thread pool capped at ``threads``."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads)}
    r = subprocess.run([sys.executable, __file__, "--child", str(frame_path), "--model-dir", str(args.model_dir), "--n", str(args.n),
                        "--threads", str(threads)], capture_output=True, text=True, env=env, cwd=REPO)
    if r.returncode:
        sys.exit(f"device process failed: {r.stderr.strip()[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def torch_column(args: argparse.Namespace, data: bytes) -> dict:
    """The package's ONNX extractors against the same network in PyTorch eager, one face, same run.

    Same weights when ``--torch-checkpoint`` is the package's checkpoint (parity is reported);
    otherwise the manifest's architecture, untrained: latency does not depend on the values."""
    if importlib.util.find_spec("torch") is None:
        return {"skipped": "torch is not installed (it comes with the export extra: pip install -e '.[export]')"}
    from bench_extractors import compare_runtimes, peaks
    from infantino.export.model import EmbeddingExtractor, ModelConfig, build_model
    from infantino.export.train import load_checkpoint

    from infantino.edge_runtime.core.package import open_package
    from infantino.edge_runtime.core.facefinder import prepare

    package = open_package(args.model_dir, verify=False)
    if args.torch_checkpoint:
        net, weights = load_checkpoint(args.torch_checkpoint)[0], str(args.torch_checkpoint)
    else:
        model = package.manifest.model
        fields = {k: model[k] for k in ("arch", "embedding_dim", "num_classes", "in_chans") if k in model}
        try:
            net = build_model(ModelConfig(**fields), imagenet_init=False).eval()
        except Exception as e:  # noqa: BLE001 - an architecture torch cannot build (e.g. a test package)
            return {"skipped": f"cannot build the package's architecture {fields.get('arch')!r} in torch: {e}"}
        weights = "untrained, the manifest's architecture"
    onnx = {prec: package.path(role) for prec, role in (("int8", "extractor_int8"), ("fp32", "extractor")) if package.has(role)}
    peak = peaks(tuple(args.threads))
    from infantino.edge_runtime.core.facefinder import FaceFinder

    tensor = prepare(data, package.manifest.preprocess, finder=FaceFinder.for_package(package)).tensor
    out = compare_runtimes(EmbeddingExtractor(net).eval(), onnx, tensor, args.n, peak, tuple(args.threads))
    if not args.torch_checkpoint:
        out.pop("parity_fp32_max_abs")  # other weights: the outputs differ by design
    return {"arch": package.manifest.model.get("arch", "?"), "weights": weights, "matmul_peak_gflops": peak, **out}


def print_latency(res: dict) -> None:
    threads = list(res["threads"])
    print(f"package {res['package']}, load average {res['machine']['loadavg_1min']:.1f} on {res['machine']['cpus']} CPUs")
    print(f"{'step (ms)':40s}" + "".join(f" {f't{t} p50':>8s} {f't{t} p95':>8s}" for t in threads))
    for name, key in STEPS + [("sklearn partial_fit (same batch as learn)", "partial_fit_ms"), ("numpy learn_step (same batch)", "learn_step_ms")]:
        cells = [res["threads"][t].get(key) or res["sklearn"].get(key) for t in threads]
        if all(cells):
            print(f"{name:40s}" + "".join(f" {c['p50']:8.2f} {c['p95']:8.2f}" for c in cells))
    for t in threads:
        rss = res["threads"][t]["rss_mb"]
        print(f"RSS of the device process at {t} thread(s): {rss['after_imports']} MB after imports, {rss['after_open']} MB after opening, "
              f"{rss['peak_device']} MB peak after {res['n']} predicts, learns and saves")
    col = res["extractor_runtimes"]
    if "skipped" in col:
        print(f"torch column skipped: {col['skipped']}")
    else:
        from bench_extractors import print_rows

        print(f"\nthe package's extractor in ONNX Runtime vs PyTorch eager (weights: {col['weights']}):")
        print_rows([col], col["matmul_peak_gflops"], tuple(int(t) for t in threads))


def latency(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        frame = camera_frame()
        frame_path = Path(tmp) / "frame.jpg"
        frame_path.write_bytes(jpeg(frame))
        np.save(str(frame_path) + ".npy", frame)
        runs = {str(t): device_run(args, frame_path, t) for t in args.threads}
        data = frame_path.read_bytes()
    from infantino.edge_runtime.core.package import open_package

    res = {"package": open_package(args.model_dir, verify=False).version, "n": args.n,
           "machine": {"cpus": os.cpu_count(), "loadavg_1min": os.getloadavg()[0], "threads": args.threads},
           "threads": runs, "sklearn": sklearn_comparison(str(args.model_dir), args.n),
           "extractor_runtimes": torch_column(args, data)}
    print_latency(res)
    out = Path(args.out or RESULTS / "edge.json")
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
    # --three-way: a part to fine-tune an infant-adapted extractor on, a part to stream, a held-out part;
    # the test part is the same photos as the 75/25 split's (same seed, same last quarter)
    fractions = {"finetune": 0.5, "train": 0.25, "test": 0.25} if args.three_way else {"train": 0.75, "test": 0.25}
    parts = split_items(list_image_folder(SHARED / "infant"), fractions, seed=args.seed)
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
    p.add_argument("--three-way", action="store_true", help="with --prepare-real: infant/finetune (50 %%), infant/train "
                                                           "(25 %%, the stream) and infant/test (25 %%)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="ONNX Runtime / OpenCV / BLAS threads of the device process; one run each")
    p.add_argument("--torch-checkpoint", type=Path, help="the package's training checkpoint: the torch column then runs the same weights")
    p.add_argument("--quick", action="store_true", help="CI size: 10 repetitions per step")
    p.add_argument("--child", metavar="FRAME", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.n = 10
    if args.child:
        print(json.dumps(device_process(str(args.model_dir), args.n, args.child, args.threads[0])))
    elif args.prepare_real:
        prepare_real(args)
    elif args.sweep:
        sweep(args)
    else:
        latency(args)


if __name__ == "__main__":
    main()
