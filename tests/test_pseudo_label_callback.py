"""PseudoLabelCallback.refresh on the tiny built-in data: labels, classifier rows, statistics, faults."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from configs import TINY_DEMO, typed_train

from dgnetpp_pl.callbacks.pseudo_label import PseudoLabelCallback
from dgnetpp_pl.features import embed_images
from dgnetpp_pl.label_store import PseudoLabelStore
from dgnetpp_pl.module import DGNetPP
from dgnetpp_pl.pseudo_labels import METHODS
from dgnetpp_pl.schedule import AdaptSchedule
from dgnetpp_pl.train import build_datamodule

K = 8


@pytest.fixture(scope="module")
def datamodule(synthetic_data_dir: Path):
    cfg = typed_train(*TINY_DEMO, f"paths.data_dir={synthetic_data_dir}")
    dm = build_datamodule(cfg, "adapt")
    dm.prepare_data()
    dm.setup("fit")
    return dm, cfg


def _model(dm, cfg, monkeypatch: pytest.MonkeyPatch, warmup_epochs: int = 1) -> DGNetPP:
    torch.manual_seed(0)
    schedule = AdaptSchedule("adapt", warmup_epochs=warmup_epochs)
    model = DGNetPP(cfg.model, schedule, num_source_ids=dm.num_source_ids, target_capacity=K)
    monkeypatch.setattr(model, "print", lambda *args, **kwargs: None)  # no trainer attached
    return model


def _callback(cfg, **pseudo_label) -> PseudoLabelCallback:
    """The callback with a fresh label store and ``pseudo_label`` overriding the tiny preset's settings."""
    config = dataclasses.replace(cfg.pseudo_label, **{"k": K, **pseudo_label})
    return PseudoLabelCallback(config, AdaptSchedule("adapt", warmup_epochs=1), PseudoLabelStore(), seed=0)


def _trainer(dm) -> SimpleNamespace:
    """What ``refresh`` uses of a one-process Trainer, with a recording logger."""
    logged: list[dict] = []
    logger = SimpleNamespace(log_metrics=lambda metrics, step: logged.append(metrics))
    strategy = SimpleNamespace(broadcast=lambda obj, src=0: obj)
    return SimpleNamespace(
        datamodule=dm, world_size=1, is_global_zero=True, strategy=strategy, loggers=[logger], global_step=0
    ), logged


def test_refresh_labels_the_target_and_initialises_the_target_rows(datamodule, monkeypatch):
    dm, cfg = datamodule
    model = _model(dm, cfg, monkeypatch)
    trainer, logged = _trainer(dm)
    lo = dm.num_source_ids
    before = model.e_app.head1.classifier.weight.detach().clone()
    cb = _callback(cfg, method="kmeans", init_classifier="centroids")
    cb.refresh(trainer, model, for_epoch=1)

    labels = cb.store.labels
    assert labels is not None and len(labels) == len(dm.target_train_records)
    assert set(np.unique(labels)) == set(range(K))
    assert int(model.num_target_classes) == K
    w = model.e_app.head1.classifier.weight.detach()
    torch.testing.assert_close(w[:lo], before[:lo])  # source rows untouched
    assert not torch.allclose(w[lo : lo + K], before[lo : lo + K])
    # Centroid init: the target rows point along the normalised cluster means, at the source rows' norm.
    norms = w[lo : lo + K].norm(dim=1)
    torch.testing.assert_close(norms, torch.full_like(norms, float(before[:lo].norm(dim=1).mean())))
    assert [len(d) for d in cb.store.rank_digests] == [1] and cb.store.last_refresh_epoch == 1
    stats = logged[-1]
    assert stats["pseudo/num_clusters"] == K and stats["pseudo/num_outliers"] == 0
    assert 0.0 <= stats["pseudo/nmi_truth"] <= 1.0 and "pseudo/ari_truth" in stats and stats["pseudo/time_s"] > 0

    # A second round reports its agreement with the first.
    cb.refresh(trainer, model, for_epoch=3)
    assert "pseudo/nmi_previous" in logged[-1] and cb.store.last_refresh_epoch == 3
    assert cb.state_dict()["last_refresh_epoch"] == 3 and len(cb.state_dict()["history"]) == 2


def test_random_reinit_draws_small_weights(datamodule, monkeypatch):
    dm, cfg = datamodule
    model = _model(dm, cfg, monkeypatch)
    trainer, _ = _trainer(dm)
    _callback(cfg, method="kmeans", init_classifier="random").refresh(trainer, model, for_epoch=1)
    lo = dm.num_source_ids
    rows = model.e_app.head1.classifier.weight.detach()[lo : lo + K]
    assert 0 < float(rows.abs().max()) < 0.01


def test_nan_features_name_the_epoch_and_the_bad_rows(datamodule, monkeypatch):
    dm, cfg = datamodule
    model = _model(dm, cfg, monkeypatch)
    trainer, _ = _trainer(dm)
    cb = _callback(cfg, method="kmeans")
    feats, truth = cb.extract(trainer, model)
    feats[[0, 5, 7]] = float("nan")
    monkeypatch.setattr(cb, "extract", lambda *args: (feats, truth))
    with pytest.raises(FloatingPointError, match=rf"3 of {feats.shape[0]} .*before epoch 4"):
        cb.refresh(trainer, model, for_epoch=4)


def test_all_outliers_warn_and_train_without_target_ids(datamodule, monkeypatch):
    dm, cfg = datamodule
    # Self-training from epoch 0, so that a step of this model is a self-training step.
    model = _model(dm, cfg, monkeypatch, warmup_epochs=0)
    trainer, _ = _trainer(dm)
    cb = _callback(cfg, method="dbscan", eps=1e-6, min_samples=7, k1=5, k2=2)
    with pytest.warns(UserWarning, match="every target image as an outlier"):
        cb.refresh(trainer, model, for_epoch=2)
    assert (cb.store.labels == -1).all() and cb.store.num_clusters == 0
    assert int(model.num_target_classes) == 0
    # With no clusters a self-training step has no target id terms.
    assert model.phase == "self_training"
    batch = {
        half: {"image": torch.zeros(2, 3, 64, 32), "pos": torch.zeros(2, 3, 64, 32), "label": torch.zeros(2).long()}
        for half in ("source", "target")
    }
    _, flags = model._pair_from_batch(batch)
    assert not flags.b_ids and flags.num_active_classes == dm.num_source_ids


def test_extraction_embeds_as_the_model_features_ask(datamodule, monkeypatch):
    dm, cfg = datamodule
    trainer, _ = _trainer(dm)
    images = torch.stack([dm.target_train_feature_loader().dataset[i]["image"] for i in range(3)])
    for flip in (True, False):
        model_cfg = dataclasses.replace(cfg.model, features=dataclasses.replace(cfg.model.features, flip=flip))
        torch.manual_seed(0)
        model = DGNetPP(model_cfg, AdaptSchedule("adapt"), num_source_ids=dm.num_source_ids, target_capacity=K)
        feats, truth = _callback(cfg).extract(trainer, model)
        assert feats.shape[0] == len(dm.target_train_records) == truth.shape[0]
        model.eval()
        expected = embed_images(model.e_app, images, cfg.model.features.alpha, flip=flip)
        torch.testing.assert_close(feats[:3], expected, rtol=1e-5, atol=1e-6)
        # flip=true (the default) adds the mirrored image's features, so the two settings differ.
        other = embed_images(model.e_app, images, cfg.model.features.alpha, flip=not flip)
        assert not torch.allclose(feats[:3], other, atol=1e-4)


def test_dbscan_gets_every_setting_of_the_config(datamodule, monkeypatch):
    dm, cfg = datamodule
    seen = {}

    def fake_dbscan(feats, **kwargs):
        seen.update(kwargs)
        return np.arange(len(feats)) % 3

    monkeypatch.setitem(METHODS, "dbscan", fake_dbscan)
    cb = _callback(cfg, method="dbscan", eps=0.3, min_samples=4, k1=9, k2=3, lambda_=0.1)
    labels, centroids = cb.cluster(np.random.default_rng(0).standard_normal((12, 8)).astype(np.float32))
    assert seen == {"eps": 0.3, "min_samples": 4, "k1": 9, "k2": 3, "lambda_": 0.1}
    assert labels.tolist() == [0, 1, 2] * 4 and centroids.shape == (3, 8)
