"""Rebuild a trainable torch network from a package's fp32 ``extractor.onnx``.

A model package ships ONNX, not torch checkpoints, so fine-tuning a released extractor
(per cross-validation fold, or for the next release) starts from its ONNX graph. The
exporter folded every BatchNorm into the convolution before it: each conv here gets the
folded weight and bias, and its BatchNorm becomes the identity with the bias as its shift
(running mean 0, variance 1 - eps, weight 1). In eval mode that is exactly the exported
function; fine-tune it with frozen BatchNorm statistics (``freeze_batchnorm``), since the
original batch statistics are no longer separable. The 7-class layer is not part of the
extractor and is re-fitted on embeddings (``fit_classifier``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from .model import ExpressionNet, ModelConfig


def _conv_bn_pairs(backbone: nn.Module) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
    """Each conv of the backbone with the BatchNorm that follows it, in forward order."""
    mods = [m for m in backbone.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
    pairs = []
    for a, b in zip(mods, mods[1:]):
        if isinstance(a, nn.Conv2d) and isinstance(b, nn.BatchNorm2d):
            pairs.append((a, b))
    return pairs


def net_from_onnx(path: str | Path, config: ModelConfig = ModelConfig()) -> ExpressionNet:
    """An ``ExpressionNet`` whose ``embedding`` equals the ONNX extractor's output."""
    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    net = ExpressionNet(config)
    pairs = _conv_bn_pairs(net.backbone)
    if len(pairs) != len(convs):
        raise ValueError(f"{Path(path).name}: {len(convs)} convolutions, {config.arch} has {len(pairs)}")
    with torch.no_grad():
        for node, (conv, bn) in zip(convs, pairs):
            w, b = inits[node.input[1]], inits[node.input[2]]
            if tuple(w.shape) != tuple(conv.weight.shape):
                raise ValueError(f"{node.name}: weight {w.shape} does not fit {tuple(conv.weight.shape)}")
            conv.weight.copy_(torch.from_numpy(w))
            bn.weight.fill_(1.0)
            bn.bias.copy_(torch.from_numpy(b))
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0 - bn.eps)
        lin, bn1d = net.embed[1], net.embed[2]
        lin.weight.copy_(torch.from_numpy(inits["net.embed.1.weight"]))
        lin.bias.copy_(torch.from_numpy(inits["net.embed.1.bias"]))
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(bn1d, name).copy_(torch.from_numpy(inits[f"net.embed.2.{name}"]))
    return net.eval()


def freeze_batchnorm(net: nn.Module) -> None:
    """Keep every BatchNorm in eval mode (stored statistics) while the rest trains."""
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def fit_classifier(net: ExpressionNet, embeddings: np.ndarray, labels: np.ndarray) -> None:
    """Set the 7-class layer to a multinomial logistic regression on fixed embeddings."""
    from sklearn.linear_model import LogisticRegression

    lr = LogisticRegression(max_iter=300, C=1.0).fit(embeddings, labels)
    with torch.no_grad():
        net.classifier.weight.copy_(torch.from_numpy(lr.coef_.astype(np.float32)))
        net.classifier.bias.copy_(torch.from_numpy(lr.intercept_.astype(np.float32)))
