"""Images for people to look at: one conversion to 8-bit RGB, used for the PNG files on disk and for every logger
that takes images (W&B, TensorBoard), so that each shows the same pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image


def to_uint8(image: torch.Tensor | np.ndarray | Image.Image) -> np.ndarray:
    """An ``(H, W, 3)`` uint8 array (0-255) from a float tensor or array in [0, 1] (``(3, H, W)`` or ``(H, W, 3)``),
    a uint8 tensor or array, or a PIL image. Floats are rounded as ``torchvision.utils.save_image`` rounds them."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.ndim != 3 or 3 not in (array.shape[0], array.shape[-1]):
        raise ValueError(f"expected an RGB image of shape (3, H, W) or (H, W, 3), got {array.shape}")
    if array.shape[-1] != 3:
        array = array.transpose(1, 2, 0)
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if not np.issubdtype(array.dtype, np.floating):
        raise TypeError(f"expected a float image in [0, 1] or a uint8 image, got dtype {array.dtype}")
    return np.ascontiguousarray(np.clip(array * 255.0 + 0.5, 0, 255).astype(np.uint8))


def save_png(image: torch.Tensor | np.ndarray | Image.Image, path: str | Path) -> Path:
    """Write ``image`` (any input of :func:`to_uint8`) as a PNG; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_uint8(image)).save(path, format="PNG")
    return path


def log_image(logger: pl.loggers.Logger, key: str, image: torch.Tensor | np.ndarray | Image.Image, step: int) -> None:
    """Send one image (any input of :func:`to_uint8`) to a logger that takes images; others are skipped."""
    pixels = to_uint8(image)
    if isinstance(logger, pl.loggers.WandbLogger):
        # W&B casts float arrays to uint8 without scaling (a [0, 1] image turns black): hand it the 8-bit image.
        logger.log_image(key=key, images=[Image.fromarray(pixels)], step=step)
    elif isinstance(logger, pl.loggers.TensorBoardLogger):
        logger.experiment.add_image(key, pixels, global_step=step, dataformats="HWC")
