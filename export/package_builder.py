"""Build the model package from a training checkpoint.

Steps: export fp32 ONNX and check parity with torch; quantise to int8 (static QDQ,
calibrated on training faces); embed the training faces and fit the bootstrap head;
merge extractor and head into ``classifier.onnx``; score everything on the held-out
FER split the checkpoint was validated on; write ``manifest.json`` with hashes.
The package is built in a scratch folder and moved into place at the end.

``trained_on`` says what the network saw as data, never as a path of this machine: the FER
file's name, and for extra photos (``train --images``, ``--adabn``) a count, a digest of the set
and a short key per file (``infantino.edge_runtime.datasets.image_set_record``); the folders must still
be there when the package is built.
"""
from __future__ import annotations

import io
import json
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from infantino.edge_runtime.atomic import atomic_write_bytes
from infantino.edge_runtime.datasets import image_folders_record
from infantino.edge_runtime.facefinder import FaceFinder, detector_file, uses_blazeface
from infantino.edge_runtime.head import HeadParams, OnlineHead
from infantino.edge_runtime.metrics import summarize
from infantino.edge_runtime.package import MANIFEST, Manifest, describe_files, read_manifest, sha256_file, write_manifest
from infantino.edge_runtime.preprocess import CLASSES, DEFAULT_SPEC, PreprocessSpec, normalize
from infantino.edge_runtime.splits import stratified_split

from .classifier import PROBABILITIES, merge_classifier
from .detector import copy_into_package
from .data import load_fer
from .onnx_export import check_parity, export_extractor, run_batched, session
from .quantize import quantize_extractor
from .train import load_checkpoint, predict_logits

REPLAY_SEED_PER_CLASS = 64
INT8_TOLERANCE = 0.01  # classifier.onnx uses the int8 extractor when it costs at most one point


@dataclass
class BuildOptions:
    checkpoint: str
    out: str
    fer: str
    calibration_size: int = 512
    head_max_iter: int = 40
    threads: int = 2
    force: bool = False
    report_dir: str | None = None
    adabn: str | None = None  # ImageFolder of unlabelled target-domain photos or crops: re-estimate BN statistics first
    detector: str | None = None  # detector folder (`infantino-export detector`); default: the one the run trained with
    flip_average: bool | None = None  # devices average each face's embedding with its mirror's; None: keep the spec's
    head_images: str | None = None  # ImageFolder of labelled target photos the bootstrap head also learns from
    head_images_repeat: int = 4


def write_replay_seed(path: Path, emb: np.ndarray, labels: np.ndarray, per_class: int, seed: int) -> None:
    """A class-balanced sample of training embeddings, as plain arrays (x float32, y int64)."""
    rng = np.random.default_rng(seed)
    idx = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in range(len(CLASSES))])
    buf = io.BytesIO()
    np.savez(buf, x=emb[idx].astype(np.float32), y=labels[idx].astype(np.int64))
    atomic_write_bytes(path, buf.getvalue())


def _accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(pred == labels))


def package_spec(trained: PreprocessSpec, opts: BuildOptions) -> PreprocessSpec:
    """The run's spec (its face finding) with the build's inference options; the tensor must be this code's."""
    tensor = ("size", "channels", "mean", "std", "layout", "pixel_scale", "resize", "color")
    if any(getattr(trained, f) != getattr(DEFAULT_SPEC, f) for f in tensor):
        raise ValueError("checkpoint was trained on another input tensor than this code's preprocessing")
    return trained if opts.flip_average is None else replace(trained, flip_average=opts.flip_average)


def embed_faces(sess, pixels: np.ndarray, spec: PreprocessSpec, batch: int = 2048) -> np.ndarray:
    """Embeddings of uint8 crops as devices compute them (with the mirror averaged in when the spec says so)."""
    def run(p: np.ndarray) -> np.ndarray:
        return np.concatenate([run_batched(sess, normalize(p[i : i + batch], spec)) for i in range(0, len(p), batch)])

    x = run(pixels)
    return (x + run(np.ascontiguousarray(pixels[:, :, ::-1]))) / 2 if spec.flip_average else x


def fit_head(opts: BuildOptions, spec: PreprocessSpec, detector: str | None, extractor_session, fer_x: np.ndarray,
             fer_y: np.ndarray) -> tuple[OnlineHead, int]:
    """The bootstrap head: FER embeddings, plus (with ``head_images``) the target photos, class-balanced.

    Target photos are cut by the package's own face finder and embedded by the int8
    extractor the devices run, as the head will meet them."""
    if not opts.head_images:
        return OnlineHead.fit(fer_x, fer_y, HeadParams(), max_iter=opts.head_max_iter), 0
    from .bootstrap_head import fit_bootstrap_head
    from .data import load_image_folder

    finder = FaceFinder.from_file(spec, detector_file(detector) if uses_blazeface(spec) else None)
    target = load_image_folder(opts.head_images, spec, finder=finder)
    x = embed_faces(extractor_session, target.pixels, spec)
    head = fit_bootstrap_head(fer_x, fer_y, x, target.labels, repeat=opts.head_images_repeat, max_iter=opts.head_max_iter)
    return head, int(len(target))


def build_package(opts: BuildOptions, log=print) -> dict:
    """Returns the manifest dict; raises ``ParityError`` if the export is not faithful."""
    net, state = load_checkpoint(opts.checkpoint)
    tcfg = state["train_config"]
    spec = package_spec(PreprocessSpec.from_dict(state["preprocess"]), opts)
    detector = opts.detector or tcfg.get("detector")
    fer = load_fer(opts.fer, spec, limit=tcfg.get("limit"))
    keep, held = stratified_split(fer.labels, tcfg["val_fraction"], tcfg["seed"])
    train, val = fer.subset(keep), fer.subset(held)
    x_val = normalize(val.pixels, spec)
    adapted = None
    if opts.adabn:
        from .adapt import adabn
        from .data import load_image_folder

        target = load_image_folder(opts.adabn, spec).pixels  # labels, if any, are ignored
        adapted = {"images": image_folders_record([opts.adabn]), "n": int(len(target)), "bn_layers": adabn(net, target)}
        log(f"AdaBN: batch-norm statistics of {adapted['bn_layers']} layers re-estimated on {len(target)} target images")

    out = Path(opts.out)
    scratch = out.with_name(out.name + ".building")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    t0 = time.time()
    trained_images = image_folders_record(tcfg.get("images") or [])  # before the slow part: a gone folder fails fast

    fp32, int8 = scratch / "extractor.onnx", scratch / "extractor.int8.onnx"
    export_extractor(net, fp32, (spec.channels, *spec.size))
    parity = check_parity(net, fp32, x_val[:256])
    log(f"exported {fp32.name}: max |torch - onnxruntime| = {parity:.2e}")

    rng = np.random.default_rng(tcfg["seed"])
    calib_idx = rng.choice(len(train), size=min(opts.calibration_size, len(train)), replace=False)
    quantize_extractor(fp32, int8, normalize(train.pixels[calib_idx], spec))
    log(f"quantised {int8.name} on {len(calib_idx)} training faces")

    s32, s8 = session(fp32, opts.threads), session(int8, opts.threads)
    emb_train = embed_faces(s32, train.pixels, spec)
    emb_val32, emb_val8 = embed_faces(s32, val.pixels, spec), embed_faces(s8, val.pixels, spec)
    head, n_head_images = fit_head(opts, spec, detector, s8, emb_train, train.labels)
    head.save(scratch / "head.npz")
    write_replay_seed(scratch / "replay_seed.npz", emb_train, train.labels, REPLAY_SEED_PER_CLASS, tcfg["seed"])

    acc_torch = _accuracy(predict_logits(net, val.pixels).argmax(1), val.labels)
    acc32 = _accuracy(head.predict_proba(emb_val32).argmax(1), val.labels)
    acc8 = _accuracy(head.predict_proba(emb_val8).argmax(1), val.labels)
    use_int8 = acc32 - acc8 <= INT8_TOLERANCE
    merge_classifier(int8 if use_int8 else fp32, head, scratch / "classifier.onnx")
    sc = session(scratch / "classifier.onnx", opts.threads)
    probs = np.concatenate([sc.run([PROBABILITIES], {"input": x_val[i : i + 256]})[0] for i in range(0, len(x_val), 256)])
    cls_summary = summarize(val.labels, probs.argmax(1), len(CLASSES))
    log(f"validation accuracy: torch {acc_torch:.4f}, fp32+head {acc32:.4f}, int8+head {acc8:.4f}, classifier.onnx {cls_summary['accuracy']:.4f}")

    if not opts.force and (out / MANIFEST).exists():
        old = read_manifest(out).metrics.get("classifier_accuracy", 0.0)
        if old > cls_summary["accuracy"]:
            shutil.rmtree(scratch)
            raise ValueError(f"{out} holds a better package ({old:.4f} > {cls_summary['accuracy']:.4f}); use --force to replace it")

    model_cfg = state["model_config"]
    detector_entry = copy_into_package(detector, scratch) if uses_blazeface(spec) else {}
    manifest = Manifest(
        version=f"{model_cfg['arch']}-e{state['epoch']}-{sha256_file(fp32)[:8]}",
        preprocess=spec,
        embedding_dim=int(model_cfg["embedding_dim"]),
        files=describe_files(scratch),
        metrics={
            "split": f"FER2013 train file, stratified {tcfg['val_fraction']:.0%} held out, seed {tcfg['seed']}",
            "n_val": len(val), "torch_accuracy": acc_torch, "fp32_accuracy": acc32, "int8_accuracy": acc8,
            "classifier_accuracy": cls_summary["accuracy"], "classifier_macro_f1": cls_summary["macro_f1"],
            "classifier_extractor": "int8" if use_int8 else "fp32", "onnx_parity_max_abs": parity,
            "per_class_recall": dict(zip(CLASSES, cls_summary["per_class_recall"])),
        },
        trained_on={
            "fer2013": Path(opts.fer).name, "images": trained_images, "n_train": len(train),
            "epochs": state["epoch"], "seed": tcfg["seed"], "imagenet_init": tcfg.get("imagenet_init", False),
            **({"adabn": adapted} if adapted else {}),
        },
        model={**model_cfg, "head": HeadParams().to_dict(), "classifier_outputs": ["label", PROBABILITIES],
               "head_target_images": n_head_images},
        detector=detector_entry,
    )
    write_manifest(scratch, manifest)

    if opts.report_dir:
        from .plots import plot_confusion

        Path(opts.report_dir).mkdir(parents=True, exist_ok=True)
        plot_confusion(np.array(cls_summary["confusion"]), CLASSES, Path(opts.report_dir) / "confusion_matrix_classifier.png",
                       f"classifier.onnx on FER validation (acc {cls_summary['accuracy']:.3f})")
        (Path(opts.report_dir) / "package_metrics.json").write_text(json.dumps(manifest.to_dict()["metrics"], indent=2))

    previous = out.with_name(out.name + ".previous")
    shutil.rmtree(previous, ignore_errors=True)
    if out.exists():
        out.rename(previous)
    scratch.rename(out)
    shutil.rmtree(previous, ignore_errors=True)
    log(f"model package {manifest.version} written to {out} in {time.time() - t0:.0f} s")
    return manifest.to_dict()
