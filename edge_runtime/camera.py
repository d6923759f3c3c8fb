"""``CameraModel``: one camera's own part, the state around ``personal``'s math: its unlabelled
frames (``FramePool``), its label counts, and the guarded adaptation the device applies on top
of the fleet's head. Numpy only; saved with the device state (``device_state``).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from .core.personal import EPS, LEVELS, Adaptation, Candidate, PersonalSettings, adapt, choose, em_prior


class FramePool:
    """The camera's recent unlabelled frames, oldest first: embeddings (float16: 256 frames of 64-d are
    32 KiB of state) and the head's probabilities for each as it saw them, the evidence for its class
    mix. A frame the caregiver labels leaves the pool (it is known now, counted in the labels)."""

    def __init__(self, dim: int, size: int = 256, n_classes: int = 7):
        self.x = np.zeros((size, dim), np.float16)
        self.p = np.zeros((size, n_classes), np.float32)
        self.n = 0  # rows 0..n-1 hold frames, oldest first

    def __len__(self) -> int:
        return self.n

    def add(self, x: np.ndarray, probs: np.ndarray) -> None:
        if not len(self.x):
            return
        if self.n == len(self.x):  # full: the oldest goes (a 32 KiB shift, microseconds)
            self.x[:-1], self.p[:-1] = self.x[1:], self.p[1:]
            self.n -= 1
        self.x[self.n], self.p[self.n] = x, probs
        self.n += 1

    def discard(self, x: np.ndarray) -> bool:
        """Drop the newest frame equal to ``x`` (compared as float16); False when none is."""
        x16 = np.asarray(x, np.float16).reshape(-1)
        near = np.flatnonzero(self.x[: self.n, 0] == x16[0])  # one column first: a full compare of 256 rows costs 0.2 ms
        hits = [i for i in near if np.array_equal(self.x[i], x16)]
        if not hits:
            return False
        i = int(hits[-1])
        self.x[i : self.n - 1], self.p[i : self.n - 1] = self.x[i + 1 : self.n], self.p[i + 1 : self.n]
        self.n -= 1
        return True

    def all(self) -> np.ndarray:
        return self.x[: self.n].astype(np.float32)

    def probs(self) -> np.ndarray:
        """The head's probabilities for each frame, as stored (refreshed at each guard run)."""
        return self.p[: self.n].astype(np.float64)

    def reprobe(self, head) -> np.ndarray:
        """Every frame's probabilities under ``head`` (a new or updated head), stored and returned."""
        if self.n:
            self.p[: self.n] = head.predict_proba(self.all())
        return self.probs()

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"pool_x": self.x[: self.n].copy(), "pool_p": self.p[: self.n].copy()}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], dim: int, size: int, n_classes: int) -> "FramePool":
        pool = cls(dim, size, n_classes)
        x = np.asarray(arrays.get("pool_x", np.zeros((0, dim), np.float16)), np.float16)
        p = np.asarray(arrays.get("pool_p", np.full((len(x), n_classes), 1.0 / n_classes)), np.float32)
        if x.ndim != 2 or x.shape[1] != dim or p.shape != (len(x), n_classes) or not (np.all(np.isfinite(x)) and np.all(np.isfinite(p))):
            raise ValueError("pool arrays do not fit this package's embeddings")
        keep = slice(len(x) - min(len(x), size), len(x))
        pool.n = len(x[keep])
        pool.x[: pool.n], pool.p[: pool.n] = x[keep], p[keep]
        return pool


def describe(summary: dict) -> str:
    """One line of what a camera learned (``CameraModel.summary``), for the CLI and ``watch``."""
    n = sum(summary["labels"].values())
    if summary["level"] == "shared":
        return f"camera: the fleet's head as it is ({n} labels so far)"
    top = sorted(summary["prior"].items(), key=lambda kv: -kv[1])[:3]
    mix = ", ".join(f"{c} {p:.0%}" for c, p in top)
    what = "its own head (trained on its labels)" if summary["level"] == "personal" else f"{summary['level']} on the fleet's head"
    return f"camera: {what} from {n} labels (mix mostly {mix})"


def guard_due(n_labels: int) -> bool:
    """When the guard's cross-validation runs again: often while labels are few (each one moves the
    verdict), then every 10th label; in between only the prior is refitted (~0.1 ms)."""
    return n_labels >= 1 and (n_labels <= 12 or n_labels in (15, 20, 25, 30, 40, 50) or n_labels % 10 == 0)


class CameraModel:
    """One camera's own part: its unlabelled frames, its label counts and the guarded adaptation that
    the device applies on top of the fleet's head. Numpy only; saved with the device state.

        cam = CameraModel(n_classes=7, dim=64)
        cam.observe(embedding, head.predict_proba(embedding[None])[0])  # every predicted frame with a face
        cam.labelled(embedding, y, head, learner.kept)  # every caregiver label (kept: the labelled embeddings)
        probs = cam.apply(head.predict_proba(x), x)
    """

    def __init__(self, n_classes: int, dim: int, settings: PersonalSettings = PersonalSettings(), pool_size: int = 256,
                 refresh_every: int = 32):
        self.settings = settings
        self.ref = np.full(n_classes, 1.0 / n_classes)
        self.pool = FramePool(dim, pool_size, n_classes)
        self.counts = np.zeros(n_classes, np.int64)  # every label the caregiver gave, per class
        self.recent = np.zeros(n_classes)  # the same, older ones faded (``count_horizon``): the class mix now
        self.adaptation = Adaptation.none(self.ref)
        self.refresh_every = refresh_every
        self._since = 0  # frames observed since the prior was last re-estimated

    @property
    def n_labels(self) -> int:
        return int(self.counts.sum())

    def observe(self, x: np.ndarray, probs: np.ndarray) -> None:
        """A frame the camera saw and the head's probabilities for it (the ones predict computed): into
        the pool; every ``refresh_every`` frames the prior is re-estimated from the stored probabilities."""
        self.pool.add(x, probs)
        self._since += 1
        if self._since >= self.refresh_every:
            self._refit_prior()

    def _refit_prior(self) -> None:
        """Only the prior, warm-started from the stored frame probabilities and the label counts (~0.1 ms):
        what a frame or a label between two guard runs changes."""
        self._since = 0
        a = self.adaptation
        if a.level in ("shared", "personal"):
            return  # no labels yet, or the guard said no (frames alone do not overrule it); a personal head has no prior
        prior = em_prior(self.pool.probs(), self.recent, self.ref, self.settings.pseudo_count, self.settings.em_iterations,
                         tol=1e-4, start=a.prior, frame_weight=a.frame_weight)
        self.adaptation = Adaptation(prior, a.bias, a.level, a.residual, a.frame_weight)

    def refresh(self, head, kept: tuple[np.ndarray, np.ndarray]) -> None:
        """Refit the chosen level on ``head`` (a new fleet head, or a new extractor's re-embedded labels)
        and the ``kept`` labelled embeddings."""
        self._since = 0
        a = self.adaptation
        if a.level == "shared":
            return
        kx, ky = kept
        frames = self.pool.reprobe(head)
        self.adaptation = adapt(frames, head.predict_proba(kx) if len(ky) else frames[:0], ky, self.ref,
                                Candidate(a.level, a.frame_weight), self.settings, kx, self.recent, head)

    def labelled(self, x: np.ndarray, y: int, head, kept: Callable[[], tuple[np.ndarray, np.ndarray]]) -> None:
        """A caregiver's label of frame ``x``: counted, out of the pool, and the adaptation re-judged by the
        guard when due (``guard_due``), else only its prior updated from the stored frame probabilities
        (``kept()``: the labelled embeddings the device keeps, this one included)."""
        self.pool.discard(x)
        self.counts[int(y)] += 1
        if self.settings.count_horizon > 0:
            self.recent *= np.exp(-1.0 / self.settings.count_horizon)
        self.recent[int(y)] += 1.0
        if not guard_due(self.n_labels):
            self._refit_prior()
            return
        kx, ky = kept()
        frames = self.pool.reprobe(head)
        self.adaptation = choose(frames, head.predict_proba(kx) if len(ky) else frames[:0], ky, self.ref, self.settings,
                                 kx, self.recent, head, self.settings.residual)

    def apply(self, probs: np.ndarray, x: np.ndarray | None = None) -> np.ndarray:
        return self.adaptation.apply(probs, self.ref, x)

    def summary(self, classes: tuple[str, ...]) -> dict:
        """What the camera has learned, for status, the caregiver page and ``watch``."""
        a = self.adaptation
        mix = a.prior if a.level not in ("shared", "personal") else (self.recent + 1.0) / (self.recent.sum() + len(self.ref))
        return {"level": a.level, "labels": {c: int(n) for c, n in zip(classes, self.counts)},
                "prior": {c: round(float(p), 4) for c, p in zip(classes, mix)},
                "frames": len(self.pool)}

    # ------------------------------------------------------------ state
    def to_arrays(self) -> dict[str, np.ndarray]:
        a = self.adaptation
        arrays = {**self.pool.to_arrays(), "personal_counts": self.counts.copy(), "personal_recent": self.recent.copy(),
                  "personal_prior": a.prior.copy(),
                  "personal_bias": a.bias.copy(), "personal_level": np.array(LEVELS.index(a.level), np.int64),
                  "personal_frame_weight": np.array(a.frame_weight, np.float64)}
        if a.head is not None:
            arrays["personal_head_npz"] = np.frombuffer(a.head.to_bytes(), np.uint8)
        if a.residual is not None:
            arrays["personal_residual"] = a.residual.copy()
        return arrays

    def load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        """Restore from a snapshot; a snapshot without these arrays (older devices) leaves a fresh camera."""
        if "personal_counts" not in arrays:
            return
        k, dim = len(self.ref), self.pool.x.shape[1]
        counts = np.asarray(arrays["personal_counts"], np.int64)
        prior = np.asarray(arrays["personal_prior"], np.float64)
        bias = np.asarray(arrays["personal_bias"], np.float64)
        level = int(np.asarray(arrays["personal_level"]))
        residual = np.asarray(arrays["personal_residual"], np.float64) if "personal_residual" in arrays else None
        if counts.shape != (k,) or prior.shape != (k,) or bias.shape != (k,) or not 0 <= level < len(LEVELS) or \
                counts.min() < 0 or not (np.all(np.isfinite(prior)) and np.all(np.isfinite(bias))) or prior.min() < 0 or \
                (residual is not None and (residual.shape != (dim, k) or not np.all(np.isfinite(residual)))):
            raise ValueError("personal arrays do not fit this package's classes or embeddings")
        self.pool = FramePool.from_arrays(arrays, dim, len(self.pool.x), k)
        self.counts = counts
        recent = np.asarray(arrays.get("personal_recent", counts), np.float64)
        self.recent = recent if recent.shape == (k,) and np.all(np.isfinite(recent)) and recent.min() >= 0 else counts.astype(np.float64)
        weight = float(np.asarray(arrays.get("personal_frame_weight", 0.0)))
        head = None
        if LEVELS[level] == "personal":
            from .core.head import HeadFormatError, OnlineHead

            try:
                head = OnlineHead.from_bytes(np.asarray(arrays["personal_head_npz"], np.uint8).tobytes())
            except (KeyError, HeadFormatError) as exc:
                raise ValueError(f"personal head: {exc}") from exc
            if len(head.classes) != k or head.input_dim != dim:
                raise ValueError("personal head does not fit this package's classes or embeddings")
        self.adaptation = Adaptation(prior / max(prior.sum(), EPS), bias, LEVELS[level], residual,
                                     weight if np.isfinite(weight) and weight >= 0 else 0.0, head)

    def carried_to(self, n_classes: int, dim: int) -> "CameraModel | None":
        """This camera's part for a package with another extractor: the label counts and the class mix
        travel (they are about the baby, not the model), the frames and the head-specific bias do not;
        None when the classes differ."""
        if n_classes != len(self.ref):
            return None
        cam = CameraModel(n_classes, dim, self.settings, len(self.pool.x), self.refresh_every)
        cam.counts, cam.recent = self.counts.copy(), self.recent.copy()
        a = self.adaptation
        if a.level not in ("shared", "personal"):  # a personal head belongs to the old extractor: relearned at the next guard run
            cam.adaptation = Adaptation(a.prior.copy(), np.zeros(n_classes), "prior", None, a.frame_weight)
        return cam

    def forget_frames(self) -> None:
        """A new extractor: the pool's embeddings mean nothing to it (the prior and the counts stay)."""
        self.pool = FramePool(self.pool.x.shape[1], len(self.pool.x), len(self.ref))
        a = self.adaptation
        if a.residual is not None or a.head is not None:  # both read embeddings of the old extractor
            self.adaptation = Adaptation(a.prior, a.bias, "prior+bias", None, a.frame_weight) if a.head is None \
                else Adaptation.none(self.ref)
