"""The publish gate: a new package reaches devices only if it is not worse than the served one.

Both packages are scored as a device would run them (int8 extractor when packaged, its own
bootstrap ``head.npz``, the shared preprocessing with face detection, ONNX Runtime on CPU)
on the server's held-out ImageFolder sets. The first set decides; the others are reported
(e.g. adult faces, to see what the adult domain lost). ``decide`` is pure.
"""
from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from infantino.edge_runtime.device import Device, DeviceConfig
from infantino.edge_runtime.evaluate import embed_folder, score


@dataclass(frozen=True)
class SetScore:
    path: str
    n: int
    accuracy: float
    macro_f1: float


@dataclass(frozen=True)
class GateResult:
    candidate_version: str
    current_version: Optional[str]
    candidate: list[SetScore]
    current: list[SetScore] = field(default_factory=list)
    tolerance: float = 0.0
    passed: bool = False
    reason: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def score_package(package_dir: str | Path, folders: list[str | Path], threads: int = 2) -> list[SetScore]:
    """Accuracy and macro-F1 of a package, as a fresh device runs it, on each folder."""
    with tempfile.TemporaryDirectory(prefix="infantino-gate-") as tmp:
        device = Device(package_dir, tmp, DeviceConfig(threads=threads, autosave=False))
        out = []
        for folder in folders:
            s = score(device, embed_folder(device, folder))
            out.append(SetScore(str(folder), int(s["n"]), float(s["accuracy"]), float(s["macro_f1"])))
        return out


def decide(candidate: list[SetScore], current: list[SetScore], tolerance: float = 0.0) -> tuple[bool, str]:
    """Pass iff the candidate's accuracy on the first set is at least the current one's minus ``tolerance``."""
    if not candidate:
        return False, "no held-out set to judge on"
    if not current:
        return True, "nothing is served yet"
    c, b = candidate[0], current[0]
    if c.n == 0:
        return False, f"held-out set {c.path} has no readable images"
    verdict = c.accuracy >= b.accuracy - tolerance
    word = "not worse than" if verdict else "worse than"
    return verdict, (f"candidate {c.accuracy:.4f} is {word} the served {b.accuracy:.4f} on {Path(c.path).name} "
                     f"(n={c.n}, tolerance {tolerance})")


def run_gate(candidate_dir: Path, candidate_version: str, current_dir: Optional[Path], current_version: Optional[str],
             folders: list[str | Path], tolerance: float = 0.0, threads: int = 2) -> GateResult:
    cand = score_package(candidate_dir, folders, threads)
    cur = score_package(current_dir, folders, threads) if current_dir is not None else []
    passed, reason = decide(cand, cur, tolerance)
    return GateResult(candidate_version, current_version, cand, cur, tolerance, passed, reason)
