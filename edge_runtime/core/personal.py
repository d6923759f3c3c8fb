"""A camera's own adaptation on top of the fleet's head: pure numpy math, no I/O.

What is really one camera's own is its class mix (one baby's days: mostly sleepy-neutral, or
a colicky month of crying) and a systematic lean of the shared head under its light and
angle. Both are a handful of numbers, so a few labels estimate them well, where updating a
64-64-7 MLP on the same labels mostly relearns what the extractor already knows (measured:
``bench/personalization.py``, docs/personalization.md). The camera's predictions are

    p_cam(y | x)  ∝  p_head(y | x) * prior(y) / ref(y) * exp(bias(y))

* ``prior``: the camera's class mix, estimated by semi-supervised EM (Saerens et al. 2002):
  the caregiver's labels count as known, the camera's unlabelled frames as the head's
  prior-corrected posteriors, with a Dirichlet pseudo-count toward ``ref`` (the head's
  training mix) so that a few frames cannot swing it far.
* ``bias``: a per-class logit offset fit on the labels (L2-penalised Newton steps on a
  7-parameter convex loss): the head's systematic lean on this camera (bias-corrected
  calibration, Alexandari et al. 2020, with the camera's labels as the calibration set).
* ``personal``: instead of both, the camera's own head (Ditto, Li et al. 2021): a copy of the
  shared head trained on its labels with an L2 pull toward the shared weights.
* the guard: a candidate is used only when K-fold cross-validation on the camera's own labels
  says it clearly beats the shared head there (``choose``, ``pick_paired``); otherwise the
  camera predicts with the shared head unchanged. The state around this math is ``camera.py``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .mlp import softmax

EPS = 1e-12
# what a camera may use: the shared head as it is, with a prior, with a prior and a bias, with a residual
# layer (off by default), or its own personal head (Ditto: a copy trained on its labels, pulled toward the shared one)
LEVELS = ("shared", "prior", "prior+bias", "prior+bias+residual", "personal")


@dataclass(frozen=True)
class PersonalSettings:
    """The adaptation's knobs; defaults chosen by ``bench/personalization.py`` (docs/personalization.md)."""

    pseudo_count: float = 2.0  # Dirichlet pull of the prior toward ``ref`` (in labels)
    frame_weights: tuple[float, ...] = (0.0, 0.25, 1.0)  # what one unlabelled frame counts against one label (the guard picks)
    count_horizon: float = 200.0  # labels: older labels fade from the class mix with this time constant (a baby changes)
    em_iterations: int = 30
    bias_l2: float = 0.05  # L2 on the per-class logit bias
    bias_min_labels: int = 10  # fewer labels than this: no bias
    guard_folds: int = 5
    guard_min_labels: int = 6  # fewer labels than this: the fleet's head alone
    guard_margin: float = 0.0  # log-loss gain a candidate must show over the best before it ("log_loss" / "both" metrics)
    guard_metric: str = "paired"  # "paired", "log_loss", "accuracy" or "both": how cross-validation on the labels decides
    guard_z: float = 1.0  # "paired": the gain over the shared head must be this many standard errors
    residual_l2: float = 1.0  # L2 on the personal linear correction (per embedding dimension)
    residual_steps: int = 60
    residual_min_labels: int = 20
    residual: bool = False  # offer the residual to the guard (measured: no gain, a risk with noisy labels)
    personal_epochs: int = 30  # full-batch Adam steps of the personal head on the camera's kept labels
    personal_lr: float = 1e-2  # their learning rate (as good as 30 steps at 1e-3 on infants, and it can fix a plainly wrong head)
    personal_strength: float = 1.0  # its L2 pull toward the shared head (Ditto's lambda)
    personal_min_labels: int = 10


@dataclass(frozen=True)
class Adaptation:
    """What the camera adds to the shared head's log-probabilities: ``log(prior / ref) + bias``."""

    prior: np.ndarray  # (K,) the camera's class mix
    bias: np.ndarray  # (K,) logit offsets
    level: str  # one of LEVELS: what the guard let through
    residual: np.ndarray | None = None  # (D, K) personal linear correction of the logits, or None
    frame_weight: float = 0.0  # what an unlabelled frame counted for in ``prior``
    head: object | None = None  # the personal head (an ``OnlineHead``) for level "personal"

    @classmethod
    def none(cls, ref: np.ndarray) -> "Adaptation":
        return cls(np.asarray(ref, np.float64), np.zeros(len(ref)), "shared")

    def offset(self, ref: np.ndarray) -> np.ndarray:
        """The log-space offset added to every frame's shared log-probabilities."""
        if self.level in ("shared", "personal"):
            return np.zeros(len(ref))
        off = np.log(np.maximum(self.prior, EPS)) - np.log(np.maximum(ref, EPS))
        return off + (0.0 if self.level == "prior" else self.bias)

    def apply(self, probs: np.ndarray, ref: np.ndarray, x: np.ndarray | None = None) -> np.ndarray:
        """The camera's probabilities from the shared head's (N, K) (and the embeddings ``x`` (N, D)
        when the adaptation holds a residual or a personal head)."""
        if self.head is not None and x is not None:
            return self.head.predict_proba(np.asarray(x, np.float32).reshape(len(probs), -1))
        off = self.offset(ref)
        if self.residual is not None and x is not None:
            off = off + np.asarray(x, np.float64) @ self.residual
        return reweight(probs, off)


def reweight(probs: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """``probs * exp(offset)``, renormalised per row (float32 in, float32 out)."""
    offset = np.asarray(offset, np.float64)
    q = np.asarray(probs, np.float64) * np.exp(offset - offset.max(axis=-1, keepdims=True))
    return (q / np.maximum(q.sum(axis=-1, keepdims=True), EPS)).astype(np.float32)


def em_prior(probs: np.ndarray, counts: np.ndarray, ref: np.ndarray, pseudo_count: float, iterations: int = 30,
             tol: float = 1e-5, start: np.ndarray | None = None, frame_weight: float = 1.0) -> np.ndarray:
    """The class mix of a camera: EM over its unlabelled frames' shared-head probabilities
    ``probs`` (N, K), with ``counts`` (K,) labelled frames as known and ``pseudo_count``
    labels' worth of ``ref`` as the Dirichlet prior; one frame counts ``frame_weight`` labels (a
    head's posteriors on a new domain are not labels). ``start``: a previous estimate (warm start).

    The E-step's posteriors are ``p_i * w / (p_i . w)`` with ``w = prior / ref``, so one
    iteration is two matrix-vector products."""
    ref = np.asarray(ref, np.float64)
    counts = np.asarray(counts, np.float64)
    p = np.asarray(probs, np.float64).reshape(-1, len(ref))
    if frame_weight <= 0:
        p = p[:0]
    total = frame_weight * len(p) + counts.sum() + pseudo_count
    if total <= 0:
        return ref.copy()
    base = counts + pseudo_count * ref
    prior = (base + frame_weight * p.sum(axis=0)) / total if start is None else np.asarray(start, np.float64)
    for _ in range(iterations if len(p) else 0):
        w = prior / np.maximum(ref, EPS)
        new = (base + frame_weight * w * (p.T @ (1.0 / np.maximum(p @ w, EPS)))) / total
        done = np.abs(new - prior).max() < tol
        prior = new
        if done:
            break
    if not len(p):
        prior = base / total
    return prior / prior.sum()


def _onehot(y: np.ndarray, n: int, k: int) -> np.ndarray:
    out = np.zeros((n, k))
    out[np.arange(n), y] = 1.0
    return out


def label_losses(probs: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Each labelled frame's cross-entropy under ``probs`` (N, K), clipped at ``EPS``."""
    return -np.log(np.maximum(probs[np.arange(len(y)), y], EPS))


def fit_bias(log_probs: np.ndarray, y: np.ndarray, l2: float, steps: int = 6) -> np.ndarray:
    """Per-class logit offsets minimising mean cross-entropy + ``l2``/2 ||b||² on labelled frames
    whose (prior-corrected) log-probabilities are ``log_probs`` (N, K): a convex problem in K
    numbers, a few damped Newton steps."""
    z = np.asarray(log_probs, np.float64)
    n, k = z.shape
    b = np.zeros(k)
    if n == 0:
        return b
    onehot = _onehot(y, n, k)
    for _ in range(steps):
        p = softmax(z + b)
        grad = (p - onehot).mean(axis=0) + l2 * b
        hess = (np.diag(p.sum(axis=0)) - p.T @ p) / n + l2 * np.eye(k)
        b -= np.linalg.solve(hess, grad)
    return b - b.mean()


def fit_residual(log_probs: np.ndarray, x: np.ndarray, y: np.ndarray, l2: float, steps: int) -> np.ndarray:
    """A personal linear correction W (D, K) of the logits, ``log_probs + x @ W``, by gradient descent on
    mean cross-entropy + ``l2``/2 ||W||² (a FedRep-style personal layer, kept small by the L2)."""
    z = np.asarray(log_probs, np.float64)
    x = np.asarray(x, np.float64)
    n, k = z.shape
    w = np.zeros((x.shape[1], k))
    onehot = _onehot(y, n, k)
    lr = 1.0 / (np.mean(np.sum(x * x, axis=1)) / 2 + l2)  # 1/L for the softmax loss (Hessian <= ||x||^2 / 2)
    for _ in range(steps):
        p = softmax(z + x @ w)
        w -= lr * (x.T @ (p - onehot) / n + l2 * w)
    return w


def mean_log_loss(probs: np.ndarray, y: np.ndarray) -> float:
    return float(label_losses(probs, y).mean()) if len(y) else 0.0


@dataclass(frozen=True)
class Candidate:
    """One adaptation the guard may choose: a level and what an unlabelled frame counts for."""

    level: str
    frame_weight: float = 0.0


def candidates(s: PersonalSettings, with_residual: bool, with_personal: bool) -> list[Candidate]:
    """Simplest first (the guard breaks ties toward the front): the shared head, each level at each
    frame weight, then the personal head."""
    levels = [lvl for lvl in LEVELS[1:-1] if with_residual or not lvl.endswith("residual")]
    return [Candidate("shared")] + [Candidate(lvl, w) for lvl in levels for w in s.frame_weights] + \
        ([Candidate("personal")] if with_personal else [])


def fit_personal_head(shared, x: np.ndarray, y: np.ndarray, s: PersonalSettings):
    """Ditto (Li et al. 2021): a copy of the shared head trained on the camera's labels, full batch,
    with an L2 pull toward the shared weights; the shared head itself is not touched."""
    head = shared.copy()
    anchor = [w.copy() for w in shared.weights()]
    for _ in range(s.personal_epochs):
        head.learn_step(np.asarray(x, np.float32), np.asarray(y, np.int64), anchor=anchor, anchor_strength=s.personal_strength,
                        learning_rate=s.personal_lr)
    return head


def adapt(frame_probs: np.ndarray, label_probs: np.ndarray, y: np.ndarray, ref: np.ndarray, cand: Candidate,
          s: PersonalSettings, label_x: np.ndarray | None = None, counts: np.ndarray | None = None,
          shared=None) -> Adaptation:
    """The adaptation ``cand`` from unlabelled frames and labelled ones (shared-head probabilities;
    ``label_x``, the labelled embeddings, for the residual; ``counts``, the camera's label counts
    when ``y`` is only a sample of its labels, as a device keeps them)."""
    if cand.level == "shared":
        return Adaptation.none(ref)
    if cand.level == "personal":
        return Adaptation(np.asarray(ref, np.float64), np.zeros(len(ref)), "personal",
                          head=fit_personal_head(shared, label_x, y, s))
    k = len(ref)
    counts = np.bincount(y, minlength=k).astype(np.float64) if counts is None else np.asarray(counts, np.float64)
    prior = em_prior(frame_probs, counts, ref, s.pseudo_count, s.em_iterations, frame_weight=cand.frame_weight)
    bias = np.zeros(k)
    residual = None
    if cand.level != "prior" and len(y) >= s.bias_min_labels:
        corrected = np.log(np.maximum(reweight(label_probs, np.log(prior / ref)), EPS))
        bias = fit_bias(corrected, y, s.bias_l2)
        if cand.level == "prior+bias+residual" and label_x is not None and len(y) >= s.residual_min_labels:
            residual = fit_residual(corrected + bias, label_x, y, s.residual_l2, s.residual_steps)
    return Adaptation(prior, bias, cand.level, residual, cand.frame_weight)


def cv_losses(frame_probs: np.ndarray, label_probs: np.ndarray, y: np.ndarray, ref: np.ndarray, s: PersonalSettings,
              cands: list[Candidate], label_x: np.ndarray | None = None,
              counts: np.ndarray | None = None, shared=None) -> tuple[np.ndarray, np.ndarray]:
    """Per candidate and label: (log-loss, right or not), every label scored by an adaptation fitted
    without its fold (its frame back in the unlabelled pool, as it was before it was labelled)."""
    n = len(y)
    folds = np.arange(n) % max(2, min(s.guard_folds, n))
    losses = np.zeros((len(cands), n))
    hits = np.zeros((len(cands), n))
    for f in np.unique(folds):
        test = folds == f
        pool = np.concatenate([frame_probs.reshape(-1, len(ref)), label_probs[test]])
        fold_counts = None  # the camera's counts less the held-out fold's share of them
        if counts is not None:
            fold_counts = np.maximum(counts - np.bincount(y[test], minlength=len(ref)) * counts.sum() / n, 0.0)
        for i, cand in enumerate(cands):
            a = adapt(pool, label_probs[~test], y[~test], ref, cand, s, None if label_x is None else label_x[~test],
                      fold_counts, shared)
            p = a.apply(label_probs[test], ref, None if label_x is None else label_x[test])
            losses[i, test] = label_losses(p, y[test])
            hits[i, test] = p.argmax(axis=1) == y[test]
    return losses, hits


def pick_paired(losses: np.ndarray, z: float, hits: np.ndarray | None = None) -> int:
    """The guard's verdict from per-label cross-validated log-losses (candidates x labels): among the
    candidates whose gain over the shared head (row 0) is at least ``z`` standard errors of the paired
    per-label differences (and, given ``hits``, that get no fewer labels right), the one with the
    lowest mean loss; else the shared head. Few labels need a large gain, many labels a consistent
    one: a camera is adapted only when its own labels say clearly."""
    gains = losses[0] - losses
    n = losses.shape[1]
    se = gains.std(axis=1, ddof=1) / np.sqrt(n) if n > 1 else np.full(len(losses), np.inf)
    ok = gains.mean(axis=1) > z * se + 1e-12
    if hits is not None:
        ok &= hits.sum(axis=1) >= hits[0].sum()
    ok[0] = True
    means = np.where(ok, losses.mean(axis=1), np.inf)
    return int(np.argmin(means))


def pick(scores: list[tuple[float, float]], metric: str, margin: float = 0.0) -> int:
    """The guard's verdict: the index of the best cross-validated candidate (index 0, the shared head,
    unless one beats it). "accuracy": more labels right; "log_loss": a lower mean log-loss by more than
    ``margin``; "both": the lowest log-loss among those at least as accurate as the shared head.
    Ties keep the earlier, simpler candidate."""
    best = 0
    for i, (acc, loss) in enumerate(scores[1:], start=1):
        b_acc, b_loss = scores[best]
        if metric == "accuracy":
            better = acc > b_acc + 1e-9
        elif metric == "log_loss":
            better = loss < b_loss - margin
        else:
            better = acc >= scores[0][0] - 1e-9 and loss < b_loss - margin
        if better:
            best = i
    return best


def choose(frame_probs: np.ndarray, label_probs: np.ndarray, y: np.ndarray, ref: np.ndarray,
           s: PersonalSettings = PersonalSettings(), label_x: np.ndarray | None = None,
           counts: np.ndarray | None = None, shared=None, residual: bool = False) -> Adaptation:
    """The guarded adaptation: the candidate that cross-validation on the camera's own labels says is
    best (``pick``); with too few labels to judge, none (a prior from unlabelled frames alone cost a
    uniform-mix camera 2-3 points: docs/personalization.md)."""
    y = np.asarray(y, np.int64)
    if len(y) < s.guard_min_labels:
        return Adaptation.none(ref)
    cands = candidates(s, residual and label_x is not None,
                       shared is not None and label_x is not None and len(y) >= s.personal_min_labels)
    losses, hits = cv_losses(frame_probs, label_probs, y, ref, s, cands, label_x, counts, shared)
    if s.guard_metric == "paired":
        best = pick_paired(losses, s.guard_z, hits)
    else:
        best = pick([(float(h.mean()), float(l.mean())) for h, l in zip(hits, losses)], s.guard_metric, s.guard_margin)
    return adapt(frame_probs, label_probs, y, ref, cands[best], s, label_x, counts, shared)
