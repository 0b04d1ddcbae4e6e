"""Nearest x2 upsampling followed by a padded stride-1 convolution, computed on the low-resolution input.

After nearest upsampling each output pixel of a KxK convolution only sees ceil-half as many distinct input
pixels, so the same result is four (one per output phase) small convolutions of the low-resolution map with
summed kernel taps, interleaved by pixel shuffle. For the decoder's 5x5 layers this is 36 instead of 100
multiply-adds per low-resolution pixel and channel pair, and backward keeps the small input, not the upsampled
one. The result equals ``conv2d(pad(upsample(x)))`` up to float summation order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _phase_taps(kernel_size: int) -> tuple[int, list[list[list[int]]]]:
    """Low-res offset range and, per phase p and low-res tap t, the kernel taps that fall on it.

    Output row ``2i + p`` reads upsampled rows ``2i + p + k - r`` (k < K, r = K // 2), i.e. low-res rows
    ``i + (p + k - r) // 2``. Returns ``(lo, taps)`` with ``taps[p][t]`` the k whose low-res offset is ``lo + t``.
    """
    r = kernel_size // 2
    lo = (0 - r) // 2
    hi = (1 + kernel_size - 1 - r) // 2
    taps = [[[] for _ in range(hi - lo + 1)] for _ in range(2)]
    for p in range(2):
        for k in range(kernel_size):
            taps[p][(p + k - r) // 2 - lo].append(k)
    return lo, taps


def phase_kernels(weight: Tensor) -> Tensor:
    """``(C_out, C_in, K, K)`` -> ``(4 * C_out, C_in, T, T)``: the kernel of each output phase, phase-minor.

    Channel ``4c + 2p + q`` holds the kernel of output channel c at row phase p and column phase q, the order
    ``F.pixel_shuffle(·, 2)`` expects.
    """
    c_out, c_in, kh, kw = weight.shape
    if kh != kw or kh % 2 == 0:
        raise ValueError(f"phase_kernels: expects an odd square kernel, got {kh}x{kw}")
    _, taps = _phase_taps(kh)
    # Sum kernel rows into low-res rows, then columns into low-res columns, for each phase.
    rows = [torch.stack([weight[:, :, ks].sum(2) for ks in taps[p]], dim=2) for p in range(2)]  # (O, I, T, K)
    phases = [torch.stack([rows[p][..., ks].sum(-1) for ks in taps[q]], dim=-1) for p in range(2) for q in range(2)]
    return torch.stack(phases, dim=1).reshape(4 * c_out, c_in, len(taps[0]), len(taps[0]))


def _reference(
    x: Tensor, weight: Tensor, bias: Tensor | None, pad_type: str, sides: tuple[int, int, int, int] | None = None
) -> Tensor:
    """The plain path: upsample, pad (left, right, top, bottom; default K // 2 each), convolve."""
    r = weight.shape[-1] // 2
    up = F.interpolate(x, scale_factor=2.0, mode="nearest")
    pad = (r, r, r, r) if sides is None else sides
    return F.conv2d(F.pad(up, pad, mode="reflect" if pad_type == "reflect" else "constant"), weight, bias)


def upsample_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, pad_type: str = "reflect") -> Tensor:
    """``conv2d(pad(upsample_nearest_x2(x), K // 2), weight, bias)`` for ``pad_type`` "reflect" or "zero".

    ``x (B, C_in, H, W)`` -> ``(B, C_out, 2H, 2W)``. Zero padding of the upsampled map is zero padding of the
    low-res map. Reflect padding equals low-res replicate padding except within K // 2 pixels of each border,
    whose rows and columns are recomputed exactly on thin strips.
    """
    if pad_type not in ("reflect", "zero"):
        raise ValueError(f"upsample_conv2d: pad_type must be 'reflect' or 'zero', got {pad_type!r}")
    if x.dim() != 4 or weight.dim() != 4 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"upsample_conv2d: input {tuple(x.shape)} does not match kernel {tuple(weight.shape)}")
    k = weight.shape[-1]
    r = k // 2
    h, w = x.shape[-2:]
    if min(h, w) <= r:  # the border strips would overlap: maps this small are cheap either way
        return _reference(x, weight, bias, pad_type)
    lo, taps = _phase_taps(k)
    pad_lo, pad_hi = -lo, len(taps[0]) - 1 + lo
    mode = "replicate" if pad_type == "reflect" else "constant"
    padded = F.pad(x, (pad_lo, pad_hi, pad_lo, pad_hi), mode=mode)
    kernel = phase_kernels(weight)
    out = F.conv2d(padded, kernel, None if bias is None else bias.repeat_interleave(4))
    out = F.pixel_shuffle(out, 2)
    if pad_type == "zero" or r == 0:
        return out
    # Border strips, computed the plain way from r low-res rows (columns) and padded only where the edge is:
    # the top and bottom r output rows over the full width, then the left and right r columns of the rest.
    top = _reference(x[:, :, :r], weight, bias, pad_type, (r, r, r, 0))
    bottom = _reference(x[:, :, -r:], weight, bias, pad_type, (r, r, 0, r))
    left = _reference(x[:, :, :, :r], weight, bias, pad_type, (r, 0, 0, 0))
    right = _reference(x[:, :, :, -r:], weight, bias, pad_type, (0, r, 0, 0))
    middle = torch.cat([left, out[:, :, r:-r, r:-r], right], dim=3)
    return torch.cat([top, middle, bottom], dim=2)
