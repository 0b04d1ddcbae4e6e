"""Optimisers and schedulers of one stage: Adam for D_img, the generators and D_dom, Nesterov SGD for E_app (10x on
its heads), each with a MultiStepLR stepped once per iteration."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from dgnetpp_pl.config import OptimConfig
    from dgnetpp_pl.networks import Networks


def optimizer_names(stage: str) -> list[str]:
    """The optimisers in the order Lightning holds them (and a checkpoint stores them)."""
    return ["d_img", "gen_a"] + (["gen_b", "d_dom"] if stage == "adapt" else []) + ["e_app"]


def build_optimizers(
    nets: Networks, cfg: OptimConfig, stage: str
) -> tuple[list[torch.optim.Optimizer], list[torch.optim.lr_scheduler.LRScheduler]]:
    """Optimisers in :func:`optimizer_names` order at the stage's rates (``cfg.source`` / ``cfg.adapt``)."""
    lr = cfg.source if stage == "source" else cfg.adapt
    betas = tuple(cfg.betas)

    def adam(params, rate):
        return torch.optim.Adam(
            [p for p in params if p.requires_grad], lr=rate, betas=betas, weight_decay=cfg.weight_decay
        )

    opts = {"d_img": adam(nets.d_img.parameters(), lr.lr_d), "gen_a": adam(nets.gen_a.parameters(), lr.lr_g)}
    if stage == "adapt":
        opts["gen_b"] = adam(nets.gen_b.parameters(), lr.lr_g)
        opts["d_dom"] = adam(nets.d_dom.parameters(), lr.lr_dom)
    opts["e_app"] = torch.optim.SGD(
        [
            {"params": list(nets.e_app.backbone_parameters()), "lr": lr.lr_app},
            {"params": list(nets.e_app.head_parameters()), "lr": lr.lr_app * cfg.head_lr_mult},
        ],
        lr=lr.lr_app,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        nesterov=True,
    )
    optimizers = [opts[n] for n in optimizer_names(stage)]
    schedulers = [
        torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(cfg.milestones), gamma=cfg.gamma)
        for opt in optimizers
    ]
    return optimizers, schedulers
