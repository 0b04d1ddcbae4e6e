"""Exact resume after SIGKILL and a clean stop on SIGTERM, through ``python -m dgnetpp_pl`` on the tiny preset."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dgnetpp_pl.checkpoints import load_checkpoint

pytestmark = pytest.mark.slow

TIMEOUT_S = 900


def cli(args: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "dgnetpp_pl", *args], cwd=cwd, env=env, stdout=out, stderr=out)


def finish(proc: subprocess.Popen, log: Path) -> int:
    try:
        return proc.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"the run did not finish in {TIMEOUT_S} s:\n{tail(log)}")


def tail(log: Path, n: int = 4000) -> str:
    return log.read_text(errors="replace")[-n:]


def checkpoint_epoch(path: Path) -> int | None:
    """The epoch a Lightning checkpoint was written in; None while it cannot be read (cheap: memory-mapped)."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["epoch"])
    except (OSError, RuntimeError, KeyError, EOFError):
        return None


def wait_for_epoch(proc: subprocess.Popen, path: Path, epoch: int, log: Path) -> None:
    """Poll every 20 ms until ``path`` is a checkpoint of ``epoch`` or later; fail if the run ends first."""
    deadline, seen = time.monotonic() + TIMEOUT_S, None
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the run ended (rc={proc.returncode}) before epoch {epoch}:\n{tail(log)}"
        stamp = path.stat().st_mtime_ns if path.exists() else None
        if stamp is not None and stamp != seen:
            found = checkpoint_epoch(path)
            seen = stamp if found is not None else None
            if found is not None and found >= epoch:
                return
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"no checkpoint of epoch {epoch} at {path} within {TIMEOUT_S} s:\n{tail(log)}")


def same(x: object, y: object) -> bool:
    return torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, tiny_overrides, tiny_source_ckpt):
    # 4 epochs: warm-up, then self-training with a refresh before each of epochs 1, 2 and 3; the kill comes after
    # the epoch-1 checkpoint, so the resumed process restores labels and RNGs and then refreshes once itself.
    epochs, kill_after = 4, 1
    args = [
        *tiny_overrides,
        "stage=adapt",
        f"init_ckpt={tiny_source_ckpt}",
        f"adapt.max_epochs={epochs}",
        "adapt.warmup_epochs=1",
        "pseudo_label.every_n_epochs=1",
        "trainer.deterministic=true",
        "trainer.limit_train_batches=1",
    ]
    a_dir, b_dir, log = tmp_path / "A", tmp_path / "B", tmp_path / "runs.log"
    assert finish(cli([*args, f"hydra.run.dir={a_dir}"], tmp_path, log), log) == 0, tail(log)

    run_b = cli([*args, f"hydra.run.dir={b_dir}"], tmp_path, log)
    last = b_dir / "checkpoints" / "adapt" / "last.ckpt"
    wait_for_epoch(run_b, last, kill_after, log)
    run_b.send_signal(signal.SIGKILL)
    assert run_b.wait(timeout=60) == -signal.SIGKILL
    killed_at = checkpoint_epoch(last)
    assert killed_at is not None and kill_after <= killed_at < epochs - 1, f"killed after epoch {killed_at}"
    assert not (b_dir / "checkpoints" / "adapt" / "result.json").exists()

    assert finish(cli([*args, f"hydra.run.dir={b_dir}", "ckpt_path=last"], tmp_path, log), log) == 0, tail(log)

    a = load_checkpoint(a_dir / "checkpoints" / "adapt" / "final.ckpt")
    b = load_checkpoint(b_dir / "checkpoints" / "adapt" / "final.ckpt")
    assert a["state_dict"].keys() == b["state_dict"].keys()
    max_diff = max(
        (a["state_dict"][k].double() - b["state_dict"][k].double()).abs().max().item() for k in a["state_dict"]
    )
    print(f"resume: max abs weight difference {max_diff:.3g} (killed after epoch {killed_at})")
    assert max_diff == 0.0
    for opt_a, opt_b in zip(a["optimizer_states"], b["optimizer_states"], strict=True):
        assert opt_a["state"].keys() == opt_b["state"].keys()
        for key, state in opt_a["state"].items():
            assert all(same(value, opt_b["state"][key][name]) for name, value in state.items())
        assert [g["lr"] for g in opt_a["param_groups"]] == [g["lr"] for g in opt_b["param_groups"]]
    pl_a, pl_b = ({k: v for k, v in c["callbacks"].items() if "PseudoLabelCallback" in k} for c in (a, b))
    assert [torch.equal(v["labels"], pl_b[k]["labels"]) for k, v in pl_a.items()] == [True]
    assert [len(v["rank_digests"]) for v in pl_a.values()] == [epochs - 1]
    assert [v["rank_digests"] for v in pl_a.values()] == [v["rank_digests"] for v in pl_b.values()]

    res_a, res_b = (json.loads((d / "checkpoints" / "adapt" / "result.json").read_text()) for d in (a_dir, b_dir))
    metrics = sorted(k for k in res_a if k.startswith(("val/", "test/")))
    assert "val/mAP_best" in metrics and "test/mAP" in metrics
    assert {k: res_a[k] for k in metrics} == {k: res_b.get(k) for k in metrics}


def test_sigterm_saves_last_checkpoint_and_exits_zero_then_resumes(tmp_path, tiny_overrides, tiny_source_ckpt):
    args = [
        *tiny_overrides,
        "stage=adapt",
        f"init_ckpt={tiny_source_ckpt}",
        "adapt.max_epochs=2",
        "adapt.warmup_epochs=1",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    stage_dir, log = tmp_path / "run" / "checkpoints" / "adapt", tmp_path / "run.log"
    last = stage_dir / "last.ckpt"
    run = cli(args, tmp_path, log)
    wait_for_epoch(run, last, 0, log)
    before = last.stat().st_mtime_ns, load_checkpoint(last)["global_step"]
    run.send_signal(signal.SIGTERM)
    assert finish(run, log) == 0, tail(log)
    assert "Stopped on SIGTERM" in tail(log)

    ckpt = load_checkpoint(last)  # rewritten and complete
    assert last.stat().st_mtime_ns != before[0] and ckpt["global_step"] >= before[1]
    (pl_state,) = (v for k, v in ckpt["callbacks"].items() if "PseudoLabelCallback" in k)
    assert "rng_states" in ckpt and pl_state["labels"] is not None
    # The stage is unfinished, so a resume must train it rather than skip it.
    assert not (stage_dir / "result.json").exists() and not (stage_dir / "final.ckpt").exists()

    assert finish(cli([*args, "ckpt_path=last"], tmp_path, log), log) == 0, tail(log)
    result = json.loads((stage_dir / "result.json").read_text())
    assert 0.0 <= result["test/mAP"] <= 1.0 and "val/mAP_best" in result
    assert load_checkpoint(stage_dir / "final.ckpt")["epoch"] == 2
