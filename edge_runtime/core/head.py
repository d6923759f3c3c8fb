"""The on-device head: a small MLP whose whole state is numpy arrays.

``head.npz`` holds ``coef_<i>``, ``intercept_<i>``, ``classes`` (names, column order of
``predict_proba``) and ``meta`` (JSON: hyper-parameters, version); optionally the Adam
moments (``adam_m_<i>``, ``adam_v_<i>``, ``adam_t``) so learning resumes smoothly after a
restart. It is loaded with ``allow_pickle=False``: a head file can never run code.

The weights and the Adam state live in one place, the head's own arrays; ``predict_proba``
and ``learn_step`` run the MLP's math on them in numpy (``mlp.py``, the same formulas as
scikit-learn, tested for parity). A scikit-learn ``MLPClassifier`` exists only at the
boundary: ``fit`` trains one and keeps its arrays, ``to_sklearn`` hands out a copy (export,
the parity tests), ``from_sklearn`` takes one back (``head_sklearn.py``). Importing
scikit-learn pulls in SciPy and costs ~90 MB of RSS and seconds of start-up on a camera, for
a 64x64x7 network, so a device that predicts and learns never does.

``version`` belongs to sync: it is carried in the file and set by whoever makes or adopts a
head (the server numbers global heads, the device counts the updates it accepts); a
learning step never changes it.
"""
from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

from . import head_sklearn, safe_npz
from .atomic import atomic_write_bytes
from .head_sklearn import new_classifier  # noqa: F401  (importable from here, as before)
from .mlp import ACTIVATIONS, AdamState, Batch, adam_update, forward, loss_and_grads
from .classes import CLASSES

if TYPE_CHECKING:  # pragma: no cover
    from sklearn.neural_network import MLPClassifier

FORMAT = "infantino-head/1"


class HeadFormatError(ValueError):
    """A head file or array set that does not describe a valid head."""


@dataclass(frozen=True)
class HeadParams:
    """MLPClassifier hyper-parameters that a head file carries along."""

    hidden_layer_sizes: tuple[int, ...] = (64,)
    activation: str = "relu"
    alpha: float = 1e-4
    learning_rate_init: float = 1e-3
    batch_size: int | str = "auto"
    random_state: int = 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["hidden_layer_sizes"] = list(self.hidden_layer_sizes)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "HeadParams":
        known = set(cls.__dataclass_fields__)
        kw = {k: v for k, v in d.items() if k in known}
        if "hidden_layer_sizes" in kw:
            kw["hidden_layer_sizes"] = tuple(int(v) for v in kw["hidden_layer_sizes"])
        return cls(**kw)


@dataclass
class HeadCheckpoint:
    """An in-memory copy of everything a learning step changes, for a cheap rollback."""

    weights: list[np.ndarray]
    adam: AdamState | None


class OnlineHead:
    """A head with fixed classes (``CLASSES`` order) whose weights and Adam state are numpy arrays.

    ``version`` is the sync protocol's number for this head (see the module docstring)."""

    def __init__(self, coefs: Sequence[np.ndarray], intercepts: Sequence[np.ndarray], classes: Sequence[str] = CLASSES,
                 params: HeadParams = HeadParams(), version: int = 0, adam: AdamState | None = None):
        self._coefs = list(coefs)
        self._intercepts = list(intercepts)
        self.classes = tuple(classes)
        self.params = params
        self.version = int(version)
        self._adam = adam  # None until the first learning step (or a file that carries moments)

    # ---------------------------------------------------------------- construction
    @classmethod
    def fit(cls, embeddings: np.ndarray, labels: np.ndarray, params: HeadParams = HeadParams(), max_iter: int = 200,
            classes: Sequence[str] = CLASSES) -> "OnlineHead":
        """Fit a fresh head on labelled embeddings (the bootstrap head, or a re-fit) with scikit-learn."""
        clf = head_sklearn.fit_classifier(embeddings, labels, params, max_iter, len(classes))
        return cls.from_sklearn(clf, classes, params)

    @classmethod
    def from_arrays(cls, coefs: Sequence[np.ndarray], intercepts: Sequence[np.ndarray], classes: Sequence[str] = CLASSES,
                    params: HeadParams = HeadParams(), version: int = 0) -> "OnlineHead":
        """Rebuild a head from weight arrays; the Adam state starts fresh (stale moments would mislead it)."""
        coefs = [np.array(c, dtype=np.float64, copy=True) for c in coefs]
        intercepts = [np.array(b, dtype=np.float64, copy=True) for b in intercepts]
        validate_arrays(coefs, intercepts, len(classes), params)
        if params.activation not in ACTIVATIONS:  # refused now, not at predict time
            raise HeadFormatError(f"unknown activation {params.activation!r}")
        return cls(coefs, intercepts, classes, params, version)

    @classmethod
    def from_sklearn(cls, clf: "MLPClassifier", classes: Sequence[str] = CLASSES, params: HeadParams | None = None,
                     version: int = 0) -> "OnlineHead":
        """A head holding copies of a fitted classifier's weights and Adam state."""
        coefs, intercepts, adam = head_sklearn.read_classifier(clf)
        params = HeadParams.from_dict(head_sklearn.params_of(clf)) if params is None else params
        validate_arrays(coefs, intercepts, len(classes), params)
        return cls(coefs, intercepts, classes, params, version, adam)

    def to_sklearn(self) -> "MLPClassifier":
        """A fitted ``MLPClassifier`` with copies of this head's weights and Adam state.

        Training it does not change the head: take the result back with ``from_sklearn``."""
        return head_sklearn.build_classifier(self._coefs, self._intercepts, len(self.classes), self.params, self._adam)

    # ---------------------------------------------------------------- inference and learning
    @property
    def input_dim(self) -> int:
        return int(self._coefs[0].shape[0])

    def check_embeddings(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if x.ndim == 1:
            x = x[None]
        if x.ndim != 2 or x.shape[1] != self.input_dim:
            raise ValueError(f"embedding of shape {x.shape} does not match the head's input size {self.input_dim}")
        if not np.all(np.isfinite(x)):
            raise ValueError("embedding holds NaN or infinite values")
        return x

    def _forward(self, x: np.ndarray) -> list[np.ndarray]:
        """Activations of every layer, input first, softmax probabilities last (float64)."""
        return forward(self._coefs, self._intercepts, self.params.activation, x)

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities (N, n_classes) in ``classes`` order; equals the classifier's ``predict_proba``."""
        return self._forward(self.check_embeddings(x))[-1].astype(np.float32)

    def log_loss(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Per-sample cross-entropy (no L2 term), clipped like scikit-learn's."""
        p = self._forward(self.check_embeddings(x))[-1]
        eps = np.finfo(p.dtype).eps
        return -np.log(np.clip(p[np.arange(len(p)), np.asarray(y, np.int64)], eps, 1 - eps))

    def _check_labels(self, y: np.ndarray, n: int) -> np.ndarray:
        y = np.asarray(y, dtype=np.int64)
        if y.shape != (n,) or y.min(initial=0) < 0 or y.max(initial=0) >= len(self.classes):
            raise ValueError(f"labels must be {n} class indices in [0, {len(self.classes)})")
        return y

    def partial_fit(self, x: np.ndarray, y: np.ndarray, steps: int = 1) -> None:
        """``steps`` epochs of scikit-learn's own ``partial_fit`` (mini-batches of ``batch_size``) over one
        batch, through a classifier built for the purpose; the head keeps the resulting arrays."""
        x = self.check_embeddings(x)
        y = self._check_labels(y, len(x))
        clf = self.to_sklearn()
        for _ in range(steps):
            clf.partial_fit(x, y)
        coefs, intercepts, adam = head_sklearn.read_classifier(clf)
        for w, new in zip(self.weights(), coefs + intercepts):
            w[...] = new
        self._adam = adam

    def learn_step(self, x: np.ndarray, y: np.ndarray, steps: int = 1, sample_weight: np.ndarray | None = None,
                   learning_rate: float | None = None, anchor: Sequence[np.ndarray] | None = None,
                   anchor_strength: float = 0.0) -> float:
        """``steps`` full-batch Adam steps in numpy, the same update as scikit-learn's ``partial_fit`` on a
        batch of at most ``batch_size`` samples, without its ~ms of per-call validation. Returns the
        training loss before the last step. ``learning_rate`` replaces the head's own for these steps.

        ``anchor`` (weights in ``weights()`` order) adds ``anchor_strength / 2 * ||w - anchor||^2``
        to the loss (L2-SP): the head may move toward new labels but is pulled back toward the
        model it started from, which is what keeps it from forgetting adult faces."""
        x = self.check_embeddings(x)
        batch = Batch.of(x, self._check_labels(y, len(x)), len(self.classes), sample_weight)
        params = self.weights()
        if anchor is not None and [a.shape for a in anchor] != [p.shape for p in params]:
            raise ValueError("anchor weights do not match the head's layers")
        pull = (list(anchor), float(anchor_strength)) if anchor is not None and anchor_strength > 0 else None
        lr = self.params.learning_rate_init if learning_rate is None else float(learning_rate)
        if self._adam is None:
            self._adam = AdamState.zeros(params)
        loss = float("nan")
        for _ in range(steps):
            loss, grads = loss_and_grads(self._coefs, self._intercepts, self.params.activation, self.params.alpha, batch)
            if pull is not None:
                grads = [g + pull[1] * (p - a) for g, p, a in zip(grads, params, pull[0])]
            adam_update(self._adam, params, grads, lr)
        return loss

    def checkpoint(self) -> HeadCheckpoint:
        """Copies of the weights and Adam state (microseconds for a 64-64-7 head)."""
        return HeadCheckpoint([w.copy() for w in self.weights()], None if self._adam is None else self._adam.copy())

    def restore(self, cp: HeadCheckpoint) -> None:
        """Put a checkpoint back in place (the weight arrays stay the same objects)."""
        for w, saved in zip(self.weights(), cp.weights):
            w[...] = saved
        self._adam = None if cp.adam is None else cp.adam.copy()

    # ---------------------------------------------------------------- arrays and files
    @property
    def coefs(self) -> list[np.ndarray]:
        return list(self._coefs)

    @property
    def intercepts(self) -> list[np.ndarray]:
        return list(self._intercepts)

    def weights(self) -> list[np.ndarray]:
        """Flower-style NDArrays: coefs then intercepts (the head's own arrays, not copies)."""
        return self._coefs + self._intercepts

    def copy(self) -> "OnlineHead":
        return OnlineHead.from_bytes(self.to_bytes())

    def to_arrays(self) -> dict[str, np.ndarray]:
        arrays: dict[str, np.ndarray] = {}
        for i, (c, b) in enumerate(zip(self._coefs, self._intercepts)):
            arrays[f"coef_{i}"] = np.asarray(c, np.float32)
            arrays[f"intercept_{i}"] = np.asarray(b, np.float32)
        if self._adam is not None:
            for i, (m, v) in enumerate(zip(self._adam.ms, self._adam.vs)):
                arrays[f"adam_m_{i}"] = np.asarray(m, np.float64)
                arrays[f"adam_v_{i}"] = np.asarray(v, np.float64)
            arrays["adam_t"] = np.asarray(self._adam.t, np.int64)
        arrays["classes"] = np.asarray(self.classes)
        meta = {"format": FORMAT, "params": self.params.to_dict(), "version": self.version}
        arrays["meta"] = np.asarray(json.dumps(meta))
        return arrays

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, **self.to_arrays())
        return buf.getvalue()

    def save(self, path) -> None:
        atomic_write_bytes(path, self.to_bytes())

    @classmethod
    def from_npz(cls, npz) -> "OnlineHead":
        try:
            meta = json.loads(str(npz["meta"]))
            if meta.get("format") != FORMAT:
                raise HeadFormatError(f"unknown head format {meta.get('format')!r}")
            params = HeadParams.from_dict(meta["params"])
            n_layers = len(params.hidden_layer_sizes) + 1
            coefs = [npz[f"coef_{i}"] for i in range(n_layers)]
            intercepts = [npz[f"intercept_{i}"] for i in range(n_layers)]
            classes = tuple(str(c) for c in npz["classes"])
            head = cls.from_arrays(coefs, intercepts, classes, params, int(meta.get("version", 0)))
            if "adam_t" in npz.files:
                head._adam = _adam_from_npz(npz, head.weights())
            return head
        except HeadFormatError:
            raise
        except (KeyError, ValueError, TypeError, json.JSONDecodeError) as exc:
            raise HeadFormatError(f"invalid head arrays: {exc}") from exc

    @classmethod
    def from_bytes(cls, data: bytes) -> "OnlineHead":
        try:
            with safe_npz.load(data) as npz:  # bounded, no pickles (a served head may be hostile)
                return cls.from_npz(npz)
        except HeadFormatError:
            raise
        except (OSError, ValueError, EOFError) as exc:
            raise HeadFormatError(f"not a head npz file: {exc}") from exc

    @classmethod
    def load(cls, path) -> "OnlineHead":
        with open(path, "rb") as fh:
            return cls.from_bytes(fh.read())


def _adam_from_npz(npz, weights: Sequence[np.ndarray]) -> AdamState:
    n = len(weights)
    state = AdamState([np.array(npz[f"adam_m_{i}"], np.float64) for i in range(n)],
                      [np.array(npz[f"adam_v_{i}"], np.float64) for i in range(n)], int(npz["adam_t"]))
    if not state.matches(weights):
        raise HeadFormatError("Adam moments do not match the layer shapes")
    return state


def validate_arrays(coefs: Sequence[np.ndarray], intercepts: Sequence[np.ndarray], n_classes: int, params: HeadParams) -> None:
    """Shapes chain from input to ``n_classes`` through the hidden sizes; values are finite."""
    sizes = list(params.hidden_layer_sizes) + [n_classes]
    if len(coefs) != len(sizes) or len(intercepts) != len(sizes):
        raise HeadFormatError(f"expected {len(sizes)} layers, got {len(coefs)} coefs and {len(intercepts)} intercepts")
    fan_in = coefs[0].shape[0] if coefs[0].ndim == 2 else -1
    for i, (c, b, fan_out) in enumerate(zip(coefs, intercepts, sizes)):
        if c.shape != (fan_in, fan_out) or b.shape != (fan_out,):
            raise HeadFormatError(f"layer {i}: coef {c.shape} / intercept {b.shape}, expected ({fan_in}, {fan_out}) / ({fan_out},)")
        if not (np.all(np.isfinite(c)) and np.all(np.isfinite(b))):
            raise HeadFormatError(f"layer {i} holds NaN or infinite values")
        fan_in = fan_out
