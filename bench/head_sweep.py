"""The package head's fit, swept on fold extractors that `infant_cv.py` already fine-tuned.

    python bench/head_sweep.py --work /tmp/infantino-cv22/A      # fold{k}/package from a --workstation all run

The bootstrap head (FER embeddings + the workstation's infant embeddings, class-balanced) is the
cheap lever after fine-tuning: refitting it takes seconds, so its two knobs (how many times an
infant photo counts, how long the fit runs) are measured here on the same folds, per fold, beside
the package's FER-only head. Reads the folds and crops exactly as infant_cv does; writes JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).parent))
from infant_cv import (DATA, REPO, cached_crops, embed, ensure_detectors, fer_sample, fit_head, load_photos,  # noqa: E402
                       scores, variant_specs, workstation_mask)

from infantino.edge_runtime.core.head import OnlineHead  # noqa: E402
from infantino.edge_runtime.core.package import open_package  # noqa: E402
from infantino.edge_runtime.core.splits import grouped_stratified_folds  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="an infant_cv --work folder holding fold{k}/package")
    p.add_argument("--workstation", choices=["3folds", "all"], default="all")
    p.add_argument("--repeats", default="2,4,8,16")
    p.add_argument("--iters", default="60,200")
    p.add_argument("--choose", default="bf_short_m10_align")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "infant_cv" / "head_sweep.json"))
    args = p.parse_args(argv)
    work = Path(args.work)
    photos = load_photos(DATA / "infant", None, 0)
    folds = grouped_stratified_folds(photos.labels, photos.groups, 5, 0)
    variants = variant_specs(*ensure_detectors(work))
    crops = cached_crops(work, photos, variants, None)[0][args.choose]
    fer_pix, fer_y = fer_sample(DATA / "fer2013" / "fer2013_train.npz", 600, 0)
    grid = [(r, i) for r in map(int, args.repeats.split(",")) for i in map(int, args.iters.split(","))]
    rows: dict[str, list[dict]] = {}
    for k in tqdm(range(5), desc="folds", unit="fold"):
        pkg = work / f"fold{k}" / "package"
        test, ws = folds == k, workstation_mask(folds, k, 5, args.workstation)
        emb, fer_emb = embed(pkg, crops, False), embed(pkg, fer_pix, False)
        y = photos.labels
        rows.setdefault("package head (FER only)", []).append(
            scores(y[test], OnlineHead.load(open_package(pkg).path("head")).predict_proba(emb[test])))
        for r, i in grid:
            head = fit_head(fer_emb, fer_y, emb[ws], y[ws], r, i)
            rows.setdefault(f"head fit FER+infant, infants x{r}, {i} iterations", []).append(scores(y[test], head.predict_proba(emb[test])))
    table = {n: {m: (float(np.mean([f[m] for f in fs])), float(np.std([f[m] for f in fs]))) for m in fs[0]} | {"folds": fs}
             for n, fs in rows.items()}
    print("\n| head | 7-class acc | macro-F1 | valence |\n| --- | --- | --- | --- |")
    for n, t in table.items():
        print(f"| {n} | " + " | ".join(f"{t[m][0]:.3f} ± {t[m][1]:.3f}" for m in ("accuracy", "macro_f1", "valence")) + " |")
    Path(args.out).write_text(json.dumps({"work": str(work), "workstation": args.workstation, "table": table}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
