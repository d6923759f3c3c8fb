"""Fine-tuning starts from a package's ONNX extractor; re-quantisation keeps int8 close to fp32."""
from __future__ import annotations

import shutil

import numpy as np
import onnxruntime as ort
import pytest
import torch

from conftest import REPO, require_data
from infantino.edge_runtime.core.head import OnlineHead
from infantino.edge_runtime.core.package import open_package
from infantino.export.from_onnx import freeze_batchnorm, net_from_onnx

PACKAGE = REPO / "data" / "models-fer-only"


def test_network_rebuilt_from_onnx_computes_the_exported_embedding():
    net = net_from_onnx(PACKAGE / "extractor.onnx")
    x = np.random.default_rng(0).normal(size=(4, 1, 64, 64)).astype(np.float32)
    sess = ort.InferenceSession(str(PACKAGE / "extractor.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        got = net.embedding(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, sess.run(None, {"input": x})[0], atol=1e-4)
    net.train()
    freeze_batchnorm(net)
    bns = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns and not any(m.training for m in bns)  # folded statistics stay as exported
    net.embed[0].eval()  # dropout off: what is left in training mode is the convolutions and linear layers
    with torch.no_grad():
        np.testing.assert_allclose(net.embedding(torch.from_numpy(x)).numpy(), got, atol=1e-4)


def test_requantize_keeps_int8_within_a_point_of_fp32(tmp_path):
    from infantino.edge_runtime.core.preprocess import normalize, resize_face
    from infantino.edge_runtime.core.splits import stratified_split
    from infantino.export.requantize import requantize

    fer = require_data("fer2013", "fer2013_train.npz")
    pkg = tmp_path / "pkg"
    shutil.copytree(PACKAGE, pkg)
    manifest = requantize(pkg, fer, calibration_size=128, log=lambda *_: None)
    opened = open_package(pkg)  # the rewritten hashes verify
    assert manifest["metrics"]["int8_weights"].startswith("7-bit")
    with np.load(fer) as d:
        images, labels = d["images"], d["labels"]
    _, held = stratified_split(labels, 0.1, 0)
    held = held[:600]
    x = normalize(np.stack([resize_face(i) for i in images[held]]))
    head = OnlineHead.load(opened.path("head"))
    acc = {}
    for role in ("extractor", "extractor_int8"):
        s = ort.InferenceSession(str(opened.path(role)), providers=["CPUExecutionProvider"])
        acc[role] = float(np.mean(head.predict_proba(s.run(None, {"input": x})[0]).argmax(1) == labels[held]))
    assert acc["extractor_int8"] == pytest.approx(acc["extractor"], abs=0.01)


def test_int8_extractor_does_not_flip_on_one_rounding_step_of_the_input():
    """x/255 against x*(1/255): the float stem keeps pixel levels off the input grid's rounding ties."""
    from infantino.edge_runtime.core.preprocess import normalize, resize_face

    with np.load(require_data("fer2013", "fer2013_train.npz")) as d:
        images = d["images"][:1000]
    pix = np.stack([resize_face(i) for i in images])
    a = normalize(pix)
    b = ((pix.astype(np.float32) / 255.0 - 0.5) / 0.25)[:, None]
    pkg = open_package(PACKAGE)
    sess = ort.InferenceSession(str(pkg.path("extractor_int8")), providers=["CPUExecutionProvider"])
    head = OnlineHead.load(pkg.path("head"))
    pa, pb = (head.predict_proba(np.concatenate([sess.run(None, {"input": x[i : i + 500]})[0] for i in (0, 500)])) for x in (a, b))
    assert int((pa.argmax(1) != pb.argmax(1)).sum()) <= 5  # 51 of 3,000 flipped with the stem quantised
    assert float(np.abs(pa - pb).max()) < 0.15
