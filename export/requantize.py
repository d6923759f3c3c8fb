"""Re-quantise a package's int8 extractor from its fp32 one, in place (``infantino-export requantize``).

For packages built before 7-bit weights (``quantize.py`` says why): the fp32 extractor,
head and version stay; ``extractor.int8.onnx`` and ``classifier.onnx`` are rebuilt,
calibrated on FER training faces, and the manifest's hashes and int8 metrics rewritten.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from infantino.edge_runtime.core.head import OnlineHead
from infantino.edge_runtime.core.onnx_session import cpu_session
from infantino.edge_runtime.core.package import describe_files, open_package, write_manifest
from infantino.edge_runtime.core.preprocess import normalize
from infantino.edge_runtime.core.splits import stratified_split

from .classifier import PROBABILITIES, merge_classifier
from .data import load_fer
from .quantize import quantize_extractor


def requantize(package_dir: str | Path, fer: str | Path, calibration_size: int = 512, seed: int = 0, log=print) -> dict:
    folder = Path(package_dir)
    pkg = open_package(folder)
    spec = pkg.manifest.preprocess
    data = load_fer(fer, spec)
    keep, held = stratified_split(data.labels, 0.1, seed)
    calib = np.random.default_rng(seed).choice(keep, size=min(calibration_size, len(keep)), replace=False)
    scratch = folder / "requantize.partial"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    quantize_extractor(pkg.path("extractor"), scratch / "extractor.int8.onnx", normalize(data.pixels[calib], spec))
    merge_classifier(scratch / "extractor.int8.onnx", OnlineHead.load(pkg.path("head")), scratch / "classifier.onnx")
    x_val = normalize(data.pixels[held], spec)
    sc = cpu_session(scratch / "classifier.onnx")
    probs = np.concatenate([sc.run([PROBABILITIES], {"input": x_val[i : i + 256]})[0] for i in range(0, len(x_val), 256)])
    acc = float(np.mean(probs.argmax(1) == data.labels[held]))
    for name in ("extractor.int8.onnx", "classifier.onnx"):
        (scratch / name).replace(folder / name)
    scratch.rmdir()
    manifest = pkg.manifest
    manifest.files = describe_files(folder)
    manifest.metrics.update({"int8_accuracy": acc, "classifier_accuracy": acc, "classifier_extractor": "int8",
                             "int8_weights": "7-bit (reduce_range), first conv in float"})
    write_manifest(folder, manifest)
    log(f"{folder}: int8 re-quantised (7-bit weights, float stem), classifier.onnx accuracy {acc:.4f} on {len(held)} held-out FER faces")
    return manifest.to_dict()
