"""Does learning from a caregiver's labels make *that camera* better? The personalization protocol.

    python bench/personalization.py            # the README's table (5 folds; ~25 min on 2 cores, fold extractors cached)
    python bench/personalization.py --quick    # CI size: 3 folds, 4 photos a class, 1 camera a cell, adult-only extractor

Folds as in ``bench/infant_cv.py`` (grouped, stratified 5-fold, seed 0): for test fold k the
device fold is k+1 and the extractor is the one fine-tuned on the other three (the release
recipe, cached in --work), so it never saw a camera's frames or its test photos.

A camera is a class mix (Dirichlet alpha in {0.3, 1} or the uniform mix) and a profile
(``infantino.fleet_demo.cameras``: day, night IR, low light, low-res JPEG, overhead crib view). Its 240
frames are the device fold's photos drawn by the mix and passed through the profile; its
test is 300 photos of the test fold drawn the same way (its own future frames), and the
balanced test fold through the same profile (unseen babies). After the camera predicted
its frames, a caregiver labels 10 / 30 / 60 / 120 of them, from the annotation queue
(uncertainty first) or at random. Every method below runs on the same cameras, embeddings
and labels (accuracy on the camera's own test, mean over cameras and folds):

* frozen: the package head;  * today: ``GuardedLearner`` (replay, adult replay, guard);
* EM prior (Saerens 2002) on the unlabelled frames; * EM after BCTS calibration (Alexandari
  2020, fitted on the package's adult replay seed); * prior from label counts;
* EM + label counts averaged (the issue's baseline); * Ditto (a personal copy of the head
  trained on the labels, pulled toward the shared one); * the new learner
  (``edge_runtime.personal``: semi-supervised EM prior + per-class bias, guarded by
  cross-validation on the camera's labels), on the shared head and on today's learned head;
* refit: a head fitted on the adult seed and all 240 frames labelled (upper bound).

Also: one uniform day camera per fold learns its whole device fold (balanced unseen babies
must not get worse). Writes ``summary.json`` and plots to --out.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).parent))  # run as a script from anywhere: its siblings
import infant_cv as cv  # noqa: E402

from infantino.edge_runtime.config import DeviceConfig  # noqa: E402
from infantino.edge_runtime.core.extractor import Extractor  # noqa: E402
from infantino.edge_runtime.core.facefinder import FaceFinder  # noqa: E402
from infantino.edge_runtime.core.head import OnlineHead  # noqa: E402
from infantino.edge_runtime.learner import GuardedLearner  # noqa: E402
from infantino.edge_runtime.core.package import open_package  # noqa: E402
from infantino.edge_runtime.package_runtime import PackageRuntime  # noqa: E402
from infantino.edge_runtime.core import personal  # noqa: E402
from infantino.edge_runtime.core.preprocess import ImageError, decode_rgb, faces_tensor, resize_face, rgb_to_gray  # noqa: E402
from infantino.edge_runtime.core.splits import grouped_stratified_folds  # noqa: E402
from infantino.edge_runtime.core.uncertainty import score as uncertainty_score  # noqa: E402
from infantino.fleet_demo.cameras import PROFILES, class_mix, draw, render  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ALPHAS = ("0.3", "1", "uniform")
BUDGETS = (10, 30, 60, 120)
STRATEGIES = ("queue", "random")
N_FRAMES, N_TEST = 240, 300
NEW = "new: the device's learner (prior, bias or personal head over the shared head, paired-CV guard)"


# ------------------------------------------------------------------ data: crops per profile, embeddings per fold
def profile_crops(photos: cv.Photos, finder: FaceFinder, work: Path, key: str) -> dict[str, np.ndarray]:
    """64x64 face crops of every photo through every camera profile (one decode per photo), cached in --work."""
    path = work / f"profile-crops-{key}.npz"
    if path.is_file():
        with np.load(path) as d:
            return {p: d[p] for p in PROFILES}
    crops: dict[str, list[np.ndarray]] = {p: [] for p in PROFILES}
    for i, photo in enumerate(tqdm(photos.paths, desc="camera frames", unit="photo", mininterval=5)):
        try:
            rgb = decode_rgb(photo)
        except ImageError:
            rgb = np.full((64, 64, 3), 128, np.uint8)
        for p in PROFILES:
            frame = render(rgb, p, seed=i)
            face = finder.crop_arrays(frame, rgb_to_gray(frame))
            crops[p].append(resize_face(face.pixels, finder.spec))
    out = {p: np.stack(c) for p, c in crops.items()}
    work.mkdir(parents=True, exist_ok=True)
    np.savez(path, **out)
    return out


def embed(package: Path, crops: np.ndarray) -> np.ndarray:
    pkg = open_package(package)
    ex = Extractor(pkg.path("extractor_int8" if pkg.has("extractor_int8") else "extractor"), threads=2)
    return np.concatenate([ex(faces_tensor(crops[i: i + 256])) for i in range(0, len(crops), 256)])


def fold_package(args, k: int, photos: cv.Photos, folds: np.ndarray, work: Path) -> Path:
    """Fold k's extractor: fine-tuned with the release recipe on the workstation folds (cached), or --package."""
    if args.extractor != "fold":
        return Path(args.extractor)
    pkg = work / f"fold{k}" / "package"
    if not (pkg / "manifest.json").is_file():
        cv_args = cv.parse_args(["--package", args.fer_only, "--work", str(work), "--data", args.data,
                                 "--choose", "bf_short_m10_align", "--folds", str(args.folds)] + (["--quick"] if args.quick else []))
        cv_args.folds = args.folds
        det = cv.ensure_detectors(work)
        variant = cv.variant_specs(*det)[cv_args.choose]
        crops, _, _ = cv.cached_crops(work, photos, {cv_args.choose: variant}, None)
        fer_pix, fer_y = cv.fer_sample(Path(args.data) / "fer2013" / "fer2013_train.npz", cv_args.fer_per_class, cv_args.seed)
        cv.finetune_fold(cv_args, k, photos, folds, crops[cv_args.choose], variant, fer_pix, fer_y, work, lambda *a: None)
    return pkg


# ------------------------------------------------------------------ cameras
def camera_draw(labels: np.ndarray, pool: np.ndarray, mix: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` photo indices from ``pool`` whose classes follow ``mix`` (the demo's ``cameras.draw``)."""
    return np.array([i for i, _ in draw([(int(i), int(labels[i])) for i in pool], mix, n, rng)])


def camera_mix(alpha: str, k: int, rng: np.random.Generator) -> np.ndarray:
    return class_mix(0.0 if alpha == "uniform" else float(alpha), k, rng)


def pick_labels(frame_probs: np.ndarray, frame_ids: np.ndarray, n: int, strategy: str, rng: np.random.Generator) -> np.ndarray:
    """Positions of the frames a caregiver labels: the queue's most uncertain (one per distinct frame) or random."""
    if strategy == "random":
        return np.sort(rng.permutation(len(frame_ids))[:n])
    order = np.argsort(-uncertainty_score(frame_probs), kind="stable")
    _, first = np.unique(frame_ids[order], return_index=True)
    return order[np.sort(first)][:n]


# ------------------------------------------------------------------ methods: test probabilities of one camera
def run_learner(head: OnlineHead, source, frames: np.ndarray, x: np.ndarray, y: np.ndarray, seed: int,
                **config) -> GuardedLearner:
    """The device's learner (``GuardedLearner``, the code ``Device`` runs): it sees the camera's frames,
    then learns the caregiver's labels one at a time."""
    learner = GuardedLearner(head.copy(), replace(DeviceConfig(), seed=seed, **config), source)
    for f in frames:
        learner.observe(f)
    for xi, yi in zip(x, y):
        learner.learn(xi.astype(np.float32), int(yi))
    return learner


def ditto(head: OnlineHead, x: np.ndarray, y: np.ndarray, epochs: int = 30, strength: float = 1.0) -> OnlineHead:
    """Ditto (Li et al. 2021): a personal copy of the shared head trained on the camera's labels with a
    proximal pull toward the shared weights."""
    h = head.copy()
    anchor = [w.copy() for w in head.weights()]
    for _ in range(epochs):
        h.learn_step(x, y, anchor=anchor, anchor_strength=strength)
    return h


def bcts(head: OnlineHead, source) -> tuple[float, np.ndarray]:
    """Temperature and class bias of the head, fitted on the package's adult replay seed (BCTS)."""
    sx, sy = source.all()
    logp = np.log(np.maximum(head.predict_proba(sx).astype(np.float64), 1e-12))
    best = (np.inf, 1.0, np.zeros(logp.shape[1]))
    for t in (0.5, 0.7, 1.0, 1.4, 2.0, 3.0):
        b = personal.fit_bias(logp / t, sy, 1e-3)
        p = personal.reweight(np.exp(logp / t), b)
        loss = personal.mean_log_loss(p, sy)
        if loss < best[0]:
            best = (loss, t, b)
    return best[1], best[2]


def calibrated(probs: np.ndarray, t: float, b: np.ndarray) -> np.ndarray:
    return personal.reweight(np.exp(np.log(np.maximum(probs.astype(np.float64), 1e-12)) / t), b)


def camera_rows(ctx: dict, cam: dict, budget: int, strategy: str, rng: np.random.Generator) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each method's probabilities on the camera's own test and on the balanced test fold."""
    head, ref, s = ctx["head"], ctx["ref"], ctx["settings"]
    fx, fp, fids = cam["frames_x"], cam["frames_p"], cam["frame_ids"]
    tests = (cam["test_x"], ctx["balanced_x"])
    tp = [head.predict_proba(t) for t in tests]
    pos = pick_labels(fp, fids, budget, strategy, rng)
    lx, ly, lp = fx[pos], cam["frame_y"][pos], fp[pos]
    unl = np.setdiff1d(np.arange(len(fx)), pos)
    counts = np.bincount(ly, minlength=len(ref)).astype(np.float64)
    out = {"frozen": tp}
    today = run_learner(head, ctx["source"], fx, lx, ly, cam["seed"], personalize=False, balance_shared=False).head
    out["today's learner"] = [today.predict_proba(t) for t in tests]
    learner = run_learner(head, ctx["source"], fx, lx, ly, cam["seed"])
    em = personal.em_prior(fp, np.zeros(len(ref)), ref, 0.0, 100)
    out["EM prior, unlabelled frames (Saerens)"] = [personal.reweight(p, np.log(em / ref)) for p in tp]
    t, b = ctx["bcts"]
    cp = calibrated(fp, t, b)
    em_c = personal.em_prior(cp, np.zeros(len(ref)), ref, 0.0, 100)
    out["EM prior after BCTS (Alexandari)"] = [personal.reweight(calibrated(p, t, b), np.log(em_c / ref)) for p in tp]
    lab = (counts + 1) / (counts.sum() + len(ref))
    out["prior from label counts"] = [personal.reweight(p, np.log(lab / ref)) for p in tp]
    avg = (em + lab) / 2
    out["EM + label counts, averaged"] = [personal.reweight(p, np.log(avg / ref)) for p in tp]
    d = ditto(head, lx, ly)
    out["Ditto (personal head, prox to shared)"] = [d.predict_proba(t) for t in tests]
    out[NEW] = [learner.predict_proba(t) for t in tests]
    cam["levels"].append(learner.camera.adaptation.level)
    a = personal.choose(fp[unl], lp, ly, ref, s)
    out["new without the personal head (prior + bias only)"] = [a.apply(p, ref) for p in tp]
    a_l = personal.choose(fp[unl], lp, ly, ref, replace(s, guard_metric="log_loss"))
    out["prior + bias, guard by mean CV log-loss (no paired test)"] = [a_l.apply(p, ref) for p in tp]
    a_r = personal.choose(fp[unl], lp, ly, ref, s, lx, residual=True)
    out["prior + bias + a residual layer, guarded"] = [a_r.apply(p, ref, t) for p, t in zip(tp, tests)]
    a_ng = personal.adapt(fp[unl], lp, ly, ref, personal.Candidate("prior+bias", 0.25), s)
    out["prior + bias without the guard (frames 0.25)"] = [a_ng.apply(p, ref) for p in tp]

    if cam["refit"] is not None:
        out["refit on all 240 frames labelled (upper bound)"] = cam["refit"]
    return out


def refit_probs(ctx: dict, cam: dict) -> list[np.ndarray]:
    sx, sy = ctx["source"].all()
    x = np.concatenate([sx, np.repeat(cam["frames_x"], 2, axis=0)])
    y = np.concatenate([sy, np.repeat(cam["frame_y"], 2)])
    h = OnlineHead.fit(x, y, ctx["head"].params, max_iter=60)
    return [h.predict_proba(cam["test_x"]), h.predict_proba(ctx["balanced_x"])]


def acc(probs: np.ndarray, y: np.ndarray) -> float:
    return float((probs.argmax(1) == y).mean())


# ------------------------------------------------------------------ the run
def run(args: argparse.Namespace) -> dict:
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    photos = cv.load_photos(Path(args.data) / "infant", args.per_class, 0)
    folds = grouped_stratified_folds(photos.labels, photos.groups, args.folds, 0)
    runtime = PackageRuntime.open(args.package, DeviceConfig())
    crops = profile_crops(photos, runtime.finder, work, f"{len(photos.paths)}-{args.per_class}")
    settings = personal.PersonalSettings()
    results: list[dict] = []
    learn_all: list[dict] = []
    n_classes = len(runtime.classes)
    for k in range(args.folds):
        pkg = fold_package(args, k, photos, folds, work)
        test_pool, dev_pool = np.flatnonzero(folds == k), np.flatnonzero(folds == (k + 1) % args.folds)
        emb = {p: embed(pkg, crops[p]) for p in args.profiles}
        runtime_k = PackageRuntime.open(pkg, DeviceConfig())
        head, source = runtime_k.head(), runtime_k.source()
        ref = np.full(n_classes, 1.0 / n_classes)
        ctx = {"head": head, "source": source, "ref": ref, "settings": settings}
        ctx["bcts"] = bcts(head, source)
        learn_all.append(learn_whole_fold(ctx, emb["day"], photos.labels, dev_pool, test_pool, k))
        cells = [(a, p, c) for a in args.alphas for p in args.profiles for c in range(args.cameras)]
        for alpha, profile, c in tqdm(cells, desc=f"fold {k} cameras", unit="camera", mininterval=10):
            rng = np.random.default_rng([k, ALPHAS.index(alpha), list(PROFILES).index(profile), c])
            mix = camera_mix(alpha, n_classes, rng)
            fids = camera_draw(photos.labels, dev_pool, mix, N_FRAMES, rng)
            tids = camera_draw(photos.labels, test_pool, mix, N_TEST, rng)
            e = emb[profile]
            cam = {"frames_x": e[fids], "frame_y": photos.labels[fids], "frame_ids": fids, "frames_p": head.predict_proba(e[fids]),
                   "test_x": e[tids], "seed": c, "levels": []}
            ctx["balanced_x"] = e[test_pool]
            cam["refit"] = refit_probs(ctx, cam) if args.refit else None
            for budget in args.budgets:
                for strategy in STRATEGIES:
                    rows = camera_rows(ctx, cam, budget, strategy, np.random.default_rng([k, c, budget]))
                    for name, (own, bal) in rows.items():
                        results.append({"fold": k, "alpha": alpha, "profile": profile, "camera": c, "labels": budget,
                                        "strategy": strategy, "method": name, "own": acc(own, photos.labels[tids]),
                                        "balanced": acc(bal, photos.labels[test_pool])})
                    results[-1]["level"] = cam["levels"][-1]
        (work / "personalization-rows.json").write_text(json.dumps({"rows": results, "learn_all": learn_all}))
    summary = summarize(results, learn_all, args)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    plot(summary, out)
    return summary


def learn_whole_fold(ctx: dict, emb: np.ndarray, labels: np.ndarray, dev_pool: np.ndarray, test_pool: np.ndarray, k: int) -> dict:
    """A balanced day camera that learns every photo of its device fold (random order): unseen babies must not suffer."""
    head, ref = ctx["head"], ctx["ref"]
    order = np.random.default_rng(k).permutation(dev_pool)
    x, y = emb[order], labels[order]
    test_x, test_y = emb[test_pool], labels[test_pool]
    today = run_learner(head, ctx["source"], x, x, y, k, personalize=False, balance_shared=False)
    learner = run_learner(head, ctx["source"], x, x, y, k)
    tp = head.predict_proba(test_x)
    return {"fold": k, "frozen": acc(tp, test_y), "today's learner": acc(today.head.predict_proba(test_x), test_y),
            "new learner": acc(learner.predict_proba(test_x), test_y),
            "new learner's shared head (what it uploads)": acc(learner.head.predict_proba(test_x), test_y),
            "new level": learner.camera.adaptation.level}


def summarize(results: list[dict], learn_all: list[dict], args) -> dict:
    methods = list(dict.fromkeys(r["method"] for r in results))
    table: dict = {}
    for alpha in args.alphas:
        for budget in args.budgets:
            for strategy in STRATEGIES:
                cell = [r for r in results if r["alpha"] == alpha and r["labels"] == budget and r["strategy"] == strategy]
                frozen = {(r["fold"], r["profile"], r["camera"]): r["own"] for r in cell if r["method"] == "frozen"}
                for m in methods:
                    rs = [r for r in cell if r["method"] == m]
                    gains = np.array([r["own"] - frozen[(r["fold"], r["profile"], r["camera"])] for r in rs])
                    table.setdefault(m, {})[f"{alpha}|{budget}|{strategy}"] = {
                        "own": float(np.mean([r["own"] for r in rs])), "gain": float(gains.mean()), "worst_gain": float(gains.min()),
                        "balanced": float(np.mean([r["balanced"] for r in rs])), "n": len(rs)}
    by_profile: dict = {}
    for m in methods:
        for p in args.profiles:
            rs = [r for r in results if r["method"] == m and r["profile"] == p and r["labels"] == 60]
            fr = {(r["fold"], r["alpha"], r["camera"], r["strategy"]): r["own"] for r in results
                  if r["method"] == "frozen" and r["profile"] == p and r["labels"] == 60}
            by_profile.setdefault(m, {})[p] = float(np.mean([r["own"] - fr[(r["fold"], r["alpha"], r["camera"], r["strategy"])] for r in rs]))
    la = {m: float(np.mean([d[m] for d in learn_all])) for m in ("frozen", "today's learner", "new learner",
                                                                  "new learner's shared head (what it uploads)")}
    return {"protocol": {"folds": args.folds, "cameras_per_cell": args.cameras, "alphas": list(args.alphas),
                         "profiles": list(args.profiles), "budgets": list(args.budgets), "frames": N_FRAMES, "test": N_TEST,
                         "extractor": args.extractor},
            "table": table, "gain_by_profile_60_labels": by_profile, "learn_whole_fold": {"mean": la, "folds": learn_all}}


def print_table(summary: dict) -> None:
    t = summary["table"]
    for strategy in STRATEGIES:
        print(f"\n### labels from the {strategy}: gain over frozen on the camera's own frames (worst camera)")
        cols = [(a, b) for a in summary["protocol"]["alphas"] for b in summary["protocol"]["budgets"]]
        print("| method | " + " | ".join(f"α {a}, {b}" for a, b in cols) + " |")
        print("| --- |" + " --- |" * len(cols))
        for m, cells in t.items():
            vals = [cells[f"{a}|{b}|{strategy}"] for a, b in cols]
            print(f"| {m} | " + " | ".join(f"{100 * v['gain']:+.1f} ({100 * v['worst_gain']:+.1f})" for v in vals) + " |")
    print("\nfrozen own accuracy:", {c: round(v["own"], 3) for c, v in t["frozen"].items() if c.endswith("|60|random")})
    print("gain by profile at 60 labels:", json.dumps({m: {p: round(100 * g, 1) for p, g in v.items()}
                                                       for m, v in summary["gain_by_profile_60_labels"].items()}, indent=1))
    print("learning the whole device fold, balanced unseen babies:", summary["learn_whole_fold"]["mean"])


def plot(summary: dict, out: Path) -> None:
    from infantino.export.plots import pyplot

    plt = pyplot()
    alphas, budgets = summary["protocol"]["alphas"], summary["protocol"]["budgets"]
    fig, axes = plt.subplots(1, len(alphas), figsize=(5 * len(alphas), 5.2), sharey=True)
    for ax, alpha in zip(np.atleast_1d(axes), alphas):
        for m, cells in summary["table"].items():
            if m.startswith(("new", "prior + bias")) and m != NEW:
                continue
            ys = [100 * cells[f"{alpha}|{b}|random"]["gain"] for b in budgets]
            ax.plot(budgets, ys, marker="o", label=m, lw=2.5 if m.startswith("new") else 1.2)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.set_title(f"class mix: {'uniform' if alpha == 'uniform' else 'Dirichlet ' + alpha}")
        ax.set_xlabel("caregiver labels (random)")
    np.atleast_1d(axes)[0].set_ylabel("points over frozen, camera's own frames")
    handles, labels = np.atleast_1d(axes)[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.17, 1, 1))
    fig.savefig(out / "personalization_labels.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(9, 5))
    profiles = summary["protocol"]["profiles"]
    shown = [m for m in summary["gain_by_profile_60_labels"] if not m.startswith(("new", "prior + bias")) or m == NEW]
    width = 0.8 / len(shown)
    for i, m in enumerate(shown):
        ax.bar(np.arange(len(profiles)) + i * width, [100 * summary["gain_by_profile_60_labels"][m][p] for p in profiles], width, label=m)
    ax.set_xticks(np.arange(len(profiles)) + 0.4, profiles)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_ylabel("points over frozen at 60 labels")
    fig.legend(*ax.get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=6, frameon=False)
    fig.tight_layout(rect=(0, 0.18, 1, 1))
    fig.savefig(out / "personalization_profiles.png", dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(cv.DATA))
    p.add_argument("--package", default=str(REPO / "data" / "models"), help="the package whose face finder cuts the frames")
    p.add_argument("--fer-only", default=str(REPO / "data" / "models-fer-only"), help="the adult-only package fold extractors start from")
    p.add_argument("--extractor", default="fold",
                   help="fold: fine-tuned per fold with the release recipe (honest); or a package folder used for every fold")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "personalization"))
    p.add_argument("--work", default="/tmp/infantino-cv")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--cameras", type=int, default=4, help="cameras per (fold, class mix, profile)")
    p.add_argument("--per-class", type=int, default=None)
    p.add_argument("--alphas", nargs="+", default=list(ALPHAS), choices=ALPHAS)
    p.add_argument("--profiles", nargs="+", default=list(PROFILES), choices=list(PROFILES))
    p.add_argument("--budgets", nargs="+", type=int, default=list(BUDGETS))
    p.add_argument("--refit", action=argparse.BooleanOptionalAction, default=True, help="the upper-bound row (slow)")
    p.add_argument("--quick", action="store_true", help="CI size")
    args = p.parse_args(argv)
    if args.quick:  # CI size: the adult-only extractor for every fold (no fine-tuning), 3 folds of 4 photos a class
        args.folds, args.cameras, args.per_class, args.budgets = 3, 1, 4, [10, 30]
        args.profiles, args.extractor, args.refit = ["day", "night_ir"], args.fer_only, False
    return args


def main(argv: list[str] | None = None) -> int:
    from _timing import run_with_data

    args = parse_args(argv)
    return run_with_data("personalization", [Path(args.data) / "infant", Path(args.data) / "fer2013" / "fer2013_train.npz"],
                         lambda: print_table(run(args)))


if __name__ == "__main__":
    sys.exit(main())
