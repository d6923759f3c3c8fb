"""The head's boundary to scikit-learn: arrays in, ``MLPClassifier`` out, and back.

A head lives as numpy arrays (``OnlineHead``); scikit-learn is used to fit a bootstrap head,
to export it (skl2onnx) and as the oracle the numpy math is tested against. Every reach into
the classifier's internals (its Adam optimizer, its early-stopping bookkeeping) is in this
module and nowhere else. scikit-learn is imported inside the functions: a device that only
predicts and learns never loads it (nor SciPy).
"""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Sequence

import numpy as np

from .mlp import AdamState

if TYPE_CHECKING:  # pragma: no cover
    from sklearn.neural_network import MLPClassifier

    from .head import HeadParams


def new_classifier(params: "HeadParams", max_iter: int = 200) -> "MLPClassifier":
    from sklearn.neural_network import MLPClassifier

    return MLPClassifier(
        hidden_layer_sizes=params.hidden_layer_sizes, activation=params.activation, solver="adam",
        alpha=params.alpha, learning_rate_init=params.learning_rate_init, batch_size=params.batch_size,
        random_state=params.random_state, max_iter=max_iter,
    )


def _warm_up(clf: "MLPClassifier", n_classes: int, input_dim: int, dtype: np.dtype) -> None:
    """One ``partial_fit`` on zeros with every class, so ``classes_`` is always the full range."""
    clf.partial_fit(np.zeros((n_classes, input_dim), dtype), np.arange(n_classes), classes=np.arange(n_classes))


def fit_classifier(embeddings: np.ndarray, labels: np.ndarray, params: "HeadParams", max_iter: int,
                   n_classes: int) -> "MLPClassifier":
    """Fit a fresh classifier whose output columns are the ``n_classes`` class indices."""
    from sklearn.exceptions import ConvergenceWarning

    clf = new_classifier(params, max_iter=max_iter)
    _warm_up(clf, n_classes, embeddings.shape[1], np.float32)
    # The warm-up's loss must not count as the best loss so far: warm-started fit keeps
    # sklearn's early-stopping bookkeeping and would stop after n_iter_no_change epochs.
    clf.best_loss_, clf._no_improvement_count, clf.loss_curve_ = np.inf, 0, []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.set_params(warm_start=True)
        clf.fit(np.asarray(embeddings, np.float32), np.asarray(labels, np.int64))
        clf.set_params(warm_start=False)
    return clf


def build_classifier(coefs: Sequence[np.ndarray], intercepts: Sequence[np.ndarray], n_classes: int,
                     params: "HeadParams", adam: AdamState | None) -> "MLPClassifier":
    """A fitted ``MLPClassifier`` holding copies of these weights and this Adam state.

    Without an Adam state its optimizer starts fresh, as sklearn's own would on the next
    ``partial_fit``; its step counters start at zero."""
    clf = new_classifier(params)
    _warm_up(clf, n_classes, coefs[0].shape[0], coefs[0].dtype)
    clf.coefs_ = [np.array(c, copy=True) for c in coefs]
    clf.intercepts_ = [np.array(b, copy=True) for b in intercepts]
    clf.t_, clf.n_iter_ = 0, 0
    state = AdamState.zeros(clf.coefs_ + clf.intercepts_) if adam is None else adam.copy()
    opt = clf._optimizer  # the warm-up's AdamOptimizer: it keeps no weights, only moments
    opt.ms, opt.vs, opt.t = state.ms, state.vs, state.t
    return clf


def read_classifier(clf: "MLPClassifier") -> tuple[list[np.ndarray], list[np.ndarray], AdamState | None]:
    """Copies of a classifier's weights and of its Adam state (None before its first step)."""
    coefs = [np.array(c, copy=True) for c in clf.coefs_]
    intercepts = [np.array(b, copy=True) for b in clf.intercepts_]
    opt = getattr(clf, "_optimizer", None)
    adam = None if opt is None else AdamState([np.array(m) for m in opt.ms], [np.array(v) for v in opt.vs], int(opt.t))
    return coefs, intercepts, adam


def params_of(clf: "MLPClassifier") -> dict:
    """The ``HeadParams`` fields of a classifier, from its public ``get_params``."""
    p = clf.get_params()
    sizes = p["hidden_layer_sizes"]
    sizes = [int(sizes)] if np.isscalar(sizes) else [int(s) for s in sizes]
    return {"hidden_layer_sizes": sizes, "activation": p["activation"], "alpha": p["alpha"],
            "learning_rate_init": p["learning_rate_init"], "batch_size": p["batch_size"],
            "random_state": p["random_state"]}
