"""``classifier.onnx``: extractor and head merged into one graph, image -> 7 probabilities.

For devices that only infer: one ONNX Runtime session, no scikit-learn.
"""
from __future__ import annotations

from pathlib import Path

import onnx
from onnx import compose
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType

from infantino.edge_runtime.core.head import OnlineHead

from .onnx_export import OPSET, OUTPUT

PROBABILITIES = "probabilities"


def head_to_onnx(head: OnlineHead) -> onnx.ModelProto:
    clf = head.to_sklearn()
    model = convert_sklearn(
        clf, initial_types=[(OUTPUT, FloatTensorType([None, head.input_dim]))],
        options={id(clf): {"zipmap": False}}, target_opset={"": OPSET, "ai.onnx.ml": 3},
    )
    # skl2onnx names the outputs "label" and "probabilities".
    return model


def _unify_opsets(*models: onnx.ModelProto) -> None:
    """merge_models wants identical opset imports; the MLP's ops mean the same at either version."""
    versions: dict[str, int] = {}
    for m in models:
        for op in m.opset_import:
            versions[op.domain] = max(versions.get(op.domain, 0), op.version)
    for m in models:
        del m.opset_import[:]
        m.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in sorted(versions.items()))


def merge_classifier(extractor_path: str | Path, head: OnlineHead, out_path: str | Path) -> Path:
    extractor = onnx.load(str(extractor_path))
    head_model = head_to_onnx(head)
    head_model = compose.add_prefix(head_model, "head/")
    ir = max(extractor.ir_version, head_model.ir_version)
    extractor.ir_version = head_model.ir_version = ir
    _unify_opsets(extractor, head_model)
    merged = compose.merge_models(
        extractor, head_model, io_map=[(OUTPUT, "head/" + OUTPUT)],
        outputs=["head/label", "head/" + PROBABILITIES],
    )
    # Plain output names for readers of the manifest.
    rename = {out.name: out.name.removeprefix("head/") for out in merged.graph.output}
    for node in merged.graph.node:
        node.input[:] = [rename.get(n, n) for n in node.input]
        node.output[:] = [rename.get(n, n) for n in node.output]
    for out in merged.graph.output:
        out.name = rename[out.name]
    onnx.checker.check_model(merged)
    onnx.save(merged, str(out_path))
    return Path(out_path)
