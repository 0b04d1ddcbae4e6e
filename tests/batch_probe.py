"""A callback for tests that records, on every rank, what each training step received: the batch type (or "skip")
and the image indices of each domain, written as ``<out_dir>/rank<r>.json`` when training ends. Named in a run's
config as ``+callbacks.probe._target_=batch_probe.BatchRecorder`` with this folder on ``PYTHONPATH``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytorch_lightning as pl


def batch_kind(batch: dict[str, Any]) -> str:
    """ "skip", "aa", "bb" or "ab", from the domains a batch holds."""
    if "skip" in batch:
        return "skip"
    return {("source",): "aa", ("target",): "bb"}.get(tuple(sorted(batch)), "ab")


class BatchRecorder(pl.Callback):
    """Records ``{"epoch", "step", "kind", "source", "target", "source_label", "target_label"}`` (the domains a
    batch holds) per training batch on this rank."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.steps: list[dict[str, Any]] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        seen = {d: batch[d]["index"].tolist() for d in ("source", "target") if d in batch}
        seen.update({f"{d}_label": batch[d]["label"].tolist() for d in ("source", "target") if d in batch})
        self.steps.append({"epoch": trainer.current_epoch, "step": idx, "kind": batch_kind(batch), **seen})

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.steps))
