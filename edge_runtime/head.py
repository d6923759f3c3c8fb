"""The on-device head: a scikit-learn ``MLPClassifier`` that travels as plain arrays.

``head.npz`` holds ``coef_<i>``, ``intercept_<i>``, ``classes`` (names, column order of
``predict_proba``) and ``meta`` (JSON: hyper-parameters, version); optionally the Adam
moments (``adam_m_<i>``, ``adam_v_<i>``, ``adam_t``) so learning resumes smoothly after a
restart. It is loaded with ``allow_pickle=False``: a head file can never run code.

On the device the hot paths (``predict_proba``, ``learn_step``) run the MLP's forward
pass, backprop and Adam update in numpy on the very arrays that are the classifier's
``coefs_`` / ``intercepts_`` (same formulas as scikit-learn, tested for parity). The
``MLPClassifier`` itself is built only when someone asks for ``head.clf`` (export,
``partial_fit``): importing scikit-learn pulls in SciPy and costs ~90 MB of RSS and
seconds of start-up on a camera, for a 64x64x7 network.
"""
from __future__ import annotations

import io
import json
import warnings
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from .atomic import atomic_write_bytes
from .preprocess import CLASSES

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


def new_classifier(params: HeadParams, max_iter: int = 200) -> "MLPClassifier":
    from sklearn.neural_network import MLPClassifier

    return MLPClassifier(
        hidden_layer_sizes=params.hidden_layer_sizes, activation=params.activation, solver="adam",
        alpha=params.alpha, learning_rate_init=params.learning_rate_init, batch_size=params.batch_size,
        random_state=params.random_state, max_iter=max_iter,
    )


# --------------------------------------------------------------------------- numpy MLP math
# The same formulas as sklearn.neural_network (_base.ACTIVATIONS / DERIVATIVES, _backprop,
# _compute_loss_grad, AdamOptimizer); tests compare both.

def _activate(name: str, z: np.ndarray) -> np.ndarray:
    if name == "relu":
        return np.maximum(z, 0, out=z)
    if name == "tanh":
        return np.tanh(z, out=z)
    if name == "logistic":
        return np.divide(1.0, 1.0 + np.exp(-z), out=z)
    if name == "identity":
        return z
    raise HeadFormatError(f"unknown activation {name!r}")


def _derivative(name: str, a: np.ndarray, delta: np.ndarray) -> None:
    """Multiply ``delta`` in place by the activation's derivative, given the activation ``a``."""
    if name == "relu":
        delta[a == 0] = 0
    elif name == "tanh":
        delta *= 1 - a**2
    elif name == "logistic":
        delta *= a * (1 - a)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


class _Adam:
    """Adam state with sklearn's ``AdamOptimizer`` attribute names and update rule."""

    def __init__(self, params: Sequence[np.ndarray], learning_rate_init: float, beta_1: float = 0.9,
                 beta_2: float = 0.999, epsilon: float = 1e-8):
        self.learning_rate_init = float(learning_rate_init)
        self.learning_rate = self.learning_rate_init
        self.beta_1, self.beta_2, self.epsilon = beta_1, beta_2, epsilon
        self.t = 0
        self.ms = [np.zeros_like(p) for p in params]
        self.vs = [np.zeros_like(p) for p in params]

    def update_params(self, params: Sequence[np.ndarray], grads: Sequence[np.ndarray]) -> None:
        self.t += 1
        b1, b2 = self.beta_1, self.beta_2
        self.ms = [b1 * m + (1 - b1) * g for m, g in zip(self.ms, grads)]
        self.vs = [b2 * v + (1 - b2) * (g**2) for v, g in zip(self.vs, grads)]
        self.learning_rate = self.learning_rate_init * np.sqrt(1 - b2**self.t) / (1 - b1**self.t)
        for p, m, v in zip(params, self.ms, self.vs):
            p -= self.learning_rate * m / (np.sqrt(v) + self.epsilon)


@dataclass
class HeadCheckpoint:
    """An in-memory copy of everything a learning step changes, for a cheap rollback."""

    weights: list[np.ndarray]
    ms: list[np.ndarray] | None
    vs: list[np.ndarray] | None
    t: int
    version: int


class OnlineHead:
    """An ``MLPClassifier`` whose classes are fixed (``CLASSES`` order) and whose weights are arrays.

    ``version`` counts accepted updates; it is what the sync server compares.
    """

    def __init__(self, clf: "MLPClassifier | None", classes: Sequence[str] = CLASSES, params: HeadParams = HeadParams(),
                 version: int = 0):
        self._clf = clf
        self.classes = tuple(classes)
        self.params = params
        self.version = int(version)
        self._coefs: list[np.ndarray] = list(clf.coefs_) if clf is not None else []
        self._intercepts: list[np.ndarray] = list(clf.intercepts_) if clf is not None else []
        self._adam: Any = getattr(clf, "_optimizer", None) if clf is not None else None

    # ---------------------------------------------------------------- construction
    @classmethod
    def fit(cls, embeddings: np.ndarray, labels: np.ndarray, params: HeadParams = HeadParams(), max_iter: int = 200,
            classes: Sequence[str] = CLASSES) -> "OnlineHead":
        """Fit a fresh head on labelled embeddings (the bootstrap head, or a re-fit)."""
        from sklearn.exceptions import ConvergenceWarning

        clf = new_classifier(params, max_iter=max_iter)
        n = len(classes)
        # Warm the classifier with every class so classes_ is always the full range.
        clf.partial_fit(np.zeros((n, embeddings.shape[1]), np.float32), np.arange(n), classes=np.arange(n))
        # The warm-up's loss must not count as the best loss so far: warm-started fit keeps
        # sklearn's early-stopping bookkeeping and would stop after n_iter_no_change epochs.
        clf.best_loss_, clf._no_improvement_count, clf.loss_curve_ = np.inf, 0, []
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
        _activate(params.activation, np.zeros(1))  # refuses an unknown activation now, not at predict time
        head = cls(None, classes, params, version)
        head._coefs, head._intercepts = coefs, intercepts
        return head

    @property
    def clf(self) -> "MLPClassifier":
        """The scikit-learn classifier, built on first use around the same weight arrays."""
        if self._clf is None:
            from sklearn.neural_network._stochastic_optimizers import AdamOptimizer

            clf = new_classifier(self.params)
            n = len(self.classes)
            clf.partial_fit(np.zeros((n, self.input_dim)), np.arange(n), classes=np.arange(n))
            clf.coefs_, clf.intercepts_ = self._coefs, self._intercepts
            clf.t_, clf.n_iter_ = 0, 0
            del clf._optimizer  # rebuilt over the weights on the next partial_fit, unless we carry one
            if self._adam is not None:
                opt = AdamOptimizer(self.weights(), self._adam.learning_rate_init)
                opt.ms, opt.vs, opt.t = self._adam.ms, self._adam.vs, self._adam.t
                clf._optimizer = opt
            self._clf = clf
        return self._clf

    # ---------------------------------------------------------------- inference and learning
    @property
    def input_dim(self) -> int:
        return int(self.coefs[0].shape[0])

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
        acts = [np.asarray(x, np.float64)]
        coefs, intercepts = self.coefs, self.intercepts
        last = len(coefs) - 1
        for i, (w, b) in enumerate(zip(coefs, intercepts)):
            z = acts[-1] @ w
            z += b
            acts.append(_softmax(z) if i == last else _activate(self.params.activation, z))
        return acts

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities (N, n_classes) in ``classes`` order; equals ``clf.predict_proba``."""
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
        """``steps`` Adam epochs over one small batch through scikit-learn; ``version`` goes up by one."""
        x = self.check_embeddings(x)
        y = self._check_labels(y, len(x))
        clf = self.clf
        for _ in range(steps):
            clf.partial_fit(x, y)
        self._adam = clf._optimizer
        self.version += 1

    def learn_step(self, x: np.ndarray, y: np.ndarray, steps: int = 1, sample_weight: np.ndarray | None = None,
                   learning_rate: float | None = None, anchor: Sequence[np.ndarray] | None = None,
                   anchor_strength: float = 0.0) -> float:
        """``steps`` full-batch Adam steps in numpy, the same update as ``partial_fit`` on a batch of
        at most ``batch_size`` samples, without its ~ms of per-call validation. ``version`` goes up by
        one. Returns the training loss before the last step.

        ``anchor`` (weights in ``weights()`` order) adds ``anchor_strength / 2 * ||w - anchor||^2``
        to the loss (L2-SP): the head may move toward new labels but is pulled back toward the
        model it started from, which is what keeps it from forgetting adult faces."""
        x = self.check_embeddings(x)
        y = self._check_labels(y, len(x))
        sw = None if sample_weight is None else np.asarray(sample_weight, np.float64).reshape(-1, 1)
        sw_sum = float(len(x) if sw is None else sw.sum())
        onehot = np.zeros((len(x), len(self.classes)))
        onehot[np.arange(len(x)), y] = 1.0
        params = self.weights()
        adam = self._optimizer()
        saved_lr = adam.learning_rate_init
        if learning_rate is not None:  # for these steps only; the head's own rate stays as it is
            adam.learning_rate_init = float(learning_rate)
        if anchor is not None and [a.shape for a in anchor] != [p.shape for p in params]:
            raise ValueError("anchor weights do not match the head's layers")
        pull = (list(anchor), float(anchor_strength)) if anchor is not None and anchor_strength > 0 else None
        try:
            loss = self._adam_steps(x, y, onehot, sw, sw_sum, params, adam, steps, pull)
        finally:
            adam.learning_rate_init = saved_lr
        if self._clf is not None:
            self._clf.t_ = getattr(self._clf, "t_", 0) + steps * len(x)
        self.version += 1
        return loss

    def _adam_steps(self, x: np.ndarray, y: np.ndarray, onehot: np.ndarray, sw: np.ndarray | None, sw_sum: float,
                    params: list[np.ndarray], adam: Any, steps: int,
                    pull: tuple[list[np.ndarray], float] | None = None) -> float:
        coefs = self.coefs
        alpha, activation = self.params.alpha, self.params.activation
        loss = float("nan")
        for _ in range(steps):
            acts = self._forward(x)
            p = acts[-1]
            ce = -np.log(np.clip(p[np.arange(len(p)), y], np.finfo(p.dtype).eps, 1.0))
            loss = float((ce * sw[:, 0]).sum() / sw_sum if sw is not None else ce.mean())
            loss += 0.5 * alpha * sum(float(np.dot(w.ravel(), w.ravel())) for w in coefs) / sw_sum
            delta = p - onehot
            if sw is not None:
                delta *= sw
            coef_grads: list[np.ndarray] = [None] * len(coefs)  # type: ignore[list-item]
            intercept_grads: list[np.ndarray] = [None] * len(coefs)  # type: ignore[list-item]
            for i in range(len(coefs) - 1, -1, -1):
                coef_grads[i] = (acts[i].T @ delta + alpha * coefs[i]) / sw_sum
                intercept_grads[i] = delta.sum(axis=0) / sw_sum
                if i:
                    delta = delta @ coefs[i].T
                    _derivative(activation, acts[i], delta)
            grads = coef_grads + intercept_grads
            if pull is not None:
                grads = [g + pull[1] * (p - a) for g, p, a in zip(grads, params, pull[0])]
            adam.update_params(params, grads)
        return loss

    def _optimizer(self) -> Any:
        """The Adam state shared with the sklearn classifier when one was built."""
        if self._clf is not None:
            if getattr(self._clf, "_optimizer", None) is None:
                from sklearn.neural_network._stochastic_optimizers import AdamOptimizer

                self._clf._optimizer = AdamOptimizer(self.weights(), self.params.learning_rate_init)
            self._adam = self._clf._optimizer
        elif self._adam is None:
            self._adam = _Adam(self.weights(), self.params.learning_rate_init)
        return self._adam

    def checkpoint(self) -> HeadCheckpoint:
        """Copies of the weights, Adam moments and version (microseconds for a 64-64-7 head)."""
        adam = self._adam if self._clf is None else getattr(self._clf, "_optimizer", None)
        return HeadCheckpoint(
            [w.copy() for w in self.weights()],
            None if adam is None else [m.copy() for m in adam.ms],
            None if adam is None else [v.copy() for v in adam.vs],
            0 if adam is None else int(adam.t), self.version,
        )

    def restore(self, cp: HeadCheckpoint) -> None:
        """Put a checkpoint back in place (the arrays stay the same objects)."""
        for w, saved in zip(self.weights(), cp.weights):
            w[...] = saved
        adam = self._adam if self._clf is None else getattr(self._clf, "_optimizer", None)
        if adam is not None and cp.ms is not None:
            adam.ms, adam.vs, adam.t = [m.copy() for m in cp.ms], [v.copy() for v in cp.vs], cp.t
        elif adam is not None:  # there was no Adam state before the step: drop the one it created
            if self._clf is not None:
                del self._clf._optimizer
            self._adam = None
        self.version = cp.version

    # ---------------------------------------------------------------- arrays and files
    @property
    def coefs(self) -> list[np.ndarray]:
        return list(self._clf.coefs_) if self._clf is not None else list(self._coefs)

    @property
    def intercepts(self) -> list[np.ndarray]:
        return list(self._clf.intercepts_) if self._clf is not None else list(self._intercepts)

    def weights(self) -> list[np.ndarray]:
        """Flower-style NDArrays: coefs then intercepts."""
        return self.coefs + self.intercepts

    def copy(self) -> "OnlineHead":
        return OnlineHead.from_bytes(self.to_bytes())

    def to_arrays(self) -> dict[str, np.ndarray]:
        arrays: dict[str, np.ndarray] = {}
        for i, (c, b) in enumerate(zip(self.coefs, self.intercepts)):
            arrays[f"coef_{i}"] = np.asarray(c, np.float32)
            arrays[f"intercept_{i}"] = np.asarray(b, np.float32)
        opt = self._adam if self._clf is None else getattr(self._clf, "_optimizer", None)
        if opt is not None and hasattr(opt, "ms"):
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
                opt = _Adam(head.weights(), params.learning_rate_init)
                ms = [np.array(npz[f"adam_m_{i}"], np.float64) for i in range(2 * n_layers)]
                vs = [np.array(npz[f"adam_v_{i}"], np.float64) for i in range(2 * n_layers)]
                if [m.shape for m in ms] != [w.shape for w in head.weights()] or [v.shape for v in vs] != [m.shape for m in ms]:
                    raise HeadFormatError("Adam moments do not match the layer shapes")
                opt.ms, opt.vs, opt.t = ms, vs, int(npz["adam_t"])
                head._adam = opt
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
