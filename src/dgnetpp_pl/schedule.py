"""The adaptation schedule: the stage, the phase of each epoch, when pseudo-labels are due and the appearance-encoder
learning-rate scale. Pure (no Lightning): the module, the pseudo-label callback and the trainer wiring all ask it,
so that a new stage, phase or per-epoch setting (e.g. a teacher stage) is added here once. It also says which batch
types each epoch draws (``pairing``) and which of them it skips.

Epochs are Lightning's (``trainer.current_epoch``), counted from 0 within a stage.
"""

from __future__ import annotations

from dataclasses import dataclass

STAGES = ("source", "adapt")
PHASES = ("source", "warmup", "self_training")
# cross: every adapt batch pairs a source half with a target half (ab). official: type-homogeneous batches of
# source-source (aa), target-target (bb) and cross-domain pairs, as the official code's mixed loaders.
PAIRINGS = ("cross", "official")
BATCH_TYPES = ("aa", "ab", "bb")


@dataclass(frozen=True)
class AdaptSchedule:
    """``source``: DG-Net on the labelled source, one phase. ``adapt``: ``warmup_epochs`` of domain-adversarial
    alignment, then self-training on pseudo-labels refreshed every ``refresh_every`` epochs, with the
    appearance-encoder rate multiplied by ``app_lr_ramp``. ``pairing`` picks the adapt stage's batch types;
    with ``aa_drop`` the official mix draws its aa batches in self-training but trains on none of them."""

    stage: str = "adapt"
    warmup_epochs: int = 0
    refresh_every: int = 2
    app_lr_ramp: float = 1.0
    pairing: str = "cross"
    aa_drop: bool = True

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

    def batch_types(self, epoch: int) -> tuple[str, ...]:
        """The batch types ``epoch`` draws: ``("aa",)`` in the source stage (both halves source), ``("ab",)`` with
        ``pairing="cross"``, ``("aa", "ab", "bb")`` with ``"official"`` (its ba batches arrive as ab)."""
        if self.stage == "source":
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
