"""The official checkpoint files: finding a saved iteration in a folder, and reading them as tensors only.

DG-Net saves `gen_<it>.pt`, `dis_<it>.pt` and `id_<it>.pt`, each `{'a': state_dict}` (one generator, shared by
both domains); DG-Net++ saves `gen_a_<it>.pt` (`{'a': ...}`), `gen_b_<it>.pt` (`{'b': ...}`), `dis_a_<it>.pt`,
`dis_b_<it>.pt` (one shared discriminator, saved twice) and `id_<it>.pt`, in `outputs/<name>/<round>/checkpoints/`.
`<it>` is the iteration count, 8 digits. `optimizer.pt` is not needed. The re-ID baseline's teacher is one
plain state dict, `net_last.pth`, with `opts.yaml` beside it.
"""

from __future__ import annotations

import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from dgnetpp_pl.checkpoints import CheckpointError

_NAME = re.compile(r"^(gen|gen_a|gen_b|dis|dis_a|dis_b|id)_(\d{8})\.pt$")
_GLOBAL = re.compile(r"GLOBAL (\S+)")


@dataclass(frozen=True)
class OfficialFiles:
    """One saved iteration: `files` maps a role (`gen`, `gen_a`, `gen_b`, `dis`, `dis_a`, `dis_b`, `id`) to its file."""

    folder: Path
    iteration: int
    files: dict[str, Path]

    @property
    def kind(self) -> str:
        """`dgnetpp` when the two generators have their own files, else `dgnet`."""
        return "dgnetpp" if "gen_a" in self.files or "gen_b" in self.files else "dgnet"

    def path(self, *roles: str) -> Path:
        """The file of the first role present; the error names the folder, the iteration and the files found."""
        for role in roles:
            if role in self.files:
                return self.files[role]
        wanted = " or ".join(f"{r}_{self.iteration:08d}.pt" for r in roles)
        found = ", ".join(sorted(p.name for p in self.files.values()))
        raise CheckpointError(f"{self.folder} has no {wanted} (found: {found}); copy the whole checkpoints folder.")


def find_official_files(src: str | Path, iteration: int | None = None) -> OfficialFiles:
    """The official files of `iteration` (default: the newest) under `src`.

    `src` is a `checkpoints` folder, or a folder holding one (`models/dgnet/market`) or round folders holding
    one each (`outputs/best-duke2market/<round>/checkpoints`).
    """
    root = Path(src)
    if not root.is_dir():
        raise CheckpointError(
            f"src={root} is not a folder; give the official checkpoints folder (it holds id_<iteration>.pt)."
        )
    folders = [root, root / "checkpoints", *sorted(root.glob("*/checkpoints"))]
    sets: dict[tuple[Path, int], dict[str, Path]] = {}
    for folder in folders:
        for path in sorted(folder.glob("*.pt")) if folder.is_dir() else []:
            m = _NAME.match(path.name)
            if m:
                sets.setdefault((folder, int(m.group(2))), {})[m.group(1)] = path
    if not sets:
        raise CheckpointError(
            f"No official checkpoint files (gen_*.pt, dis_*.pt, id_*.pt) in {root}, {root / 'checkpoints'} or "
            f"{root}/*/checkpoints."
        )
    if iteration is None:
        iteration = max(it for _, it in sets)
    chosen = [(folder, files) for (folder, it), files in sets.items() if it == iteration]
    if not chosen:
        found = ", ".join(str(it) for it in sorted({it for _, it in sets}))
        raise CheckpointError(f"No official files of iteration {iteration} under {root}; iterations found: {found}.")
    if len(chosen) > 1:
        where = ", ".join(str(folder) for folder, _ in chosen)
        raise CheckpointError(f"Iteration {iteration} is saved in several folders ({where}); give one of them as src.")
    folder, files = chosen[0]
    return OfficialFiles(folder, iteration, files)


def load_tensors(path: str | Path) -> Any:
    """`torch.load(path, weights_only=True)` on the CPU with errors that name the file.

    Only tensors and plain containers are unpickled (old non-zip files too); a file holding pickled code or
    objects is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist; check the path.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = _GLOBAL.search(str(err))
        if found is not None:
            raise CheckpointError(
                f"{path} is refused: it holds pickled code or objects ({found.group(1)}), and reading it could "
                "run that code. Only files of tensors are read: re-save the weights where the file was made, "
                "as torch.save(model.state_dict(), path)."
            ) from None
        raise _not_tensors(path) from None
    except OSError as err:
        raise CheckpointError(f"{path} cannot be read: {err}.") from None
    except Exception:  # torch.load fails in many ways on bytes that are not a checkpoint (even KeyError)
        raise _not_tensors(path) from None


def _not_tensors(path: Path) -> CheckpointError:
    return CheckpointError(f"{path} is not a PyTorch file of tensors, or it is truncated or corrupt.")


def state_dict_of(obj: Any, path: Path, entry: str | None = None) -> dict[str, Tensor]:
    """The state dict in a loaded file (under `entry`, e.g. `'a'`, when given); errors name the file."""
    if entry is not None:
        if not isinstance(obj, dict) or entry not in obj:
            held = sorted(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
            raise CheckpointError(
                f"{path} has no entry {entry!r} (it holds {held}); the official files hold {{'{entry}': state_dict}}."
            )
        obj = obj[entry]
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path} holds {type(obj).__name__}, not a state dict of tensors.")
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(f"{path}: entries {bad[:5]} are not tensors; it is not a state dict.")
    return dict(obj)


def read_state(path: str | Path, entry: str | None = None) -> dict[str, Tensor]:
    """Load `path` safely and return its state dict (under `entry` when given)."""
    path = Path(path)
    return state_dict_of(load_tensors(path), path, entry)


def save_state(path: Path, state: dict[str, Tensor], entry: str | None = None) -> Path:
    """Write a state dict as the official code does: `{entry: state}`, or plain when `entry` is None."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state if entry is None else {entry: state}, path)
    return path


def read_teacher_opts(weights: Path) -> dict[str, Any]:
    """The baseline's `opts.yaml` beside `net_last.pth` as a dict, or {} when there is none."""
    opts = weights.parent / "opts.yaml"
    if not opts.is_file():
        return {}
    try:
        data = yaml.safe_load(opts.read_text())
    except yaml.YAMLError as err:
        raise CheckpointError(f"{opts} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{opts} holds {type(data).__name__}, not the baseline's options (a mapping).")
    return data
