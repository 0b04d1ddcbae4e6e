"""Checkpoint files: safe loading (``weights_only=True``) with clear errors, atomic saving, the validated choice of
what a run resumes from, and the global RNG states that an exact resume needs."""

from __future__ import annotations

import contextlib
import os
import pickle
import pickletools
import random
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pytorch_lightning.plugins import TorchCheckpointIO
from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_warn

from dgnetpp_pl.atomic_io import ResultFileError, WriteError, atomic_write, previous_path, read_json, remove_temp_files
from dgnetpp_pl.runlock import process_is_rank_zero
from dgnetpp_pl.schedule import STAGES


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, corrupt, foreign or incompatible; the message names the file.

    ``reason`` is the short form (e.g. ``"is truncated or corrupt (...)"``), for messages that list several files.
    """

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason or message


# Pickle opcodes that push a string, and those that name a global: enough to list what a pickle would import.
_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}


def pickled_globals(path: Path) -> list[str]:
    """The ``module.name`` globals that a checkpoint's pickle would import, read without unpickling anything.

    A torch (zip) checkpoint is scanned in its ``data.pkl``, any other file as a plain pickle; garbage stops the scan.
    """
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                name = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
                data = archive.read(name) if name else b""
        else:
            data = path.read_bytes()
    except (OSError, zipfile.BadZipFile, RuntimeError):
        return []
    found: list[str] = []
    strings: list[str] = []
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name in _STRING_OPS:
                strings.append(str(arg))
            elif op.name == "GLOBAL":
                found.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
    except Exception:  # noqa: BLE001 - a damaged pickle: keep what was read before the damage
        pass
    return list(dict.fromkeys(found))


def _unsafe_globals(path: Path) -> list[str]:
    try:
        from torch._weights_only_unpickler import _get_allowed_globals

        allowed = set(_get_allowed_globals())
    except (ImportError, AttributeError):  # a torch without the helper: report every global
        allowed = set()
    return [name for name in pickled_globals(path) if name not in allowed]


def _refused(path: Path, names: list[str]) -> CheckpointError:
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return CheckpointError(
        f"Checkpoint {path} holds a pickled object ({shown}) that safe loading (weights_only=True) refuses: "
        "refused code, because unpickling it would import and call that object. It was not run. dgnetpp_pl "
        "checkpoints hold only tensors and plain values, so this file was not written by dgnetpp_pl or was "
        "altered; do not load it by other means unless you trust its source. Use a checkpoint written by dgnetpp_pl.",
        reason=f"holds refused code ({shown})",
    )


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict[str, Any]:
    """Load a Lightning checkpoint with ``weights_only=True`` (no arbitrary pickles).

    ``mmap=True`` maps the tensor data instead of reading it: a cheap check of a file that is loaded later.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path} does not exist; check the path (ckpt_path=, init_ckpt=).")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        # torch names the refused global in two phrasings; a plain pickle fails earlier, on an opcode.
        named = re.findall(r"GLOBAL ([\w.]+)", str(err))
        unsafe = list(dict.fromkeys(named)) or _unsafe_globals(path)
        if unsafe:
            raise _refused(path, unsafe) from None
        raise _corrupt(path, "its pickled data is malformed") from None
    except OSError as err:
        raise CheckpointError(f"Checkpoint {path} cannot be read: {err}.", reason=f"cannot be read ({err})") from None
    except Exception as err:  # torch.load fails in many ways on bytes that are not a checkpoint (even KeyError)
        first = str(err).splitlines()[0].split(". ")[0] if str(err) else ""  # torch's first sentence
        raise _corrupt(path, f"{type(err).__name__}{': ' + first if first else ''}") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(
            f"Checkpoint {path} holds no 'state_dict'; it is not a dgnetpp_pl checkpoint.",
            reason="holds no 'state_dict' (not a dgnetpp_pl checkpoint)",
        )
    return ckpt


def _corrupt(path: Path, reason: str) -> CheckpointError:
    # Never point at a sibling by name here: it may be the broken file itself (resolve_resume() checks the siblings).
    return CheckpointError(
        f"Checkpoint {path} is truncated or corrupt and cannot be loaded ({reason}). Do not use this file: give an "
        "earlier checkpoint that loads, or train again.",
        reason=f"is truncated or corrupt ({reason})",
    )


def read_result(path: str | Path) -> dict[str, Any]:
    """A finished stage's ``result.json``; a truncated or garbled one is a :class:`CheckpointError` naming it."""
    try:
        return read_json(path, what="stage result")
    except ResultFileError as err:
        raise CheckpointError(str(err)) from None


# Where a checkpoint (and a stage's result.json) stores the run's resolved config, as plain values.
RUN_CONFIG_KEY = "run_config"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint writer: :func:`~dgnetpp_pl.atomic_io.atomic_write` into the checkpoint's own folder
    (never via ``$TMPDIR``), keeping the previous ``last.ckpt`` as ``last.prev.ckpt``. A failed save removes its
    partial file and raises :class:`CheckpointError` naming the file and the cause (e.g. a full disk).

    ``run_config`` (the run's config as plain values) is stored in every checkpoint under :data:`RUN_CONFIG_KEY`,
    so that a resume can compare it with its own (:mod:`dgnetpp_pl.resume_check`)."""

    keep_previous = ("last.ckpt",)

    def __init__(self, run_config: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.run_config = run_config

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options.")
        if self.run_config is not None:
            checkpoint = {**checkpoint, RUN_CONFIG_KEY: self.run_config}
        path = Path(path)
        try:
            atomic_write(path, lambda fh: torch.save(checkpoint, fh), keep_previous=path.name in self.keep_previous)
        except WriteError as err:
            raise CheckpointError(f"Saving the checkpoint failed. {err}") from err.__cause__


# ------------------------------------------------------------------------------------------------ resume source
STAGE_ORDER = STAGES


def _run_dir_of(path: Path) -> Path:
    """The run folder that holds ``path`` (``<run>/checkpoints/<stage>/<file>``), else the file's folder."""
    return path.parent.parent.parent if path.parent.parent.name == "checkpoints" else path.parent


def _earlier_stage_finished(stage_dir: Path) -> bool:
    if stage_dir.name not in STAGE_ORDER:
        return False
    earlier = STAGE_ORDER[: STAGE_ORDER.index(stage_dir.name)]
    return any((stage_dir.parent / name / "result.json").is_file() for name in earlier)


def _try_load(path: Path) -> CheckpointError | None:
    """None when ``path`` loads (memory-mapped), else the error."""
    try:
        load_checkpoint(path, mmap=True)
    except CheckpointError as err:
        return err
    return None


def _resume_last(stage_dir: Path) -> str | None:
    last, prev = stage_dir / "last.ckpt", previous_path(stage_dir / "last.ckpt")
    if (stage_dir / "result.json").is_file():
        return None  # the stage finished: its result is reused and no checkpoint of it is loaded
    if not last.is_file() and not prev.is_file():
        if _earlier_stage_finished(stage_dir):
            return None  # the run stopped after the previous stage, before this stage's first save
        raise CheckpointError(
            f"ckpt_path=last: nothing to resume in {stage_dir} (no last.ckpt, and no finished stage in "
            f"{stage_dir.parent}). Resume the interrupted run in its own folder: hydra.run.dir=<that run> "
            "ckpt_path=last; or leave ckpt_path unset to start a fresh run."
        )
    last_error = _try_load(last) if last.is_file() else None
    if last.is_file() and last_error is None:
        return str(last)
    problem = f"{last} {last_error.reason}" if last_error else f"{last} is missing"
    prev_error = _try_load(prev) if prev.is_file() else None
    if not prev.is_file() or prev_error is not None:
        prev_problem = f"{prev} {prev_error.reason}" if prev_error else f"there is no {prev.name}"
        raise CheckpointError(
            f"ckpt_path=last: no checkpoint of {stage_dir} can be resumed: {problem}, and {prev_problem}. Resume "
            "from another checkpoint of this stage that loads (ckpt_path=<file>), or start a fresh run."
        )
    if last.is_file() and process_is_rank_zero():
        # Set the damaged file aside, so the next save does not rotate it into last.prev.ckpt.
        with contextlib.suppress(OSError):
            os.replace(last, last.with_name(last.name + ".corrupt"))
    rank_zero_warn(
        f"{problem}. Resuming from the previous generation {prev} instead (one save earlier); the "
        f"damaged file is kept as {last.name}.corrupt."
    )
    return str(prev)


def resolve_resume(ckpt_path: str | None, stage_dir: Path) -> str | None:
    """The checkpoint that one stage resumes from, validated before anything is written; None: start the stage.

    ``"last"`` means this stage's ``last.ckpt`` (or, if that is damaged, ``last.prev.ckpt``, with a warning); it is an
    error when the run has nothing to resume. An explicit file must exist, load, and lie in this stage's folder;
    a checkpoint of another stage of this run is accepted only once this stage has finished (its result is reused).
    """
    if ckpt_path is None:
        return None
    stage_dir = Path(stage_dir)
    if process_is_rank_zero():
        for leftover in remove_temp_files(stage_dir) if stage_dir.is_dir() else []:
            rank_zero_info(f"Removed {leftover}, the partial file of a save that was interrupted.")
    if ckpt_path == "last":
        return _resume_last(stage_dir)
    path = Path(ckpt_path)
    if not path.is_file():
        raise CheckpointError(
            f"ckpt_path={ckpt_path!r}: {path.resolve()} does not exist. To resume an interrupted run, give its folder: "
            "hydra.run.dir=<that run> ckpt_path=last. To start the adapt stage from a source model, use "
            "init_ckpt=<its final.ckpt> instead."
        )
    here = path.resolve().parent
    if here != stage_dir.resolve():
        same_run = here.parent == stage_dir.resolve().parent
        if same_run and (stage_dir / "result.json").is_file():
            return None  # this stage finished earlier in the run; ckpt_path names a later stage's file
        owner = f"the {here.name} stage of this run" if same_run else f"another run ({_run_dir_of(path.resolve())})"
        raise CheckpointError(
            f"ckpt_path={ckpt_path} belongs to {owner}, not to this run's {stage_dir.name} stage ({stage_dir}); "
            "resuming it here would mix two runs. To resume the run it belongs to: "
            f"hydra.run.dir={_run_dir_of(path.resolve())} ckpt_path=last. To start adaptation from a source model: "
            f"init_ckpt={path}."
        )
    problem = _try_load(path)
    if problem is not None:
        raise CheckpointError(f"ckpt_path={ckpt_path} cannot be resumed from: {problem}")
    return str(path)


def resolve_eval_checkpoint(ckpt_path: str, stage_dir: Path) -> str:
    """The checkpoint that ``train=false`` evaluates: ``"last"`` is this stage's ``final.ckpt``, else its newest
    ``last.ckpt`` / ``last.prev.ckpt`` that loads; any other value is a file (of any run) that must exist and load."""
    stage_dir = Path(stage_dir)
    if ckpt_path == "last":
        candidates = (stage_dir / "final.ckpt", stage_dir / "last.ckpt", previous_path(stage_dir / "last.ckpt"))
        for path in candidates:
            if path.is_file() and _try_load(path) is None:
                return str(path)
        raise CheckpointError(
            f"train=false ckpt_path=last: no checkpoint of {stage_dir} loads (final.ckpt, last.ckpt, "
            "last.prev.ckpt). Give the run's folder (hydra.run.dir=<that run>) or a checkpoint file (ckpt_path=<file>)."
        )
    path = Path(ckpt_path)
    if not path.is_file():
        raise CheckpointError(
            f"train=false ckpt_path={ckpt_path!r}: {path.resolve()} does not exist. Give a final.ckpt or last.ckpt "
            "of the stage (outputs/.../checkpoints/<stage>/final.ckpt), or ckpt_path=last with hydra.run.dir=<run>."
        )
    problem = _try_load(path)
    if problem is not None:
        raise CheckpointError(f"train=false ckpt_path={ckpt_path} cannot be evaluated: {problem}")
    return str(path)


def capture_rng_state() -> dict[str, Any]:
    """The global RNG states of torch (CPU, and CUDA when present), numpy and Python's ``random``.

    Only tensors, ints, floats and tuples, so the checkpoint still loads with ``weights_only=True``.
    """
    _, key, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = {"key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos)}
    numpy_state.update(has_gauss=int(has_gauss), gauss=float(gauss))
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


@contextlib.contextmanager
def own_rng(seed: int) -> Iterator[None]:
    """Run the block on the global RNGs seeded with ``seed``, then put back the states they had before it: the
    block draws its own numbers and leaves the caller's streams as it found them."""
    saved = capture_rng_state()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # all devices
    try:
        yield
    finally:
        restore_rng_state(saved)


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set the global RNGs from :func:`capture_rng_state`'s output (CUDA only when the device count matches)."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    key = n["key"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", key, n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
