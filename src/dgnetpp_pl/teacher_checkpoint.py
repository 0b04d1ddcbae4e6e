"""Teacher checkpoints: the teacher's weights under `teacher.` and its constructor arguments, loadable with
``weights_only=True``; and the reference (path and SHA-256) by which a run's checkpoints name the teacher file that
trained them."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from dgnetpp_pl.checkpoints import CheckpointError, load_checkpoint
from dgnetpp_pl.models.teacher import Teacher

PREFIX = "teacher."


def teacher_hparams(teacher: Teacher) -> dict[str, Any]:
    """The arguments that rebuild `teacher`'s architecture."""
    return {
        "num_classes": teacher.num_classes,
        "arch": teacher.arch,
        "last_stride": teacher.last_stride,
        "bottleneck_dim": teacher.head.bottleneck[0].out_features,
        "droprate": float(teacher.head.dropout.p),
    }


def save_teacher(teacher: Teacher, path: str | Path, origin: str = "") -> Path:
    """Write `teacher` as `{"state_dict", "hyper_parameters": {"teacher": ...}, "dgnetpp": {"stage": "teacher"}}`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ckpt = {
        "state_dict": {PREFIX + k: v.detach().cpu() for k, v in teacher.state_dict().items()},
        "hyper_parameters": {"teacher": teacher_hparams(teacher)},
        "dgnetpp": {"stage": "teacher", "format": 1, "converted_from": origin},
    }
    torch.save(ckpt, path)
    return path


def load_teacher(path: str | Path, device: str | torch.device = "cpu") -> Teacher:
    """Rebuild the teacher of a checkpoint written by :func:`save_teacher`, in eval mode."""
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as err:
        if "holds no 'state_dict'" not in str(err):
            raise
        raise CheckpointError(
            f"{err} An official re-ID baseline teacher (net_last.pth) converts to one with "
            f"`python -m dgnetpp_pl.convert kind=teacher src={path} out=teacher.ckpt`."
        ) from None
    hp = ckpt.get("hyper_parameters", {}).get("teacher")
    if ckpt.get("dgnetpp", {}).get("stage") != "teacher" or not isinstance(hp, dict):
        raise CheckpointError(
            f"Checkpoint {path} is not a teacher checkpoint (no teacher hyper-parameters). Give a stage=teacher "
            "final.ckpt, or a teacher converted by `python -m dgnetpp_pl.convert kind=teacher`."
        )
    teacher = Teacher(**hp, pretrained=False)
    state = {k[len(PREFIX) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(PREFIX)}
    try:
        teacher.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"Checkpoint {path} does not match its own teacher config: {err}") from None
    return teacher.to(device).eval()


# ------------------------------------------------------------------------------------------------- references
def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def teacher_reference(path: str | Path) -> dict[str, str]:
    """``{"path": absolute path, "sha256": hex digest}`` of a teacher file, as a run's checkpoints record it."""
    path = Path(path)
    return {"path": str(path.resolve()), "sha256": file_sha256(path)}


def check_teacher_reference(
    recorded: dict[str, str] | None, current: dict[str, str] | None, ckpt_path: str | Path
) -> None:
    """Refuse to resume ``ckpt_path`` (whose checkpoint recorded ``recorded``) with the teacher file ``current``
    unless both are the same file content (or neither run has a teacher); the error names both files."""
    if recorded is None and current is None:
        return
    if recorded is None:
        raise CheckpointError(
            f"Checkpoint {ckpt_path} was trained without a teacher, but this run has one ({current['path']}). "
            "Resume it with the config it was trained with (model.loss.teacher_w=0), or start a fresh run."
        )
    if current is None:
        raise CheckpointError(
            f"Checkpoint {ckpt_path} was trained with the teacher {recorded['path']} (SHA-256 {recorded['sha256']}), "
            "but this run has none. Resume it with model.loss.teacher_w > 0 and teacher_ckpt= that file."
        )
    if recorded["sha256"] != current["sha256"]:
        raise CheckpointError(
            f"Checkpoint {ckpt_path} was trained with the teacher {recorded['path']} (SHA-256 {recorded['sha256']}), "
            f"but the teacher file given now, {current['path']}, has SHA-256 {current['sha256']}: another teacher. "
            "Resuming would mix two teachers; restore that file, give teacher_ckpt= the file it was trained with, "
            "or start a fresh run."
        )
