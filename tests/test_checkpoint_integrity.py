"""Checkpoints and result files are written atomically in their own folder: a save that fails or is killed midway
leaves the previous file intact and no partial file, a full disk is named, nothing goes through ``$TMPDIR``, one
previous ``last.ckpt`` is kept and used when the newest is damaged, and damaged or foreign files get errors that
name them without recommending a broken file or ``weights_only=False``."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from dgnetpp_pl.atomic_io import WriteError, atomic_write, previous_path, read_json, write_json
from dgnetpp_pl.checkpoints import AtomicCheckpointIO, CheckpointError, load_checkpoint, read_result, resolve_resume

REPO = Path(__file__).resolve().parents[1]


def small_ckpt(value: float) -> dict:
    return {"state_dict": {"w": torch.full((4,), value)}, "epoch": int(value)}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ------------------------------------------------------------------------------------------- atomic writes
def test_a_write_that_fails_midway_keeps_the_old_file_and_leaves_no_partial(tmp_path: Path) -> None:
    target = tmp_path / "result.json"
    write_json(target, {"old": 1})
    before = target.read_bytes()

    def half_then_fail(fh) -> None:
        fh.write(b'{"new": ')
        raise RuntimeError("killed")

    with pytest.raises(WriteError, match=r"Could not write .*result.json: RuntimeError: killed.*unchanged"):
        atomic_write(target, half_then_fail)
    assert target.read_bytes() == before and leftovers(tmp_path) == []

    def interrupted(fh) -> None:  # not an Exception: passed on, still no partial file
        fh.write(b"x" * 100)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, interrupted)
    assert target.read_bytes() == before and leftovers(tmp_path) == []


def test_a_full_disk_is_named_and_removes_the_partial_checkpoint(tmp_path: Path, monkeypatch) -> None:
    io = AtomicCheckpointIO()
    last = tmp_path / "last.ckpt"
    io.save_checkpoint(small_ckpt(1.0), last)
    before = digest(last)

    def save_until_full(obj, fh) -> None:
        fh.write(b"PK\x03\x04" + b"\0" * 4096)  # part of a checkpoint, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", save_until_full)
    with pytest.raises(CheckpointError) as info:
        io.save_checkpoint(small_ckpt(2.0), tmp_path / "epoch002.ckpt")
    message = str(info.value)
    assert "epoch002.ckpt" in message and "no space left on device (ENOSPC)" in message
    assert not (tmp_path / "epoch002.ckpt").exists() and leftovers(tmp_path) == []
    with pytest.raises(CheckpointError, match="ENOSPC"):
        io.save_checkpoint(small_ckpt(2.0), last)
    monkeypatch.undo()
    assert digest(last) == before and load_checkpoint(last)["epoch"] == 1
    assert not previous_path(last).exists()  # a failed save does not rotate the generations


def test_last_checkpoint_keeps_one_previous_generation(tmp_path: Path) -> None:
    io = AtomicCheckpointIO()
    last = tmp_path / "last.ckpt"
    for value in (1.0, 2.0, 3.0):
        io.save_checkpoint(small_ckpt(value), last)
    assert load_checkpoint(last)["epoch"] == 3 and load_checkpoint(tmp_path / "last.prev.ckpt")["epoch"] == 2
    io.save_checkpoint(small_ckpt(4.0), tmp_path / "epoch004.ckpt")  # other files keep no generations
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch004.ckpt", "last.ckpt", "last.prev.ckpt"]
    mode = last.stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask  # an ordinary file, not a private temporary one


def test_nothing_is_written_through_tmpdir_on_another_filesystem(tmp_path: Path, monkeypatch) -> None:
    # /dev/shm (tmpfs) is another filesystem than the test folder where it exists; any empty folder shows the rule.
    shm = Path("/dev/shm")
    other = Path(os.environ.get("DGNETPP_OTHER_FS", shm if shm.is_dir() and os.access(shm, os.W_OK) else tmp_path))
    tmpdir = other / f"dgnetpp_tmpdir_{os.getpid()}"
    tmpdir.mkdir()
    try:
        monkeypatch.setenv("TMPDIR", str(tmpdir))
        monkeypatch.setattr("tempfile.tempdir", None)
        renames: list[tuple[Path, Path]] = []
        real_replace = os.replace

        def recording_replace(src, dst) -> None:
            renames.append((Path(src), Path(dst)))
            real_replace(src, dst)

        monkeypatch.setattr(os, "replace", recording_replace)
        run = tmp_path / "run" / "checkpoints" / "adapt"
        AtomicCheckpointIO().save_checkpoint(small_ckpt(5.0), run / "last.ckpt")
        write_json(run / "result.json", {"test/mAP": 0.5})
        assert list(tmpdir.iterdir()) == []
        assert renames and all(src.parent == dst.parent == run for src, dst in renames)
        assert load_checkpoint(run / "last.ckpt")["epoch"] == 5 and read_result(run / "result.json")["test/mAP"] == 0.5
    finally:
        for leftover in tmpdir.iterdir():
            leftover.unlink()
        tmpdir.rmdir()


WRITER = textwrap.dedent(
    """
    import sys, torch
    from dgnetpp_pl.checkpoints import AtomicCheckpointIO
    big = {"state_dict": {"w": torch.ones(int(sys.argv[2]))}, "epoch": 9}
    print("writing", flush=True)
    AtomicCheckpointIO().save_checkpoint(big, sys.argv[1])
    print("done", flush=True)
    """
)


def test_a_process_killed_while_saving_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    stage = tmp_path / "checkpoints" / "adapt"
    last = stage / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint(small_ckpt(1.0), last)
    before = digest(last)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(last), str(150_000_000)], env=env)  # 600 MB
    deadline, partial = time.monotonic() + 120, None
    while time.monotonic() < deadline and proc.poll() is None:
        partial = next((p for p in stage.glob(".last.ckpt.*") if p.stat().st_size > 1_000_000), None)
        if partial is not None:
            break
        time.sleep(0.005)
    assert partial is not None, "the writer finished or never started before it could be killed"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert digest(last) == before and load_checkpoint(last)["epoch"] == 1
    assert partial.exists()  # a kill cannot clean up; the next resume does
    assert resolve_resume("last", stage) == str(last)  # and it removes the partial file
    assert leftovers(stage) == []


# ------------------------------------------------------------------------------------------- resume source
def test_a_broken_last_checkpoint_falls_back_to_the_previous_generation(tmp_path: Path) -> None:
    stage = tmp_path / "checkpoints" / "adapt"
    io = AtomicCheckpointIO()
    io.save_checkpoint(small_ckpt(1.0), stage / "last.ckpt")
    io.save_checkpoint(small_ckpt(2.0), stage / "last.ckpt")
    data = (stage / "last.ckpt").read_bytes()
    (stage / "last.ckpt").write_bytes(data[: len(data) // 2])  # damaged after it was written (e.g. by a copy)
    with pytest.warns(UserWarning, match=r"last.ckpt is truncated or corrupt .*Resuming from the previous generation"):
        chosen = resolve_resume("last", stage)
    assert chosen == str(stage / "last.prev.ckpt") and load_checkpoint(chosen)["epoch"] == 1
    assert (stage / "last.ckpt.corrupt").read_bytes() == data[: len(data) // 2] and not (stage / "last.ckpt").exists()
    io.save_checkpoint(small_ckpt(3.0), stage / "last.ckpt")  # the damaged file is not rotated in
    assert load_checkpoint(stage / "last.prev.ckpt")["epoch"] == 1


def test_when_no_generation_loads_the_error_recommends_no_broken_file(tmp_path: Path) -> None:
    stage = tmp_path / "checkpoints" / "adapt"
    stage.mkdir(parents=True)
    for name in ("last.ckpt", "last.prev.ckpt"):
        (stage / name).write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(CheckpointError) as info:
        resolve_resume("last", stage)
    message = str(info.value)
    assert "no checkpoint of" in message and "can be resumed" in message
    assert "last.ckpt is truncated or corrupt" in message and "last.prev.ckpt is truncated or corrupt" in message
    assert "e.g. last.ckpt" not in message and "ckpt_path=last" not in message.split("can be resumed:")[1]
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(stage / "last.ckpt")
    assert "last.ckpt" not in str(info.value).replace(str(stage / "last.ckpt"), "")


# ------------------------------------------------------------------------------------------- result files
@pytest.mark.parametrize("text", ['{"stage": "adapt", "test/mAP": 0.', "", "\0\0\0\0"])
def test_a_truncated_or_garbled_result_file_names_the_file(tmp_path: Path, text: str) -> None:
    path = tmp_path / "checkpoints" / "adapt" / "result.json"
    path.parent.mkdir(parents=True)
    path.write_text(text)
    with pytest.raises(CheckpointError) as info:
        read_result(path)
    assert not isinstance(info.value, json.JSONDecodeError)
    assert str(path) in str(info.value) and "truncated or garbled" in str(info.value)
    assert "Delete it" in str(info.value)
    write_json(path, {"stage": "adapt"})
    assert read_json(path) == {"stage": "adapt"}


# ------------------------------------------------------------------------------------------- foreign pickles
class SystemCall:
    """Unpickling this would run ``touch <marker>`` through ``os.system``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("container", ["torch", "pickle"])
def test_an_os_system_pickle_is_refused_code_not_corruption(tmp_path: Path, container: str) -> None:
    marker, path = tmp_path / "payload_ran", tmp_path / "evil.ckpt"
    payload = {"state_dict": {}, "extra": SystemCall(marker)}
    if container == "torch":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=4))  # a plain pickle: torch fails on an opcode first
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "refused code" in message and "system" in message and str(path) in message
    assert "truncated or corrupt" not in message and "weights_only=False" not in message
    assert not marker.exists()
