"""Consented infant face crops: validate, store per device, list, export, purge.

Only devices whose owner opted in send crops (``infantino.edge_runtime.consent``); the server keeps
them per device so that one request (``infantino-server device purge NAME``) deletes all
of a device's crops. Exported as an ImageFolder tree of PNGs, they are what
``infantino-export train --images DIR`` fine-tunes the extractor on.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from infantino.edge_runtime.consent import CROPS_FORMAT

from . import store as st
from .names import InvalidName, check_device_name, child_path

MAX_CROPS_PER_BATCH = 512


class CropError(ValueError):
    """A crop upload that cannot be stored (one line); the HTTP status says whose fault."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class CropBatch:
    crops: np.ndarray  # (N, H, W) uint8
    labels: np.ndarray  # (N,) int64


def check_batch(meta: dict, arrays: dict, device: str, size: tuple[int, int], classes: list[str]) -> CropBatch:
    """A decoded ``POST /v1/crops`` body as a ``CropBatch``, or ``CropError`` saying what is wrong."""
    if meta.get("format") != CROPS_FORMAT:
        raise CropError(f"meta.format must be {CROPS_FORMAT!r}", 400)
    if meta.get("device") != device:
        raise CropError(f"this token belongs to device {device!r}; crops may not claim another device", 403)
    key = meta.get("idempotency_key")
    if not isinstance(key, str) or not 8 <= len(key) <= 128:
        raise CropError("meta.idempotency_key must be a string of 8 to 128 characters", 400)
    if "classes" in meta and meta["classes"] != list(classes):
        raise CropError("the crops are labelled with other classes than the served package's; sync the package first")
    n_classes = len(classes)
    if set(arrays) != {"crops", "labels"}:
        raise CropError(f"arrays must be exactly crops and labels, not {', '.join(sorted(arrays))[:120]}", 400)
    crops, labels = arrays["crops"], arrays["labels"]
    if crops.dtype != np.uint8 or crops.ndim != 3 or tuple(crops.shape[1:]) != tuple(size):
        raise CropError(f"crops must be uint8 of shape (N, {size[0]}, {size[1]}), not {crops.dtype} {crops.shape}")
    if labels.dtype.kind not in "iu" or labels.shape != (crops.shape[0],):
        raise CropError(f"labels must be {crops.shape[0]} integers, not {labels.dtype} {labels.shape}")
    if not 1 <= len(labels) <= MAX_CROPS_PER_BATCH:
        raise CropError(f"a batch holds 1 to {MAX_CROPS_PER_BATCH} crops, not {len(labels)}")
    if labels.min() < 0 or labels.max() >= n_classes:
        raise CropError(f"labels must be class indices 0..{n_classes - 1}")
    return CropBatch(np.ascontiguousarray(crops), labels.astype(np.int64))


def store_batch(store: st.Store, client_id: int, batch: CropBatch, package_version: str, batch_key: str) -> tuple[int, int]:
    """Insert the crops this device has not sent before; returns (stored, already known).

    Keyed by (device, sha256 of pixels and label): a batch resent after a lost answer, or the
    same crop in a later batch, is stored once.
    """
    rows = []
    for crop, label in zip(batch.crops, batch.labels):
        digest = hashlib.sha256(crop.tobytes() + int(label).to_bytes(2, "little")).hexdigest()
        rows.append({"client_id": client_id, "label": int(label), "height": crop.shape[0], "width": crop.shape[1],
                     "pixels": crop.tobytes(), "sha256": digest, "package_version": package_version,
                     "batch_key": batch_key, "created_at": time.time()})
    unique = list({r["sha256"]: r for r in rows}.values())
    with store.change() as u:
        known = u.known_crops(client_id, [r["sha256"] for r in unique])
        new = [r for r in unique if r["sha256"] not in known]
        if new:
            u.insert_crops(new)
    return len(new), len(rows) - len(new)


def counts(store: st.Store) -> list[dict]:
    """Crops per device and class: ``[{"device", "label", "n"}]``."""
    with store.look() as u:
        return u.crop_counts()


def _client_id(u: st.Unit, name: str) -> int:
    cid = u.client_id_by_name(name, kind="device")
    if cid is None:
        raise st.StoreError(f"no device named {name!r}")
    return cid


def purge(store: st.Store, device: str) -> int:
    """Delete every crop of ``device`` (revoked or not); returns how many."""
    with store.change() as u:
        return u.delete_crops(_client_id(u, device))


def purge_client(store: st.Store, client_id: int) -> int:
    """A device withdrawing its own consent (``DELETE /v1/crops``)."""
    with store.change() as u:
        return u.delete_crops(client_id)


def _file_stem(name: str, client_id: int) -> str:
    """The device's name, or ``client-<id>`` for a name stored before names were checked."""
    try:
        return check_device_name(name)
    except InvalidName:
        return f"client-{client_id}"


def export_folder(store: st.Store, out: Path, classes: list[str], device: str | None = None) -> int:
    """Write ``out/<class>/<device>-<id>.png`` for every stored crop (of one device if given);
    every path is checked to stay inside ``out``."""
    from PIL import Image

    n = 0
    try:
        with store.look() as u:
            client_id = None if device is None else _client_id(u, check_device_name(device))
            for r in u.crop_rows(client_id):
                path = child_path(Path(out), classes[r.label], f"{_file_stem(r.name, r.client_id)}-{r.id}.png")
                path.parent.mkdir(parents=True, exist_ok=True)
                pixels = np.frombuffer(r.pixels, np.uint8).reshape(r.height, r.width)
                Image.fromarray(pixels).save(path)
                n += 1
    except InvalidName as exc:
        raise st.StoreError(str(exc)) from None
    return n
