"""The official batch mix (``data.pairing=official``): one epoch of type-homogeneous batches, source-source (aa),
target-target (bb) and cross-domain (ab, ba), drawn per epoch as the official code's mixed loaders, seeded by
``(seed, epoch)``.

The rule, from the official ``get_mix_data_loaders``: each domain gives ``n = min(N_s, N_t)`` images (the larger
domain subsampled; ``N_t`` counts the usable target images), and each of them can appear once in the first position
of a pair and once in the second. ``ab_num = floor(ab_port * n) // B * B`` first-position source images go to ab
batches and as many second-position source images to ba batches, likewise for the target; ``xx_num = (n - ab_num)
// B * B`` of the remaining ones go to aa, and of the target's to bb. That is about ``2n / B`` batches: ``xx_port / 2``
each of aa and bb, ``ab_port / 2`` each of ab and ba. The types come in the order of a die rolled once per batch
with those shares, among the types that have batches left. A ba batch (target first) is delivered as ab, source
first, as the official code swaps its arguments.

Every item this sampler yields is a whole batch (:class:`MixBatchKey`), read by
:class:`~dgnetpp_pl.data.torch_datasets.MixedBatchDataset` with ``batch_size=None``. Under DDP it is told its rank:
every rank draws the same type sequence (it depends on ``(seed, epoch)`` only) and takes its own batch of that type
at every step, disjoint from the other ranks' batches.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
from torch.utils.data import DistributedSampler

from dgnetpp_pl.data.sampling import PairKey, pick_positives
from dgnetpp_pl.label_store import PseudoLabelStore
from dgnetpp_pl.schedule import AdaptSchedule

MIX_KINDS = ("aa", "bb", "ab", "ba")


class MixBatchKey(NamedTuple):
    """One batch of the mix. ``drawn_as``: ``"aa" | "bb" | "ab" | "ba"``. ``keys``: 2B one-domain keys for aa and
    bb (the first B are the first half), B source-target keys for ab and ba (source first). ``skipped``: drawn
    but not trained (the schedule's ``skips``), so no image is loaded for it."""

    drawn_as: str
    keys: tuple[PairKey, ...]
    skipped: bool

    @property
    def batch_type(self) -> str:
        """The type the step trains: ``"ab"`` for ab and ba batches, else ``drawn_as``."""
        return "ab" if self.drawn_as == "ba" else self.drawn_as


def mix_batch_counts(num_source: int, num_target: int, batch_size: int, ab_port: float) -> dict[str, int]:
    """Batches of each kind in one epoch (the official rule): ``xx_num / B`` aa and bb, ``ab_num / B`` ab and ba."""
    n = min(num_source, num_target)
    ab = math.floor(ab_port * n) // batch_size
    xx = (n - ab * batch_size) // batch_size
    return {"aa": xx, "bb": xx, "ab": ab, "ba": ab}


def roll_types(steps: dict[str, int], shares: dict[str, float], rng: np.random.Generator) -> list[str]:
    """The type of every step: a die with ``shares`` per step, among the kinds with ``steps`` left (the official
    draw rerolls a used-up kind, which is the same as dropping it from the die)."""
    left = dict(steps)
    order: list[str] = []
    for _ in range(sum(steps.values())):
        kinds = [k for k in MIX_KINDS if left.get(k, 0) > 0]
        weights = np.array([shares[k] for k in kinds], dtype=np.float64)
        pick = kinds[int(rng.choice(len(kinds), p=weights / weights.sum()))] if weights.sum() > 0 else kinds[0]
        left[pick] -= 1
        order.append(pick)
    return order


class MixSampler(DistributedSampler):
    """One epoch of :class:`MixBatchKey` for rank ``rank`` of ``num_replicas``, seeded by ``(seed, epoch)``.

    A :class:`~torch.utils.data.DistributedSampler` because it is one: Lightning then leaves it unwrapped (it
    wraps other samplers in its own distributed sampler, which would deal whole batches to the ranks without
    regard to their types). Lightning calls :meth:`set_epoch` before each epoch. Target pseudo-labels are read
    from ``labels`` when an epoch's iterator starts.
    """

    def __init__(
        self,
        source_labels: np.ndarray,
        labels: PseudoLabelStore,
        num_target: int,
        batch_size: int,
        seed: int,
        *,
        xx_port: float,
        ab_port: float,
        schedule: AdaptSchedule,
        drop_target_outliers: bool = False,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        # DistributedSampler.__init__ is not called: it would ask the process group; this sampler is told its rank.
        if not 0 <= rank < num_replicas:
            raise ValueError(f"MixSampler: rank {rank} is not in [0, {num_replicas})")
        self.source_labels = np.asarray(source_labels, dtype=np.int64)
        self.labels, self.num_target = labels, num_target
        self.batch_size, self.seed, self.epoch = batch_size, seed, 0
        self.shares = {"aa": xx_port / 2, "bb": xx_port / 2, "ab": ab_port / 2, "ba": ab_port / 2}
        self.ab_port, self.schedule = ab_port, schedule
        self.drop_target_outliers = drop_target_outliers
        self.num_replicas, self.rank = num_replicas, rank

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _usable_targets(self, labels: np.ndarray) -> np.ndarray:
        if self.drop_target_outliers and (labels >= 0).any():
            return np.flatnonzero(labels >= 0)
        return np.arange(self.num_target)

    def _steps(self, num_usable: int) -> dict[str, int]:
        """Steps of each kind on every rank: the epoch's batches of the kind, dealt whole to the ranks."""
        counts = mix_batch_counts(len(self.source_labels), num_usable, self.batch_size, self.ab_port)
        return {k: c // self.num_replicas for k, c in counts.items()}

    def __len__(self) -> int:
        labels = self.labels.labels_for(self.num_target)
        return sum(self._steps(len(self._usable_targets(labels))).values())

    def __iter__(self) -> Iterator[MixBatchKey]:
        return iter(self.epoch_batches())

    def epoch_batches(self) -> list[MixBatchKey]:
        """This rank's batches of the epoch, in order."""
        rng = np.random.default_rng([self.seed, self.epoch])
        labels = self.labels.labels_for(self.num_target)
        usable = self._usable_targets(labels)
        b = self.batch_size
        counts = mix_batch_counts(len(self.source_labels), len(usable), b, self.ab_port)
        n = min(len(self.source_labels), len(usable))
        ab_num, xx_num = counts["ab"] * b, counts["aa"] * b
        source = rng.permutation(len(self.source_labels))[:n]
        target = usable[rng.permutation(len(usable))[:n]]

        def positions(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            """One position's (first or second) images for the cross-domain and the same-domain batches."""
            order = rng.permutation(n)
            return images[order[:ab_num]], images[order[ab_num : ab_num + xx_num]]

        (src_first_x, src_first_s), (src_second_x, src_second_s) = positions(source), positions(source)
        (tgt_first_x, tgt_first_s), (tgt_second_x, tgt_second_s) = positions(target), positions(target)
        # (source images, target images) of each kind: one domain's two halves side by side for aa and bb.
        halves = {
            "aa": (np.concatenate([src_first_s.reshape(-1, b), src_second_s.reshape(-1, b)], axis=1), None),
            "bb": (None, np.concatenate([tgt_first_s.reshape(-1, b), tgt_second_s.reshape(-1, b)], axis=1)),
            "ab": (src_first_x.reshape(-1, b), tgt_second_x.reshape(-1, b)),
            "ba": (src_second_x.reshape(-1, b), tgt_first_x.reshape(-1, b)),  # swapped: source first
        }
        keys = {kind: self._keys(src, tgt, labels, rng) for kind, (src, tgt) in halves.items()}
        steps = self._steps(len(usable))
        done = dict.fromkeys(MIX_KINDS, 0)
        out = []
        for kind in roll_types(steps, self.shares, rng):
            batch = keys[kind][done[kind] * self.num_replicas + self.rank]
            done[kind] += 1
            batch_type = "ab" if kind == "ba" else kind
            out.append(MixBatchKey(kind, batch, self.schedule.skips(batch_type, self.epoch)))
        return out

    def _keys(
        self, source: np.ndarray | None, target: np.ndarray | None, labels: np.ndarray, rng: np.random.Generator
    ) -> list[tuple[PairKey, ...]]:
        """Pair keys of each batch (row) of ``source`` / ``target`` image indices ``(num_batches, per_batch)``."""
        shape = (source if source is not None else target).shape
        none = np.full(shape, -1, dtype=np.int64)
        src = none if source is None else source
        src_pos = none if source is None else pick_positives(self.source_labels, source.ravel(), rng).reshape(shape)
        tgt = none if target is None else target
        tgt_pos = none if target is None else pick_positives(labels, target.ravel(), rng).reshape(shape)
        tgt_label = none if target is None else labels[target]
        seeds = rng.integers(0, 2**60, shape)
        columns = [c.tolist() for c in (src, src_pos, tgt, tgt_pos, tgt_label, seeds)]
        return [tuple(PairKey(*row) for row in zip(*(c[i] for c in columns), strict=True)) for i in range(shape[0])]
