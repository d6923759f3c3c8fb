"""Head updates on the wire: one ``.npz`` body, arrays plus a JSON ``meta`` entry.

No web imports here: both the device client and the sync server use it. Bodies are read
with ``allow_pickle=False`` and the zip directory is checked before anything is inflated,
so a hostile body can neither run code nor decompress into gigabytes.

An update body holds
* ``meta``: a 0-d unicode array with a JSON object (``UPDATE_FORMAT``, device, base
  versions, ``n_samples``, local ``metrics``, ``idempotency_key``, ``kind``);
* ``coef_<i>`` / ``intercept_<i>``: the head's layers (``kind="weights"``) or their
  difference to the base head (``kind="delta"``), float32.
"""
from __future__ import annotations

import io
import json
import re
import zipfile
import zlib
from typing import Any, Sequence

import numpy as np

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


_HEADER = re.compile(r"^\{'descr': '([<>|=]?[A-Za-z][0-9]*)', 'fortran_order': False, 'shape': \(((?:\d+, ?)*\d*)\), \}\s*$")


def _read_npy(raw: bytes) -> np.ndarray:
    """One .npy member: numpy's own C-order header parsed without eval, else ``numpy.lib.format`` (no pickle)."""
    if raw[:6] == b"\x93NUMPY" and raw[6:7] == b"\x01" and len(raw) >= 10:
        hlen = int.from_bytes(raw[8:10], "little")
        match = _HEADER.match(raw[10:10 + hlen].decode("latin1"))
        if match:
            dtype = np.dtype(match.group(1))
            shape = tuple(int(x) for x in match.group(2).replace(" ", "").split(",") if x)
            if dtype.hasobject:
                raise ValueError("Object arrays cannot be loaded when allow_pickle=False")
            count = int(np.prod(shape, dtype=np.int64))
            if len(raw) - 10 - hlen != count * dtype.itemsize:
                raise ValueError(f"array data holds {len(raw) - 10 - hlen} bytes, its header promises {count * dtype.itemsize}")
            return np.frombuffer(raw, dtype=dtype, count=count, offset=10 + hlen).reshape(shape).copy()
    return np.lib.format.read_array(io.BytesIO(raw), allow_pickle=False)


def _member(data: bytes, zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    """A member's bytes: stored members (what ``np.savez`` writes) sliced straight out of the
    body after a CRC check, anything else through ``zipfile``."""
    start = info.header_offset
    if info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & 0x1 and data[start:start + 4] == b"PK\x03\x04":
        name_len = int.from_bytes(data[start + 26:start + 28], "little")
        extra_len = int.from_bytes(data[start + 28:start + 30], "little")
        begin = start + 30 + name_len + extra_len
        raw = data[begin:begin + info.compress_size]
        if len(raw) != info.file_size or zlib.crc32(raw) != info.CRC:
            raise WireError(f"npz entry {info.filename[:64]!r} is truncated or corrupt")
        return raw
    return zf.read(info)


def encode(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> bytes:
    if "meta" in arrays:
        raise WireError("'meta' is reserved")
    buf = io.BytesIO()
    np.savez(buf, meta=np.asarray(json.dumps(meta, sort_keys=True)), **arrays)
    return buf.getvalue()


def decode(data: bytes, max_entries: int = 32, max_inflated: int = 64 * 1024 * 1024) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Parse an npz body into (meta, arrays); raises ``WireError`` with a one-line reason."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise WireError(f"body is not an npz archive ({exc})") from None
    entries = {}
    try:
        with zf:
            infos = zf.infolist()
            if len(infos) > max_entries:
                raise WireError(f"npz holds {len(infos)} entries; at most {max_entries} allowed")
            if sum(i.file_size for i in infos) > max_inflated:
                raise WireError(f"npz would inflate to more than {max_inflated} bytes")
            for info in infos:
                if not info.filename.endswith(".npy"):
                    raise WireError(f"npz entry {info.filename[:64]!r} is not an .npy array")
                entries[info.filename[:-4]] = _read_npy(_member(data, zf, info))
    except WireError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError, RuntimeError) as exc:
        raise WireError(f"npz entry cannot be read without pickle ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    if "meta" not in entries:
        raise WireError("npz has no 'meta' entry")
    raw = entries.pop("meta")
    if raw.dtype.kind != "U" or raw.ndim != 0:
        raise WireError("'meta' must be a JSON string")
    try:
        meta = json.loads(str(raw))
    except json.JSONDecodeError as exc:
        raise WireError(f"'meta' is not valid JSON ({exc.msg})") from None
    if not isinstance(meta, dict):
        raise WireError("'meta' must be a JSON object")
    return meta, entries


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
