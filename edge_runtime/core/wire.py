"""Head updates on the wire: one ``.npz`` body, arrays plus a JSON ``meta`` entry.

No web imports here: both the device client and the sync server use it. Bodies are read
by ``safe_npz`` (no pickles; members inflated in bounded chunks and cut at the size they
claim; array headers checked before numpy allocates), so a hostile body can neither run
code nor make the reader allocate more than its budget.

An update body holds
* ``meta``: a 0-d unicode array with a JSON object (``UPDATE_FORMAT``, device, base
  versions, ``n_samples``, local ``metrics``, ``idempotency_key``, ``kind``);
* ``coef_<i>`` / ``intercept_<i>``: the head's layers (``kind="weights"``) or their
  difference to the base head (``kind="delta"``), float32.
"""
from __future__ import annotations

import io
import json
from typing import Any, Sequence

import numpy as np

from . import safe_npz

UPDATE_FORMAT = "infantino-update/1"
CONTENT_TYPE = "application/x-npz"
KINDS = ("weights", "delta")


class WireError(ValueError):
    """A body that is not a well-formed update; the message is one line."""


def layer_names(n_layers: int) -> list[str]:
    """Names in Flower NDArrays order: every coef, then every intercept."""
    return [f"coef_{i}" for i in range(n_layers)] + [f"intercept_{i}" for i in range(n_layers)]


def layers_to_dict(layers: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    if len(layers) % 2:
        raise WireError("a head has as many intercepts as coefs")
    return {name: np.asarray(a, np.float32) for name, a in zip(layer_names(len(layers) // 2), layers)}


def dict_to_layers(arrays: dict[str, np.ndarray], n_layers: int) -> list[np.ndarray]:
    names = layer_names(n_layers)
    missing = [n for n in names if n not in arrays]
    extra = sorted(set(arrays) - set(names))
    if missing or extra:
        raise WireError(f"arrays must be exactly {', '.join(names)} (missing: {missing or 'none'}, unexpected: {extra or 'none'})")
    return [arrays[n] for n in names]


def encode(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> bytes:
    if "meta" in arrays:
        raise WireError("'meta' is reserved")
    buf = io.BytesIO()
    np.savez(buf, meta=np.asarray(json.dumps(meta, sort_keys=True)), **arrays)
    return buf.getvalue()


def decode(data: bytes, max_entries: int = 32, max_inflated: int = 64 * 1024 * 1024) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Parse an npz body into (meta, arrays); raises ``WireError`` with a one-line reason.

    ``safe_npz`` reads it: never more than ``max_inflated`` bytes inflated, whatever the
    archive claims, and every array header checked before numpy allocates."""
    try:
        entries = safe_npz.read_npz(data, max_entries=max_entries, max_inflated=max_inflated)
    except safe_npz.NpzError as exc:
        raise WireError(str(exc)) from None
    if "meta" not in entries:
        raise WireError("npz has no 'meta' entry")
    raw = entries.pop("meta")
    if raw.dtype.kind != "U" or raw.ndim != 0:
        raise WireError("'meta' must be a JSON string")
    try:
        meta = json.loads(str(raw))
    except json.JSONDecodeError as exc:
        raise WireError(f"'meta' is not valid JSON ({exc.msg})") from None
    except RecursionError:
        raise WireError("'meta' is nested too deeply") from None
    except ValueError as exc:  # e.g. an integer longer than Python's digit limit
        raise WireError(f"'meta' is not valid JSON ({str(exc).splitlines()[0][:120]})") from None
    if not isinstance(meta, dict):
        raise WireError("'meta' must be a JSON object")
    try:  # a lone surrogate (\\ud800) cannot be stored, logged or sent to MLflow
        json.dumps(meta, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise WireError("'meta' holds text that is not valid Unicode (a lone surrogate)") from None
    return meta, dict(entries)


def encode_update(*, device: str, base_head_version: int, base_package_version: str, layers: Sequence[np.ndarray],
                  n_samples: int, idempotency_key: str, metrics: dict[str, float] | None = None, kind: str = "weights") -> bytes:
    """The body of ``POST /v1/updates``."""
    if kind not in KINDS:
        raise WireError(f"kind must be one of {KINDS}")
    meta = {
        "format": UPDATE_FORMAT, "device": device, "base_head_version": int(base_head_version),
        "base_package_version": str(base_package_version), "n_samples": int(n_samples),
        "idempotency_key": idempotency_key, "metrics": dict(metrics or {}), "kind": kind,
    }
    return encode(meta, layers_to_dict(layers))
