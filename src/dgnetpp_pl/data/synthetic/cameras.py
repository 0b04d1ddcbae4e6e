"""Camera networks: each camera's scene (indoor walls and floor, outdoor sky / facade and ground) and
photometry, and the scene rendered behind one image."""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np
from PIL import Image

from dgnetpp_pl.data.synthetic.palette import muted, rgb
from dgnetpp_pl.data.synthetic.spec import SyntheticDomainSpec
from dgnetpp_pl.data.synthetic.streams import STREAM_CAMERA, stream_rng


@dataclass(frozen=True)
class Camera:
    """One camera's fixed scene and photometry (colours RGB 0..255)."""

    gains: np.ndarray  # (3,) per-channel colour cast
    exposure: float
    gamma: float
    light_slope: float  # left-right illumination gradient
    horizon: float  # fraction of the image height
    top_colour: np.ndarray  # wall / sky / facade
    top2_colour: np.ndarray  # second colour of the top gradient
    ground_colour: np.ndarray
    facade: bool  # outdoor: building facade instead of sky
    objects: tuple[tuple[float, float, float, float, tuple[int, int, int]], ...]  # doors, posters, poles


def make_camera(spec: SyntheticDomainSpec, seed: int, cam: int) -> Camera:
    """Camera ``cam`` (1-based) of the domain ``spec`` describes, drawn from its own stream of ``seed``."""
    rng = stream_rng(seed, spec.name, STREAM_CAMERA, cam)
    gains = np.exp(rng.normal(0.0, spec.color_cast, 3))
    objects = []
    if spec.background == "indoor":
        horizon = rng.uniform(0.58, 0.74)
        top, top2 = muted(rng, (0.03, 0.25), (0.55, 0.9)), None
        ground = muted(rng, (0.05, 0.35), (0.3, 0.7))
        facade = False
        for _ in range(rng.integers(1, 4)):  # doors, posters, windows on the wall
            x0, w = rng.uniform(-0.1, 0.9), rng.uniform(0.15, 0.45)
            y0, h = rng.uniform(0.05, 0.3), rng.uniform(0.15, horizon - 0.05)
            objects.append((x0, y0, x0 + w, min(y0 + h, horizon), rgb(muted(rng, (0.1, 0.6), (0.2, 0.9)))))
    else:
        horizon = rng.uniform(0.35, 0.55)
        facade = bool(rng.random() < 0.5)
        if facade:
            top, top2 = muted(rng, (0.05, 0.4), (0.35, 0.8)), muted(rng, (0.05, 0.4), (0.3, 0.7))
        else:
            top = np.array(colorsys.hsv_to_rgb(rng.uniform(0.53, 0.62), rng.uniform(0.3, 0.7), 0.95)) * 255
            top2 = np.array([235.0, 240.0, 245.0])
        ground = muted(rng, (0.1, 0.5), (0.3, 0.65))
        for _ in range(rng.integers(0, 3)):  # poles and tree trunks
            x0 = rng.uniform(0.0, 0.95)
            objects.append(
                (
                    x0,
                    0.0,
                    x0 + rng.uniform(0.04, 0.12),
                    horizon + rng.uniform(0.05, 0.2),
                    rgb(muted(rng, (0.0, 0.4), (0.1, 0.45))),
                )
            )
    return Camera(
        gains=gains / gains.mean() ** 0.5,
        exposure=float(rng.uniform(*spec.exposure)),
        gamma=float(rng.uniform(*spec.gamma)),
        light_slope=float(rng.normal(0.0, 0.1 + spec.color_cast)),
        horizon=float(horizon),
        top_colour=top,
        top2_colour=top if top2 is None else top2,
        ground_colour=ground,
        facade=facade,
        objects=tuple(objects),
    )


def render_scene(spec: SyntheticDomainSpec, cam: Camera, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Scene of one camera with small per-frame changes; ``(h, w, 3)`` float 0..255."""
    horizon = int(h * (cam.horizon + rng.normal(0, 0.015)))
    rows = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
    top = cam.top_colour * (1 - rows) + cam.top2_colour * rows
    if spec.background == "indoor":
        top = top * (1.05 - 0.1 * rows)
        depth = np.clip((rows - cam.horizon) / (1.0 - cam.horizon + 1e-6), 0.0, 1.0)
        ground = cam.ground_colour * (0.85 + 0.2 * depth)  # floor brighter towards the camera
    else:
        coarse = rng.normal(0.0, 1.0, (6, 4)).astype(np.float32)
        texture = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR))[:, :, None]
        ground = cam.ground_colour * (1.0 + 0.12 * texture + rng.normal(0, 0.06, (h, w, 1)))
    image = np.where(np.arange(h)[:, None, None] < horizon, top, ground).astype(np.float32)
    image = np.broadcast_to(image, (h, w, 3)).copy()
    if spec.background == "indoor":
        image[max(horizon - h // 60, 0) : horizon + h // 60] *= 0.7  # skirting board
    elif cam.facade:
        image[: horizon : max(h // 12, 2)] *= 0.75  # floors of the building
    for x0, y0, x1, y1, colour in cam.objects:
        image[int(y0 * h) : int(y1 * h), max(int(x0 * w), 0) : max(int(x1 * w), 0)] = colour
    return image * rng.uniform(0.95, 1.05)
