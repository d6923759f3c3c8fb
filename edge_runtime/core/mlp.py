"""The head's math in numpy: an MLP's forward pass, backprop and Adam, nothing else.

The same formulas as ``sklearn.neural_network`` (``_base.ACTIVATIONS`` / ``DERIVATIVES``,
``_backprop``, ``_compute_loss_grad``, ``AdamOptimizer``); ``tests/test_edge_head.py``
compares both. This module imports only numpy: it is what a device runs to predict and learn.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

ACTIVATIONS = ("identity", "logistic", "tanh", "relu")
BETA_1, BETA_2, EPSILON = 0.9, 0.999, 1e-8  # MLPClassifier's defaults, which our heads use


def activate(name: str, z: np.ndarray) -> np.ndarray:
    """Apply the hidden-layer activation in place and return ``z``."""
    if name == "relu":
        return np.maximum(z, 0, out=z)
    if name == "tanh":
        return np.tanh(z, out=z)
    if name == "logistic":
        return np.divide(1.0, 1.0 + np.exp(-z), out=z)
    if name == "identity":
        return z
    raise ValueError(f"unknown activation {name!r}")


def derivative(name: str, a: np.ndarray, delta: np.ndarray) -> None:
    """Multiply ``delta`` in place by the activation's derivative, given the activation ``a``."""
    if name == "relu":
        delta[a == 0] = 0
    elif name == "tanh":
        delta *= 1 - a**2
    elif name == "logistic":
        delta *= a * (1 - a)


def softmax(z: np.ndarray) -> np.ndarray:
    """Numerically stable softmax over the last axis (``z`` is overwritten)."""
    z = z - z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


def forward(coefs: Sequence[np.ndarray], intercepts: Sequence[np.ndarray], activation: str,
            x: np.ndarray) -> list[np.ndarray]:
    """Activations of every layer, input first, softmax probabilities last (float64)."""
    acts = [np.asarray(x, np.float64)]
    last = len(coefs) - 1
    for i, (w, b) in enumerate(zip(coefs, intercepts)):
        z = acts[-1] @ w
        z += b
        acts.append(softmax(z) if i == last else activate(activation, z))
    return acts


@dataclass(frozen=True)
class Batch:
    """One training batch, prepared once for several steps: one-hot targets and sample weights."""

    x: np.ndarray
    y: np.ndarray
    onehot: np.ndarray
    sw: np.ndarray | None  # (N, 1) or None
    sw_sum: float

    @classmethod
    def of(cls, x: np.ndarray, y: np.ndarray, n_classes: int, sample_weight: np.ndarray | None = None) -> "Batch":
        sw = None if sample_weight is None else np.asarray(sample_weight, np.float64).reshape(-1, 1)
        onehot = np.zeros((len(x), n_classes))
        onehot[np.arange(len(x)), y] = 1.0
        return cls(x, y, onehot, sw, float(len(x) if sw is None else sw.sum()))


def loss_and_grads(coefs: Sequence[np.ndarray], intercepts: Sequence[np.ndarray], activation: str, alpha: float,
                   batch: Batch) -> tuple[float, list[np.ndarray]]:
    """Cross-entropy + L2 loss of the batch and its gradients, in ``coefs + intercepts`` order."""
    acts = forward(coefs, intercepts, activation, batch.x)
    p, sw, sw_sum = acts[-1], batch.sw, batch.sw_sum
    ce = -np.log(np.clip(p[np.arange(len(p)), batch.y], np.finfo(p.dtype).eps, 1.0))
    loss = float((ce * sw[:, 0]).sum() / sw_sum if sw is not None else ce.mean())
    loss += 0.5 * alpha * sum(float(np.dot(w.ravel(), w.ravel())) for w in coefs) / sw_sum
    delta = p - batch.onehot
    if sw is not None:
        delta *= sw
    n = len(coefs)
    coef_grads: list[np.ndarray] = [np.empty(0)] * n
    intercept_grads: list[np.ndarray] = [np.empty(0)] * n
    for i in range(n - 1, -1, -1):
        coef_grads[i] = (acts[i].T @ delta + alpha * coefs[i]) / sw_sum
        intercept_grads[i] = delta.sum(axis=0) / sw_sum
        if i:
            delta = delta @ coefs[i].T
            derivative(activation, acts[i], delta)
    return loss, coef_grads + intercept_grads


@dataclass
class AdamState:
    """Adam's moment estimates and step count, one moment array per weight array."""

    ms: list[np.ndarray]
    vs: list[np.ndarray]
    t: int = 0

    @classmethod
    def zeros(cls, params: Sequence[np.ndarray]) -> "AdamState":
        return cls([np.zeros_like(p) for p in params], [np.zeros_like(p) for p in params], 0)

    def copy(self) -> "AdamState":
        return AdamState([m.copy() for m in self.ms], [v.copy() for v in self.vs], int(self.t))

    def matches(self, params: Sequence[np.ndarray]) -> bool:
        shapes = [p.shape for p in params]
        return [m.shape for m in self.ms] == shapes and [v.shape for v in self.vs] == shapes


def adam_update(state: AdamState, params: Sequence[np.ndarray], grads: Sequence[np.ndarray],
                learning_rate_init: float) -> None:
    """One Adam step: ``state`` advances, ``params`` change in place (sklearn's ``AdamOptimizer`` rule)."""
    state.t += 1
    state.ms = [BETA_1 * m + (1 - BETA_1) * g for m, g in zip(state.ms, grads)]
    state.vs = [BETA_2 * v + (1 - BETA_2) * (g**2) for v, g in zip(state.vs, grads)]
    learning_rate = learning_rate_init * np.sqrt(1 - BETA_2**state.t) / (1 - BETA_1**state.t)
    for p, m, v in zip(params, state.ms, state.vs):
        p -= learning_rate * m / (np.sqrt(v) + EPSILON)
