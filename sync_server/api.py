"""HTTP API, versioned under ``/v1``: JSON for metadata, npz for arrays.

Device endpoints need the device's bearer token, admin endpoints the admin token; only
``/v1/health`` is open. Every refusal is a 4xx with ``{"error": "<one line>"}``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from pathlib import Path

import numpy as np
from flask import Blueprint, abort, current_app, g, jsonify, request, send_file

from infantino.edge_runtime.core import wire

from . import crops, models, publish
from .auth import require
from .headgate import HeadGateError
from .names import InvalidName, child_path
from .package_files import expected_hashes
from .request_checks import INT32_MAX, check_meta, decode_body, json_object, read_body, refuse
from .store import StoreBusy, UpdateRecord

log = logging.getLogger("infantino.server")
bp = Blueprint("v1", __name__, url_prefix="/v1", root_path=str(Path(__file__).parent))

def state():
    return current_app.extensions["infantino"]


def _served():
    try:
        serving = state().store.serving()
    except StoreBusy as exc:
        abort(503, str(exc))
    if serving is None:
        abort(503, "no model has been promoted yet (infantino-server promote PACKAGE_DIR)")
    return serving


# --------------------------------------------------------------------------- open


@bp.get("/health")
def health():
    s = state()
    try:
        s.store.ping()
        serving = s.store.serving()
    except Exception as exc:  # noqa: BLE001 - health reports, never raises
        return jsonify(status="unavailable", store=str(exc).splitlines()[0]), 503, {"Retry-After": "5"}
    return jsonify(status="ok", api="v1", serving=None if serving is None else
                   {"package_version": serving.package_version, "head_version": serving.head_version})


@bp.get("/whoami")
@require("device", "admin")
def whoami():
    return jsonify(name=g.client.name, kind=g.client.kind)


# --------------------------------------------------------------------------- model


@bp.get("/model")
@require("device", "admin")
def model():
    serving = _served()
    resp = jsonify(models.model_info(serving))
    resp.set_etag(models.etag(serving))
    resp.headers["Cache-Control"] = "no-cache"
    return resp.make_conditional(request)


@bp.get("/model/files/<name>")
@require("device", "admin")
def model_file(name: str):
    s = state()
    head_version = models.parse_global_head_name(name)
    if head_version is not None:
        head = s.store.head(head_version)
        if head is None:
            abort(404, f"no global head version {head_version}")
        if hashlib.sha256(head.blob).hexdigest() != head.sha256:
            log.error("global head %d does not match its sha256 in the store; not served", head_version)
            s.events.package_mismatches.labels(name).inc()
            abort(503, f"global head {head_version} fails its checksum on the server; the operator has been told")
        resp = current_app.response_class(head.blob, mimetype=wire.CONTENT_TYPE)
        resp.set_etag(head.sha256)
        resp.headers["Cache-Control"] = "private, max-age=31536000, immutable"
        resp.headers["X-Infantino-Package"] = head.package_version
        return resp.make_conditional(request)
    version = request.args.get("package") or _served().package_version
    pkg = s.store.package(version)
    if pkg is None:
        abort(404, f"no package version {version!r}")
    hashes = expected_hashes(json.loads(pkg["manifest"]), pkg["manifest_sha256"])
    if name not in hashes:
        abort(404, f"package {version} has no file {name!r}; it has {', '.join(sorted(hashes))}")
    try:
        path = child_path(Path(s.data_dir) / pkg["folder"], name)
    except InvalidName:
        abort(404, f"package {version} has no file {name[:80]!r}")
    if not path.is_file():
        abort(404, f"file {name} of package {version} is missing on the server")
    if not s.files.matches(path, hashes[name], f"{name} of package {version}"):
        abort(503, f"file {name} of package {version} fails its sha256 on the server and is not served; the operator has been told")
    resp = send_file(path, mimetype="application/octet-stream", etag=hashes[name], conditional=True, max_age=31536000)
    resp.headers["X-Infantino-Package"] = version
    return resp


# --------------------------------------------------------------------------- updates


@bp.post("/updates")
@require("device")
def post_update():
    s = state()
    cfg = current_app.config
    body, meta, arrays = _read_update(cfg)
    digest = hashlib.sha256(body).hexdigest()
    try:
        view = s.store.ingest_view(g.client.id, meta["idempotency_key"])
    except StoreBusy as exc:
        refuse(503, "busy", str(exc))
    if view.existing is not None:
        return _receipt_response(view.existing[0], view.existing[1] == digest, duplicate=True)
    if view.served is None:
        refuse(503, "not_serving", "no model has been promoted yet (infantino-server promote PACKAGE_DIR)")
    if view.waiting >= int(cfg["MAX_BUFFERED_PER_DEVICE"]):
        _too_many(view.waiting)
    base, staleness = _check_base(s, meta, view.served)
    record = _update_record(s, meta, arrays, base, digest, view.last_round)
    try:
        receipt = s.store.submit_update(record, timeout_s=cfg["COMMIT_TIMEOUT_S"], on_commit=s.after_commit)
    except StoreBusy as exc:
        refuse(503, "busy", f"{exc}; retry with the same idempotency key")
    if receipt.duplicate:
        return _receipt_response(receipt.update_id, not receipt.conflict, duplicate=True)
    return jsonify(update_id=receipt.update_id, status="buffered", duplicate=False, staleness=staleness,
                   head_version=view.served[1]), 202


def _read_update(cfg) -> tuple[bytes, dict, dict]:
    """(body, checked meta, arrays) of ``POST /v1/updates``, sent by the device the token belongs to."""
    body = read_body(cfg["MAX_UPDATE_BYTES"])
    if not body:
        refuse(400, "malformed", "empty body; send the update as an npz (infantino.edge_runtime.core.wire.encode_update)")
    raw_meta, arrays = decode_body(body, max_inflated=cfg["MAX_UPDATE_BYTES"])  # never more than the body's own limit
    meta = check_meta(raw_meta, cfg)
    client = g.client
    if meta["device"] != client.name:
        refuse(403, "wrong_device", f"this token belongs to device {client.name!r}; an update may not claim to come from "
                                    f"{meta['device'][:64]!r}")
    return body, meta, arrays


def _update_record(s, meta: dict, arrays: dict, base, digest: str, last_round: int) -> UpdateRecord:
    """The update as a delta on ``base``, inside the norm bound, ready to store."""
    flat = _check_arrays(arrays, base)
    delta = flat - base.flat if meta["kind"] == "weights" else flat
    norm = float(np.linalg.norm(delta))
    bound = s.ingest_bound(base.package_version, last_round)
    if not math.isfinite(norm) or norm > bound:
        refuse(422, "norm_bound", f"update moves the head by {norm:.4g} (L2), beyond the bound {bound:.4g}")
    return UpdateRecord(
        client_id=g.client.id, idempotency_key=meta["idempotency_key"], body_sha256=digest,
        package_version=base.package_version, base_head_version=base.version, n_samples=meta["n_samples"],
        metrics=meta["metrics"], delta=delta.astype("<f4").tobytes(), delta_norm=norm,
    )


def _too_many(waiting: int):
    """429: this device already has a round's worth waiting; the client retries, nothing is lost."""
    g.refusal = "too_many_waiting"
    resp = jsonify(error=f"{waiting} updates of this device wait for the next round; retry later", status=429)
    resp.status_code = 429
    resp.headers["Retry-After"] = "5"
    abort(resp)


def _check_base(s, meta: dict, served: tuple[str, int]):
    """The base head the update was computed on, and how many versions behind it is."""
    package_version, head_version = served
    cfg = current_app.config
    if meta["base_package_version"] != package_version:
        if s.store.package(meta["base_package_version"][:128]) is not None:
            refuse(409, "stale_package", f"update was computed for package {meta['base_package_version']}; the server now "
                                         f"serves {package_version}: pull the new model")
        refuse(422, "unknown_base", f"unknown base package version {meta['base_package_version'][:128]!r}")
    base = s.store.head(meta["base_head_version"])
    if base is None or base.package_version != package_version:
        refuse(422, "unknown_base", f"unknown base head version {meta['base_head_version']} for package {package_version}")
    staleness = head_version - base.version
    if staleness > cfg["MAX_STALENESS"]:
        refuse(409, "too_stale", f"update is {staleness} head versions behind (limit {cfg['MAX_STALENESS']}): "
                                 "pull the current head")
    return base, staleness


def _check_arrays(arrays: dict, base) -> np.ndarray:
    """The update's layers as one flat float32 vector, exactly the head's arrays and shapes, all finite."""
    try:
        layers = wire.dict_to_layers(arrays, len(base.layers) // 2)
    except wire.WireError as exc:
        refuse(422, "arrays", str(exc))
    parts = []
    for name, arr, want in zip(wire.layer_names(len(base.layers) // 2), layers, base.layers):
        if arr.dtype.kind != "f" or arr.dtype.itemsize not in (2, 4, 8):
            refuse(422, "arrays", f"{name} has dtype {arr.dtype}; send float32")
        if arr.shape != want.shape:
            refuse(422, "arrays", f"{name} has shape {arr.shape}; the head needs {want.shape}")
        parts.append(arr.astype(np.float32, copy=False).ravel())
    flat = np.concatenate(parts)
    if not np.isfinite(flat).all():
        refuse(422, "non_finite", "update holds NaN or infinite values")
    return flat


def _receipt_response(update_id: int, same_body: bool, duplicate: bool):
    if not same_body:
        refuse(409, "key_reused", "idempotency key already used for a different update")
    return jsonify(update_id=update_id, status="received", duplicate=duplicate), 200


# --------------------------------------------------------------------------- consented crops


@bp.post("/crops")
@require("device")
def post_crops():
    """Labelled face crops from a device whose owner opted in; stored per device, once each."""
    s = state()
    serving = _served()
    limit = int(current_app.config["MAX_CROP_BYTES"])
    body = read_body(limit)
    meta, arrays = decode_body(body, max_entries=4, max_inflated=limit)
    try:
        batch = crops.check_batch(meta, arrays, g.client.name, tuple(serving.manifest["input"]["size"]),
                                  list(serving.manifest["classes"]))
    except crops.CropError as exc:
        abort(exc.status, str(exc))
    try:
        stored, known = crops.store_batch(s.store, g.client.id, batch, str(meta.get("package_version", ""))[:128],
                                          meta["idempotency_key"])
    except StoreBusy as exc:
        abort(503, f"{exc}; retry the same batch")
    return jsonify(stored=stored, already_known=known), 201


@bp.delete("/crops")
@require("device")
def delete_crops():
    """A device withdrawing consent: all of its crops go."""
    return jsonify(deleted=crops.purge_client(state().store, g.client.id))


@bp.get("/admin/crops")
@require("admin")
def admin_crops():
    return jsonify(crops=crops.counts(state().store))


@bp.post("/admin/packages")
@require("admin")
def admin_publish():
    """A package as an uncompressed tar of its files: gated against the served one, promoted if it passes."""
    s = state()
    cfg = current_app.config
    force = request.args.get("force", "false").lower() in ("1", "true", "yes")
    body = read_body(int(cfg["MAX_PACKAGE_BYTES"]))
    folder = None
    try:
        folder = publish.unpack_tar(body, Path(s.data_dir) / "staging", int(cfg["MAX_PACKAGE_BYTES"]))
        result = publish.publish(s.store, s.data_dir, folder, publish.gate_dirs(cfg), float(cfg["GATE_TOLERANCE"]), force)
    except publish.PublishError as exc:
        abort(exc.status, str(exc))
    except RecursionError:
        abort(422, "manifest.json is nested too deeply to be a package manifest")
    except StoreBusy as exc:
        abort(503, str(exc))
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
    if s.tracker is not None:
        s.tracker.kick()
    if not result["promoted"]:
        return jsonify(error=publish.refusal(result), status=409, **result), 409
    return jsonify(result), 200


# --------------------------------------------------------------------------- admin


@bp.get("/admin/status")
@require("admin")
def admin_status():
    s = state()
    serving = s.store.serving()
    return jsonify(
        serving=None if serving is None else {"package_version": serving.package_version, "head_version": serving.head_version},
        updates=s.store.counts(),
        aggregate_k=current_app.config["AGGREGATE_K"],
        strategy=s.strategy.to_dict(),
        tracking=s.tracker.status() if s.tracker else None,
        time=time.time(),
    )


@bp.post("/admin/aggregate")
@require("admin")
def admin_aggregate():
    s = state()
    body = json_object(read_body(64 * 1024))
    min_updates = body.get("min_updates", 1)
    if not isinstance(min_updates, int) or isinstance(min_updates, bool) or not 1 <= min_updates <= INT32_MAX:
        abort(400, "min_updates must be a positive integer")
    try:
        result = s.aggregate(min_updates)
    except HeadGateError as exc:
        abort(503, str(exc))
    if result is None:
        return jsonify(aggregated=False, reason=f"fewer than {min_updates} devices have updates buffered for the served package")
    out = dict(aggregated=True, served=result.served, aggregation_id=result.aggregation_id,
               head_version=result.new_head_version, n_updates=result.n_updates, n_devices=len(result.devices),
               devices=result.devices, seconds=result.seconds)
    if "head_gate" in result.info:
        out["head_gate"] = result.info["head_gate"]
    return jsonify(out)


@bp.post("/admin/tracking/flush")
@require("admin")
def admin_tracking_flush():
    s = state()
    if s.tracker is None:
        abort(409, "MLflow tracking is off")
    return jsonify(s.tracker.drain())
