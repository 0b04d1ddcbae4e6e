"""One domain's generator: its own structure encoder E_str and decoder G (official `AdaINGen`)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from dgnetpp_pl.models.decoder import Decoder
from dgnetpp_pl.models.structure import StructureEncoder, to_gray


class Generator(nn.Module):
    """Structure encoder + decoder for one domain; the appearance code comes from the shared encoder.

    `encode(x (B, 3, H, W)) -> (B, 8*dim, H/4, W/4)`; `decode(s, code (B, code_dim)) -> (B, 3, H, W)`.
    """

    def __init__(
        self,
        dim: int = 16,
        n_downsample: int = 2,
        n_res: int = 4,
        code_dim: int = 8192,
        mlp_dim: int = 512,
        mlp_layers: int = 3,
        activ: str = "lrelu",
        pad: str = "reflect",
        aspp_dilations: Sequence[int] = (3, 6, 9),
        init: str = "kaiming",
        checkpoint_decoder: bool = False,
        fused: bool = True,
        checkpoint_structure: bool = False,
    ) -> None:
        super().__init__()
        self.encoder = StructureEncoder(
            in_ch=1,
            dim=dim,
            n_downsample=n_downsample,
            n_res=n_res,
            activ=activ,
            pad=pad,
            aspp_dilations=aspp_dilations,
            init=init,
            checkpoint=checkpoint_structure,
        )
        self.decoder = Decoder(
            content_dim=self.encoder.out_dim,
            code_dim=code_dim,
            n_res=n_res,
            n_upsample=n_downsample,
            mlp_dim=mlp_dim,
            mlp_layers=mlp_layers,
            out_ch=3,
            activ=activ,
            pad=pad,
            init=init,
            checkpoint=checkpoint_decoder,
            fused=fused,
        )

    def encode(self, x_rgb: Tensor) -> Tensor:
        """Structure code of a normalised RGB batch (gray inside): `(B, 3, H, W) -> (B, S, h, w)`."""
        return self.encoder(to_gray(x_rgb))

    def decode(self, structure: Tensor, code: Tensor) -> Tensor:
        """Image from a structure code `(B, S, h, w)` and an appearance code `(B, code_dim)`."""
        return self.decoder(structure, code)

    def forward(self, x_rgb: Tensor, code: Tensor) -> Tensor:
        """`decode(encode(x_rgb), code)`: the structure of `x_rgb` with the appearance `code`."""
        return self.decode(self.encode(x_rgb), code)
