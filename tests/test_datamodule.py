"""CrossDomainDataModule, its sampler and the pseudo-label store: batch structure, positives, labels, state,
determinism, eval loaders."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from configs import small_data_config
from lightning_fabric.utilities.distributed import DistributedSamplerWrapper

from dgnetpp_pl.data.datamodule import CrossDomainDataModule
from dgnetpp_pl.data.datasets import DatasetError
from dgnetpp_pl.data.records import ImageRecord
from dgnetpp_pl.data.sampling import pick_positives
from dgnetpp_pl.data.splits import split_validation_ids
from dgnetpp_pl.label_store import PseudoLabelStore

B, H, W = 4, 32, 16


def make_dm(
    data_dir: Path, stage: str = "adapt", seed: int = 0, labels: PseudoLabelStore | None = None, **data: Any
) -> CrossDomainDataModule:
    dm = CrossDomainDataModule(small_data_config(data_dir, **data), stage=stage, seed=seed, labels=labels)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def set_labels(dm: CrossDomainDataModule, labels: np.ndarray | torch.Tensor, epoch: int = 0) -> None:
    """Store a round of pseudo-labels where the datamodule's sampler reads them."""
    dm.labels.update(labels, for_epoch=epoch)


def all_batches(loader) -> list[dict]:
    return list(loader)


def test_pick_positives_by_hand() -> None:
    labels = np.array([0, 1, 0, -1, 2, 1, 0, -1])
    anchors = np.array([0, 1, 2, 3, 4, 5, 6, 7, 0, 0, 0])
    for seed in range(5):
        pos = pick_positives(labels, anchors, np.random.default_rng(seed))
        assert np.all(labels[pos[labels[anchors] >= 0]] == labels[anchors][labels[anchors] >= 0])
        assert pos[3] == 3 and pos[7] == 7, "label -1: the anchor itself"
        assert pos[4] == 4, "singleton cluster: the anchor itself"
        assert all(p != a for p, a in zip(pos, anchors) if labels[a] in (0, 1))
    draws = {int(pick_positives(labels, np.array([0]), np.random.default_rng(s))[0]) for s in range(40)}
    assert draws == {2, 6}, "every other member of the cluster can be drawn"


def test_split_validation_ids_by_hand() -> None:
    records = [ImageRecord(f"{pid}_{cam}_{k}", pid, cam) for pid in range(6) for cam in (0, 1) for k in range(2)]
    records += [ImageRecord("single_cam", 6, 0)]
    train, query, gallery = split_validation_ids(records, fraction=2 / 7, seed=0)
    held = {int(r.path.split("_")[0]) for r in query}
    assert len(held) == 2 and 6 not in held, "only ids seen by >= 2 cameras are held out"
    assert {(r.pid, r.camid) for r in query} == {(p, c) for p in held for c in (0, 1)}
    assert all(r.path.endswith("_0") for r in query) and all(r.path.endswith("_1") for r in gallery)
    assert len(train) == len(records) - 8 and {r.pid for r in train} == set(range(5))
    with pytest.raises(DatasetError, match="val_split"):
        split_validation_ids(records, fraction=0.99, seed=0)
    # One image in each of two cameras: only one can be a query, or neither would have a match.
    sparse = [ImageRecord("a0", 0, 0), ImageRecord("a1", 0, 1), *(ImageRecord(f"b{c}", 1, c) for c in (0, 1))]
    _, query, gallery = split_validation_ids(sparse, fraction=0.5, seed=0)
    assert len(query) == 1 and len(gallery) == 1 and query[0].camid != gallery[0].camid


def test_adapt_batch_structure(synthetic_data_dir: Path) -> None:
    dm = make_dm(synthetic_data_dir)
    loader = dm.train_dataloader()
    batch = next(iter(loader))
    assert set(batch) == {"source", "target"}
    for domain, records in (("source", dm.source_train_records), ("target", dm.target_train_records)):
        part = batch[domain]
        assert set(part) == {"image", "pos", "label", "camid", "index", "pos_index"}
        for key in ("image", "pos"):
            assert part[key].shape == (B, 3, H, W) and part[key].dtype == torch.float32
        for key in ("label", "camid", "index", "pos_index"):
            assert part[key].shape == (B,) and part[key].dtype == torch.int64
        assert part["camid"].tolist() == [records[i].camid for i in part["index"].tolist()]
    source = batch["source"]
    assert source["label"].tolist() == [dm.source_train_records[i].pid for i in source["index"].tolist()]
    assert (batch["target"]["label"] == -1).all(), "no pseudo-labels yet"
    expected = min(len(dm.source_train_records), len(dm.target_train_records)) // B
    assert len(loader) == expected == len(all_batches(loader))


def test_positives_share_the_label_and_are_other_files(synthetic_data_dir: Path) -> None:
    dm = make_dm(synthetic_data_dir)
    n = len(dm.target_train_records)
    labels = np.arange(n) % 7
    labels[::5] = -1
    labels[1] = 50  # a singleton cluster
    set_labels(dm, labels)
    singleton_seen = False
    for batch in all_batches(dm.train_dataloader()):
        src, tgt = batch["source"], batch["target"]
        records = dm.source_train_records
        assert (src["pos_index"] != src["index"]).all(), "every synthetic train id has >= 2 images"
        assert [records[i].pid for i in src["pos_index"].tolist()] == src["label"].tolist()
        index, pos = tgt["index"].numpy(), tgt["pos_index"].numpy()
        assert np.array_equal(tgt["label"].numpy(), labels[index]), "the labels set at run time are served"
        clustered = (labels[index] >= 0) & (labels[index] != 50)
        assert np.array_equal(labels[pos], labels[index])
        assert (pos[clustered] != index[clustered]).all()
        assert (pos[~clustered] == index[~clustered]).all(), "-1 / singleton: the same image"
        same = ~clustered
        if same.any():  # the second view is augmented independently
            diff = (tgt["image"][same] - tgt["pos"][same]).abs().flatten(1).amax(1)
            assert (diff > 0).all()
        singleton_seen |= bool((labels[index] == 50).any())
    assert singleton_seen


def test_source_stage_batches(synthetic_data_dir: Path) -> None:
    dm = make_dm(synthetic_data_dir, stage="source")
    loader = dm.train_dataloader()
    batch = next(iter(loader))
    assert set(batch) == {"source"}
    assert batch["source"]["image"].shape == (2 * B, 3, H, W)
    assert len(loader) == len(dm.source_train_records) // (2 * B)


def test_batches_are_deterministic_across_worker_counts_and_change_with_the_epoch(synthetic_data_dir: Path) -> None:
    a = make_dm(synthetic_data_dir, seed=3, num_workers=0)
    b = make_dm(synthetic_data_dir, seed=3, num_workers=2)
    batches_a, batches_b = all_batches(a.train_dataloader()), all_batches(b.train_dataloader())
    assert len(batches_a) == len(batches_b)
    for x, y in zip(batches_a, batches_b):
        for domain in ("source", "target"):
            for key in x[domain]:
                assert torch.equal(x[domain][key], y[domain][key]), (domain, key)
    loader = a.train_dataloader()  # the next epoch, as Lightning sets it
    loader.sampler.set_epoch(1)
    assert not torch.equal(next(iter(loader))["source"]["index"], batches_a[0]["source"]["index"])
    other = make_dm(synthetic_data_dir, seed=4)
    assert not torch.equal(next(iter(other.train_dataloader()))["source"]["image"], batches_a[0]["source"]["image"])


def test_lightning_distributed_wrapper_splits_an_epoch_between_ranks(synthetic_data_dir: Path) -> None:
    # Under DDP Lightning wraps our sampler like this (shuffle=False: it is not a RandomSampler).
    dm = make_dm(synthetic_data_dir)
    set_labels(dm, np.arange(len(dm.target_train_records)) % 4)
    full = list(dm.train_dataloader().sampler)
    shares = []
    for rank in (0, 1):
        sampler = dm.train_dataloader().sampler
        sampler.set_epoch(0)
        shares.append(list(DistributedSamplerWrapper(sampler, num_replicas=2, rank=rank, shuffle=False)))
    assert sorted(shares[0] + shares[1]) == sorted(full) and not set(shares[0]) & set(shares[1])
    item = dm.train_dataloader().dataset[shares[1][0]]
    assert item["target"]["label"] == shares[1][0].target % 4


def test_label_store_validates_and_reports_clusters(synthetic_data_dir: Path) -> None:
    dm = make_dm(synthetic_data_dir)
    n = len(dm.target_train_records)
    store = dm.labels
    assert store.num_clusters == 0 and store.labels is None
    assert (store.labels_for(n) == -1).all(), "no labels yet: every target image is unlabelled"
    with pytest.raises(ValueError, match="integers, got dtype float32"):
        store.update(np.zeros(n, dtype=np.float32), for_epoch=1)
    with pytest.raises(ValueError, match=">= -1"):
        store.update(np.full(n, -2), for_epoch=1)
    with pytest.raises(ValueError, match=r"1-D"):
        store.update(np.zeros((n, 2), dtype=np.int64), for_epoch=1)
    store.update(torch.arange(n) % 3, for_epoch=1)
    assert store.num_clusters == 3 and store.labels.dtype == np.int64 and store.last_refresh_epoch == 1
    store.update(np.zeros(n - 1, dtype=np.int64), for_epoch=3)
    with pytest.raises(ValueError, match=rf"hold {n - 1} entries but the target train split has {n} images"):
        dm.train_dataloader()


def test_label_store_round_trip_through_a_weights_only_checkpoint(synthetic_data_dir: Path) -> None:
    dm = make_dm(synthetic_data_dir)
    labels = (np.arange(len(dm.target_train_records)) * 7) % 5 - 1
    dm.labels.update(labels, for_epoch=2, stats={"num_clusters": 4.0}, digests=[123, 123])
    buffer = io.BytesIO()
    torch.save({"pseudo_labels": dm.labels.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)["pseudo_labels"]
    fresh = make_dm(synthetic_data_dir, labels=PseudoLabelStore())
    fresh.labels.load_state_dict(state)
    assert np.array_equal(fresh.labels.labels, labels) and fresh.labels.last_refresh_epoch == 2
    assert fresh.labels.history == [{"num_clusters": 4.0}] and fresh.labels.rank_digests == [[123, 123]]
    first = next(iter(fresh.train_dataloader()))
    assert np.array_equal(first["target"]["label"].numpy(), labels[first["target"]["index"].numpy()])
    wrong = make_dm(synthetic_data_dir, val_split=0.25, labels=fresh.labels)
    with pytest.raises(ValueError, match="other data settings"):
        wrong.train_dataloader()


def test_eval_loaders(synthetic_data_dir: Path) -> None:
    dm = make_dm(synthetic_data_dir)
    test = dm.test_dataloader()
    samples = [s for batch in test for s in zip(*(batch[k] for k in ("pid", "camid", "index")))]
    records = dm.query_records + dm.gallery_records
    assert len(samples) == len(records) and dm.num_query == len(dm.query_records) == test.dataset.num_query
    assert [int(i) for _, _, i in samples] == list(range(len(records)))
    assert [(int(p), int(c)) for p, c, _ in samples] == [(r.pid, r.camid) for r in records]
    assert next(iter(test))["image"].shape == (16, 3, H, W)
    feats = dm.target_train_feature_loader()
    assert sum(len(b["index"]) for b in feats) == len(dm.target_train_records)
    assert torch.equal(next(iter(feats))["image"], next(iter(dm.target_train_feature_loader()))["image"])
    preview = dm.preview_images("target", 5)
    assert preview.shape == (5, 3, H, W) and torch.equal(preview, dm.preview_images("target", 5))


def test_val_split_holds_out_target_ids(synthetic_data_dir: Path) -> None:
    full = make_dm(synthetic_data_dir)
    dm = make_dm(synthetic_data_dir, val_split=0.25)
    held = {r.path for r in dm.val_query_records + dm.val_gallery_records}
    assert held and not held & {r.path for r in dm.target_train_records}
    assert len(held) + len(dm.target_train_records) == len(full.target_train_records)
    assert dm.val_dataloader().dataset.num_query == dm.val_num_query == len(dm.val_query_records)
    for q in dm.val_query_records:  # every query can be matched under the Market protocol
        assert any(g.pid == q.pid and g.camid != q.camid for g in dm.val_gallery_records)
    assert dm.test_dataloader().dataset.records == full.test_dataloader().dataset.records


def test_drop_target_outliers_shortens_the_epoch(synthetic_data_dir: Path) -> None:
    dm = make_dm(synthetic_data_dir, drop_target_outliers=True)
    labels = np.full(len(dm.target_train_records), -1)
    labels[: 3 * B + 1] = np.arange(3 * B + 1) % 4
    set_labels(dm, labels)
    batches = all_batches(dm.train_dataloader())
    assert len(batches) == 3
    assert all((b["target"]["label"] >= 0).all() for b in batches)


class _Recorder(pl.LightningModule):
    """Records the target labels / indices of every train batch; sets labels at the end of epoch 0."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        t = batch["target"]
        self.seen.setdefault(self.current_epoch, []).append((t["index"].numpy(), t["label"].numpy()))
        return (self.weight * batch["source"]["image"].mean()).sum()

    def on_train_epoch_end(self) -> None:
        dm = self.trainer.datamodule
        if self.current_epoch == 0:
            set_labels(dm, np.arange(len(dm.target_train_records)) % 6, epoch=1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.parametrize("reload", [0, 1])
def test_labels_set_between_epochs_reach_the_next_epoch_in_a_trainer(
    synthetic_data_dir: Path, tmp_path: Path, reload: int
) -> None:
    dm = make_dm(synthetic_data_dir, num_workers=2)
    model = _Recorder()
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        reload_dataloaders_every_n_epochs=reload,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(model, datamodule=dm)
    assert all((labels == -1).all() for _, labels in model.seen[0])
    assert all(np.array_equal(labels, index % 6) for index, labels in model.seen[1])
    order = [np.concatenate([i for i, _ in model.seen[e]]) for e in (0, 1)]
    assert not np.array_equal(order[0], order[1]), "each epoch draws a new order"
