"""Normalisation, affine and leaky ReLU as one autograd function each, for the decoder's two norms.

- ``layer_norm_act``: per-sample LayerNorm with the unbiased std and a per-channel affine (upsampling layers);
- ``adain_act``: instance norm with a per-sample, per-channel affine (AdaIN of the residual blocks).

The composed paths keep two to five full-size tensors per layer for backward (norm input, normalised input,
activation input, fp32 copies). These keep only the normalised input and the per-sample statistics and
recompute the rest in backward. Values and gradients equal the composed paths up to float summation order.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable


def widen(t: Tensor) -> Tensor:
    """fp16/bf16 up to fp32 for the statistics; fp32 and fp64 as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _shapes(x: Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    sample = (x.shape[0],) + (1,) * (x.dim() - 1)
    channel = (1, -1) + (1,) * (x.dim() - 2)
    return sample, channel


def _act_(y: Tensor, slope: float) -> None:
    """Leaky ReLU with ``slope`` in place (0: ReLU, 1: none); ``torch.where`` costs 20-60x as much."""
    if slope == 0.0:
        y.relu_()
    elif slope != 1.0:
        torch.nn.functional.leaky_relu_(y, slope)


def _act_backward(grad: Tensor, xhat: Tensor, gamma: Tensor, beta: Tensor, slope: float) -> Tensor:
    """The activation's backward, its input ``xhat * gamma + beta`` recomputed rather than stored."""
    if slope == 1.0:
        return grad
    pre = torch.addcmul(beta, xhat, gamma)
    return torch.ops.aten.leaky_relu_backward(grad, pre, slope, False)


class _LayerNormAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, gamma: Tensor, beta: Tensor, eps: float, slope: float) -> Tensor:  # type: ignore[override]
        sample, channel = _shapes(x)
        dims = tuple(range(1, x.dim()))
        xf = widen(x)
        n = x[0].numel()
        xhat = xf - xf.mean(dims, keepdim=True)  # two-pass statistics (torch.std is a slow Welford pass)
        std = ((xhat * xhat).sum(dims) / (n - 1)).sqrt()
        xhat.div_((std + eps).view(sample))
        y = torch.addcmul(widen(beta).view(channel), xhat, widen(gamma).view(channel))
        _act_(y, slope)
        ctx.save_for_backward(xhat, std, gamma, beta)
        ctx.eps, ctx.slope, ctx.dtype = eps, slope, x.dtype
        return y.to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor, None, None]:  # type: ignore[override]
        xhat, std, gamma, beta = ctx.saved_tensors
        sample, channel = _shapes(xhat)
        gam = widen(gamma)
        g = _act_backward(widen(grad), xhat, gam.view(channel), widen(beta).view(channel), ctx.slope)
        hw = tuple(range(2, xhat.dim()))
        sum_g = g.sum(hw)  # (B, C)
        sum_gx = (g * xhat).sum(hw)  # (B, C)
        n = xhat[0].numel()
        denom = std + ctx.eps
        # dx = (g * gamma - mean(g * gamma)) / (std + eps) - xhat * sum(g * gamma * xhat) / ((n - 1) std),
        # with d std / dx = (x - mean) / ((n - 1) std); the means and sums are over (C, H, W) per sample.
        mean_gg = (sum_g * gam).sum(1) / n
        dot = (sum_gx * gam).sum(1)
        dx = torch.addcmul((-mean_gg / denom).view(sample), xhat, (-dot / ((n - 1) * std)).view(sample))
        dx.addcmul_(g, gam.view(channel) / denom.view(sample))
        return dx.to(ctx.dtype), sum_gx.sum(0).to(gamma.dtype), sum_g.sum(0).to(beta.dtype), None, None


def layer_norm_act(x: Tensor, gamma: Tensor, beta: Tensor, eps: float = 1e-5, slope: float = 1.0) -> Tensor:
    """``act((x - mean) / (std + eps) * gamma + beta)`` per sample over all but the batch dim.

    ``x (B, C, ...)``, ``gamma``/``beta (C,)``; the activation is leaky ReLU with ``slope`` (0: ReLU, 1: none).
    Statistics are in fp32 (fp64 stays fp64) and the result has ``x``'s dtype, as in ``blocks.LayerNorm``.
    """
    if x.dim() < 2 or gamma.shape != (x.shape[1],) or beta.shape != (x.shape[1],):
        raise ValueError(
            f"layer_norm_act: gamma {tuple(gamma.shape)} and beta {tuple(beta.shape)} must be ({x.shape[1]},) "
            f"for an input of shape {tuple(x.shape)}"
        )
    return _LayerNormAct.apply(x, gamma, beta, float(eps), float(slope))


class _AdaINAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, gamma: Tensor, beta: Tensor, eps: float, slope: float) -> Tensor:  # type: ignore[override]
        xf = widen(x)
        dims = tuple(range(2, x.dim()))
        affine = (x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2)
        xhat = xf - xf.mean(dims, keepdim=True)  # two-pass statistics (torch.var_mean is a slow Welford pass)
        rstd = torch.rsqrt((xhat * xhat).sum(dims).view(affine) / xhat[0, 0].numel() + eps)
        xhat.mul_(rstd)
        y = torch.addcmul(widen(beta).reshape(affine), xhat, widen(gamma).reshape(affine))
        _act_(y, slope)
        ctx.save_for_backward(xhat, rstd, gamma, beta)
        ctx.slope, ctx.dtype = slope, x.dtype
        return y.to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor, None, None]:  # type: ignore[override]
        xhat, rstd, gamma, beta = ctx.saved_tensors
        affine = rstd.shape
        dims = tuple(range(2, xhat.dim()))
        gam = widen(gamma).reshape(affine)
        g = _act_backward(widen(grad), xhat, gam, widen(beta).reshape(affine), ctx.slope)
        sum_g = g.sum(dims)  # (B, C)
        sum_gx = (g * xhat).sum(dims)  # (B, C)
        n = xhat[0, 0].numel()
        # Instance norm backward with the biased variance: (gx - mean(gx) - xhat * mean(gx * xhat)) / sigma,
        # gx = g * gamma, as g * a + xhat * b + c with per-(sample, channel) a, b, c.
        a = gam * rstd
        dx = torch.addcmul(-a * (sum_g.view(affine) / n), xhat, -a * (sum_gx.view(affine) / n))
        dx.addcmul_(g, a)
        return dx.to(ctx.dtype), sum_gx.to(gamma.dtype), sum_g.to(beta.dtype), None, None


def adain_act(x: Tensor, gamma: Tensor, beta: Tensor, eps: float = 1e-5, slope: float = 1.0) -> Tensor:
    """``act(instance_norm(x) * gamma + beta)`` with per-sample ``gamma``/``beta (B, C)``; ``x (B, C, H, W)``.

    The activation is leaky ReLU with ``slope`` (0: ReLU, 1: none). The result has ``x``'s dtype.
    """
    expected = (x.shape[0], x.shape[1])
    if x.dim() < 3 or tuple(gamma.shape) != expected or tuple(beta.shape) != expected:
        raise ValueError(
            f"adain_act: gamma {tuple(gamma.shape)} and beta {tuple(beta.shape)} must both be {expected} "
            f"for an input of shape {tuple(x.shape)}"
        )
    return _AdaINAct.apply(x, gamma, beta, float(eps), float(slope))
