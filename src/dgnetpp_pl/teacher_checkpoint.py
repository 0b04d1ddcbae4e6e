"""Teacher checkpoints: the teacher's weights under `teacher.` and its constructor arguments, loadable with
``weights_only=True``."""

from __future__ import annotations

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
    ckpt = load_checkpoint(path)
    hp = ckpt.get("hyper_parameters", {}).get("teacher")
    if ckpt.get("dgnetpp", {}).get("stage") != "teacher" or not isinstance(hp, dict):
        raise CheckpointError(f"Checkpoint {path} is not a teacher checkpoint (no teacher hyper-parameters).")
    teacher = Teacher(**hp, pretrained=False)
    state = {k[len(PREFIX) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(PREFIX)}
    try:
        teacher.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"Checkpoint {path} does not match its own teacher config: {err}") from None
    return teacher.to(device).eval()
