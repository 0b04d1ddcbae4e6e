"""The adaptation schedule: the stage, the phase of each epoch, when pseudo-labels are due, whether the teacher terms
apply, the appearance-encoder learning-rate scale, and which batch types each epoch draws (``pairing``) and which of
them it skips. Pure (no Lightning): the module, the pseudo-label callback and the trainer wiring all ask it, so that
a new stage, phase or per-epoch setting is added here once.

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
# cross: every adapt batch pairs a source half with a target half (ab). official: type-homogeneous batches of
# source-source (aa), target-target (bb) and cross-domain pairs, as the official code's mixed loaders.
PAIRINGS = ("cross", "official")
BATCH_TYPES = ("aa", "ab", "bb")


@dataclass(frozen=True)
class AdaptSchedule:
    """Stage ``teacher``: the source-trained re-ID baseline, one phase. ``source``: DG-Net on the labelled source,
    one phase. ``adapt``: ``warmup_epochs`` of domain-adversarial alignment, then self-training on pseudo-labels
    refreshed every ``refresh_every`` epochs, with the appearance-encoder rate multiplied by ``app_lr_ramp``.
    ``with_teacher``: the stage trains with the teacher terms (``model.loss.teacher_w > 0``) in the epochs of
    :data:`TEACHER_PHASES`. ``pairing`` picks the adapt stage's batch types; with ``aa_drop`` the official mix draws
    its aa batches in self-training but trains on none of them."""

    stage: str = "adapt"
    warmup_epochs: int = 0
    refresh_every: int = 2
    app_lr_ramp: float = 1.0
    with_teacher: bool = False
    pairing: str = "cross"
    aa_drop: bool = True

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

    def batch_types(self, epoch: int) -> tuple[str, ...]:
        """The batch types ``epoch`` draws: ``("aa",)`` in the teacher and source stages (source images only),
        ``("ab",)`` with ``pairing="cross"``, ``("aa", "ab", "bb")`` with ``"official"`` (its ba batches arrive as
        ab)."""
        if self.stage in ("teacher", "source"):
            return ("aa",)
        return BATCH_TYPES if self.pairing == "official" else ("ab",)

    def skips(self, batch_type: str, epoch: int) -> bool:
        """Whether ``epoch`` draws batches of ``batch_type`` but trains on none of them (the official ``aa_drop``:
        aa in self-training). A skipped batch loads no image and runs no network; it still counts as an
        iteration, so the learning-rate schedulers step on it as the official iteration counter does."""
        return (
            batch_type == "aa"
            and self.aa_drop
            and self.uses_pseudo_labels(epoch)
            and batch_type in self.batch_types(epoch)
        )
