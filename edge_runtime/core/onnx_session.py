"""The one way this project opens an ONNX model: an ONNX Runtime session on the CPU.

The extractor, the BlazeFace detector, the server's check of a promoted package and the
workstation's export and parity checks all open their sessions here, so every session runs
with the same settings: the CPU provider only, ``threads`` intra-op threads and one inter-op
thread, full graph optimisation, and idle threads that sleep instead of spinning (on a
Raspberry Pi the cores are shared with the camera; a spinning thread takes one of them
while the model waits for a frame). A load failure is one ``ModelLoadError`` line.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any


class ModelLoadError(ValueError):
    """A model file ONNX Runtime cannot load; the message is one line, fit for a user."""


def cpu_session(path: str | os.PathLike, threads: int = 1, *, spin: bool = False) -> Any:
    """An ``InferenceSession`` of ``path`` on the CPU provider with ``threads`` intra-op threads."""
    import onnxruntime as ort

    if threads < 1:
        raise ValueError("threads must be at least 1")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types (Fail, InvalidProtobuf, NoSuchFile, ...)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise ModelLoadError(f"cannot load ONNX model {Path(path).name}: {first}") from exc
