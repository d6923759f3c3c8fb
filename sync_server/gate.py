"""The publish gate: a new package reaches devices only if it is not worse than the served one.

Both packages are scored as a device would run them (int8 extractor when packaged, its own
bootstrap ``head.npz``, the shared preprocessing with face detection, ONNX Runtime on CPU)
on the server's held-out ImageFolder sets. The first set decides; the others are reported
(e.g. adult faces, to see what the adult domain lost). ``decide`` is pure.

``held_out`` and ``score_head`` are the one embed-and-score of both gates: the package opened
for inference alone (``PackageRuntime``: its face finder, its extractor, its bootstrap head),
no device state, nothing written; the head gate (``headgate``) embeds once and scores heads.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from infantino.edge_runtime.config import DeviceConfig
from infantino.edge_runtime.evaluate import EmbeddedSet, embed_folder
from infantino.edge_runtime.core.head import OnlineHead
from infantino.edge_runtime.core.metrics import summarize
from infantino.edge_runtime.package_runtime import PackageRuntime


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


def held_out(package_dir: str | Path, folders: Sequence[str | Path], threads: int = 2) -> tuple[OnlineHead, list[EmbeddedSet]]:
    """The package's bootstrap head, and each ImageFolder embedded as a fresh device running the
    package embeds it (int8 extractor when packaged, the package's face finder)."""
    runtime = PackageRuntime.open(package_dir, DeviceConfig(threads=threads))
    return runtime.head(), [embed_folder(runtime, folder) for folder in folders]


def score_head(head: OnlineHead, data: EmbeddedSet) -> SetScore:
    """Accuracy and macro-F1 of ``head`` on embedded held-out photos (NaN for none)."""
    pred = head.predict_proba(data.embeddings).argmax(axis=1) if len(data.labels) else data.labels
    s = summarize(data.labels, pred, len(head.classes))
    return SetScore(data.path, int(s["n"]), float(s["accuracy"]), float(s["macro_f1"]))


def score_package(package_dir: str | Path, folders: list[str | Path], threads: int = 2) -> list[SetScore]:
    """Accuracy and macro-F1 of a package, as a fresh device runs it, on each folder."""
    head, sets = held_out(package_dir, folders, threads)
    return [score_head(head, data) for data in sets]


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
