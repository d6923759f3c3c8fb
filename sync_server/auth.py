"""Bearer tokens: one per device (``infantino-server device add``), one for the admin.

Tokens are random 256-bit strings shown once and stored as sha256 digests. Every request
looks its token up in the store, so a revoked device is refused at once by every worker.
"""
from __future__ import annotations

import functools
from typing import Callable

from flask import abort, current_app, g, request


def _token() -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def _unauthorized(reason: str):
    resp = current_app.make_response(({"error": reason, "status": 401}, 401, {"WWW-Authenticate": 'Bearer realm="infantino"'}))
    abort(resp)


def require(*kinds: str) -> Callable:
    """Allow the view only to live clients of these kinds ("device", "admin")."""

    def decorator(view: Callable) -> Callable:
        @functools.wraps(view)
        def wrapped(*args, **kwargs):
            token = _token()
            if token is None:
                _unauthorized("missing bearer token (Authorization: Bearer <token>)")
            client = current_app.extensions["infantino"].store.client_for_token(token)  # StoreBusy: the app's 503
            if client is None:
                _unauthorized("unknown token")
            if client.revoked:
                abort(403, f"token of {client.kind} {client.name!r} was revoked")
            if client.kind not in kinds:
                abort(403, f"this endpoint is for {' or '.join(kinds)} tokens, not {client.kind} tokens")
            g.client = client
            return view(*args, **kwargs)

        return wrapped

    return decorator
