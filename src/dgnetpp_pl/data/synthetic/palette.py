"""Colour draws shared by identities, scenes and occluders; colours are RGB 0..255."""

from __future__ import annotations

import colorsys

import numpy as np


def rgb(values: np.ndarray) -> tuple[int, int, int]:
    """Round and clip ``(3,)`` floats to an RGB triple."""
    r, g, b = (int(round(float(v))) for v in np.clip(values, 0, 255))
    return r, g, b


def random_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    """A clothing colour: any hue, saturation skewed high, no pure black or white."""
    hue, sat, val = rng.random(), rng.uniform(0.15, 1.0) ** 0.7, rng.uniform(0.15, 0.95)
    return rgb(np.array(colorsys.hsv_to_rgb(hue, sat, val)) * 255)


def contrasting(rng: np.random.Generator, other: tuple[int, int, int]) -> tuple[int, int, int]:
    """A random colour far from ``other`` (L1 distance > 150), for patterns that stay visible."""
    for _ in range(20):
        colour = random_colour(rng)
        if np.abs(np.subtract(colour, other)).sum() > 150:
            return colour
    return rgb(255 - np.asarray(other))


def muted(rng: np.random.Generator, sat: tuple[float, float], val: tuple[float, float]) -> np.ndarray:
    """A ``(3,)`` float colour of any hue with saturation and value in the given ranges."""
    return np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(*sat), rng.uniform(*val))) * 255


def jitter(colour: tuple[int, int, int], rng: np.random.Generator) -> tuple[int, int, int]:
    """``colour`` under slightly different light: scaled by a factor in [0.93, 1.07]."""
    return rgb(np.asarray(colour) * rng.uniform(0.93, 1.07))
