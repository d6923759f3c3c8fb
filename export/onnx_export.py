"""Export the embedding extractor to ONNX and prove it matches torch."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from infantino.edge_runtime.core.onnx_session import cpu_session

from .model import EmbeddingExtractor, ExpressionNet

OPSET = 17
INPUT, OUTPUT = "input", "embedding"


class ParityError(RuntimeError):
    """The exported graph does not compute what the torch model computes."""


def export_extractor(net: ExpressionNet, path: str | Path, input_shape: tuple[int, int, int]) -> Path:
    """Write ``image (N, C, H, W) -> embedding (N, D)`` with a dynamic batch axis; checked by onnx."""
    extractor = EmbeddingExtractor(net).eval()
    dummy = torch.zeros(2, *input_shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            extractor, (dummy,), str(path), input_names=[INPUT], output_names=[OUTPUT],
            dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}}, opset_version=OPSET, dynamo=False,
        )
    onnx.checker.check_model(str(path))
    return Path(path)


def run_batched(sess: ort.InferenceSession, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i : i + batch_size]})[0] for i in range(0, len(x), batch_size)])


@torch.no_grad()
def check_parity(net: ExpressionNet, onnx_path: str | Path, x: np.ndarray, tolerance: float = 1e-3) -> float:
    """Max |torch - onnxruntime| over ``x``; raises ``ParityError`` past ``tolerance``."""
    ref = EmbeddingExtractor(net).eval()(torch.from_numpy(x)).numpy()
    got = run_batched(cpu_session(onnx_path), x)
    diff = float(np.max(np.abs(ref - got)))
    if not np.isfinite(diff) or diff > tolerance:
        raise ParityError(f"ONNX output differs from torch by {diff:.3g} (tolerance {tolerance:g})")
    return diff
