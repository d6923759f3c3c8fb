"""Streaming evaluation: does the device get better on infants without forgetting adults?

Test sets are embedded once (the extractor never changes on a device); the stream is
fed one image at a time, in a seeded shuffled order, through ``predict`` then ``learn``
with its folder label playing the caregiver. The head is scored on every test set
before, after, and at points along the stream. Everything runs on a ``Device`` opened
on a throw-away state folder by the caller; nothing here writes to a package or a state.

matplotlib is imported only by ``plot_curve`` and is optional (not in the edge extra).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .device import Device
from .core.imagefolder import list_image_folder
from .core.metrics import summarize
from .package_runtime import PackageRuntime
from .core.preprocess import ImageError


@dataclass
class EmbeddedSet:
    """A labelled folder, embedded once."""

    path: str
    embeddings: np.ndarray  # (N, D)
    labels: np.ndarray  # (N,)
    face_found: np.ndarray  # (N,) bool
    skipped: list[str]
    face_detect: bool


def embed_folder(device: Device | PackageRuntime, folder: str | Path, detect: bool = True, batch: int = 64) -> EmbeddedSet:
    """Embed every readable image of an ImageFolder tree; unreadable ones are listed, not fatal (a
    ``Device`` or, without any state, the ``PackageRuntime`` of a package: the gates)."""
    return embed_items(device, list_image_folder(folder), str(folder), detect, batch)


def embed_items(device: Device | PackageRuntime, items: list[tuple[Path, int]], name: str = "", detect: bool = True,
                batch: int = 64) -> EmbeddedSet:
    """Embed labelled (path, class index) pairs, extractor in batches; unreadable ones are listed, not fatal."""
    tensors, labels, faces, skipped = [], [], [], []
    for path, label in items:
        try:
            prep = device.prepare(path, detect=detect)
        except ImageError as exc:
            skipped.append(str(exc))
            continue
        tensors.append(prep.tensor)
        labels.append(label)
        faces.append(prep.face_found)
    emb = [device.extractor(np.concatenate(tensors[i : i + batch])) for i in range(0, len(tensors), batch)]
    dim = device.dim
    return EmbeddedSet(name, np.concatenate(emb) if emb else np.zeros((0, dim), np.float32),
                       np.asarray(labels, np.int64), np.asarray(faces, bool), skipped, detect)


def score(device: Device, data: EmbeddedSet) -> dict:
    """Accuracy, macro-F1, per-class recall and confusion of the device's current head."""
    if not len(data.labels):
        return summarize(np.zeros(0, int), np.zeros(0, int), len(device.classes))
    pred = device.head.predict_proba(data.embeddings).argmax(axis=1)
    return summarize(data.labels, pred, len(device.classes))


def _accuracy_on(device: Device, embeddings: list[np.ndarray], labels: list[int]) -> float:
    """The head's accuracy on stream frames it has learned: falls later if it forgets them."""
    return float(np.mean(device.head.predict_proba(np.stack(embeddings)).argmax(axis=1) == np.asarray(labels)))


def _percentiles(ms: list[float]) -> tuple[float | None, float | None]:
    if not ms:
        return None, None
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 95))


def static_report(device: Device, tests: list[EmbeddedSet]) -> dict:
    """Scores of the head as it is (no stream)."""
    out = []
    for t in tests:
        s = score(device, t)
        out.append({"path": t.path, "n": s["n"], "skipped": len(t.skipped), "face_detect": t.face_detect,
                    "face_found": float(t.face_found.mean()) if len(t.face_found) else None,
                    "accuracy": s["accuracy"], "macro_f1": s["macro_f1"], "per_class_recall": s["per_class_recall"]})
    return {"tests": out}


@dataclass
class _StreamRecord:
    """What feeding the stream measured, one entry per image that could be read."""

    predict_ms: list[float] = field(default_factory=list)
    learn_ms: list[float] = field(default_factory=list)
    correct: list[bool] = field(default_factory=list)
    true: list[int] = field(default_factory=list)
    pred: list[int] = field(default_factory=list)
    embeddings: list[np.ndarray] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def feed(self, device: Device, path, label: int) -> bool:
        """Predict, then learn the true label; False (and listed) when the image cannot be read."""
        try:
            t0 = time.perf_counter()
            pred = device.predict(path, enqueue=False)
            t1 = time.perf_counter()
            device.learn(path, label, save=False)
            t2 = time.perf_counter()
        except ImageError as exc:
            self.skipped.append(str(exc))
            return False
        self.predict_ms.append((t1 - t0) * 1e3)
        self.learn_ms.append((t2 - t1) * 1e3)
        self.correct.append(pred.index == label)
        self.true.append(label)
        self.pred.append(pred.index)
        self.embeddings.append(pred.embedding)
        return True


def _curve_point(device: Device, tests: list[EmbeddedSet], rec: _StreamRecord, n_items: int,
                 log: Callable[[str], None] | None) -> dict:
    point = {"seen": len(rec.correct), "accuracy": [score(device, t)["accuracy"] for t in tests],
             "prequential_accuracy": float(np.mean(rec.correct))}
    if log:
        accs = ", ".join(f"{a:.3f}" for a in point["accuracy"])
        log(f"  {len(rec.correct):4d}/{n_items} seen: test accuracy {accs}; running stream accuracy {np.mean(rec.correct):.3f}")
    return point


def _test_rows(tests: list[EmbeddedSet], before: list[dict], after: list[dict]) -> list[dict]:
    return [{"path": t.path, "n": b["n"], "skipped": len(t.skipped), "face_detect": t.face_detect,
             "face_found": float(t.face_found.mean()) if len(t.face_found) else None,
             "accuracy_before": b["accuracy"], "accuracy_after": a["accuracy"],
             "macro_f1_before": b["macro_f1"], "macro_f1_after": a["macro_f1"],
             "per_class_recall_before": b["per_class_recall"], "per_class_recall_after": a["per_class_recall"],
             "confusion_after": a["confusion"]} for t, b, a in zip(tests, before, after)]


def stream_report(device: Device, stream: str | Path, tests: list[EmbeddedSet], seed: int = 0, curve_points: int = 20,
                  log: Callable[[str], None] | None = None) -> dict:
    """Feed ``stream`` through predict + learn; scores before, along and after; timings."""
    items = list_image_folder(stream)
    order = np.random.default_rng(seed).permutation(len(items))
    before = [score(device, t) for t in tests]
    every = max(1, len(items) // max(1, curve_points))
    curve = [{"seen": 0, "accuracy": [b["accuracy"] for b in before], "prequential_accuracy": None}]
    rec = _StreamRecord()
    half, retention_mid, n_first = len(items) // 2, None, 0
    rollbacks0 = device.counters["rollbacks"]
    for k, i in enumerate(order, start=1):
        if not rec.feed(device, *items[i]):
            continue
        if k == half:  # how well the first half's labels are known now, and (below) at the end
            retention_mid = _accuracy_on(device, rec.embeddings, rec.true)
            n_first = len(rec.embeddings)
        if k % every == 0 or k == len(order):
            curve.append(_curve_point(device, tests, rec, len(items), log))
    t0 = time.perf_counter()
    device.save()
    save_ms = (time.perf_counter() - t0) * 1e3
    rows = _test_rows(tests, before, [score(device, t) for t in tests])
    p50, p95 = _percentiles(rec.predict_ms)
    l50, l95 = _percentiles(rec.learn_ms)
    prequential = summarize(np.asarray(rec.true, int), np.asarray(rec.pred, int), len(device.classes))
    retention_end = _accuracy_on(device, rec.embeddings[:n_first], rec.true[:n_first]) if retention_mid is not None else None
    return {
        "tests": rows,
        "stream": {"path": str(stream), "n": len(rec.correct), "skipped": len(rec.skipped), "seed": seed,
                   "prequential_accuracy": prequential["accuracy"], "prequential_per_class_recall": prequential["per_class_recall"],
                   "updates": device.counters["updates"], "rollbacks": device.counters["rollbacks"] - rollbacks0,
                   "held_out": device.counters["held_out"],
                   "first_half_accuracy_at_half": retention_mid, "first_half_accuracy_at_end": retention_end},
        "curve": curve,
        "predict_ms_p50": p50, "predict_ms_p95": p95, "learn_ms_p50": l50, "learn_ms_p95": l95, "save_ms": save_ms,
    }


def plot_curve(report: dict, out: str | Path) -> bool:
    """Accuracy of each test set along the stream as a PNG; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    curve = report.get("curve") or []
    if not curve:
        return False
    seen = [c["seen"] for c in curve]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for j, test in enumerate(report["tests"]):
        name = "/".join(Path(test["path"]).parts[-2:])
        ax.plot(seen, [c["accuracy"][j] for c in curve], marker="o", ms=3, label=f"{name} (n={test['n']})")
    pre = [(c["seen"], c["prequential_accuracy"]) for c in curve if c["prequential_accuracy"] is not None]
    if pre:
        ax.plot(*zip(*pre), ls="--", color="grey", label="stream, predicted before learning")
    ax.set_xlabel("caregiver labels learned")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Accuracy along the labelled stream")
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return True
