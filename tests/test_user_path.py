"""What a user touches: W&B offline tracking, Hydra multirun sweeps with a summary file, the evaluate and
extract CLIs on a briefly trained checkpoint."""

from __future__ import annotations

import csv
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from dgnetpp_pl.config import CONF_DIR
from dgnetpp_pl.train import train

pytestmark = pytest.mark.slow
REPO = CONF_DIR.parent


def read_wandb_offline(run_dir: Path) -> dict[str, set[str]]:
    """History keys and config keys of an offline W&B run, read from its ``run-*.wandb`` record log."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = next(run_dir.glob("run-*.wandb")).read_bytes()
    pos, block, records, buf = 7, 32768, [], b""  # 7-byte file header, then 32 KiB blocks of framed records
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        if kind == 0 and length == 0:
            break
        buf += data[pos : pos + length]
        pos += length
        if kind in (1, 4):  # a full record, or the last fragment of one
            records.append(buf)
            buf = b""
    history, config = set(), set()
    for raw in records:
        rec = pb.Record()
        rec.ParseFromString(raw)
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            history |= {it.key or "/".join(it.nested_key) for it in rec.history.item}
        elif kind == "config":
            config |= {it.key or "/".join(it.nested_key) for it in rec.config.update}
    return {"history": history, "config": config}


def test_wandb_offline_run_holds_losses_metrics_pseudo_labels_and_images(tmp_path, synthetic_data_dir, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    overrides = [
        "experiment=demo",
        "debug=tiny",
        "logger=wandb",
        f"paths.data_dir={synthetic_data_dir}",
        f"paths.output_dir={tmp_path}",
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    train(cfg)
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2  # one run per stage
    adapt = read_wandb_offline(runs[-1])
    expected = {
        "train/recon_x", "train/cycle", "train/gan", "train/id_s1", "train/id_s2", "train/g_total",
        "train/d_img_total", "train/domain_adv", "train/id_t1", "train/lr_e_app", "val/mAP", "val/Rank-1",
        "val/mAP_best", "pseudo/num_clusters", "pseudo/nmi_truth",
    }  # fmt: skip
    assert expected <= adapt["history"], expected - adapt["history"]
    assert any(k.startswith("images/") for k in adapt["history"])
    assert list(runs[-1].glob("files/media/images/**/*.png"))
    assert {"model", "data", "pseudo_label"} <= adapt["config"]


def test_multirun_sweep_writes_one_summary_row_per_job(tmp_path, synthetic_data_dir):
    sweep_dir = tmp_path / "sweep"
    cmd = [
        sys.executable, "-m", "dgnetpp_pl", "-m", "experiment=demo", "debug=tiny", "stage=source", "test=false",
        "model.loss.lambda_cyc=1,2", "model.loss.lambda_id=0.25,0.5", f"paths.data_dir={synthetic_data_dir}",
        f"paths.log_dir={tmp_path / 'logs'}", f"hydra.sweep.dir={sweep_dir}", "trainer.limit_train_batches=1",
    ]  # fmt: skip
    env = {**os.environ, "WANDB_MODE": "offline"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(sweep_dir / "summary.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4
    assert len({r["overrides"] for r in rows}) == 4
    assert all("val/mAP_best" in r and 0.0 <= float(r["val/mAP_best"]) <= 1.0 for r in rows)
    assert len({r["output_dir"] for r in rows}) == 4 and all(Path(r["output_dir"]).is_dir() for r in rows)


@pytest.fixture(scope="module")
def trained_ckpt(tmp_path_factory, synthetic_data_dir) -> Path:
    out = tmp_path_factory.mktemp("src")
    overrides = [
        "experiment=demo", "debug=tiny", "stage=source", "logger=none", "test=false",
        f"paths.data_dir={synthetic_data_dir}", f"paths.output_dir={out}",
    ]  # fmt: skip
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    return Path(train(cfg)["source"]["ckpt"])


def test_evaluate_cli_prints_table_writes_metrics_and_rank_list(tmp_path, trained_ckpt, synthetic_data_dir):
    cmd = [
        sys.executable, "-m", "dgnetpp_pl.evaluate", f"ckpt_path={trained_ckpt}", "data=synthetic",
        "data.height=64", "data.width=32", "data.num_workers=0", "data.batch_size=4", "rerank=true", "vis=true",
        "data.synthetic.num_train_ids=12", "data.synthetic.num_test_ids=8",
        "+data.synthetic.images_per_id_per_cam=[1,2]", "+data.synthetic.num_distractors=4",
        "+data.synthetic.num_junk=2", f"paths.data_dir={synthetic_data_dir}", f"hydra.run.dir={tmp_path}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Rank-1" in proc.stdout and "re-ranked" in proc.stdout
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for name in ("plain", "rerank"):
        assert set(metrics[name]) == {"Rank-1", "Rank-5", "Rank-10", "mAP", "mINP"}
        assert 0.0 <= metrics[name]["mAP"] <= 1.0
    assert (tmp_path / "rank_list.png").is_file()


def test_extract_cli_and_python_api_agree(tmp_path, trained_ckpt, synthetic_data_dir):
    from dgnetpp_pl.extract import FeatureExtractor

    images = next(synthetic_data_dir.rglob("query"))
    out = tmp_path / "feats.pt"
    cmd = [sys.executable, "-m", "dgnetpp_pl.extract", f"ckpt_path={trained_ckpt}", f"images={images}", f"out={out}"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = torch.load(out, weights_only=True)
    files = sorted(images.glob("*.jpg"))
    assert saved["feats"].shape[0] == len(files) == len(saved["paths"])
    assert (out.parent / "feats.pt.csv").read_text().count("\n") == len(files) + 1
    api = FeatureExtractor(trained_ckpt, device="cpu")(files[:3])
    torch.testing.assert_close(api, saved["feats"][:3], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(api.norm(dim=1), torch.ones(3), rtol=1e-4, atol=1e-4)
