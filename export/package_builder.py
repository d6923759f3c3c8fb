"""Build the model package from a training checkpoint.

Steps: export fp32 ONNX and check parity with torch; quantise to int8 (static QDQ,
calibrated on training faces); embed the training faces and fit the bootstrap head;
merge extractor and head into ``classifier.onnx``; score everything on the held-out
FER split the checkpoint was validated on; write ``manifest.json`` with hashes.
The package is built in a scratch folder and moved into place at the end.

``trained_on`` says what the network saw as data, never as a path of this machine: the FER
file's name, and for extra photos (``train --images``, ``--adabn``) a count, a digest of the set
and a short key per file (``infantino.edge_runtime.core.datasets.image_set_record``); the folders must still
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

from infantino.edge_runtime.core.atomic import atomic_write_bytes
from infantino.edge_runtime.core.datasets import image_folders_record
from infantino.edge_runtime.core.facefinder import FaceFinder, detector_file, uses_blazeface
from infantino.edge_runtime.core.head import HeadParams, OnlineHead
from infantino.edge_runtime.core.metrics import summarize
from infantino.edge_runtime.core.onnx_session import cpu_session
from infantino.edge_runtime.core.package import MANIFEST, Manifest, describe_files, read_manifest, sha256_file, write_manifest
from infantino.edge_runtime.core.preprocess import CLASSES, DEFAULT_SPEC, PreprocessSpec, normalize
from infantino.edge_runtime.core.splits import stratified_split

from .classifier import PROBABILITIES, merge_classifier
from .detector import copy_into_package
from .data import load_fer
from .onnx_export import check_parity, export_extractor, run_batched
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


@dataclass(frozen=True)
class _Inputs:
    """What a build starts from: the checkpoint's network and settings, and its FER split."""

    net: object
    state: dict
    spec: PreprocessSpec
    detector: str | None
    train: object
    val: object
    x_val: np.ndarray

    @property
    def tcfg(self) -> dict:
        return self.state["train_config"]


@dataclass(frozen=True)
class _Scores:
    """Held-out accuracies of the network, of extractor + head, and of the merged classifier."""

    torch: float
    fp32: float
    int8: float
    use_int8: bool
    classifier: dict  # ``metrics.summarize`` of classifier.onnx


def _load_inputs(opts: BuildOptions) -> _Inputs:
    net, state = load_checkpoint(opts.checkpoint)
    tcfg = state["train_config"]
    spec = package_spec(PreprocessSpec.from_dict(state["preprocess"]), opts)
    fer = load_fer(opts.fer, spec, limit=tcfg.get("limit"))
    keep, held = stratified_split(fer.labels, tcfg["val_fraction"], tcfg.get("split_seed", tcfg["seed"]))  # older runs split by seed
    val = fer.subset(held)
    return _Inputs(net, state, spec, opts.detector or tcfg.get("detector"), fer.subset(keep), val,
                   normalize(val.pixels, spec))


def _adapt_batchnorm(net, folder: str, spec: PreprocessSpec, log) -> dict:
    """AdaBN: re-estimate the network's batch-norm statistics on unlabelled target photos."""
    from .adapt import adabn
    from .data import load_image_folder

    target = load_image_folder(folder, spec).pixels  # labels, if any, are ignored
    adapted = {"images": image_folders_record([folder]), "n": int(len(target)), "bn_layers": adabn(net, target)}
    log(f"AdaBN: batch-norm statistics of {adapted['bn_layers']} layers re-estimated on {len(target)} target images")
    return adapted


def _fresh_scratch(out: Path) -> Path:
    scratch = out.with_name(out.name + ".building")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    return scratch


def _export_extractors(inp: _Inputs, scratch: Path, opts: BuildOptions, log) -> tuple[Path, Path, float]:
    """fp32 ONNX (checked against torch) and its int8 copy calibrated on training faces."""
    fp32, int8 = scratch / "extractor.onnx", scratch / "extractor.int8.onnx"
    export_extractor(inp.net, fp32, (inp.spec.channels, *inp.spec.size))
    parity = check_parity(inp.net, fp32, inp.x_val[:256])
    log(f"exported {fp32.name}: max |torch - onnxruntime| = {parity:.2e}")
    rng = np.random.default_rng(inp.tcfg["seed"])
    calib_idx = rng.choice(len(inp.train), size=min(opts.calibration_size, len(inp.train)), replace=False)
    quantize_extractor(fp32, int8, normalize(inp.train.pixels[calib_idx], inp.spec))
    log(f"quantised {int8.name} on {len(calib_idx)} training faces")
    return fp32, int8, parity


def _write_head(inp: _Inputs, scratch: Path, opts: BuildOptions, s32, s8) -> tuple[OnlineHead, int]:
    """``head.npz`` (the bootstrap head) and ``replay_seed.npz``; returns the head and its target photo count."""
    emb_train = embed_faces(s32, inp.train.pixels, inp.spec)
    head, n_head_images = fit_head(opts, inp.spec, inp.detector, s8, emb_train, inp.train.labels)
    head.save(scratch / "head.npz")
    write_replay_seed(scratch / "replay_seed.npz", emb_train, inp.train.labels, REPLAY_SEED_PER_CLASS, inp.tcfg["seed"])
    return head, n_head_images


def _merge_and_score(inp: _Inputs, scratch: Path, opts: BuildOptions, head: OnlineHead, extractors: tuple[Path, Path],
                     sessions: tuple, log) -> _Scores:
    """Score on the held-out split, then write ``classifier.onnx`` on the int8 extractor unless it costs too much."""
    val, (fp32, int8), (s32, s8) = inp.val, extractors, sessions
    acc_torch = _accuracy(predict_logits(inp.net, val.pixels).argmax(1), val.labels)
    acc32 = _accuracy(head.predict_proba(embed_faces(s32, val.pixels, inp.spec)).argmax(1), val.labels)
    acc8 = _accuracy(head.predict_proba(embed_faces(s8, val.pixels, inp.spec)).argmax(1), val.labels)
    use_int8 = acc32 - acc8 <= INT8_TOLERANCE
    merge_classifier(int8 if use_int8 else fp32, head, scratch / "classifier.onnx")
    sc = cpu_session(scratch / "classifier.onnx", opts.threads)
    x_val = inp.x_val
    probs = np.concatenate([sc.run([PROBABILITIES], {"input": x_val[i : i + 256]})[0] for i in range(0, len(x_val), 256)])
    summary = summarize(val.labels, probs.argmax(1), len(CLASSES))
    log(f"validation accuracy: torch {acc_torch:.4f}, fp32+head {acc32:.4f}, int8+head {acc8:.4f}, classifier.onnx {summary['accuracy']:.4f}")
    return _Scores(acc_torch, acc32, acc8, use_int8, summary)


def _refuse_a_worse_package(out: Path, scratch: Path, opts: BuildOptions, accuracy: float) -> None:
    if not opts.force and (out / MANIFEST).exists():
        old = read_manifest(out).metrics.get("classifier_accuracy", 0.0)
        if old > accuracy:
            shutil.rmtree(scratch)
            raise ValueError(f"{out} holds a better package ({old:.4f} > {accuracy:.4f}); use --force to replace it")


def _metrics(inp: _Inputs, scores: _Scores, parity: float) -> dict:
    tcfg, summary = inp.tcfg, scores.classifier
    return {
        "split": f"FER2013 train file, stratified {tcfg['val_fraction']:.0%} held out, seed {tcfg['seed']}",
        "n_val": len(inp.val), "torch_accuracy": scores.torch, "fp32_accuracy": scores.fp32, "int8_accuracy": scores.int8,
        "classifier_accuracy": summary["accuracy"], "classifier_macro_f1": summary["macro_f1"],
        "classifier_extractor": "int8" if scores.use_int8 else "fp32", "onnx_parity_max_abs": parity,
        "per_class_recall": dict(zip(CLASSES, summary["per_class_recall"])),
    }


def _trained_on(inp: _Inputs, opts: BuildOptions, trained_images: dict, adapted: dict | None) -> dict:
    tcfg, state = inp.tcfg, inp.state
    return {
        "fer2013": Path(opts.fer).name, "images": trained_images, "n_train": len(inp.train),
        "epochs": state["epoch"], "seed": tcfg["seed"], "imagenet_init": tcfg.get("imagenet_init", False),
        **({"adabn": adapted} if adapted else {}),
    }


def _manifest(inp: _Inputs, scratch: Path, fp32: Path, metrics: dict, trained_on: dict, n_head_images: int) -> Manifest:
    model_cfg, state = inp.state["model_config"], inp.state
    detector_entry = copy_into_package(inp.detector, scratch) if uses_blazeface(inp.spec) else {}
    return Manifest(
        version=f"{model_cfg['arch']}-e{state['epoch']}-{sha256_file(fp32)[:8]}",
        preprocess=inp.spec,
        embedding_dim=int(model_cfg["embedding_dim"]),
        files=describe_files(scratch),
        metrics=metrics,
        trained_on=trained_on,
        model={**model_cfg, "head": HeadParams().to_dict(), "classifier_outputs": ["label", PROBABILITIES],
               "head_target_images": n_head_images},
        detector=detector_entry,
    )


def _write_report(report_dir: Path, summary: dict, manifest: Manifest) -> None:
    from .plots import plot_confusion

    report_dir.mkdir(parents=True, exist_ok=True)
    plot_confusion(np.array(summary["confusion"]), CLASSES, report_dir / "confusion_matrix_classifier.png",
                   f"classifier.onnx on FER validation (acc {summary['accuracy']:.3f})")
    (report_dir / "package_metrics.json").write_text(json.dumps(manifest.to_dict()["metrics"], indent=2))


def _move_into_place(scratch: Path, out: Path) -> None:
    previous = out.with_name(out.name + ".previous")
    shutil.rmtree(previous, ignore_errors=True)
    if out.exists():
        out.rename(previous)
    scratch.rename(out)
    shutil.rmtree(previous, ignore_errors=True)


def build_package(opts: BuildOptions, log=print) -> dict:
    """Returns the manifest dict; raises ``ParityError`` if the export is not faithful."""
    inp = _load_inputs(opts)
    adapted = _adapt_batchnorm(inp.net, opts.adabn, inp.spec, log) if opts.adabn else None
    out = Path(opts.out)
    scratch = _fresh_scratch(out)
    t0 = time.time()
    trained_images = image_folders_record(inp.tcfg.get("images") or [])  # before the slow part: a gone folder fails fast
    fp32, int8, parity = _export_extractors(inp, scratch, opts, log)
    sessions = cpu_session(fp32, opts.threads), cpu_session(int8, opts.threads)
    head, n_head_images = _write_head(inp, scratch, opts, *sessions)
    scores = _merge_and_score(inp, scratch, opts, head, (fp32, int8), sessions, log)
    _refuse_a_worse_package(out, scratch, opts, scores.classifier["accuracy"])
    manifest = _manifest(inp, scratch, fp32, _metrics(inp, scores, parity), _trained_on(inp, opts, trained_images, adapted),
                         n_head_images)
    write_manifest(scratch, manifest)
    if opts.report_dir:
        _write_report(Path(opts.report_dir), scores.classifier, manifest)
    _move_into_place(scratch, out)
    log(f"model package {manifest.version} written to {out} in {time.time() - t0:.0f} s")
    return manifest.to_dict()
