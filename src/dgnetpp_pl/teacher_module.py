"""TeacherModule: the teacher stage's LightningModule. The re-ID baseline (:class:`~dgnetpp_pl.models.teacher.Teacher`)
learns the labelled source identities with plain cross entropy; validation and test rank the target like the other
stages (its direct transfer), through :class:`EvaluationHooks`. The stage's result is the teacher alone, written by
:func:`~dgnetpp_pl.teacher_checkpoint.save_teacher` for the teacher terms of the later stages.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor

from dgnetpp_pl import losses
from dgnetpp_pl.checkpoints import capture_rng_state, restore_rng_state
from dgnetpp_pl.config import TeacherConfig, coerce, plain
from dgnetpp_pl.evaluation import EvaluationHooks, ReIDEvaluator
from dgnetpp_pl.features import embed_teacher_images
from dgnetpp_pl.models.teacher import Teacher
from dgnetpp_pl.objective import accuracy


class TeacherModule(EvaluationHooks, pl.LightningModule):
    """Trains ``Teacher`` on source batches ``{"source": {"image" (B, 3, H, W), "label" (B,)}}``.

    ``teacher`` is the typed ``teacher`` config (or its plain dict); ``pretrained`` loads torchvision's ImageNet
    weights (``model.pretrained``); ``flip`` adds the mirror image's feature at evaluation (``model.features.flip``).
    """

    stage = "teacher"

    def __init__(
        self,
        teacher: TeacherConfig | Mapping[str, Any],
        num_source_ids: int,
        pretrained: bool = False,
        flip: bool = True,
    ) -> None:
        super().__init__()
        self.cfg = coerce(TeacherConfig, teacher, "teacher")
        self.flip = flip
        self.save_hyperparameters(
            {"teacher": plain(self.cfg), "num_source_ids": num_source_ids, "pretrained": pretrained, "flip": flip}
        )
        c = self.cfg
        self.teacher = Teacher(
            num_source_ids, arch=c.arch, pretrained=pretrained, last_stride=c.last_stride,
            bottleneck_dim=c.bottleneck_dim, droprate=c.droprate,
        )  # fmt: skip
        self.register_buffer("best_map", torch.full((), -1.0))
        self.evaluator = ReIDEvaluator(all_gather=self.all_gather)
        self.last_eval: dict[str, float] = {}

    @property
    def phase(self) -> str:
        return "teacher"

    def configure_optimizers(self):
        """Nesterov SGD, the head at ``lr`` and the trunk at ``lr * backbone_lr_mult``; the rate falls by ``gamma``
        at each epoch of ``milestones`` (the official baseline's StepLR at two thirds of its 60 epochs)."""
        c = self.cfg
        optimizer = torch.optim.SGD(
            [
                {"params": list(self.teacher.backbone.parameters()), "lr": c.lr * c.backbone_lr_mult},
                {"params": list(self.teacher.head.parameters()), "lr": c.lr},
            ],
            lr=c.lr,
            momentum=c.momentum,
            weight_decay=c.weight_decay,
            nesterov=True,
        )
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(c.milestones), gamma=c.gamma)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    def training_step(self, batch: dict[str, dict[str, Tensor]], batch_idx: int) -> Tensor:
        src = batch["source"]
        logits = self.teacher(src["image"])
        loss = losses.id_loss(logits, src["label"])
        bsz = src["image"].shape[0]
        self.log("train/teacher_id", loss.detach(), prog_bar=True, batch_size=bsz)
        self.log("train/acc_source", accuracy(logits.detach(), src["label"]), batch_size=bsz)
        self.log("train/lr_teacher", self.trainer.optimizers[0].param_groups[1]["lr"], batch_size=bsz)
        return loss

    def embed(self, images: Tensor) -> Tensor:
        """Teacher features ``(B, bottleneck)`` of images ``(B, 3, H, W)`` (eval mode assumed)."""
        return embed_teacher_images(self.teacher, images, self.flip)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["dgnetpp"] = {"stage": self.stage, "phase": self.phase}
        checkpoint["dgnetpp"]["val_metrics"] = {k: v for k, v in self.last_eval.items() if k.startswith("val/")}
        checkpoint["rng_states"] = capture_rng_state()  # dropout draws from the global RNG

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.last_eval = dict(checkpoint.get("dgnetpp", {}).get("val_metrics", {}))
        fitting = self._trainer is not None and self.trainer.state.fn == "fit"
        if fitting and "rng_states" in checkpoint:
            restore_rng_state(checkpoint["rng_states"])
