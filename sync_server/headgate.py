"""The head gate: an aggregated global head is served only if it is not worse than the served
one on the server's held-out set (the first of ``GATE_DIRS``, as for packages).

The held-out photos are embedded once per package (``gate.held_out``, with that package's
extractor, as a device runs it) before the aggregation transaction opens; judging a head is
then one numpy forward pass (``gate.score_head``). The decision uses ``gate.decide``, the
package gate's own rule and wording.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Optional

import numpy as np

from infantino.edge_runtime.evaluate import EmbeddedSet

from . import store as st
from .gate import SetScore, decide, held_out, score_head
from .rounds import head_from_flat

log = logging.getLogger("infantino.server")


class HeadGateError(RuntimeError):
    """The held-out set cannot be read (one line)."""


def verdict(candidate: SetScore, current: SetScore, tolerance: float) -> dict:
    """What the round records: both scores and the decision, in the package gate's words."""
    passed, reason = decide([candidate], [current], tolerance)
    return {"passed": passed, "reason": reason, "set": candidate.path, "n": candidate.n, "tolerance": tolerance,
            "candidate_accuracy": candidate.accuracy, "current_accuracy": current.accuracy,
            "candidate_macro_f1": candidate.macro_f1, "current_macro_f1": current.macro_f1}


class HeadGate:
    """A ``rounds.Judge``: the held-out set embedded once per package, cached in the process."""

    def __init__(self, store: st.Store, data_dir: Path, folder: str, tolerance: float = 0.0, threads: int = 2):
        self.store = store
        self.data_dir = Path(data_dir)
        self.folder = str(folder)
        self.tolerance = float(tolerance)
        self.threads = threads
        self._held: dict[str, EmbeddedSet] = {}
        self._lock = threading.Lock()

    def prepare(self, package_version: str) -> EmbeddedSet:
        """Embed the held-out set for this package unless already done (call before the transaction)."""
        with self._lock:
            held = self._held.get(package_version)
            if held is not None:
                return held
            pkg = self.store.package(package_version)
            if pkg is None or not Path(self.folder).is_dir():
                raise HeadGateError(f"head gate: held-out set {self.folder} or package {package_version} is missing")
            _, [held] = held_out(self.data_dir / pkg["folder"], [self.folder], self.threads)
            log.info("head gate: %d held-out photos of %s embedded for package %s", len(held.labels), self.folder, package_version)
            self._held = {package_version: held}  # one package is served at a time
            return held

    def __call__(self, package_version: str, base: st.HeadRecord, candidate_flat: np.ndarray) -> Optional[dict]:
        held = self.prepare(package_version)
        current = score_head(head_from_flat(base, base.flat), held)
        candidate = score_head(head_from_flat(base, candidate_flat), held)
        return verdict(candidate, current, self.tolerance)
