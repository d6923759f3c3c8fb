"""``DeviceConfig``: the settings of one device (the learning defaults were chosen by measurement,
docs/edge.md). Plain settings, numpy-free imports: the learner reads them (where a device finds
its package and state folder by default is ``paths``)."""
from __future__ import annotations

from dataclasses import dataclass

from .core.extractor import DEFAULT_THREADS
from .core.uncertainty import DEFAULT_THRESHOLD

DEFAULT_MAX_ITEMS = 200  # frames the annotation queue keeps for the caregiver (``AnnotationQueue``)


@dataclass(frozen=True)
class DeviceConfig:
    """Settings of one device; the learning defaults were chosen by measurement (docs/edge.md)."""

    threads: int = DEFAULT_THREADS  # ONNX Runtime intra-op threads
    precision: str = "auto"  # "int8", "fp32", or "auto" (int8 when the package has it)
    detect_faces: bool = True
    detect_max_side: int | None = None  # Haar runs on a copy this size; None: the manifest's (320)
    detect_coarse_side: int | None = 160  # look for a face at this size first, then at detect_max_side; None: one pass
    uncertainty_threshold: float = DEFAULT_THRESHOLD  # frames scoring >= this are queued
    queue_max: int = DEFAULT_MAX_ITEMS
    queue_min_interval_s: float = 0.0  # a camera loop should set e.g. 10: one queued frame per interval at most
    replay_per_class: int = 32  # reservoir slots per class
    replay_mix: int = 8  # replayed caregiver labels in each update
    source_mix: int = 16  # replayed source-domain (adult FER) embeddings per update, when the package has them
    replay_seed: str | None = None  # npz of source-domain embeddings (x, y); default: the package's replay_seed role
    anchor_strength: float | None = None  # L2-SP pull toward the starting head; None: 1.0 without source replay, else 0
    new_weight: float = 4.0  # weight of the new label against one replayed sample
    learn_steps: int = 1  # Adam steps per update
    learning_rate: float | None = None  # None: the head's own learning_rate_init
    holdout_per_class: int = 3  # labels per class kept back for the guard
    holdout_every: int = 5  # every n-th label goes to the holdout
    guard_min_holdout: int = 7  # the guard judges once it holds this many labels
    guard_tolerance: float = 0.05  # holdout mean log-loss rise that counts as "clearly worse"
    cache_size: int = 16  # recent frames whose embedding learn() can reuse
    autosave: bool = True  # save the state after every learn
    keep_generations: int = 3
    share_crops: bool | None = None  # consent to upload labelled face crops at sync; None: as recorded in the state folder (off unless given)
    seed: int = 0
    personalize: bool = True  # the camera's own adaptation on top of the shared head (personal.py)
    personal_on: str = "shared"  # the head under the camera's part: "shared" (the fleet's, as adopted) or "learned"
    # (this device's updated copy of it); a camera whose labels call for its own head gets one (personal.py, "personal")
    frame_pool: int = 256  # unlabelled frames kept as evidence of the camera's class mix
    balance_shared: bool = True  # weigh a label in the shared update against the camera's class mix (learner._balance)

    def __post_init__(self) -> None:
        if self.precision not in ("auto", "int8", "fp32"):
            raise ValueError(f"precision must be auto, int8 or fp32, not {self.precision!r}")
        if self.learn_steps < 1 or min(self.replay_mix, self.source_mix, self.replay_per_class, self.holdout_per_class) < 0:
            raise ValueError("learn_steps must be >= 1 and buffer sizes >= 0")
        if self.personal_on not in ("shared", "learned"):
            raise ValueError(f"personal_on must be shared or learned, not {self.personal_on!r}")
        if not 0.0 <= self.uncertainty_threshold <= 1.0:
            raise ValueError("uncertainty_threshold must be in [0, 1]")

