"""The one owner of the ONNX Runtime session that turns face tensors into embeddings.

CPU execution provider only, built once by ``onnx_session.cpu_session``; thread count is
a setting (a Raspberry Pi 4 has four cores that also run the camera and face detection, so
the default is two and idle threads sleep instead of spinning). Input and output names and shapes are read from
the session, never assumed; tests may inject their own ``session``.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from .onnx_session import ModelLoadError, cpu_session

DEFAULT_THREADS = 2


class ExtractorError(ModelLoadError):
    """A model file or input tensor the extractor cannot use."""


class Extractor:
    """Face tensors (N, C, H, W) float32 -> embeddings (N, D) float32."""

    def __init__(self, model_path: str | os.PathLike | None = None, *, threads: int = DEFAULT_THREADS, session: Any = None,
                 flip_average: bool = False):
        if session is None:
            if model_path is None:
                raise ExtractorError("give a model path or a session")
            try:
                session = cpu_session(model_path, threads)
            except ModelLoadError as exc:
                raise ExtractorError(str(exc)) from exc
        self.session = session
        self.flip_average = flip_average  # test-time mirror: mean embedding of each face and its mirror image
        inputs, outputs = session.get_inputs(), session.get_outputs()
        if len(inputs) != 1 or not outputs:
            raise ExtractorError(f"extractor must have one input and an output, has {len(inputs)} and {len(outputs)}")
        self.input_name: str = inputs[0].name
        self.output_name: str = outputs[0].name
        shape = list(inputs[0].shape)
        if len(shape) != 4:
            raise ExtractorError(f"extractor input {self.input_name} has shape {shape}, expected (N, C, H, W)")
        self.input_shape = tuple(d if isinstance(d, int) else None for d in shape)
        self.fixed_batch = self.input_shape[0] if isinstance(self.input_shape[0], int) and self.input_shape[0] > 0 else None
        dim = outputs[0].shape[-1] if outputs[0].shape else None
        self.dim: int | None = dim if isinstance(dim, int) else None

    def _check(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim == 3:
            x = x[None]
        want = self.input_shape[1:]
        if x.ndim != 4 or any(w is not None and w != g for w, g in zip(want, x.shape[1:])):
            raise ExtractorError(f"tensor of shape {x.shape} does not fit the extractor input {self.input_shape}")
        return x

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = self._check(x)
        if len(x) == 0:
            return np.zeros((0, self.dim or 0), np.float32)
        if self.flip_average:  # one batched call over the faces and their mirrors
            both = self._run(np.concatenate([x, np.ascontiguousarray(x[..., ::-1])]))
            return (both[: len(x)] + both[len(x):]) * np.float32(0.5)
        return self._run(x)

    def _run(self, x: np.ndarray) -> np.ndarray:
        if self.fixed_batch == 1 and len(x) > 1:
            return np.concatenate([self._run(x[i : i + 1]) for i in range(len(x))])
        out = self.session.run([self.output_name], {self.input_name: x})[0]
        return np.asarray(out, dtype=np.float32).reshape(len(x), -1)
