"""Checkpoint files: safe loading (``weights_only=True``) with clear errors, resume-path resolution, and the
global RNG states that an exact resume needs."""

from __future__ import annotations

import pickle
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, corrupt or incompatible; the message names the file."""


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
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if refused is None:
            raise _corrupt(path, err) from None
        raise CheckpointError(
            f"Checkpoint {path} holds a pickled object ({refused.group(1)}) that safe loading (weights_only=True) "
            "refuses, because unpickling it could run code; dgnetpp_pl checkpoints hold only tensors and plain "
            "values. Use a checkpoint written by dgnetpp_pl."
        ) from None
    except OSError as err:
        raise CheckpointError(f"Checkpoint {path} cannot be read: {err}.") from None
    except Exception as err:  # torch.load fails in many ways on bytes that are not a checkpoint (even KeyError)
        raise _corrupt(path, err) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"Checkpoint {path} holds no 'state_dict'; it is not a dgnetpp_pl checkpoint.")
    return ckpt


def _corrupt(path: Path, err: BaseException) -> CheckpointError:
    first = str(err).splitlines()[0] if str(err) else ""
    return CheckpointError(
        f"Checkpoint {path} is truncated or corrupt and cannot be loaded ({type(err).__name__}"
        f"{': ' + first if first else ''}). "
        "Use an earlier checkpoint, e.g. last.ckpt."
    )


def resolve_resume(ckpt_path: str | None, stage_dir: Path) -> str | None:
    """Map ``ckpt_path`` to a file for one stage: ``"last"`` means ``<stage_dir>/last.ckpt`` when it exists."""
    if ckpt_path is None:
        return None
    if ckpt_path == "last":
        last = stage_dir / "last.ckpt"
        if not last.is_file():
            return None
        load_checkpoint(last, mmap=True)  # fail early, naming the file, if it is corrupt
        return str(last)
    path = Path(ckpt_path)
    # An explicit file belongs to the stage whose folder holds it.
    if path.parent.resolve() != stage_dir.resolve():
        return None
    load_checkpoint(path, mmap=True)  # fail early, naming the file, if it is corrupt
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
