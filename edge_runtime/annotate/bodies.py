"""Request bodies of the page: a small JSON object, or a 400 before anything deep is parsed.

A 3 KB body nested 1,500 deep made ``json.loads`` raise ``RecursionError`` and the page
answer 500 (issue 20). The page's bodies are flat (``{"id": ..., "label": ...}``), so the
nesting is counted on the raw text first, outside strings, and refused beyond ``MAX_DEPTH``.
"""
from __future__ import annotations

import json
from typing import Any

MAX_DEPTH = 4


class BodyError(ValueError):
    """A body that is not a shallow JSON object (one line)."""


def nesting_depth(text: str, stop_at: int) -> int:
    """How deep ``[`` / ``{`` nest outside strings, counting no further than ``stop_at``."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest >= stop_at:
                    return deepest
        elif ch in "]}":
            depth -= 1
    return deepest


def json_object(raw: bytes, max_depth: int = MAX_DEPTH) -> dict[str, Any]:
    """``raw`` as a JSON object nested at most ``max_depth`` deep; ``BodyError`` otherwise."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BodyError("send a JSON object (UTF-8)") from None
    if nesting_depth(text, max_depth + 1) > max_depth:
        raise BodyError(f"JSON nested more than {max_depth} deep")
    try:
        body = json.loads(text)
    except (ValueError, RecursionError):
        raise BodyError("send a JSON object") from None
    if not isinstance(body, dict):
        raise BodyError("send a JSON object")
    return body
