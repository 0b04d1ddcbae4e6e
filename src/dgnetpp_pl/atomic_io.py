"""Atomic file writes: a temporary file in the destination folder, flushed and fsynced, then renamed over the
destination, so a reader sees the old file or the new one, never a part. Nothing goes through ``$TMPDIR``, so this
holds on any filesystem (NFS, Lustre, a local disk) where a rename within one folder is atomic. JSON result files
are read back with an error that names the file instead of a bare ``JSONDecodeError``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

TEMP_SUFFIX = ".partial"


class WriteError(OSError):
    """A file could not be written; the message names it and the cause. The previous file, if any, is intact."""


class ResultFileError(ValueError):
    """A JSON result file is truncated or garbled; the message names it and what to do."""


def previous_path(path: str | Path) -> Path:
    """Where :func:`atomic_write` keeps the previous generation of ``path``: ``last.ckpt`` -> ``last.prev.ckpt``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def is_temp_file(path: Path) -> bool:
    """Whether ``path`` is a temporary file of an unfinished :func:`atomic_write` (left behind by a kill)."""
    return path.name.startswith(".") and path.name.endswith(TEMP_SUFFIX)


def _fsync_dir(folder: Path) -> None:
    # Make the rename itself durable; some filesystems cannot open a folder, and then the rename is all we have.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _create_temp(path: Path) -> tuple[int, Path]:
    # Not tempfile.mkstemp: its files are private (0600); these get the permissions the umask gives any new file.
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}{TEMP_SUFFIX}")
        try:
            return os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path}")


def _keep_previous(path: Path) -> None:
    # A hard link keeps `path` in place until the new file replaces it; without links, a plain rename.
    prev = previous_path(path)
    link = path.with_name(f".{prev.name}.{os.getpid()}{TEMP_SUFFIX}")
    try:
        os.link(path, link)
        os.replace(link, prev)
    except OSError:
        with contextlib.suppress(OSError):
            link.unlink()
        os.replace(path, prev)


def remove_temp_files(folder: str | Path) -> list[Path]:
    """Delete the temporary files that killed writes left in ``folder``; returns them. Only for a folder that no
    other process writes to (the run lock ensures that)."""
    removed = []
    for path in Path(folder).glob(f".*{TEMP_SUFFIX}"):
        with contextlib.suppress(OSError):
            path.unlink()
            removed.append(path)
    return removed


def _cause(err: BaseException) -> str:
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return "no space left on device (ENOSPC)"
    if isinstance(err, OSError) and err.errno == errno.EDQUOT:
        return "disk quota exceeded (EDQUOT)"
    return f"{type(err).__name__}: {err}"


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None], keep_previous: bool = False) -> Path:
    """Write ``path`` through ``write(file)`` into a temporary file beside it, fsync, then rename it into place.

    ``keep_previous=True`` keeps an existing ``path`` as :func:`previous_path` (a hard link, else a rename), so one
    older generation survives a newest file that is later found damaged. On any failure the temporary file is
    removed, ``path`` is left as it was, and :class:`WriteError` names the file and the cause (e.g. ENOSPC).
    """
    path = Path(path)
    folder = path.parent
    tmp: Path | None = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = _create_temp(path)
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        if keep_previous and path.exists():
            _keep_previous(path)
        os.replace(tmp, path)
    except BaseException as err:  # also KeyboardInterrupt / SystemExit: never leave a partial file behind
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()
        if isinstance(err, Exception):
            raise WriteError(
                f"Could not write {path}: {_cause(err)}. The partial file was removed and the previous {path.name} "
                f"(if any) is unchanged. Free space in {folder} or write the run elsewhere (hydra.run.dir=...)."
            ) from err
        raise
    _fsync_dir(folder)
    return path


def write_json(path: str | Path, obj: Any) -> Path:
    """Atomically write ``obj`` as indented JSON (result.json, metrics.json)."""
    data = (json.dumps(obj, indent=2) + "\n").encode()
    return atomic_write(path, lambda fh: fh.write(data))


def read_json(path: str | Path, what: str = "result file") -> Any:
    """Read a JSON file written by :func:`write_json`; a truncated or garbled file is a :class:`ResultFileError`."""
    path = Path(path)
    text = path.read_text(errors="replace")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ResultFileError(
            f"The {what} {path} is truncated or garbled ({err.msg} at line {err.lineno}, column {err.colno}; "
            f"{len(text)} characters). It was not written by a finished run. Delete it to evaluate the stage "
            "again from its checkpoints (ckpt_path=last), or restore it from a backup."
        ) from None
