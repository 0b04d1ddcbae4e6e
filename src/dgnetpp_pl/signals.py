"""Graceful stop on SIGTERM (what cluster schedulers send before killing a job): save ``last.ckpt``, then exit 0.

Lightning's own SIGTERM handler (installed only while a trainer runs) sets ``trainer.received_sigterm``, forwards
the signal to the other local ranks and stops at the next batch, but saves nothing. :class:`CheckpointOnSigterm`
adds the save, and its own handler also covers a signal that arrives outside ``trainer.fit`` (data setup, the
final test), so a run resumed with ``ckpt_path=last`` loses at most one batch.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.utilities.exceptions import SIGTERMException
from pytorch_lightning.utilities.rank_zero import rank_zero_info


class CheckpointOnSigterm(pl.Callback):
    """After the first training batch that ends once any rank has received SIGTERM, every rank saves
    ``<dirpath>/last.ckpt`` together and training stops with :class:`SIGTERMException` (a ``SystemExit``)."""

    def __init__(self, dirpath: str | Path) -> None:
        self.dirpath = Path(dirpath)
        self.requested = False
        self.saved: Path | None = None

    @property
    def last_path(self) -> Path:
        return self.dirpath / "last.ckpt"

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True

    @contextmanager
    def installed(self) -> Iterator[None]:
        """Within the block SIGTERM only sets :attr:`requested`; a :class:`SIGTERMException` raised by Lightning
        ends the block quietly. The previous handler comes back afterwards."""
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, self._handler) if main else None
        try:
            yield
        except SIGTERMException:
            self.requested = True
        finally:
            if main:
                signal.signal(signal.SIGTERM, previous)

    def _save(self, trainer: pl.Trainer) -> None:
        trainer.save_checkpoint(self.last_path)  # collective: every rank calls it, rank 0 writes
        self.saved = self.last_path
        rank_zero_info(f"SIGTERM: saved {self.last_path} at global step {trainer.global_step}.")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        # One all-reduce per batch under DDP, so that every rank takes the same decision at the same batch.
        local = self.requested or trainer.received_sigterm
        if trainer.strategy.reduce_boolean_decision(local, all=False):
            self.requested = True
            self._save(trainer)
            raise SIGTERMException()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Lightning also stops inside validation or at an epoch end; the batch-end save did not run then.
        if isinstance(exception, SIGTERMException) and self.saved is None and trainer.state.fn == "fit":
            self.requested = True
            self._save(trainer)

    def exit(self) -> None:
        """Report where training can resume from and leave with status 0."""
        where = f"saved {self.saved}" if self.saved else f"the last checkpoint in {self.dirpath} is kept"
        rank_zero_info(f"Stopped on SIGTERM; {where}. Resume with the same command plus ckpt_path=last.")
        raise SystemExit(0)
