"""The source-trained ResNet teacher of the official round 0 (the re-ID baseline's `ft_net`)."""

from __future__ import annotations

from collections import OrderedDict

import torch.nn.functional as F
from torch import Tensor, nn

from dgnetpp_pl.models.appearance import ClassBlock, _build_resnet, _set_last_stride_one


class Teacher(nn.Module):
    """ResNet trunk, global average pooling and one id head: `(B, 3, H, W) -> logits (B, num_classes)`.

    Last stride 2 by default (the baseline's default), 1 on request. The head is Linear(C -> bottleneck) ->
    BN1d -> Dropout(`droprate`) -> Linear(bottleneck -> num_classes), as the baseline's ClassBlock; the
    ImageNet `fc` is not kept.
    """

    def __init__(
        self,
        num_classes: int,
        arch: str = "resnet50",
        pretrained: bool = False,
        last_stride: int = 2,
        bottleneck_dim: int = 512,
        droprate: float = 0.5,
    ) -> None:
        super().__init__()
        if last_stride not in (1, 2):
            raise ValueError(f"Teacher: last_stride must be 1 or 2, got {last_stride}")
        resnet = _build_resnet(arch, pretrained)
        if last_stride == 1:
            _set_last_stride_one(resnet)
        names = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
        self.backbone = nn.Sequential(OrderedDict((n, getattr(resnet, n)) for n in names))
        self.arch = arch
        self.last_stride = last_stride
        self.head = ClassBlock(resnet.fc.in_features, num_classes, bottleneck_dim, droprate)

    @property
    def num_classes(self) -> int:
        """Number of source identities the head scores."""
        return self.head.classifier.out_features

    def feature_map(self, x: Tensor) -> Tensor:
        """Last-stage map `(B, C, H/32, W/32)` (last stride 2) or `(B, C, H/16, W/16)` (last stride 1)."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"Teacher expects (B, 3, H, W), got shape {tuple(x.shape)}")
        return self.backbone(x)

    def pooled(self, x: Tensor) -> Tensor:
        """Average-pooled feature `(B, C)` (2048 for resnet50)."""
        return F.adaptive_avg_pool2d(self.feature_map(x), 1).flatten(1)

    def embedding(self, x: Tensor) -> Tensor:
        """The head's bottleneck output after BN `(B, bottleneck_dim)`: the baseline's test-time feature."""
        _, emb = self.head(self.pooled(x))
        return emb

    def forward(self, x: Tensor) -> Tensor:
        logits, _ = self.head(self.pooled(x))
        return logits
