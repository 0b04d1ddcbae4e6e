"""Pure person renderer: one identity in a random pose, and objects that occlude it."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from dgnetpp_pl.data.synthetic.identities import Identity
from dgnetpp_pl.data.synthetic.palette import jitter, muted, rgb
from dgnetpp_pl.data.synthetic.spec import SyntheticDomainSpec


def _limb(x: float, y: float, angle: float, length: float, width: float) -> list[tuple[float, float]]:
    """Rectangle from joint (x, y) hanging at ``angle`` from the vertical."""
    dx, dy = np.sin(angle) * length, np.cos(angle) * length
    nx, ny = np.cos(angle) * width / 2, -np.sin(angle) * width / 2
    return [(x - nx, y - ny), (x + nx, y + ny), (x + dx + nx, y + dy + ny), (x + dx - nx, y + dy - ny)]


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


def draw_person(
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

    c = {k: jitter(getattr(ident, k), rng) for k in ("skin", "hair", "upper", "upper2", "lower", "lower2")}
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


def draw_occluder(canvas: Image.Image, rng: np.random.Generator, foot: float, size: float) -> None:
    """An object between camera and person: a box from below or a panel from one side."""
    w, h = canvas.size
    colour = rgb(muted(rng, (0.0, 0.5), (0.15, 0.8)))
    if rng.random() < 0.5:
        y0 = foot - rng.uniform(0.2, 0.45) * size
        x0 = rng.uniform(-0.3, 0.4) * w
        ImageDraw.Draw(canvas).rectangle([x0, y0, x0 + rng.uniform(0.5, 1.0) * w, h], fill=colour)
    else:
        width = rng.uniform(0.22, 0.4) * w
        x0 = 0 if rng.random() < 0.5 else w - width
        ImageDraw.Draw(canvas).rectangle([x0, rng.uniform(0.0, 0.4) * h, x0 + width, h], fill=colour)
