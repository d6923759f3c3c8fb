"""The caregiver annotation page: a small local web app served by the device.

``create_app(device, *, token=None, host="127.0.0.1")`` is a Flask application factory;
``serve(device, host, port, token)`` runs it with werkzeug's threaded server
(``infantino-edge annotate``). Flask is imported only here, never by the device core.

Safe by default:

* binds to loopback; bound anywhere else it refuses to start without a token
  (``serve`` makes a random one, 192 bits, and prints the URL that carries it); a token
  shorter than 16 characters (or of fewer than 6 different ones) is refused;
* with a token, every request needs the signed session cookie it buys
  (``/?token=...`` once) or an ``Authorization: Bearer`` header; tokens are compared in
  constant time (as SHA-256 digests, so not even the length leaks), and a client that sends
  wrong ones is locked out for exponentially longer (``throttle``: 5 free, then 1 s, 2 s, ...);
* POSTs need JSON, the per-session CSRF token in ``X-CSRF-Token``, and an ``Origin`` /
  ``Sec-Fetch-Site`` that is this very page; on loopback the ``Host`` must be a loopback
  name (no DNS rebinding);
* only face crops of the queue (by validated id) and the package's own static files are
  served; a strict Content-Security-Policy, no third-party resources.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import secrets
import sys
import threading
from pathlib import Path
from typing import Any, Optional

from flask import Flask, abort, jsonify, redirect, request, session
from werkzeug.exceptions import HTTPException

from .throttle import FailureThrottle, token_problem
from .history import QueueHistory

LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def create_app(device: Any, *, token: Optional[str] = None, host: str = "127.0.0.1",
               test_config: Optional[dict] = None) -> Flask:
    """The page for one ``Device``. ``host`` is the address the server binds to: anything
    but loopback needs ``token``."""
    token = token or None  # an empty --token / $INFANTINO_ANNOTATE_TOKEN is no token
    _check_binding(token, host)
    here = Path(__file__).resolve().parent  # explicit paths: Flask cannot search the editable infantino.* namespace
    app = Flask(__name__, root_path=str(here), instance_path=str(here / "instance"))
    app.config.from_mapping(
        SECRET_KEY=secrets.token_bytes(32),  # per process: a restart signs everyone out, which is fine
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Strict",
        SESSION_COOKIE_NAME="infantino_annotate",
        MAX_CONTENT_LENGTH=16 * 1024,
        TOKEN=token,
        BIND_HOST=host,
        TIMELINE_HOURS=6.0,
        TOKEN_FREE_FAILURES=5,  # wrong tokens a client may send before the lockout starts
        TOKEN_LOCKOUT_BASE_S=1.0,  # the first lockout; it doubles with each further wrong token
        TOKEN_LOCKOUT_MAX_S=900.0,
    )
    if test_config:
        app.config.update(test_config)
    app.extensions["infantino"] = {
        "device": device,
        "timeline": QueueHistory(device.state_dir / "annotate" / "timeline.json"),
        "lock": threading.Lock(),  # label and dismiss of the same frame never interleave
        "throttle": FailureThrottle(free=app.config["TOKEN_FREE_FAILURES"], base_s=app.config["TOKEN_LOCKOUT_BASE_S"],
                                    max_lockout_s=app.config["TOKEN_LOCKOUT_MAX_S"]),
        "token_digest": _digest(token) if token else None,
    }
    _install_guards(app)

    from . import views

    app.register_blueprint(views.bp)
    return app


def _check_binding(token: Optional[str], host: str) -> None:
    """A weak token is refused; a page reachable from the network needs one."""
    problem = token_problem(token) if token is not None else None
    if problem:
        raise ValueError(problem)
    if not is_loopback(host) and not token:
        raise ValueError(f"binding the annotation page to {host} needs a --token (or bind to 127.0.0.1)")


def _install_guards(app: Flask) -> None:
    """Host, token and cross-site checks before each request; security headers and JSON errors after."""
    @app.before_request
    def _guard():
        _check_host(app)
        _check_token(app)
        if request.method not in SAFE_METHODS:
            _check_cross_site()

    @app.after_request
    def _headers(resp):
        resp.headers["Content-Security-Policy"] = CSP
        resp.headers["X-Content-Type-Options"] = "nosniff"
        resp.headers["X-Frame-Options"] = "DENY"
        resp.headers["Referrer-Policy"] = "no-referrer"
        resp.headers.setdefault("Cache-Control", "no-store")
        return resp

    @app.errorhandler(HTTPException)
    def _json_error(exc: HTTPException):
        return jsonify(error=exc.description), exc.code


def _check_host(app: Flask) -> None:
    """On loopback, answer only to loopback names: a rebinding DNS name cannot reach the page."""
    if not is_loopback(app.config["BIND_HOST"]):
        return
    name = request.host.rsplit(":", 1)[0] if not request.host.startswith("[") else request.host[1:].split("]")[0]
    if not is_loopback(name):
        abort(403, "unexpected Host header")


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def _check_token(app: Flask) -> None:
    """A signed session, or the token (query once, or Bearer); wrong tokens lock the client out for longer and longer."""
    ctx = app.extensions["infantino"]
    if not ctx["token_digest"] or session.get("auth") is True:
        return
    given = request.args.get("token") or ""
    bearer = request.headers.get("Authorization", "")
    if bearer.startswith("Bearer "):
        given = bearer[len("Bearer "):]
    if not given:
        abort(401, "this annotation page needs its token: open the URL that `infantino-edge annotate` printed")
    throttle: FailureThrottle = ctx["throttle"]
    wait = throttle.retry_after(request.remote_addr)
    if wait > 0:  # even the right token waits: otherwise the lockout would not slow guessing
        abort(_locked_out(wait))
    if hmac.compare_digest(_digest(given), ctx["token_digest"]):
        throttle.succeeded(request.remote_addr)
        if request.args.get("token") and request.method == "GET":
            session.clear()
            session["auth"] = True
            abort(redirect(request.path))  # drop the token from the address bar and history
        return  # a bearer token authorises this request only
    lockout = throttle.failed(request.remote_addr)
    abort(_refusal(401, "wrong token for this annotation page: open the URL that `infantino-edge annotate` printed", lockout))


def _locked_out(wait_s: float):
    """429: this client sent too many wrong tokens; the token it sent now was not even checked."""
    return _refusal(429, "too many wrong tokens from this address", wait_s)


def _refusal(status: int, message: str, wait_s: float):
    """A JSON refusal; with ``Retry-After`` when the client must wait before its next token."""
    seconds = math.ceil(wait_s)
    resp = jsonify(error=f"{message}: try again in {seconds} s" if seconds > 0 else message)
    resp.status_code = status
    if seconds > 0:
        resp.headers["Retry-After"] = str(seconds)
    return resp


def _check_cross_site() -> None:
    """CSRF: same-origin fetch metadata, an Origin that is this page, JSON, the session's token."""
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None and site not in ("same-origin", "none"):
        abort(403, "cross-site request refused")
    origin = request.headers.get("Origin")
    if origin is not None and origin != request.host_url.rstrip("/"):
        abort(403, "cross-origin request refused")
    if not request.is_json:
        abort(415, "send JSON")
    sent = request.headers.get("X-CSRF-Token", "")
    expected = session.get("csrf")
    if not expected or not hmac.compare_digest(sent.encode(), expected.encode()):
        abort(403, "missing or wrong CSRF token; reload the page")


def new_token() -> str:
    """The token ``serve`` makes up when none is given: 32 URL-safe characters, 192 bits."""
    return secrets.token_urlsafe(24)


def serve(device: Any, host: str = "127.0.0.1", port: int = 8765, token: Optional[str] = None) -> None:
    """Run the page until interrupted (werkzeug's threaded server; it is a one-household page)."""
    from werkzeug.serving import make_server

    if not is_loopback(host) and not token:
        token = new_token()
    app = create_app(device, token=token, host=host)
    server = make_server(host, port, app, threaded=True)
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{server.server_port}/" + (f"?token={token}" if token else "")
    print(f"annotation page: {url}  (Ctrl-C to stop)", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
