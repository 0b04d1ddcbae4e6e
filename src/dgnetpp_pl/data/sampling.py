"""The train sampler: one epoch of (source, target) pairs with a positive each, seeded by (seed, epoch).

It runs in the main process and reads the target pseudo-labels from the :class:`PseudoLabelStore` when an
epoch's iterator starts; every key carries the anchor's label and the index of its positive, so dataloader
workers never hold labels.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
from torch.utils.data import Sampler

from dgnetpp_pl.label_store import PseudoLabelStore


def pick_positives(labels: np.ndarray, anchors: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """For each anchor index, a random *other* index with the same label; the anchor itself when its label
    is -1 or it is alone. ``labels`` (N,), ``anchors`` (M,) -> (M,) int64."""
    labels, anchors = np.asarray(labels), np.asarray(anchors, dtype=np.int64)
    order = np.argsort(labels, kind="stable")
    rank_of = np.empty_like(order)
    rank_of[order] = np.arange(len(order))
    sorted_labels = labels[order]
    anchor_labels = labels[anchors]
    start = np.searchsorted(sorted_labels, anchor_labels, side="left")
    size = np.searchsorted(sorted_labels, anchor_labels, side="right") - start
    offset = rng.integers(0, np.maximum(size - 1, 1))  # skip 1..size-1 places: never the anchor itself
    positives = order[start + (rank_of[anchors] - start + 1 + offset) % size]
    return np.where((size > 1) & (anchor_labels >= 0), positives, anchors).astype(np.int64)


class PairKey(NamedTuple):
    """One training pair as drawn by :class:`PairSampler`; ``target == -1`` in the source-only stage."""

    source: int
    source_pos: int
    target: int
    target_pos: int
    target_label: int
    seed: int  # seeds the augmentation of the four images


class PairSampler(Sampler[PairKey]):
    """Draws one epoch of pairs: random source and target images without replacement, one positive each.

    The epoch has ``floor(min(N_s, N_t_usable) / batch_size) * batch_size`` pairs (source stage, ``labels=None``:
    N_s only), where N_t_usable counts every target image, or only labelled ones with ``drop_target_outliers``.
    The order is seeded by ``(seed, epoch)``; Lightning calls :meth:`set_epoch` before each epoch.
    """

    def __init__(
        self,
        source_labels: np.ndarray,
        labels: PseudoLabelStore | None,
        num_target: int,
        batch_size: int,
        seed: int,
        drop_target_outliers: bool = False,
    ) -> None:
        self.source_labels = np.asarray(source_labels, dtype=np.int64)
        self.labels, self.num_target = labels, num_target
        self.batch_size, self.seed, self.epoch = batch_size, seed, 0
        self.drop_target_outliers = drop_target_outliers

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _usable_targets(self, labels: np.ndarray) -> np.ndarray:
        if self.drop_target_outliers and (labels >= 0).any():
            return np.flatnonzero(labels >= 0)
        return np.arange(self.num_target)

    def __len__(self) -> int:
        count = len(self.source_labels)
        if self.labels is not None:
            count = min(count, len(self._usable_targets(self.labels.labels_for(self.num_target))))
        return count // self.batch_size * self.batch_size

    def __iter__(self) -> Iterator[PairKey]:
        rng = np.random.default_rng([self.seed, self.epoch])
        count = len(self)
        source = rng.permutation(len(self.source_labels))[:count]
        source_pos = pick_positives(self.source_labels, source, rng)
        seeds = rng.integers(0, 2**60, count)
        if self.labels is None:
            target = target_pos = target_label = np.full(count, -1)
        else:
            labels = self.labels.labels_for(self.num_target)
            usable = self._usable_targets(labels)
            target = usable[rng.permutation(len(usable))[:count]]
            target_pos = pick_positives(labels, target, rng)
            target_label = labels[target]
        columns = (source, source_pos, target, target_pos, target_label, seeds)
        return iter([PairKey(*row) for row in zip(*(c.tolist() for c in columns))])
