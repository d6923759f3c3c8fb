"""The one reader of a served head's bytes on the server (``head.npz``: ``coef_<i>``,
``intercept_<i>``, ``classes``, ``meta``) that builds no sklearn object: the store caches
heads read with it and a round steps the arrays it returns."""
from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class HeadArrays:
    layers: tuple  # float32 arrays, coef_0.. then intercept_0.. (the flat vector's order)
    classes: tuple  # class names, the column order of predict_proba
    params: dict  # HeadParams as a dict (hidden_layer_sizes, ...)


def read_head(blob: bytes) -> HeadArrays:
    """The arrays, classes and parameters of a head npz (no pickle)."""
    with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
        params = json.loads(str(npz["meta"]))["params"]
        n_layers = len(params["hidden_layer_sizes"]) + 1
        coefs = [np.asarray(npz[f"coef_{i}"], np.float32) for i in range(n_layers)]
        intercepts = [np.asarray(npz[f"intercept_{i}"], np.float32) for i in range(n_layers)]
        classes = tuple(str(c) for c in npz["classes"])
    return HeadArrays(tuple(coefs + intercepts), classes, params)
