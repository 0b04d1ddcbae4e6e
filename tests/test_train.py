"""End to end through the Hydra entry point on the tiny built-in data: both stages, checkpoints, metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from dgnetpp_pl.checkpoints import CheckpointError, load_checkpoint
from dgnetpp_pl.config import CONF_DIR, ConfigError
from dgnetpp_pl.train import train

pytestmark = pytest.mark.slow


def tiny_cfg(tmp_path: Path, data_dir: Path, *extra: str):
    overrides = [
        "experiment=demo",
        "debug=tiny",
        f"paths.data_dir={data_dir}",
        f"paths.output_dir={tmp_path}",
        "logger=csv",
        *extra,
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, synthetic_data_dir):
    out = tmp_path_factory.mktemp("run")
    results = train(tiny_cfg(out, synthetic_data_dir))
    return out, results


def test_both_stages_train_and_report_target_metrics(tiny_run):
    out, results = tiny_run
    assert set(results) == {"source", "adapt"}
    for stage in ("source", "adapt"):
        r = results[stage]
        assert 0.0 <= r["test/mAP"] <= 1.0 and 0.0 <= r["test/Rank-1"] <= 1.0
        assert r["val/mAP_best"] >= r["val/mAP"] - 1e-9
        assert Path(r["ckpt"]).is_file()
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["adapt"]["test/mAP"] == pytest.approx(results["adapt"]["test/mAP"])
    assert list((out / "swap_grids").glob("adapt_*_target_structure.png"))


def test_adapt_checkpoint_holds_labels_optimizers_and_phase(tiny_run):
    out, _ = tiny_run
    ckpt = load_checkpoint(out / "checkpoints" / "adapt" / "final.ckpt")
    assert len(ckpt["optimizer_states"]) == 5 and len(ckpt["lr_schedulers"]) == 5
    assert ckpt["dgnetpp"]["stage"] == "adapt" and ckpt["dgnetpp"]["phase"] == "self_training"
    labels = ckpt["CrossDomainDataModule"]["target_labels"]
    assert labels is not None and int(labels.max()) + 1 == int(ckpt["state_dict"]["num_target_classes"])
    pl_state = next(v for k, v in ckpt["callbacks"].items() if "PseudoLabelCallback" in k)
    assert pl_state["last_refresh_epoch"] == 1
    # The appearance-encoder LR ramp (x60) is in the saved optimizer state.
    groups = ckpt["optimizer_states"][-1]["param_groups"]
    hp = ckpt["hyper_parameters"]
    assert bool(ckpt["state_dict"]["lr_ramped"])
    assert groups[0]["lr"] == pytest.approx(hp["model"]["optim"]["adapt"]["lr_app"] * hp["app_lr_ramp"])


def test_missing_init_ckpt_is_a_clear_error(tmp_path, synthetic_data_dir):
    cfg = tiny_cfg(tmp_path, synthetic_data_dir, f"init_ckpt={tmp_path / 'nope.ckpt'}")
    with pytest.raises(ConfigError, match="init_ckpt=.*nope.ckpt.*does not exist"):
        train(cfg)


def test_k_larger_than_target_images_is_a_clear_error(tmp_path, synthetic_data_dir, tiny_run):
    out, results = tiny_run
    cfg = tiny_cfg(tmp_path, synthetic_data_dir, "pseudo_label.k=100000", f"init_ckpt={results['source']['ckpt']}")
    with pytest.raises(ConfigError, match=r"pseudo_label.k=100000 is larger than the number of target train images"):
        train(cfg)


def test_checkpoint_from_another_model_size_is_refused(tmp_path, synthetic_data_dir, tiny_run):
    _, results = tiny_run
    cfg = tiny_cfg(
        tmp_path, synthetic_data_dir, "model.appearance.arch=resnet34", f"init_ckpt={results['source']['ckpt']}"
    )
    with pytest.raises(ValueError, match="different model size"):
        train(cfg)


def test_corrupt_checkpoint_names_the_file(tmp_path, tiny_run):
    _, results = tiny_run
    data = Path(results["source"]["ckpt"]).read_bytes()
    bad = tmp_path / "truncated.ckpt"
    bad.write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="truncated.ckpt.*truncated or corrupt"):
        load_checkpoint(bad)
    assert isinstance(torch.load(results["source"]["ckpt"], weights_only=True), dict)


def test_partial_evaluation_is_skipped_with_a_warning(tmp_path, synthetic_data_dir):
    # fast_dev_run evaluates one batch: only query images, so there is no ranking to compute.
    cfg = tiny_cfg(tmp_path, synthetic_data_dir, "debug=fast_dev_run", "data.test_batch_size=4")
    with pytest.warns(UserWarning, match=r"metrics skipped, only 4 of \d+ evaluation images"):
        results = train(cfg)
    assert {"source", "adapt"} <= results.keys()
    assert not any(k.startswith(("val/", "test/")) for k in results["adapt"])
    assert Path(results["adapt"]["ckpt"]).is_file()


def test_partial_evaluation_with_queries_and_gallery_ranks_what_was_seen(tmp_path, synthetic_data_dir):
    cfg = tiny_cfg(tmp_path, synthetic_data_dir, "stage=source", "trainer.limit_test_batches=0.9")
    with pytest.warns(UserWarning, match=r"test: metrics on \d+ of \d+ evaluation images only"):
        results = train(cfg)
    assert 0.0 <= results["source"]["test/mAP"] <= 1.0
