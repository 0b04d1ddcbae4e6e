"""The real-dataset presets end to end from the command line, on tiny Market-1501, DukeMTMC-reID and MSMT17 trees
side by side under one data folder: each role reads its own dataset, and a missing one is named."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

# The paper's networks at the smallest image size their ASPP takes (dilations up to 9 need a structure code wider
# than 9: 128x64 gives 32x16), untrained, one batch per epoch: the source stage, warm-up, one pseudo-label
# refresh and self-training, each validated and tested, on the CPU.
TINY = [
    "debug=tiny",
    "model.pretrained=false",
    "trainer=cpu",
    "logger=csv",
    "data.height=128",
    "data.width=64",
    "trainer.limit_train_batches=1",
    "data.val_split=0",  # every target train image is pseudo-labelled (debug=tiny holds a quarter out)
]
K = 8  # pseudo_label.k of debug=tiny: the target rows the joint classifier reserves
# What the run logs for each role: the reader, its folder and the sizes it read.
READ = re.compile(
    r"data\.(source|target): (\w+)\(root='([^']+)', train=(\d+) images / (\d+) ids, query=(\d+), gallery=(\d+)\)"
)


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "dgnetpp_pl", *args]
    return subprocess.run(cmd, cwd=cwd, env=os.environ.copy(), capture_output=True, text=True, timeout=1200)


def expected_sizes(tree: dict) -> dict[str, int]:
    """What the reader must find in a tree of ``benchmark_data_dir`` (see BENCHMARK_TREES in conftest.py)."""
    train_ids, test_ids = int(tree["train_ids"]), int(tree["test_ids"])
    distractors = 0 if tree["folder"].startswith("MSMT17") else 2  # pid 0 in the Market / Duke galleries
    return {
        "train_images": 4 * train_ids,  # 2 images in each of 2 cameras
        "train_ids": train_ids,
        "query": test_ids,
        "gallery": 2 * test_ids + distractors,
    }


@pytest.mark.parametrize(
    ("experiment", "source", "target"),
    [("duke2market", "dukemtmc", "market1501"), ("market2msmt", "market1501", "msmt17")],
)
def test_a_real_preset_trains_each_role_on_its_own_dataset(
    tmp_path: Path, benchmark_data_dir: Path, benchmark_sizes: dict, experiment: str, source: str, target: str
) -> None:
    out = tmp_path / "run"
    proc = run(
        [f"experiment={experiment}", *TINY, f"paths.data_dir={benchmark_data_dir}", f"hydra.run.dir={out}"], tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    trees = {"source": benchmark_sizes[source], "target": benchmark_sizes[target]}

    # The run's log names the folder each role read and what it found there, once per stage: the real presets
    # train with the teacher terms, so the teacher stage comes first.
    read = [m.groups() for m in READ.finditer((out / f"{experiment}.log").read_text())]
    assert [role for role, *_ in read] == ["source", "target"] * 3, read
    for role, _reader, root, images, ids, query, gallery in read:
        assert Path(root) == (benchmark_data_dir / str(trees[role]["folder"])).resolve(), (role, root)
        sizes = {"train_images": int(images), "train_ids": int(ids), "query": int(query), "gallery": int(gallery)}
        assert sizes == expected_sizes(trees[role]), role

    # The source stage's classifier scores the source's train ids; the adapt stage adds K target rows and
    # pseudo-labels every target train image.
    n_source = int(trees["source"]["train_ids"])
    first = torch.load(out / "checkpoints" / "source" / "final.ckpt", weights_only=True, map_location="cpu")
    assert first["hyper_parameters"]["num_source_ids"] == n_source
    assert first["state_dict"]["e_app.head1.classifier.weight"].shape[0] == n_source
    second = torch.load(out / "checkpoints" / "adapt" / "final.ckpt", weights_only=True, map_location="cpu")
    hp = second["hyper_parameters"]
    assert (hp["schedule"]["stage"], hp["num_source_ids"], hp["target_capacity"]) == ("adapt", n_source, K)
    assert second["state_dict"]["e_app.head1.classifier.weight"].shape[0] == n_source + K
    labels = second["callbacks"]["PseudoLabelCallback"]["labels"]
    assert labels.numel() == expected_sizes(trees["target"])["train_images"]
    assert int(second["state_dict"]["num_target_classes"]) > 0 and int(labels.max()) < K

    teacher = torch.load(out / "checkpoints" / "teacher" / "final.ckpt", weights_only=True, map_location="cpu")
    assert teacher["hyper_parameters"]["teacher"]["num_classes"] == n_source
    assert second["dgnetpp"]["teacher"]["path"] == str((out / "checkpoints" / "teacher" / "final.ckpt").resolve())
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"teacher", "source", "adapt"}
    for stage in ("teacher", "source", "adapt"):
        assert 0.0 <= metrics[stage]["test/mAP"] <= 1.0 and 0.0 <= metrics[stage]["test/Rank-1"] <= 1.0


def test_a_missing_source_dataset_is_named_with_the_folders_looked_for(tmp_path: Path, benchmark_tree) -> None:
    data = benchmark_tree(tmp_path / "data", ("market1501",))
    out = tmp_path / "run"
    args = ["experiment=duke2market", "data.source.name=dukemtmc", *TINY, f"paths.data_dir={data}"]
    proc = run([*args, f"hydra.run.dir={out}"], tmp_path)
    assert proc.returncode != 0
    assert f"data.source: dukemtmc not found in '{data}'" in proc.stderr, proc.stderr[-3000:]
    assert "DukeMTMC-reID*/ or DukeMTMCreID*/" in proc.stderr  # the folder names it looked for
    assert "Market-1501-v15.09.15 (a market1501 folder)" in proc.stderr  # and what it found instead
    assert not (out / "checkpoints").exists()
