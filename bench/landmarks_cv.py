"""Issue 22: does MediaPipe's face mesh add to the embedding on infants, and what does it cost?

    python bench/landmarks_cv.py            # about a minute on 2 cores (ONNX Runtime and BLAS at 1 thread)

Same photos, folds and scores as ``bench/infant_cv.py`` (grouped stratified 5-fold, seed 0;
for test fold k, fold k+1 is the device's stream and the other three the workstation's).
Each test fold k uses the package whose extractor was fine-tuned on its workstation folds
(``--cv/fold{k}/package``, written by infant_cv's fine-tuning) and the release's crops.
Every learned row below is the same procedure, fitted on the workstation folds only: a
multinomial logistic regression on standardised features whose C is chosen by a grouped
3-fold CV inside those folds; rows differ only in their features. Rows are paired by fold
(mean +- std of the per-fold difference) and by photo (McNemar's exact test on the pooled
held-out predictions: each photo is tested once). Mesh quality on infants: BlazeFace's
detection rate, the mesh's face score, per-class feature means, and a contact sheet of 12
regions with their points written to --work (never into the repository: the photos are data).
Cost, at 1 thread on bench_frame_cost's camera frames, 200 runs interleaved frame by frame:
today's whole ``Device.predict``, the int8 extractor alone, and what the mesh would add to a
frame given BlazeFace's detection (region cut + network + geometry) and its network alone.
Writes ``summary.json`` and ``landmarks_cv.png`` to --out.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # numpy's BLAS and scikit-learn at one thread, like the models
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))  # run as a script from anywhere: its siblings
import infant_cv as cv  # noqa: E402
from _timing import percentiles, run_with_data  # noqa: E402

from infantino.edge_runtime.core.extractor import Extractor  # noqa: E402
from infantino.edge_runtime.core.facefinder import FaceFinder  # noqa: E402
from infantino.edge_runtime.core.head import OnlineHead  # noqa: E402
from infantino.export.face_mesh import (FEATURES, LANDMARKS_FILE, FaceMesh, align, geometry,  # noqa: E402
                                                   mesh_input, mesh_square)
from infantino.edge_runtime.core.package import open_package  # noqa: E402
from infantino.edge_runtime.core.preprocess import CLASSES, ImageError, decode_rgb, faces_tensor  # noqa: E402
from infantino.edge_runtime.core.splits import grouped_stratified_folds  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CROPS = "crops_bf_short_m10_align"  # the release's face finding, as infant_cv caches it
CS = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
MESH_PCA = 16
SCORE_OK = 0.5  # MediaPipe's own threshold for "a face is there"
REFERENCE = "package head (fold package; reference)"
PAIRS = {  # (with landmarks, without): the comparisons the issue asks for
    "head probs + geometry vs head probs": ("LR on head log-probs + geometry", "LR on head log-probs"),
    "embedding + geometry vs embedding": ("LR on embedding + geometry", "LR on embedding"),
    "embedding + mesh PCA vs embedding": (f"LR on embedding + mesh (PCA {MESH_PCA})", "LR on embedding"),
}


# ---------------------------------------------------------------- inputs


def mesh_all(photos: cv.Photos, package: Path, model: Path, work: Path) -> dict[str, np.ndarray]:
    """BlazeFace (the package's) then the mesh, for every photo; cached in --work by photo list and model
    (delete the cache after changing how the region is cut)."""
    key = hashlib.sha256(json.dumps([[str(p) for p in photos.paths],
                                     hashlib.sha256(model.read_bytes()).hexdigest()]).encode()).hexdigest()[:16]
    path = work / f"mesh-{key}.npz"
    if path.is_file():
        with np.load(path) as d:
            return dict(d)
    finder, mesh = FaceFinder.for_package(open_package(package), threads=1), FaceMesh(model, threads=1)
    points, scores, found = [], [], []
    for p in photos.paths:
        try:
            rgb = decode_rgb(p)
        except ImageError:
            rgb = np.zeros((192, 192, 3), np.uint8)
        dets = finder.blazeface.detect(rgb)
        det = max(dets, key=lambda d: d.box[2] * d.box[3]) if dets else None
        r = mesh.mesh(rgb, det)
        points.append(r.points)
        scores.append(r.score)
        found.append(det is not None)
    out = {"points": np.stack(points), "score": np.array(scores, np.float32), "found": np.array(found)}
    work.mkdir(parents=True, exist_ok=True)
    np.savez(path, **out)
    return out


def geometry_all(points: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """(n, len(FEATURES)); NaN where the mesh saw no face (imputed inside each fit from training photos)."""
    geo = np.full((len(points), len(FEATURES)), np.nan, np.float32)
    for i in np.flatnonzero(ok):
        geo[i] = geometry(points[i])
    return geo


def aligned_all(points: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """(n, 936) eye-aligned, scale-free meshes; NaN where the mesh saw no face."""
    out = np.full((len(points), points.shape[1] * 2), np.nan, np.float32)
    for i in np.flatnonzero(ok):
        out[i] = align(points[i]).ravel()
    return out


def embed(package: Path, crops: np.ndarray) -> np.ndarray:
    """The package's int8 embedding of the release crops, at 1 thread."""
    pkg = open_package(package)
    ex = Extractor(pkg.path("extractor_int8" if pkg.has("extractor_int8") else "extractor"), threads=1)
    return np.concatenate([ex(faces_tensor(crops[i : i + 64])) for i in range(0, len(crops), 64)])


# ---------------------------------------------------------------- the one head-fitting procedure


def _model(blocks: list[tuple[int, int]], c: float):
    """Impute, standardise (the mesh block: then PCA), multinomial logistic regression."""
    from sklearn.compose import ColumnTransformer
    from sklearn.decomposition import PCA
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    parts = []
    for j, (lo, hi) in enumerate(blocks):
        steps = [SimpleImputer(), StandardScaler()] + ([PCA(MESH_PCA, random_state=0)] if hi - lo > 200 else [])
        parts.append((f"b{j}", make_pipeline(*steps), list(range(lo, hi))))
    return make_pipeline(ColumnTransformer(parts), LogisticRegression(C=c, max_iter=3000))


def fit_predict(blocks: list[np.ndarray], y: np.ndarray, groups: np.ndarray, train: np.ndarray, test: np.ndarray
                ) -> tuple[np.ndarray, float]:
    """Test probabilities (n_test, 7) and the chosen C: C by mean log-loss over a grouped 3-fold CV on ``train``."""
    from sklearn.metrics import log_loss

    x = np.concatenate(blocks, axis=1)
    edges = np.cumsum([0] + [b.shape[1] for b in blocks])
    spans = list(zip(edges[:-1], edges[1:]))
    xt, yt = x[train], y[train]
    inner = grouped_stratified_folds(yt, groups[train], 3, 0)
    losses = []
    for c in CS:
        loss = 0.0
        for j in range(3):
            m = _model(spans, c).fit(xt[inner != j], yt[inner != j])
            loss += log_loss(yt[inner == j], _full(m, x[train][inner == j]), labels=range(len(CLASSES)))
        losses.append(loss)
    best = CS[int(np.argmin(losses))]
    return _full(_model(spans, best).fit(xt, yt), x[test]), best


def _full(model, x: np.ndarray) -> np.ndarray:
    """predict_proba with a column for every class (a training set may lack one)."""
    out = np.full((len(x), len(CLASSES)), 1e-9)
    out[:, model.classes_] = model.predict_proba(x)
    return out / out.sum(axis=1, keepdims=True)


# ---------------------------------------------------------------- the run


def run(args: argparse.Namespace) -> dict:
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    photos = cv.load_photos(Path(args.data) / "infant", None, 0)
    folds = grouped_stratified_folds(photos.labels, photos.groups, 5, 0)
    with np.load(args.crops) as d:
        crops = d[CROPS]
    if len(crops) != len(photos.paths):
        raise SystemExit(f"{args.crops} holds {len(crops)} crops for {len(photos.paths)} photos")
    model = ensure_model(work)
    t0 = time.time()
    mesh = mesh_all(photos, Path(args.package), model, work)
    print(f"mesh on {len(photos.paths)} photos: {time.time() - t0:.0f} s", flush=True)
    ok = mesh["score"] >= SCORE_OK
    geo, flat = geometry_all(mesh["points"], ok), aligned_all(mesh["points"], ok)
    y, g = photos.labels, photos.groups
    rows: dict[str, list[dict]] = {}
    pooled: dict[str, np.ndarray] = {}
    chosen: dict[str, list[float]] = {}
    for k in range(5):
        test, ws = folds == k, (folds != k) & (folds != (k + 1) % 5)
        pkg = Path(args.cv) / f"fold{k}" / "package"
        emb = embed(pkg, crops)
        probs = OnlineHead.load(open_package(pkg).path("head")).predict_proba(emb)
        logp = np.log(np.clip(probs, 1e-6, 1.0))
        arms = {
            "LR on head log-probs": [logp], "LR on head log-probs + geometry": [logp, geo],
            "LR on embedding": [emb], "LR on embedding + geometry": [emb, geo],
            f"LR on embedding + mesh (PCA {MESH_PCA})": [emb, flat],
            "LR on geometry alone": [geo], f"LR on mesh alone (PCA {MESH_PCA})": [flat],
        }
        results = {REFERENCE: probs[test]}
        for name, blocks in arms.items():
            results[name], c = fit_predict(blocks, y, g, ws, test)
            chosen.setdefault(name, []).append(c)
        for name, p in results.items():
            rows.setdefault(name, []).append({"fold": k, **cv.scores(y[test], p)})
            pooled.setdefault(name, np.zeros(len(y), int))[test] = p.argmax(1)
        print(f"fold {k}: " + ", ".join(f"{n} {rows[n][-1]['accuracy']:.3f}" for n in results), flush=True)
    summary = {
        "protocol": {"folds": 5, "seed": 0, "n_photos": int(len(y)), "crops": CROPS, "packages": f"{args.cv}/fold{{k}}/package",
                     "test": "fold k", "fit on": "the workstation folds (not k, not k+1)",
                     "head": "impute + standardise (+ PCA for the mesh) + multinomial LR, C by grouped 3-fold CV in the "
                             f"workstation folds from {list(CS)}", "mesh_score_ok": SCORE_OK},
        "mesh_quality": quality(mesh, y),
        "feature_means_by_class": {CLASSES[c]: dict(zip(FEATURES, np.nanmean(geo[y == c], 0).round(4).tolist()))
                                   for c in range(len(CLASSES))},
        "rows": {n: table_row(rs) | {"chosen_C": chosen.get(n)} for n, rs in rows.items()},
        "paired": {n: paired(rows[a], rows[b], pooled[a], pooled[b], y) for n, (a, b) in PAIRS.items()},
        "latency_1_thread": latency(model, Path(args.release)),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(summary, out / "landmarks_cv.png")
    contact_sheet(photos, y, Path(args.package), model, work / "contact_sheet.png")
    print_tables(summary)
    return summary


def ensure_model(work: Path) -> Path:
    """The converted mesh in --work (once)."""
    from infantino.export.landmarks import build_landmarks

    folder = work / "landmarks"
    if not (folder / LANDMARKS_FILE).is_file():
        build_landmarks(folder, log=lambda *_: None)
    return folder / LANDMARKS_FILE


def quality(mesh: dict[str, np.ndarray], y: np.ndarray) -> dict:
    s, found = mesh["score"], mesh["found"]
    return {"blazeface_found": float(found.mean()), "mesh_score_ge_0.5": float((s >= 0.5).mean()),
            "mesh_score_ge_0.9": float((s >= 0.9).mean()), "mesh_score_median": float(np.median(s)),
            "mesh_score_ge_0.5_where_blazeface_found": float((s[found] >= 0.5).mean()),
            "mesh_score_ge_0.5_by_class": {CLASSES[c]: float((s[y == c] >= 0.5).mean()) for c in range(len(CLASSES))}}


def table_row(rs: list[dict]) -> dict:
    return {**{m: {"mean": float(np.mean([r[m] for r in rs])), "std": float(np.std([r[m] for r in rs]))}
               for m in ("accuracy", "macro_f1", "valence")}, "folds": rs}


def paired(with_: list[dict], without: list[dict], pred_a: np.ndarray, pred_b: np.ndarray, y: np.ndarray) -> dict:
    """Per-fold accuracy differences and McNemar's exact test on the pooled held-out predictions."""
    from scipy.stats import binomtest

    d = np.array([a["accuracy"] - b["accuracy"] for a, b in zip(with_, without)])
    only_a = int(np.sum((pred_a == y) & (pred_b != y)))
    only_b = int(np.sum((pred_a != y) & (pred_b == y)))
    p = binomtest(only_a, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
    return {"accuracy_delta_mean": float(d.mean()), "accuracy_delta_std": float(d.std()), "folds_better": int((d > 0).sum()),
            "folds_worse": int((d < 0).sum()), "photos_only_with_right": only_a, "photos_only_without_right": only_b,
            "mcnemar_p": float(p)}


def latency(model: Path, release: Path, n: int = 200, warmup: int = 20) -> dict:
    """p50/p95 at 1 thread on bench_frame_cost's 640 x 480 camera frames, frame by frame and interleaved so load
    from other processes lands on all alike: today's whole ``Device.predict``, the release's int8 extractor alone,
    and what the mesh would add given BlazeFace's detection (region cut + network + geometry) and its network alone."""
    import tempfile

    from bench_frame_cost import camera_frames

    from infantino.edge_runtime.device import Device, DeviceConfig

    frames = camera_frames(40)
    mesh = FaceMesh(model, threads=1)
    with tempfile.TemporaryDirectory() as state:
        device = Device(release, state, DeviceConfig(threads=1, queue_min_interval_s=10.0))
        dets = [max(device.finder.blazeface.detect(f), key=lambda d: d.box[2] * d.box[3], default=None) for f in frames]
        squares = [mesh_square(d, f.shape[1], f.shape[0]) for d, f in zip(dets, frames)]
        regions = [mesh_input(f, sq) for f, sq in zip(frames, squares)]
        faces = [faces_tensor([device.finder.crop(f).pixels], device.spec) for f in frames]
        calls = {"predict": lambda i: device.predict(frames[i]), "extractor_int8": lambda i: device.extractor(faces[i]),
                 "mesh_network": lambda i: mesh.run(regions[i]),
                 "mesh_path": lambda i: geometry(mesh.run(mesh_input(frames[i], squares[i]))[0])}
        times: dict[str, list[float]] = {k: [] for k in calls}
        for k in range(warmup + n):
            for name, fn in calls.items():
                t = time.perf_counter()
                fn(k % len(frames))
                if k >= warmup:
                    times[name].append(time.perf_counter() - t)
    out = {k: percentiles(v) for k, v in times.items()}
    return {"threads": 1, "frames": f"bench_frame_cost.camera_frames(40), 640 x 480", "runs": n, "warmup": warmup,
            "frames_with_face": int(sum(d is not None for d in dets)),
            "mesh_region_side_px_median": round(float(np.median([sq.side for sq in squares])), 1),
            "extractor": device.extractor_role, "load_average_1min_after": round(os.getloadavg()[0], 2), **out,
            "added_to_predict_p50_ms": out["mesh_path"]["p50"], "budget_ms": 1.5,
            "within_budget": out["mesh_path"]["p50"] <= 1.5}


# ---------------------------------------------------------------- outputs


def contact_sheet(photos: cv.Photos, y: np.ndarray, package: Path, model: Path, path: Path, per_class: int = 2) -> None:
    """12 mesh regions (2 a class of the first 6, seed 0) with their points and scores, to ``path`` outside the repository."""
    import cv2

    finder, mesh = FaceFinder.for_package(open_package(package), threads=1), FaceMesh(model, threads=1)
    rng = np.random.default_rng(0)
    tiles = []
    for c in range(6):
        for i in rng.permutation(np.flatnonzero(y == c))[:per_class]:
            rgb = decode_rgb(photos.paths[i])
            det = max(finder.blazeface.detect(rgb), key=lambda d: d.box[2] * d.box[3], default=None)
            r = mesh.mesh(rgb, det)
            tile = mesh_input(rgb, r.square).copy()
            for x, yy, _ in r.points:
                cv2.circle(tile, (int(round(x)), int(round(yy))), 1, (0, 255, 0), -1)
            cv2.putText(tile, f"{CLASSES[c]} {r.score:.2f}", (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 0), 1)
            tiles.append(tile)
    rows = [np.concatenate(tiles[j : j + 4], axis=1) for j in range(0, len(tiles), 4)]
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(np.concatenate(rows, axis=0), cv2.COLOR_RGB2BGR))
    print(f"contact sheet: {path}")


def print_tables(summary: dict) -> None:
    print("\n| head (fitted on the workstation folds) | 7-class acc | macro-F1 | valence acc |\n| --- | --- | --- | --- |")
    for name, r in summary["rows"].items():
        print(f"| {name} | " + " | ".join(f"{r[m]['mean']:.3f} ± {r[m]['std']:.3f}" for m in ("accuracy", "macro_f1", "valence"))
              + " |")
    print("\n| pair | Δ acc (per fold) | folds better/worse | photos only with / only without right | McNemar p |\n"
          "| --- | --- | --- | --- | --- |")
    for name, d in summary["paired"].items():
        print(f"| {name} | {d['accuracy_delta_mean']:+.3f} ± {d['accuracy_delta_std']:.3f} | {d['folds_better']}/{d['folds_worse']} | "
              f"{d['photos_only_with_right']} / {d['photos_only_without_right']} | {d['mcnemar_p']:.2f} |")
    q, lat = summary["mesh_quality"], summary["latency_1_thread"]
    print(f"\nBlazeFace found {q['blazeface_found']:.1%}; mesh score >= 0.5 on {q['mesh_score_ge_0.5']:.1%}, >= 0.9 on "
          f"{q['mesh_score_ge_0.9']:.1%} (median {q['mesh_score_median']:.3f})")
    print("latency at 1 thread, p50 (p95) ms: " + ", ".join(f"{k} {lat[k]['p50']:.2f} ({lat[k]['p95']:.2f})"
                                                         for k in ("predict", "extractor_int8", "mesh_network", "mesh_path")))


def plot(summary: dict, path: Path) -> None:
    from infantino.export.plots import pyplot

    plt = pyplot()
    names = list(summary["rows"])
    means = [summary["rows"][n]["accuracy"]["mean"] for n in names]
    stds = [summary["rows"][n]["accuracy"]["std"] for n in names]
    colours = ["tab:grey" if n == REFERENCE else "tab:green" if ("geometry" in n or "mesh" in n) else "tab:blue" for n in names]
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(names) + 1.2))
    ax.barh(range(len(names)), means, xerr=stds, color=colours, capsize=3)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("7-class accuracy on held-out infant photos, mean ± std over 5 grouped folds")
    ax.set_title("green: with the face mesh (issue 22)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(cv.DATA), help="folder holding infant/<class>/")
    p.add_argument("--cv", default="/tmp/infantino-cv", help="infant_cv's work folder: fold{k}/package")
    p.add_argument("--crops", default="/tmp/infantino-cv/crops-ab99c56648c14361.npz", help="infant_cv's cached crops")
    p.add_argument("--package", default=str(REPO / "data" / "models"), help="the package whose BlazeFace finds the faces")
    p.add_argument("--release", default=str(REPO / "data" / "models"), help="the package whose int8 extractor is timed")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "landmarks"))
    p.add_argument("--work", default="/tmp/infantino-lm", help="scratch outside the repository: mesh model, cache, contact sheet")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_with_data("landmarks_cv", [Path(args.data) / "infant", Path(args.crops), Path(args.cv) / "fold0" / "package"],
                         lambda: run(args), "run bench/infant_cv.py first; README, Data")


if __name__ == "__main__":
    sys.exit(main())
