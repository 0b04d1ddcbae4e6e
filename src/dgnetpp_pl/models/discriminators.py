"""Discriminators: the multi-scale image discriminator D_img and the domain discriminator D_dom."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from dgnetpp_pl.models.blocks import Conv2dBlock, ResBlocks, init_weights, make_activation


class MultiScaleImageDiscriminator(nn.Module):
    """LSGAN patch discriminator at `num_scales` scales (official `MsImageDis`), shared by both domains.

    `forward(x (B, in_ch, H, W)) -> [(B, 1, H/4, W/4), (B, 1, H/8, W/8), ...]` for n_layer=2; the input is
    downsampled between scales by AvgPool2d(3, 2, 1, count_include_pad=False).
    """

    def __init__(
        self,
        in_ch: int = 3,
        dim: int = 32,
        n_layer: int = 2,
        n_res: int = 4,
        num_scales: int = 3,
        norm: str = "none",
        activ: str = "lrelu",
        pad: str = "reflect",
        init: str = "gaussian",
    ) -> None:
        super().__init__()
        if num_scales < 1 or n_layer < 1:
            raise ValueError(
                f"MultiScaleImageDiscriminator: num_scales ({num_scales}) and n_layer ({n_layer}) must be >= 1"
            )
        self.downsample = nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False)
        self.nets = nn.ModuleList(
            self._make_net(in_ch, dim, n_layer, n_res, norm, activ, pad) for _ in range(num_scales)
        )
        init_weights(self, init)

    @staticmethod
    def _make_net(in_ch: int, dim: int, n_layer: int, n_res: int, norm: str, activ: str, pad: str) -> nn.Module:
        kw = {"norm": norm, "activation": activ, "pad_type": pad}
        layers: list[nn.Module] = [
            Conv2dBlock(in_ch, dim, 1, 1, 0, **kw),
            Conv2dBlock(dim, dim, 3, 1, 1, **kw),
            Conv2dBlock(dim, dim, 3, 2, 1, **kw),
        ]
        for _ in range(n_layer - 1):
            wider = min(dim * 2, 512)
            layers += [Conv2dBlock(dim, dim, 3, 1, 1, **kw), Conv2dBlock(dim, wider, 3, 2, 1, **kw)]
            dim = wider
        layers += [ResBlocks(n_res, dim, norm=norm, activation=activ, pad_type=pad), nn.Conv2d(dim, 1, 1)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> list[Tensor]:
        outs = []
        for i, net in enumerate(self.nets):
            if i:
                x = self.downsample(x)
            outs.append(net(x))
        return outs


class DomainDiscriminator(nn.Module):
    """MLP on the global appearance feature (official `IdDis`): `(B, in_dim) -> (B,)` LSGAN scores.

    Each hidden block is Linear + BatchNorm1d + LeakyReLU(0.2); a final Linear maps to one score.
    """

    def __init__(self, in_dim: int = 2048, hidden: Sequence[int] = (1024, 512, 256), init: str = "gaussian") -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.BatchNorm1d(h), make_activation("lrelu")]
            width = h
        layers.append(nn.Linear(width, 1))
        self.model = nn.Sequential(*layers)
        init_weights(self, init)

    def forward(self, feat: Tensor) -> Tensor:
        if feat.dim() != 2:
            raise ValueError(f"DomainDiscriminator expects features (B, D), got shape {tuple(feat.shape)}")
        return self.model(feat).view(-1)
