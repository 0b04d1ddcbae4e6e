"""End to end through the training entry point on the tiny built-in data: both stages, checkpoints, metrics."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml
from configs import TINY_DEMO, compose_train, typed_train
from reference_metrics import checkpoint_metrics

from dgnetpp_pl.checkpoints import CheckpointError, load_checkpoint
from dgnetpp_pl.config import ConfigError
from dgnetpp_pl.data.domains import build_domain
from dgnetpp_pl.train import train

pytestmark = pytest.mark.slow


def tiny_cfg(tmp_path: Path, data_dir: Path, *extra: str):
    base = [*TINY_DEMO, f"paths.data_dir={data_dir}", f"paths.output_dir={tmp_path}"]
    return compose_train(*base, "logger=csv", *extra)


def target_test_split(data_dir: Path):
    cfg = typed_train(*TINY_DEMO, f"paths.data_dir={data_dir}")
    target = build_domain(cfg.data.target, cfg.data.synthetic, cfg.data.data_dir, "target")
    return target.query, target.gallery


def logged(out: Path, stage: str, key: str) -> list[float]:
    """Every value of ``key`` the CSV logger wrote for ``stage``."""
    for path in sorted(out.glob("csv/version_*/metrics.csv")):
        if yaml.safe_load((path.parent / "hparams.yaml").read_text())["stage"] == stage:
            with open(path, newline="") as fh:
                return [float(r[key]) for r in csv.DictReader(fh) if r.get(key)]
    raise AssertionError(f"no CSV log of stage {stage} under {out}")


def test_both_stages_report_the_metrics_of_their_final_weights(tiny_run, synthetic_data_dir):
    out, results = tiny_run
    assert set(results) == {"source", "adapt"}
    query, gallery = target_test_split(synthetic_data_dir)
    for stage in ("source", "adapt"):
        r = results[stage]
        # The test loop's metrics equal an evaluation of the saved weights computed apart from it.
        expected = checkpoint_metrics(r["ckpt"], query, gallery, batch_size=32)
        assert r["test/mAP"] == pytest.approx(expected["mAP"], abs=1e-6)
        assert r["test/Rank-1"] == pytest.approx(expected["Rank-1"], abs=1e-6)
        # The best validation mAP is the best of the validations the logger saw.
        assert r["val/mAP_best"] == pytest.approx(max(logged(out, stage, "val/mAP")), abs=1e-7)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["adapt"]["test/mAP"] == pytest.approx(results["adapt"]["test/mAP"])
    assert list((out / "swap_grids").glob("adapt_*_target_structure.png"))


def test_adapt_checkpoint_holds_labels_optimizers_and_phase(tiny_run):
    out, _ = tiny_run
    ckpt = load_checkpoint(out / "checkpoints" / "adapt" / "final.ckpt")
    assert len(ckpt["optimizer_states"]) == 5 and len(ckpt["lr_schedulers"]) == 5
    assert ckpt["dgnetpp"]["stage"] == "adapt" and ckpt["dgnetpp"]["phase"] == "self_training"
    pl_state = next(v for k, v in ckpt["callbacks"].items() if "PseudoLabelCallback" in k)
    labels = pl_state["labels"]
    assert labels is not None and int(labels.max()) + 1 == int(ckpt["state_dict"]["num_target_classes"])
    assert pl_state["last_refresh_epoch"] == 1 and len(pl_state["history"]) == 1
    # The appearance-encoder LR ramp (x10 in the demo) is in the saved optimizer state.
    groups = ckpt["optimizer_states"][-1]["param_groups"]
    hp = ckpt["hyper_parameters"]
    assert ckpt["dgnetpp"]["app_lr_scale"] == hp["schedule"]["app_lr_ramp"] == 10.0
    assert groups[0]["lr"] == pytest.approx(hp["model"]["optim"]["adapt"]["lr_app"] * hp["schedule"]["app_lr_ramp"])


def test_missing_init_ckpt_is_a_clear_error(tmp_path, synthetic_data_dir):
    cfg = tiny_cfg(tmp_path, synthetic_data_dir, f"init_ckpt={tmp_path / 'nope.ckpt'}")
    with pytest.raises(ConfigError, match="init_ckpt=.*nope.ckpt.*does not exist"):
        train(cfg)


def test_k_larger_than_target_images_is_a_clear_error(tmp_path, synthetic_data_dir, tiny_source_ckpt):
    cfg = tiny_cfg(tmp_path, synthetic_data_dir, "pseudo_label.k=100000", f"init_ckpt={tiny_source_ckpt}")
    with pytest.raises(ConfigError, match=r"pseudo_label.k=100000 is larger than the number of target train images"):
        train(cfg)


def test_checkpoint_from_another_model_size_is_refused(tmp_path, synthetic_data_dir, tiny_source_ckpt):
    cfg = tiny_cfg(tmp_path, synthetic_data_dir, "model.appearance.arch=resnet34", f"init_ckpt={tiny_source_ckpt}")
    with pytest.raises(ValueError, match="different model size"):
        train(cfg)


def test_corrupt_checkpoint_names_the_file(tmp_path, tiny_source_ckpt):
    data = tiny_source_ckpt.read_bytes()
    bad = tmp_path / "truncated.ckpt"
    bad.write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="truncated.ckpt.*truncated or corrupt"):
        load_checkpoint(bad)
    assert isinstance(torch.load(tiny_source_ckpt, weights_only=True), dict)


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
    with pytest.warns(UserWarning, match=r"test: metrics on (\d+) of (\d+) evaluation images only"):
        results = train(cfg)
    query, gallery = target_test_split(synthetic_data_dir)
    batch = 32  # debug=tiny's data.test_batch_size
    seen = int(0.9 * -(-(len(query) + len(gallery)) // batch)) * batch  # Lightning's int(limit * num_batches)
    assert len(query) < seen < len(query) + len(gallery)
    expected = checkpoint_metrics(results["source"]["ckpt"], query, gallery[: seen - len(query)], batch_size=batch)
    assert results["source"]["test/mAP"] == pytest.approx(expected["mAP"], abs=1e-6)
