"""A run folder belongs to one run: an exclusive lock file in it, and run folders that are unique per run.

:class:`RunLock` creates ``<folder>/.run.lock`` with ``O_EXCL`` and writes its holder (PID, host, start time,
command) into it; a second run fails at once with :class:`RunFolderBusy`, naming the folder and the holder. A lock
left by a run that is gone (its PID is dead on this host, or was reused by another process) is taken over with a
message. The lock goes when its holder releases it or exits. ``RunLock(..., wait_s=...)`` is also the short,
blocking lock of files that several jobs update (the sweep summary).

``${run_stamp:}`` (registered on import) names a fresh run folder: the time to the microsecond and the PID, the
same value for every use in one process.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import secrets
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

LOCK_NAME = ".run.lock"
# Environment variables in which launchers give a process its rank; the lock holder is the process of rank 0.
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


class RunFolderBusy(RuntimeError):
    """The folder is locked by another live run; the message names the folder and the holder."""


def process_is_rank_zero() -> bool:
    """Whether no launcher variable gives this process a rank other than 0 (a plain process is rank 0)."""
    return all(os.environ.get(name, "0").strip() in ("", "0") for name in RANK_VARIABLES)


_STAMP: str | None = None


def run_stamp() -> str:
    """This process's run-folder name: ``YYYY-MM-DD_HH-MM-SS_ffffff_<pid>``, computed once per process.

    Under a launcher that starts every rank as its own process (torchrun, ``srun`` with several tasks), each rank
    composes the config itself, so the name comes from the launcher's job id, which all ranks share.
    """
    global _STAMP
    if _STAMP is None:
        env = os.environ
        if env.get("TORCHELASTIC_RUN_ID", "none") not in ("", "none"):
            _STAMP = f"torchrun_{env['TORCHELASTIC_RUN_ID']}"
        elif int(env.get("SLURM_NTASKS", "1") or 1) > 1 and env.get("SLURM_JOB_ID"):
            _STAMP = f"slurm_{env['SLURM_JOB_ID']}.{env.get('SLURM_STEP_ID', '0')}"
        else:
            _STAMP = f"{datetime.now().strftime('%Y-%m-%d_%H-%M-%S_%f')}_{os.getpid()}"
    return _STAMP


OmegaConf.register_new_resolver("run_stamp", run_stamp, replace=True)


def _process_start(pid: int) -> str | None:
    """The start time of ``pid`` in clock ticks since boot (Linux), to tell a reused PID from the holder."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]  # field 22 of proc(5); the name in parentheses may hold spaces


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's live process
    now = _process_start(pid)
    return start is None or now is None or now == start


@dataclass
class Holder:
    """What a lock file says about the run that holds it."""

    pid: int
    host: str
    started: str
    command: str
    token: str
    proc_start: str | None = None

    def describe(self) -> str:
        return f"PID {self.pid} on {self.host}, started {self.started}, command: {self.command}"


class RunLock:
    """An exclusive lock file in ``folder``. ``acquire()`` raises :class:`RunFolderBusy` if a live run holds it
    (after waiting up to ``wait_s``). A holder on another host cannot be asked whether it lives: with
    ``heartbeat_s`` the holder touches its file that often, and ``stale_after_s`` breaks a lock from another host
    whose file is older than that. Released by :meth:`release`, on leaving a ``with`` block, or at interpreter exit."""

    def __init__(
        self, folder: str | Path, name: str = LOCK_NAME, what: str = "run folder", heartbeat_s: float | None = None
    ) -> None:
        self.folder = Path(folder)
        self.path = self.folder / name
        self.what = what
        self.heartbeat_s = heartbeat_s
        self.holder: Holder | None = None
        self._stop = threading.Event()

    def _beat(self) -> None:
        # Touch the file while held, so that a run on another host can tell a live holder from a dead one.
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self.path)
            except OSError:
                return

    def _me(self) -> Holder:
        command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "python"
        return Holder(
            pid=os.getpid(),
            host=socket.gethostname(),
            started=datetime.now().isoformat(timespec="seconds"),
            command=command[:500],
            token=secrets.token_hex(8),
            proc_start=_process_start(os.getpid()),
        )

    def _read(self) -> tuple[Holder | None, str]:
        try:
            raw = self.path.read_text()
        except OSError:
            return None, ""
        try:
            return Holder(**json.loads(raw)), raw
        except (ValueError, TypeError):
            return None, raw  # being written by its creator right now, or damaged

    def _stale(self, holder: Holder | None, stale_after_s: float | None) -> bool:
        try:
            age = time.time() - self.path.stat().st_mtime
        except OSError:
            return False
        if holder is None:
            return age > 10.0  # a creator writes its record at once; an empty or garbled file this old is left over
        if holder.host == socket.gethostname():
            return not _alive(holder.pid, holder.proc_start)
        return stale_after_s is not None and age > stale_after_s

    def _take_over(self, raw: str) -> bool:
        """Move a stale lock aside if it is still the one judged stale; False if another process got there first."""
        aside = self.path.with_name(f"{self.path.name}.stale.{os.getpid()}.{secrets.token_hex(4)}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        try:
            moved = aside.read_text()
        except OSError:
            moved = None
        if moved != raw:  # a fresh lock of another process: put it back
            with contextlib.suppress(OSError):
                os.link(aside, self.path)
            with contextlib.suppress(OSError):
                aside.unlink()
            return False
        aside.unlink()
        return True

    def acquire(self, wait_s: float = 0.0, stale_after_s: float | None = None, poll_s: float = 0.05) -> RunLock:
        """Take the lock; see the class docstring."""
        self.folder.mkdir(parents=True, exist_ok=True)
        me = self._me()
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                pass
            else:
                with os.fdopen(fd, "w") as fh:
                    fh.write(json.dumps(asdict(me)))
                    fh.flush()
                    os.fsync(fh.fileno())
                self.holder = me
                atexit.register(self.release)
                if self.heartbeat_s:
                    self._stop.clear()
                    threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True).start()
                return self
            holder, raw = self._read()
            if self._stale(holder, stale_after_s):
                if self._take_over(raw):
                    who = holder.describe() if holder else "an unreadable lock file"
                    message = f"Taking over the lock of {self.folder}: its holder is no longer running ({who})."
                    print(message, file=sys.stderr)
                continue
            if time.monotonic() >= deadline:
                who = holder.describe() if holder else "a process that is writing the lock file now"
                raise RunFolderBusy(
                    f"The {self.what} {self.folder} is in use by another run ({who}). Two runs in one folder "
                    "overwrite each other's checkpoints and results. Wait for that run to finish, or give this run "
                    "its own folder (the default hydra.run.dir is unique per run). If that run is no longer "
                    f"running (e.g. its machine went down), delete {self.path}."
                )
            time.sleep(poll_s)

    def release(self) -> None:
        """Remove the lock file if it is still this holder's."""
        if self.holder is None or self.holder.pid != os.getpid():  # never from a forked child
            return
        self._stop.set()
        holder, _ = self._read()
        if holder is not None and holder.token == self.holder.token:
            with contextlib.suppress(OSError):
                self.path.unlink()
        self.holder = None
        with contextlib.suppress(Exception):
            atexit.unregister(self.release)

    def __enter__(self) -> RunLock:
        return self if self.holder is not None else self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
