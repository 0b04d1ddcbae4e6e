"""Held-out validation identities from a train split (``data.val_split``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dgnetpp_pl.data.datasets import DatasetError, relabel
from dgnetpp_pl.data.records import ImageRecord


def split_validation_ids(
    records: Sequence[ImageRecord], fraction: float, seed: int
) -> tuple[list[ImageRecord], list[ImageRecord], list[ImageRecord]]:
    """Hold out ``fraction`` of the identities (among those seen by >= 2 cameras) as a validation set.

    Returns ``(train, query, gallery)``: train (relabelled) without the held-out ids; for each held-out id
    the first image of each camera is a query and the rest are gallery images, except that a query with no
    image of its id under another camera in the gallery moves to the gallery (it could never be matched).
    """
    pids = sorted({r.pid for r in records})
    cams: dict[int, set[int]] = {}
    for r in records:
        cams.setdefault(r.pid, set()).add(r.camid)
    eligible = [pid for pid in pids if len(cams[pid]) >= 2]
    count = max(1, round(fraction * len(pids)))
    if count > len(eligible) or count >= len(pids):
        raise DatasetError(
            f"val_split={fraction} asks for {count} held-out ids, but only {len(eligible)} of the {len(pids)} "
            "target train ids appear in >= 2 cameras (and some must stay for training). Lower data.val_split."
        )
    held = {int(p) for p in np.random.default_rng(seed).choice(eligible, size=count, replace=False)}
    candidates, gallery, seen = [], [], set()
    for r in records:
        if r.pid in held:
            (gallery if (r.pid, r.camid) in seen else candidates).append(r)
            seen.add((r.pid, r.camid))
    gallery_cams: dict[int, set[int]] = {}
    for r in gallery:
        gallery_cams.setdefault(r.pid, set()).add(r.camid)
    query = []
    for r in candidates:  # the gallery only grows, so every kept query keeps its match
        if gallery_cams.get(r.pid, set()) - {r.camid}:
            query.append(r)
        else:
            gallery.append(r)
            gallery_cams.setdefault(r.pid, set()).add(r.camid)
    return relabel([r for r in records if r.pid not in held]), query, gallery
