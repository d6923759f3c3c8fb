"""Classification metrics as pure numpy functions (used by training, evaluation, server)."""
from __future__ import annotations

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts (n_classes, n_classes); rows are true classes, columns predictions."""
    m = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(m, (np.asarray(y_true, int), np.asarray(y_pred, int)), 1)
    return m


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    y_true = np.asarray(y_true)
    return float(np.mean(y_true == np.asarray(y_pred))) if len(y_true) else float("nan")


def per_class_recall(matrix: np.ndarray) -> np.ndarray:
    support = matrix.sum(axis=1)
    return np.where(support > 0, np.diag(matrix) / np.maximum(support, 1), np.nan)


def macro_f1(matrix: np.ndarray) -> float:
    """Mean F1 over the classes present in the truth (absent ones would be 0/0)."""
    tp = np.diag(matrix).astype(float)
    support = matrix.sum(axis=1)
    predicted = matrix.sum(axis=0)
    denom = support + predicted
    f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
    present = support > 0
    return float(f1[present].mean()) if present.any() else float("nan")


def summarize(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> dict:
    m = confusion_matrix(y_true, y_pred, n_classes)
    return {
        "n": int(len(y_true)),
        "accuracy": accuracy(y_true, y_pred),
        "macro_f1": macro_f1(m),
        "per_class_recall": [None if np.isnan(r) else float(r) for r in per_class_recall(m)],
        "confusion": m.tolist(),
    }


# 3-class valence of the 7 FER classes: happy is positive; angry, disgust, fear and sad are
# negative; neutral and surprise (high arousal, valence depends on context) are neutral.
VALENCE_NAMES = ("negative", "neutral", "positive")
VALENCE_OF_CLASS = np.array([0, 0, 0, 2, 0, 1, 1])  # angry disgust fear happy sad surprise neutral


def valence_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Accuracy after mapping both 7-class labels and predictions to valence."""
    return accuracy(VALENCE_OF_CLASS[np.asarray(y_true, int)], VALENCE_OF_CLASS[np.asarray(y_pred, int)])
