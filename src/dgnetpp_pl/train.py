"""Training entry point: build the datamodule, the schedule, the module, the callbacks, the loggers and the trainer
from the typed config, fit, test, and return the optimised metric for sweepers. ``python -m dgnetpp_pl`` and
``dgnetpp-train`` call :func:`main`.

Wiring of one stage (every object receives its typed config section; data flows one way)::

    PseudoLabelStore ──► CrossDomainDataModule (its train sampler reads the labels)
          ▲                        │ batches
          │ labels                 ▼
    PseudoLabelCallback ◄── DGNetPP (features; set_target_classes is its one surgery method)
          both ask AdaptSchedule: phase(epoch), refresh_due(epoch), app_lr_scale(epoch)
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
from dgnetpp_pl.callbacks.pseudo_label import PseudoLabelCallback
from dgnetpp_pl.checkpoints import AtomicCheckpointIO, load_checkpoint, read_result, resolve_resume
from dgnetpp_pl.cli import run_app
from dgnetpp_pl.config import ConfigError, RootConfig, plain, validate_config
from dgnetpp_pl.data.datamodule import CrossDomainDataModule
from dgnetpp_pl.instantiate import instantiate_group
from dgnetpp_pl.label_store import PseudoLabelStore
from dgnetpp_pl.module import DGNetPP
from dgnetpp_pl.report import log_summary, write_sweep_summary
from dgnetpp_pl.run_log import info_on_rank_zero
from dgnetpp_pl.schedule import AdaptSchedule
from dgnetpp_pl.signals import CheckpointOnSigterm

STAGE_LABELS = {"source": "direct transfer (source-only)", "adapt": "DG-Net++ adapted"}

log = logging.getLogger(__name__)


def build_datamodule(cfg: RootConfig, stage: str, labels: PseudoLabelStore | None = None) -> CrossDomainDataModule:
    """The stage's datamodule; in the adapt stage its sampler reads the target pseudo-labels from ``labels``."""
    return CrossDomainDataModule(cfg.data, stage=stage, seed=cfg.seed, labels=labels)


def build_schedule(cfg: RootConfig, stage: str) -> AdaptSchedule:
    """The stage's phases from ``adapt`` and ``pseudo_label.every_n_epochs``."""
    if stage == "source":
        return AdaptSchedule(stage="source")
    return AdaptSchedule(
        stage="adapt",
        warmup_epochs=cfg.adapt.warmup_epochs,
        refresh_every=cfg.pseudo_label.every_n_epochs,
        app_lr_ramp=cfg.adapt.app_lr_ramp,
    )


def target_capacity(cfg: RootConfig, stage: str) -> int:
    """Target rows the joint classifier reserves: k (k-means) or max_clusters (DBSCAN); 0 in the source stage."""
    if stage == "source":
        return 0
    return cfg.pseudo_label.k if cfg.pseudo_label.method == "kmeans" else cfg.pseudo_label.max_clusters


def build_trainer(cfg: RootConfig, stage: str, callbacks: list, loggers: list, stage_dir: Path) -> pl.Trainer:
    kw = {k: v for k, v in plain(cfg.trainer).items() if v is not None}
    max_epochs = cfg.source.max_epochs if stage == "source" else cfg.adapt.max_epochs
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
        plugins=[AtomicCheckpointIO()],  # atomic saves in the checkpoint's own folder, previous last.ckpt kept
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
    for cb in callbacks:
        if isinstance(cb, pl.callbacks.ModelCheckpoint):
            cb.dirpath = str(stage_dir)
    callbacks = with_last_checkpoint_every_epoch(callbacks, stage_dir)
    if labels is not None:
        callbacks.append(PseudoLabelCallback(cfg.pseudo_label, schedule, labels, seed=cfg.seed))
    sigterm = CheckpointOnSigterm(stage_dir)
    return [*callbacks, sigterm], sigterm


def run_stage(cfg: RootConfig, stage: str, init_ckpt: str | None = None) -> dict[str, Any]:
    """Fit (or resume) one stage and evaluate it on the target; returns its metrics and checkpoint path."""
    out_dir = Path(cfg.paths.output_dir)
    stage_dir = out_dir / "checkpoints" / stage
    done_file = stage_dir / "result.json"
    resume = resolve_resume(cfg.ckpt_path, stage_dir) if cfg.ckpt_path else None
    if cfg.ckpt_path and done_file.exists():
        # This stage finished before the interruption: reuse it.
        info_on_rank_zero(log, f"{stage} stage: finished before, reusing its result ({done_file})")
        return read_result(done_file)
    # Every checkpoint is read before any data is touched (the built-in data is generated on first use).
    init_state = load_checkpoint(init_ckpt)["state_dict"] if stage == "adapt" and resume is None else None

    labels = PseudoLabelStore() if stage == "adapt" else None
    dm = build_datamodule(cfg, stage, labels)
    dm.prepare_data()
    dm.setup("fit")
    n_target = len(dm.target_train_records)
    if stage == "adapt" and cfg.pseudo_label.method == "kmeans" and cfg.pseudo_label.k > n_target:
        raise ConfigError(
            f"pseudo_label.k={cfg.pseudo_label.k} is larger than the number of target train images ({n_target}); "
            f"set pseudo_label.k <= {n_target}."
        )
    schedule = build_schedule(cfg, stage)
    model = DGNetPP(
        cfg.model,
        schedule,
        num_source_ids=dm.num_source_ids,
        target_capacity=target_capacity(cfg, stage),
        skip_nonfinite_steps=cfg.skip_nonfinite_steps,
        image_size=(cfg.data.height, cfg.data.width),
    )
    if init_state is not None:
        model.load_source_stage(init_state, keep_source_classifier=cfg.adapt.keep_source_classifier)

    callbacks, sigterm = build_callbacks(cfg, stage_dir, schedule, labels)
    loggers = instantiate_group(cfg.logger, cfg.allowed_targets, "logger")
    trainer = build_trainer(cfg, stage, callbacks, loggers, stage_dir)
    for logger in trainer.loggers:  # the config, with "stage" the stage this logger run records
        logger.log_hyperparams({**plain(cfg), "stage": stage})

    result: dict[str, Any] = {"stage": stage}
    final = stage_dir / "final.ckpt"
    with sigterm.installed():
        if cfg.train:
            trainer.fit(model, datamodule=dm, ckpt_path=resume, weights_only=True)
            val = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
            # A run resumed after its last epoch validates nothing: report the restored metrics.
            result.update(val or model.last_eval)
        if not sigterm.requested:
            trainer.save_checkpoint(final, weights_only=False)  # full state, so a stage can be continued
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
        write_json(done_file, result)
        # Only an unfinished stage resumes from last.ckpt, so its fallback copy is no longer needed.
        previous_path(stage_dir / "last.ckpt").unlink(missing_ok=True)
    return result


def close_loggers(trainer: pl.Trainer) -> None:
    """Finish each logger's run, so the next stage opens its own (W&B would otherwise reuse this one)."""
    for logger in trainer.loggers:
        logger.finalize("success")
        if isinstance(logger, pl.loggers.WandbLogger):
            import wandb

            wandb.finish()


def train(cfg: RootConfig | DictConfig) -> dict[str, Any]:
    """Run the configured stage(s); returns ``{"source": {...}, "adapt": {...}}``."""
    cfg = validate_config(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    results: dict[str, Any] = {}
    init = cfg.init_ckpt
    if init is not None and not Path(init).is_file():
        raise ConfigError(
            f"init_ckpt={init!r} does not exist. Give the path of a source-stage checkpoint "
            "(outputs/.../checkpoints/source/final.ckpt), or leave init_ckpt=null to train the source stage first."
        )
    if cfg.stage == "source" or init is None:
        results["source"] = run_stage(cfg, "source")
        init = results["source"]["ckpt"]
    if cfg.stage == "adapt":
        results["adapt"] = run_stage(cfg, "adapt", init_ckpt=init)
    if rank_zero_only.rank == 0:
        out_dir = Path(cfg.paths.output_dir)
        write_json(out_dir / "metrics.json", results)
        log_summary(results, STAGE_LABELS)
    return results


def optimized_value(cfg: RootConfig, results: dict[str, Any]) -> float | None:
    last = results.get("adapt") or results.get("source") or {}
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
    return run_app("config", train_task)


if __name__ == "__main__":
    main()
