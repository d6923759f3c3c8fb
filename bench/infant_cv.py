"""Honest infant accuracy: grouped, stratified k-fold cross-validation over the infant photos.

    python bench/infant_cv.py                  # the README's table (about an hour on 2 cores)
    python bench/infant_cv.py --quick          # CI size: 3 folds of 4 photos a class, tiny fine-tune

For test fold k, fold k+1 is the device's stream and the other k-2 folds are the
workstation's: everything that learns from infants (fine-tuning, the bootstrap head's fit)
sees only the workstation folds, the on-device stream only the device fold, and nothing
sees fold k. Identical files (the same bytes under two labels) stay in one fold. Every
pipeline and the `fer` peer are scored on the same folds in the same run: mean +- std over
folds of 7-class accuracy, macro-F1 and 3-class valence accuracy (surprise counts as
neutral). Writes ``summary.json`` and ``infant_cv.png`` to --out.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from infantino.edge_runtime.core.datasets import data_root
from infantino.edge_runtime.device import Device, DeviceConfig
from infantino.edge_runtime.core.extractor import Extractor
from infantino.edge_runtime.core.facefinder import FaceFinder, detector_file
from infantino.edge_runtime.core.head import OnlineHead
from infantino.edge_runtime.core.imagefolder import list_image_folder
from infantino.edge_runtime.core.metrics import summarize, valence_accuracy
from infantino.edge_runtime.core.package import open_package
from infantino.edge_runtime.core.preprocess import CLASSES, DEFAULT_SPEC, ImageError, PreprocessSpec, decode_rgb, faces_tensor, resize_face, rgb_to_gray
from infantino.edge_runtime.core.splits import grouped_stratified_folds, stratified_split

REPO = Path(__file__).resolve().parents[1]
DATA = data_root()  # $INFANTINO_DATA, else ../shared/data next to the repository (README, Data)


@dataclass
class Photos:
    paths: list[Path]
    labels: np.ndarray
    groups: np.ndarray  # photos with identical bytes share a group


def load_photos(root: Path, per_class: int | None, seed: int) -> Photos:
    items = list_image_folder(root)
    if per_class:
        rng = np.random.default_rng(seed)
        by_class = [[it for it in items if it[1] == c] for c in range(len(CLASSES))]
        items = [group[i] for group in by_class for i in sorted(rng.permutation(len(group))[:per_class])]
    digests = [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p, _ in items]
    _, groups = np.unique(digests, return_inverse=True)
    return Photos([Path(p) for p, _ in items], np.array([y for _, y in items]), groups)


def variant_specs(short: Path, full: Path) -> dict[str, tuple[PreprocessSpec, Path | None]]:
    """The face-finding pipelines compared (name -> spec, detector folder)."""
    bf = replace(DEFAULT_SPEC, face_detector="blazeface-short_range", fallback="centre-square")
    return {
        "haar": (replace(DEFAULT_SPEC, detect_coarse_side=160), None),  # the device path before BlazeFace
        "bf_short_m25": (bf, short),
        "bf_short_m25_align": (replace(bf, align_eyes=True), short),
        "bf_short_m00_align": (replace(bf, align_eyes=True, face_margin=0.0), short),
        "bf_short_m05_align": (replace(bf, align_eyes=True, face_margin=0.05), short),
        "bf_short_m10_align": (replace(bf, align_eyes=True, face_margin=0.10), short),
        "bf_short_m10": (replace(bf, face_margin=0.10), short),
        "bf_short_m15_align": (replace(bf, align_eyes=True, face_margin=0.15), short),
        "bf_short_m40_align": (replace(bf, align_eyes=True, face_margin=0.40), short),
        "bf_full_m25_align": (replace(bf, face_detector="blazeface-full_range", align_eyes=True), full),
    }


def crop_all(photos: Photos, variants: dict, peer) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray]:
    """Model-size crops and face-found flags per variant, and the peer's probabilities; one decode per photo."""
    finders = {n: FaceFinder.from_file(s, detector_file(d) if d else None) for n, (s, d) in variants.items()}
    crops = {n: [] for n in finders}
    found = {n: [] for n in finders}
    peer_probs = []
    for path in tqdm(photos.paths, desc="crop", unit="photo", mininterval=5):
        try:
            rgb = decode_rgb(path)
        except ImageError:
            rgb = np.zeros((64, 64, 3), np.uint8)
        gray = rgb_to_gray(rgb)
        for n, f in finders.items():
            face = f.crop_arrays(rgb if f.blazeface else None, gray)
            crops[n].append(resize_face(face.pixels, f.spec))
            found[n].append(face.face_found)
        if peer is not None:
            peer_probs.append(peer.predict(rgb)[0])
    return ({n: np.stack(c) for n, c in crops.items()}, {n: np.array(v) for n, v in found.items()},
            np.stack(peer_probs) if peer_probs else np.zeros((0, len(CLASSES))))


def fer_sample(fer_path: Path, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A class-capped sample of the FER training split (the 10 % validation split left out)."""
    with np.load(fer_path, allow_pickle=False) as d:
        images, labels = d["images"], d["labels"].astype(np.int64)
    keep, _ = stratified_split(labels, 0.1, 0)
    rng = np.random.default_rng(seed)
    idx = np.concatenate([rng.permutation(keep[labels[keep] == c])[:per_class] for c in range(len(CLASSES))])
    return np.stack([resize_face(images[i]) for i in idx]), labels[idx]


def scores(y: np.ndarray, probs: np.ndarray) -> dict:
    pred = probs.argmax(1)
    s = summarize(y, pred, len(CLASSES))
    return {"accuracy": s["accuracy"], "macro_f1": s["macro_f1"], "valence": valence_accuracy(y, pred)}


def fit_head(fer_x: np.ndarray, fer_y: np.ndarray, x: np.ndarray, y: np.ndarray, repeat: int, max_iter: int) -> OnlineHead:
    """The bootstrap head on FER plus the workstation's infant embeddings, each infant photo ``repeat`` times."""
    from infantino.export.bootstrap_head import fit_bootstrap_head

    return fit_bootstrap_head(fer_x, fer_y, x, y, repeat=repeat, max_iter=max_iter)


def stream(package: Path, head: OnlineHead, x: np.ndarray, y: np.ndarray, seed: int, state: Path) -> OnlineHead:
    """The device's own learner (replay, guard) over the device fold's embeddings, one label at a time."""
    shutil.rmtree(state, ignore_errors=True)
    dev = Device(package, state, DeviceConfig(autosave=False, seed=seed))
    dev.adopt_head(head.copy())
    for i in np.random.default_rng(seed).permutation(len(y)):
        dev.learn(x[i], int(y[i]), save=False)
    return dev.head


def embed(package: Path, crops: np.ndarray, flip: bool) -> np.ndarray:
    pkg = open_package(package)
    role = "extractor_int8" if pkg.has("extractor_int8") else "extractor"
    ex = Extractor(pkg.path(role), threads=2, flip_average=flip)
    return np.concatenate([ex(faces_tensor(crops[i : i + 256])) for i in range(0, len(crops), 256)])


def run(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work)
    photos = load_photos(Path(args.data) / "infant", args.per_class, args.seed)
    folds = grouped_stratified_folds(photos.labels, photos.groups, args.folds, args.seed)
    detectors = ensure_detectors(work)
    variants = variant_specs(*detectors)
    peer = _peer()
    crops, found, peer_probs = cached_crops(work, photos, variants, peer)
    base = Path(args.package)
    fer_pix, fer_y = fer_sample(Path(args.data) / "fer2013" / "fer2013_train.npz", args.fer_per_class, args.seed)
    rows_file = work / "rows.json"  # every scored fold, kept so that a killed run resumes (--resume)
    rows: dict[str, list[dict]] = json.loads(rows_file.read_text()) if args.resume and rows_file.is_file() else {}

    def add(name: str, fold: int, y: np.ndarray, probs: np.ndarray) -> None:
        rows[name] = [r for r in rows.get(name, []) if r["fold"] != fold] + [{"fold": fold, **scores(y, probs)}]
        rows_file.write_text(json.dumps(rows))

    def report() -> dict:
        summary = summarize_rows(rows, found, args)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        plot(summary, out / "infant_cv.png")
        return summary

    base_head = OnlineHead.load(open_package(base).path("head"))
    if peer is not None:
        for k in range(args.folds):
            add("peer: fer 25.10 (mini-Xception, its Haar crop)", k, photos.labels[folds == k], peer_probs[folds == k])
    if args.finetune_only:
        return finetune_all(args, photos, folds, crops, variants, fer_pix, fer_y, work, rows, add, report)
    for name in variants:  # the face-finding choices, each with the adult package's own head
        emb = embed(base, crops[name], False)
        for k in range(args.folds):
            add(f"{name} | package head", k, photos.labels[folds == k], base_head.predict_proba(emb[folds == k]))
    if args.choose == "auto":  # the best face finding by the protocol (a mild selection bias: say so)
        args.choose = max((n for n in variants if n != "haar"), key=lambda n: np.mean([r["accuracy"] for r in rows[f"{n} | package head"]]))
    print(f"chosen face finding: {args.choose}", flush=True)
    fer_emb = {}
    for flip in (False, True):
        tag = args.choose + ("+flip" if flip else "")
        emb, fer_emb[flip] = embed(base, crops[args.choose], flip), embed(base, fer_pix, flip)
        for k in tqdm(range(args.folds), desc=tag, unit="fold"):
            test, dev_fold = folds == k, folds == (k + 1) % args.folds
            ws = ~test & ~dev_fold
            if flip:
                add(f"{tag} | package head", k, photos.labels[test], base_head.predict_proba(emb[test]))
            head = fit_head(fer_emb[flip], fer_y, emb[ws], photos.labels[ws], args.head_repeat, args.head_iter)
            add(f"{tag} | head fit FER+infant", k, photos.labels[test], head.predict_proba(emb[test]))
            streamed = stream(base, head, emb[dev_fold], photos.labels[dev_fold], args.seed + k, work / "state")
            add(f"{tag} | head fit + device stream", k, photos.labels[test], streamed.predict_proba(emb[test]))
            streamed = stream(base, base_head, emb[dev_fold], photos.labels[dev_fold], args.seed + k, work / "state")
            add(f"{tag} | package head + device stream", k, photos.labels[test], streamed.predict_proba(emb[test]))
    report()
    return finetune_all(args, photos, folds, crops, variants, fer_pix, fer_y, work, rows, add, report) if args.finetune \
        else _final(report)


def finetune_all(args, photos: Photos, folds, crops, variants, fer_pix, fer_y, work: Path, rows, add, report) -> dict:
    """The fine-tuned rows, fold by fold, skipping folds a resumed run scored already."""
    done = {r["fold"] for r in rows.get(f"{args.choose} + {finetuned(args)} | head fit FER+infant", [])}
    for k in args.finetune_folds or range(args.folds):
        if k not in done:
            finetune_fold(args, k, photos, folds, crops[args.choose], variants[args.choose], fer_pix, fer_y, work, add)
            report()
    return _final(report)


def _final(report) -> dict:
    summary = report()
    print_table(summary)
    return summary


def cached_crops(work: Path, photos: Photos, variants: dict, peer) -> tuple[dict, dict, np.ndarray]:
    """``crop_all``, kept in the scratch folder (outside the repository) between runs of the same photos."""
    key = hashlib.sha256(json.dumps([[str(p) for p in photos.paths], sorted(variants)]).encode()).hexdigest()[:16]
    path = work / f"crops-{key}.npz"
    if path.is_file():
        with np.load(path) as d:
            return ({n: d[f"crops_{n}"] for n in variants}, {n: d[f"found_{n}"] for n in variants}, d["peer"])
    crops, found, peer_probs = crop_all(photos, variants, peer)
    work.mkdir(parents=True, exist_ok=True)
    np.savez(path, peer=peer_probs, **{f"crops_{n}": c for n, c in crops.items()}, **{f"found_{n}": f for n, f in found.items()})
    return crops, found, peer_probs


RELEASE_RECIPE = {"ft_epochs": 3, "ft_steps": 60, "ft_repeat": 10, "ft_lr": 5e-4, "ft_label_smoothing": 0.1, "ft_mixup": 0.0,
                  "ft_seed": 0}


def finetuned(args) -> str:
    """The fine-tuned rows' name; a recipe other than the release's says how it differs."""
    changed = [f"{k[3:].replace('_', ' ')} {getattr(args, k):g}" for k, v in RELEASE_RECIPE.items() if getattr(args, k) != v]
    if args.workstation == "all":
        changed.append("workstation 4 folds")
    if args.soup:
        changed.append(f"weight average of {len(args.soup)} runs")
    return "fine-tuned extractor" + (f" ({', '.join(changed)})" if changed and not args.quick else "")


def workstation_mask(folds: np.ndarray, k: int, n_folds: int, which: str) -> np.ndarray:
    """The photos the workstation learns from for test fold k: all but the test and device folds, or (``all``,
    as a release that learns from every labelled photo) all but the test fold."""
    return folds != k if which == "all" else (folds != k) & (folds != (k + 1) % n_folds)


def finetune_fold(args, k: int, photos: Photos, folds: np.ndarray, crops: np.ndarray, variant, fer_pix, fer_y, work: Path,
                  add) -> None:
    """Fold k: fine-tune the extractor on FER + the workstation folds' crops (or average earlier runs'
    weights, ``--soup``), build its package, score."""
    from infantino.export.package_builder import BuildOptions, build_package

    spec, det = variant
    test, dev_fold = folds == k, folds == (k + 1) % args.folds
    ws = np.flatnonzero(workstation_mask(folds, k, args.folds, args.workstation))
    fold_dir = work / f"fold{k}"
    shutil.rmtree(fold_dir, ignore_errors=True)
    if args.soup:
        from infantino.export.train import average_checkpoints

        average_checkpoints([Path(d) / f"fold{k}" / "run" / "checkpoint.pt" for d in args.soup], fold_dir / "run" / "checkpoint.pt")
    else:
        _train_fold(args, fold_dir, photos, crops, ws, spec, det)
    pkg = fold_dir / "package"
    build_package(BuildOptions(checkpoint=str(fold_dir / "run" / "checkpoint.pt"), out=str(pkg),
                               fer=str(Path(args.data) / "fer2013" / "fer2013_train.npz"), force=True,
                               head_images=None), log=lambda *_: None)
    fold_head = OnlineHead.load(open_package(pkg).path("head"))
    for flip in (False, True):
        tag = f"{args.choose}{'+flip' if flip else ''} + {finetuned(args)}"
        emb, fer_emb = embed(pkg, crops, flip), embed(pkg, fer_pix, flip)
        add(f"{tag} | package head", k, photos.labels[test], fold_head.predict_proba(emb[test]))
        head = fit_head(fer_emb, fer_y, emb[ws], photos.labels[ws], args.head_repeat, args.head_iter)
        add(f"{tag} | head fit FER+infant", k, photos.labels[test], head.predict_proba(emb[test]))
        if args.workstation != "all":  # with "all" the workstation saw the stream's photos already
            streamed = stream(pkg, head, emb[dev_fold], photos.labels[dev_fold], args.seed + k, work / "state")
            add(f"{tag} | head fit + device stream", k, photos.labels[test], streamed.predict_proba(emb[test]))
    print(f"fold {k}: fine-tuned and scored", flush=True)


def _train_fold(args, fold_dir: Path, photos: Photos, crops: np.ndarray, ws: np.ndarray, spec, det) -> None:
    """One fold's fine-tune: its workstation crops as an ImageFolder, then ``train``."""
    from PIL import Image

    from infantino.export.train import TrainConfig, train

    for i in ws:
        d = fold_dir / "crops" / CLASSES[photos.labels[i]]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(crops[i]).save(d / f"{i:04d}.png")
    overrides = {k2: v for k2, v in spec.to_dict().items() if k2 in ("face_margin", "align_eyes", "fallback", "detector_score")}
    train(TrainConfig(fer=str(Path(args.data) / "fer2013" / "fer2013_train.npz"), out=str(fold_dir / "run"),
                      images=[str(fold_dir / "crops")], images_repeat=args.ft_repeat, init_from=args.package,
                      epochs=args.ft_epochs, lr=args.ft_lr, max_steps_per_epoch=args.ft_steps, limit=args.fer_limit,
                      detector=str(det), preprocess=overrides, seed=args.ft_seed, threads=args.threads,
                      label_smoothing=args.ft_label_smoothing, mixup=args.ft_mixup))


def summarize_rows(rows: dict[str, list[dict]], found: dict[str, np.ndarray], args) -> dict:
    table = {}
    for name, rs in rows.items():
        table[name] = {m: {"mean": float(np.mean([r[m] for r in rs])), "std": float(np.std([r[m] for r in rs]))}
                       for m in ("accuracy", "macro_f1", "valence")}
        table[name]["folds"] = sorted(rs, key=lambda r: r["fold"])
    return {"protocol": {"folds": args.folds, "seed": args.seed, "per_class": args.per_class, "n_photos": int(len(next(iter(found.values())))),
                         "test": "fold k", "device_stream": "fold k+1" if args.workstation != "all" else None,
                         "workstation": "the other folds" if args.workstation != "all" else "all but the test fold",
                         "valence": "negative: angry disgust fear sad; positive: happy; neutral: neutral surprise",
                         "base_package": args.package},
            "face_found": {n: float(v.mean()) for n, v in found.items()}, "pipelines": table}


def print_table(summary: dict) -> None:
    print("\n| pipeline | 7-class acc | macro-F1 | valence acc |\n| --- | --- | --- | --- |")
    for name, r in summary["pipelines"].items():
        print(f"| {name} | {r['accuracy']['mean']:.3f} ± {r['accuracy']['std']:.3f} | {r['macro_f1']['mean']:.3f} ± "
              f"{r['macro_f1']['std']:.3f} | {r['valence']['mean']:.3f} ± {r['valence']['std']:.3f} |")
    print("face found:", ", ".join(f"{n} {v:.1%}" for n, v in summary["face_found"].items()))


def plot(summary: dict, path: Path) -> None:
    from infantino.export.plots import pyplot

    plt = pyplot()
    names = list(summary["pipelines"])
    means = [summary["pipelines"][n]["accuracy"]["mean"] for n in names]
    stds = [summary["pipelines"][n]["accuracy"]["std"] for n in names]
    fig, ax = plt.subplots(figsize=(9, 0.38 * len(names) + 1.2))
    colours = ["tab:grey" if n.startswith("peer") else "tab:blue" for n in names]
    ax.barh(range(len(names)), means, xerr=stds, color=colours, capsize=3)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(f"7-class accuracy on held-out infant photos, mean ± std over {summary['protocol']['folds']} folds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def ensure_detectors(work: Path) -> tuple[Path, Path]:
    """Short- and full-range BlazeFace converted into the work folder (once)."""
    from infantino.export.detector import build_detector

    dirs = (work / "detectors" / "short_range", work / "detectors" / "full_range")
    for variant, d in zip(("short_range", "full_range"), dirs):
        if not (d / "detector.onnx").is_file():
            build_detector(variant, d, log=lambda *_: None)
    return dirs


def _peer():
    try:
        from peer_fer import FerPeer
    except ImportError:  # run as a module from elsewhere
        sys.path.insert(0, str(Path(__file__).parent))
        from peer_fer import FerPeer
    return FerPeer()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DATA), help="folder holding infant/<class>/ and fer2013/fer2013_train.npz")
    p.add_argument("--package", default=str(REPO / "data" / "models-fer-only"), help="base package (adult faces only)")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "infant_cv"))
    p.add_argument("--work", default="/tmp/infantino-cv", help="scratch: fold crops, fine-tuning runs, packages")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-class", type=int, default=None, help="use only N photos of each class")
    p.add_argument("--choose", default="auto", help="the face finding that gets head fits, streams and fine-tuning "
                                                 "(auto: the best by the package head's mean accuracy)")
    p.add_argument("--fer-per-class", type=int, default=600, help="FER faces per class in the bootstrap head's fit")
    p.add_argument("--head-repeat", type=int, default=4, help="each workstation infant photo counts this many times")
    p.add_argument("--head-iter", type=int, default=60)
    p.add_argument("--finetune", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--ft-epochs", type=int, default=RELEASE_RECIPE["ft_epochs"])
    p.add_argument("--ft-steps", type=int, default=RELEASE_RECIPE["ft_steps"], help="batches per fine-tuning epoch")
    p.add_argument("--ft-repeat", type=int, default=RELEASE_RECIPE["ft_repeat"])
    p.add_argument("--ft-lr", type=float, default=RELEASE_RECIPE["ft_lr"])
    p.add_argument("--ft-label-smoothing", type=float, default=RELEASE_RECIPE["ft_label_smoothing"], help="for ambiguous labels (the release: 0.1)")
    p.add_argument("--ft-mixup", type=float, default=RELEASE_RECIPE["ft_mixup"], help="mixup Beta alpha (0: off)")
    p.add_argument("--ft-seed", type=int, default=RELEASE_RECIPE["ft_seed"], help="the fine-tune's seed (the folds keep --seed)")
    p.add_argument("--workstation", choices=["3folds", "all"], default="3folds",
                   help="what fine-tuning learns from: all but the test and device folds, or all but the test fold "
                        "(a release that learns from every labelled photo; no device-stream rows then)")
    p.add_argument("--soup", nargs="+", metavar="WORK", help="instead of fine-tuning, average the weights of these "
                   "runs' fold{k}/run/checkpoint.pt (their --work folders: the same recipe, other seeds)")
    p.add_argument("--finetune-only", action="store_true", help="only the fine-tuned rows (needs --choose)")
    p.add_argument("--fer-limit", type=int, default=None)
    p.add_argument("--finetune-folds", type=lambda v: [int(x) for x in v.split(",")], default=None,
                   help="fine-tune only these folds, e.g. 0,1 (default: all)")
    p.add_argument("--threads", type=int, default=2, help="torch threads for fine-tuning")
    p.add_argument("--resume", action="store_true", help="keep the folds already scored in --work")
    p.add_argument("--quick", action="store_true", help="CI size")
    args = p.parse_args(argv)
    if args.finetune_only and args.choose == "auto":
        p.error("--finetune-only needs --choose")
    if args.quick:
        args.folds, args.per_class, args.fer_per_class, args.head_iter = 3, 4, 20, 5
        args.ft_epochs, args.ft_steps, args.ft_repeat, args.fer_limit = 1, 2, 1, 600
    return args


def main(argv: list[str] | None = None) -> int:
    from _timing import run_with_data

    args = parse_args(argv)
    return run_with_data("infant_cv", [Path(args.data) / "infant", Path(args.data) / "fer2013" / "fer2013_train.npz"],
                         lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
