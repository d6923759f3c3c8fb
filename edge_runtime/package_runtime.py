"""``PackageRuntime``: one model package opened for inference (face finder, ONNX Runtime extractor).

Everything a device needs from its package, built once and then read-only, so a device
switches packages by replacing one object: the manifest's classes and embedding size, the
preprocessing spec with this device's detector sizes, the face finder, the extractor of the
precision asked for, and the package's source-domain replay embeddings.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from .core import safe_npz
from .config import DeviceConfig
from .core.extractor import Extractor
from .core.facefinder import FaceFinder, prepare, uses_blazeface
from .core.head import HeadFormatError, OnlineHead
from .core.package import ModelPackage, PackageError, open_package
from .core.preprocess import ImageSource, PreprocessSpec, Prepared, faces_tensor
from .core.replay import ReplayBuffer


@dataclass(frozen=True)
class PackageRuntime:
    package: ModelPackage
    classes: tuple[str, ...]
    dim: int
    spec: PreprocessSpec
    finder: FaceFinder
    extractor_role: str
    extractor: Extractor

    @classmethod
    def open(cls, model_dir: str | os.PathLike, config: DeviceConfig, *, session: Any = None) -> "PackageRuntime":
        """Open and verify ``model_dir``; ``PackageError`` when it cannot serve this config."""
        package = open_package(model_dir)
        manifest = package.manifest
        spec = _device_spec(manifest.preprocess, config)
        finder = FaceFinder.for_package(package, spec, threads=1)
        role = extractor_role(package, config.precision)
        extractor = Extractor(package.path(role), threads=config.threads, session=session, flip_average=spec.flip_average)
        if extractor.dim is not None and extractor.dim != manifest.embedding_dim:
            raise PackageError(f"extractor gives {extractor.dim}-d embeddings, the manifest says {manifest.embedding_dim}")
        return cls(package, tuple(manifest.classes), manifest.embedding_dim, spec, finder, role, extractor)

    def prepare(self, image: ImageSource, detect: bool) -> Prepared:
        """Decode, crop and normalise a frame: ``facefinder.prepare`` with this package's face finder."""
        return prepare(image, self.spec, detect=detect, finder=self.finder)

    def head(self) -> OnlineHead:
        """The package's own (bootstrap) head, checked against the manifest."""
        try:
            head = OnlineHead.load(self.package.path("head"))
        except HeadFormatError as exc:
            raise PackageError(f"package head: {exc}") from exc
        if head.classes != self.classes or head.input_dim != self.dim:
            raise PackageError("package head does not match the manifest's classes or embedding size")
        return head

    def source(self, replay_seed: Optional[str] = None) -> ReplayBuffer:
        """Source-domain (adult FER) embeddings replayed next to the caregiver's labels, so the
        head keeps what it knew about adult faces; fixed, part of the package, not of the state."""
        path = replay_seed or (self.package.path("replay_seed") if self.package.has("replay_seed") else None)
        n = len(self.classes)
        if path is None:
            return ReplayBuffer(n, self.dim, 0)
        try:
            x, y = load_replay_seed(path)
        except (OSError, KeyError, ValueError) as exc:
            raise PackageError(f"replay seed {Path(path).name}: {exc}") from exc
        if x.shape[1] != self.dim or y.max(initial=0) >= n:
            raise PackageError(f"replay seed {Path(path).name} does not fit {self.dim}-d embeddings of {n} classes")
        buf = ReplayBuffer(n, self.dim, int(np.bincount(y, minlength=n).max(initial=0)))
        rng = np.random.default_rng(0)
        for xi, yi in zip(x, y):
            buf.add(xi, int(yi), rng)
        return buf

    def runs(self, model_dir: str | os.PathLike) -> bool:
        """Whether ``model_dir`` is this package (the same folder, or a copy of the same version)."""
        try:
            return Path(model_dir).resolve() == Path(self.package.folder).resolve() or \
                open_package(model_dir, verify=False).version == self.package.version
        except PackageError:
            return False


def extractor_role(package: ModelPackage, precision: str) -> str:
    """``extractor_int8`` or ``extractor``: int8 for "auto" when the package has it."""
    if precision == "auto":
        return "extractor_int8" if package.has("extractor_int8") else "extractor"
    role = "extractor_int8" if precision == "int8" else "extractor"
    if not package.has(role):
        raise PackageError(f"package {package.folder} has no {precision} extractor")
    return role


def embed_crops(model_dir: str | os.PathLike, crops: Sequence[np.ndarray], config: DeviceConfig) -> np.ndarray:
    """Face crops embedded by another package's extractor (int8 when this config would use it)."""
    pkg = open_package(model_dir, verify=False)
    role = "extractor_int8" if config.precision in ("auto", "int8") and pkg.has("extractor_int8") else "extractor"
    return Extractor(pkg.path(role), threads=config.threads)(faces_tensor(list(crops), pkg.manifest.preprocess))


def _device_spec(spec: PreprocessSpec, config: DeviceConfig) -> PreprocessSpec:
    """The manifest's spec with this device's Haar sizes (they only matter for Haar packages)."""
    if uses_blazeface(spec):
        return spec
    coarse = config.detect_coarse_side or 0
    return replace(spec, detect_max_side=config.detect_max_side or spec.detect_max_side, detect_coarse_side=coarse)


def load_replay_seed(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """``x`` float32 (N, D) and ``y`` class indices (N,) from an npz of plain arrays."""
    with safe_npz.load(path) as npz:
        x = np.asarray(npz["x"], np.float32)
        y = np.asarray(npz["y"], np.int64)
    if x.ndim != 2 or y.shape != (len(x),) or y.min(initial=0) < 0 or not np.all(np.isfinite(x)):
        raise ValueError("expects x (N, D) finite floats and y (N,) class indices")
    return x, y
