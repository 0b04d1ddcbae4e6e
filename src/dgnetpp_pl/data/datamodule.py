"""CrossDomainDataModule: paired source / target train batches and the target evaluation loaders.

How pseudo-labels reach the batches: the train sampler runs in the main process and reads the datamodule's
current target labels each time an epoch's iterator starts; every sampled key carries the anchor's label
and the index of its positive, so dataloader workers never hold labels and no dataloader reload is needed.
Labels set before an epoch's iterator is created (e.g. in ``on_train_epoch_start`` of epochs > 0, or before
``fit``) are used for that whole epoch. Lightning creates the iterator of epoch 0 before any epoch hook.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from dgnetpp_pl.data.datasets import (
    DATASETS,
    DatasetError,
    Market1501,
    ReIDDataset,
    build_dataset,
    load_image,
    relabel,
    verify_images,
)
from dgnetpp_pl.data.records import ImageRecord
from dgnetpp_pl.data.resumable import ResumableDataLoader
from dgnetpp_pl.data.synthetic import SOURCE_STYLE, TARGET_STYLE, generate_domain, synthetic_domain_dir
from dgnetpp_pl.data.transforms import build_test_transform, build_train_transform

_DOMAIN_KEYS = ("name", "root", "style", "strict")
_STYLES = {"source": SOURCE_STYLE, "target": TARGET_STYLE}


# ------------------------------------------------------------------------------------------ pure helpers
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


# ------------------------------------------------------------------------------------- datasets, sampler
class PairKey(NamedTuple):
    """One training pair as drawn by :class:`PairSampler`; ``target == -1`` in the source-only stage."""

    source: int
    source_pos: int
    target: int
    target_pos: int
    target_label: int
    seed: int  # seeds the augmentation of the four images


class PairedTrainDataset(Dataset):
    """Map-style dataset over :class:`PairKey` keys: ``key -> {"source": S, "target": T}``.

    S and T hold ``image`` and ``pos`` (3, H, W) float, ``label``, ``camid``, ``index`` and ``pos_index``.
    Augmentation is seeded by the key, so a batch does not depend on the worker that loads it.
    """

    def __init__(self, source: Sequence[ImageRecord], target: Sequence[ImageRecord], transform: Callable) -> None:
        self.source, self.target, self.transform = list(source), list(target), transform

    def __len__(self) -> int:  # keys are PairKeys, not 0..len-1; the sampler defines the epoch
        return len(self.source)

    def __getitem__(self, key: PairKey) -> dict[str, dict[str, Any]]:
        source_label = self.source[key.source].pid
        item = {"source": self._sample(self.source, key.source, key.source_pos, source_label, key.seed, 0)}
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


class PairSampler(Sampler[PairKey]):
    """Draws one epoch of pairs: random source and target images without replacement, one positive each.

    The epoch has ``floor(min(N_s, N_t_usable) / batch_size) * batch_size`` pairs (source stage: N_s only),
    where N_t_usable counts every target image, or only labelled ones with ``drop_target_outliers``. The
    order is seeded by ``(seed, epoch)``; ``epoch`` advances after each pass and ``set_epoch`` sets it.
    """

    def __init__(
        self,
        source_labels: np.ndarray,
        target_labels: Callable[[], np.ndarray | None] | None,
        num_target: int,
        batch_size: int,
        seed: int,
        epoch: int = 0,
        drop_target_outliers: bool = False,
    ) -> None:
        self.source_labels = np.asarray(source_labels, dtype=np.int64)
        self.target_labels, self.num_target = target_labels, num_target
        self.batch_size, self.seed, self.epoch = batch_size, seed, epoch
        self.drop_target_outliers = drop_target_outliers

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _current_target_labels(self) -> np.ndarray:
        labels = self.target_labels() if self.target_labels is not None else None
        return np.full(self.num_target, -1, dtype=np.int64) if labels is None else labels

    def _usable_targets(self, labels: np.ndarray) -> np.ndarray:
        if self.drop_target_outliers and (labels >= 0).any():
            return np.flatnonzero(labels >= 0)
        return np.arange(self.num_target)

    def __len__(self) -> int:
        count = len(self.source_labels)
        if self.target_labels is not None:
            count = min(count, len(self._usable_targets(self._current_target_labels())))
        return count // self.batch_size * self.batch_size

    def __iter__(self) -> Iterator[PairKey]:
        rng = np.random.default_rng([self.seed, self.epoch])
        self.epoch += 1
        count = len(self)
        source = rng.permutation(len(self.source_labels))[:count]
        source_pos = pick_positives(self.source_labels, source, rng)
        seeds = rng.integers(0, 2**60, count)
        if self.target_labels is None:
            target = target_pos = target_label = np.full(count, -1)
        else:
            labels = self._current_target_labels()
            usable = self._usable_targets(labels)
            target = usable[rng.permutation(len(usable))[:count]]
            target_pos = pick_positives(labels, target, rng)
            target_label = labels[target]
        columns = (source, source_pos, target, target_pos, target_label, seeds)
        return iter([PairKey(*row) for row in zip(*(c.tolist() for c in columns))])


# -------------------------------------------------------------------------------------------- datamodule
def _plain(value: Any) -> Any:
    """Hydra DictConfig / ListConfig -> dict / list (without importing omegaconf)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [_plain(v) for v in value]
    return value


def _domain_config(config: Mapping[str, Any], role: str) -> dict[str, Any]:
    config = _plain(config)
    unknown = sorted(set(config) - set(_DOMAIN_KEYS))
    if unknown:
        raise DatasetError(f"data.{role}: unknown key(s) {unknown}; valid keys: {', '.join(_DOMAIN_KEYS)}.")
    config = {"root": None, "style": role, "strict": True, **config}
    names = [*DATASETS, "synthetic"]
    if config.get("name") not in names:
        raise DatasetError(f"data.{role}.name is {config.get('name')!r}; valid names: {', '.join(names)}.")
    if config["name"] == "synthetic" and config["style"] not in _STYLES:
        raise DatasetError(f"data.{role}.style is {config['style']!r}; valid styles: {', '.join(_STYLES)}.")
    if config["name"] != "synthetic" and not config["root"]:
        raise DatasetError(f"data.{role}.root is not set: give the folder of the {config['name']} dataset.")
    return config


class CrossDomainDataModule(pl.LightningDataModule):
    """Source + target re-ID data for DG-Net / DG-Net++.

    Train batches are ``{"source": S, "target": T}`` (``stage="adapt"``) or ``{"source": S}`` with
    2 * batch_size images (``stage="source"``); see :class:`PairedTrainDataset` for S and T. Target labels
    are the pseudo-labels given to :meth:`set_target_labels` (-1: none yet, or an outlier); a target
    positive is another image of the same pseudo-label, else another augmentation of the same image.
    Validation and test loaders run over target query + gallery (first ``num_query`` samples are queries).
    ``val_split > 0`` holds out that fraction of target train identities as the validation set instead
    (first image per camera of each held-out id is a query); test always uses the target test split.
    ``synthetic`` overrides the sizes of the built-in synthetic domains, e.g. ``{"num_train_ids": 12}``,
    plus ``seed`` (data seed, default 0), ``workers`` and per-role dicts ``source`` / ``target``.
    """

    def __init__(
        self,
        source: Mapping[str, Any],
        target: Mapping[str, Any],
        data_dir: str = "data",
        height: int = 256,
        width: int = 128,
        batch_size: int = 8,
        num_workers: int = 0,
        pad: int = 10,
        seed: int = 0,
        verify: bool = False,
        synthetic: Mapping[str, Any] | None = None,
        stage: str = "adapt",
        val_split: float = 0.0,
        test_batch_size: int = 64,
        drop_target_outliers: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        if stage not in ("source", "adapt"):
            raise DatasetError(f"data.stage is {stage!r}; valid values: source, adapt.")
        if not 0.0 <= val_split < 1.0:
            raise DatasetError(f"data.val_split must be in [0, 1), got {val_split}.")
        if batch_size < 1 or test_batch_size < 1:
            raise DatasetError(
                f"data.batch_size and data.test_batch_size must be >= 1, got {batch_size}, {test_batch_size}."
            )
        self.domains = {"source": _domain_config(source, "source"), "target": _domain_config(target, "target")}
        self.data_dir, self.height, self.width, self.pad = Path(data_dir), height, width, pad
        self.batch_size, self.test_batch_size, self.num_workers = batch_size, test_batch_size, num_workers
        self.seed, self.verify, self.train_stage, self.val_split = seed, verify, stage, val_split
        self.drop_target_outliers = drop_target_outliers
        self.synthetic = _plain(synthetic or {})
        self._labels: np.ndarray | None = None
        self._epoch = 0
        self._train_sampler: PairSampler | None = None
        self._data: dict[str, ReIDDataset] = {}

    # ------------------------------------------------------------------------------------- building
    def _synthetic_root(self, role: str) -> Path:
        config = self.domains[role]
        options = dict(self.synthetic)
        seed, workers = int(options.pop("seed", 0)), options.pop("workers", None)
        per_role = options.pop(role, None) or {}
        options.pop("target" if role == "source" else "source", None)
        try:
            spec = _STYLES[config["style"]].with_overrides({**options, **per_role})
        except (TypeError, ValueError) as err:
            raise DatasetError(f"data.synthetic: {err}") from err
        root = synthetic_domain_dir(config["root"] or self.data_dir, spec, seed)
        return generate_domain(root, spec, seed, workers)

    def prepare_data(self) -> None:
        """Generate the synthetic domains that are missing (Lightning calls this on one process per node)."""
        for role, config in self.domains.items():
            if config["name"] == "synthetic":
                self._synthetic_root(role)

    def _build(self, role: str) -> ReIDDataset:
        config = self.domains[role]
        try:
            if config["name"] == "synthetic":
                return Market1501(self._synthetic_root(role))
            return build_dataset(config["name"], config["root"], strict=config["strict"])
        except DatasetError as err:
            raise DatasetError(f"data.{role}: {err}") from err

    def setup(self, stage: str | None = None) -> None:
        if self._data:
            return
        source, target = self._build("source"), self._build("target")
        if source.root == target.root:
            warnings.warn(
                f"data.source and data.target are the same dataset ({source.root}): there is no domain gap to "
                "adapt across, so target metrics measure no transfer. Set data.target to another dataset.",
                stacklevel=2,
            )
        if self.verify:
            records = [r for ds in (source, target) for r in (*ds.train, *ds.query, *ds.gallery)]
            bad = verify_images(records)
            if bad:
                listing = "\n".join(f"  {path}: {reason}" for path, reason in bad)
                raise DatasetError(f"{len(bad)} unreadable image(s); replace or remove them:\n{listing}")
        if self.batch_size > source.num_train_pids:
            raise DatasetError(
                f"data.batch_size={self.batch_size} is larger than the {source.num_train_pids} source train "
                "identities; lower data.batch_size."
            )
        self._target_train = target.train
        self._val = (target.query, target.gallery)
        if self.val_split > 0:
            self._target_train, *val = split_validation_ids(target.train, self.val_split, self.seed)
            self._val = (val[0], val[1])
        pairs = len(source.train) if self.train_stage == "source" else min(len(source.train), len(self._target_train))
        per_batch = 2 * self.batch_size if self.train_stage == "source" else self.batch_size
        if pairs < per_batch:
            raise DatasetError(
                f"only {pairs} train images per domain for a batch of {per_batch}; lower data.batch_size."
            )
        self._data = {"source": source, "target": target}
        if self._labels is not None:  # restored by load_state_dict before setup
            self._labels = self._check_labels(self._labels)
        self._train_set = PairedTrainDataset(
            source.train, self._target_train, build_train_transform(self.height, self.width, self.pad)
        )

    def _require_setup(self) -> None:
        if not self._data:
            raise RuntimeError("CrossDomainDataModule: call setup() (or run it through a Trainer) first.")

    # ------------------------------------------------------------------------------------ properties
    @property
    def source_train_records(self) -> list[ImageRecord]:
        self._require_setup()
        return self._data["source"].train

    @property
    def num_source_ids(self) -> int:
        self._require_setup()
        return self._data["source"].num_train_pids

    @property
    def target_train_records(self) -> list[ImageRecord]:
        """Target train images (minus held-out validation ids); pseudo-labels are indexed like this list."""
        self._require_setup()
        return self._target_train

    @property
    def query_records(self) -> list[ImageRecord]:
        self._require_setup()
        return self._data["target"].query

    @property
    def gallery_records(self) -> list[ImageRecord]:
        self._require_setup()
        return self._data["target"].gallery

    @property
    def num_query(self) -> int:
        return len(self.query_records)

    @property
    def val_query_records(self) -> list[ImageRecord]:
        self._require_setup()
        return self._val[0]

    @property
    def val_gallery_records(self) -> list[ImageRecord]:
        self._require_setup()
        return self._val[1]

    @property
    def val_num_query(self) -> int:
        return len(self.val_query_records)

    # -------------------------------------------------------------------------------------- labels
    def _check_labels(self, labels: np.ndarray | torch.Tensor | Sequence[int]) -> np.ndarray:
        if isinstance(labels, torch.Tensor):
            labels = labels.detach().cpu().numpy()
        array = np.asarray(labels)
        expected = (len(self._target_train),)
        if array.shape != expected:
            raise DatasetError(
                f"target labels must have shape {expected} (one per target train image), got {array.shape}."
            )
        if array.dtype.kind not in "iu":
            raise DatasetError(f"target labels must be integers, got dtype {array.dtype}.")
        if array.size and array.min() < -1:
            raise DatasetError(f"target labels must be >= -1 (-1 = no label), got {int(array.min())}.")
        return array.astype(np.int64)

    def set_target_labels(self, labels: np.ndarray | torch.Tensor) -> None:
        """Set the target pseudo-labels, shape ``(N_target_train,)``, int, -1 = excluded from the id losses."""
        self._require_setup()
        self._labels = self._check_labels(labels)

    @property
    def target_labels(self) -> np.ndarray | None:
        return None if self._labels is None else self._labels.copy()

    @property
    def num_target_clusters(self) -> int:
        """Size of the target classifier: the largest pseudo-label + 1 (0 before labels exist)."""
        if self._labels is None or not (self._labels >= 0).any():
            return 0
        return int(self._labels.max()) + 1

    def state_dict(self) -> dict[str, Any]:
        epoch = self._train_sampler.epoch if self._train_sampler is not None else self._epoch
        labels = None if self._labels is None else torch.from_numpy(self._labels.copy())
        return {"target_labels": labels, "epoch": int(epoch)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        labels = state_dict.get("target_labels")
        self._labels = None if labels is None else np.asarray(torch.as_tensor(labels), dtype=np.int64)
        if self._labels is not None and self._data:
            self._labels = self._check_labels(self._labels)
        self._epoch = int(state_dict.get("epoch", 0))
        if self._train_sampler is not None:
            self._train_sampler.set_epoch(self._epoch)

    # ------------------------------------------------------------------------------------- loaders
    def _loader(
        self, dataset: Dataset, batch_size: int, cls: type[DataLoader] = DataLoader, **kwargs: Any
    ) -> DataLoader:
        # No persistent workers: loaders are rebuilt every epoch (train.py reloads them), and with
        # persistent workers every old loader would keep its processes alive until collected.
        return cls(
            dataset,
            batch_size=batch_size,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            **kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        self._require_setup()
        source_stage = self.train_stage == "source"
        if self.trainer is not None:
            epoch = self.trainer.current_epoch
        else:  # a fresh loader continues where the previous one stopped
            epoch = self._train_sampler.epoch if self._train_sampler is not None else self._epoch
        self._train_sampler = PairSampler(
            source_labels=np.array([r.pid for r in self._data["source"].train]),
            target_labels=None if source_stage else (lambda: self._labels),
            num_target=len(self._target_train),
            batch_size=2 * self.batch_size if source_stage else self.batch_size,
            seed=self.seed,
            epoch=epoch,
            drop_target_outliers=self.drop_target_outliers,
        )
        return self._loader(
            self._train_set,
            self._train_sampler.batch_size,
            ResumableDataLoader,  # a mid-epoch checkpoint continues the epoch where it stopped
            sampler=self._train_sampler,
            drop_last=True,
        )

    def _eval_loader(self, query: list[ImageRecord], gallery: list[ImageRecord]) -> DataLoader:
        dataset = ReIDImageDataset([*query, *gallery], build_test_transform(self.height, self.width), len(query))
        return self._loader(dataset, self.test_batch_size, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        self._require_setup()
        return self._eval_loader(*self._val)

    def test_dataloader(self) -> DataLoader:
        self._require_setup()
        return self._eval_loader(self.query_records, self.gallery_records)

    def preview_images(self, domain: str, num: int) -> torch.Tensor:
        """``num`` fixed train images of ``domain`` (first image of ids spread over the train set), test
        transform; ``(num, 3, H, W)``. The same images every call, for image grids."""
        if domain not in ("source", "target"):
            raise ValueError(f"preview_images: domain must be 'source' or 'target', got {domain!r}.")
        records = self.source_train_records if domain == "source" else self.target_train_records
        first_of_id: dict[int, ImageRecord] = {}
        for record in records:
            first_of_id.setdefault(record.pid, record)
        picks = list(first_of_id.values())
        transform = build_test_transform(self.height, self.width)
        chosen = np.linspace(0, len(picks) - 1, num).round().astype(int)
        return torch.stack([transform(load_image(picks[i].path)) for i in chosen])

    def target_train_feature_loader(self) -> DataLoader:
        """All target train images with the test transform, in :attr:`target_train_records` order."""
        self._require_setup()
        dataset = ReIDImageDataset(self._target_train, build_test_transform(self.height, self.width))
        return self._loader(dataset, self.test_batch_size, shuffle=False)
