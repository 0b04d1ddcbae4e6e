"""Rank-list pictures: each query followed by its top-k gallery matches, green border for a correct match,
red for a wrong one (junk, i.e. same id and camera, is skipped as in the protocol)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dgnetpp_pl.data.datasets import load_image
from dgnetpp_pl.data.records import ImageRecord

GREEN, RED, GRAY = (0, 170, 0), (210, 0, 0), (120, 120, 120)


def rank_list_image(
    distmat: np.ndarray,
    query: Sequence[ImageRecord],
    gallery: Sequence[ImageRecord],
    query_indices: Sequence[int],
    topk: int = 10,
    cell: tuple[int, int] = (128, 64),
    border: int = 4,
) -> Image.Image:
    """One row per query: the query (gray border) then its ``topk`` nearest valid gallery images."""
    h, w = cell
    rows = len(query_indices)
    canvas = Image.new("RGB", ((topk + 1) * (w + 2 * border) + 8, rows * (h + 2 * border)), "white")
    for r, qi in enumerate(query_indices):
        q = query[qi]
        order = np.argsort(distmat[qi], kind="stable")
        shown = [(q, GRAY)]
        for gi in order:
            g = gallery[gi]
            if g.pid == -1 or (g.pid == q.pid and g.camid == q.camid):
                continue
            shown.append((g, GREEN if g.pid == q.pid else RED))
            if len(shown) == topk + 1:
                break
        for c, (rec, colour) in enumerate(shown):
            x0 = c * (w + 2 * border) + (8 if c else 0)
            y0 = r * (h + 2 * border)
            tile = Image.new("RGB", (w + 2 * border, h + 2 * border), colour)
            tile.paste(load_image(rec.path).resize((w, h)), (border, border))
            canvas.paste(tile, (x0, y0))
    ImageDraw.Draw(canvas)
    return canvas


def save_rank_list(image: Image.Image, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
