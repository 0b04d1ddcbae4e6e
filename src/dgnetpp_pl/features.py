"""Re-ID features from the appearance encoder, as the official evaluation computes them, and from the teacher, as
the official re-ID baseline computes them.

Each head's bottleneck output is L2-normalised, the original and the flipped image are summed, each half is
normalised again, and the fine-grained half is weighted: ``f = [g1, sqrt(alpha) g2] / sqrt(1 + alpha)``, so
``f_q . f_g = (g1_q.g1_g + alpha g2_q.g2_g) / (1 + alpha)``, the official score up to a constant.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from dgnetpp_pl.models.appearance import AppearanceEncoder
from dgnetpp_pl.models.teacher import Teacher


def _embed(e_app: AppearanceEncoder, x: Tensor) -> tuple[Tensor, Tensor]:
    _, feat = e_app.backbone_forward(x)
    _, (e1, e2) = e_app.heads(feat)
    return F.normalize(e1.float(), dim=1), F.normalize(e2.float(), dim=1)


@torch.no_grad()
def embed_images(e_app: AppearanceEncoder, x: Tensor, alpha: float = 0.5, flip: bool = True) -> Tensor:
    """Unit-norm re-ID features ``(B, 2 * bottleneck)`` of normalised images ``(B, 3, H, W)``; eval mode assumed.

    ``alpha`` and ``flip`` are ``model.features``; every caller passes the model's own.
    """
    g1, g2 = _embed(e_app, x)
    if flip:
        f1, f2 = _embed(e_app, torch.flip(x, dims=[3]))
        g1, g2 = g1 + f1, g2 + f2
    g1, g2 = F.normalize(g1, dim=1), F.normalize(g2, dim=1)
    return torch.cat([g1, math.sqrt(alpha) * g2], dim=1) / math.sqrt(1.0 + alpha)


@torch.no_grad()
def embed_teacher_images(teacher: Teacher, x: Tensor, flip: bool = True) -> Tensor:
    """Unit-norm teacher features ``(B, bottleneck)`` of images ``(B, 3, H, W)`` (eval mode assumed): the bottleneck
    outputs of the image and its mirror image summed, then normalised (the official baseline's test)."""
    feats = teacher.embedding(x).float()
    if flip:
        feats = feats + teacher.embedding(torch.flip(x, dims=[3])).float()
    return F.normalize(feats, dim=1)


def check_finite(feats: Tensor, what: str) -> None:
    """Raise if any feature row holds NaN or Inf, naming how many rows are bad."""
    bad = (~torch.isfinite(feats)).any(dim=1)
    if bool(bad.any()):
        raise FloatingPointError(
            f"{int(bad.sum())} of {feats.shape[0]} {what} feature rows hold NaN or Inf; the appearance encoder "
            "has diverged. Lower the learning rates or resume from the last good checkpoint."
        )
