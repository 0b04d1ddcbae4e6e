"""The adaptation schedule: the stage, the phase of each epoch, when pseudo-labels are due and the appearance-encoder
learning-rate scale. Pure (no Lightning): the module, the pseudo-label callback and the trainer wiring all ask it,
so that a new stage, phase or per-epoch setting (e.g. a teacher stage, a mix of batch types) is added here once.

Epochs are Lightning's (``trainer.current_epoch``), counted from 0 within a stage.
"""

from __future__ import annotations

from dataclasses import dataclass

STAGES = ("source", "adapt")
PHASES = ("source", "warmup", "self_training")


@dataclass(frozen=True)
class AdaptSchedule:
    """``source``: DG-Net on the labelled source, one phase. ``adapt``: ``warmup_epochs`` of domain-adversarial
    alignment, then self-training on pseudo-labels refreshed every ``refresh_every`` epochs, with the
    appearance-encoder rate multiplied by ``app_lr_ramp``."""

    stage: str = "adapt"
    warmup_epochs: int = 0
    refresh_every: int = 2
    app_lr_ramp: float = 1.0

    def phase(self, epoch: int) -> str:
        """``"source"``, ``"warmup"`` or ``"self_training"``: what epoch ``epoch`` of this stage trains."""
        if self.stage == "source":
            return "source"
        return "warmup" if epoch < self.warmup_epochs else "self_training"

    def phase_index(self, epoch: int) -> int:
        """The phase as a number for logging (index into :data:`PHASES`)."""
        return PHASES.index(self.phase(epoch))

    def uses_pseudo_labels(self, epoch: int) -> bool:
        """Whether the target id terms train on pseudo-labels in ``epoch`` (self-training)."""
        return self.phase(epoch) == "self_training"

    def refresh_due(self, epoch: int) -> bool:
        """Whether pseudo-labels must be (re)computed before ``epoch`` trains: the first self-training epoch,
        then every ``refresh_every`` epochs."""
        return self.uses_pseudo_labels(epoch) and (epoch - self.warmup_epochs) % self.refresh_every == 0

    def app_lr_scale(self, epoch: int) -> float:
        """Multiplier of the appearance-encoder's configured rates in ``epoch``: ``app_lr_ramp`` in self-training
        (the official lr2 ramp), else 1."""
        return self.app_lr_ramp if self.uses_pseudo_labels(epoch) else 1.0
