"""A run folder belongs to one run: its lock stops a second run at once (two real processes), stale locks are taken
over, the default run folder is unique per run, parallel sweep jobs lose no summary rows, and ``ckpt_path`` is never
ignored: a path that is missing, foreign or broken is an error, and nothing in the run folder changes before that."""

from __future__ import annotations

import csv
import hashlib
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from dgnetpp_pl.checkpoints import CheckpointError, resolve_resume
from dgnetpp_pl.config import CONF_DIR
from dgnetpp_pl.report import add_sweep_row
from dgnetpp_pl.runlock import LOCK_NAME, RunFolderBusy, RunLock, run_stamp
from dgnetpp_pl.train import train

REPO = Path(__file__).resolve().parents[1]
HOLD = "import sys, time; from dgnetpp_pl.runlock import RunLock; RunLock(sys.argv[1]).acquire(); time.sleep(60)"


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO / "src"), "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the holder exited with {proc.returncode} before taking the lock"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.02)


# ------------------------------------------------------------------------------------------------ the lock
def test_a_second_process_cannot_take_a_held_folder_and_gets_the_holder(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], env=env(), stdout=subprocess.PIPE)
    try:
        wait_for(tmp_path / LOCK_NAME, holder)
        with pytest.raises(RunFolderBusy) as info:
            RunLock(tmp_path).acquire()
        message = str(info.value)
        assert str(tmp_path) in message and f"PID {holder.pid}" in message and "in use by another run" in message
    finally:
        holder.kill()
        holder.wait()
    # The holder is dead now (killed: it could not remove its file); the lock is stale and taken over.
    assert (tmp_path / LOCK_NAME).exists()
    lock = RunLock(tmp_path).acquire()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_stale_locks_are_taken_over_and_other_hosts_are_not_guessed(tmp_path: Path, capsys) -> None:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(done.stdout)
    record = {"pid": dead_pid, "host": os.uname().nodename, "started": "x", "command": "old run", "token": "t"}
    (tmp_path / LOCK_NAME).write_text(json.dumps(record))
    with RunLock(tmp_path):
        assert "its holder is no longer running" in capsys.readouterr().err
    elsewhere = {**record, "pid": os.getpid(), "host": "another-node"}
    (tmp_path / LOCK_NAME).write_text(json.dumps(elsewhere))
    with pytest.raises(RunFolderBusy, match=rf"PID {os.getpid()} on another-node.*delete .*{LOCK_NAME}"):
        RunLock(tmp_path).acquire(stale_after_s=120)
    an_hour_ago = time.time() - 3600  # no heartbeat from that host for an hour: its run is gone
    os.utime(tmp_path / LOCK_NAME, (an_hour_ago, an_hour_ago))
    with RunLock(tmp_path).acquire(stale_after_s=120):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    beating = RunLock(tmp_path, heartbeat_s=0.05).acquire()
    os.utime(tmp_path / LOCK_NAME, (an_hour_ago, an_hour_ago))
    time.sleep(0.5)
    assert time.time() - (tmp_path / LOCK_NAME).stat().st_mtime < 5  # the holder's heartbeat touched it again
    beating.release()
    mine = RunLock(tmp_path / "sub").acquire()
    (tmp_path / "sub" / LOCK_NAME).write_text(json.dumps({**record, "pid": os.getpid(), "token": "someone else"}))
    mine.release()  # not its lock any more: left alone
    assert (tmp_path / "sub" / LOCK_NAME).exists()


@pytest.mark.slow
def test_two_runs_in_one_folder_the_second_stops_at_once(tmp_path, tiny_overrides, tiny_source_ckpt) -> None:
    run_dir = tmp_path / "run"
    args = [*tiny_overrides, "stage=adapt", f"init_ckpt={tiny_source_ckpt}", f"hydra.run.dir={run_dir}", "test=false"]
    args.append("adapt.max_epochs=6")  # long enough to be running while the second run starts
    log_a = (tmp_path / "a.log").open("w")
    first = subprocess.Popen([sys.executable, "-m", "dgnetpp_pl", *args, "seed=1"], cwd=tmp_path, env=env(),
                             stdout=log_a, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        wait_for(run_dir / LOCK_NAME, first)
        start = time.monotonic()
        second = subprocess.run([sys.executable, "-m", "dgnetpp_pl", *args, "seed=2"], cwd=tmp_path, env=env(),
                                capture_output=True, text=True, timeout=300)  # fmt: skip
        took = time.monotonic() - start
        assert first.poll() is None, "the first run ended before the second was refused; the test proves nothing"
        assert second.returncode == 1, second.stdout + second.stderr
        assert f"{run_dir} is in use by another run (PID {first.pid}" in second.stderr
        assert took < 60
    finally:
        assert first.wait(timeout=900) == 0, (tmp_path / "a.log").read_text()[-3000:]
    assert "seed=1" in (run_dir / ".hydra" / "overrides.yaml").read_text()  # the second run wrote nothing
    assert "seed=2" not in (run_dir / ".hydra" / "overrides.yaml").read_text()
    assert (run_dir / "metrics.json").is_file() and not (run_dir / LOCK_NAME).exists()


def test_the_default_run_folder_is_unique_per_run() -> None:
    script = "from dgnetpp_pl.runlock import run_stamp; print(run_stamp(), run_stamp())"
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env(), stdout=subprocess.PIPE, text=True)
             for _ in range(3)]  # fmt: skip
    stamps = [proc.communicate(timeout=120)[0].split() for proc in procs]
    assert all(a == b for a, b in stamps)  # one value per process
    assert len({a for a, _ in stamps}) == 3
    assert all(a.endswith(f"_{p.pid}") for (a, _), p in zip(stamps, procs))
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["experiment=demo"], return_hydra_config=True)
    assert OmegaConf.select(cfg, "hydra.run.dir").endswith(f"runs/{run_stamp()}")
    assert OmegaConf.select(cfg, "hydra.sweep.dir").endswith(f"multiruns/{run_stamp()}")


# ------------------------------------------------------------------------------------------ sweep summary
def _append_rows(sweep_dir: str, worker: int, count: int, start: float) -> None:
    while time.time() < start:  # start together
        time.sleep(0.001)
    for i in range(count):
        job = worker * count + i
        add_sweep_row(sweep_dir, job, {"overrides": f"seed={job}", "val/mAP_best": job / 1000})


def test_parallel_jobs_lose_no_summary_rows(tmp_path: Path) -> None:
    workers, per_worker = 6, 20
    ctx = multiprocessing.get_context("fork")
    start = time.time() + 1.0
    procs = [ctx.Process(target=_append_rows, args=(str(tmp_path), w, per_worker, start)) for w in range(workers)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=300)
        assert proc.exitcode == 0
    with open(tmp_path / "summary.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["job"]) for r in rows] == list(range(workers * per_worker))
    assert all(r["overrides"] == f"seed={r['job']}" for r in rows)
    assert not (tmp_path / ".summary.lock").exists()


# ------------------------------------------------------------------------------------- ckpt_path is honoured
def test_ckpt_path_that_is_missing_foreign_or_empty_is_an_error(tmp_path: Path) -> None:
    run = tmp_path / "run"
    adapt, source = run / "checkpoints" / "adapt", run / "checkpoints" / "source"
    adapt.mkdir(parents=True)
    with pytest.raises(CheckpointError, match=r"ckpt_path=last: nothing to resume in .*adapt.*hydra.run.dir=<that"):
        resolve_resume("last", adapt)
    with pytest.raises(CheckpointError, match=r"'lats'.*does not exist.*hydra.run.dir=<that run> ckpt_path=last"):
        resolve_resume("lats", adapt)
    other = tmp_path / "other" / "checkpoints" / "adapt"
    other.mkdir(parents=True)
    (other / "last.ckpt").write_bytes(b"x")
    with pytest.raises(CheckpointError) as info:
        resolve_resume(str(other / "last.ckpt"), adapt)
    message = str(info.value)
    assert "belongs to another run" in message and f"hydra.run.dir={tmp_path / 'other'} ckpt_path=last" in message
    assert f"init_ckpt={other / 'last.ckpt'}" in message
    source.mkdir(parents=True)
    (source / "last.ckpt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"belongs to the source stage of this run, not to this run's adapt"):
        resolve_resume(str(source / "last.ckpt"), adapt)
    (adapt / "epoch001.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"epoch001.ckpt cannot be resumed from.*truncated or corrupt"):
        resolve_resume(str(adapt / "epoch001.ckpt"), adapt)
    # The stage after a finished one starts fresh under ckpt_path=last; a finished stage is skipped.
    (source / "result.json").write_text("{}")
    assert resolve_resume("last", adapt) is None
    assert resolve_resume(str(adapt / "epoch001.ckpt"), source) is None


@pytest.mark.slow
def test_a_typo_in_ckpt_path_leaves_an_interrupted_run_untouched(tmp_path, tiny_overrides, tiny_source_ckpt) -> None:
    # An interrupted run: the source stage has its last.ckpt but did not finish (no result.json, no final.ckpt).
    run = tmp_path / "run"
    shutil.copytree(tiny_source_ckpt.parents[2], run)
    stage = run / "checkpoints" / "source"
    for name in ("result.json", "final.ckpt"):
        (stage / name).unlink()
    assert (stage / "last.ckpt").is_file()
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in stage.iterdir()}

    def attempt(ckpt_path: str) -> str:
        overrides = [*tiny_overrides, f"paths.output_dir={run}", "stage=source", f"ckpt_path={ckpt_path}"]
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
        with pytest.raises(CheckpointError) as info:
            train(cfg)
        return str(info.value)

    assert "'lats'" in attempt("lats") and "does not exist" in attempt("lats")
    assert "does not exist" in attempt("/nonexistent.ckpt")
    assert "belongs to another run" in attempt(str(tiny_source_ckpt))
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in stage.iterdir()}
    assert after == before
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in tiny_source_ckpt.parents[2].iterdir())
