"""PseudoLabelCallback.refresh on the tiny built-in data: labels, classifier rows, statistics, faults."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from dgnetpp_pl.callbacks.pseudo_label import PseudoLabelCallback
from dgnetpp_pl.config import CONF_DIR, validate_config
from dgnetpp_pl.module import DGNetPP
from dgnetpp_pl.train import build_datamodule

K = 8


@pytest.fixture(scope="module")
def datamodule(synthetic_data_dir: Path):
    overrides = ["experiment=demo", "debug=tiny", f"paths.data_dir={synthetic_data_dir}", "paths.output_dir=unused"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = validate_config(compose(config_name="config", overrides=overrides))
    dm = build_datamodule(cfg, "adapt")
    dm.prepare_data()
    dm.setup("fit")
    return dm, OmegaConf.to_container(cfg.model, resolve=True)


def _model(dm, model_cfg: dict, monkeypatch: pytest.MonkeyPatch) -> DGNetPP:
    torch.manual_seed(0)
    model = DGNetPP(model=model_cfg, stage="adapt", num_source_ids=dm.num_source_ids, target_capacity=K)
    monkeypatch.setattr(model, "print", lambda *args, **kwargs: None)  # no trainer attached
    return model


def _trainer(dm) -> SimpleNamespace:
    """What ``refresh`` uses of a one-process Trainer, with a recording logger."""
    logged: list[dict] = []
    logger = SimpleNamespace(log_metrics=lambda metrics, step: logged.append(metrics))
    strategy = SimpleNamespace(broadcast=lambda obj, src=0: obj)
    return SimpleNamespace(
        datamodule=dm, world_size=1, is_global_zero=True, strategy=strategy, loggers=[logger], global_step=0
    ), logged


def test_refresh_labels_the_target_and_initialises_the_target_rows(datamodule, monkeypatch):
    dm, model_cfg = datamodule
    model = _model(dm, model_cfg, monkeypatch)
    trainer, logged = _trainer(dm)
    lo = dm.num_source_ids
    before = model.e_app.head1.classifier.weight.detach().clone()
    cb = PseudoLabelCallback(method="kmeans", k=K, warmup_epochs=1, init_classifier="centroids")
    cb.refresh(trainer, model, for_epoch=1)

    labels = dm.target_labels
    assert labels is not None and len(labels) == len(dm.target_train_records)
    assert set(np.unique(labels)) == set(range(K))
    assert int(model.num_target_classes) == K
    w = model.e_app.head1.classifier.weight.detach()
    torch.testing.assert_close(w[:lo], before[:lo])  # source rows untouched
    assert not torch.allclose(w[lo : lo + K], before[lo : lo + K])
    # Centroid init: the target rows point along the normalised cluster means, at the source rows' norm.
    norms = w[lo : lo + K].norm(dim=1)
    torch.testing.assert_close(norms, torch.full_like(norms, float(before[:lo].norm(dim=1).mean())))
    assert [len(d) for d in cb.rank_digests] == [1] and cb.last_refresh_epoch == 1
    stats = logged[-1]
    assert stats["pseudo/num_clusters"] == K and stats["pseudo/num_outliers"] == 0
    assert 0.0 <= stats["pseudo/nmi_truth"] <= 1.0 and "pseudo/ari_truth" in stats and stats["pseudo/time_s"] > 0

    # A second round reports its agreement with the first.
    cb.refresh(trainer, model, for_epoch=3)
    assert "pseudo/nmi_previous" in logged[-1] and cb.last_refresh_epoch == 3


def test_random_reinit_draws_small_weights(datamodule, monkeypatch):
    dm, model_cfg = datamodule
    model = _model(dm, model_cfg, monkeypatch)
    trainer, _ = _trainer(dm)
    PseudoLabelCallback(method="kmeans", k=K, init_classifier="random").refresh(trainer, model, for_epoch=1)
    lo = dm.num_source_ids
    rows = model.e_app.head1.classifier.weight.detach()[lo : lo + K]
    assert 0 < float(rows.abs().max()) < 0.01


def test_nan_features_name_the_epoch_and_the_bad_rows(datamodule, monkeypatch):
    dm, model_cfg = datamodule
    model = _model(dm, model_cfg, monkeypatch)
    trainer, _ = _trainer(dm)
    cb = PseudoLabelCallback(method="kmeans", k=K)
    feats, truth = cb.extract(trainer, model)
    feats[[0, 5, 7]] = float("nan")
    monkeypatch.setattr(cb, "extract", lambda *args: (feats, truth))
    with pytest.raises(FloatingPointError, match=rf"3 of {feats.shape[0]} .*before epoch 4"):
        cb.refresh(trainer, model, for_epoch=4)


def test_all_outliers_warn_and_train_without_target_ids(datamodule, monkeypatch):
    dm, model_cfg = datamodule
    model = _model(dm, model_cfg, monkeypatch)
    trainer, _ = _trainer(dm)
    cb = PseudoLabelCallback(method="dbscan", eps=1e-6, min_samples=7, k1=5, k2=2)
    with pytest.warns(UserWarning, match="every target image as an outlier"):
        cb.refresh(trainer, model, for_epoch=2)
    assert (dm.target_labels == -1).all()
    assert int(model.num_target_classes) == 0
    # With no clusters a self-training step has no target id terms.
    model.hparams.warmup_epochs = 0
    batch = {
        half: {"image": torch.zeros(2, 3, 64, 32), "pos": torch.zeros(2, 3, 64, 32), "label": torch.zeros(2).long()}
        for half in ("source", "target")
    }
    _, flags = model._pair_from_batch(batch)
    assert not flags.b_ids and flags.num_active_classes == dm.num_source_ids
