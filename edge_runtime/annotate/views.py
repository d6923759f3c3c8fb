"""The page and its small JSON API (``bp``); the security checks run before these (``__init__``)."""
from __future__ import annotations

import contextlib
import secrets
from pathlib import Path
from typing import Any

from flask import Blueprint, abort, current_app, jsonify, render_template, request, send_file, session

from ..annotation_queue import QueueError
from ..core.preprocess import ImageError
from ..state import StateConflict, StateError
from ..state_lock import StateLockTimeout
from ..sync.state import managed_model_dir
from .bodies import BodyError, json_object

bp = Blueprint("annotate", __name__, root_path=str(Path(__file__).parent))


def _ctx() -> dict[str, Any]:
    return current_app.extensions["infantino"]


def _follow(device) -> None:
    """The page's device at the state folder's newest snapshot; when another process (``infantino-edge
    sync``) moved the folder to another package, the device switches to it in place and the page goes on."""
    try:
        device.refresh()  # head and counters as another process (sync, a CLI learn) may have saved them
    except StateConflict:
        managed = managed_model_dir(device.state_dir)
        if managed is None or device.runs_package(managed):
            raise
        device.switch_package(managed)


def _status(device) -> dict[str, Any]:
    s = device.status()
    return {"head_version": s["head_version"], "generation": s["generation"], "queue": s["queue"],
            "counters": s["counters"], "package_version": s["package_version"], "camera": s["camera"]}


def _body() -> tuple[str, dict[str, Any]]:
    try:
        body = json_object(request.get_data(cache=True))
    except BodyError as exc:
        abort(400, str(exc))
    item_id = body.get("id")
    if not isinstance(item_id, str):
        abort(400, "give the frame's id")
    return item_id, body


@bp.errorhandler(QueueError)
def _queue_error(exc: QueueError):
    return jsonify(error=str(exc)), 404


@bp.errorhandler(ImageError)
def _image_error(exc: ImageError):
    """A queued crop the device will not learn from (blank): say so, change nothing."""
    return jsonify(error=str(exc)), 422


@bp.errorhandler(StateError)
def _state_error(exc: StateError):
    """A state change the page cannot follow (e.g. a snapshot of a package that is not installed)."""
    return jsonify(error=str(exc)), 409


@bp.errorhandler(StateLockTimeout)
def _busy(exc: StateLockTimeout):
    return jsonify(error=str(exc)), 503


def csrf_token() -> str:
    """The session's token for the page's forms (checked before every change, ``_check_cross_site``)."""
    if "csrf" not in session:
        session["csrf"] = secrets.token_urlsafe(32)
    return session["csrf"]


@bp.get("/")
def index():
    device = _ctx()["device"]
    return render_template("annotate.html", csrf=csrf_token(), classes=device.classes)


@bp.get("/api/state")
def state():
    """Waiting frames (most uncertain first), versions and counters, the recent timeline."""
    ctx = _ctx()
    device, timeline = ctx["device"], ctx["timeline"]
    _follow(device)
    items = device.queue.items()
    timeline.record(items)
    items.sort(key=lambda i: (-i.uncertainty, i.id))
    return jsonify(classes=list(device.classes), status=_status(device),
                   items=[{"id": i.id, "created": i.created, "predicted": i.predicted, "uncertainty": i.uncertainty,
                           "probabilities": i.probabilities, "face_found": i.face_found} for i in items],
                   timeline=timeline.recent(current_app.config["TIMELINE_HOURS"]))


@bp.get("/crop/<item_id>.png")
def crop(item_id: str):
    """A queued face crop, by validated id only: nothing else of the state folder is served."""
    path = _ctx()["device"].queue.crop_path(item_id)  # QueueError (404) for anything but an id
    if not path.is_file():
        abort(404, "no such frame")
    return send_file(path, mimetype="image/png", max_age=0)


@bp.post("/api/label")
def label():
    """The caregiver's label: the device learns it once (a repeat is reported, not counted)."""
    ctx = _ctx()
    device = ctx["device"]
    item_id, body = _body()
    name = body.get("label")
    if not isinstance(name, str) or name not in device.classes:
        return jsonify(error=f"unknown label {str(name)[:40]!r}; expected one of {', '.join(device.classes)}"), 400
    with contextlib.suppress(QueueError):  # on the timeline even if the page was never listed
        ctx["timeline"].record([device.queue.get(item_id)])
    with ctx["lock"]:
        _follow(device)
        result = device.resolve(item_id, name)  # QueueError: unknown or malformed id -> 404
    ctx["timeline"].label(item_id, name)
    if result is None:
        outcome = "duplicate"
    else:
        outcome = "learned" if result.updated else "rolled back" if result.rolled_back else "kept for the guard"
    return jsonify(id=item_id, label=name, outcome=outcome, status=_status(device))


@bp.post("/api/dismiss")
def dismiss():
    """"Not a face": the frame leaves the queue without being learned."""
    ctx = _ctx()
    device = ctx["device"]
    item_id, _ = _body()
    with ctx["lock"]:
        _follow(device)
        ctx["timeline"].record([device.queue.get(item_id)])  # QueueError -> 404
        if not device.dismiss(item_id):  # under the state folder's writer lock, like a label
            return jsonify(error="this frame is labelled already"), 409
    ctx["timeline"].label(item_id, None)
    return jsonify(id=item_id, outcome="dismissed", status=_status(device))


@bp.get("/api/watch")
def watch():
    """What ``infantino-edge watch`` records in this state folder (read-only): the current expression,
    per-minute valence and the distress alerts of the last hours, the watch's last status."""
    from ..watch.live import snapshot

    return jsonify(snapshot(_ctx()["device"].state_dir, current_app.config["TIMELINE_HOURS"]))
