"""The extractor runs a real ONNX Runtime session on the CPU, names read from the model."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from infantino.export.tiny_package import EMBED_DIM

from infantino.edge_runtime.core.extractor import Extractor, ExtractorError
from infantino.edge_runtime.core.onnx_session import cpu_session
from infantino.edge_runtime.core.preprocess import faces_tensor


def _faces(n: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    return faces_tensor([rng.integers(0, 255, (64, 64), dtype=np.uint8) for _ in range(n)])


def test_embeddings_of_a_batch_equal_those_of_single_faces(tiny_package_dir):
    ex = Extractor(tiny_package_dir / "extractor.onnx", threads=1)
    assert (ex.input_name, ex.output_name, ex.dim) == ("input", "embedding", EMBED_DIM)
    x = _faces(5)
    batch = ex(x)
    singles = np.concatenate([ex(x[i : i + 1]) for i in range(5)])
    assert batch.shape == (5, EMBED_DIM) and batch.dtype == np.float32
    np.testing.assert_allclose(batch, singles, atol=1e-5)


def test_session_is_cpu_only_with_the_requested_threads(tiny_package_dir):
    sess = cpu_session(tiny_package_dir / "extractor.onnx", threads=3)
    assert sess.get_providers() == ["CPUExecutionProvider"]
    assert sess.get_session_options().intra_op_num_threads == 3


def test_an_injected_session_with_other_names_is_used_as_is(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["pixels"], ["pooled"]), helper.make_node("Flatten", ["pooled"], ["vec"], axis=1)],
        "renamed", [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["n", 1, 64, 64])],
        [helper.make_tensor_value_info("vec", TensorProto.FLOAT, ["n", 1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "m.onnx"))
    ex = Extractor(session=cpu_session(tmp_path / "m.onnx", threads=1))
    assert (ex.input_name, ex.output_name) == ("pixels", "vec")
    x = _faces(2)
    np.testing.assert_allclose(ex(x)[:, 0], x.mean(axis=(1, 2, 3)), atol=1e-6)


def test_wrong_tensor_shape_and_broken_model_are_clear_errors(tiny_package_dir, tmp_path):
    ex = Extractor(tiny_package_dir / "extractor.onnx", threads=1)
    with pytest.raises(ExtractorError, match="does not fit"):
        ex(np.zeros((1, 1, 32, 32), np.float32))
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    with pytest.raises(ExtractorError, match="cannot load ONNX model bad.onnx"):
        Extractor(tmp_path / "bad.onnx")
