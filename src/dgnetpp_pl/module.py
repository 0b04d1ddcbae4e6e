"""DGNetPP: the LightningModule. Manual optimisation alternates one discriminator step and one
generator/encoder step per batch; the tensor math lives in :mod:`dgnetpp_pl.objective`, the phases in
:mod:`dgnetpp_pl.schedule`, the networks, optimisers and classifier surgery in their own modules.

Stages: ``source`` trains DG-Net on the labelled source with one generator; ``adapt`` trains DG-Net++ with one
generator per domain, a warm-up with domain-adversarial alignment, then self-training on pseudo-labels. With a
teacher attached (:meth:`DGNetPP.attach_teacher`), the epochs the schedule names also train the appearance encoder
on generated images against it. The teacher is frozen and outside the module's state dict: checkpoints record
which file it came from (path and SHA-256), not its weights.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor

from dgnetpp_pl import objective
from dgnetpp_pl.checkpoints import capture_rng_state, restore_rng_state
from dgnetpp_pl.classifier import adapt_state_from_source, clear_row_momentum, init_target_rows
from dgnetpp_pl.config import ModelConfig, coerce, plain
from dgnetpp_pl.evaluation import EvaluationHooks, ReIDEvaluator
from dgnetpp_pl.features import embed_images
from dgnetpp_pl.models.generator import Generator
from dgnetpp_pl.models.teacher import Teacher
from dgnetpp_pl.networks import build_networks
from dgnetpp_pl.optim import build_optimizers, optimizer_names
from dgnetpp_pl.run_log import warning_on_rank_zero
from dgnetpp_pl.schedule import AdaptSchedule

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or Inf; the message names the term, the step and the phase."""


class DGNetPP(EvaluationHooks, pl.LightningModule):
    """DG-Net (``schedule.stage == "source"``) and DG-Net++ (``"adapt"``) with manual optimisation; validation
    and test come from :class:`EvaluationHooks`.

    ``model`` is the typed ``model`` config (or its plain dict, as a checkpoint stores it); ``target_capacity``
    is the number of target classes the joint classifier reserves (k for k-means, ``max_clusters`` for DBSCAN).
    """

    def __init__(
        self,
        model: ModelConfig | Mapping[str, Any],
        schedule: AdaptSchedule | Mapping[str, Any] | None = None,
        num_source_ids: int = 1,
        target_capacity: int = 0,
        skip_nonfinite_steps: int = 0,
        image_size: tuple[int, int] = (256, 128),
    ) -> None:
        super().__init__()
        self.cfg = coerce(ModelConfig, model, "model")
        self.schedule = coerce(AdaptSchedule, schedule if schedule is not None else {}, "schedule")
        self.stage = self.schedule.stage
        if self.stage not in ("source", "adapt"):
            raise ValueError(
                f"DGNetPP trains the source and adapt stages, not {self.stage!r} (the teacher stage is TeacherModule)."
            )
        self.num_source_ids = num_source_ids
        self.target_capacity = target_capacity if self.stage == "adapt" else 0
        # Plain values only, so checkpoints load with weights_only=True; load_from_checkpoint passes them back.
        self.save_hyperparameters(
            {
                "model": plain(self.cfg),
                "schedule": plain(self.schedule),
                "num_source_ids": num_source_ids,
                "target_capacity": self.target_capacity,
                "skip_nonfinite_steps": skip_nonfinite_steps,
                "image_size": tuple(image_size),
            }
        )
        self.automatic_optimization = False
        self.e_app, self.gen_a, self.gen_b, self.d_img, self.d_dom = build_networks(
            self.cfg, self.stage, num_source_ids + self.target_capacity
        )
        # Not a registered submodule: outside state_dict(), parameters() and train(); _apply moves it along.
        self._teacher: Teacher | None = None
        self.teacher_reference: dict[str, str] | None = None
        if self.cfg.channels_last:
            self.to(memory_format=torch.channels_last)
        # Number of target clusters in use (0 until the first pseudo-labels); saved with the weights.
        self.register_buffer("num_target_classes", torch.zeros((), dtype=torch.long))
        self.register_buffer("best_map", torch.full((), -1.0))
        self.register_buffer("nonfinite_steps", torch.zeros((), dtype=torch.long))
        # The appearance-encoder LR multiplier applied so far (the schedule's ramp); saved in the checkpoint.
        self.app_lr_scale = 1.0
        self.evaluator = ReIDEvaluator(all_gather=self.all_gather)
        self.last_eval: dict[str, float] = {}

    # ------------------------------------------------------------------ teacher
    @property
    def teacher(self) -> Teacher | None:
        """The frozen teacher (eval mode) of the teacher terms, or None."""
        return self._teacher

    def attach_teacher(self, teacher: Teacher, reference: dict[str, str] | None = None) -> None:
        """Use ``teacher`` (frozen, in eval mode: running BatchNorm statistics, no dropout) for the teacher terms;
        ``reference`` (``{"path", "sha256"}`` of its file) is recorded in this module's checkpoints."""
        if teacher.num_classes != self.num_source_ids:
            where = f" ({reference['path']})" if reference else ""
            raise ValueError(
                f"The teacher{where} scores {teacher.num_classes} identities but the source has {self.num_source_ids}; "
                "use a teacher trained on this source (stage=teacher), or leave teacher_ckpt unset to train one."
            )
        teacher.eval().requires_grad_(False)
        param = next(self.parameters())
        # object.__setattr__: nn.Module's would register it as a submodule.
        object.__setattr__(self, "_teacher", teacher.to(device=param.device, dtype=param.dtype))
        self.teacher_reference = dict(reference) if reference else None

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> DGNetPP:
        super()._apply(fn, recurse)
        if self._teacher is not None:
            self._teacher._apply(fn, recurse)
        return self

    @property
    def phase(self) -> str:
        return self.schedule.phase(self.current_epoch)

    @property
    def gen_b_or_a(self) -> Generator:
        return self.gen_b if self.gen_b is not None else self.gen_a

    # ------------------------------------------------------------ optimisers
    def configure_optimizers(self):
        return build_optimizers(self, self.cfg.optim, self.stage)

    def _named_optimizers(self) -> dict[str, Any]:
        opts = self.optimizers()
        return dict(zip(optimizer_names(self.stage), opts if isinstance(opts, list) else [opts]))

    def on_train_epoch_start(self) -> None:
        # Rescale the appearance-encoder rates when the schedule's scale changes (the x60 ramp at self-training).
        target = self.schedule.app_lr_scale(self.current_epoch)
        if target != self.app_lr_scale:
            factor = target / self.app_lr_scale
            for group in self._named_optimizers()["e_app"].param_groups:
                group["lr"] *= factor
            self.app_lr_scale = target

    # --------------------------------------------------------- classifier surgery
    @torch.no_grad()
    def set_target_classes(self, num_clusters: int, centroids: Tensor | None = None) -> None:
        """Start a round of ``num_clusters`` pseudo-labels: re-initialise the target rows of both classifiers (from
        ``centroids`` ``(num_clusters, D)`` feature means where given) and clear their momentum. The parameter
        shapes never change, so optimiser state stays attached."""
        touched = init_target_rows(self.e_app, self.num_source_ids, self.target_capacity, num_clusters, centroids)
        if self._trainer is not None:
            clear_row_momentum(self._named_optimizers()["e_app"], touched, self.num_source_ids)
        self.num_target_classes.fill_(num_clusters)

    def load_source_stage(self, state_dict: dict[str, Tensor], keep_source_classifier: bool = True) -> None:
        """Initialise the adapt stage from a source-stage state dict (both generators from the source generator)."""
        self.load_state_dict(adapt_state_from_source(self.state_dict(), state_dict, keep_source_classifier), False)

    # ------------------------------------------------------------- training
    def _pair_from_batch(self, batch: dict[str, dict[str, Tensor]]) -> tuple[objective.PairBatch, objective.StepFlags]:
        n_target = int(self.num_target_classes)
        teacher = self.schedule.teacher_active(self.current_epoch)
        if teacher and self._teacher is None:
            raise RuntimeError(
                f"The {self.stage} stage trains with the teacher terms (model.loss.teacher_w > 0) but no teacher is "
                "attached; train.py attaches teacher_ckpt or the teacher stage's checkpoint (DGNetPP.attach_teacher)."
            )
        return objective.pair_from_batch(batch, self.phase, self.num_source_ids, n_target, self.cfg.loss, teacher)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if "skip" in batch:  # drawn but not trained (the official aa_drop): no network runs, no parameter moves
            self._step_schedulers()
            self._log_counts(batch["skip"], skipped=True)
            return
        w = self.cfg.loss
        pair, flags = self._pair_from_batch(batch)
        gen_a, gen_b = objective.generators_for(flags.batch_type, self.gen_a, self.gen_b_or_a)
        fwd = objective.forward_pair(
            self.e_app, gen_a, gen_b, pair, flags, erasing_p=w.erasing_p,
            structure_detach_p=w.structure_detach_p, bn_groups=self.cfg.appearance.bn_groups,
            teacher=self._teacher,
        )  # fmt: skip
        d_losses = self.discriminator_step(fwd, pair, flags)
        if d_losses is None:
            return
        g_losses = self.generator_step(fwd, pair, flags)
        if g_losses is None:
            return
        self._step_schedulers()
        self._log_step(fwd, pair, flags, {**d_losses, **g_losses})

    def _step_schedulers(self) -> None:
        scheds = self.lr_schedulers()
        with warnings.catch_warnings():
            # Every scheduler counts iterations, also those where its optimiser did not step (a skipped aa batch,
            # gen_b on aa): torch's warning about that order does not apply to iteration-counted milestones.
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
            for sched in scheds if isinstance(scheds, list) else [scheds]:
                sched.step()

    def discriminator_step(
        self, fwd: objective.Forward, pair: objective.PairBatch, flags: objective.StepFlags
    ) -> dict[str, Tensor] | None:
        """D_img (and, in warm-up, D_dom) on detached fakes and features; returns the terms, None if skipped."""
        w, opts = self.cfg.loss, self._named_optimizers()
        losses = objective.image_d_loss(self.d_img, fwd, pair, gan_w=w.gan, r1_w=w.r1)
        total, d_opts = losses["d_img_total"], [opts["d_img"]]
        if flags.steps_d_dom:
            losses["d_dom"] = objective.domain_d_loss(
                self.d_dom, fwd, weight=w.domain_adv, reduction=w.domain_reduction, batch_type=flags.batch_type
            )
            total = total + losses["d_dom"]
            d_opts.append(opts["d_dom"])
        for opt in d_opts:
            opt.zero_grad(set_to_none=True)
        if not self._check_finite(losses, "discriminator"):
            return None
        self.manual_backward(total)
        for opt in d_opts:
            opt.step()
        return losses

    def generator_step(
        self, fwd: objective.Forward, pair: objective.PairBatch, flags: objective.StepFlags
    ) -> dict[str, Tensor] | None:
        """E_app and the batch type's generators on the shared forward (aa: gen_a, bb: gen_b, ab: both, as the
        official ``gen_update_*``); the discriminators are frozen inside."""
        opts = self._named_optimizers()
        losses = objective.generator_losses(fwd, pair, flags, self.d_img, self.d_dom, self.cfg.loss)
        names = {"aa": ["gen_a", "e_app"], "ab": ["gen_a", "e_app", "gen_b"], "bb": ["e_app", "gen_b"]}
        g_opts = [opts[n] for n in names[flags.batch_type] if n in opts]
        for opt in g_opts:
            opt.zero_grad(set_to_none=True)
        if not self._check_finite(losses, "generator"):
            return None
        self.manual_backward(losses["g_total"])
        clip = self.cfg.optim.grad_clip
        for opt in g_opts:
            if clip:
                self.clip_gradients(opt, gradient_clip_val=clip, gradient_clip_algorithm="norm")
            opt.step()
        return losses

    def _log_step(
        self, fwd: objective.Forward, pair: objective.PairBatch, flags: objective.StepFlags, terms: dict[str, Tensor]
    ) -> None:
        bsz = pair.x_a.shape[0]
        logs = {f"train/{k}": v.detach() for k, v in terms.items() if k != "g_total"}
        if len(self.schedule.batch_types(self.current_epoch)) > 1:  # the mix: each type's terms apart, too
            logs.update({f"train/{flags.batch_type}/{k}": v.detach() for k, v in terms.items()})
        # Accuracy of each labelled half, named after its domain (the first half of aa counts as the source's).
        domains = {"aa": ("source", "source"), "ab": ("source", "target"), "bb": ("target", "target")}
        for half, domain in zip(("a", "b"), domains[flags.batch_type], strict=True):
            if f"id1_{half}" in fwd.tensors and f"train/acc_{domain}" not in logs:
                logs[f"train/acc_{domain}"] = objective.accuracy(fwd.tensors[f"id1_{half}"], getattr(pair, f"l_{half}"))
        for name, opt in self._named_optimizers().items():
            logs[f"train/lr_{name}"] = opt.param_groups[0]["lr"]
        logs["train/phase"] = float(self.schedule.phase_index(self.current_epoch))
        self.log_dict(logs, batch_size=bsz)
        self.log("train/g_total", terms["g_total"].detach(), prog_bar=True, batch_size=bsz)
        self._log_counts(flags.batch_type, skipped=False)

    def _log_counts(self, batch_type: str, skipped: bool) -> None:
        """This epoch's batches of each type the epoch draws (summed over the epoch): ``train/batches_<type>``
        counts trained batches, ``train/batches_aa_skipped`` the aa batches drawn but skipped."""
        epoch = self.current_epoch
        counts = {
            f"train/batches_{t}": float(t == batch_type and not skipped) for t in self.schedule.batch_types(epoch)
        }
        if self.schedule.skips("aa", epoch):
            counts["train/batches_aa_skipped"] = float(skipped and batch_type == "aa")
        self.log_dict(counts, on_step=False, on_epoch=True, reduce_fx="sum", batch_size=1)

    def _check_finite(self, terms: dict[str, Tensor], step: str) -> bool:
        bad = [k for k, v in terms.items() if not bool(torch.isfinite(v.detach()).all())]
        if not bad:
            return True
        limit = int(self.hparams.skip_nonfinite_steps)
        self.nonfinite_steps += 1
        msg = (
            f"Non-finite loss in the {step} step: {', '.join(bad)} at global step {self.global_step} "
            f"(epoch {self.current_epoch}, phase {self.phase})."
        )
        if int(self.nonfinite_steps) <= limit:
            warning_on_rank_zero(log, f"{msg} Skipping it ({int(self.nonfinite_steps)}/{limit} tolerated).")
            self.log("train/skipped_nonfinite", self.nonfinite_steps.float())
            return False
        raise NonFiniteLossError(
            msg + " The last good checkpoint is kept; lower the learning rates, try fp32, or set "
            "skip_nonfinite_steps=N to tolerate a few bad steps."
        )

    # ------------------------------------------------------- features, generation
    def embed(self, images: Tensor) -> Tensor:
        """Re-ID features ``(B, D)`` of images ``(B, 3, H, W)`` as ``model.features`` asks (eval mode assumed)."""
        return embed_images(self.e_app, images, self.cfg.features.alpha, self.cfg.features.flip)

    @torch.no_grad()
    def swap(self, structure_images: Tensor, appearance_images: Tensor, decoder: str = "a") -> Tensor:
        """Images with the structure of ``structure_images`` and the appearance of ``appearance_images``."""
        gen = self.gen_a if decoder == "a" else self.gen_b_or_a
        code, _ = self.e_app.backbone_forward(appearance_images)
        return gen.decode(gen.encode(structure_images), code)

    # ----------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["dgnetpp"] = {"stage": self.stage, "phase": self.phase, "app_lr_scale": self.app_lr_scale}
        if self.teacher_reference is not None:  # which teacher file trained this state (its weights are not saved)
            checkpoint["dgnetpp"]["teacher"] = dict(self.teacher_reference)
        # The last validation's metrics, so a run resumed after its last epoch still reports them.
        checkpoint["dgnetpp"]["val_metrics"] = {k: v for k, v in self.last_eval.items() if k.startswith("val/")}
        # Lightning does not save the global RNGs; random erasing and the structure-detach coin draw from them.
        checkpoint["rng_states"] = capture_rng_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("dgnetpp", {})
        self.last_eval = dict(state.get("val_metrics", {}))
        self.app_lr_scale = float(state.get("app_lr_scale", 1.0))
        # Only when resuming a fit: loading weights for inference must not reseed the caller's RNGs. Every
        # rank gets rank 0's states, which equal its own since all ranks draw the same amounts from one seed.
        fitting = self._trainer is not None and self.trainer.state.fn == "fit"
        if fitting and "rng_states" in checkpoint:
            restore_rng_state(checkpoint["rng_states"])
