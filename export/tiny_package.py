"""A tiny but real model package for tests, benchmarks and smoke runs: an ONNX linear extractor built with onnx.helper.

The extractor flattens the (N, 1, 64, 64) input and projects it to 16 dimensions with a
fixed random matrix, so embeddings carry real image information and ONNX Runtime runs a
real graph; no torch is needed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from infantino.edge_runtime.core.head import HeadParams, OnlineHead
from infantino.edge_runtime.core.package import Manifest, describe_files, write_manifest
from infantino.edge_runtime.core.preprocess import CLASSES, DEFAULT_SPEC, faces_tensor

EMBED_DIM = 16


def linear_extractor(path: Path, embed_dim: int = EMBED_DIM, seed: int = 0) -> np.ndarray:
    h, w = DEFAULT_SPEC.size
    rng = np.random.default_rng(seed)
    weight = (rng.standard_normal((h * w, embed_dim)) / np.sqrt(h * w)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["flat"], axis=1), helper.make_node("MatMul", ["flat", "W"], ["embedding"])],
        "tiny_extractor",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, h, w])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", embed_dim])],
        [numpy_helper.from_array(weight, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return weight


def synthetic_face(label: int, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """A uint8 image whose pattern depends on the class: stripes at a class-specific frequency."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    freq = 1 + label
    img = 0.5 + 0.35 * np.sin(2 * np.pi * (freq * xx + 0.5 * label * yy)) + rng.normal(0, 0.08, (size, size))
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def build_tiny_package(folder: Path, version: str = "tiny-1", seed: int = 0, head_epochs: int = 11,
                       scramble_labels: bool = False, classes: Sequence[str] = CLASSES) -> Path:
    """Write extractor.onnx, head.npz (fitted on synthetic faces) and manifest.json.

    ``head_epochs`` trains the head longer (a better package); ``scramble_labels`` fits it on
    permuted labels (a package that is clearly worse), for the publish-gate tests; ``classes``
    gives it another class layout (class ``i`` is the ``i``-th synthetic stripe pattern).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weight = linear_extractor(folder / "extractor.onnx", seed=seed)
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(classes)), 20)
    faces = [synthetic_face(int(c), rng) for c in labels]
    emb = faces_tensor(faces).reshape(len(faces), -1) @ weight
    # Deliberately under-trained (11 epochs): the tiny head stays unsure, so its frames queue
    # for annotation and learning visibly moves it, which the device and page tests rely on.
    fit_labels = np.random.default_rng(seed + 1).permutation(labels) if scramble_labels else labels
    head = OnlineHead.fit(emb, fit_labels, HeadParams(hidden_layer_sizes=(32,)), max_iter=head_epochs, classes=classes)
    head.save(folder / "head.npz")
    manifest = Manifest(
        version=version, preprocess=DEFAULT_SPEC, embedding_dim=EMBED_DIM, files=describe_files(folder),
        metrics={}, trained_on={"data": "synthetic stripes"}, model={"arch": "tiny-linear"}, classes=tuple(classes),
    )
    write_manifest(folder, manifest)
    return folder

