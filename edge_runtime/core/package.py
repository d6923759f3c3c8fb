"""The self-describing model package: ``manifest.json`` plus the files it hashes.

A package folder holds ``extractor.onnx`` (image -> embedding, fp32),
``extractor.int8.onnx`` (the same, statically quantised), ``head.npz`` (bootstrap
head), ``classifier.onnx`` (image -> probabilities), ``replay_seed.npz`` (a few adult
training embeddings per class, replayed on the device) and ``manifest.json``, which names
every file by role with its sha256 and says how to preprocess an image. Opening a
package verifies the hashes: a swapped or torn file is refused, not run.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .atomic import atomic_write_text
from .preprocess import CLASSES, PreprocessSpec

MANIFEST = "manifest.json"
FORMAT = "infantino-model-package/1"
ROLES = {
    "extractor": "extractor.onnx",
    "extractor_int8": "extractor.int8.onnx",
    "head": "head.npz",
    "classifier": "classifier.onnx",
    "replay_seed": "replay_seed.npz",  # adult FER embeddings (x, y) the device replays against forgetting
    "detector": "detector.onnx",  # BlazeFace face detector (when the manifest's input names one)
}


class PackageError(ValueError):
    """A model package that is missing, malformed or does not match its manifest."""


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class Manifest:
    version: str
    preprocess: PreprocessSpec
    embedding_dim: int
    files: dict[str, dict[str, Any]]  # role -> {"path", "sha256", "bytes"}
    classes: tuple[str, ...] = CLASSES
    metrics: dict[str, Any] = field(default_factory=dict)
    trained_on: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    detector: dict[str, Any] = field(default_factory=dict)  # variant, anchor settings, origin, licence
    created_at: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    format: str = FORMAT

    def to_dict(self) -> dict:
        spec = self.preprocess
        return {
            "format": self.format,
            "version": self.version,
            "classes": list(self.classes),
            "input": {
                **spec.to_dict(),
                "tensor_name": "input",
                "shape": [-1, spec.channels, *spec.size],
                "dtype": "float32",
                "how": f"grayscale crop -> resize to {spec.size[1]}x{spec.size[0]} ({spec.resize}) -> x/255 -> (x - {spec.mean}) / {spec.std}",
            },
            "embedding_dim": self.embedding_dim,
            "files": self.files,
            "metrics": self.metrics,
            "trained_on": self.trained_on,
            "model": self.model,
            **({"detector": self.detector} if self.detector else {}),
            "created_at": self.created_at,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        try:
            if d.get("format") != FORMAT:
                raise PackageError(f"unknown package format {d.get('format')!r} (expected {FORMAT})")
            return cls(
                version=str(d["version"]), preprocess=PreprocessSpec.from_dict(d["input"]),
                embedding_dim=int(d["embedding_dim"]), files=dict(d["files"]), classes=tuple(d["classes"]),
                metrics=dict(d.get("metrics", {})), trained_on=dict(d.get("trained_on", {})),
                model=dict(d.get("model", {})), detector=dict(d.get("detector", {})), created_at=str(d.get("created_at", "")), format=d["format"],
            )
        except PackageError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise PackageError(f"malformed manifest: {exc!r}") from exc


def describe_files(folder: str | Path, roles: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """The ``files`` entry for each role whose file exists in ``folder``."""
    folder = Path(folder)
    out = {}
    for role, name in (roles or ROLES).items():
        p = folder / name
        if p.exists():
            out[role] = {"path": name, "sha256": sha256_file(p), "bytes": p.stat().st_size}
    return out


def write_manifest(folder: str | Path, manifest: Manifest) -> Path:
    path = Path(folder) / MANIFEST
    atomic_write_text(path, json.dumps(manifest.to_dict(), indent=2) + "\n")
    return path


@dataclass
class ModelPackage:
    """An opened, verified package folder."""

    folder: Path
    manifest: Manifest

    def path(self, role: str) -> Path:
        if role not in self.manifest.files:
            raise PackageError(f"package {self.folder} has no {role!r} file")
        return self.folder / self.manifest.files[role]["path"]

    def has(self, role: str) -> bool:
        return role in self.manifest.files

    @property
    def version(self) -> str:
        return self.manifest.version


def read_manifest(folder: str | Path) -> Manifest:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise PackageError(f"no {MANIFEST} in {folder}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PackageError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise PackageError(f"{path}: manifest is not a JSON object")
    return Manifest.from_dict(data)


def open_package(folder: str | Path, verify: bool = True) -> ModelPackage:
    """Read the manifest and (by default) check every listed file's size and sha256."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if verify:
        for role, entry in manifest.files.items():
            name = str(entry.get("path", ""))
            p = folder / name
            if not name or Path(name).name != name:
                raise PackageError(f"{role}: file name {name!r} must be a plain name inside the package")
            if not p.is_file():
                raise PackageError(f"{role}: {name} is missing from {folder}")
            if p.stat().st_size != entry.get("bytes") or sha256_file(p) != entry.get("sha256"):
                raise PackageError(f"{role}: {name} does not match the sha256 in the manifest")
    return ModelPackage(folder, manifest)
