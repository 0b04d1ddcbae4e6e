"""The config tree composes for every preset (bad overrides: ``test_bad_input.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from dgnetpp_pl.config import CONF_DIR, validate_config

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=False)


def test_every_group_option_exists():
    for group, names in {
        "data": ["synthetic", "market1501", "dukemtmc", "msmt17", "folder"],
        "model": ["dgnetpp", "dgnetpp_small"],
        "trainer": ["default", "cpu", "gpu", "ddp", "ddp_sim"],
        "logger": ["wandb", "csv", "tensorboard", "none"],
        "experiment": ["demo", "duke2market", "market2duke", "market2msmt", "duke2msmt"],
    }.items():
        present = {p.stem for p in (CONF_DIR / group).glob("*.yaml")}
        assert set(names) <= present, f"{group}: missing {set(names) - present}"


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_validates(experiment, tmp_path):
    cfg = _compose([f"experiment={experiment}", f"paths.output_dir={tmp_path}"])
    merged = validate_config(cfg)
    assert merged.model.loss.lambda_cyc == 2.0 and merged.model.loss.lambda_id == 0.5
    if experiment == "duke2market":
        assert merged.data.source.name == "dukemtmc" and merged.data.target.name == "market1501"
        assert merged.model.appearance.arch == "resnet50" and merged.data.height == 256
    if experiment == "demo":
        assert merged.model.name == "dgnetpp_small" and merged.data.source.name == "synthetic"


def test_data_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DGNETPP_DATA", str(tmp_path / "datasets"))
    cfg = _compose(["experiment=demo"])
    assert Path(cfg.paths.data_dir) == tmp_path / "datasets"


def test_submitit_launcher_composes(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=["experiment=demo", "hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu"],
            return_hydra_config=True,
        )
    assert cfg.hydra.launcher.partition == "gpu"
    assert "submitit" in cfg.hydra.launcher._target_


def test_optuna_search_composes():
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            config_name="config", overrides=["experiment=demo", "hparams_search=optuna"], return_hydra_config=True
        )
    assert cfg.optimized_metric == "val/mAP_best"
    assert "model.loss.lambda_cyc" in cfg.hydra.sweeper.params
