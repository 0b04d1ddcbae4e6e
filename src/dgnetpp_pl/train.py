"""Training entry point: build the datamodule, the schedule, the module, the callbacks, the loggers and the trainer
from the typed config, fit, test, and return the optimised metric for sweepers. ``python -m dgnetpp_pl`` and
``dgnetpp-train`` call :func:`main`.

Stages run in the order teacher -> source -> adapt, each only when the asked ``stage`` needs it and no checkpoint
of it is given: the teacher when ``model.loss.teacher_w > 0`` (unless ``teacher_ckpt=``), the source stage for
adaptation (unless ``init_ckpt=``). The teacher stage draws from its own seeded RNG streams, so the stages after it
start from the same random state with or without it.

Wiring of one stage (every object receives its typed config section; data flows one way)::

    PseudoLabelStore ──► CrossDomainDataModule (its train sampler reads the labels)
          ▲                        │ batches
          │ labels                 ▼
    PseudoLabelCallback ◄── DGNetPP (features; set_target_classes is its one surgery method)
          all ask AdaptSchedule: phase(epoch), refresh_due(epoch), app_lr_scale(epoch),
          batch_types(epoch) and skips(type, epoch) (the datamodule's sampler and the module)
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from dgnetpp_pl.allocator import keep_freed_memory
from dgnetpp_pl.atomic_io import previous_path, write_json
from dgnetpp_pl.callbacks.image_grid import SwapGridCallback
from dgnetpp_pl.callbacks.pseudo_label import PseudoLabelCallback
from dgnetpp_pl.checkpoints import (
    AtomicCheckpointIO,
    load_checkpoint,
    own_rng,
    resolve_eval_checkpoint,
    resolve_resume,
)
from dgnetpp_pl.cli import run_app
from dgnetpp_pl.config import ConfigError, RootConfig, plain, validate_config
from dgnetpp_pl.data.datamodule import CrossDomainDataModule
from dgnetpp_pl.instantiate import instantiate_group
from dgnetpp_pl.label_store import PseudoLabelStore
from dgnetpp_pl.module import DGNetPP
from dgnetpp_pl.report import log_summary, write_sweep_summary
from dgnetpp_pl.resume_check import (
    ApplyResumedRates,
    check_before_start,
    check_checkpoint,
    check_model,
    finished_result,
    with_run_config,
)
from dgnetpp_pl.run_log import info_on_rank_zero
from dgnetpp_pl.schedule import TEACHER_PHASES, AdaptSchedule
from dgnetpp_pl.signals import CheckpointOnSigterm
from dgnetpp_pl.teacher_checkpoint import check_teacher_reference, load_teacher, save_teacher, teacher_reference
from dgnetpp_pl.teacher_module import TeacherModule

STAGE_LABELS = {
    "teacher": "teacher (re-ID baseline, direct transfer)",
    "source": "direct transfer (source-only)",
    "adapt": "DG-Net++ adapted",
}

log = logging.getLogger(__name__)


def build_datamodule(
    cfg: RootConfig, stage: str, labels: PseudoLabelStore | None = None, schedule: AdaptSchedule | None = None
) -> CrossDomainDataModule:
    """The stage's datamodule; in the adapt stage its sampler reads the target pseudo-labels from ``labels`` and
    the batch types each epoch draws from ``schedule`` (default: :func:`build_schedule`)."""
    schedule = schedule if schedule is not None else build_schedule(cfg, stage)
    teacher = cfg.teacher if stage == "teacher" else None
    return CrossDomainDataModule(
        cfg.data, stage=stage, seed=cfg.seed, labels=labels, schedule=schedule, teacher=teacher
    )


def uses_teacher(cfg: RootConfig, stage: str) -> bool:
    """Whether ``stage`` trains with the teacher terms: ``model.loss.teacher_w > 0`` and the stage has epochs in
    a phase of :data:`TEACHER_PHASES` (the source stage; the adapt stage's warm-up)."""
    if cfg.model.loss.teacher_w == 0 or stage == "teacher":
        return False
    schedule = build_schedule(cfg, stage)
    max_epochs = cfg.source.max_epochs if stage == "source" else cfg.adapt.max_epochs
    return any(schedule.phase(epoch) in TEACHER_PHASES for epoch in range(max_epochs))


def build_schedule(cfg: RootConfig, stage: str, with_teacher: bool = False) -> AdaptSchedule:
    """The stage's phases from ``adapt`` and ``pseudo_label.every_n_epochs``, its batch types from ``data.pairing``;
    ``with_teacher``: its teacher terms."""
    if stage in ("teacher", "source"):
        return AdaptSchedule(stage=stage, with_teacher=with_teacher, pairing=cfg.data.pairing)
    return AdaptSchedule(
        stage="adapt",
        warmup_epochs=cfg.adapt.warmup_epochs,
        refresh_every=cfg.pseudo_label.every_n_epochs,
        app_lr_ramp=cfg.adapt.app_lr_ramp,
        with_teacher=with_teacher,
        pairing=cfg.data.pairing,
        aa_drop=cfg.adapt.aa_drop,
    )


def target_capacity(cfg: RootConfig, stage: str) -> int:
    """Target rows the joint classifier reserves: k (k-means) or max_clusters (DBSCAN); 0 in the source stage."""
    if stage == "source":
        return 0
    return cfg.pseudo_label.k if cfg.pseudo_label.method == "kmeans" else cfg.pseudo_label.max_clusters


def build_trainer(cfg: RootConfig, stage: str, callbacks: list, loggers: list, stage_dir: Path) -> pl.Trainer:
    kw = {k: v for k, v in plain(cfg.trainer).items() if v is not None}
    max_epochs = {"teacher": cfg.teacher.max_epochs, "source": cfg.source.max_epochs, "adapt": cfg.adapt.max_epochs}
    max_epochs = max_epochs[stage]
    if not kw.get("enable_progress_bar", True):
        callbacks = [cb for cb in callbacks if not isinstance(cb, pl.callbacks.ProgressBar)]
    return pl.Trainer(
        **kw,
        max_epochs=max_epochs,
        callbacks=callbacks,
        logger=loggers or False,
        default_root_dir=str(stage_dir.parent.parent),
        # The epoch length follows the pseudo-labels with data.drop_target_outliers (see data/datamodule.py).
        reload_dataloaders_every_n_epochs=1,
        use_distributed_sampler=True,
        # Atomic saves in the checkpoint's own folder, previous last.ckpt kept; each holds the run's config.
        plugins=[AtomicCheckpointIO(run_config=plain(cfg))],
    )


def with_last_checkpoint_every_epoch(callbacks: list, stage_dir: Path) -> list:
    """Make ``last.ckpt`` (what ``ckpt_path=last`` resumes from) the state at the end of the newest epoch.

    Since Lightning 2.6, ``ModelCheckpoint(save_last=True)`` writes it only when a top-k checkpoint is saved in the
    same step, i.e. when the monitored metric improved, so a resume could go back several epochs. A dedicated
    checkpoint (after the others, so their state is current) takes over for every callback that asks for it.
    """
    wanted = [cb for cb in callbacks if isinstance(cb, pl.callbacks.ModelCheckpoint) and cb.save_last]
    if not wanted:
        return callbacks
    for cb in wanted:
        cb.save_last = False
    # At the train epoch end, after the pseudo-label refresh, so the file holds the next epoch's labels.
    last = pl.callbacks.ModelCheckpoint(
        dirpath=str(stage_dir),
        filename="last",
        monitor=None,
        save_top_k=1,
        save_on_train_epoch_end=True,
        enable_version_counter=False,
    )
    return [*callbacks, last]


def build_callbacks(
    cfg: RootConfig, stage_dir: Path, schedule: AdaptSchedule, labels: PseudoLabelStore | None
) -> tuple[list[pl.Callback], CheckpointOnSigterm]:
    """The configured callbacks (checkpoints into ``stage_dir``), the pseudo-label refresh in the adapt stage, and
    the SIGTERM handler (returned apart too, since the run installs it)."""
    callbacks = instantiate_group(cfg.callbacks, cfg.allowed_targets, "callbacks")
    if schedule.stage == "teacher":  # no generator to draw swaps with
        callbacks = [cb for cb in callbacks if not isinstance(cb, SwapGridCallback)]
    for cb in callbacks:
        if isinstance(cb, pl.callbacks.ModelCheckpoint):
            cb.dirpath = str(stage_dir)
    callbacks = with_last_checkpoint_every_epoch(callbacks, stage_dir)
    if labels is not None:
        callbacks.append(PseudoLabelCallback(cfg.pseudo_label, schedule, labels, seed=cfg.seed))
    sigterm = CheckpointOnSigterm(stage_dir)
    return [*callbacks, sigterm], sigterm


def build_module(
    cfg: RootConfig, stage: str, num_source_ids: int, schedule: AdaptSchedule | None = None
) -> TeacherModule | DGNetPP:
    """The stage's LightningModule, untrained, sized for ``num_source_ids`` source identities and the target
    capacity; ``schedule`` defaults to the stage's without teacher terms."""
    if stage == "teacher":
        return TeacherModule(cfg.teacher, num_source_ids, cfg.model.pretrained, cfg.model.features.flip)
    return DGNetPP(
        cfg.model,
        schedule or build_schedule(cfg, stage),
        num_source_ids=num_source_ids,
        target_capacity=target_capacity(cfg, stage),
        skip_nonfinite_steps=cfg.skip_nonfinite_steps,
        image_size=(cfg.data.height, cfg.data.width),
    )


def build_stage_model(
    cfg: RootConfig,
    stage: str,
    dm: CrossDomainDataModule,
    schedule: AdaptSchedule,
    resume: str | None,
    init_state: dict[str, Any] | None = None,
    teacher_ckpt: str | None = None,
) -> TeacherModule | DGNetPP:
    """The stage's module: the teacher stage's, or DG-Net(++) started from ``init_state`` (the source-stage
    checkpoint's state dict: adapt, unless resumed)
    with the teacher of ``teacher_ckpt`` attached when its schedule trains with one. A resumed checkpoint must have
    been trained with the same teacher file content (or none)."""
    model = build_module(cfg, stage, dm.num_source_ids, schedule)
    if stage == "teacher":
        return model
    if init_state is not None:
        model.load_source_stage(init_state, keep_source_classifier=cfg.adapt.keep_source_classifier)
    if schedule.with_teacher:
        if teacher_ckpt is None:
            raise ConfigError(f"The {stage} stage trains with the teacher terms but no teacher checkpoint was given.")
        reference = teacher_reference(teacher_ckpt)
        try:
            model.attach_teacher(load_teacher(teacher_ckpt), reference)
        except ValueError as err:
            raise ConfigError(f"teacher_ckpt={teacher_ckpt}: {err}") from None
    if resume is not None:
        recorded = load_checkpoint(resume, mmap=True).get("dgnetpp", {}).get("teacher")
        check_teacher_reference(recorded, model.teacher_reference, resume)
    return model


def save_final(trainer: pl.Trainer, model: TeacherModule | DGNetPP, path: Path) -> None:
    """The stage's result file: the teacher alone (:func:`save_teacher`), or the full state so that a DG-Net(++)
    stage can be continued."""
    if isinstance(model, TeacherModule):
        if trainer.is_global_zero:
            save_teacher(model.teacher, path, origin="stage=teacher")
        trainer.strategy.barrier("teacher saved")
        return
    trainer.save_checkpoint(path, weights_only=False)


def run_stage(
    cfg: RootConfig, stage: str, init_ckpt: str | None = None, teacher_ckpt: str | None = None
) -> dict[str, Any]:
    """Fit (or resume) one stage and evaluate it on the target; returns its metrics and checkpoint path."""
    out_dir = Path(cfg.paths.output_dir)
    stage_dir = out_dir / "checkpoints" / stage
    done_file = stage_dir / "result.json"
    resume = resolve_resume(cfg.ckpt_path, stage_dir) if cfg.ckpt_path else None
    if cfg.ckpt_path and done_file.exists():
        # This stage finished before the interruption: reuse it, if the config agrees with the one it ran with.
        info_on_rank_zero(log, f"{stage} stage: finished before, reusing its result ({done_file})")
        return finished_result(done_file, cfg, stage)
    resumed = check_checkpoint(resume, cfg, stage) if resume else None  # before anything is written
    # Every checkpoint is read before any data is touched (the built-in data is generated on first use).
    init_state = load_checkpoint(init_ckpt)["state_dict"] if stage == "adapt" and resume is None else None

    labels = PseudoLabelStore() if stage == "adapt" else None
    schedule = build_schedule(cfg, stage, with_teacher=uses_teacher(cfg, stage))
    dm = build_datamodule(cfg, stage, labels, schedule)
    dm.prepare_data()
    dm.setup("fit")
    n_target = len(dm.target_train_records)
    if stage == "adapt" and cfg.pseudo_label.method == "kmeans" and cfg.pseudo_label.k > n_target:
        raise ConfigError(
            f"pseudo_label.k={cfg.pseudo_label.k} is larger than the number of target train images ({n_target}); "
            f"set pseudo_label.k <= {n_target}."
        )
    model = build_stage_model(cfg, stage, dm, schedule, resume, init_state, teacher_ckpt)
    if resumed is not None:  # the data on disk may differ from the checkpoint's (e.g. its number of identities)
        check_model(resumed.hyper_parameters, model.hparams, resumed.path)

    callbacks, sigterm = build_callbacks(cfg, stage_dir, schedule, labels)
    if resumed is not None:  # rates that resume_override let change, applied to the restored optimisers
        callbacks.insert(0, ApplyResumedRates())
    loggers = instantiate_group(cfg.logger, cfg.allowed_targets, "logger")
    trainer = build_trainer(cfg, stage, callbacks, loggers, stage_dir)
    for logger in trainer.loggers:  # the config, with "stage" the stage this logger run records
        logger.log_hyperparams({**plain(cfg), "stage": stage})

    result: dict[str, Any] = {"stage": stage}
    final = stage_dir / "final.ckpt"
    with sigterm.installed():
        trainer.fit(model, datamodule=dm, ckpt_path=resume, weights_only=True)
        val = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        # A run resumed after its last epoch validates nothing: report the restored metrics.
        result.update(val or model.last_eval)
        if not sigterm.requested:
            save_final(trainer, model, final)
        if cfg.test and not sigterm.requested:
            tested = trainer.test(model, datamodule=dm, verbose=False)
            result.update({k: float(v) for k, v in (tested[0] if tested else {}).items()})
    close_loggers(trainer)
    if sigterm.requested:  # the stage is unfinished: no final.ckpt / result.json, so ckpt_path=last resumes it
        sigterm.exit()
    result["ckpt"] = str(final)
    result["output_dir"] = str(out_dir)
    result["swap_grids"] = str(out_dir / "swap_grids")
    if trainer.is_global_zero:
        stage_dir.mkdir(parents=True, exist_ok=True)
        write_json(done_file, with_run_config(result, cfg))
        # Only an unfinished stage resumes from last.ckpt, so its fallback copy is no longer needed.
        previous_path(stage_dir / "last.ckpt").unlink(missing_ok=True)
    return result


def evaluate_stage(cfg: RootConfig) -> dict[str, Any]:
    """``train=false``: the target test metrics of a checkpoint of ``cfg.stage`` (``ckpt_path``; ``last``: this
    run's newest), or with ``stage=adapt`` and no ``ckpt_path`` of the model the adapt stage starts from
    (``init_ckpt``). Trains and saves nothing; writes ``eval_metrics.json``. Returns ``{stage: {...}}``."""
    stage, out_dir = cfg.stage, Path(cfg.paths.output_dir)
    ckpt_path = resolve_eval_checkpoint(cfg.ckpt_path, out_dir / "checkpoints" / stage) if cfg.ckpt_path else None
    dm = build_datamodule(cfg, stage, PseudoLabelStore() if stage == "adapt" else None)
    dm.prepare_data()
    dm.setup("test")
    model = build_module(cfg, stage, dm.num_source_ids)
    if ckpt_path is None and stage != "adapt":
        raise ConfigError(f"train=false stage={stage} evaluates a checkpoint: give ckpt_path=<file> or ckpt_path=last.")
    ckpt = load_checkpoint(ckpt_path) if ckpt_path is not None else None
    if isinstance(model, TeacherModule) and ckpt.get("dgnetpp", {}).get("stage") == "teacher":
        teacher = load_teacher(ckpt_path)  # a teacher stage's final.ckpt, or a converted official teacher
        if teacher.num_classes != dm.num_source_ids:
            raise ConfigError(
                f"ckpt_path={ckpt_path}: the teacher scores {teacher.num_classes} source ids, the source dataset has "
                f"{dm.num_source_ids}; evaluate it with the data.source it was trained on."
            )
        model.teacher = teacher
    elif ckpt is not None:
        check_model(ckpt.get("hyper_parameters", {}), model.hparams, ckpt_path)
        model.load_state_dict(ckpt["state_dict"])
    else:
        state = load_checkpoint(cfg.init_ckpt)["state_dict"]
        model.load_source_stage(state, keep_source_classifier=cfg.adapt.keep_source_classifier)
    trainer = build_trainer(cfg, stage, [], [], out_dir / "checkpoints" / stage)
    tested = trainer.test(model, datamodule=dm, verbose=False)
    result: dict[str, Any] = {"stage": stage, **{k: float(v) for k, v in (tested[0] if tested else {}).items()}}
    result["ckpt"] = str(ckpt_path if ckpt_path is not None else cfg.init_ckpt)
    results = {stage: result}
    if rank_zero_only.rank == 0:
        write_json(out_dir / "eval_metrics.json", results)
        log_summary(results, STAGE_LABELS)
    return results


def close_loggers(trainer: pl.Trainer) -> None:
    """Finish each logger's run, so the next stage opens its own (W&B would otherwise reuse this one)."""
    for logger in trainer.loggers:
        logger.finalize("success")
        if isinstance(logger, pl.loggers.WandbLogger):
            import wandb

            wandb.finish()


def stages_to_run(cfg: RootConfig) -> list[str]:
    """The stages ``cfg.stage`` runs, in order: the asked one and those it needs whose checkpoints are not given."""
    if cfg.stage == "teacher":
        return ["teacher"]
    stages = ["source"] if cfg.stage == "source" or cfg.init_ckpt is None else []
    stages += ["adapt"] if cfg.stage == "adapt" else []
    if cfg.teacher_ckpt is None and any(uses_teacher(cfg, s) for s in stages):
        stages.insert(0, "teacher")
    return stages


def train(cfg: RootConfig | DictConfig) -> dict[str, Any]:
    """Run the configured stage(s); returns ``{"teacher": {...}, "source": {...}, "adapt": {...}}`` (those run). With
    ``train=false``, evaluate a checkpoint of ``cfg.stage`` instead (:func:`evaluate_stage`)."""
    cfg = validate_config(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    if not cfg.train:
        return evaluate_stage(cfg)
    results: dict[str, Any] = {}
    init, teacher = cfg.init_ckpt, cfg.teacher_ckpt
    if init is not None and not Path(init).is_file():
        raise ConfigError(
            f"init_ckpt={init!r} does not exist. Give the path of a source-stage checkpoint "
            "(outputs/.../checkpoints/source/final.ckpt), or leave init_ckpt=null to train the source stage first."
        )
    if teacher is not None and not Path(teacher).is_file():
        raise ConfigError(
            f"teacher_ckpt={teacher!r} does not exist. Give the path of a teacher checkpoint "
            "(outputs/.../checkpoints/teacher/final.ckpt, or an official net_last.pth converted with "
            "`python -m dgnetpp_pl.convert kind=teacher`), or leave teacher_ckpt=null to train the teacher stage first."
        )
    stages = stages_to_run(cfg)
    if "teacher" in stages:
        with own_rng(cfg.seed):
            results["teacher"] = run_stage(cfg, "teacher")
        teacher = results["teacher"]["ckpt"]
    if "source" in stages:
        results["source"] = run_stage(cfg, "source", teacher_ckpt=teacher)
        init = results["source"]["ckpt"]
    if "adapt" in stages:
        results["adapt"] = run_stage(cfg, "adapt", init_ckpt=init, teacher_ckpt=teacher)
    if rank_zero_only.rank == 0:
        out_dir = Path(cfg.paths.output_dir)
        write_json(out_dir / "metrics.json", results)
        log_summary(results, STAGE_LABELS)
    return results


def optimized_value(cfg: RootConfig, results: dict[str, Any]) -> float | None:
    last = results.get("adapt") or results.get("source") or results.get("teacher") or {}
    value = last.get(cfg.optimized_metric)
    return None if value is None else float(value)


def check_optimized_metric(cfg: RootConfig) -> None:
    """A sweeper that optimises the returned metric (one with a ``direction``, e.g. Optuna) must get a value:
    ``val/*`` exists only with a held-out split (``data.val_split > 0``)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return
    hc = HydraConfig.get()
    optimises = hc.mode == RunMode.MULTIRUN and "direction" in (hc.sweeper or {})
    if optimises and cfg.optimized_metric.startswith("val/") and cfg.data.val_split == 0:
        raise ConfigError(
            f"optimized_metric={cfg.optimized_metric} needs a held-out validation split, but data.val_split=0 "
            "(tuning on the target test split is refused). Set data.val_split>0 (hparams_search=optuna sets 0.2)."
        )


def train_task(cfg: DictConfig) -> float | None:
    """The Hydra task: the process-wide allocator setting, training, the sweep summary; returns the metric."""
    typed = validate_config(cfg)
    check_optimized_metric(typed)
    if typed.keep_freed_memory:
        keep_freed_memory()
    results = train(typed)
    write_sweep_summary(cfg, results)
    return optimized_value(typed, results)


def main() -> float | None:
    """``python -m dgnetpp_pl`` / ``dgnetpp-train``: Hydra overrides on the command line."""
    return run_app("config", train_task, precheck=check_before_start)


if __name__ == "__main__":
    main()
