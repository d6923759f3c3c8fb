"""AdaBN: re-estimate batch-norm statistics on unlabelled target-domain crops.

Only the BN running means/variances move (no gradient step): the cheapest way to tell
an adult-face network what infant photos look like, without any labels.
"""
from __future__ import annotations

import numpy as np
import torch

from infantino.edge_runtime.core.preprocess import DEFAULT_SPEC, normalize


@torch.no_grad()
def adabn(net: torch.nn.Module, pixels: np.ndarray, batch_size: int = 64, passes: int = 2) -> int:
    """Replace every BN layer's statistics by those of ``pixels`` (uint8 N x H x W); returns #layers."""
    bns = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.training) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches
        m.train()
    x = torch.from_numpy(normalize(pixels, DEFAULT_SPEC))
    for _ in range(passes):
        for i in range(0, len(x), batch_size):
            net(x[i : i + batch_size])
    for m, (momentum, training) in zip(bns, saved):
        m.momentum = momentum
        m.train(training)
    return len(bns)
