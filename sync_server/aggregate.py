"""Aggregation math: pure numpy, no Flask, no database, no MLflow.

The server buffers head updates as *deltas* (device weights minus the global head they
started from) and steps once ``K`` are buffered, as in FedBuff (Nguyen et al., 2022):

    new_global = global + server_lr * combine(discount(tau_i) * clip(delta_i), n_i)

* ``combine`` is the rule: sample-weighted mean (FedAvg, the default), coordinate-wise
  median, or a coordinate-wise trimmed mean (the robust rules ignore ``n_i``, which a
  device can lie about).
* ``discount(tau)`` shrinks an update computed ``tau`` global versions ago. It multiplies
  the delta and is *not* renormalised, so a batch of stale updates moves the head less.
* ``clip`` bounds each delta's L2 norm (a fixed bound, or the batch's median norm).

Deltas travel as one matrix ``(n_updates, n_params)`` of flattened float32 layers, which
is what makes 10,000 updates a single BLAS call; ``aggregate`` keeps Flower's
``list[(NDArrays, n)]`` signature for callers that hold layer lists.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Sequence, Union

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


def trimmed_mean(deltas: np.ndarray, fraction: float) -> np.ndarray:
    """Per coordinate, drop the ``fraction`` largest and smallest values, average the rest."""
    n = deltas.shape[0]
    k = int(np.floor(fraction * n))
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
    """How a buffer of deltas becomes one server step.

    ``clip_norm``: ``None`` (off), a number, or ``"median"`` (each batch's median norm).
    ``max_weight_samples`` caps the sample count one update may claim in FedAvg.
    """

    rule: str = "fedavg"
    staleness: str = "sqrt"
    clip_norm: Union[float, str, None] = None
    trim_fraction: float = 0.2
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


def aggregate_deltas(deltas: np.ndarray, n_samples: Sequence[int], staleness: Sequence[int], strategy: Strategy = Strategy()) -> StepResult:
    """Combine a buffer of flat deltas (n, P) into one server step. Does not modify ``deltas``."""
    deltas = np.asarray(deltas, np.float32)
    n = deltas.shape[0] if deltas.ndim == 2 else 0
    if n == 0:
        raise ValueError("nothing to aggregate")
    samples = np.asarray(n_samples, np.float64)
    tau = np.asarray(staleness, np.float64)
    if samples.shape != (n,) or tau.shape != (n,):
        raise ValueError(f"{n} deltas need {n} sample counts and {n} staleness values")
    if (samples <= 0).any() or (tau < 0).any():
        raise ValueError("sample counts must be positive and staleness non-negative")
    if not np.isfinite(deltas).all():
        raise ValueError("deltas hold NaN or infinite values")

    norms = row_norms(deltas)
    n_clipped, bound = 0, None
    if strategy.clip_norm is not None:
        bound = float(np.median(norms)) if strategy.clip_norm == "median" else float(strategy.clip_norm)
        if bound > 0:
            deltas, n_clipped = clip_rows(deltas, bound)
    discount = STALENESS[strategy.staleness](tau)
    scaled = deltas * discount[:, None].astype(np.float32) if np.any(discount != 1.0) else deltas

    if strategy.rule == "fedavg":
        combined = weighted_mean(scaled, np.minimum(samples, strategy.max_weight_samples))
    elif strategy.rule == "median":
        combined = coordinate_median(scaled)
    else:
        combined = trimmed_mean(scaled, strategy.trim_fraction)
    step = (combined * np.float32(strategy.server_lr)).astype(np.float32)
    info = {
        "n_updates": n,
        "n_samples": int(samples.sum()),
        "staleness_mean": float(tau.mean()),
        "staleness_max": int(tau.max()),
        "discount_mean": float(discount.mean()),
        "delta_norm_median": float(np.median(norms)),
        "delta_norm_max": float(norms.max()),
        "clip_bound": bound,
        "n_clipped": n_clipped,
        "step_norm": float(np.linalg.norm(step)),
    }
    return StepResult(step, info)


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
