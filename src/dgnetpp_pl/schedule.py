"""The adaptation schedule: the stage, the phase of each epoch, when pseudo-labels are due, whether the teacher terms
apply and the appearance-encoder learning-rate scale. Pure (no Lightning): the module, the pseudo-label callback and
the trainer wiring all ask it, so that a new stage, phase or per-epoch setting (e.g. a mix of batch types) is added
here once.

Epochs are Lightning's (``trainer.current_epoch``), counted from 0 within a stage.
"""

from __future__ import annotations

from dataclasses import dataclass

# The stages in the order a full run trains them: the teacher (a re-ID baseline on the source, only when the teacher
# terms are on), DG-Net on the source, DG-Net++.
STAGES = ("teacher", "source", "adapt")
# Logged as train/phase by index; "teacher" is last so that the other phases keep their numbers.
PHASES = ("source", "warmup", "self_training", "teacher")
# The phases in which generated images are classified by the live encoder against the teacher (the official DG-Net
# source training and DG-Net++ round 0; the official code drops the teacher from the first self-training round).
TEACHER_PHASES = ("source", "warmup")


@dataclass(frozen=True)
class AdaptSchedule:
    """Stage ``teacher``: the source-trained re-ID baseline, one phase. ``source``: DG-Net on the labelled source,
    one phase. ``adapt``: ``warmup_epochs`` of domain-adversarial alignment, then self-training on pseudo-labels
    refreshed every ``refresh_every`` epochs, with the appearance-encoder rate multiplied by ``app_lr_ramp``.
    ``with_teacher``: the stage trains with the teacher terms (``model.loss.teacher_w > 0``) in the epochs of
    :data:`TEACHER_PHASES`."""

    stage: str = "adapt"
    warmup_epochs: int = 0
    refresh_every: int = 2
    app_lr_ramp: float = 1.0
    with_teacher: bool = False

    def phase(self, epoch: int) -> str:
        """``"source"``, ``"warmup"``, ``"self_training"`` or ``"teacher"``: what epoch ``epoch`` of this stage
        trains."""
        if self.stage in ("teacher", "source"):
            return self.stage
        return "warmup" if epoch < self.warmup_epochs else "self_training"

    def phase_index(self, epoch: int) -> int:
        """The phase as a number for logging (index into :data:`PHASES`)."""
        return PHASES.index(self.phase(epoch))

    def teacher_active(self, epoch: int) -> bool:
        """Whether generated images train the appearance encoder against the teacher in ``epoch`` (the teacher KL and
        the fine-grained term on generated images)."""
        return self.with_teacher and self.phase(epoch) in TEACHER_PHASES

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
