"""Graceful stop on SIGTERM (what cluster schedulers send before killing a job): save ``last.ckpt``, then exit 0.

The stop comes only where Lightning itself checkpoints, so that a run resumed with ``ckpt_path=last`` continues
exactly as an uninterrupted one would:

- mid-epoch, at the end of the batch that is running (the state of a ``every_n_train_steps`` save);
- during the last batch of an epoch, its validation, the pseudo-label refresh or another epoch-end hook, at the end
  of that epoch, after its checkpoints are written (the state of an epoch-end save). The last batch also saves
  ``last.ckpt`` at once, so that a kill that follows before the epoch end still loses nothing.

Stopping anywhere else gives a checkpoint that resumes differently. Lightning's own handler stops at the next
training or validation batch and at the end of an epoch after its progress counters have moved on: a checkpoint
saved there holds the next epoch, and a resume from it skips the epoch-end work (it is what gave epoch 1 and phase
``self_training`` for a signal during the refresh after epoch 0). :class:`CheckpointOnSigterm` therefore replaces
that handler while training runs; its own handler also covers a signal that arrives outside ``trainer.fit`` (data
setup, the final test). Under DDP every rank takes each decision together (one all-reduce per batch and epoch).
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Checkpoint, ModelCheckpoint
from pytorch_lightning.utilities.exceptions import SIGTERMException

from dgnetpp_pl.run_log import info_on_rank_zero

log = logging.getLogger(__name__)


class CheckpointOnSigterm(Checkpoint):
    """Saves ``<dirpath>/last.ckpt`` and stops training with :class:`SIGTERMException` (a ``SystemExit``) at the
    first point after SIGTERM where the saved state resumes exactly (see the module docstring).

    A :class:`Checkpoint` subclass, so that Lightning runs its epoch-end hook after the other checkpoint callbacks.
    """

    def __init__(self, dirpath: str | Path) -> None:
        self.dirpath = Path(dirpath)
        self.requested = False
        self.saved: Path | None = None
        self._at_epoch_end = False

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

    def _agreed(self, trainer: pl.Trainer) -> bool:
        # A collective: every rank calls it at the same hook, so all ranks stop at the same batch or epoch end.
        if trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            self.requested = True
        return self.requested

    def _save(self, trainer: pl.Trainer) -> None:
        trainer.save_checkpoint(self.last_path)  # collective: every rank calls it, rank 0 writes
        self.saved = self.last_path
        info_on_rank_zero(log, f"SIGTERM: saved {self.last_path} at global step {trainer.global_step}.")

    def _saved_by_epoch_end_checkpoint(self, trainer: pl.Trainer) -> bool:
        """Whether a ModelCheckpoint wrote ``last.ckpt`` at this epoch end (same global step): it holds this state."""
        for cb in trainer.checkpoint_callbacks:
            if not isinstance(cb, ModelCheckpoint):
                continue
            path = getattr(cb, "_last_checkpoint_saved", "") or ""
            if getattr(cb, "_last_global_step_saved", None) == trainer.global_step and path:
                if Path(path).resolve() == self.last_path.resolve():
                    return True
        return False

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning installed its own handler just before this hook; it would stop at points that do not resume
        # exactly. Lightning restores the previous handler (ours, from installed()) when the fit ends.
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._handler)
        connector = getattr(trainer, "_signal_connector", None)
        if connector is not None and getattr(connector, "received_sigterm", False):
            self.requested = True  # a signal in between: take it over, so that Lightning does not act on it
            connector.received_sigterm = False

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if not self._agreed(trainer):
            return
        batch_idx = args[-1] if args else 0
        self._save(trainer)
        if batch_idx + 1 < trainer.num_training_batches:
            raise SIGTERMException()
        # The last batch: validation, the pseudo-label refresh and the epoch-end checkpoints run first, and
        # on_train_epoch_end stops; the file just written covers a kill that comes before that.

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._agreed(trainer):
            self._at_epoch_end = True
            raise SIGTERMException()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != "fit":
            return
        self.requested = True
        if self._at_epoch_end:
            # Raised before Lightning counts the epoch as completed: the state of an epoch-end save.
            if self._saved_by_epoch_end_checkpoint(trainer):
                self.saved = self.last_path
            else:
                self._save(trainer)
        elif self.saved is None:  # raised by Lightning elsewhere: keep what there is
            self._save(trainer)

    def exit(self) -> None:
        """Report where training can resume from and leave with status 0."""
        where = f"saved {self.saved}" if self.saved else f"the last checkpoint in {self.dirpath} is kept"
        run_dir = self.dirpath.parent.parent  # <run>/checkpoints/<stage>
        info_on_rank_zero(
            log,
            f"Stopped on SIGTERM; {where}. Resume with the same command plus hydra.run.dir={run_dir} ckpt_path=last.",
        )
        raise SystemExit(0)
