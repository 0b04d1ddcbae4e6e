"""Training entry point: compose data, model, callbacks, loggers and trainer from the config, fit, test, and
return the optimised metric for sweepers. ``python -m dgnetpp_pl`` and ``dgnetpp-train`` call :func:`main`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from dgnetpp_pl.allocator import keep_freed_memory
from dgnetpp_pl.atomic_io import write_json
from dgnetpp_pl.callbacks.pseudo_label import PseudoLabelCallback
from dgnetpp_pl.checkpoints import AtomicCheckpointIO, load_checkpoint, read_result, resolve_resume
from dgnetpp_pl.config import CONF_DIR, ConfigError, validate_config
from dgnetpp_pl.data.datamodule import CrossDomainDataModule
from dgnetpp_pl.instantiate import instantiate_group
from dgnetpp_pl.module import DGNetPP
from dgnetpp_pl.report import print_summary, write_sweep_summary
from dgnetpp_pl.signals import CheckpointOnSigterm
from dgnetpp_pl.startup import before_hydra

STAGE_LABELS = {"source": "direct transfer (source-only)", "adapt": "DG-Net++ adapted"}


def build_datamodule(cfg: DictConfig, stage: str) -> CrossDomainDataModule:
    d = OmegaConf.to_container(cfg.data, resolve=True)
    synthetic = {k: v for k, v in (d.pop("synthetic") or {}).items() if v is not None}
    return CrossDomainDataModule(**d, synthetic=synthetic or None, seed=cfg.seed, stage=stage)


def target_capacity(cfg: DictConfig) -> int:
    pl_cfg = cfg.pseudo_label
    return int(pl_cfg.k) if pl_cfg.method == "kmeans" else int(pl_cfg.max_clusters)


def build_trainer(cfg: DictConfig, stage: str, callbacks: list, loggers: list, stage_dir: Path) -> pl.Trainer:
    kw = OmegaConf.to_container(cfg.trainer, resolve=True)
    kw = {k: v for k, v in kw.items() if v is not None or k in ("limit_train_batches",)}
    for key in ("limit_train_batches", "limit_val_batches", "limit_test_batches", "profiler"):
        if kw.get(key) is None:
            kw.pop(key, None)
    max_epochs = cfg.source.max_epochs if stage == "source" else cfg.adapt.max_epochs
    if not kw.get("enable_progress_bar", True):
        callbacks = [cb for cb in callbacks if not isinstance(cb, pl.callbacks.ProgressBar)]
    return pl.Trainer(
        **kw,
        max_epochs=max_epochs,
        callbacks=callbacks,
        logger=loggers or False,
        default_root_dir=str(stage_dir.parent.parent),
        # Pseudo-labels change between epochs: rebuild the train loader so workers see them.
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


def run_stage(cfg: DictConfig, stage: str, init_ckpt: str | None = None) -> dict[str, Any]:
    """Fit (or resume) one stage and evaluate it on the target; returns its metrics and checkpoint path."""
    out_dir = Path(cfg.paths.output_dir)
    stage_dir = out_dir / "checkpoints" / stage
    done_file = stage_dir / "result.json"
    resume = resolve_resume(cfg.ckpt_path, stage_dir) if cfg.ckpt_path else None
    if cfg.ckpt_path and done_file.exists():
        # This stage finished before the interruption: reuse it.
        return read_result(done_file)

    dm = build_datamodule(cfg, stage)
    dm.prepare_data()
    dm.setup("fit")
    capacity = target_capacity(cfg) if stage == "adapt" else 0
    n_target = len(dm.target_train_records)
    if stage == "adapt" and cfg.pseudo_label.method == "kmeans" and cfg.pseudo_label.k > n_target:
        raise ConfigError(
            f"pseudo_label.k={cfg.pseudo_label.k} is larger than the number of target train images ({n_target}); "
            f"set pseudo_label.k <= {n_target}."
        )
    model = DGNetPP(
        model=OmegaConf.to_container(cfg.model, resolve=True),
        stage=stage,
        num_source_ids=dm.num_source_ids,
        target_capacity=capacity,
        warmup_epochs=cfg.adapt.warmup_epochs,
        app_lr_ramp=cfg.adapt.app_lr_ramp,
        num_query=dm.num_query,
        skip_nonfinite_steps=cfg.skip_nonfinite_steps,
        image_size=(cfg.data.height, cfg.data.width),
    )
    if stage == "adapt" and resume is None:
        state = load_checkpoint(init_ckpt)["state_dict"]
        model.load_source_stage(state, keep_source_classifier=cfg.adapt.keep_source_classifier)

    allowed = list(cfg.allowed_targets)
    callbacks = instantiate_group(cfg.callbacks, allowed, "callbacks")
    for cb in callbacks:
        if isinstance(cb, pl.callbacks.ModelCheckpoint):
            cb.dirpath = str(stage_dir)
    callbacks = with_last_checkpoint_every_epoch(callbacks, stage_dir)
    if stage == "adapt":
        plc = OmegaConf.to_container(cfg.pseudo_label, resolve=True)
        callbacks.append(
            PseudoLabelCallback(
                **plc, warmup_epochs=cfg.adapt.warmup_epochs, seed=cfg.seed, alpha=cfg.model.features.alpha
            )
        )
    sigterm = CheckpointOnSigterm(stage_dir)
    callbacks.append(sigterm)
    loggers = instantiate_group(cfg.logger, allowed, "logger")
    trainer = build_trainer(cfg, stage, callbacks, loggers, stage_dir)
    for logger in trainer.loggers:
        logger.log_hyperparams({"stage": stage, **OmegaConf.to_container(cfg, resolve=True)})

    result: dict[str, Any] = {"stage": stage}
    final = stage_dir / "final.ckpt"
    with sigterm.installed():
        if cfg.train:
            trainer.fit(model, datamodule=dm, ckpt_path=resume, weights_only=True)
            val = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
            # A run resumed after its last epoch validates nothing: report the restored metrics.
            result.update(val or getattr(model, "last_eval", {}))
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
    return result


def close_loggers(trainer: pl.Trainer) -> None:
    """Finish each logger's run, so the next stage opens its own (W&B would otherwise reuse this one)."""
    for logger in trainer.loggers:
        logger.finalize("success")
        if isinstance(logger, pl.loggers.WandbLogger):
            import wandb

            wandb.finish()


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run the configured stage(s); returns ``{"source": {...}, "adapt": {...}}``."""
    cfg = validate_config(cfg)
    if cfg.keep_freed_memory:
        keep_freed_memory()
    pl.seed_everything(cfg.seed, workers=True)
    if cfg.trainer.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
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
    if int(os.environ.get("LOCAL_RANK", "0")) == 0 and os.environ.get("NODE_RANK", "0") == "0":
        out_dir = Path(cfg.paths.output_dir)
        write_json(out_dir / "metrics.json", results)
        print_summary(results, STAGE_LABELS)
    return results


def optimized_value(cfg: DictConfig, results: dict[str, Any]) -> float | None:
    last = results.get("adapt") or results.get("source") or {}
    value = last.get(cfg.optimized_metric)
    return None if value is None else float(value)


@before_hydra(CONF_DIR, "config")  # _target_ check and run-folder lock, before Hydra starts
@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns the optimised metric so sweepers can use it."""
    results = train(cfg)
    write_sweep_summary(cfg, results)
    return optimized_value(cfg, results)


if __name__ == "__main__":
    main()
