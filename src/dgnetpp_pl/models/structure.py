"""Structure encoder E_str: a gray image to a spatial structure code (official `ContentEncoder`)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from dgnetpp_pl.models.blocks import ASPP, Conv2dBlock, ResBlocks, init_weights
from dgnetpp_pl.models.recompute import checkpoint_chain


def to_gray(x: Tensor) -> Tensor:
    """Plain mean over the 3 normalised RGB channels (official `to_gray`): `(B, 3, H, W) -> (B, 1, H, W)`."""
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"to_gray expects an RGB batch (B, 3, H, W), got shape {tuple(x.shape)}")
    return x.mean(dim=1, keepdim=True)


class StructureEncoder(nn.Module):
    """Gray image `(B, in_ch, H, W)` -> structure code `(B, out_dim, H / k, W / k)`, k = 2**n_downsample.

    With dim d and n_downsample 2: convs d (stride 2), 2d, 2d, 4d (stride 2), `n_res` ResBlocks(4d) and
    ASPP(4d) -> 8d channels, i.e. 128x64x32 for the paper's d=16 at 256x128. With `checkpoint`, backward
    recomputes the encoder from its 1-channel input instead of storing its activations.
    """

    def __init__(
        self,
        in_ch: int = 1,
        dim: int = 16,
        n_downsample: int = 2,
        n_res: int = 4,
        activ: str = "lrelu",
        pad: str = "reflect",
        norm: str = "in",
        aspp_dilations: Sequence[int] = (3, 6, 9),
        init: str = "kaiming",
        checkpoint: bool = False,
    ) -> None:
        super().__init__()
        if n_downsample < 1:
            raise ValueError(f"StructureEncoder: n_downsample must be >= 1, got {n_downsample}")
        layers: list[nn.Module] = [
            Conv2dBlock(in_ch, dim, 3, 2, 1, norm=norm, activation=activ, pad_type=pad),
            Conv2dBlock(dim, 2 * dim, 3, 1, 1, norm=norm, activation=activ, pad_type=pad),
            Conv2dBlock(2 * dim, 2 * dim, 3, 1, 1, norm=norm, activation=activ, pad_type=pad),
        ]
        width = 2 * dim
        for _ in range(n_downsample - 1):
            layers.append(Conv2dBlock(width, 2 * width, 3, 2, 1, norm=norm, activation=activ, pad_type=pad))
            width *= 2
        layers.append(ResBlocks(n_res, width, norm=norm, activation=activ, pad_type=pad))
        layers.append(ASPP(width, norm=norm, activation=activ, pad_type=pad, dilations=aspp_dilations))
        self.model = nn.Sequential(*layers)
        self._out_dim = 2 * width
        self.checkpoint = checkpoint
        init_weights(self, init)

    @property
    def out_dim(self) -> int:
        """Channels of the structure code (128 for the paper's network)."""
        return self._out_dim

    def forward(self, x: Tensor) -> Tensor:
        if self.checkpoint:
            return checkpoint_chain([list(self.model)], x)
        return self.model(x)
