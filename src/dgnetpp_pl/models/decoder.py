"""Decoder G: structure code + appearance code -> image, with AdaIN driven by the appearance code.

The appearance-to-AdaIN mapping (official `mlp_w1..4`, `mlp_b1..4`) is computed inside `forward` and the
per-sample (gamma, beta) are passed down as arguments, so the module holds no per-call state.
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from dgnetpp_pl.models.blocks import MLP, AdaINParams, AdaINResBlock, Conv2dBlock, init_weights
from dgnetpp_pl.models.upsample_conv import upsample_conv2d


class Decoder(nn.Module):
    """`forward(structure (B, content_dim, h, w), code (B, code_dim))` -> image `(B, out_ch, h*f, w*f)`.

    `n_res` AdaIN ResBlocks, `n_upsample` x [nearest x2, Conv5x5, LayerNorm, act] halving the channels, then
    Conv3x3, Conv3x3 and Conv1x1 to `out_ch`, with no output activation. The code is split into `n_res`
    consecutive chunks; chunk k feeds one weight MLP (AdaIN gamma) and one bias MLP (AdaIN beta) that
    drive the two AdaIN layers of ResBlock k. The upsampling factor is f = 2**n_upsample. With `checkpoint`,
    backward recomputes the decoder from its inputs rather than keeping its activations. With `fused`,
    each nearest upsampling and the convolution after it run as one convolution on the low-resolution map
    (about a third of the multiply-adds; `upsample_conv`), and each LayerNorm or AdaIN with its activation
    runs as one autograd function that stores one tensor (`fused_norms`). Same results either way.
    """

    def __init__(
        self,
        content_dim: int = 128,
        code_dim: int = 8192,
        n_res: int = 4,
        n_upsample: int = 2,
        mlp_dim: int = 512,
        mlp_layers: int = 3,
        out_ch: int = 3,
        activ: str = "lrelu",
        pad: str = "reflect",
        init: str = "kaiming",
        checkpoint: bool = False,
        fused: bool = True,
    ) -> None:
        super().__init__()
        if n_res < 1 or code_dim % n_res:
            raise ValueError(f"Decoder: code_dim {code_dim} must split into n_res={n_res} equal chunks (n_res >= 1)")
        if content_dim % (2**n_upsample):
            raise ValueError(f"Decoder: content_dim {content_dim} must be divisible by 2**n_upsample")
        self.content_dim = content_dim
        self.code_dim = code_dim
        self.n_res = n_res
        self.chunk_dim = code_dim // n_res
        self.checkpoint = checkpoint
        self.res_blocks = nn.ModuleList(AdaINResBlock(content_dim, activ, pad) for _ in range(n_res))
        layers: list[nn.Module] = []
        width = content_dim
        for _ in range(n_upsample):
            layers += [
                nn.Upsample(scale_factor=2, mode="nearest"),
                Conv2dBlock(width, width // 2, 5, 1, 2, norm="ln", activation=activ, pad_type=pad),
            ]
            width //= 2
        layers += [
            Conv2dBlock(width, width, 3, 1, 1, norm="none", activation=activ, pad_type=pad),
            Conv2dBlock(width, width, 3, 1, 1, norm="none", activation=activ, pad_type=pad),
            Conv2dBlock(width, out_ch, 1, 1, 0, norm="none", activation="none", pad_type=pad),
        ]
        self.upsample = nn.Sequential(*layers)
        self.fused = fused
        # Each MLP outputs the parameters of the two AdaIN layers of one ResBlock.
        self.mlp_w = nn.ModuleList(
            MLP(self.chunk_dim, 2 * content_dim, mlp_dim, mlp_layers, activ) for _ in range(n_res)
        )
        self.mlp_b = nn.ModuleList(
            MLP(self.chunk_dim, 2 * content_dim, mlp_dim, mlp_layers, activ) for _ in range(n_res)
        )
        init_weights(self, init)

    @property
    def fused(self) -> bool:
        """Whether the fused upsampling and norm paths run (kept in step with every Conv2dBlock)."""
        return self._fused

    @fused.setter
    def fused(self, value: bool) -> None:
        self._fused = bool(value)
        for layer in self.modules():
            if isinstance(layer, Conv2dBlock):
                layer.fused = self._fused

    def adain_params(self, code: Tensor) -> list[tuple[AdaINParams, AdaINParams]]:
        """Per-ResBlock ((gamma1, beta1), (gamma2, beta2)), each `(B, content_dim)`, from `(B, code_dim)`.

        Gamma is the output std and beta the output mean of each AdaIN layer.
        """
        if code.dim() != 2 or code.shape[1] != self.code_dim:
            raise ValueError(
                f"Decoder: appearance code must be (B, {self.code_dim}), got {tuple(code.shape)}; "
                "check that the decoder's code_dim matches the appearance encoder's code_dim"
            )
        c = self.content_dim
        params = []
        for chunk, mlp_w, mlp_b in zip(code.split(self.chunk_dim, dim=1), self.mlp_w, self.mlp_b, strict=True):
            w, b = mlp_w(chunk), mlp_b(chunk)
            params.append(((w[:, :c], b[:, :c]), (w[:, c:], b[:, c:])))
        return params

    def forward(self, structure: Tensor, code: Tensor) -> Tensor:
        if structure.dim() != 4 or structure.shape[1] != self.content_dim:
            raise ValueError(
                f"Decoder: structure code must be (B, {self.content_dim}, h, w), got {tuple(structure.shape)}"
            )
        if structure.shape[0] != code.shape[0]:
            raise ValueError(f"Decoder: batch sizes differ (structure {structure.shape[0]}, code {code.shape[0]})")
        if self.checkpoint and torch.is_grad_enabled():
            # Keep only the inputs; backward recomputes the whole decoder (its forward is ~1/3 of its cost).
            return torch.utils.checkpoint.checkpoint(self._decode, structure, code, use_reentrant=False)
        return self._decode(structure, code)

    def _decode(self, structure: Tensor, code: Tensor) -> Tensor:
        x = structure
        for block, params in zip(self.res_blocks, self.adain_params(code), strict=True):
            x = block(x, params)
        return self._upsample(x)

    def _upsample(self, x: Tensor) -> Tensor:
        """`self.upsample` in order; with `fused` each (Upsample, Conv2dBlock) pair runs fused."""
        layers = iter(self.upsample)
        for layer in layers:
            if self.fused and isinstance(layer, nn.Upsample):
                block = next(layers)  # every Upsample is followed by its Conv2dBlock
                x = block.finish(upsample_conv2d(x, block.conv.weight, block.conv.bias, block.pad_type))
            else:
                x = layer(x)
        return x
