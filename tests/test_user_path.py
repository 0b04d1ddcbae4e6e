"""What a user touches: W&B offline tracking, Hydra multirun sweeps with a summary file, the evaluate and
extract CLIs on the shared tiny run's checkpoint, and every CLI's --help (train, evaluate, extract, convert,
export)."""

from __future__ import annotations

import csv
import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from configs import compose_train, typed_train
from reference_metrics import reference

from dgnetpp_pl.data.domains import build_domain
from dgnetpp_pl.extract import FeatureExtractor
from dgnetpp_pl.reranking import re_rank
from dgnetpp_pl.train import train

pytestmark = pytest.mark.slow


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
    train(compose_train(*overrides))
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
    # The appearance encoder's rate moves the validation mAP (the generator-only weights would not).
    cmd = [
        sys.executable, "-m", "dgnetpp_pl", "-m", "experiment=demo", "debug=tiny", "stage=source", "test=false",
        "model.optim.source.lr_app=1e-4,2e-2", f"paths.data_dir={synthetic_data_dir}",
        f"paths.log_dir={tmp_path / 'logs'}", f"hydra.sweep.dir={sweep_dir}",
    ]  # fmt: skip
    env = {**os.environ, "WANDB_MODE": "offline"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(sweep_dir / "summary.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 and len({r["overrides"] for r in rows}) == 2
    assert len({r["output_dir"] for r in rows}) == 2
    for row in rows:  # each row holds its own job's result
        result = json.loads((Path(row["output_dir"]) / "checkpoints" / "source" / "result.json").read_text())
        assert float(row["val/mAP_best"]) == pytest.approx(result["val/mAP_best"])
    assert rows[0]["val/mAP_best"] != rows[1]["val/mAP_best"], rows


def test_evaluate_cli_equals_the_run_and_an_independent_re_ranking(tmp_path, tiny_run, synthetic_data_dir):
    _, results = tiny_run
    ckpt = results["source"]["ckpt"]
    cmd = [
        sys.executable, "-m", "dgnetpp_pl.evaluate", f"ckpt_path={ckpt}", "data=synthetic",
        "data.height=64", "data.width=32", "data.num_workers=0", "data.test_batch_size=32", "rerank=true", "vis=true",
        "data.synthetic.num_train_ids=12", "data.synthetic.num_test_ids=8",
        "data.synthetic.images_per_id_per_cam=[1,2]", "data.synthetic.num_distractors=4",
        "data.synthetic.num_junk=2", f"paths.data_dir={synthetic_data_dir}", f"hydra.run.dir={tmp_path}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Rank-1" in proc.stdout and "re-ranked" in proc.stdout
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    # The same weights on the same target test split: the training run's test loop gave these.
    for key in ("mAP", "Rank-1", "Rank-5", "Rank-10", "mINP"):
        assert metrics["plain"][key] == pytest.approx(results["source"][f"test/{key}"], abs=1e-6), key
    # Re-ranking recomputed here from the public feature extractor and the reference ranking code.
    cfg = typed_train("experiment=demo", "debug=tiny", f"paths.data_dir={synthetic_data_dir}")
    target = build_domain(cfg.data.target, cfg.data.synthetic, cfg.data.data_dir, "target")
    records = [*target.query, *target.gallery]
    feats = FeatureExtractor(ckpt, device="cpu", batch_size=32)([r.path for r in records]).numpy()
    nq = len(target.query)
    pids, cams = np.array([r.pid for r in records]), np.array([r.camid for r in records])
    expected = reference(re_rank(feats[:nq], feats[nq:]), pids[:nq], pids[nq:], cams[:nq], cams[nq:])
    assert metrics["rerank"]["mAP"] == pytest.approx(expected["market"], abs=1e-5)
    assert metrics["rerank"]["Rank-1"] == pytest.approx(expected["cmc"][0], abs=1e-6)
    assert metrics["rerank"]["mAP"] != metrics["plain"]["mAP"]
    assert (tmp_path / "rank_list.png").is_file()


def test_extract_cli_and_python_api_agree(tmp_path, tiny_source_ckpt, synthetic_data_dir):
    trained_ckpt = tiny_source_ckpt
    images = next(synthetic_data_dir.rglob("query"))
    out = tmp_path / "feats.pt"
    cmd = [sys.executable, "-m", "dgnetpp_pl.extract", f"ckpt_path={trained_ckpt}", f"images={images}", f"out={out}"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = torch.load(out, weights_only=True)
    files = sorted(images.glob("*.jpg"))
    assert saved["feats"].shape[0] == len(files) == len(saved["paths"])
    with open(out.parent / "feats.pt.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["path"] for r in rows] == [str(f) for f in files]
    # pid and camera from the Market-style names (c<camera> is 1-based in the name, 0-based here).
    assert [(int(r["pid"]), int(r["camid"])) for r in rows[:2]] == [
        (int(f.name.split("_")[0]), int(f.name.split("_c")[1][0]) - 1) for f in files[:2]
    ]
    api = FeatureExtractor(trained_ckpt, device="cpu")(files[:3])
    torch.testing.assert_close(api, saved["feats"][:3], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(api.norm(dim=1), torch.ones(3), rtol=1e-4, atol=1e-4)


def test_every_cli_has_help_and_a_bare_argument_is_an_error(tmp_path):
    def run(*args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", *args]
        return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)

    from dgnetpp_pl.cli import description
    from dgnetpp_pl.config import CONF_DIR

    names = ("dgnetpp_pl", "dgnetpp_pl.evaluate", "dgnetpp_pl.extract", "dgnetpp_pl.convert", "dgnetpp_pl.export")
    helps = {name: run(name, "--help") for name in names}
    assert all(p.returncode == 0 for p in helps.values()), {k: p.stderr[-2000:] for k, p in helps.items()}
    train_help = helps["dgnetpp_pl"].stdout
    for path in sorted((CONF_DIR / "experiment").glob("*.yaml")):  # each preset with its one-line description
        assert description(str(path)) and re.search(
            rf"^\s+{path.stem}\s+{re.escape(description(str(path)))}$", train_help, flags=re.MULTILINE
        ), path.stem
    evaluate_help = helps["dgnetpp_pl.evaluate"].stdout
    groups = evaluate_help.split("== Configuration groups ==")[1].split("== Config ==")[0]
    assert "data: " in groups and "logger: " in groups
    assert "debug" not in groups and "experiment" not in groups  # evaluate does not take them
    assert "ckpt_path: ???" in helps["dgnetpp_pl.extract"].stdout
    convert_help = helps["dgnetpp_pl.convert"].stdout
    assert "src: ???" in convert_help and "to: ours" in convert_help and "kind: auto" in convert_help
    assert "model: dgnetpp, dgnetpp_lowmem, dgnetpp_small" in convert_help  # the network presets to describe files
    export_help = helps["dgnetpp_pl.export"].stdout
    assert "ckpt_path: ???" in export_help and "out: encoder.onnx" in export_help
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # --help writes no run folder
    bare = run("dgnetpp_pl.extract", "ckpt_path")
    assert bare.returncode != 0 and "Error parsing override 'ckpt_path'" in bare.stderr, bare.stderr[-2000:]
