"""Image transforms (torchvision.transforms.v2) and the batched random erasing of the id branch."""

from __future__ import annotations

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _to_normalized_tensor() -> list[v2.Transform]:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def build_train_transform(
    height: int, width: int, pad: int = 10, flip_p: float = 0.5, erasing_p: float = 0.0
) -> v2.Compose:
    """Flip, bicubic resize, edge pad, random crop, normalise, then (``erasing_p > 0``) random erasing with the
    settings of :func:`random_erasing`; PIL in, ``(3, H, W)`` out."""
    steps: list[v2.Transform] = [
        v2.RandomHorizontalFlip(flip_p),
        v2.Resize((height, width), interpolation=InterpolationMode.BICUBIC, antialias=True),
    ]
    if pad > 0:
        steps += [v2.Pad(pad, padding_mode="edge"), v2.RandomCrop((height, width))]
    steps += _to_normalized_tensor()
    if erasing_p > 0:
        steps.append(v2.RandomErasing(erasing_p, scale=(0.02, 0.4), ratio=(0.3, 3.33), value=0.0))
    return v2.Compose(steps)


def build_test_transform(height: int, width: int) -> v2.Compose:
    """Bicubic resize and normalise. PIL in, ``(3, H, W)`` float out."""
    resize = v2.Resize((height, width), interpolation=InterpolationMode.BICUBIC, antialias=True)
    return v2.Compose([resize, *_to_normalized_tensor()])


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """Undo the ImageNet normalisation and clamp to [0, 1]; ``(..., 3, H, W)`` in and out."""
    mean = x.new_tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = x.new_tensor(IMAGENET_STD).view(3, 1, 1)
    return (x * std + mean).clamp(0.0, 1.0)


def random_erasing(
    x: torch.Tensor,
    p: float = 0.5,
    area: tuple[float, float] = (0.02, 0.4),
    ratio: tuple[float, float] = (0.3, 3.33),
    value: float = 0.0,
    generator: torch.Generator | None = None,
    attempts: int = 10,
) -> torch.Tensor:
    """Erase one random rectangle per sample with probability ``p`` (Zhong et al.); ``(B, C, H, W)`` in/out.

    Each erased sample draws a target area fraction from ``area`` and an aspect ratio h/w uniformly from
    ``ratio``; of ``attempts`` draws the first that fits inside the image is used (none fits: not erased).
    The fill is ``value`` in normalised space. The input is not modified. The random numbers come from
    ``generator`` (default: the global CPU generator), so the result does not depend on ``x.device``.
    """
    if x.dim() != 4:
        raise ValueError(f"random_erasing expects a (B, C, H, W) tensor, got shape {tuple(x.shape)}.")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"random_erasing: p must be in [0, 1], got {p}.")
    if not (0.0 < area[0] <= area[1] <= 1.0 and 0.0 < ratio[0] <= ratio[1]):
        raise ValueError(
            f"random_erasing: need 0 < area[0] <= area[1] <= 1 and 0 < ratio[0] <= ratio[1], "
            f"got area={area}, ratio={ratio}."
        )
    batch, _, height, width = x.shape
    rng_device = generator.device if generator is not None else torch.device("cpu")

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(shape, generator=generator, device=rng_device)

    erase = torch.rand(batch, generator=generator, device=rng_device) < p
    target = uniform(area[0], area[1], batch, attempts) * (height * width)
    aspect = uniform(ratio[0], ratio[1], batch, attempts)
    h = torch.sqrt(target * aspect).round().long()
    w = torch.sqrt(target / aspect).round().long()
    fits = (h < height) & (w < width) & (h > 0) & (w > 0)
    first = fits.float().argmax(dim=1, keepdim=True)  # first fitting attempt (0 when none fits)
    h, w = h.gather(1, first).squeeze(1), w.gather(1, first).squeeze(1)
    erase &= fits.any(dim=1)
    top = (torch.rand(batch, generator=generator, device=rng_device) * (height - h + 1)).long()
    left = (torch.rand(batch, generator=generator, device=rng_device) * (width - w + 1)).long()

    top, left, h, w, erase = (t.to(x.device) for t in (top, left, h, w, erase))
    rows = torch.arange(height, device=x.device).view(1, height)
    cols = torch.arange(width, device=x.device).view(1, width)
    in_rows = (rows >= top[:, None]) & (rows < (top + h)[:, None])  # (B, H)
    in_cols = (cols >= left[:, None]) & (cols < (left + w)[:, None])  # (B, W)
    mask = in_rows[:, :, None] & in_cols[:, None, :] & erase[:, None, None]  # (B, H, W)
    return x.masked_fill(mask[:, None], value)
