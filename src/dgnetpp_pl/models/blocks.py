"""Convolutional building blocks shared by the generators and the discriminators.

Every block is stateless between calls: AdaIN parameters are forward arguments, never module attributes,
so the blocks work under DDP and `torch.func.functional_call`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dgnetpp_pl.models.fused_norms import adain_act, layer_norm_act, widen

PAD_TYPES = ("reflect", "zero")
NORMS = ("none", "in", "ln", "adain", "bn")
ACTIVATIONS = ("lrelu", "relu", "none")
INITS = ("kaiming", "gaussian")

AdaINParams = tuple[Tensor, Tensor]
"""Per-sample (gamma, beta) of one AdaIN layer, each `(B, C)`."""


def _check_choice(owner: str, name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{owner}: unknown {name} {value!r}; use one of {tuple(choices)}")


def make_activation(activation: str) -> nn.Module:
    """Activation by name: "lrelu" (slope 0.2, as in the official code), "relu" or "none"."""
    _check_choice("make_activation", "activation", activation, ACTIVATIONS)
    if activation == "lrelu":
        return nn.LeakyReLU(0.2)
    if activation == "relu":
        return nn.ReLU()
    return nn.Identity()


class LayerNorm(nn.Module):
    """Per-sample layer norm over (C, H, W) with the unbiased std: `(x - mu) / (sigma + eps)`.

    Followed by a per-channel affine whose gamma starts U(0, 1) and beta 0 (official decoder norm).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.affine = affine
        if affine:
            self.gamma = nn.Parameter(torch.empty(num_features).uniform_())
            self.beta = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: Tensor) -> Tensor:
        """`(B, C, H, W) -> (B, C, H, W)`; statistics in at least fp32 so bf16 autocast stays accurate."""
        wide = widen(x)
        flat = wide.reshape(x.shape[0], -1)
        shape = (-1,) + (1,) * (x.dim() - 1)
        mean = flat.mean(1).view(shape)
        std = flat.std(1).view(shape)
        out = ((wide - mean) / (std + self.eps)).to(x.dtype)
        if self.affine:
            shape = (1, -1) + (1,) * (x.dim() - 2)
            out = out * self.gamma.view(shape) + self.beta.view(shape)
        return out


class AdaptiveInstanceNorm2d(nn.Module):
    """Instance norm (eps 1e-5, no running stats) followed by a per-sample affine given as arguments."""

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps

    def forward(self, x: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
        """`x (B, C, H, W)`, `gamma`/`beta (B, C)` (std and mean of the output) -> `(B, C, H, W)`."""
        expected = (x.shape[0], self.num_features)
        if tuple(gamma.shape) != expected or tuple(beta.shape) != expected:
            raise ValueError(
                f"AdaptiveInstanceNorm2d: gamma {tuple(gamma.shape)} and beta {tuple(beta.shape)} "
                f"must both be {expected} for an input of shape {tuple(x.shape)}"
            )
        out = F.instance_norm(x, eps=self.eps)
        return out * gamma[:, :, None, None] + beta[:, :, None, None]

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


def _slope(activation: nn.Module) -> float | None:
    """The leaky-ReLU slope equal to `activation` (ReLU 0, identity 1), or None for anything else."""
    if isinstance(activation, nn.LeakyReLU):
        return float(activation.negative_slope)
    if isinstance(activation, nn.ReLU):
        return 0.0
    return 1.0 if isinstance(activation, nn.Identity) else None


def _make_norm(norm: str, channels: int) -> nn.Module:
    _check_choice("Conv2dBlock", "norm", norm, NORMS)
    if norm == "in":
        return nn.InstanceNorm2d(channels)
    if norm == "ln":
        return LayerNorm(channels)
    if norm == "adain":
        return AdaptiveInstanceNorm2d(channels)
    if norm == "bn":
        return nn.BatchNorm2d(channels)
    return nn.Identity()


class Conv2dBlock(nn.Module):
    """Explicit padding, then Conv2d (with bias), then a norm, then an activation (MUNIT / DG-Net order)."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
        norm: str = "none",
        activation: str = "relu",
        pad_type: str = "zero",
    ) -> None:
        super().__init__()
        _check_choice("Conv2dBlock", "pad_type", pad_type, PAD_TYPES)
        self.pad = nn.ReflectionPad2d(padding) if pad_type == "reflect" else nn.ZeroPad2d(padding)
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride, dilation=dilation, bias=True)
        self.norm = _make_norm(norm, out_ch)
        self.activation = make_activation(activation)
        self.is_adain = norm == "adain"
        self.pad_type = pad_type
        # LayerNorm / AdaIN + activation as one autograd function (same values, fewer stored activations).
        self.fused = False

    def forward(self, x: Tensor, adain: AdaINParams | None = None) -> Tensor:
        """`(B, in_ch, H, W) -> (B, out_ch, H', W')`; `adain=(gamma, beta)` is required for the AdaIN norm."""
        return self.finish(self.conv(self.pad(x)), adain)

    def finish(self, x: Tensor, adain: AdaINParams | None = None) -> Tensor:
        """The norm and activation applied to an already convolved `x` (for fused conv paths)."""
        slope = _slope(self.activation) if self.fused else None
        if slope is not None and isinstance(self.norm, LayerNorm) and self.norm.affine:
            return layer_norm_act(x, self.norm.gamma, self.norm.beta, self.norm.eps, slope)
        if self.is_adain:
            if adain is None:
                raise ValueError("Conv2dBlock with norm='adain' needs adain=(gamma, beta) in forward")
            if slope is not None:
                return adain_act(x, adain[0], adain[1], self.norm.eps, slope)
            x = self.norm(x, *adain)
        elif adain is not None:
            raise ValueError("Conv2dBlock: adain parameters were given but this block's norm is not 'adain'")
        else:
            x = self.norm(x)
        return self.activation(x)


class ResBlock(nn.Module):
    """Residual block: [Conv3x3, norm, act] then [Conv3x3, norm], plus the identity; `(B, C, H, W)`."""

    def __init__(self, dim: int, norm: str = "in", activation: str = "relu", pad_type: str = "zero") -> None:
        super().__init__()
        if norm == "adain":
            raise ValueError("ResBlock: use AdaINResBlock for norm='adain'")
        self.conv1 = Conv2dBlock(dim, dim, 3, 1, 1, norm=norm, activation=activation, pad_type=pad_type)
        self.conv2 = Conv2dBlock(dim, dim, 3, 1, 1, norm=norm, activation="none", pad_type=pad_type)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(self.conv1(x))


class ResBlocks(nn.Sequential):
    """`num_blocks` ResBlocks of width `dim` in sequence."""

    def __init__(
        self, num_blocks: int, dim: int, norm: str = "in", activation: str = "relu", pad_type: str = "zero"
    ) -> None:
        super().__init__(*[ResBlock(dim, norm, activation, pad_type) for _ in range(num_blocks)])


class AdaINResBlock(nn.Module):
    """Residual block whose two norms are AdaIN: [Conv3x3, AdaIN, act] then [Conv3x3, AdaIN], plus x."""

    def __init__(self, dim: int, activation: str = "lrelu", pad_type: str = "reflect") -> None:
        super().__init__()
        self.dim = dim
        self.conv1 = Conv2dBlock(dim, dim, 3, 1, 1, norm="adain", activation=activation, pad_type=pad_type)
        self.conv2 = Conv2dBlock(dim, dim, 3, 1, 1, norm="adain", activation="none", pad_type=pad_type)

    def forward(self, x: Tensor, params: tuple[AdaINParams, AdaINParams]) -> Tensor:
        """`x (B, C, H, W)`; `params` = ((gamma1, beta1), (gamma2, beta2)), each `(B, C)`."""
        return x + self.conv2(self.conv1(x, params[0]), params[1])


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling of the structure encoder: `(B, dim, H, W) -> (B, 2*dim, H, W)`.

    Four branches of dim/2 channels (a 1x1 conv; three 1x1+act then dilated 3x3 convs) are concatenated and
    fused by a 1x1 conv. Reflect padding equals the dilation.
    """

    def __init__(
        self,
        dim: int,
        norm: str = "in",
        activation: str = "lrelu",
        pad_type: str = "reflect",
        dilations: Sequence[int] = (3, 6, 9),
    ) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"ASPP: dim must be even, got {dim}")
        part = dim // 2
        self.dilations = tuple(int(d) for d in dilations)
        self.pad_type = pad_type
        self.branch1 = Conv2dBlock(dim, part, 1, norm=norm, activation="none", pad_type=pad_type)
        self.dilated = nn.ModuleList(
            nn.Sequential(
                Conv2dBlock(dim, part, 1, norm=norm, activation=activation, pad_type=pad_type),
                Conv2dBlock(part, part, 3, 1, d, dilation=d, norm=norm, activation="none", pad_type=pad_type),
            )
            for d in self.dilations
        )
        self.fuse = Conv2dBlock(
            part * (1 + len(self.dilations)), 2 * dim, 1, norm=norm, activation="none", pad_type=pad_type
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.pad_type == "reflect" and self.dilations and min(x.shape[-2:]) <= max(self.dilations):
            raise ValueError(
                f"ASPP: a {tuple(x.shape[-2:])} map is too small for reflect padding {max(self.dilations)}; "
                "use larger images or smaller ASPP dilations in the structure encoder config"
            )
        branches = [self.branch1(x)] + [branch(x) for branch in self.dilated]
        return self.fuse(torch.cat(branches, dim=1))


class MLP(nn.Sequential):
    """`n_layers` Linear layers with an activation after all but the last; `(B, in_dim) -> (B, out_dim)`."""

    def __init__(
        self, in_dim: int, out_dim: int, hidden_dim: int, n_layers: int = 3, activation: str = "lrelu"
    ) -> None:
        if n_layers < 1:
            raise ValueError(f"MLP: n_layers must be >= 1, got {n_layers}")
        layers: list[nn.Module] = []
        dims = [in_dim] + [hidden_dim] * (n_layers - 1) + [out_dim]
        for i in range(n_layers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < n_layers - 1:
                layers.append(make_activation(activation))
        super().__init__(*layers)


@torch.no_grad()
def init_weights(module: nn.Module, kind: str) -> None:
    """Initialise every Conv/Linear weight in `module` ("kaiming": normal fan_in; "gaussian": N(0, 0.02)).

    Biases are set to 0. Norm layers keep their own init (official `weights_init`).
    """
    _check_choice("init_weights", "init", kind, INITS)
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            if kind == "kaiming":
                nn.init.kaiming_normal_(m.weight, a=0, mode="fan_in")
            else:
                nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
