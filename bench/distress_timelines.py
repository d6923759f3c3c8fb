"""The pure half of ``bench/distress_alerts.py``: synthetic day-long camera timelines, the watch loop's
``DistressMonitor`` run over a whole day at once, the scoring of its alerts against the episodes, and the
settings grid with the rule that picks from it.

No file is read or written and no model runs here, so the tests can check every piece on made-up frame
codes (the script feeds it the codes of real photos through real packages). A frame code is what the
watch loop hands the monitor: ``NO_FACE`` (no judgement), 0 (not negative) or 1 (negative).
"""
from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, replace
from typing import Iterable, Optional

import numpy as np

from infantino.edge_runtime.core.preprocess import CLASSES
from infantino.edge_runtime.watch.summary import NEGATIVE as NEGATIVE_VALENCE, valence_of
from infantino.edge_runtime.watch.distress import END, START, DistressEvent, DistressMonitor, DistressSettings, frame_negative

# ------------------------------------------------------------------ what a day is made of, and the settings tried
# Episodes are the classes the watch counts as negative valence (watch/summary.py), calm stretches the rest
NEGATIVE = tuple(i for i, v in enumerate(valence_of(CLASSES)) if v == NEGATIVE_VALENCE)
CALM = tuple(i for i in range(len(CLASSES)) if i not in NEGATIVE)
NO_FACE = -1  # frame code: no face found (the monitor's None); 0 not negative, 1 negative
# The monitor's earlier defaults: the table's baseline, and the grid's fixed fields (clear_after_s, min_faces)
OLD = DistressSettings(alert_after_s=60.0, clear_after_s=30.0, window_s=10.0, enter_share=0.6, exit_share=0.3, min_faces=3)
GRID = {"alert_after_s": (20, 30, 40, 45, 50, 60), "window_s": (5, 10, 15, 20, 30, 40),
        "enter_share": (0.5, 0.6, 0.7, 0.8), "exit_share": (0.2, 0.3, 0.4, 0.5)}
QUICK_GRID = {"alert_after_s": (20, 40), "window_s": (10,), "enter_share": (0.6,), "exit_share": (0.3,)}


# ------------------------------------------------------------------ camera frames of a photo, and their codes
def perturb(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A light camera-like change of a photo: framing (up to 6 % cut off), brightness, contrast, sensor noise."""
    h, w = rgb.shape[:2]
    keep = rng.uniform(0.94, 1.0)
    ch, cw = max(8, int(round(h * keep))), max(8, int(round(w * keep)))
    y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    a = rgb[y:y + ch, x:x + cw].astype(np.float32)
    a = (a - a.mean()) * rng.uniform(0.85, 1.15) + a.mean()
    a = a * rng.uniform(0.8, 1.2) + rng.uniform(-12, 12) + rng.normal(0, rng.uniform(1, 6), a.shape)
    return np.clip(np.round(a), 0, 255).astype(np.uint8)


def camera_frames(rgb: np.ndarray, n: int, seed: Iterable[int]) -> list[np.ndarray]:
    """The photo itself, then ``n - 1`` perturbed copies (seeded per photo)."""
    rng = np.random.default_rng(list(seed))
    return [rgb] + [perturb(rgb, rng) for _ in range(n - 1)]


@dataclass
class FrameTable:
    """Per photo and frame variant: class probabilities and whether the pipeline found a face."""
    probs: np.ndarray  # (photos, variants, classes) float32
    found: np.ndarray  # (photos, variants) bool

    def codes(self, classes: tuple[str, ...] = CLASSES) -> np.ndarray:
        """The monitor's input per (photo, variant), through the watch loop's own ``frame_negative``."""
        idx = self.probs.argmax(-1)
        flags = [[frame_negative(classes, int(i), bool(f)) for i, f in zip(row_i, row_f)] for row_i, row_f in zip(idx, self.found)]
        return np.array([[NO_FACE if v is None else int(v) for v in row] for row in flags], np.int8)


# ------------------------------------------------------------------ timelines
@dataclass(frozen=True)
class TimelineSpec:
    """How a day is drawn; every field is a bench option, because each is an assumption about a nursery."""
    seconds: float = 86400.0
    fps: float = 2.0
    hold_s: tuple[float, float] = (2.0, 10.0)  # one photo (expression) held this long
    no_face_share: float = 0.05  # of the holds: no face in view
    episode_s: tuple[float, float] = (30.0, 300.0)  # log-uniform
    gap_s: tuple[float, float] = (300.0, 1500.0)  # calm between episodes: the minimum + an exponential of this mean


@dataclass
class Timeline:
    """A day as which photo (and which of its camera frames) the camera sees at each frame, plus the truth:
    the distress episodes. Kept as indices so that one day serves every pipeline (see ``codes``)."""
    photo: np.ndarray  # (frames,) int32: photo index, or NO_FACE
    variant: np.ndarray  # (frames,) int8
    episodes: np.ndarray  # (episodes, 2) start, end in seconds
    fps: float

    @property
    def t(self) -> np.ndarray:
        """Each frame's time in seconds from the start of the day."""
        return np.arange(len(self.photo)) / self.fps

    def codes(self, table_codes: np.ndarray) -> np.ndarray:
        """The monitor's input per frame: the frame's code in the pipeline's table; no face where none is in view."""
        face = self.photo >= 0
        out = np.full(len(self.photo), NO_FACE, np.int8)
        out[face] = table_codes[self.photo[face], self.variant[face]]
        return out


def holds(ids: np.ndarray, n: int, spec: TimelineSpec, rng: np.random.Generator) -> np.ndarray:
    """``n`` frames of held expressions: a photo of ``ids`` for a few seconds, then another (or no face)."""
    lo, hi = (max(1, int(round(s * spec.fps))) for s in spec.hold_s)
    out: list[np.ndarray] = []
    have = 0
    while have < n:
        m = max(8, (n - have) // ((lo + hi) // 2) + 8)
        photo = rng.choice(ids, m).astype(np.int32)
        photo[rng.random(m) < spec.no_face_share] = NO_FACE
        out.append(np.repeat(photo, rng.integers(lo, hi + 1, m)))
        have += len(out[-1])
    return np.concatenate(out)[:n]


def make_timeline(calm: np.ndarray, negative: np.ndarray, spec: TimelineSpec, n_variants: int, episodes: bool,
                  rng: np.random.Generator) -> Timeline:
    """A day at ``spec.fps``: calm holds, with distress episodes at random times when ``episodes``."""
    n = int(round(spec.seconds * spec.fps))
    photo = holds(calm, n, spec, rng)
    spans = []
    t = 0.0
    while episodes:
        start = t + spec.gap_s[0] + rng.exponential(spec.gap_s[1])
        frames = int(round(np.exp(rng.uniform(*np.log(spec.episode_s))) * spec.fps))
        first = int(round(start * spec.fps))
        if first + frames > n:
            break
        photo[first:first + frames] = holds(negative, frames, spec, rng)
        spans.append((first / spec.fps, (first + frames) / spec.fps))
        t = (first + frames) / spec.fps
    return Timeline(photo, rng.integers(0, n_variants, n).astype(np.int8), np.array(spans, float).reshape(-1, 2), spec.fps)


# ------------------------------------------------------------------ the monitor, vectorised
def _next_true(mask: np.ndarray) -> np.ndarray:
    """For each i the first j >= i with mask[j]; len(mask) when none (one extra slot, so index n is safe)."""
    n = len(mask)
    idx = np.append(np.where(mask, np.arange(n), n), n)
    return np.minimum.accumulate(idx[::-1])[::-1]


def _first_reach(t: np.ndarray, i: int, span: float) -> int:
    """The first j >= i with ``t[j] - t[i] >= span`` (the monitor's own float expression); len(t) when none."""
    j = max(i, int(np.searchsorted(t, t[i] + span, "left")))
    while j > i and t[j - 1] - t[i] >= span:
        j -= 1
    while j < len(t) and t[j] - t[i] < span:
        j += 1
    return j


class FastMonitor:
    """``DistressMonitor`` over a whole timeline at once: the same events (kind, t, since, share), from
    prefix sums and jumps between threshold crossings; shares and crossings are cached across settings."""

    def __init__(self, t: np.ndarray, codes: np.ndarray):
        self.t, self.codes = np.asarray(t, float), np.asarray(codes, np.int8)
        self._cache: dict[tuple, np.ndarray] = {}

    def clear(self) -> None:
        """Forget the cached shares and crossings (memory; they come back on use)."""
        self._cache.clear()

    def share(self, window_s: float, min_faces: int) -> np.ndarray:
        """Negative share of the faces in the trailing window (NaN: fewer than ``min_faces``)."""
        key = ("share", window_s, min_faces)
        if key not in self._cache:
            face, neg = np.cumsum(self.codes >= 0), np.cumsum(self.codes == 1)
            face, neg = np.insert(face, 0, 0), np.insert(neg, 0, 0)
            lo = np.searchsorted(self.t, self.t - window_s, side="right")  # frames at or before t - window have left
            n, k = face[1:] - face[lo], neg[1:] - neg[lo]
            self._cache[key] = np.where(n >= min_faces, k / np.maximum(n, 1), np.nan)
        return self._cache[key]

    def _next(self, s: DistressSettings, what: str, level: float) -> np.ndarray:
        """Per frame, the next frame where the share is ``what`` (high, low, not_low) against ``level``."""
        key = (what, s.window_s, s.min_faces, level)
        if key not in self._cache:
            share = self.share(s.window_s, s.min_faces)
            high, low = share >= level, np.isnan(share) | (share < level)
            self._cache[key] = _next_true({"high": high, "low": low, "not_low": ~low}[what]).astype(np.int32)
        return self._cache[key]

    def events(self, s: DistressSettings) -> list[DistressEvent]:
        """The monitor's events at settings ``s``: jump from crossing to crossing instead of stepping each frame."""
        t, n = self.t, len(self.t)
        share = self.share(s.window_s, s.min_faces)
        next_high, next_low, next_not_low = (self._next(s, "high", s.enter_share), self._next(s, "low", s.exit_share),
                                             self._next(s, "not_low", s.exit_share))
        out: list[DistressEvent] = []
        i = 0
        while i < n:
            rise = next_high[i]  # calm: rising from the first frame at or above enter_share...
            if rise >= n:
                break
            drop = next_low[rise]  # ...until the share falls below exit_share (or no judgement)
            j = _first_reach(t, rise, s.alert_after_s)
            if j >= drop:
                i = drop
                continue
            out.append(DistressEvent(START, float(t[j]), float(t[rise]), float(share[j])))
            i = j + 1
            while i < n:  # alert: ends after clear_after_s below exit_share
                calm = next_low[i]
                if calm >= n:
                    return out
                k = _first_reach(t, calm, s.clear_after_s)
                if k < next_not_low[calm]:
                    out.append(DistressEvent(END, float(t[k]), float(t[rise]), None if np.isnan(share[k]) else float(share[k])))
                    i = k + 1
                    break
                i = next_not_low[calm]
        return out


Day = tuple[int, FastMonitor, np.ndarray, FastMonitor]  # (fold, mixed-day monitor, its episodes, calm-day monitor)


def fold_days(k: int, seed: int, calm: np.ndarray, negative: np.ndarray, spec: TimelineSpec, n_variants: int,
              codes: dict[str, np.ndarray]) -> tuple[dict[str, Day], Timeline]:
    """Seed ``seed``'s mixed and calm day of fold ``k``, as each pipeline's monitors (``codes``: its frame codes per
    photo and variant): one draw of the frames for every pipeline, so they are compared on the same day."""
    mixed = make_timeline(calm, negative, spec, n_variants, True, np.random.default_rng([seed, k, 0]))
    quiet = make_timeline(calm, negative, spec, n_variants, False, np.random.default_rng([seed, k, 1]))
    return {p: (k, FastMonitor(mixed.t, mixed.codes(c)), mixed.episodes, FastMonitor(quiet.t, quiet.codes(c)))
            for p, c in codes.items()}, mixed


def monitor_events(t: np.ndarray, codes: np.ndarray, s: DistressSettings) -> list[DistressEvent]:
    """The reference: ``DistressMonitor`` fed frame by frame, as the watch loop feeds it."""
    m = DistressMonitor(s)
    flags = [None if c == NO_FACE else bool(c) for c in codes.tolist()]
    return [e for e in (m.update(float(ti), f) for ti, f in zip(t.tolist(), flags)) if e is not None]


def check_reference(day: Day, s: DistressSettings) -> int:
    """The vectorised monitor against ``DistressMonitor`` itself on a whole mixed day: every event identical."""
    fast = day[1]
    ref = monitor_events(fast.t, fast.codes, s)
    if ref != fast.events(s):
        raise AssertionError("FastMonitor and DistressMonitor disagree on a timeline")
    return len(ref)


# ------------------------------------------------------------------ scoring
def score_day(starts: np.ndarray, episodes: np.ndarray, grace_s: float, lag_s: float) -> dict:
    """Per episode: detected (an alert starts in [start, end + grace]) and time to alert. An alert that starts
    later but within ``lag_s`` more (the smoothing window's lag) belongs to the episode too, as a repeat or
    late one; any other start is a false alert."""
    starts = np.sort(np.asarray(starts, float))
    first = np.searchsorted(starts, episodes[:, 0], "left")  # the first alert at or after each episode's start
    at = np.append(starts, np.inf)[first]
    hit = at <= episodes[:, 1] + grace_s
    owner = np.searchsorted(episodes[:, 0], starts, "right") - 1  # the last episode started at or before each alert
    inside = (owner >= 0) & (starts <= np.append(episodes[:, 1] + grace_s + lag_s, -np.inf)[owner])
    return {"duration": episodes[:, 1] - episodes[:, 0], "detected": hit, "during": at < episodes[:, 1],
            "tta": np.where(hit, at - episodes[:, 0], np.nan), "false": int((~inside).sum()), "extra": int(inside.sum() - hit.sum())}


def summarize(days: list[dict], calm_false: list[int], hours: float) -> dict:
    """Recall, time to alert and false alerts over a set of mixed days and calm days."""
    dur = np.concatenate([d["duration"] for d in days])
    det = np.concatenate([d["detected"] for d in days])
    tta = np.concatenate([d["tta"] for d in days])
    during = np.concatenate([d["during"] for d in days])
    long_ = dur >= 60

    def rate(mask: np.ndarray) -> Optional[float]:
        return float(det[mask].mean()) if mask.any() else None

    def pct(q: float) -> Optional[float]:
        v = tta[long_ & det]
        return float(np.percentile(v, q)) if len(v) else None

    per_day = hours / 24
    return {"recall_60": rate(long_), "recall_60_during": float(during[long_].mean()) if long_.any() else None,
            "recall_all": rate(np.ones_like(det)), "recall_30_60": rate(~long_),
            "recall_60_120": rate(long_ & (dur < 120)), "recall_120_300": rate(dur >= 120),
            "tta_median_60": pct(50), "tta_p90_60": pct(90),
            "false_per_calm_day": float(np.mean(calm_false)) / per_day, "false_per_calm_day_max": float(np.max(calm_false)) / per_day,
            "false_per_mixed_day": float(np.mean([d["false"] for d in days])) / per_day,
            "late_or_repeat_per_episode": float(sum(d["extra"] for d in days) / max(len(det), 1)),
            "episodes": int(len(det)), "episodes_60": int(long_.sum()), "calm_days": round(len(calm_false) * per_day, 3)}


Part = tuple[int, dict, int]  # (fold, score_day of its mixed day, alert starts on its calm day)


def alert_starts(monitor: FastMonitor, s: DistressSettings) -> np.ndarray:
    """The times alerts start: all the scoring needs (a caregiver is called at a start)."""
    return np.array([e.t for e in monitor.events(s) if e.kind == START])


def day_parts(days: Iterable[Day], settings: list[DistressSettings], grace_s: float) -> list[list[Part]]:
    """``parts[i]``: ``settings[i]`` on each day; one day's cache in memory at a time (a day's crossings for the
    whole grid are tens of MB). ``days`` may be wrapped in a progress bar by the caller."""
    parts: list[list[Part]] = [[] for _ in settings]
    for f, mixed, episodes, quiet in days:
        for i, s in enumerate(settings):
            parts[i].append((f, score_day(alert_starts(mixed, s), episodes, grace_s, s.window_s), len(alert_starts(quiet, s))))
        mixed.clear()
        quiet.clear()
    return parts


def pooled(parts: list[Part], hours: float, folds: Optional[Iterable[int]] = None) -> dict:
    """``summarize`` of the parts of ``folds`` (all when None)."""
    keep = [p for p in parts if folds is None or p[0] in set(folds)]
    return summarize([d for _, d, _ in keep], [c for _, _, c in keep], hours)


def with_folds(parts: list[Part], hours: float, folds: Optional[list[int]] = None) -> dict:
    """``pooled`` plus the worst fold's recall of >= 60 s episodes and false alerts per calm day."""
    folds = sorted({f for f, _, _ in parts} if folds is None else folds)
    each = [pooled(parts, hours, [f]) for f in folds]
    return {**pooled(parts, hours, folds), "worst_fold_recall_60": min((e["recall_60"] or 0.0) for e in each),
            "worst_fold_false_per_calm_day": max(e["false_per_calm_day"] for e in each),
            "per_fold": {f: {k: e[k] for k in ("recall_60", "false_per_calm_day", "tta_median_60")} for f, e in zip(folds, each)}}


# ------------------------------------------------------------------ the settings grid and the rule
def grid(space: dict[str, tuple]) -> list[DistressSettings]:
    """Every combination of ``space`` on top of ``OLD``, less those whose exit share is not below the entry share
    (the monitor would flap)."""
    keys = list(space)
    return [replace(OLD, **dict(zip(keys, v))) for v in itertools.product(*(space[k] for k in keys))
            if v[keys.index("exit_share")] < v[keys.index("enter_share")]]


def valid(s: DistressSettings, name: str, value: float) -> bool:
    """Whether ``s`` with ``name`` set to ``value`` keeps exit_share below enter_share."""
    v = asdict(s) | {name: value}
    return v["exit_share"] < v["enter_share"]


def one_at_a_time(days: list[Day], chosen: DistressSettings, space: dict[str, tuple], grace_s: float,
                  hours: float) -> dict[str, list[dict]]:
    """Each setting of ``space`` moved alone around ``chosen``: whether the pick sits on a ridge or a plateau."""
    around = [(name, v) for name in space for v in space[name] if valid(chosen, name, v)]
    rows = day_parts(days, [replace(chosen, **{name: v}) for name, v in around], grace_s)
    return {name: [{"value": v, **pooled(parts, hours)} for (n, v), parts in zip(around, rows) if n == name] for name in space}


def choose(rows: list[tuple[DistressSettings, dict]], budget: float, tolerance: float = 0.01) -> tuple[DistressSettings, dict]:
    """The rule: no fold above ``budget`` false alerts per calm day; then the most recall of >= 60 s episodes (pooled),
    and among those within ``tolerance`` of it the fastest median alert (then fewer false alerts)."""
    pool = [(s, r) for s, r in rows if r["worst_fold_false_per_calm_day"] <= budget] or rows
    best = max(r["recall_60"] or 0.0 for _, r in pool)
    near = [(s, r) for s, r in pool if (r["recall_60"] or 0.0) >= best - tolerance]
    return min(near, key=lambda sr: (sr[1]["tta_median_60"] or 1e9, sr[1]["false_per_calm_day"]))


def leave_one_fold_out(settings: list[DistressSettings], sweep: list[list[Part]], report_days: list[Day], folds: Iterable[int],
                       hours: float, budget: float, grace_s: float) -> tuple[list, dict]:
    """The rule run for each fold on the other folds' choosing days, its pick scored on that fold's report days:
    what the rule gives on photos it did not choose on."""
    folds, picks, parts = list(folds), [], []
    for f in folds:
        others = [g for g in folds if g != f] or folds
        pick = choose([(s, with_folds(rows, hours, others)) for s, rows in zip(settings, sweep)], budget)[0]
        picks.append({"fold": f, **asdict(pick)})
        parts += day_parts([d for d in report_days if d[0] == f], [pick], grace_s)[0]
    return picks, with_folds(parts, hours)


SWEEP_COLUMNS = ("alert_after_s", "window_s", "enter_share", "exit_share", "recall_60", "recall_60_during", "worst_fold_recall_60",
                 "tta_median_60", "false_per_calm_day", "worst_fold_false_per_calm_day")


def compact(settings: list[DistressSettings], rows: list[dict]) -> dict:
    """The sweep as a table (columns, rows): a thousand rows of dicts would be most of the file."""
    return {"columns": SWEEP_COLUMNS, "rows": [[({**asdict(s), **r}[c]) for c in SWEEP_COLUMNS] for s, r in zip(settings, rows)]}
