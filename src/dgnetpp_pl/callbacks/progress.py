"""StageProgressBar: Lightning's rich progress bar with the stage and the phase in front of its metrics."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import RichProgressBar


class StageProgressBar(RichProgressBar):
    """Shows ``stage: source|adapt`` and ``phase: source|warmup|self_training`` (the module's ``stage`` and
    ``phase``) before the logged metrics, e.g. ``stage: adapt phase: warmup train/g_total: 3.512``."""

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        where = {name: getattr(pl_module, name, None) for name in ("stage", "phase")}
        return {**{k: v for k, v in where.items() if v is not None}, **super().get_metrics(trainer, pl_module)}
