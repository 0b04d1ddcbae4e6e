"""Load a trained checkpoint for inference: the model plus the image size it was trained at."""

from __future__ import annotations

from pathlib import Path

import torch

from dgnetpp_pl.checkpoints import CheckpointError, load_checkpoint
from dgnetpp_pl.module import DGNetPP


def load_model(ckpt_path: str | Path, device: str | torch.device = "cpu") -> DGNetPP:
    """Rebuild :class:`DGNetPP` from a checkpoint's hyper-parameters and weights, in eval mode."""
    ckpt = load_checkpoint(ckpt_path)
    hp = dict(ckpt.get("hyper_parameters", {}))
    if "model" not in hp:
        raise CheckpointError(
            f"Checkpoint {ckpt_path} has no model hyper-parameters; it was not written by dgnetpp_pl."
        )
    hp["model"] = {**hp["model"], "pretrained": False}  # the checkpoint holds the weights
    model = DGNetPP(**hp)
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as err:
        raise CheckpointError(f"Checkpoint {ckpt_path} does not match its own model config: {err}") from None
    return model.to(device).eval()


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
