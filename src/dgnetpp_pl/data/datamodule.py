"""CrossDomainDataModule: paired source / target train batches and the target evaluation loaders.

How pseudo-labels reach the batches: the train sampler (:mod:`dgnetpp_pl.data.sampling`) reads them from the
:class:`PseudoLabelStore` when each epoch's iterator starts, so labels stored before an epoch starts (at the end
of the previous epoch, or before ``fit``) are used for that whole epoch. The trainer still rebuilds the train
loader every epoch (``reload_dataloaders_every_n_epochs=1`` in ``train.py``): with
``data.drop_target_outliers`` the epoch's length follows the labels, and Lightning reads the length only when it
builds a loader. The epoch is Lightning's: the new loader's sampler starts at the epoch Lightning is about to run, and
Lightning calls its ``set_epoch`` before each epoch.

With ``data.pairing=official`` the adapt stage's sampler is :class:`~dgnetpp_pl.data.batch_mix.MixSampler`, which
yields whole type-homogeneous batches and deals them to the ranks itself (Lightning leaves it unwrapped).
"""

from __future__ import annotations

import logging
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_only
from torch.utils.data import DataLoader, Dataset

from dgnetpp_pl.data.batch_mix import MixSampler
from dgnetpp_pl.data.datasets import DatasetError, ReIDDataset, load_image, verify_images
from dgnetpp_pl.data.domains import build_domain, prepare_domain
from dgnetpp_pl.data.records import ImageRecord
from dgnetpp_pl.data.resumable import ResumableDataLoader
from dgnetpp_pl.data.sampling import PairSampler
from dgnetpp_pl.data.splits import split_validation_ids
from dgnetpp_pl.data.torch_datasets import (
    LabelledTrainDataset,
    MixedBatchDataset,
    PairedTrainDataset,
    ReIDImageDataset,
)
from dgnetpp_pl.data.transforms import build_test_transform, build_train_transform
from dgnetpp_pl.label_store import PseudoLabelStore
from dgnetpp_pl.schedule import AdaptSchedule

if TYPE_CHECKING:
    from dgnetpp_pl.config import DataConfig, TeacherConfig

log = logging.getLogger(__name__)


def make_loader(
    dataset: Dataset, batch_size: int | None, num_workers: int, cls: type[DataLoader] = DataLoader, **kwargs: Any
) -> DataLoader:
    """A DataLoader (or ``cls``) as every loader of the project is built (pinned memory on a GPU machine)."""
    # No persistent workers: the train loader is rebuilt every epoch, and with persistent workers every old
    # loader would keep its processes alive until collected.
    return cls(dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=torch.cuda.is_available(), **kwargs)


def eval_loader(query: list[ImageRecord], gallery: list[ImageRecord], config: DataConfig) -> DataLoader:
    """Query then gallery images with the test transform, in order; ``loader.dataset.num_query`` splits them."""
    dataset = ReIDImageDataset([*query, *gallery], build_test_transform(config.height, config.width), len(query))
    return make_loader(dataset, config.test_batch_size, config.num_workers, shuffle=False)


class CrossDomainDataModule(pl.LightningDataModule):
    """Source + target re-ID data for DG-Net / DG-Net++, from the typed ``data`` config.

    Train batches are ``{"source": S, "target": T}`` (``stage="adapt"``) or ``{"source": S}`` with
    2 * batch_size images (``stage="source"``); see :class:`PairedTrainDataset` for S and T. ``stage="teacher"``
    (with ``teacher``, the teacher stage's config): ``{"source": S}`` of ``teacher.batch_size`` labelled source images
    without positives, randomly erased with ``teacher.erasing_p`` (:class:`LabelledTrainDataset`). Target labels
    are those of ``labels`` (-1: none yet, or an outlier); a target positive is another image of the same
    pseudo-label, else another augmentation of the same image. Validation and test loaders run over target
    query + gallery (the first ``num_query`` samples are queries). ``data.val_split > 0`` holds out that fraction
    of target train identities as the validation set instead; test always uses the target test split.
    ``seed`` seeds the train order and the validation split. ``schedule`` says which batch types each epoch draws
    and skips (default: the stage with ``data.pairing``); with the official mix a batch holds one domain's 2B
    images (``{"source": S}`` for aa, ``{"target": T}`` for bb) or B of each (ab), or is ``{"skip": "aa"}``.
    """

    def __init__(
        self,
        config: DataConfig,
        stage: str = "adapt",
        seed: int = 0,
        labels: PseudoLabelStore | None = None,
        teacher: TeacherConfig | None = None,
        schedule: AdaptSchedule | None = None,
    ) -> None:
        super().__init__()
        if (stage == "teacher") != (teacher is not None):
            raise ValueError("CrossDomainDataModule: give the teacher config with stage='teacher', and only then.")
        self.config, self.train_stage, self.seed, self.teacher = config, stage, seed, teacher
        self.labels = labels if labels is not None or stage in ("source", "teacher") else PseudoLabelStore()
        self.schedule = schedule if schedule is not None else AdaptSchedule(stage=stage, pairing=config.pairing)
        if (self.schedule.stage, self.schedule.pairing) != (stage, config.pairing):
            raise ValueError(
                f"CrossDomainDataModule: the schedule is for stage {self.schedule.stage!r} with pairing "
                f"{self.schedule.pairing!r}, but the datamodule is for stage {stage!r} with data.pairing="
                f"{config.pairing!r}; build both from the same config."
            )
        self._data: dict[str, ReIDDataset] = {}

    def prepare_data(self) -> None:
        """Generate the synthetic domains that are missing (Lightning calls this on one process per node)."""
        for domain in (self.config.source, self.config.target):
            prepare_domain(domain, self.config.synthetic, self.config.data_dir)

    def setup(self, stage: str | None = None) -> None:
        if self._data:
            return
        c = self.config
        source = build_domain(c.source, c.synthetic, c.data_dir, "source")
        target = build_domain(c.target, c.synthetic, c.data_dir, "target")
        # Which folder each role read, with its sizes: the first thing to check when results look wrong.
        if rank_zero_only.rank == 0:
            log.info(f"data.source: {source!r}")
            log.info(f"data.target: {target!r}")
        if source.root == target.root:
            warnings.warn(
                f"data.source and data.target are the same dataset ({source.root}): there is no domain gap to "
                "adapt across, so target metrics measure no transfer. Set data.target to another dataset.",
                stacklevel=2,
            )
        if c.verify:
            records = [r for ds in (source, target) for r in (*ds.train, *ds.query, *ds.gallery)]
            bad = verify_images(records)
            if bad:
                listing = "\n".join(f"  {path}: {reason}" for path, reason in bad)
                raise DatasetError(f"{len(bad)} unreadable image(s); replace or remove them:\n{listing}")
        if self.teacher is None and c.batch_size > source.num_train_pids:
            raise DatasetError(
                f"data.batch_size={c.batch_size} is larger than the {source.num_train_pids} source train "
                "identities; lower data.batch_size."
            )
        self._target_train = target.train
        self._val = (target.query, target.gallery)
        if c.val_split > 0:
            self._target_train, *val = split_validation_ids(target.train, c.val_split, self.seed)
            self._val = (val[0], val[1])
        if self.teacher is not None:
            if len(source.train) < self.teacher.batch_size:
                raise DatasetError(
                    f"only {len(source.train)} source train images for a batch of {self.teacher.batch_size}; "
                    "lower teacher.batch_size."
                )
            self._data = {"source": source, "target": target}
            transform = build_train_transform(c.height, c.width, c.pad, erasing_p=self.teacher.erasing_p)
            self._train_set = LabelledTrainDataset(source.train, transform)
            return
        source_stage = self.train_stage == "source"
        pairs = len(source.train) if source_stage else min(len(source.train), len(self._target_train))
        per_batch = 2 * c.batch_size if source_stage else c.batch_size
        if pairs < per_batch:
            raise DatasetError(
                f"only {pairs} train images per domain for a batch of {per_batch}; lower data.batch_size."
            )
        self._data = {"source": source, "target": target}
        self._train_set = PairedTrainDataset(
            source.train, self._target_train, build_train_transform(c.height, c.width, c.pad)
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

    @property
    def has_validation_split(self) -> bool:
        """Whether the validation loader holds out target train identities (``data.val_split > 0``); otherwise it
        runs over the target test split, and its metrics must not select anything."""
        return self.config.val_split > 0

    # ------------------------------------------------------------------------------------- loaders
    def train_dataloader(self) -> DataLoader:
        self._require_setup()
        source_only = self.train_stage in ("source", "teacher")
        if not source_only:
            self.labels.labels_for(len(self._target_train))  # labels of other data (a foreign checkpoint) fail here
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        to_run = self._epoch_to_run()
        if len(self.schedule.batch_types(epoch)) > 1:
            return self._mix_dataloader(to_run)
        if self.teacher is not None:
            batch_size = self.teacher.batch_size
        else:
            batch_size = 2 * self.config.batch_size if source_only else self.config.batch_size
        sampler = PairSampler(
            source_labels=np.array([r.pid for r in self._data["source"].train]),
            labels=None if source_only else self.labels,
            num_target=len(self._target_train),
            batch_size=batch_size,
            seed=self.seed,
            drop_target_outliers=self.config.drop_target_outliers,
        )
        sampler.set_epoch(to_run)
        # A ResumableDataLoader continues a mid-epoch checkpoint's epoch where it stopped.
        return make_loader(
            self._train_set,
            sampler.batch_size,
            self.config.num_workers,
            cls=ResumableDataLoader,
            sampler=sampler,
            drop_last=True,
        )

    def _epoch_to_run(self) -> int:
        """The epoch the new train loader is for: the one Lightning passes to ``set_epoch``. It does so only after
        building the loader's first iterator, and a resumed run trains on that iterator (whose workers, if any,
        already drew their first batches), so the sampler must know its epoch from the start."""
        return 0 if self.trainer is None else int(self.trainer.fit_loop.epoch_progress.current.processed)

    def _mix_dataloader(self, epoch: int) -> DataLoader:
        """The official mix: whole batches from a rank-aware sampler (``batch_size=None``) for ``epoch``."""
        trainer = self.trainer
        c = self.config
        sampler = MixSampler(
            source_labels=np.array([r.pid for r in self._data["source"].train]),
            labels=self.labels,
            num_target=len(self._target_train),
            batch_size=c.batch_size,
            seed=self.seed,
            xx_port=c.xx_port,
            ab_port=c.ab_port,
            schedule=self.schedule,
            drop_target_outliers=c.drop_target_outliers,
            num_replicas=trainer.world_size if trainer is not None else 1,
            rank=trainer.global_rank if trainer is not None else 0,
        )
        sampler.set_epoch(epoch)
        dataset = MixedBatchDataset(self._train_set)
        return make_loader(dataset, None, c.num_workers, cls=ResumableDataLoader, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        self._require_setup()
        return eval_loader(*self._val, self.config)

    def test_dataloader(self) -> DataLoader:
        self._require_setup()
        return eval_loader(self.query_records, self.gallery_records, self.config)

    def target_train_feature_loader(self) -> DataLoader:
        """All target train images with the test transform, in :attr:`target_train_records` order."""
        self._require_setup()
        dataset = ReIDImageDataset(self._target_train, build_test_transform(self.config.height, self.config.width))
        return make_loader(dataset, self.config.test_batch_size, self.config.num_workers, shuffle=False)

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
        transform = build_test_transform(self.config.height, self.config.width)
        chosen = np.linspace(0, len(picks) - 1, num).round().astype(int)
        return torch.stack([transform(load_image(picks[i].path)) for i in chosen])
