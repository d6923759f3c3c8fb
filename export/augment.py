"""Batched augmentation on uint8 face crops, in torch, mimicking the camera-side shift.

Geometry (scale/shift jitter, small rotations, flips) is one ``grid_sample``; photometry
(brightness, contrast, gamma, blur, sensor noise, occlusion) is a few tensor ops. It all
runs in the training process: no worker processes competing for two cores.
The last step is the device's own normalisation constants from ``PreprocessSpec``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from infantino.edge_runtime.core.preprocess import DEFAULT_SPEC, PreprocessSpec


@dataclass(frozen=True)
class AugmentConfig:
    max_rotation_deg: float = 15.0
    scale_range: tuple[float, float] = (0.85, 1.15)
    max_shift: float = 0.08
    flip_prob: float = 0.5
    brightness: float = 0.2
    contrast: tuple[float, float] = (0.7, 1.3)
    gamma: tuple[float, float] = (0.7, 1.4)
    blur_prob: float = 0.2
    noise_prob: float = 0.3
    noise_std: float = 0.05
    erase_prob: float = 0.25


def normalize_torch(x01: torch.Tensor, spec: PreprocessSpec = DEFAULT_SPEC) -> torch.Tensor:
    """The device's ``normalize`` for a float batch already in [0, 1]."""
    return (x01 - spec.mean) / spec.std


def to_unit(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W) -> float32 (N, 1, H, W) in [0, 1], exactly as ``normalize`` scales."""
    return pixels.to(torch.float32).mul_(1.0 / 255.0).unsqueeze(1)


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=g) * (hi - lo) + lo


def _geometry(x: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    angle = _uniform(n, -cfg.max_rotation_deg, cfg.max_rotation_deg, g) * (math.pi / 180.0)
    scale = _uniform(n, *cfg.scale_range, g)
    flip = torch.where(torch.rand(n, generator=g) < cfg.flip_prob, -1.0, 1.0)
    tx, ty = (_uniform(n, -cfg.max_shift, cfg.max_shift, g) * 2 for _ in range(2))
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos * flip, -sin, tx], 1), torch.stack([sin * flip, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _blur(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    k = torch.tensor([1.0, 2.0, 1.0])
    kernel = (k[:, None] * k[None, :] / 16.0).view(1, 1, 3, 3)
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel)
    return torch.where(mask.view(-1, 1, 1, 1), blurred, x)


def _erase(x: torch.Tensor, prob: float, g: torch.Generator) -> torch.Tensor:
    n, _, h, w = x.shape
    mask = torch.rand(n, generator=g) < prob
    if not mask.any():
        return x
    eh = (torch.rand(n, generator=g) * 0.3 + 0.1) * h
    ew = (torch.rand(n, generator=g) * 0.3 + 0.1) * w
    y0 = torch.rand(n, generator=g) * (h - eh)
    x0 = torch.rand(n, generator=g) * (w - ew)
    ys = torch.arange(h).view(1, h, 1)
    xs = torch.arange(w).view(1, 1, w)
    box = (ys >= y0.view(-1, 1, 1)) & (ys < (y0 + eh).view(-1, 1, 1)) & (xs >= x0.view(-1, 1, 1)) & (xs < (x0 + ew).view(-1, 1, 1))
    box = box & mask.view(-1, 1, 1)
    fill = torch.rand(n, generator=g).view(-1, 1, 1).expand(n, h, w)
    return torch.where(box.unsqueeze(1), fill.unsqueeze(1), x)


def augment(pixels: torch.Tensor, g: torch.Generator, cfg: AugmentConfig = AugmentConfig(), spec: PreprocessSpec = DEFAULT_SPEC) -> torch.Tensor:
    """uint8 (N, H, W) crops -> augmented, normalised float32 (N, 1, H, W)."""
    x = _geometry(to_unit(pixels), cfg, g)
    n = x.shape[0]
    shape = (n, 1, 1, 1)
    x = x + _uniform(n, -cfg.brightness, cfg.brightness, g).view(shape)
    mean = x.mean(dim=(2, 3), keepdim=True)
    x = (x - mean) * _uniform(n, *cfg.contrast, g).view(shape) + mean
    x = x.clamp(0.0, 1.0).pow(_uniform(n, *cfg.gamma, g).view(shape))
    x = _blur(x, torch.rand(n, generator=g) < cfg.blur_prob)
    noisy = (torch.rand(n, generator=g) < cfg.noise_prob).view(shape)
    sigma = _uniform(n, 0.0, cfg.noise_std, g).view(shape)
    x = x + torch.randn(x.shape, generator=g) * sigma * noisy
    x = _erase(x.clamp(0.0, 1.0), cfg.erase_prob, g)
    return normalize_torch(x, spec)
