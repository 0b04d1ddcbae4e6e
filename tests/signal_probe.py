"""A callback for tests that sends SIGTERM to its own process at one chosen point of training, so a test can place
the signal exactly: inside the pseudo-label clustering that runs before ``epoch`` (``at="refresh"``), or at the start
of training batch ``batch`` of ``epoch`` (``at="batch"``). Named in a run's config as
``+callbacks.probe._target_=signal_probe.SigtermAt`` with this folder on ``PYTHONPATH``."""

from __future__ import annotations

import os
import signal
from typing import Any

import pytorch_lightning as pl


class SigtermAt(pl.Callback):
    """Sends SIGTERM once, at the refresh before ``epoch`` or at batch ``batch`` of ``epoch``."""

    def __init__(self, at: str, epoch: int, batch: int = 0) -> None:
        if at not in ("refresh", "batch"):
            raise ValueError(f"at must be 'refresh' or 'batch', got {at!r}")
        self.at, self.epoch, self.batch = at, epoch, batch
        self.sent = False
        self._due = -1  # the epoch that the next clustering is for

    def _send(self, where: str) -> None:
        self.sent = True
        print(f"signal_probe: SIGTERM {where}", flush=True)
        os.kill(os.getpid(), signal.SIGTERM)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.at != "refresh":
            return
        (labeller,) = [cb for cb in trainer.callbacks if type(cb).__name__ == "PseudoLabelCallback"]
        cluster = labeller.cluster

        def cluster_and_signal(feats: Any) -> Any:
            if not self.sent and self._due == self.epoch:
                self._send(f"during the pseudo-label refresh before epoch {self.epoch}")
            return cluster(feats)

        labeller.cluster = cluster_and_signal

    # This callback comes before the pseudo-label callback, so these hooks run just before its refreshes.
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._due = trainer.current_epoch

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._due = trainer.current_epoch + 1

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        if self.at == "batch" and not self.sent and trainer.current_epoch == self.epoch and idx == self.batch:
            self._send(f"at batch {idx} of epoch {self.epoch}")
