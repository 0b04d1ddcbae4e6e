"""Two runs of the tiny adapt stage with ``trainer.deterministic=true`` and one seed agree exactly on CPU:
pseudo-labels (faiss k-means), clustering statistics, validation and test metrics, and the final weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dgnetpp_pl.checkpoints import load_checkpoint

pytestmark = pytest.mark.slow

TIMEOUT_S = 900


def adapt_run(cwd: Path, run_dir: Path, overrides: list[str]) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    cmd = [sys.executable, "-m", "dgnetpp_pl", *overrides, f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    stage_dir = run_dir / "checkpoints" / "adapt"
    result = json.loads((stage_dir / "result.json").read_text())
    return {"result": result, "ckpt": load_checkpoint(stage_dir / "final.ckpt")}


def test_two_deterministic_runs_give_identical_labels_metrics_and_weights(
    tmp_path: Path, tiny_overrides: list[str], tiny_source_ckpt: Path
) -> None:
    overrides = [
        *tiny_overrides,
        "stage=adapt",
        f"init_ckpt={tiny_source_ckpt}",
        "trainer.deterministic=true",
    ]
    a, b = (adapt_run(tmp_path, tmp_path / name, overrides) for name in ("a", "b"))

    (pl_a,), (pl_b,) = ([v for k, v in r["ckpt"]["callbacks"].items() if "PseudoLabelCallback" in k] for r in (a, b))
    labels_a = pl_a["labels"]
    assert labels_a is not None and int(labels_a.max()) >= 1
    assert torch.equal(labels_a, pl_b["labels"])
    stats = [{k: v for k, v in h.items() if k != "time_s"} for h in pl_a["history"]]
    assert len(stats) == 1 and "nmi_truth" in stats[0]
    assert stats == [{k: v for k, v in h.items() if k != "time_s"} for h in pl_b["history"]]

    metrics = sorted(k for k in a["result"] if k.startswith(("val/", "test/")))
    assert "val/mAP" in metrics and "test/mAP" in metrics and "test/Rank-1" in metrics
    assert {k: a["result"][k] for k in metrics} == {k: b["result"][k] for k in metrics}

    sa, sb = a["ckpt"]["state_dict"], b["ckpt"]["state_dict"]
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
