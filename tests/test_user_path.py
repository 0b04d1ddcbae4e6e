"""What a user touches: W&B offline tracking (images included), the run's log file, Hydra multirun sweeps with a
summary file, Optuna on a held-out split, the checkpoints a run keeps, a real preset on a CPU (debug=smoke_paper),
folder data, the evaluate and extract CLIs on the shared tiny run's checkpoint, and every CLI's --help (train,
evaluate, extract, convert, export)."""

from __future__ import annotations

import csv
import itertools
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from configs import TINY_DEMO, compose_train, typed_train
from PIL import Image
from reference_metrics import checkpoint_metrics, reference

from dgnetpp_pl.checkpoints import load_checkpoint
from dgnetpp_pl.data.domains import build_domain
from dgnetpp_pl.data.splits import split_validation_ids
from dgnetpp_pl.extract import FeatureExtractor
from dgnetpp_pl.reranking import re_rank
from dgnetpp_pl.train import STAGE_LABELS, train

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def cli(module: str, *args: str, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    """``python -m module args`` in ``cwd`` (W&B offline), output captured."""
    env = {k: v for k, v in os.environ.items() if k != "PROJECT_ROOT"}
    env["WANDB_MODE"] = "offline"
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def wandb_images(run_dir: Path) -> dict[str, list[np.ndarray]]:
    """The image files of an offline W&B run, decoded: ``{logged key: [images in logging order]}``."""
    media = run_dir / "files" / "media" / "images"
    found: dict[str, list[tuple[int, np.ndarray]]] = {}
    for path in media.rglob("*.png"):
        key, step = re.fullmatch(r"(.+)_(\d+)_[0-9a-f]+", path.relative_to(media).with_suffix("").as_posix()).groups()
        found.setdefault(key, []).append((int(step), png(path)))
    return {key: [image for _, image in sorted(items, key=lambda item: item[0])] for key, items in found.items()}


def logged(out: Path, stage: str, key: str) -> list[float]:
    """Every value of ``key`` that the CSV logger wrote for ``stage`` under ``out``."""
    for path in sorted(out.glob("csv/version_*/metrics.csv")):
        if yaml.safe_load((path.parent / "hparams.yaml").read_text())["stage"] == stage:
            with open(path, newline="") as fh:
                return [float(r[key]) for r in csv.DictReader(fh) if r.get(key)]
    raise AssertionError(f"no CSV log of stage {stage} under {out}")


def table_rows(text: str) -> dict[str, tuple[float, float]]:
    """Each stage label's (mAP, Rank-1) in percent from the logged results table."""
    rows = {}
    for label in STAGE_LABELS.values():
        match = re.search(rf"{re.escape(label)}\s*│\s*([\d.]+)\s*│\s*([\d.]+)", text)
        if match:
            rows[label] = (float(match.group(1)), float(match.group(2)))
    return rows


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


def test_wandb_offline_run_holds_losses_metrics_pseudo_labels_and_the_images_on_disk(
    tmp_path, synthetic_data_dir, monkeypatch
):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    overrides = [
        *TINY_DEMO,
        "logger=wandb",
        "data.val_split=0",  # no held-out split: the per-epoch metrics come from the target test split
        f"paths.data_dir={synthetic_data_dir}",
        f"paths.output_dir={tmp_path}",
    ]
    train(compose_train(*overrides))
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2  # one run per stage
    adapt = read_wandb_offline(runs[-1])
    expected = {
        "train/recon_x", "train/cycle", "train/gan", "train/id_s1", "train/id_s2", "train/g_total",
        "train/d_img_total", "train/domain_adv", "train/id_t1", "train/lr_e_app", "test_per_epoch/mAP",
        "test_per_epoch/Rank-1", "test/mAP", "pseudo/num_clusters", "pseudo/nmi_truth",
    }  # fmt: skip
    assert expected <= adapt["history"], expected - adapt["history"]
    # Nothing is called validation without a held-out split, and nothing keeps a "best" of the test split.
    for run in runs:
        assert not {k for k in read_wandb_offline(run)["history"] if k.startswith("val/")}
    assert {"model", "data", "pseudo_label"} <= adapt["config"]
    # The image files W&B wrote are the swap grids written to disk, pixel for pixel, epoch by epoch.
    for run, stage in zip(runs, ("source", "adapt"), strict=True):
        images = wandb_images(run)
        for kind in ("source_structure", "target_structure"):
            on_disk = [png(p) for p in sorted((tmp_path / "swap_grids").glob(f"{stage}_epoch*_{kind}.png"))]
            sent = images[f"images/{stage}_{kind}"]
            assert len(sent) == len(on_disk) == (1 if stage == "source" else 2)
            for a, b in zip(sent, on_disk, strict=True):
                assert a.shape == b.shape and np.array_equal(a, b)
                assert int(a.max()) - int(a.min()) > 100  # real pictures, not a cast of [0, 1] floats to 0/1
    first, last = wandb_images(runs[-1])["images/adapt_source_structure"]
    assert not np.array_equal(first, last)  # the grids follow training


def test_a_run_keeps_last_and_final_checkpoints_only(tiny_run):
    out, _ = tiny_run
    for stage in ("source", "adapt"):
        kept = sorted(p.name for p in (out / "checkpoints" / stage).iterdir())
        assert kept == ["final.ckpt", "last.ckpt", "result.json"], kept


def test_per_epoch_keeps_are_opt_in_and_follow_the_held_out_split(tmp_path, tiny_overrides, tiny_source_ckpt):
    keep_best = ["callbacks.model_checkpoint.monitor=val/mAP", "callbacks.model_checkpoint.save_top_k=1"]
    overrides = [*tiny_overrides, "stage=adapt", f"init_ckpt={tiny_source_ckpt}", f"paths.output_dir={tmp_path}"]
    train(compose_train(*overrides, *keep_best))
    val_maps = logged(tmp_path, "adapt", "val/mAP")
    assert len(val_maps) == 2
    best = int(np.argmax(val_maps))  # the first of equal values: a later epoch must be strictly better
    kept = sorted(p.name for p in (tmp_path / "checkpoints" / "adapt").glob("epoch*.ckpt"))
    assert kept == [f"epoch{best:03d}.ckpt"]
    assert load_checkpoint(tmp_path / "checkpoints" / "adapt" / kept[0])["epoch"] == best


def test_the_readme_sweep_varies_keys_that_change_the_result(tmp_path, tiny_overrides, tiny_source_ckpt):
    readme = (REPO / "README.md").read_text()
    (command,) = re.findall(r"`python -m dgnetpp_pl -m experiment=demo ([^`]+)`", readme)
    swept = dict(arg.split("=", 1) for arg in command.split() if "," in arg)
    # The README's keys at values that fit the tiny data (its k would exceed the tiny target).
    tiny_values = {"model.optim.adapt.lr_app": ["1e-5", "1e-3"], "pseudo_label.k": ["4", "8"]}
    assert set(swept) == set(tiny_values), swept
    sweep_dir = tmp_path / "sweep"
    args = [
        "-m", *tiny_overrides, "stage=adapt", f"init_ckpt={tiny_source_ckpt}", f"paths.log_dir={tmp_path / 'logs'}",
        f"hydra.sweep.dir={sweep_dir}", *(f"{k}={','.join(v)}" for k, v in tiny_values.items()),
    ]  # fmt: skip
    proc = cli("dgnetpp_pl", *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(sweep_dir / "summary.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4 and len({r["overrides"] for r in rows}) == 4 and len({r["output_dir"] for r in rows}) == 4
    metrics = [k for k in rows[0] if k.startswith(("val/", "test/"))]
    assert "test/mAP" in metrics and "val/mAP_best" in metrics
    for row in rows:  # each row holds its own job's result
        result = json.loads((Path(row["output_dir"]) / "checkpoints" / "adapt" / "result.json").read_text())
        assert all(float(row[k]) == pytest.approx(result[k]) for k in metrics)

    def setting(overrides: str) -> tuple:  # Hydra writes the values its own way (1e-5 as 1e-05)
        pairs = (o.split("=", 1) for o in overrides.split())
        return tuple(sorted((k, float(v)) for k, v in pairs if k in tiny_values))

    by_setting = {setting(r["overrides"]): tuple(float(r[k]) for k in metrics) for r in rows}
    for key in tiny_values:  # changing one key alone changes the result, whatever the other is
        others = [k for k in tiny_values if k != key]
        for other_values in itertools.product(*(tiny_values[k] for k in others)):
            fixed = [(k, float(v)) for k, v in zip(others, other_values, strict=True)]
            pair = [by_setting[tuple(sorted([*fixed, (key, float(v))]))] for v in tiny_values[key]]
            assert pair[0] != pair[1], (key, fixed, pair)


def test_optuna_maximises_the_held_out_split_map(tmp_path, synthetic_data_dir):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep_dir = tmp_path / "sweep"
    args = [
        "hparams_search=optuna", *TINY_DEMO, "pseudo_label.k=8", "hydra.sweeper.n_trials=1",
        f"paths.data_dir={synthetic_data_dir}", f"paths.log_dir={tmp_path / 'logs'}", f"hydra.sweep.dir={sweep_dir}",
    ]  # fmt: skip
    proc = cli("dgnetpp_pl", *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())["best_value"]
    job = sweep_dir / "0"
    result = json.loads((job / "checkpoints" / "adapt" / "result.json").read_text())
    assert seen == pytest.approx(result["val/mAP_best"], abs=1e-9)
    assert seen == pytest.approx(max(logged(job, "adapt", "val/mAP")), abs=1e-9)
    # The held-out split, rebuilt here from the target train images: the last validation is the final weights' mAP
    # on it, and none of its images is a target test image.
    cfg = typed_train(*yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()), f"paths.output_dir={job}")
    assert cfg.data.val_split > 0 and cfg.pseudo_label.k == 8
    target = build_domain(cfg.data.target, cfg.data.synthetic, cfg.data.data_dir, "target")
    _, query, gallery = split_validation_ids(target.train, cfg.data.val_split, cfg.seed)
    expected = checkpoint_metrics(job / "checkpoints" / "adapt" / "final.ckpt", query, gallery, batch_size=32)
    assert logged(job, "adapt", "val/mAP")[-1] == pytest.approx(expected["mAP"], abs=1e-6)
    held_out = {r.path for r in (*query, *gallery)}
    assert held_out <= {r.path for r in target.train}
    assert not held_out & {r.path for r in (*target.query, *target.gallery)}


def test_smoke_paper_runs_a_real_preset_on_a_cpu_and_its_log_holds_what_the_console_shows(tmp_path, benchmark_data_dir):
    # The whole command line: no trainer, logger, image size or k override is needed.
    args = ["experiment=duke2market", "debug=smoke_paper", f"paths.data_dir={benchmark_data_dir}"]
    proc = cli("dgnetpp_pl", *args, cwd=tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    (run,) = (tmp_path / "outputs" / "duke2market" / "runs").iterdir()
    ckpt = load_checkpoint(run / "checkpoints" / "adapt" / "final.ckpt")
    hparams = ckpt["hyper_parameters"]
    assert hparams["model"]["appearance"]["arch"] == "resnet50" and tuple(hparams["image_size"]) == (128, 64)
    results = json.loads((run / "metrics.json").read_text())
    # The real presets train with the teacher terms, so the teacher stage runs first.
    stages = {"teacher", "source", "adapt"}
    assert set(results) == stages and not any(k.startswith("val/") for r in results.values() for k in r)
    for stage in stages:
        kept = sorted(p.name for p in (run / "checkpoints" / stage).iterdir())
        assert kept == ["final.ckpt", "last.ckpt", "result.json"], kept
    # The run's log holds the results table, the pseudo-label line and the paths, as the console showed them.
    log = (run / "duke2market.log").read_text()
    rows = table_rows(log)
    for stage, label in STAGE_LABELS.items():
        assert rows[label] == pytest.approx(
            (100 * results[stage]["test/mAP"], 100 * results[stage]["test/Rank-1"]), abs=0.051
        )
    assert "[pseudo-labels before epoch 1] num_clusters=4" in log
    assert f"checkpoint: {run / 'checkpoints' / 'adapt' / 'final.ckpt'}" in log
    assert table_rows(proc.stdout) == rows and "[pseudo-labels before epoch 1]" in proc.stdout
    # The progress bar, with its stage and phase, is on the console only.
    assert "stage: source" in proc.stdout and "stage: adapt" in proc.stdout and "phase:" in proc.stdout
    assert "it/s" not in log and "stage: adapt" not in log  # the bar shows a rate; the table has none


def per_identity_folder(market_root: Path, out: Path) -> Path:
    """The Market-1501 train images as one sub-folder per identity (no split column anywhere)."""
    for image in sorted((market_root / "bounding_box_train").glob("*.jpg")):
        (out / image.name.split("_")[0]).mkdir(parents=True, exist_ok=True)
        shutil.copy(image, out / image.name.split("_")[0] / image.name)
    return out


def test_a_per_identity_folder_trains_as_a_source_and_is_refused_as_a_target(
    tmp_path, benchmark_data_dir, synthetic_data_dir
):
    folder = per_identity_folder(benchmark_data_dir / "Market-1501-v15.09.15", tmp_path / "people")
    tiny = [*TINY_DEMO, "stage=source"]
    as_target = cli(
        "dgnetpp_pl", *tiny, "data.target.name=folder", f"data.target.root={folder}",
        f"paths.data_dir={synthetic_data_dir}", f"hydra.run.dir={tmp_path / 'target_run'}", cwd=tmp_path,
    )  # fmt: skip
    assert as_target.returncode != 0
    assert f"data.target: folder at '{folder}' has no query and no gallery images" in as_target.stderr
    assert "One sub-folder per identity gives train images only" in as_target.stderr
    assert not (tmp_path / "target_run" / "checkpoints").exists()
    as_source = cli(
        "dgnetpp_pl", *tiny, "data.source.name=folder", f"data.source.root={folder}", "data.target.name=dukemtmc",
        f"paths.data_dir={benchmark_data_dir}", f"hydra.run.dir={tmp_path / 'source_run'}", cwd=tmp_path,
    )  # fmt: skip
    assert as_source.returncode == 0, as_source.stderr[-3000:]
    result = json.loads((tmp_path / "source_run" / "checkpoints" / "source" / "result.json").read_text())
    assert 0.0 <= result["test/mAP"] <= 1.0
    num_ids = len([p for p in folder.iterdir() if p.is_dir()])
    assert load_checkpoint(result["ckpt"])["hyper_parameters"]["num_source_ids"] == num_ids


def test_evaluate_cli_equals_the_run_and_an_independent_re_ranking(tmp_path, tiny_run, synthetic_data_dir):
    _, results = tiny_run
    ckpt = results["source"]["ckpt"]
    cmd = [
        sys.executable, "-m", "dgnetpp_pl.evaluate", f"ckpt_path={ckpt}", "data=synthetic",
        "data.height=64", "data.width=32", "data.num_workers=0", "data.test_batch_size=32", "rerank=true", "vis=true",
        "data.synthetic.num_train_ids=12", "data.synthetic.num_test_ids=8",
        "data.synthetic.images_per_id_per_cam=[1,2]", "data.synthetic.num_distractors=4",
        "data.synthetic.num_junk=2", f"paths.data_dir={synthetic_data_dir}", f"hydra.run.dir={tmp_path}",
        "logger=wandb",
    ]  # fmt: skip
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Rank-1" in proc.stdout and "re-ranked" in proc.stdout
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    # The run's log holds the table the console showed, with the numbers of metrics.json.
    log = (tmp_path / "evaluate.log").read_text()
    for name, label in (("plain", "plain"), ("rerank", "re-ranked")):
        shown = f"{label} " + " ".join(f"{100 * metrics[name][k]:.1f}" for k in ("Rank-1", "Rank-5", "Rank-10", "mAP"))
        assert shown in re.sub(r"[\s│┃]+", " ", log), (shown, log)
    assert f"metrics: {tmp_path / 'metrics.json'}" in log and f"rank list: {tmp_path / 'rank_list.png'}" in log
    # W&B got the rank list written to disk, pixel for pixel.
    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    (sent,) = wandb_images(run)["eval/rank_list"]
    assert np.array_equal(sent, png(tmp_path / "rank_list.png")) and int(sent.max()) - int(sent.min()) > 100
    # The same weights on the same target test split: the training run's test loop gave these.
    for key in ("mAP", "Rank-1", "Rank-5", "Rank-10", "mINP"):
        assert metrics["plain"][key] == pytest.approx(results["source"][f"test/{key}"], abs=1e-6), key
    # Re-ranking recomputed here from the public feature extractor and the reference ranking code.
    cfg = typed_train(*TINY_DEMO, f"paths.data_dir={synthetic_data_dir}")
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
