"""Models outside a training run: build one from its config, write it as a checkpoint without a Trainer, and load
a checkpoint for inference (with the image size it was trained at)."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch

from dgnetpp_pl.atomic_io import atomic_write
from dgnetpp_pl.checkpoints import CheckpointError, load_checkpoint
from dgnetpp_pl.config import ConfigError, ModelConfig
from dgnetpp_pl.module import DGNetPP
from dgnetpp_pl.schedule import AdaptSchedule


def build_model(
    stage: str,
    model: ModelConfig,
    num_source_ids: int,
    target_capacity: int = 0,
    schedule: AdaptSchedule | None = None,
    image_size: tuple[int, int] = (256, 128),
) -> DGNetPP:
    """A freshly initialised :class:`DGNetPP` of ``stage`` (``"source"`` or ``"adapt"``).

    ``num_source_ids`` source classes plus ``target_capacity`` target rows (adapt stage) size the joint classifier;
    ``schedule`` defaults to the stage with no warm-up; ``image_size`` is ``(height, width)``.
    """
    schedule = schedule if schedule is not None else AdaptSchedule(stage=stage)
    if schedule.stage != stage:
        raise ValueError(f"build_model: stage {stage!r} but the schedule is of stage {schedule.stage!r}.")
    return DGNetPP(model, schedule, num_source_ids, target_capacity, image_size=image_size)


def save_model_checkpoint(model: DGNetPP, path: str | Path, origin: str = "") -> Path:
    """Write ``model``'s weights and hyper-parameters as a checkpoint that :func:`load_model`, ``init_ckpt=`` and
    the ``evaluate`` CLI accept (tensors and plain values only: it loads with ``weights_only=True``), atomically.

    ``origin`` (e.g. the official files converted) is recorded as ``dgnetpp.converted_from``.
    """
    state = {"stage": model.stage, "phase": model.phase, "app_lr_scale": model.app_lr_scale}
    if origin:
        state["converted_from"] = origin
    checkpoint = {
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "hyper_parameters": dict(model.hparams),
        "dgnetpp": state,
        "epoch": 0,
        "global_step": 0,
        "pytorch-lightning_version": pl.__version__,
    }
    return atomic_write(path, lambda fh: torch.save(checkpoint, fh))


def load_model(ckpt_path: str | Path, device: str | torch.device = "cpu") -> DGNetPP:
    """Rebuild :class:`DGNetPP` from a checkpoint's hyper-parameters and weights, in eval mode."""
    ckpt = load_checkpoint(ckpt_path)
    hp = dict(ckpt.get("hyper_parameters", {}))
    if "model" not in hp:
        raise CheckpointError(
            f"Checkpoint {ckpt_path} has no model hyper-parameters; it was not written by dgnetpp_pl."
        )
    hp["model"] = {**hp["model"], "pretrained": False}  # the checkpoint holds the weights
    try:
        model = DGNetPP(**hp)
    except (ConfigError, TypeError) as err:
        raise CheckpointError(f"Checkpoint {ckpt_path} holds hyper-parameters this version cannot use: {err}") from None
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as err:
        raise CheckpointError(f"Checkpoint {ckpt_path} does not match its own model config: {err}") from None
    return model.to(device).eval()


def pick_device(name: str = "auto") -> torch.device:
    """``"auto"``: the GPU when there is one, else the CPU; any other name as torch spells it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
