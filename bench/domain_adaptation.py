"""Does moving the extractor toward infants help? FER-only vs AdaBN vs fine-tuned.

Seeded 75/25 split of the infant photos (duplicates kept on one side). For each
extractor the head is re-fitted the same way (FER training faces + infant training
crops) and scored on held-out infant photos and held-out adult FER faces.

    python bench/domain_adaptation.py --checkpoint runs/lite0/checkpoint.pt [--finetune-epochs 3]

Prints a table and writes bench/results/domain_adaptation.json (+ the fine-tuned
checkpoint under --work).
"""
from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from infantino.edge_runtime.core.datasets import FER, INFANT, DataMissing, data_path, fer_file, infant_folder
from infantino.edge_runtime.core.head import HeadParams, OnlineHead
from infantino.edge_runtime.core.imagefolder import list_image_folder, split_items, write_split
from infantino.edge_runtime.core.metrics import summarize
from infantino.edge_runtime.core.preprocess import CLASSES, ImageError, crop_face, decode_gray, normalize, resize_face
from infantino.export.adapt import adabn
from infantino.edge_runtime.core.splits import stratified_split
from infantino.export.data import FaceSet, load_fer
from infantino.export.train import TrainConfig, load_checkpoint, train

RESULTS = Path(__file__).parent / "results"


def load_crops(items: list[tuple[Path, int]]) -> FaceSet:
    pixels, labels = [], []
    for path, label in items:
        try:
            pixels.append(resize_face(crop_face(decode_gray(path)).pixels))
            labels.append(label)
        except ImageError:
            continue
    return FaceSet(np.stack(pixels), np.asarray(labels, np.int64))


@torch.no_grad()
def embed(net: torch.nn.Module, pixels: np.ndarray) -> np.ndarray:
    net.eval()
    return np.concatenate([net.embedding(torch.from_numpy(normalize(pixels[i : i + 256]))).numpy() for i in range(0, len(pixels), 256)])


def score(net, fer_fit: FaceSet, fer_val: FaceSet, inf_train: FaceSet, inf_test: FaceSet, seed: int) -> dict:
    """Head fitted on FER + infant training crops (infant repeated to ~1/4 of the data)."""
    e_fer, e_inf = embed(net, fer_fit.pixels), embed(net, inf_train.pixels)
    repeat = max(1, len(e_fer) // (3 * len(e_inf)))
    x = np.concatenate([e_fer] + [e_inf] * repeat)
    y = np.concatenate([fer_fit.labels] + [inf_train.labels] * repeat)
    head = OnlineHead.fit(x, y, HeadParams(random_state=seed), max_iter=40)
    zero_shot = OnlineHead.fit(e_fer, fer_fit.labels, HeadParams(random_state=seed), max_iter=40)
    pred_inf = head.predict_proba(embed(net, inf_test.pixels)).argmax(1)
    pred_fer = head.predict_proba(embed(net, fer_val.pixels)).argmax(1)
    zs = zero_shot.predict_proba(embed(net, inf_test.pixels)).argmax(1)
    s_inf, s_fer = summarize(inf_test.labels, pred_inf, len(CLASSES)), summarize(fer_val.labels, pred_fer, len(CLASSES))
    return {"infant_test_accuracy": s_inf["accuracy"], "infant_test_macro_f1": s_inf["macro_f1"],
            "fer_val_accuracy": s_fer["accuracy"], "infant_zero_shot_accuracy": float(np.mean(zs == inf_test.labels))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--fer", default=str(data_path(*FER)))
    p.add_argument("--infant", default=str(data_path(*INFANT)))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--finetune-epochs", type=int, default=3)
    p.add_argument("--images-repeat", type=int, default=10)
    p.add_argument("--fer-fit", type=int, default=6000, help="FER training faces used to fit each head")
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "infantino-da"))
    p.add_argument("--out", default=str(RESULTS / "domain_adaptation.json"))
    args = p.parse_args()
    try:
        fer_file(args.fer), infant_folder(args.infant)
    except DataMissing as exc:
        raise SystemExit(f"domain_adaptation: {exc}") from None
    torch.set_num_threads(2)

    net, state = load_checkpoint(args.checkpoint)
    tcfg = state["train_config"]
    fer = load_fer(args.fer)
    keep, held = stratified_split(fer.labels, tcfg["val_fraction"], tcfg["seed"])
    rng = np.random.default_rng(args.seed)
    fer_fit, fer_val = fer.subset(rng.choice(keep, size=min(args.fer_fit, len(keep)), replace=False)), fer.subset(held)
    parts = split_items(list_image_folder(args.infant), {"train": 0.75, "test": 0.25}, args.seed)
    inf_train, inf_test = load_crops(parts["train"]), load_crops(parts["test"])
    print(f"infant split: {len(inf_train)} train / {len(inf_test)} test crops; FER {len(fer_fit)} fit / {len(fer_val)} val")

    rows = {}
    rows["fer_only"] = score(net, fer_fit, fer_val, inf_train, inf_test, args.seed)
    net_bn = copy.deepcopy(net)
    adabn(net_bn, inf_train.pixels)
    rows["adabn"] = score(net_bn, fer_fit, fer_val, inf_train, inf_test, args.seed)

    work = Path(args.work)
    roots = write_split({"train": parts["train"]}, work / "split")
    t0 = time.time()
    cfg = TrainConfig(fer=args.fer, out=str(work / "finetune"), images=[str(roots["train"])], init_from=args.checkpoint,
                      epochs=args.finetune_epochs, lr=5e-4, seed=tcfg["seed"], images_repeat=args.images_repeat)
    train(cfg)
    tuned, _ = load_checkpoint(work / "finetune" / "checkpoint.pt")
    rows["finetuned"] = score(tuned, fer_fit, fer_val, inf_train, inf_test, args.seed)
    rows["finetuned"]["finetune_seconds"] = time.time() - t0
    tuned_bn = copy.deepcopy(tuned)
    adabn(tuned_bn, inf_train.pixels)
    rows["finetuned_adabn"] = score(tuned_bn, fer_fit, fer_val, inf_train, inf_test, args.seed)

    print(f"{'extractor':18s} {'infant acc':>10s} {'infant F1':>9s} {'zero-shot':>9s} {'FER val acc':>11s}")
    for name, r in rows.items():
        print(f"{name:18s} {r['infant_test_accuracy']:10.3f} {r['infant_test_macro_f1']:9.3f} "
              f"{r['infant_zero_shot_accuracy']:9.3f} {r['fer_val_accuracy']:11.3f}")
    out = {"seed": args.seed, "n_infant_train": len(inf_train), "n_infant_test": len(inf_test),
           "finetune": {"epochs": args.finetune_epochs, "images_repeat": args.images_repeat, "lr": 5e-4,
                        "checkpoint": str(work / "finetune" / "checkpoint.pt")}, "results": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
