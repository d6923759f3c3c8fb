"""What a request to the sync server must be before the API looks at it: its body read within
the limits (declared or chunked), an update's meta and metrics checked field by field, an
optional JSON object; each refusal a 4xx with one line and a short reason for ``/metrics``.

Apart from ``api`` (the endpoints) so that the endpoints read as what they do.
"""
from __future__ import annotations

import json
import math
import re

from flask import abort, g, request

from infantino.edge_runtime.core import wire

KEY_RE = re.compile(r"^[A-Za-z0-9._:-]{8,128}$")
MAX_METRICS = 32
# a metric name MLflow takes as it is (its rule: alphanumerics, _ - . space : /, and no path tricks):
# checked at the door, so one update cannot make every later round unloggable
METRIC_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,63}$")


INT32_MAX = 2**31 - 1  # the store's integer columns


def refuse(status: int, reason: str, message: str):
    """abort() with a short machine-readable reason for the /metrics counters."""
    g.refusal = reason
    abort(status, message)


def decode_body(body: bytes, **limits) -> tuple[dict, dict]:
    """``wire.decode`` with every failure a 400 (a deeply nested meta included)."""
    try:
        return wire.decode(body, **limits)
    except wire.WireError as exc:
        refuse(400, "malformed", str(exc))
    except RecursionError:
        refuse(400, "malformed", "'meta' is nested too deeply")


def check_meta(meta: dict, cfg) -> dict:
    if meta.get("format") != wire.UPDATE_FORMAT:
        refuse(400, "malformed", f"meta.format must be {wire.UPDATE_FORMAT!r}")
    out = {}
    for key, kind in (("device", str), ("base_package_version", str), ("idempotency_key", str), ("kind", str)):
        if not isinstance(meta.get(key), kind):
            refuse(400, "malformed", f"meta.{key} must be a string")
        out[key] = meta[key]
    for key in ("base_head_version", "n_samples"):
        value = meta.get(key)
        if not isinstance(value, int) or isinstance(value, bool):
            refuse(400, "malformed", f"meta.{key} must be an integer")
        out[key] = value
    if not 0 <= out["base_head_version"] <= INT32_MAX:
        refuse(422, "unknown_base", f"meta.base_head_version must be between 0 and {INT32_MAX}")
    if not KEY_RE.match(out["idempotency_key"]):
        refuse(400, "malformed", "meta.idempotency_key must be 8-128 characters of A-Z a-z 0-9 . _ : -")
    if out["kind"] not in wire.KINDS:
        refuse(400, "malformed", f"meta.kind must be one of {', '.join(wire.KINDS)}")
    if not 1 <= out["n_samples"] <= cfg["MAX_SAMPLES_PER_UPDATE"]:
        refuse(422, "n_samples", f"n_samples must be between 1 and {cfg['MAX_SAMPLES_PER_UPDATE']}")
    out["metrics"] = check_metrics(meta.get("metrics", {}))
    return out


def check_metrics(metrics) -> dict[str, float]:
    if not isinstance(metrics, dict) or len(metrics) > MAX_METRICS:
        refuse(400, "malformed", f"meta.metrics must be an object with at most {MAX_METRICS} entries")
    out = {}
    for k, v in metrics.items():
        if not METRIC_NAME_RE.match(k):
            refuse(422, "metrics", f"metric name {k[:64]!r} must be 1-64 characters of A-Z a-z 0-9 _ . : - "
                                   "(starting with a letter, digit or _)")
        try:
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        except OverflowError:  # an integer beyond float range
            ok = False
        if not ok:
            refuse(422, "metrics", f"metric {k!r} must be a finite number")
        out[k] = float(v)
    return out


def read_body(limit: int) -> bytes:
    """The request body, 413 beyond ``limit`` whether its length is declared or it comes chunked.

    A declared length is read in one call (werkzeug's generic reader takes ~20 small reads for
    20 KB under gunicorn); a chunked body is read in pieces up to ``limit`` + 1 (the app-wide
    ``MAX_CONTENT_LENGTH`` is the update limit, so werkzeug's own reader would cut a package).
    A client that stops sending (the worker's socket read timeout) gets 408.
    """
    length = request.content_length
    stream = request.environ["wsgi.input"]
    try:
        if length is None:
            return _read_chunked(stream, limit)
        if length > limit:
            refuse(413, "too_large", f"body too large: the limit is {limit} bytes")
        data = stream.read(length)
    except OSError:
        refuse(408, "timeout", "the request body did not arrive in time")
    if len(data) != length:
        refuse(400, "malformed", f"body ended after {len(data)} of {length} bytes")
    return data


def _read_chunked(stream, limit: int, piece: int = 1 << 20) -> bytes:
    if not request.environ.get("wsgi.input_terminated") and "chunked" not in request.headers.get("Transfer-Encoding", "").lower():
        return b""  # no length and no chunked framing: there is no body
    parts, size = [], 0
    while True:
        chunk = stream.read(min(piece, limit + 1 - size))
        if not chunk:
            return b"".join(parts)
        parts.append(chunk)
        size += len(chunk)
        if size > limit:
            refuse(413, "too_large", f"body too large: the limit is {limit} bytes")


def json_object(raw: bytes) -> dict:
    """An optional JSON object body: empty is ``{}``, anything else must parse as an object."""
    if not raw.strip():
        return {}
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        abort(400, "body is not valid JSON")
    if not isinstance(value, dict):
        abort(400, "body must be a JSON object such as {\"min_updates\": 1}")
    return value
