"""Synthetic people: what makes one identity recognisable, drawn from its own random stream."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dgnetpp_pl.data.synthetic.palette import contrasting, random_colour, rgb
from dgnetpp_pl.data.synthetic.streams import STREAM_ID, stream_rng


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


def sample_identity(rng: np.random.Generator) -> Identity:
    """Draw one person's clothes, body, skin, hair and accessories from ``rng``."""
    upper = random_colour(rng)
    if rng.random() < 0.5:
        lower = rgb(_COMMON_LOWER[rng.integers(len(_COMMON_LOWER))] + rng.normal(0, 12, 3))
    else:
        lower = random_colour(rng)
    accessory = [random_colour(rng) if rng.random() < p else None for p in (0.2, 0.25, 0.25)]
    return Identity(
        height=float(rng.uniform(0.88, 1.0)),
        build=float(rng.uniform(0.8, 1.25)),
        skin=rgb(_SKINS[rng.integers(len(_SKINS))] + rng.normal(0, 8, 3)),
        hair=rgb(_HAIRS[rng.integers(len(_HAIRS))] + rng.normal(0, 8, 3)),
        long_hair=bool(rng.random() < 0.35),
        upper=upper,
        upper2=contrasting(rng, upper),
        upper_pattern=str(rng.choice(["solid", "stripes", "two_tone", "checks"], p=[0.4, 0.25, 0.2, 0.15])),
        upper_period=float(rng.uniform(0.035, 0.08)),
        long_sleeves=bool(rng.random() < 0.6),
        lower=lower,
        lower2=contrasting(rng, lower),
        lower_pattern=str(rng.choice(["solid", "stripes"], p=[0.85, 0.15])),
        lower_kind=str(rng.choice(["trousers", "shorts", "skirt"], p=[0.65, 0.2, 0.15])),
        shoes=rgb(rng.choice([[30, 30, 30], [235, 235, 235]]) if rng.random() < 0.7 else random_colour(rng)),
        hat=accessory[0],
        backpack=accessory[1],
        bag=accessory[2],
        bag_side=int(rng.choice([-1, 1])),
    )


def make_identity(name: str, seed: int, pid: int) -> Identity:
    """The identity of ``pid`` (>= 1) in the domain called ``name`` for data seed ``seed``."""
    return sample_identity(stream_rng(seed, name, STREAM_ID, pid))
