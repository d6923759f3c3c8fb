"""Continual learning across the domain shift: adult faces -> infants -> infants at night (IR) -> infants.

Each phase streams labelled frames one at a time; after each phase every method is scored
on every phase's held-out set, giving an accuracy matrix R (row: after phase i, column:
held-out set of phase j). Reported per method: average final accuracy (mean of the last
row) and backward transfer BWT = mean_j<T-1 (R[T-1][j] - R[j][j]) (negative = forgetting).

Methods, all on the same embeddings (the package's int8 extractor, embedded once):
* frozen: the package's head, never updated;
* plain: the device's update with no replay, no adult replay, no guard, no anchor
  (``partial_fit`` on one label at a time);
* ours: ``Device`` with its default configuration (replay + adult replay seed + guard for the shared
  head it uploads; its predictions: the shared head with the camera's own guarded adaptation);
* refit: a head fitted from scratch on everything seen so far (upper bound; needs all data).

    python bench/bench_continual.py [--model-dir data/models] [--seeds 0 1 2] [--adult 1000]
    python bench/bench_continual.py --quick --images DIR --fer NPZ --out /tmp/c.json   (CI size)

Writes bench/results/continual.json and continual.png.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np


REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
from infantino.edge_runtime.core.datasets import FER, INFANT, DataMissing, data_path, fer_file, infant_folder
from infantino.edge_runtime.device import Device, DeviceConfig
from infantino.edge_runtime.core.head import HeadParams, OnlineHead
from infantino.edge_runtime.core.imagefolder import list_image_folder, split_items
from infantino.edge_runtime.core.preprocess import ImageError, decode_gray, faces_tensor
from infantino.edge_runtime.core.splits import stratified_split

from infantino.fleet_demo.cameras import night_ir  # one night-IR camera for the demo and every benchmark

PHASES = ("adult", "infant", "night_ir", "infant_again")
CAMERA_LOG: list[dict] = []  # what "ours"'s camera part held after each phase (level, base, prior, labels)
METHODS = ("frozen", "plain", "ours", "refit")


def embed_photos(device: Device, items: list[tuple[Path, int]]) -> dict[str, dict[int, np.ndarray]]:
    """{"day": {i: emb}, "ir": {i: emb}} for every readable photo (index into ``items``)."""
    out: dict[str, dict[int, np.ndarray]] = {"day": {}, "ir": {}}
    for i, (path, _) in enumerate(items):
        try:
            gray = decode_gray(path)
        except ImageError:
            continue
        out["day"][i] = device.embed(gray)
        out["ir"][i] = device.embed(night_ir(gray, seed=i))
    return out


def _stack(emb: dict[int, np.ndarray], idx: list[int], items: list[tuple[Path, int]]) -> tuple[np.ndarray, np.ndarray]:
    keep = [i for i in idx if i in emb]
    return np.stack([emb[i] for i in keep]), np.array([items[i][1] for i in keep], np.int64)


def phases_for(seed: int, items, photo_emb, fer_x, fer_y, embedded: np.ndarray, n_adult: int, n_adult_test: int):
    """(streams, tests): per phase (x, y).

    The infant photos are split (seeded, duplicates kept on one side) into four disjoint
    quarters: the day stream of "infant", the IR stream of "night_ir", the day stream of
    "infant_again", and the held-out part, whose day images are the infant test set and whose
    IR versions are the night-IR test set: no photo is in a stream and a held-out set. Adult
    faces come from the package's training part (stream) and its held-out part (test)."""
    rng = np.random.default_rng(seed)
    index = {str(p): i for i, (p, _) in enumerate(items)}
    parts = split_items(items, {"infant": 0.25, "night_ir": 0.25, "infant_again": 0.25, "test": 0.25}, seed)
    idx = {k: [index[str(p)] for p, _ in v] for k, v in parts.items()}
    streamed = set(idx["infant"]) | set(idx["night_ir"]) | set(idx["infant_again"])
    if streamed & set(idx["test"]) or sum(len(v) for v in idx.values()) != len(items):
        raise RuntimeError("the infant split put a photo in a stream and in the held-out set")
    keep, held = stratified_split(fer_y, 0.1, 0)  # the package's own split: held-out faces were never trained on
    keep, held = keep[embedded[keep]], held[embedded[held]]
    a_stream = rng.choice(keep, size=min(n_adult, len(keep)), replace=False)
    a_test = rng.choice(held, size=min(n_adult_test, len(held)), replace=False)
    streams = {"adult": (fer_x[a_stream], fer_y[a_stream]), "infant": _stack(photo_emb["day"], idx["infant"], items),
               "night_ir": _stack(photo_emb["ir"], idx["night_ir"], items),
               "infant_again": _stack(photo_emb["day"], idx["infant_again"], items)}
    test_day, test_ir = _stack(photo_emb["day"], idx["test"], items), _stack(photo_emb["ir"], idx["test"], items)
    tests = {"adult": (fer_x[a_test], fer_y[a_test]), "infant": test_day, "night_ir": test_ir, "infant_again": test_day}
    return streams, tests


def _accuracy(predict_proba, xy) -> float:
    return float(np.mean(predict_proba(xy[0]).argmax(1) == xy[1]))


def run_method(method: str, model_dir: Path, streams, tests, seed: int) -> np.ndarray:
    """The accuracy matrix R (len(PHASES) x len(PHASES)) of one method."""
    rng = np.random.default_rng(seed + 100)
    R = np.zeros((len(PHASES), len(PHASES)))
    with tempfile.TemporaryDirectory() as tmp:
        base = DeviceConfig(threads=1, autosave=False, seed=seed)
        if method == "plain":
            base = replace(base, replay_mix=0, source_mix=0, holdout_per_class=0, holdout_every=0, anchor_strength=0.0,
                           personalize=False)
        device = Device(model_dir, tmp, base)
        seen_x, seen_y = [], []
        for i, phase in enumerate(PHASES):
            x, y = streams[phase]
            order = rng.permutation(len(y))
            if method in ("plain", "ours"):
                for j in order:
                    device.learn(x[j], int(y[j]), save=False)
            seen_x.append(x)
            seen_y.append(y)
            predict = device.learner.predict_proba  # what the device answers: for "ours", the shared head and the camera's part
            if method == "refit":
                predict = OnlineHead.fit(np.concatenate(seen_x), np.concatenate(seen_y), HeadParams(random_state=seed),
                                         max_iter=80).predict_proba
            R[i] = [_accuracy(predict, tests[p]) for p in PHASES]
            if method == "ours":
                CAMERA_LOG.append({"seed": seed, "phase": phase, **device.learner.camera.summary(device.classes)})
    return R


def summarize(R: np.ndarray) -> dict:
    T = len(R)
    return {"average_accuracy": float(R[-1].mean()), "bwt": float(np.mean([R[-1][j] - R[j][j] for j in range(T - 1)]))}


def plot(results: dict, path: Path) -> bool:
    try:
        from infantino.export.plots import pyplot

        plt = pyplot()
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), sharey=True)
    for ax, test in zip(axes, ("adult", "infant", "night_ir")):
        j = PHASES.index(test)
        for m in METHODS:
            mean = np.mean([np.array(r)[:, j] for r in results["matrices"][m]], axis=0)
            ax.plot(range(1, len(PHASES) + 1), mean, marker="o", label=m)
        ax.set_xticks(range(1, len(PHASES) + 1), [p.replace("_", " ") for p in PHASES], rotation=20)
        ax.set_title(f"held-out {test.replace('_', ' ')}")
        ax.set_xlabel("after phase")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", type=Path, default=REPO / "data" / "models")
    p.add_argument("--images", type=Path, default=data_path(*INFANT))
    p.add_argument("--fer", type=Path, default=data_path(*FER))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--adult", type=int, default=1000, help="adult faces in the first phase's stream")
    p.add_argument("--adult-test", type=int, default=500)
    p.add_argument("--limit", type=int, help="use only this many photos (seeded)")
    p.add_argument("--quick", action="store_true", help="CI size: one seed, 200 adult faces, 80 photos")
    p.add_argument("--out", type=Path, default=RESULTS / "continual.json")
    args = p.parse_args(argv)
    try:
        infant_folder(args.images), fer_file(args.fer)
    except DataMissing as exc:
        sys.exit(f"bench_continual: {exc}")
    if args.quick:
        args.seeds, args.adult, args.adult_test, args.limit = args.seeds[:1], 200, 100, args.limit or 80
    t0 = time.time()
    items = list_image_folder(args.images)
    if args.limit:
        pick = np.random.default_rng(0).choice(len(items), size=min(args.limit, len(items)), replace=False)
        items = [items[i] for i in sorted(pick)]
    with np.load(args.fer, allow_pickle=False) as d:
        fer_images, fer_y = d["images"], d["labels"].astype(np.int64)
    with tempfile.TemporaryDirectory() as tmp:
        device = Device(args.model_dir, tmp, DeviceConfig(threads=2, autosave=False))
        photo_emb = embed_photos(device, items)
        fer_x = np.zeros((len(fer_y), device.dim), np.float32)
        keep, held = stratified_split(fer_y, 0.1, 0)
        # embed what a phase can draw (all of FER would take minutes): the held-out faces and a superset of the streams
        extra = np.random.default_rng(12345).choice(keep, size=min(4 * args.adult, len(keep)), replace=False)
        if args.quick:  # CI size: a few held-out faces per test draw instead of all 2,571
            held = np.random.default_rng(12345).choice(held, size=min(2 * args.adult_test, len(held)), replace=False)
        sample = np.unique(np.concatenate([held, extra]))
        for i in range(0, len(sample), 256):
            chunk = sample[i : i + 256]
            fer_x[chunk] = device.extractor(faces_tensor(list(fer_images[chunk]), device.spec))
        package = device.package.version
    embedded = np.zeros(len(fer_y), bool)
    embedded[sample] = True
    print(f"embedded {len(photo_emb['day'])} photos (day + night IR) and {embedded.sum()} FER faces in {time.time() - t0:.0f} s")

    results: dict = {"package": package, "phases": PHASES, "seeds": args.seeds, "adult_stream": args.adult,
                     "matrices": {m: [] for m in METHODS}}
    for seed in args.seeds:
        streams, tests = phases_for(seed, items, photo_emb, fer_x, fer_y, embedded, args.adult, args.adult_test)
        for m in METHODS:
            results["matrices"][m].append(run_method(m, args.model_dir, streams, tests, seed).tolist())
        results.setdefault("sizes", {k: int(len(v[1])) for k, v in streams.items()})
        results.setdefault("test_sizes", {k: int(len(v[1])) for k, v in tests.items()})
    table = {}
    print(f"{'method':8s} {'avg acc':>8s} {'BWT':>8s}   final row (adult, infant, night IR, infant again)")
    for m in METHODS:
        per_seed = [summarize(np.array(R)) for R in results["matrices"][m]]
        avg = np.array([s["average_accuracy"] for s in per_seed])
        bwt = np.array([s["bwt"] for s in per_seed])
        final = np.mean([np.array(R)[-1] for R in results["matrices"][m]], axis=0)
        table[m] = {"average_accuracy": float(avg.mean()), "average_accuracy_std": float(avg.std()),
                    "bwt": float(bwt.mean()), "bwt_std": float(bwt.std()), "final_row": final.tolist()}
        print(f"{m:8s} {avg.mean():8.3f} {bwt.mean():+8.3f}   " + ", ".join(f"{v:.3f}" for v in final)
              + (f"   (± {avg.std():.3f} / {bwt.std():.3f} over {len(args.seeds)} seeds)" if len(args.seeds) > 1 else ""))
    results["summary"] = table
    results["camera_part_of_ours"] = CAMERA_LOG
    results["seconds"] = round(time.time() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    png = args.out.with_suffix(".png")
    print(f"written to {args.out}" + (f" and {png}" if plot(results, png) else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
