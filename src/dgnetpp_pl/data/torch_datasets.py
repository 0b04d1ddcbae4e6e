"""Torch datasets over image records: the paired train set and the labelled source train set (keys from the sampler),
the paired set's whole-batch view for the official batch mix, and the plain evaluation set."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset, default_collate

from dgnetpp_pl.data.batch_mix import MixBatchKey
from dgnetpp_pl.data.datasets import load_image
from dgnetpp_pl.data.records import ImageRecord
from dgnetpp_pl.data.sampling import PairKey


class PairedTrainDataset(Dataset):
    """Map-style dataset over :class:`PairKey` keys: ``key -> {"source": S, "target": T}``, each domain present
    when its index is >= 0.

    S and T hold ``image`` and ``pos`` (3, H, W) float, ``label``, ``camid``, ``index`` and ``pos_index``.
    Augmentation is seeded by the key, so a batch does not depend on the worker that loads it.
    """

    def __init__(self, source: Sequence[ImageRecord], target: Sequence[ImageRecord], transform: Callable) -> None:
        self.source, self.target, self.transform = list(source), list(target), transform

    def __len__(self) -> int:  # keys are PairKeys, not 0..len-1; the sampler defines the epoch
        return len(self.source)

    def __getitem__(self, key: PairKey) -> dict[str, dict[str, Any]]:
        item = {}
        if key.source >= 0:
            source_label = self.source[key.source].pid
            item["source"] = self._sample(self.source, key.source, key.source_pos, source_label, key.seed, 0)
        if key.target >= 0:
            item["target"] = self._sample(self.target, key.target, key.target_pos, key.target_label, key.seed, 2)
        return item

    def _sample(
        self, records: list[ImageRecord], index: int, pos_index: int, label: int, seed: int, stream: int
    ) -> dict[str, Any]:
        return {
            "image": self._augment(records[index].path, seed * 4 + stream),
            "pos": self._augment(records[pos_index].path, seed * 4 + stream + 1),
            "label": label,
            "camid": records[index].camid,
            "index": index,
            "pos_index": pos_index,
        }

    def _augment(self, path: str, seed: int) -> torch.Tensor:
        image = load_image(path)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(image)


class LabelledTrainDataset(Dataset):
    """Map-style dataset over :class:`PairKey` keys that reads the source image only: ``key -> {"source": S}``
    with ``image`` (3, H, W), ``label``, ``camid`` and ``index`` (the teacher stage's batches). Augmentation is
    seeded by the key."""

    def __init__(self, records: Sequence[ImageRecord], transform: Callable) -> None:
        self.records, self.transform = list(records), transform

    def __len__(self) -> int:  # keys are PairKeys; the sampler defines the epoch
        return len(self.records)

    def __getitem__(self, key: PairKey) -> dict[str, dict[str, Any]]:
        record = self.records[key.source]
        image = load_image(record.path)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(key.seed * 4)
            image = self.transform(image)
        return {"source": {"image": image, "label": record.pid, "camid": record.camid, "index": key.source}}


class MixedBatchDataset(Dataset):
    """Whole batches of the official mix (read with ``batch_size=None``): ``MixBatchKey -> batch``.

    aa: ``{"source": S}`` with 2B images (first half, then second half); bb: ``{"target": T}`` with 2B images;
    ab and ba: ``{"source": S, "target": T}`` with B each. A skipped batch is ``{"skip": "aa"}``: no image is read.
    """

    def __init__(self, pairs: PairedTrainDataset) -> None:
        self.pairs = pairs

    def __len__(self) -> int:  # keys are MixBatchKeys; the sampler defines the epoch
        return len(self.pairs)

    def __getitem__(self, key: MixBatchKey) -> dict[str, Any]:
        if key.skipped:
            return {"skip": key.batch_type}
        return default_collate([self.pairs[k] for k in key.keys])


class ReIDImageDataset(Dataset):
    """Plain dataset over records: ``i -> {"image", "pid", "camid", "index"}``.

    For evaluation sets the first ``num_query`` records are the queries, the rest the gallery.
    """

    def __init__(self, records: Sequence[ImageRecord], transform: Callable, num_query: int = 0) -> None:
        self.records, self.transform, self.num_query = list(records), transform, num_query

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        image = self.transform(load_image(record.path))
        return {"image": image, "pid": record.pid, "camid": record.camid, "index": index}
