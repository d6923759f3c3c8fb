"""Aggregation math: pure numpy, no Flask, no database, no MLflow.

The server buffers head updates as *deltas* (device weights minus the global head they
started from) and steps once ``K`` devices have some buffered, as in FedBuff (Nguyen et al., 2022):

    new_global = global + server_lr * combine(clip(voice_d), n_d)
    voice_d    = sum over device d's buffered updates of discount(tau_i) * delta_i

* one device, one voice: a device's buffered updates (consecutive pieces of its learning
  since its base head, or a flood of crafted ones) are summed into one row before anything
  else, so posting ten updates weighs no more than posting one;
* ``clip`` bounds each voice's L2 norm: by default the median voice norm of the buffer (a
  bound the honest majority sets), never above ``norm_cap`` (a multiple of what honest
  rounds measured before) when the caller gives one;
* ``combine`` is the rule: coordinate-wise trimmed mean (the default), coordinate-wise
  median, or the sample-weighted mean (FedAvg). The robust rules ignore ``n_d``; FedAvg
  weighs by ``n_d`` capped to what the device can plausibly have labelled (``sample_caps``);
* ``discount(tau)`` shrinks an update computed ``tau`` global versions ago. It multiplies
  the delta and is *not* renormalised, so a batch of stale updates moves the head less.

Deltas travel as one matrix ``(n_updates, n_params)`` of flattened float32 layers, which
is what makes 10,000 updates a single BLAS call; ``aggregate`` keeps Flower's
``list[(NDArrays, n)]`` signature for callers that hold layer lists.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence, Union

import numpy as np

NDArrays = list[np.ndarray]
StalenessFn = Callable[[np.ndarray], np.ndarray]


# --------------------------------------------------------------------------- layers <-> vectors


def flatten(arrays: Sequence[np.ndarray], dtype=np.float32) -> np.ndarray:
    """Concatenate layers into one vector (C order, layer by layer)."""
    if not arrays:
        return np.zeros(0, dtype)
    return np.concatenate([np.asarray(a, dtype).ravel() for a in arrays])


def unflatten(vector: np.ndarray, shapes: Sequence[tuple[int, ...]]) -> NDArrays:
    """Split a flat vector back into layers of ``shapes`` (copies, writable)."""
    sizes = [int(np.prod(s)) for s in shapes]
    if vector.shape != (sum(sizes),):
        raise ValueError(f"vector of shape {vector.shape} does not hold layers {list(shapes)}")
    out, start = [], 0
    for shape, size in zip(shapes, sizes):
        out.append(np.array(vector[start:start + size]).reshape(shape))
        start += size
    return out


# --------------------------------------------------------------------------- staleness discounts


def no_discount(tau: np.ndarray) -> np.ndarray:
    return np.ones_like(np.asarray(tau, np.float64))


def sqrt_discount(tau: np.ndarray) -> np.ndarray:
    """FedBuff's choice: 1 / sqrt(1 + tau)."""
    return 1.0 / np.sqrt(1.0 + np.asarray(tau, np.float64))


def linear_discount(tau: np.ndarray) -> np.ndarray:
    """A harsher polynomial: 1 / (1 + tau)."""
    return 1.0 / (1.0 + np.asarray(tau, np.float64))


STALENESS: dict[str, StalenessFn] = {"none": no_discount, "sqrt": sqrt_discount, "linear": linear_discount}


# --------------------------------------------------------------------------- combining rules


def weighted_mean(deltas: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Row-weighted mean of ``deltas`` (n, P); weights need not sum to one."""
    weights = np.asarray(weights, np.float64)
    total = weights.sum()
    if total <= 0:
        raise ValueError("weights must sum to a positive number")
    return (weights / total).astype(np.float32) @ deltas


def coordinate_median(deltas: np.ndarray) -> np.ndarray:
    return np.median(deltas, axis=0).astype(np.float32)


def trimmed_mean(deltas: np.ndarray, fraction: float, min_trim: int = 0) -> np.ndarray:
    """Per coordinate, drop the ``fraction`` largest and smallest values (at least ``min_trim``
    of each when enough rows remain), average the rest."""
    n = deltas.shape[0]
    k = int(np.floor(fraction * n))
    if k < min_trim and n >= 2 * min_trim + 1:
        k = min_trim
    if k == 0:
        return deltas.mean(axis=0, dtype=np.float64).astype(np.float32)
    if 2 * k >= n:
        raise ValueError(f"trimming {k} from each side of {n} updates leaves nothing")
    part = np.partition(deltas, (k, n - k - 1), axis=0)
    return part[k:n - k].mean(axis=0, dtype=np.float64).astype(np.float32)


RULES = ("fedavg", "median", "trimmed_mean")


def row_norms(deltas: np.ndarray) -> np.ndarray:
    return np.sqrt(np.einsum("ij,ij->i", deltas, deltas, dtype=np.float64))


def clip_rows(deltas: np.ndarray, max_norm: float) -> tuple[np.ndarray, int]:
    """Scale every row whose L2 norm exceeds ``max_norm`` down to it; returns (new matrix, how many)."""
    norms = row_norms(deltas)
    over = norms > max_norm
    if not over.any():
        return deltas, 0
    scale = np.ones_like(norms)
    scale[over] = max_norm / norms[over]
    return deltas * scale[:, None].astype(deltas.dtype), int(over.sum())


# --------------------------------------------------------------------------- strategy


@dataclass(frozen=True)
class Strategy:
    """How a buffer of deltas becomes one server step; the default is the robust one.

    ``clip_norm``: ``None`` (off), a number, or ``"median"`` (each buffer's median voice norm).
    ``min_trim``: the trimmed mean drops at least this many voices per side once there are
    ``2 * min_trim + 1`` (so one hostile voice among four is trimmed too).
    ``max_weight_samples`` caps the sample count one voice may claim in FedAvg.
    """

    rule: str = "trimmed_mean"
    staleness: str = "sqrt"
    clip_norm: Union[float, str, None] = "median"
    trim_fraction: float = 0.2
    min_trim: int = 1
    server_lr: float = 1.0
    max_weight_samples: int = 1000

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"unknown rule {self.rule!r}; choose one of {', '.join(RULES)}")
        if self.staleness not in STALENESS:
            raise ValueError(f"unknown staleness discount {self.staleness!r}; choose one of {', '.join(STALENESS)}")
        if isinstance(self.clip_norm, str) and self.clip_norm != "median":
            raise ValueError(f"clip_norm must be a number, 'median' or None, not {self.clip_norm!r}")
        if isinstance(self.clip_norm, (int, float)) and not self.clip_norm > 0:
            raise ValueError("clip_norm must be positive")
        if not 0 <= self.trim_fraction < 0.5:
            raise ValueError("trim_fraction must be in [0, 0.5)")
        if not isinstance(self.min_trim, int) or self.min_trim < 0:
            raise ValueError("min_trim must be a non-negative integer")
        if not self.server_lr > 0:
            raise ValueError("server_lr must be positive")

    @classmethod
    def from_dict(cls, d: dict) -> "Strategy":
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown strategy settings: {', '.join(sorted(unknown))}")
        kw = dict(d)
        if isinstance(kw.get("clip_norm"), str) and kw["clip_norm"] not in ("median",):
            kw["clip_norm"] = None if kw["clip_norm"].lower() in ("", "none", "off") else float(kw["clip_norm"])
        return cls(**kw)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class StepResult:
    delta: np.ndarray          # the server step (already scaled by server_lr), flat float32
    info: dict                 # what happened, for MLflow and the store


def merge_voices(deltas: np.ndarray, voices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Sum the rows of each voice: ((n_voices, P) matrix, voice index of every row).
    Rows keep their order of first appearance; a buffer of one row per voice is returned as is."""
    ids = np.asarray(voices)
    uniq, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
    if len(uniq) == len(ids):
        return deltas, np.arange(len(ids))
    rank = np.empty(len(uniq), np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(uniq))
    index = rank[inverse.ravel()]
    # One sum per voice over its rows in their order: the same float32 sums as adding row by
    # row into zeros (np.add.at), five times faster (np.add.at loops element by element).
    order = np.argsort(index, kind="stable")
    bounds = np.flatnonzero(np.diff(index[order])) + 1
    out = np.empty((len(uniq), deltas.shape[1]), deltas.dtype)
    for rows in np.split(order, bounds):
        out[index[rows[0]]] = np.add.reduce(deltas[rows], axis=0)
    return out, index


def _validate(deltas: np.ndarray, samples: np.ndarray, tau: np.ndarray) -> int:
    n = deltas.shape[0] if deltas.ndim == 2 else 0
    if n == 0:
        raise ValueError("nothing to aggregate")
    if samples.shape != (n,) or tau.shape != (n,):
        raise ValueError(f"{n} deltas need {n} sample counts and {n} staleness values")
    if (samples <= 0).any() or (tau < 0).any():
        raise ValueError("sample counts must be positive and staleness non-negative")
    if not _all_finite(deltas):
        raise ValueError("deltas hold NaN or infinite values")
    return n


def _all_finite(x: np.ndarray, rows: int = 256) -> bool:
    """``np.isfinite(x).all()`` a block of rows at a time (no boolean copy of a 185 MB buffer)."""
    return all(np.isfinite(x[i:i + rows]).all() for i in range(0, len(x), rows))


def _clip_bound(voice_norms: np.ndarray, strategy: Strategy, norm_cap: Optional[float]) -> Optional[float]:
    """The clip bound of this step: the strategy's, never above ``norm_cap``."""
    if strategy.clip_norm is None:
        bound = None
    elif strategy.clip_norm == "median":
        bound = float(np.median(voice_norms))
    else:
        bound = float(strategy.clip_norm)
    if norm_cap is not None and norm_cap > 0:
        bound = norm_cap if bound is None else min(bound, norm_cap)
    return bound


def _combine(voices: np.ndarray, weights: np.ndarray, strategy: Strategy) -> np.ndarray:
    if strategy.rule == "fedavg":
        return weighted_mean(voices, np.minimum(weights, strategy.max_weight_samples))
    if strategy.rule == "median":
        return coordinate_median(voices)
    return trimmed_mean(voices, strategy.trim_fraction, strategy.min_trim)


def aggregate_deltas(deltas: np.ndarray, n_samples: Sequence[int], staleness: Sequence[int], strategy: Strategy = Strategy(),
                     voices: Optional[Sequence[int]] = None, sample_caps: Optional[Sequence[float]] = None,
                     norm_cap: Optional[float] = None) -> StepResult:
    """Combine a buffer of flat deltas (n, P) into one server step. Does not modify ``deltas``.

    ``voices``: who sent each row (rows of one voice are summed; default: every row its own);
    ``sample_caps``: labels the sender of each row can plausibly have made since its base head;
    ``norm_cap``: an upper bound on the clip bound (e.g. derived from past honest rounds).
    """
    deltas = np.asarray(deltas, np.float32)
    samples = np.asarray(n_samples, np.float64)
    tau = np.asarray(staleness, np.float64)
    n = _validate(deltas, samples, tau)
    norms = row_norms(deltas)
    discount = STALENESS[strategy.staleness](tau)
    scaled = deltas * discount[:, None].astype(np.float32) if np.any(discount != 1.0) else deltas
    matrix, index = merge_voices(scaled, np.arange(n) if voices is None else voices)
    claimed = np.bincount(index, weights=samples, minlength=matrix.shape[0])
    caps = np.full(matrix.shape[0], np.inf) if sample_caps is None else _voice_caps(index, sample_caps, matrix.shape[0])
    counted = np.maximum(np.minimum(claimed, caps), 1.0)
    voice_norms = row_norms(matrix)
    bound = _clip_bound(voice_norms, strategy, norm_cap)
    n_clipped = 0
    if bound is not None and bound > 0:
        matrix, n_clipped = clip_rows(matrix, bound)
    step = (_combine(matrix, counted, strategy) * np.float32(strategy.server_lr)).astype(np.float32)
    info = {
        "n_updates": n, "n_voices": int(matrix.shape[0]),
        "n_samples": int(counted.sum()), "n_samples_claimed": int(samples.sum()),
        "n_samples_capped": int((claimed > caps).sum()),
        "staleness_mean": float(tau.mean()), "staleness_max": int(tau.max()), "discount_mean": float(discount.mean()),
        "delta_norm_median": float(np.median(norms)), "delta_norm_max": float(norms.max()),
        "voice_norm_median": float(np.median(voice_norms)), "voice_norm_max": float(voice_norms.max()),
        "clip_bound": bound, "n_clipped": n_clipped, "step_norm": float(np.linalg.norm(step)),
    }
    return StepResult(step, info)


def _voice_caps(index: np.ndarray, caps: Sequence[float], n_voices: int) -> np.ndarray:
    """A voice's cap is the largest of its rows' caps (its oldest base head allows the most)."""
    out = np.zeros(n_voices)
    np.maximum.at(out, index, np.asarray(caps, np.float64))
    return out


def label_cap(base_age_s: float, burst: float, per_hour: float) -> float:
    """Labels a device can plausibly have made since it pulled a head published ``base_age_s``
    ago (it cannot have pulled it earlier): ``burst`` plus ``per_hour`` for every hour since."""
    return float(burst) + float(per_hour) * max(0.0, float(base_age_s)) / 3600.0


def ingest_bound(max_norm: float, reference: Optional[float], factor: float) -> float:
    """The L2 bound an incoming update must respect: ``factor`` times the median voice norm
    of recent honest rounds once there are some, never above the hard ``max_norm``."""
    if reference is None or not reference > 0 or not factor > 0:
        return float(max_norm)
    return float(min(max_norm, factor * reference))


def aggregate(results: Sequence[tuple[NDArrays, int]]) -> NDArrays:
    """Flower's FedAvg: the sample-weighted mean of layer lists."""
    if not results:
        return []
    shapes = [np.shape(a) for a in results[0][0]]
    matrix = np.stack([flatten(layers) for layers, _ in results])
    return unflatten(weighted_mean(matrix, [n for _, n in results]), shapes)


def apply_step(weights: Sequence[np.ndarray], step: np.ndarray) -> NDArrays:
    """New layers = old layers + step (flat)."""
    shapes = [np.shape(w) for w in weights]
    return unflatten(flatten(weights) + step, shapes)
