"""Appearance encoder E_app shared by both domains (official `ft_netABe`): ResNet with two id heads."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from dgnetpp_pl.models.recompute import checkpoint_chain

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


class AppearanceOutput(NamedTuple):
    """What `AppearanceEncoder.forward` returns.

    `code` (B, C*parts) appearance code v (channel-major, detached when `detach_code`); `feat` (B, C) global
    max-pooled feature (official `fe`); `logits` two (B, N); `embeddings` two (B, bottleneck) after BN.
    """

    code: Tensor
    feat: Tensor
    logits: tuple[Tensor, Tensor]
    embeddings: tuple[Tensor, Tensor]


class ClassBlock(nn.Module):
    """Id head: Linear(in -> bottleneck) -> BN1d -> Dropout(p) -> Linear(bottleneck -> N), no ReLU."""

    def __init__(self, in_dim: int, num_classes: int, bottleneck_dim: int = 512, droprate: float = 0.5) -> None:
        super().__init__()
        self.bottleneck = nn.Sequential(nn.Linear(in_dim, bottleneck_dim), nn.BatchNorm1d(bottleneck_dim))
        self.dropout = nn.Dropout(droprate)
        self.classifier = _new_classifier(bottleneck_dim, num_classes)
        nn.init.kaiming_normal_(self.bottleneck[0].weight, a=0, mode="fan_out")
        nn.init.zeros_(self.bottleneck[0].bias)
        nn.init.ones_(self.bottleneck[1].weight)
        nn.init.zeros_(self.bottleneck[1].bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """`(B, in_dim) -> (logits (B, N), embedding (B, bottleneck))`."""
        emb = self.bottleneck(x)
        return self.classifier(self.dropout(emb)), emb


def _new_classifier(in_dim: int, num_classes: int) -> nn.Linear:
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    linear = nn.Linear(in_dim, num_classes)
    nn.init.normal_(linear.weight, 0.0, 0.001)
    nn.init.zeros_(linear.bias)
    return linear


def _build_resnet(arch: str, pretrained: bool) -> nn.Module:
    """torchvision ResNet, with ImageNet weights through the weights enum when `pretrained`."""
    if arch not in ARCHS:
        raise ValueError(f"AppearanceEncoder: unknown arch {arch!r}; use one of {ARCHS}")
    factory = getattr(torchvision.models, arch)
    if not pretrained:
        return factory(weights=None)
    weights = torchvision.models.get_model_weights(arch).IMAGENET1K_V1
    filename = weights.url.rsplit("/", 1)[-1]
    try:
        return factory(weights=weights)
    except (OSError, RuntimeError) as err:  # URLError / HTTPError are OSErrors; a bad hash is a RuntimeError
        raise RuntimeError(
            f"Could not load the ImageNet weights of {arch} ({weights.url}): {err}. "
            f"Without internet, pre-place the weights file at $TORCH_HOME/hub/checkpoints/{filename} (here: "
            f"{torch.hub.get_dir()}/checkpoints/{filename}), or set model.pretrained=false."
        ) from err


def _set_last_stride_one(resnet: nn.Module) -> None:
    first = resnet.layer4[0]
    if isinstance(first, Bottleneck):
        first.conv2.stride = (1, 1)
    elif isinstance(first, BasicBlock):
        first.conv1.stride = (1, 1)
    else:
        raise TypeError(f"unsupported ResNet block type {type(first).__name__}")
    if first.downsample is not None:
        first.downsample[0].stride = (1, 1)


class AppearanceEncoder(nn.Module):
    """ResNet appearance encoder `(B, 3, H, W)` -> `AppearanceOutput` (8192-d code, 2048-d feat for resnet50).

    `pretrained=True` downloads (or reads from the torch hub cache) the ImageNet weights; the heads are
    separate from the backbone so the optimiser can give them a larger learning rate. With `checkpoint`, the
    trunk keeps only the input of each stage for backward and recomputes the rest (`recompute`).
    """

    def __init__(
        self,
        num_classes: int,
        arch: str = "resnet50",
        pretrained: bool = False,
        last_stride: int = 1,
        bottleneck_dim: int = 512,
        droprates: Sequence[float] = (0.5, 0.75),
        parts: int = 4,
        detach_code: bool = True,
        checkpoint: bool = False,
    ) -> None:
        super().__init__()
        if last_stride not in (1, 2):
            raise ValueError(f"AppearanceEncoder: last_stride must be 1 or 2, got {last_stride}")
        if len(droprates) != 2:
            raise ValueError(f"AppearanceEncoder: droprates needs one rate per head (2), got {droprates}")
        resnet = _build_resnet(arch, pretrained)
        if last_stride == 1:
            _set_last_stride_one(resnet)
        names = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
        # Only the trunk is kept: the ImageNet fc and avgpool are never used.
        self.backbone = nn.Sequential(OrderedDict((n, getattr(resnet, n)) for n in names))
        self._feature_dim = resnet.fc.in_features
        self.parts = parts
        self.detach_code = detach_code
        self.checkpoint = checkpoint
        self.bottleneck_dim = bottleneck_dim
        self.head1 = ClassBlock(self._feature_dim, num_classes, bottleneck_dim, droprates[0])
        self.head2 = ClassBlock(self._feature_dim, num_classes, bottleneck_dim, droprates[1])

    @property
    def feature_dim(self) -> int:
        """Channels C of the last ResNet stage (2048 for resnet50)."""
        return self._feature_dim

    @property
    def code_dim(self) -> int:
        """Size of the appearance code, C * parts (8192 for the paper)."""
        return self._feature_dim * self.parts

    @property
    def num_classes(self) -> int:
        """Current number of output classes of both id heads."""
        return self.head1.classifier.out_features

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the ResNet trunk (base learning rate)."""
        return self.backbone.parameters()

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of both id heads (10x learning rate in the official optimiser)."""
        yield from self.head1.parameters()
        yield from self.head2.parameters()

    def feature_map(self, x: Tensor) -> Tensor:
        """Last-stage map: `(B, 3, H, W) -> (B, C, H/16, W/16)` with last stride 1."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"AppearanceEncoder expects (B, 3, H, W), got shape {tuple(x.shape)}")
        if self.checkpoint:
            b = self.backbone
            stages = [[b.conv1, b.bn1, b.relu, b.maxpool, b.layer1], [b.layer2], [b.layer3], [b.layer4]]
            return checkpoint_chain(stages, x)
        return self.backbone(x)

    def backbone_forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """`(B, 3, H, W) -> (code (B, C*parts), feat (B, C))` without the heads."""
        fmap = self.feature_map(x)
        # Channel-major flatten: index = c * parts + part.
        code = F.adaptive_max_pool2d(fmap, (self.parts, 1)).flatten(1)
        if self.detach_code:
            code = code.detach()
        feat = F.adaptive_max_pool2d(fmap, 1).flatten(1)
        return code, feat

    def heads(self, feat: Tensor) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """`feat (B, C) -> ((logits1, logits2) each (B, N), (emb1, emb2) each (B, bottleneck))`."""
        logits1, emb1 = self.head1(feat)
        logits2, emb2 = self.head2(feat)
        return (logits1, logits2), (emb1, emb2)

    def forward(self, x: Tensor) -> AppearanceOutput:
        code, feat = self.backbone_forward(x)
        logits, embeddings = self.heads(feat)
        return AppearanceOutput(code, feat, logits, embeddings)
