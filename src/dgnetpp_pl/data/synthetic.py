"""The built-in cross-domain person dataset: drawn people, two camera networks, Market-1501 layout on disk.

Identity lives in clothing colours and patterns, body proportions, skin and hair, and accessories; it is a
deterministic function of (seed, domain name, pid). Each image has its own pose, scale, position, optional
occluder and sensor noise. The two preset domains differ like real camera networks in their scenes (indoor walls
and floor vs outdoor sky / facade and textured ground, a different number of cameras) and in how people appear
in them (scale, stride, lean, occlusion). Colour cast, exposure, blur, resolution and noise are per-camera
settings of the spec too.
"""

from __future__ import annotations

import colorsys
import json
import multiprocessing as mp
import os
import shutil
import sys
import zlib
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from dgnetpp_pl.data.datasets import DatasetError

GENERATOR_VERSION = 1  # bump when the drawing changes, so cached folders are regenerated
JPEG_QUALITY = 92
MARKER = ".complete"
_SUPERSAMPLE = 2  # draw at twice the size, then reduce: cheap anti-aliasing
_BACKGROUNDS = ("indoor", "outdoor")
# Independent random streams, so that e.g. adding cameras does not change identities.
_ID, _CAM, _IMG, _PLAN, _DISTRACTOR, _JUNK = range(1, 7)
_PARALLEL_MIN_IMAGES = 300


@dataclass(frozen=True)
class SyntheticDomainSpec:
    """Sizes and camera-network style of one synthetic domain (ranges are inclusive ``(low, high)``)."""

    name: str
    num_train_ids: int = 100
    num_test_ids: int = 50
    num_cams: int = 6
    images_per_id_per_cam: tuple[int, int] = (1, 3)
    num_distractors: int = 40
    num_junk: int = 20
    height: int = 128
    width: int = 64
    background: str = "indoor"  # "indoor" (walls + floor) or "outdoor" (sky / facade + textured ground)
    color_cast: float = 0.06  # std of the per-camera log gain of each colour channel
    exposure: tuple[float, float] = (0.9, 1.1)  # per-camera brightness factor
    gamma: tuple[float, float] = (0.95, 1.05)  # per-camera tone curve
    blur: tuple[float, float] = (0.0, 0.3)  # Gaussian radius in stored pixels, per image
    downsample: float = 1.0  # resolution factor: <1 down-samples then up-samples
    noise: float = 0.015  # sensor noise std, fraction of full scale
    scale: tuple[float, float] = (0.82, 0.94)  # person height / image height
    pose_amplitude: float = 1.0  # scales arm and leg swing
    lean: float = 0.03  # std of the body lean, radians
    occlusion_p: float = 0.1  # chance of an occluding object in front of the person

    def __post_init__(self) -> None:
        for key in ("images_per_id_per_cam", "exposure", "gamma", "blur", "scale"):
            value = tuple(getattr(self, key))
            if len(value) != 2 or value[0] > value[1]:
                raise ValueError(f"SyntheticDomainSpec.{key} must be a (low, high) pair, got {value}.")
            object.__setattr__(self, key, value)
        checks = {
            "name": bool(self.name) and "/" not in self.name,
            "num_train_ids": self.num_train_ids >= 1,
            "num_test_ids": self.num_test_ids >= 1,
            "num_cams": self.num_cams >= 2,
            "images_per_id_per_cam": self.images_per_id_per_cam[0] >= 1,
            "num_distractors": self.num_distractors >= 0,
            "num_junk": self.num_junk >= 0,
            "height": self.height >= 32,
            "width": self.width >= 16,
            "background": self.background in _BACKGROUNDS,
            "downsample": 0.1 <= self.downsample <= 1.0,
            "scale": 0.3 <= self.scale[0] and self.scale[1] <= 1.0,
            "occlusion_p": 0.0 <= self.occlusion_p <= 1.0,
        }
        for key, ok in checks.items():
            if not ok:
                raise ValueError(f"SyntheticDomainSpec.{key} has an invalid value: {getattr(self, key)!r}.")

    def with_overrides(self, overrides: dict[str, Any] | None) -> SyntheticDomainSpec:
        """Return a copy with some fields replaced; an unknown key raises an error listing the valid ones."""
        overrides = dict(overrides or {})
        valid = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - valid)
        if unknown:
            raise ValueError(f"unknown synthetic setting(s) {unknown}; valid: {', '.join(sorted(valid))}.")
        return replace(self, **overrides)


SOURCE_STYLE = SyntheticDomainSpec(name="indoor", num_cams=6, background="indoor")
# The target network differs in scenes (outdoor, 5 cameras) and in how people appear (smaller, wider strides,
# more lean and occlusion); per-camera photometry is as in the source. A stronger per-camera colour, blur and
# noise shift made the direct-transfer features cluster so poorly (ARI ~0.15) that no self-training could start.
TARGET_STYLE = SyntheticDomainSpec(
    name="outdoor",
    num_cams=5,
    background="outdoor",
    scale=(0.7, 0.9),
    pose_amplitude=1.4,
    lean=0.07,
    occlusion_p=0.2,
)
# Sizes for unit tests: each domain of the pair generates in well under a second.
SMALL_SIZES: dict[str, Any] = {
    "num_train_ids": 12,
    "num_test_ids": 8,
    "images_per_id_per_cam": (1, 2),
    "num_distractors": 4,
    "num_junk": 2,
}


# ---------------------------------------------------------------------------------------------- identities
@dataclass(frozen=True)
class Identity:
    """What makes one synthetic person recognisable; colours are RGB 0..255."""

    height: float  # relative to the image's person scale
    build: float  # width factor
    skin: tuple[int, int, int]
    hair: tuple[int, int, int]
    long_hair: bool
    upper: tuple[int, int, int]
    upper2: tuple[int, int, int]
    upper_pattern: str  # solid | stripes | two_tone | checks
    upper_period: float  # pattern period as a fraction of the person height
    long_sleeves: bool
    lower: tuple[int, int, int]
    lower2: tuple[int, int, int]
    lower_pattern: str  # solid | stripes
    lower_kind: str  # trousers | shorts | skirt
    shoes: tuple[int, int, int]
    hat: tuple[int, int, int] | None
    backpack: tuple[int, int, int] | None
    bag: tuple[int, int, int] | None
    bag_side: int  # -1 left, +1 right


_SKINS = np.array([[255, 224, 196], [241, 194, 157], [224, 172, 130], [198, 134, 90], [141, 85, 54], [92, 56, 38]])
_HAIRS = np.array([[20, 17, 15], [60, 40, 25], [110, 75, 45], [200, 170, 110], [150, 150, 150], [140, 60, 30]])
_COMMON_LOWER = np.array([[25, 25, 30], [35, 45, 80], [70, 90, 130], [100, 100, 105], [170, 150, 110]])


def _domain_key(name: str) -> int:
    return zlib.crc32(name.encode())


def _rng(seed: int, name: str, stream: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, _domain_key(name), stream, *keys])


def _rgb(values: np.ndarray) -> tuple[int, int, int]:
    r, g, b = (int(round(float(v))) for v in np.clip(values, 0, 255))
    return r, g, b


def _random_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    hue, sat, val = rng.random(), rng.uniform(0.15, 1.0) ** 0.7, rng.uniform(0.15, 0.95)
    return _rgb(np.array(colorsys.hsv_to_rgb(hue, sat, val)) * 255)


def _contrasting(rng: np.random.Generator, other: tuple[int, int, int]) -> tuple[int, int, int]:
    for _ in range(20):
        colour = _random_colour(rng)
        if np.abs(np.subtract(colour, other)).sum() > 150:
            return colour
    return _rgb(255 - np.asarray(other))


def _sample_identity(rng: np.random.Generator) -> Identity:
    upper = _random_colour(rng)
    if rng.random() < 0.5:
        lower = _rgb(_COMMON_LOWER[rng.integers(len(_COMMON_LOWER))] + rng.normal(0, 12, 3))
    else:
        lower = _random_colour(rng)
    accessory = [_random_colour(rng) if rng.random() < p else None for p in (0.2, 0.25, 0.25)]
    return Identity(
        height=float(rng.uniform(0.88, 1.0)),
        build=float(rng.uniform(0.8, 1.25)),
        skin=_rgb(_SKINS[rng.integers(len(_SKINS))] + rng.normal(0, 8, 3)),
        hair=_rgb(_HAIRS[rng.integers(len(_HAIRS))] + rng.normal(0, 8, 3)),
        long_hair=bool(rng.random() < 0.35),
        upper=upper,
        upper2=_contrasting(rng, upper),
        upper_pattern=str(rng.choice(["solid", "stripes", "two_tone", "checks"], p=[0.4, 0.25, 0.2, 0.15])),
        upper_period=float(rng.uniform(0.035, 0.08)),
        long_sleeves=bool(rng.random() < 0.6),
        lower=lower,
        lower2=_contrasting(rng, lower),
        lower_pattern=str(rng.choice(["solid", "stripes"], p=[0.85, 0.15])),
        lower_kind=str(rng.choice(["trousers", "shorts", "skirt"], p=[0.65, 0.2, 0.15])),
        shoes=_rgb(rng.choice([[30, 30, 30], [235, 235, 235]]) if rng.random() < 0.7 else _random_colour(rng)),
        hat=accessory[0],
        backpack=accessory[1],
        bag=accessory[2],
        bag_side=int(rng.choice([-1, 1])),
    )


def make_identity(name: str, seed: int, pid: int) -> Identity:
    """The identity of ``pid`` (>= 1) in the domain called ``name`` for data seed ``seed``."""
    return _sample_identity(_rng(seed, name, _ID, pid))


# ------------------------------------------------------------------------------------------------- cameras
@dataclass(frozen=True)
class _Camera:
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


def _muted(rng: np.random.Generator, sat: tuple[float, float], val: tuple[float, float]) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(*sat), rng.uniform(*val))) * 255


def _make_camera(spec: SyntheticDomainSpec, seed: int, cam: int) -> _Camera:
    rng = _rng(seed, spec.name, _CAM, cam)
    gains = np.exp(rng.normal(0.0, spec.color_cast, 3))
    objects = []
    if spec.background == "indoor":
        horizon = rng.uniform(0.58, 0.74)
        top, top2 = _muted(rng, (0.03, 0.25), (0.55, 0.9)), None
        ground = _muted(rng, (0.05, 0.35), (0.3, 0.7))
        facade = False
        for _ in range(rng.integers(1, 4)):  # doors, posters, windows on the wall
            x0, w = rng.uniform(-0.1, 0.9), rng.uniform(0.15, 0.45)
            y0, h = rng.uniform(0.05, 0.3), rng.uniform(0.15, horizon - 0.05)
            objects.append((x0, y0, x0 + w, min(y0 + h, horizon), _rgb(_muted(rng, (0.1, 0.6), (0.2, 0.9)))))
    else:
        horizon = rng.uniform(0.35, 0.55)
        facade = bool(rng.random() < 0.5)
        if facade:
            top, top2 = _muted(rng, (0.05, 0.4), (0.35, 0.8)), _muted(rng, (0.05, 0.4), (0.3, 0.7))
        else:
            top = np.array(colorsys.hsv_to_rgb(rng.uniform(0.53, 0.62), rng.uniform(0.3, 0.7), 0.95)) * 255
            top2 = np.array([235.0, 240.0, 245.0])
        ground = _muted(rng, (0.1, 0.5), (0.3, 0.65))
        for _ in range(rng.integers(0, 3)):  # poles and tree trunks
            x0 = rng.uniform(0.0, 0.95)
            objects.append(
                (
                    x0,
                    0.0,
                    x0 + rng.uniform(0.04, 0.12),
                    horizon + rng.uniform(0.05, 0.2),
                    _rgb(_muted(rng, (0.0, 0.4), (0.1, 0.45))),
                )
            )
    return _Camera(
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


def _background(spec: SyntheticDomainSpec, cam: _Camera, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
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


# --------------------------------------------------------------------------------------------------- people
def _limb(x: float, y: float, angle: float, length: float, width: float) -> list[tuple[float, float]]:
    """Rectangle from joint (x, y) hanging at ``angle`` from the vertical."""
    dx, dy = np.sin(angle) * length, np.cos(angle) * length
    nx, ny = np.cos(angle) * width / 2, -np.sin(angle) * width / 2
    return [(x - nx, y - ny), (x + nx, y + ny), (x + dx + nx, y + dy + ny), (x + dx - nx, y + dy - ny)]


def _jitter(colour: tuple[int, int, int], rng: np.random.Generator) -> tuple[int, int, int]:
    return _rgb(np.asarray(colour) * rng.uniform(0.93, 1.07))


def _paint(
    canvas: Image.Image,
    polygons: list[list[tuple[float, float]]],
    colours: tuple[tuple[int, int, int], tuple[int, int, int]],
    pattern: str,
    period: float,
    origin: tuple[float, float],
    split: float,
) -> None:
    """Fill polygons with a solid colour or a pattern anchored at ``origin`` (so it moves with the body)."""
    if pattern == "solid":
        draw = ImageDraw.Draw(canvas)
        for poly in polygons:
            draw.polygon(poly, fill=colours[0])
        return
    mask = Image.new("L", canvas.size, 0)
    mask_draw = ImageDraw.Draw(mask)
    for poly in polygons:
        mask_draw.polygon(poly, fill=255)
    box = mask.getbbox()
    if box is None:
        return
    x0, y0, x1, y1 = box
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    yy, xx = yy - origin[1], xx - origin[0]
    period = max(period, 2.0)
    if pattern == "stripes":
        second = (yy // period) % 2 == 1
    elif pattern == "checks":
        second = ((yy // period) + (xx // period)) % 2 == 1
    else:  # two_tone: a jacket over a shirt, split at a fixed height of the torso
        second = yy > split
    texture = np.where(second[:, :, None], np.array(colours[1]), np.array(colours[0])).astype(np.uint8)
    canvas.paste(Image.fromarray(texture), (x0, y0), mask.crop(box))


def _draw_person(
    canvas: Image.Image,
    ident: Identity,
    rng: np.random.Generator,
    spec: SyntheticDomainSpec,
    cx: float,
    foot: float,
    size: float,
) -> None:
    """Draw ``ident`` with a random pose; ``size`` is the head-to-foot height in canvas pixels."""
    draw = ImageDraw.Draw(canvas)
    amp = spec.pose_amplitude
    back_view = rng.random() < 0.5
    lean = rng.normal(0.0, spec.lean)
    swing = rng.normal(0.0, 0.22 * amp)
    stride = rng.normal(0.0, 0.14 * amp)
    top = foot - size
    hip_y, shoulder_y = top + 0.53 * size, top + 0.17 * size
    hip_x = cx
    cos_l, sin_l = np.cos(lean), np.sin(lean)

    def upper(x: float, y: float) -> tuple[float, float]:  # lean the upper body about the hip
        dx, dy = x - hip_x, y - hip_y
        return hip_x + cos_l * dx + sin_l * dy, hip_y - sin_l * dx + cos_l * dy

    c = {k: _jitter(getattr(ident, k), rng) for k in ("skin", "hair", "upper", "upper2", "lower", "lower2")}
    shoulder_w, hip_w = 0.12 * size * ident.build, 0.095 * size * ident.build
    head_r = 0.068 * size
    head = upper(cx, top + 0.075 * size)
    leg_w, leg_len = 0.085 * size * ident.build, 0.47 * size
    arm_w, arm_len = 0.06 * size * ident.build**0.5, 0.37 * size

    if ident.long_hair:  # hair falling behind the shoulders
        hx, hy = head
        draw.rectangle([hx - head_r * 1.05, hy, hx + head_r * 1.05, hy + 1.7 * head_r], fill=c["hair"])

    # legs, shoes and lower clothes
    legs = [_limb(hip_x + s * hip_w * 0.5, hip_y, s * stride + s * 0.03, leg_len, leg_w) for s in (-1, 1)]
    cover = {"trousers": 1.0, "shorts": 0.42, "skirt": 0.0}[ident.lower_kind]
    for s, leg in zip((-1, 1), legs):
        draw.polygon(leg, fill=c["skin"] if cover < 1 else c["lower"])
        fx, fy = leg[2][0] / 2 + leg[3][0] / 2, leg[2][1] / 2 + leg[3][1] / 2
        draw.ellipse(
            [
                fx - leg_w * 0.75 + s * leg_w * 0.2,
                fy - 0.025 * size,
                fx + leg_w * 0.75 + s * leg_w * 0.2,
                fy + 0.015 * size,
            ],
            fill=ident.shoes,
        )
    lower_polys = []
    if ident.lower_kind == "skirt":
        lower_polys.append(
            [
                (hip_x - hip_w, hip_y - 0.02 * size),
                (hip_x + hip_w, hip_y - 0.02 * size),
                (hip_x + hip_w * 1.6, hip_y + 0.2 * size),
                (hip_x - hip_w * 1.6, hip_y + 0.2 * size),
            ]
        )
    else:
        lower_polys += [
            _limb(hip_x + s * hip_w * 0.5, hip_y, s * stride + s * 0.03, leg_len * cover, leg_w) for s in (-1, 1)
        ]
        lower_polys.append(
            [
                (hip_x - hip_w, hip_y - 0.03 * size),
                (hip_x + hip_w, hip_y - 0.03 * size),
                (hip_x + hip_w, hip_y + 0.05 * size),
                (hip_x - hip_w, hip_y + 0.05 * size),
            ]
        )
    _paint(
        canvas,
        lower_polys,
        (c["lower"], c["lower2"]),
        ident.lower_pattern,
        ident.upper_period * size * 1.3,
        (hip_x, hip_y),
        0.0,
    )

    # arms (skin), then the upper clothes over torso and sleeves
    arms, sleeves = [], []
    for s, angle in ((-1, swing), (1, -swing + rng.normal(0, 0.05))):
        ax, ay = upper(cx + s * (shoulder_w - arm_w * 0.4), shoulder_y + 0.01 * size)
        a = angle + s * 0.07 - lean
        arms.append(_limb(ax, ay, a, arm_len, arm_w))
        sleeves.append(_limb(ax, ay, a, arm_len * (0.92 if ident.long_sleeves else 0.4), arm_w * 1.1))
    for arm in arms:
        draw.polygon(arm, fill=c["skin"])
        hx, hy = arm[2][0] / 2 + arm[3][0] / 2, arm[2][1] / 2 + arm[3][1] / 2
        draw.ellipse([hx - arm_w * 0.6, hy - arm_w * 0.6, hx + arm_w * 0.6, hy + arm_w * 0.6], fill=c["skin"])
    torso = [
        upper(cx - shoulder_w, shoulder_y),
        upper(cx + shoulder_w, shoulder_y),
        upper(cx + hip_w * 1.05, hip_y + 0.02 * size),
        upper(cx - hip_w * 1.05, hip_y + 0.02 * size),
    ]
    split = (0.22 + 0.2 * (ident.upper_period - 0.035) / 0.045) * size  # two-tone split height: per identity
    _paint(
        canvas,
        [torso, *sleeves],
        (c["upper"], c["upper2"]),
        ident.upper_pattern,
        ident.upper_period * size,
        upper(cx - shoulder_w, shoulder_y),
        split,
    )

    if ident.backpack is not None:
        if back_view:
            pack = [
                upper(cx - shoulder_w * 0.75, shoulder_y + 0.03 * size),
                upper(cx + shoulder_w * 0.75, shoulder_y + 0.03 * size),
                upper(cx + shoulder_w * 0.7, shoulder_y + 0.26 * size),
                upper(cx - shoulder_w * 0.7, shoulder_y + 0.26 * size),
            ]
            draw.polygon(pack, fill=ident.backpack)
        else:
            for s in (-1, 1):
                draw.line(
                    [
                        upper(cx + s * shoulder_w * 0.55, shoulder_y),
                        upper(cx + s * shoulder_w * 0.5, shoulder_y + 0.2 * size),
                    ],
                    fill=ident.backpack,
                    width=max(int(0.025 * size), 1),
                )

    hx, hy = head
    draw.ellipse(
        [hx - head_r, hy - head_r * 1.1, hx + head_r, hy + head_r * 1.1],
        fill=c["hair"] if back_view else c["skin"],
    )
    draw.chord(
        [hx - head_r * 1.05, hy - head_r * 1.2, hx + head_r * 1.05, hy + head_r * 0.6],
        180,
        360,
        fill=c["hair"],
    )
    if ident.hat is not None:
        draw.rectangle([hx - head_r * 1.1, hy - head_r * 1.25, hx + head_r * 1.1, hy - head_r * 0.35], fill=ident.hat)
        draw.rectangle([hx - head_r * 1.4, hy - head_r * 0.5, hx + head_r * 1.4, hy - head_r * 0.3], fill=ident.hat)
    if ident.bag is not None:
        side = ident.bag_side * (-1 if back_view else 1)
        bx, by = upper(cx + side * (shoulder_w + 0.02 * size), hip_y - 0.06 * size)
        draw.line(
            [upper(cx - side * shoulder_w * 0.6, shoulder_y), (bx, by)],
            fill=ident.bag,
            width=max(int(0.02 * size), 1),
        )
        draw.rectangle([bx - 0.05 * size, by, bx + 0.05 * size, by + 0.11 * size], fill=ident.bag)


def _occlude(canvas: Image.Image, rng: np.random.Generator, foot: float, size: float) -> None:
    """An object between camera and person: a box from below or a panel from one side."""
    w, h = canvas.size
    colour = _rgb(_muted(rng, (0.0, 0.5), (0.15, 0.8)))
    if rng.random() < 0.5:
        y0 = foot - rng.uniform(0.2, 0.45) * size
        x0 = rng.uniform(-0.3, 0.4) * w
        ImageDraw.Draw(canvas).rectangle([x0, y0, x0 + rng.uniform(0.5, 1.0) * w, h], fill=colour)
    else:
        width = rng.uniform(0.22, 0.4) * w
        x0 = 0 if rng.random() < 0.5 else w - width
        ImageDraw.Draw(canvas).rectangle([x0, rng.uniform(0.0, 0.4) * h, x0 + width, h], fill=colour)


def _camera_effects(
    image: Image.Image, spec: SyntheticDomainSpec, cam: _Camera, rng: np.random.Generator
) -> Image.Image:
    """Colour cast, exposure, tone curve, light gradient, resolution loss, blur and sensor noise."""
    w, h = image.size
    x = np.asarray(image, dtype=np.float32) / 255.0
    x = x**cam.gamma
    light = 1.0 + cam.light_slope * (np.linspace(-0.5, 0.5, w, dtype=np.float32)[None, :, None])
    x = x * cam.gains * (cam.exposure * rng.uniform(0.95, 1.05)) * light
    image = Image.fromarray((np.clip(x, 0.0, 1.0) * 255 + 0.5).astype(np.uint8))
    if spec.downsample < 1.0:
        small = (max(int(w * spec.downsample), 4), max(int(h * spec.downsample), 8))
        image = image.resize(small, Image.BILINEAR).resize((w, h), Image.BILINEAR)
    radius = rng.uniform(*spec.blur)
    if radius > 0.05:
        image = image.filter(ImageFilter.GaussianBlur(radius))
    x = np.asarray(image, dtype=np.float32) + rng.normal(0.0, spec.noise * 255, (h, w, 3)).astype(np.float32)
    return Image.fromarray(np.clip(x + 0.5, 0, 255).astype(np.uint8))


# ------------------------------------------------------------------------------------------ images and plan
@dataclass(frozen=True)
class _Job:
    folder: str
    filename: str
    kind: str  # person | distractor | junk
    pid: int  # person: the identity; distractor / junk: running index
    cam: int  # 1-based
    shot: int  # index of the image of (pid, cam)


def render_image(spec: SyntheticDomainSpec, seed: int, kind: str, pid: int, cam: int, shot: int) -> Image.Image:
    """Render one image (``height x width`` RGB) deterministically from its (seed, kind, pid, cam, shot)."""
    stream = {"person": _IMG, "distractor": _DISTRACTOR, "junk": _JUNK}[kind]
    rng = _rng(seed, spec.name, stream, pid, cam, shot)
    camera = _make_camera(spec, seed, cam)
    h, w = spec.height * _SUPERSAMPLE, spec.width * _SUPERSAMPLE
    canvas = Image.fromarray(np.clip(_background(spec, camera, rng, h, w), 0, 255).astype(np.uint8))
    size = h * rng.uniform(*spec.scale)
    cx, foot = w * (0.5 + rng.normal(0.0, 0.05)), h * (0.975 + rng.normal(0.0, 0.008))
    if kind == "person":
        ident = make_identity(spec.name, seed, pid)
        _draw_person(canvas, ident, rng, spec, cx, foot, size * ident.height)
        if rng.random() < spec.occlusion_p:
            _occlude(canvas, rng, foot, size)
    elif kind == "distractor":  # a badly cropped stranger, or a box on an empty scene
        if rng.random() < 0.6:
            shift = rng.choice([-1, 1]) * rng.uniform(0.3, 0.6) * w
            _draw_person(
                canvas,
                _sample_identity(rng),
                rng,
                spec,
                cx + shift,
                foot + rng.uniform(0, 0.4) * h,
                size * rng.uniform(1.0, 1.6),
            )
        else:
            _occlude(canvas, rng, foot, size)
    else:  # junk: background with a fragment of a body, the typical false detection
        _draw_person(canvas, _sample_identity(rng), rng, spec, cx, foot + rng.uniform(0.4, 0.7) * h, size)
    canvas = canvas.reduce(_SUPERSAMPLE)
    return _camera_effects(canvas, spec, camera, rng)


def _plan(spec: SyntheticDomainSpec, seed: int) -> list[_Job]:
    """Every file of the domain: train and test ids (each in >= 2 cameras), junk and distractors."""
    jobs: list[_Job] = []
    low, high = spec.images_per_id_per_cam

    def add(folder: str, kind: str, pid: int, cam: int, shot: int) -> None:
        label = "-1" if kind == "junk" else f"{0 if kind == 'distractor' else pid:04d}"
        name = f"{label}_c{cam}s1_{len(jobs):06d}_00.jpg"
        jobs.append(_Job(folder, name, kind, pid, cam, shot))

    test_pids = range(spec.num_train_ids + 1, spec.num_train_ids + spec.num_test_ids + 1)
    for pid in [*range(1, spec.num_train_ids + 1), *test_pids]:
        rng = _rng(seed, spec.name, _PLAN, pid)
        cams = [int(c) + 1 for c in rng.permutation(spec.num_cams)[: rng.integers(2, spec.num_cams + 1)]]
        counts = [int(rng.integers(low, high + 1)) for _ in cams]
        if pid <= spec.num_train_ids:
            for cam, count in zip(cams, counts):
                for shot in range(count):
                    add("bounding_box_train", "person", pid, cam, shot)
            continue
        # Query: the first image of 1-2 cameras; at least one camera stays wholly in the gallery.
        num_query_cams = min(int(rng.integers(1, 3)), len(cams) - 1)
        for i, (cam, count) in enumerate(zip(cams, counts)):
            for shot in range(count):
                add(
                    "query" if i < num_query_cams and shot == 0 else "bounding_box_test",
                    "person",
                    pid,
                    cam,
                    shot,
                )
    plan_rng = _rng(seed, spec.name, _PLAN, 0)
    for kind, count in (("distractor", spec.num_distractors), ("junk", spec.num_junk)):
        for index in range(count):
            add("bounding_box_test", kind, index, int(plan_rng.integers(1, spec.num_cams + 1)), 0)
    return jobs


def _write_jobs(args: tuple[Path, SyntheticDomainSpec, int, list[_Job]]) -> None:
    out, spec, seed, jobs = args
    for job in jobs:
        image = render_image(spec, seed, job.kind, job.pid, job.cam, job.shot)
        image.save(out / job.folder / job.filename, format="JPEG", quality=JPEG_QUALITY)


def _marker(spec: SyntheticDomainSpec, seed: int) -> dict[str, Any]:
    meta = {"generator_version": GENERATOR_VERSION, "seed": seed, "spec": asdict(spec)}
    return json.loads(json.dumps(meta))  # tuples -> lists, as they read back from disk


def _read_marker(root: Path) -> dict[str, Any] | None:
    try:
        return json.loads((root / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _pool_context() -> mp.context.BaseContext:
    # fork keeps start-up cheap (no re-import of torch); the workers only use numpy and PIL.
    if sys.platform == "linux":
        return mp.get_context("fork")
    return mp.get_context("spawn")


def generate_domain(
    root: str | os.PathLike, spec: SyntheticDomainSpec, seed: int = 0, workers: int | None = None
) -> Path:
    """Write one domain in Market-1501 layout under ``root`` (or reuse it) and return ``root``.

    ``root/.complete`` holds the spec and seed as JSON; when it matches, nothing is done. Otherwise the
    domain is generated in a fresh sibling folder that then replaces ``root``, so files never mix. The
    output is byte-identical for the same (spec, seed), whatever ``workers`` is.
    """
    root = Path(root)
    wanted = _marker(spec, seed)
    if _read_marker(root) == wanted:
        return root
    if root.exists() and _read_marker(root) is None:
        raise DatasetError(
            f"'{root}' exists but is not a generated synthetic domain (no {MARKER} file); "
            "remove it or choose another data_dir."
        )
    jobs = _plan(spec, seed)
    tmp = root.with_name(f"{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for folder in ("bounding_box_train", "query", "bounding_box_test"):
        (tmp / folder).mkdir(parents=True)
    if workers is None:
        workers = min(os.cpu_count() or 1, 8) if len(jobs) >= _PARALLEL_MIN_IMAGES else 1
    chunks = [(tmp, spec, seed, jobs[i::workers]) for i in range(workers)]
    if workers > 1:
        with _pool_context().Pool(workers) as pool:
            pool.map(_write_jobs, chunks)
    else:
        _write_jobs(chunks[0])
    (tmp / MARKER).write_text(json.dumps(wanted, indent=1, sort_keys=True))
    if _read_marker(root) == wanted:  # another process finished the same domain meanwhile
        shutil.rmtree(tmp)
        return root
    if root.exists():
        shutil.rmtree(root)
    tmp.rename(root)
    return root


def synthetic_domain_dir(data_dir: str | os.PathLike, spec: SyntheticDomainSpec, seed: int) -> Path:
    """Where a synthetic domain lives: ``data_dir/synthetic/<spec.name>_s<seed>``."""
    return Path(data_dir) / "synthetic" / f"{spec.name}_s{seed}"


def make_synthetic_pair(
    data_dir: str | os.PathLike,
    seed: int = 0,
    source: SyntheticDomainSpec = SOURCE_STYLE,
    target: SyntheticDomainSpec = TARGET_STYLE,
    workers: int | None = None,
) -> tuple[Path, Path]:
    """Generate (or reuse) ``data_dir/synthetic/<name>_s<seed>`` for the source and the target domain."""
    if source.name == target.name:
        raise ValueError(
            f"the source and target synthetic domains must have different names, both are {source.name!r}."
        )
    return (
        generate_domain(synthetic_domain_dir(data_dir, source, seed), source, seed, workers),
        generate_domain(synthetic_domain_dir(data_dir, target, seed), target, seed, workers),
    )
