"""The number a caregiver feels: distress alerts on day-long camera timelines (issue 22).

    python bench/distress_alerts.py            # the docs' table: 5 folds, 24 h days (docs/distress-alerts.md)
    python bench/distress_alerts.py --quick    # CI size: 2 folds, 20-minute days, the release package
    python bench/distress_alerts.py --fold-packages /tmp/infantino-cv22/RUN   # another run's fold{k}/package
    python bench/distress_alerts.py --package data/models                     # one package for every fold

Folds as in ``bench/infant_cv.py`` (grouped, stratified 5-fold, seed 0). Test fold k's photos
are scored by fold k's package (fine-tuned with the release recipe without fold k) exactly as
``Device.predict`` scores a frame (the package's face finder, extractor and head), and by the
``fer`` peer on the same frames. Each photo gives a few camera frames: itself and lightly
perturbed copies (framing, brightness, contrast, noise; seeded). A timeline is 2 fps: calm
stretches (happy, neutral, surprise photos, each held a few seconds, some frames with no
face) with distress episodes (angry, disgust, fear, sad photos) of 30 s to 5 min; a calm day
has no episode. Every frame goes through the watch loop's ``frame_negative`` and the
``DistressMonitor`` logic (here vectorised; checked against the monitor itself).

An episode [start, end) is **detected** when an alert starts during it or at most --grace-s
(10 s) after its end (also reported: alerts during the episode only); time to alert = alert
start - episode start. An alert starting within the smoothing window's lag after that is the
episode's (late); any other alert start is a **false alert**. Settings are chosen on the days
of seeds 0-4 and reported on seeds 5-9 (other timelines of the same photos); the rule is also
run leave-one-fold-out (chosen on four folds, scored on the fifth, photos it did not choose
on). The rule: no fold above ``--fa-budget`` (0.5, half the target) false alerts per calm
day; then the most recall of >= 60 s episodes, and within 0.01 of it the fastest median
alert. Writes ``summary.json``, ``distress_timeline.png`` and ``distress_settings.png`` to --out.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).parent))  # run as a script from anywhere: its siblings
import infant_cv as cv  # noqa: E402
from distress_timelines import (CALM, GRID, NEGATIVE, NO_FACE, OLD, QUICK_GRID, FrameTable, Timeline,  # noqa: E402
                                TimelineSpec, camera_frames, check_reference, choose, compact, day_parts, fold_days,
                                grid, leave_one_fold_out, one_at_a_time, with_folds)

from infantino.edge_runtime.config import DeviceConfig  # noqa: E402
from infantino.edge_runtime.core.preprocess import CLASSES, ImageError, decode_rgb  # noqa: E402
from infantino.edge_runtime.core.splits import grouped_stratified_folds  # noqa: E402
from infantino.edge_runtime.package_runtime import PackageRuntime  # noqa: E402
from infantino.edge_runtime.watch.distress import START, DistressSettings, frame_negative  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


class Ours:
    """A model package as ``Device.predict`` runs it on a frame: its face finder, extractor and head."""

    def __init__(self, package: Path):
        self.runtime = PackageRuntime.open(package, DeviceConfig(threads=1))
        self.head = self.runtime.head()
        self.classes = self.runtime.classes

    def __call__(self, frames: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        preps = [self.runtime.prepare(f, True) for f in frames]
        probs = self.head.predict_proba(self.runtime.extractor(np.concatenate([p.tensor for p in preps])))
        return probs.astype(np.float32), np.array([p.face_found for p in preps]), np.stack([p.crop for p in preps])


def frame_tables(photos: cv.Photos, ids: np.ndarray, n_variants: int, seed: int, ours: Optional[Ours], peer,
                 desc: str) -> dict[str, FrameTable]:
    """Both pipelines (those given) on the same frames of photos ``ids``, one decode per photo."""
    n = len(photos.paths)
    tabs = {name: (np.zeros((n, n_variants, len(CLASSES)), np.float32), np.zeros((n, n_variants), bool))
            for name, model in (("ours", ours), ("peer", peer)) if model is not None}
    for i in tqdm(ids, desc=desc, unit="photo", mininterval=5):
        frames = camera_frames(decode_photo(photos.paths[i]), n_variants, (seed, int(i)))
        if ours is not None:
            tabs["ours"][0][i], tabs["ours"][1][i], _ = ours(frames)
        if peer is not None:
            for v, f in enumerate(frames):
                tabs["peer"][0][i, v], tabs["peer"][1][i, v] = peer.predict(f)
    return {k: FrameTable(*v) for k, v in tabs.items()}


def decode_photo(path: Path) -> np.ndarray:
    """The photo as the camera's RGB frame (a grey frame for one that cannot be decoded, as infant_cv does)."""
    try:
        return decode_rgb(path)
    except ImageError:
        return np.full((64, 64, 3), 128, np.uint8)


def cached(path: Path, make: Callable[[], FrameTable]) -> FrameTable:
    """A frame table kept in --work between runs (keyed by everything that shapes it)."""
    if path.is_file():
        with np.load(path) as d:
            return FrameTable(d["probs"], d["found"])
    table = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, probs=table.probs, found=table.found)
    return table


def key_of(*parts: object) -> str:
    return hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).hexdigest()[:16]


# ------------------------------------------------------------------ the run
def fold_package(args: argparse.Namespace, k: int) -> Path:
    if args.package:
        return Path(args.package)
    if args.packages:
        return Path(args.packages[list(args.test_folds).index(k)])
    pattern = args.fold_packages if "{k}" in args.fold_packages else str(Path(args.fold_packages) / "fold{k}" / "package")
    return Path(pattern.format(k=k))


def cv_crops(args: argparse.Namespace, photos: cv.Photos) -> Optional[dict[str, np.ndarray]]:
    """infant_cv's cached crops of the release's face finding, through ``cv.cached_crops`` (never recomputed here:
    a key that does not match raises before anything is written); None when not the full protocol."""
    work = Path(args.cv_work)
    if args.per_class is not None or not work.is_dir():
        return None

    class NotCached(Exception):
        pass

    class NoRecompute:  # crop_all's first photo asks the peer: stop there, before cached_crops writes anything
        def predict(self, rgb):
            raise NotCached

    det = work / "detectors"
    try:
        crops, _, peer = cv.cached_crops(work, photos, cv.variant_specs(det / "short_range", det / "full_range"), NoRecompute())
    except NotCached:
        print(f"distress_alerts: {work} holds no infant_cv crops of these photos; crops not cross-checked", file=sys.stderr)
        return None
    return {"crops": crops["bf_short_m10_align"], "peer": peer}


def crops_agree(ours: Ours, photos: cv.Photos, ids: np.ndarray, crops: np.ndarray) -> float:
    """Share of the photos whose face crop (the package's finder, as the device cuts it) equals infant_cv's."""
    return float(np.mean([np.array_equal(ours([decode_photo(photos.paths[i])])[2][0], crops[i]) for i in ids]))


def device_check(package: Path, photos: cv.Photos, ids: np.ndarray, table: FrameTable, args) -> float:
    """A real ``Device.predict`` on a few of the frames agrees with the table (max |probability difference|)."""
    from infantino.edge_runtime.device import Device

    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        dev = Device(package, Path(tmp) / "state", DeviceConfig(threads=1, autosave=False))
        codes = table.codes(dev.classes)
        for i in ids[:3]:
            frames = camera_frames(decode_photo(photos.paths[i]), args.variants, (args.frame_seed, int(i)))
            for v in (0, args.variants - 1):
                pred = dev.predict(frames[v], enqueue=False)
                worst = max(worst, float(np.abs(pred.probabilities - table.probs[i, v]).max()))
                flag = frame_negative(pred.classes, pred.index, pred.face_found)
                if (NO_FACE if flag is None else int(flag)) != codes[i, v]:
                    raise AssertionError(f"photo {i} frame {v}: the device's frame_negative differs from the table")
    return worst


def run(args: argparse.Namespace) -> dict:
    Path(args.out).mkdir(parents=True, exist_ok=True)
    return report(args, *build_days(args))


def fold_codes(args: argparse.Namespace, k: int, photos: cv.Photos, ids: np.ndarray, peer,
               cached_cv: Optional[dict]) -> tuple[dict[str, np.ndarray], dict]:
    """Fold k's frame codes per pipeline (tables cached in --work), and the checks that they are the device's."""
    work, pkg = Path(args.work), fold_package(args, k)
    tkey = key_of(photos.paths, ids, args.variants, args.frame_seed)
    paths = {"ours": work / f"frames-ours-{key_of(tkey, (pkg / 'manifest.json').read_bytes())}.npz",
             "peer": work / f"frames-peer-{tkey}.npz"}
    ours = Ours(pkg)
    models = {"ours": ours, "peer": peer}
    missing = {p: m for p, m in models.items() if m is not None and not paths[p].is_file()}
    fresh = frame_tables(photos, ids, args.variants, args.frame_seed, missing.get("ours"), missing.get("peer"),
                         f"fold {k} frames") if missing else {}
    tables = {p: cached(paths[p], lambda p=p: fresh[p]) for p, m in models.items() if m is not None}
    codes = {p: tb.codes() for p, tb in tables.items()}
    check = {"package": str(pkg), "device_max_abs_prob_diff": device_check(pkg, photos, ids, tables["ours"], args),
             "face_found": {p: float(tb.found[ids].mean()) for p, tb in tables.items()},
             "code_changed_vs_photo": {p: float((c[ids, 1:] != c[ids, :1]).mean()) for p, c in codes.items()}}
    if cached_cv is not None:
        check["crops_equal_infant_cv"] = crops_agree(ours, photos, ids, cached_cv["crops"])
        if "peer" in tables and len(cached_cv["peer"]) == len(photos.paths):  # the peer on the photo itself, as infant_cv scored it
            check["peer_max_abs_diff_infant_cv"] = float(np.abs(tables["peer"].probs[ids, 0] - cached_cv["peer"][ids]).max())
    return codes, check


def build_days(args: argparse.Namespace) -> tuple[dict, dict, dict, TimelineSpec]:
    """Frame tables per test fold, then each seed's mixed and calm day per fold, as monitors per pipeline:
    ``{pipeline: {seed: [(fold, mixed, episodes, calm)]}}``; also the checks and one example day."""
    checks: dict = {"folds": {}}
    example: dict = {}
    photos = cv.load_photos(Path(args.data) / "infant", args.per_class, 0)
    folds = grouped_stratified_folds(photos.labels, photos.groups, args.folds, 0)
    cached_cv = cv_crops(args, photos)
    if cached_cv is not None:
        checks["infant_cv_cached_peer_rows"] = len(cached_cv["peer"])  # 0 when that cache was written without the peer
    peer = cv._peer() if args.peer else None
    spec = TimelineSpec(seconds=args.hours * 3600, hold_s=tuple(args.hold_s), no_face_share=args.no_face_share,
                        episode_s=tuple(args.episode_s), gap_s=tuple(args.gap_s))
    mons: dict[str, dict[int, list]] = {p: {} for p in ["ours"] + (["peer"] if peer is not None else [])}
    for k in args.test_folds:
        ids = np.flatnonzero(folds == k)
        codes, checks["folds"][k] = fold_codes(args, k, photos, ids, peer, cached_cv)
        calm, negative = ids[np.isin(photos.labels[ids], CALM)], ids[np.isin(photos.labels[ids], NEGATIVE)]
        if not len(calm) or not len(negative):
            raise SystemExit(f"fold {k} has no calm or no negative photo (use more photos per class)")
        for seed in sorted({*args.choose_seeds, *args.report_seeds}):
            days, mixed = fold_days(k, seed, calm, negative, spec, args.variants, {p: codes[p] for p in mons})
            for p in mons:
                mons[p].setdefault(seed, []).append(days[p])
            if seed == args.report_seeds[0] and k == args.test_folds[0]:
                example = {"timeline": mixed}
    return mons, checks, example, spec


def report(args, mons: dict, checks: dict, example: dict, spec: TimelineSpec) -> dict:
    hours, budget = args.hours, args.fa_budget
    space = QUICK_GRID if args.quick else GRID
    settings = grid(space)

    def days(p: str, seeds: list[int]) -> list:
        return [m for s in seeds for m in mons[p][s]]

    sweep = {p: day_parts(tqdm(days(p, args.choose_seeds), desc=f"sweep {p}", unit="day", mininterval=5), settings, args.grace_s)
             for p in mons}
    chosen = {p: choose([(s, with_folds(parts, hours)) for s, parts in zip(settings, sweep[p])], budget)[0] for p in mons}
    table: dict[str, dict] = {}
    nested_picks = {}
    for p in mons:
        named = {"old defaults": OLD, "chosen (ours' rule)": chosen["ours"], **({"peer's own rule": chosen[p]} if p == "peer" else {})}
        rows = day_parts(days(p, args.report_seeds), list(named.values()), args.grace_s)
        table[p] = {name: {"settings": asdict(s), **with_folds(parts, hours)} for (name, s), parts in zip(named.items(), rows)}
        picks, table[p]["the rule, leave one fold out"] = leave_one_fold_out(
            settings, sweep[p], days(p, args.report_seeds), args.test_folds, hours, budget, args.grace_s)
        nested_picks[p] = picks
    checks["reference_monitor_events"] = check_reference(mons["ours"][args.report_seeds[0]][0], chosen["ours"])
    curves = {p: one_at_a_time(days(p, args.report_seeds), chosen["ours"], space, args.grace_s, hours) for p in mons}
    summary = {"protocol": protocol(args, spec), "checks": checks, "chosen": asdict(chosen["ours"]),
               "peer_chosen": asdict(chosen["peer"]) if "peer" in chosen else None, "table": table,
               "nested_picks": nested_picks, "curves": curves,
               "sweep": {p: compact(settings, [with_folds(parts, hours) for parts in sweep[p]]) for p in mons}}
    (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=1))
    plot_timeline(DistressSettings(**summary["chosen"]), example["timeline"], Path(args.out), mons, args.report_seeds[0])
    plot_settings(summary, Path(args.out))
    print_table(summary)
    return summary


def protocol(args, spec: TimelineSpec) -> dict:
    return {"folds": args.folds, "test_folds": list(args.test_folds), "per_class": args.per_class, "hours": args.hours,
            "fps": spec.fps, "variants": args.variants, "frame_seed": args.frame_seed, "choose_seeds": args.choose_seeds,
            "report_seeds": args.report_seeds, "fa_budget_per_calm_day": args.fa_budget, "timeline": asdict(spec),
            "calm": [CLASSES[c] for c in CALM], "negative": [CLASSES[c] for c in NEGATIVE],
            "detected": f"an alert starts in [episode start, episode end + {args.grace_s:g} s]",
            "false": "an alert start outside every [episode start, episode end + grace + window_s] (the window's lag)",
            "packages": args.package or args.packages or args.fold_packages}


def fmt(v: Optional[float], pattern: str = "{:.3f}") -> str:
    return "-" if v is None else pattern.format(v)


def settings_text(s: dict) -> str:
    return f"{s['alert_after_s']:g} s, window {s['window_s']:g} s, {s['enter_share']:g}/{s['exit_share']:g}"


def print_table(summary: dict) -> None:
    print("\n| pipeline | settings | recall >= 60 s (worst fold) | during it | recall all | recall 30-60 s | time to alert p50 / p90 (s) "
          "| false alerts / calm day (worst fold) | false / mixed day | episodes |\n|" + " --- |" * 10)
    for p, rows in summary["table"].items():
        for name, r in rows.items():
            what = f"{name}: {settings_text(r['settings'])}" if "settings" in r else name
            print(f"| {p} | {what} | {fmt(r['recall_60'])} ({r['worst_fold_recall_60']:.3f}) | {fmt(r['recall_60_during'])} | "
                  f"{fmt(r['recall_all'])} | {fmt(r['recall_30_60'])} | "
                  f"{fmt(r['tta_median_60'], '{:.0f}')} / {fmt(r['tta_p90_60'], '{:.0f}')} | "
                  f"{r['false_per_calm_day']:.2f} ({r['worst_fold_false_per_calm_day']:.2f}) | {r['false_per_mixed_day']:.2f} | "
                  f"{r['episodes']} |")
    print("chosen:", settings_text(summary["chosen"]), "| checks:", json.dumps(summary["checks"]))


def plot_timeline(chosen: DistressSettings, tl: Timeline, out: Path, mons: dict, seed: int) -> None:
    """An hour around the example day's first episode, ours above the peer: frames, window share, alerts."""
    from infantino.export.plots import pyplot

    plt = pyplot()
    first = tl.episodes[0, 0] if len(tl.episodes) else 0.0
    lo, hi = max(0.0, first - 600), min(len(tl.photo) / tl.fps, first + 3000)
    fig, axes = plt.subplots(len(mons), 1, figsize=(11, 2.4 * len(mons)), sharex=True, squeeze=False)
    for ax, p in zip(axes[:, 0], mons):
        fast = mons[p][seed][0][1]
        sel = (fast.t >= lo) & (fast.t < hi)
        minutes = fast.t[sel] / 60
        for s, e in tl.episodes:
            ax.axvspan(s / 60, e / 60, color="tab:red", alpha=0.15, lw=0)
        ax.plot(minutes, np.where(fast.codes[sel] == 1, 1.04, np.nan), "|", color="tab:red", ms=3, label="negative frame")
        ax.plot(minutes, fast.share(chosen.window_s, chosen.min_faces)[sel], color="tab:blue", lw=0.8, label="negative share")
        for e in fast.events(chosen):
            if lo <= e.t < hi:
                ax.axvline(e.t / 60, color="black" if e.kind == START else "tab:grey", ls="-" if e.kind == START else ":", lw=1)
        ax.axhline(chosen.enter_share, color="tab:orange", lw=0.6, ls="--")
        ax.axhline(chosen.exit_share, color="tab:green", lw=0.6, ls="--")
        ax.set_ylim(-0.05, 1.1)
        ax.set_ylabel(p)
        ax.set_xlim(lo / 60, hi / 60)
    axes[0, 0].set_title("episodes (red), negative frames, window share; alerts start (black) and end (grey), "
                         "chosen settings", fontsize=9)
    axes[-1, 0].set_xlabel("minutes into the day")
    axes[0, 0].legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "distress_timeline.png", dpi=120)
    plt.close(fig)


def plot_settings(summary: dict, out: Path) -> None:
    """Recall and false alerts as each setting moves alone around the chosen ones: how sharp the choice is."""
    from infantino.export.plots import pyplot

    plt = pyplot()
    curves = summary["curves"]
    names = list(next(iter(curves.values())))
    fig, axes = plt.subplots(2, len(names), figsize=(3.2 * len(names), 5.2), squeeze=False)
    for j, name in enumerate(names):
        for p, colour in zip(curves, ("tab:blue", "tab:grey")):
            xs = [c["value"] for c in curves[p][name]]
            axes[0, j].plot(xs, [c["recall_60"] for c in curves[p][name]], "o-", color=colour, label=p)
            axes[1, j].plot(xs, [c["false_per_calm_day"] for c in curves[p][name]], "o-", color=colour, label=p)
        axes[0, j].axhline(0.9, color="tab:red", lw=0.6, ls="--")
        axes[1, j].axhline(1.0, color="tab:red", lw=0.6, ls="--")
        axes[1, j].set_yscale("symlog", linthresh=0.1)
        axes[1, j].set_ylim(bottom=0)
        for ax in axes[:, j]:
            ax.axvline(summary["chosen"][name], color="black", lw=0.6, ls=":")
        axes[1, j].set_xlabel(name + " (others as chosen)")
    axes[0, 0].set_ylabel("recall, episodes >= 60 s")
    axes[1, 0].set_ylabel("false alerts per calm day (symlog)")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "distress_settings.png", dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(cv.DATA), help="folder holding infant/<class>/")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--fold-packages", default="/tmp/infantino-cv/fold{k}/package",
                       help="fold k's package: a pattern with {k}, or a run folder holding fold{k}/package")
    which.add_argument("--packages", nargs="+", help="one package per test fold, in fold order")
    which.add_argument("--package", help="one package for every fold (a release that saw the photos scores too well)")
    p.add_argument("--cv-work", default="/tmp/infantino-cv", help="infant_cv's scratch (read only): its cached crops are checked")
    p.add_argument("--work", default="/tmp/infantino-distress", help="scratch: the frame tables")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "distress_alerts"))
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--test-folds", type=int, nargs="+", default=None, help="default: all")
    p.add_argument("--per-class", type=int, default=None)
    p.add_argument("--variants", type=int, default=6, help="camera frames per photo (the photo and perturbed copies)")
    p.add_argument("--frame-seed", type=int, default=0)
    p.add_argument("--hours", type=float, default=24.0, help="length of each mixed and each calm day")
    p.add_argument("--hold-s", type=float, nargs=2, default=[2.0, 10.0])
    p.add_argument("--no-face-share", type=float, default=0.05)
    p.add_argument("--episode-s", type=float, nargs=2, default=[30.0, 300.0])
    p.add_argument("--gap-s", type=float, nargs=2, default=[300.0, 1500.0], help="calm between episodes: minimum, mean extra")
    p.add_argument("--choose-seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="the days settings are chosen on")
    p.add_argument("--report-seeds", type=int, nargs="+", default=[5, 6, 7, 8, 9], help="the days the table reports")
    p.add_argument("--grace-s", type=float, default=10.0,
                   help="an alert starting up to this long after an episode's end still detects it (default: %(default)s)")
    p.add_argument("--fa-budget", type=float, default=0.5, help="false alerts per calm day allowed on every fold when choosing")
    p.add_argument("--peer", action=argparse.BooleanOptionalAction, default=True, help="also the fer peer")
    p.add_argument("--quick", action="store_true", help="CI size")
    args = p.parse_args(argv)
    if args.quick:  # CI size: the release package for both folds (no fold packages there), 20-minute days
        args.folds, args.per_class, args.variants, args.hours = 3, 6, 3, 1 / 3
        args.test_folds = args.test_folds or [0, 1]
        args.gap_s, args.choose_seeds, args.report_seeds = [60.0, 90.0], [0], [1]
        if args.packages is None and args.fold_packages == p.get_default("fold_packages"):
            args.package = args.package or str(REPO / "data" / "models")
    args.test_folds = args.test_folds or list(range(args.folds))
    if args.packages and len(args.packages) != len(args.test_folds):
        p.error(f"--packages needs one package per test fold ({len(args.test_folds)})")
    if set(args.choose_seeds) & set(args.report_seeds):
        p.error("--choose-seeds and --report-seeds must differ (choose on one, report on the other)")
    return args


def main(argv: list[str] | None = None) -> int:
    from _timing import run_with_data

    args = parse_args(argv)
    return run_with_data("distress_alerts", [Path(args.data) / "infant"], lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
