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


class _LayerNormAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, gamma: Tensor, beta: Tensor, eps: float, slope: float) -> Tensor:  # type: ignore[override]
        sample, channel = _shapes(x)
        xf = widen(x)
        flat = xf.reshape(x.shape[0], -1)
        std = flat.std(1)
        xhat = (xf - flat.mean(1).view(sample)) / (std + eps).view(sample)
        y = torch.addcmul(widen(beta).view(channel), xhat, widen(gamma).view(channel))
        if slope != 1.0:
            y = torch.where(y > 0, y, y * slope)
        ctx.save_for_backward(xhat, std, gamma, beta)
        ctx.eps, ctx.slope, ctx.dtype = eps, slope, x.dtype
        return y.to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor, None, None]:  # type: ignore[override]
        xhat, std, gamma, beta = ctx.saved_tensors
        sample, channel = _shapes(xhat)
        g = widen(grad)
        if ctx.slope != 1.0:
            pre = torch.addcmul(widen(beta).view(channel), xhat, widen(gamma).view(channel))
            g = torch.where(pre > 0, g, g * ctx.slope)
        reduce_dims = [0] + list(range(2, xhat.dim()))
        d_gamma = (g * xhat).sum(reduce_dims)
        d_beta = g.sum(reduce_dims)
        gx = g * widen(gamma).view(channel)
        b = xhat.shape[0]
        n = xhat[0].numel()
        mean_g = gx.reshape(b, -1).mean(1).view(sample)
        dot = (gx * xhat).reshape(b, -1).sum(1)
        # d/dx of (x - mean) / (std + eps), with d std / dx = (x - mean) / ((n - 1) std).
        dx = (gx - mean_g) / (std + ctx.eps).view(sample) - xhat * (dot / ((n - 1) * std)).view(sample)
        return dx.to(ctx.dtype), d_gamma.to(gamma.dtype), d_beta.to(beta.dtype), None, None


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
        var, mean = torch.var_mean(xf, dim=dims, keepdim=True, correction=0)
        rstd = torch.rsqrt(var + eps)
        xhat = (xf - mean) * rstd
        affine = (x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2)
        y = torch.addcmul(widen(beta).reshape(affine), xhat, widen(gamma).reshape(affine))
        if slope != 1.0:
            y = torch.where(y > 0, y, y * slope)
        ctx.save_for_backward(xhat, rstd, gamma, beta)
        ctx.slope, ctx.dtype = slope, x.dtype
        return y.to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor, None, None]:  # type: ignore[override]
        xhat, rstd, gamma, beta = ctx.saved_tensors
        affine = rstd.shape
        dims = tuple(range(2, xhat.dim()))
        g = widen(grad)
        if ctx.slope != 1.0:
            pre = torch.addcmul(widen(beta).reshape(affine), xhat, widen(gamma).reshape(affine))
            g = torch.where(pre > 0, g, g * ctx.slope)
        d_gamma = (g * xhat).sum(dims)
        d_beta = g.sum(dims)
        gx = g * widen(gamma).reshape(affine)
        # Instance norm backward with the biased variance: (gx - mean(gx) - xhat * mean(gx * xhat)) / sigma.
        dx = (gx - gx.mean(dims, keepdim=True) - xhat * (gx * xhat).mean(dims, keepdim=True)) * rstd
        return dx.to(ctx.dtype), d_gamma.to(gamma.dtype), d_beta.to(beta.dtype), None, None


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
