"""What the store hands out and takes in: its errors and its records (no SQL here)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np


class StoreError(RuntimeError):
    """The store cannot do what was asked (one line, fit for an operator)."""


class StoreBusy(StoreError):
    """The database stayed locked or unreachable; the caller should retry."""

@dataclass(frozen=True)
class Client:
    id: int
    name: str
    kind: str
    revoked: bool


@dataclass(frozen=True)
class HeadRecord:
    version: int
    package_version: str
    blob: bytes
    sha256: str
    layers: tuple  # tuple of float32 arrays (coef_0.., intercept_0..), read-only
    flat: np.ndarray  # float32 vector, read-only
    classes: tuple  # class names, the column order of predict_proba
    params: object  # the head's HeadParams (infantino.edge_runtime.core.head)

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        return [a.shape for a in self.layers]


@dataclass(frozen=True)
class Serving:
    package_version: str
    head_version: int
    manifest: dict
    manifest_sha256: str
    folder: str
    head_sha256: str
    head_bytes: int
    bootstrap_head_version: Optional[int] = None


@dataclass
class UpdateRecord:
    """A validated update, ready to insert."""

    client_id: int
    idempotency_key: str
    body_sha256: str
    package_version: str
    base_head_version: int
    n_samples: int
    metrics: dict
    delta: bytes
    delta_norm: float


@dataclass(frozen=True)
class IngestView:
    existing: Optional[tuple[int, str]]  # (update id, body sha256) stored under this idempotency key
    served: Optional[tuple[str, int]]  # (package version, head version)
    waiting: int  # this device's buffered updates
    last_round: int  # id of the newest aggregation (0: none yet)


@dataclass(frozen=True)
class Receipt:
    update_id: int
    duplicate: bool
    conflict: bool = False  # same key, different body


