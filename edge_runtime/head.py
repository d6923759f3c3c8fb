"""The on-device head: a scikit-learn ``MLPClassifier`` that travels as plain arrays.

``head.npz`` holds ``coef_<i>``, ``intercept_<i>``, ``classes`` (names, column order of
``predict_proba``) and ``meta`` (JSON: hyper-parameters, version); optionally the Adam
moments (``adam_m_<i>``, ``adam_v_<i>``) so learning resumes smoothly after a restart.
It is loaded with ``allow_pickle=False``: a head file can never run code.
"""
from __future__ import annotations

import io
import json
import warnings
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.neural_network import MLPClassifier
from sklearn.neural_network._stochastic_optimizers import AdamOptimizer

from .atomic import atomic_write_bytes
from .preprocess import CLASSES

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


def new_classifier(params: HeadParams, max_iter: int = 200) -> MLPClassifier:
    return MLPClassifier(
        hidden_layer_sizes=params.hidden_layer_sizes, activation=params.activation, solver="adam",
        alpha=params.alpha, learning_rate_init=params.learning_rate_init, batch_size=params.batch_size,
        random_state=params.random_state, max_iter=max_iter,
    )


class OnlineHead:
    """An ``MLPClassifier`` whose classes are fixed (``CLASSES`` order) and whose weights are arrays.

    ``version`` counts accepted updates; it is what the sync server compares.
    """

    def __init__(self, clf: MLPClassifier, classes: Sequence[str] = CLASSES, params: HeadParams = HeadParams(), version: int = 0):
        self.clf = clf
        self.classes = tuple(classes)
        self.params = params
        self.version = int(version)

    # ---------------------------------------------------------------- construction
    @classmethod
    def fit(cls, embeddings: np.ndarray, labels: np.ndarray, params: HeadParams = HeadParams(), max_iter: int = 200,
            classes: Sequence[str] = CLASSES) -> "OnlineHead":
        """Fit a fresh head on labelled embeddings (the bootstrap head, or a re-fit)."""
        clf = new_classifier(params, max_iter=max_iter)
        n = len(classes)
        # Warm the classifier with every class so classes_ is always the full range.
        clf.partial_fit(np.zeros((n, embeddings.shape[1]), np.float32), np.arange(n), classes=np.arange(n))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.set_params(warm_start=True)
            clf.fit(np.asarray(embeddings, np.float32), np.asarray(labels, np.int64))
            clf.set_params(warm_start=False)
        return cls(clf, classes, params)

    @classmethod
    def from_arrays(cls, coefs: Sequence[np.ndarray], intercepts: Sequence[np.ndarray], classes: Sequence[str] = CLASSES,
                    params: HeadParams = HeadParams(), version: int = 0) -> "OnlineHead":
        """Rebuild a head from weight arrays; the Adam state starts fresh (stale moments would mislead it)."""
        coefs = [np.array(c, dtype=np.float64, copy=True) for c in coefs]
        intercepts = [np.array(b, dtype=np.float64, copy=True) for b in intercepts]
        validate_arrays(coefs, intercepts, len(classes), params)
        clf = new_classifier(params)
        n = len(classes)
        clf.partial_fit(np.zeros((n, coefs[0].shape[0])), np.arange(n), classes=np.arange(n))
        clf.coefs_, clf.intercepts_ = coefs, intercepts
        clf.t_, clf.n_iter_ = 0, 0
        del clf._optimizer  # rebuilt over the new arrays on the next partial_fit
        return cls(clf, classes, params, version)

    # ---------------------------------------------------------------- inference and learning
    @property
    def input_dim(self) -> int:
        return int(self.clf.coefs_[0].shape[0])

    def check_embeddings(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if x.ndim == 1:
            x = x[None]
        if x.ndim != 2 or x.shape[1] != self.input_dim:
            raise ValueError(f"embedding of shape {x.shape} does not match the head's input size {self.input_dim}")
        if not np.all(np.isfinite(x)):
            raise ValueError("embedding holds NaN or infinite values")
        return x

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return self.clf.predict_proba(self.check_embeddings(x)).astype(np.float32)

    def partial_fit(self, x: np.ndarray, y: np.ndarray, steps: int = 1) -> None:
        """``steps`` Adam epochs over one small batch; ``version`` goes up by one."""
        x = self.check_embeddings(x)
        y = np.asarray(y, dtype=np.int64)
        if y.shape != (len(x),) or y.min(initial=0) < 0 or y.max(initial=0) >= len(self.classes):
            raise ValueError(f"labels must be {len(x)} class indices in [0, {len(self.classes)})")
        for _ in range(steps):
            self.clf.partial_fit(x, y)
        self.version += 1

    # ---------------------------------------------------------------- arrays and files
    @property
    def coefs(self) -> list[np.ndarray]:
        return list(self.clf.coefs_)

    @property
    def intercepts(self) -> list[np.ndarray]:
        return list(self.clf.intercepts_)

    def weights(self) -> list[np.ndarray]:
        """Flower-style NDArrays: coefs then intercepts."""
        return self.coefs + self.intercepts

    def copy(self) -> "OnlineHead":
        return OnlineHead.from_bytes(self.to_bytes())

    def to_arrays(self) -> dict[str, np.ndarray]:
        arrays: dict[str, np.ndarray] = {}
        for i, (c, b) in enumerate(zip(self.clf.coefs_, self.clf.intercepts_)):
            arrays[f"coef_{i}"] = np.asarray(c, np.float32)
            arrays[f"intercept_{i}"] = np.asarray(b, np.float32)
        opt = getattr(self.clf, "_optimizer", None)
        if isinstance(opt, AdamOptimizer):
            for i, (m, v) in enumerate(zip(opt.ms, opt.vs)):
                arrays[f"adam_m_{i}"] = np.asarray(m, np.float64)
                arrays[f"adam_v_{i}"] = np.asarray(v, np.float64)
            arrays["adam_t"] = np.asarray(opt.t, np.int64)
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
                opt = AdamOptimizer(head.clf.coefs_ + head.clf.intercepts_, params.learning_rate_init)
                opt.ms = [np.array(npz[f"adam_m_{i}"], np.float64) for i in range(2 * n_layers)]
                opt.vs = [np.array(npz[f"adam_v_{i}"], np.float64) for i in range(2 * n_layers)]
                opt.t = int(npz["adam_t"])
                head.clf._optimizer = opt
            return head
        except HeadFormatError:
            raise
        except (KeyError, ValueError, TypeError, json.JSONDecodeError) as exc:
            raise HeadFormatError(f"invalid head arrays: {exc}") from exc

    @classmethod
    def from_bytes(cls, data: bytes) -> "OnlineHead":
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                return cls.from_npz(npz)
        except HeadFormatError:
            raise
        except (OSError, ValueError, EOFError) as exc:
            raise HeadFormatError(f"not a head npz file: {exc}") from exc

    @classmethod
    def load(cls, path) -> "OnlineHead":
        with open(path, "rb") as fh:
            return cls.from_bytes(fh.read())


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
