"""Resume checks what it resumes. Every checkpoint and stage result of a run stores the run's resolved config (under
:data:`RUN_CONFIG_KEY`); a resume compares it with the current config key by key and stops, before anything is
written, with a table of the differences, unless each one is a key that may change and ``resume_override`` names it.

- The invocation's own keys (:data:`NOT_COMPARED`: ``ckpt_path``, ``train``, ``paths``, ...) are never compared,
  nor a stage's keys of the other stage (:data:`OTHER_STAGE_KEYS`), nor paths inside the run folder (so a moved run
  folder resumes).
- :data:`MAY_CHANGE` keys (rates, loss weights, epochs, logging, resources, data roots) may differ when
  ``resume_override`` names them or a section above them. A changed rate is applied to the restored optimisers by
  :class:`ApplyResumedRates`.
- Every other key must match; :data:`MUST_MATCH` says why, and ``resume_override`` may not name it.

A checkpoint's hyper-parameters are checked against the model built for the resume as well (:func:`check_model`),
so data that changed on disk (another number of identities) is a table too, not a ``size mismatch``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_warn

from dgnetpp_pl.checkpoints import RUN_CONFIG_KEY, STAGE_ORDER, CheckpointError, load_checkpoint, read_result
from dgnetpp_pl.config import ConfigError, RootConfig, plain, validate_config
from dgnetpp_pl.optim import optimizer_names

# The invocation's keys, not the run's: what to do now (resume, train, test), where files go, process settings.
NOT_COMPARED = (
    "ckpt_path",
    "resume_override",
    "train",
    "test",
    "stage",
    "task_name",
    "paths",
    "keep_freed_memory",
    "allowed_targets",
)
# Keys a stage never reads: its result cannot depend on them.
# The teacher file a stage trains with is checked by its SHA-256 instead (teacher_checkpoint.check_teacher_reference).
OTHER_STAGE_KEYS = {
    "teacher": ("source", "adapt", "pseudo_label", "model.optim", "model.loss", "init_ckpt", "teacher_ckpt"),
    "source": ("adapt", "pseudo_label", "model.optim.adapt", "init_ckpt", "teacher", "teacher_ckpt"),
    "adapt": ("source", "model.optim.source", "teacher", "teacher_ckpt"),
}
# Keys (or sections) that resume_override may name. None changes a shape, the data read, the random streams or the
# state a checkpoint restores in a way that would not take effect.
MAY_CHANGE = (
    "model.optim.source",  # the rates, applied to the restored optimisers
    "model.optim.adapt",
    "model.optim.head_lr_mult",
    "model.optim.grad_clip",
    "model.loss",
    "model.features",
    "model.appearance.checkpoint",  # recomputation and fused kernels: the same results, other memory and speed
    "model.structure.checkpoint",
    "model.decoder.checkpoint",
    "model.decoder.fused",
    "model.channels_last",
    "pseudo_label.niter",  # clustering settings, read at each refresh
    "pseudo_label.init_classifier",
    "pseudo_label.eps",
    "pseudo_label.min_samples",
    "pseudo_label.k1",
    "pseudo_label.k2",
    "pseudo_label.lambda_",
    "teacher.max_epochs",
    "source.max_epochs",
    "adapt.max_epochs",
    "trainer.accelerator",
    "trainer.deterministic",
    "trainer.benchmark",
    "trainer.max_steps",
    "trainer.check_val_every_n_epoch",
    "trainer.limit_val_batches",
    "trainer.limit_test_batches",
    "trainer.num_sanity_val_steps",
    "trainer.log_every_n_steps",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.profiler",
    "logger",
    "callbacks",
    "data.num_workers",
    "data.test_batch_size",
    "data.verify",
    "data.data_dir",  # the same datasets in another place (their names and sizes must match)
    "data.source.root",
    "data.target.root",
    "skip_nonfinite_steps",
    "optimized_metric",
)
# Why a key must match (the longest prefix that applies); anything not listed gets DEFAULT_REASON.
MUST_MATCH = (
    ("model", "the networks' architecture and sizes, which the checkpoint's weights have"),
    ("model.pretrained", "the weights the run started from"),
    ("model.optim", "restored from the checkpoint's optimiser and scheduler state, so a new value would not apply"),
    ("model.appearance.joint_call", "the BatchNorm statistics the encoder was trained with"),
    ("data", "the data the run trains on (datasets, identities, splits)"),
    ("data.height", "the image size the networks were trained at"),
    ("data.width", "the image size the networks were trained at"),
    ("data.batch_size", "the batches the run draws and the sampler position it resumes at"),
    ("data.pad", "the augmentation of the batches the run draws"),
    ("seed", "the random streams the run draws"),
    ("data.synthetic.seed", "the built-in data the run trains on"),
    ("pseudo_label", "the target classifier's size and the pseudo-labels the checkpoint holds"),
    ("pseudo_label.every_n_epochs", "the adaptation schedule the trained epochs followed"),
    ("adapt", "the adaptation schedule the trained epochs followed"),
    ("init_ckpt", "the weights the adapt stage started from"),
    ("trainer", "the devices, precision or steps per epoch, which shape the batches and the restored loop state"),
)
DEFAULT_REASON = "not known to be safe to change in a resumed run"
# Sections whose keys are names a user chooses (entries may be added or removed).
FREE_SECTIONS = ("logger", "callbacks")


class ResumeMismatch(ConfigError):
    """The current config differs from the one a checkpoint or stage result was written with; the message holds the
    table of differences (key, checkpoint value, current value, verdict) and what to do."""

    def __init__(self, message: str, differences: Sequence[Difference]) -> None:
        super().__init__(message)
        self.differences = list(differences)


class _Absent:
    def __repr__(self) -> str:
        return "(absent)"


ABSENT = _Absent()


@dataclass(frozen=True)
class Difference:
    """One key whose value differs: ``allowed`` (named in resume_override), ``needs_override`` (may change, not
    named) or ``refused`` (must match); ``reason`` says why for the last."""

    key: str
    stored: Any
    current: Any
    verdict: str
    reason: str = ""


def _under(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith(prefix + ".")


def _under_any(key: str, prefixes: Sequence[str]) -> bool:
    return any(_under(key, p) for p in prefixes)


def reason_to_match(key: str) -> str:
    """Why ``key`` must match the checkpoint's value."""
    matches = [(len(p), why) for p, why in MUST_MATCH if _under(key, p)]
    return max(matches)[1] if matches else DEFAULT_REASON


def _normal(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_normal(v) for v in value]
    return value


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys of a nested config dict and their leaf values (lists and tuples as lists, empty dicts as leaves)."""
    out: dict[str, Any] = {}
    for name, value in tree.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, key))
        else:
            out[key] = _normal(value)
    return out


def _run_relative(flat: dict[str, Any], run_dir: Any) -> dict[str, Any]:
    # Paths inside a config's own run folder (checkpoint and log folders) compare equal after the folder moved.
    if not isinstance(run_dir, str) or not run_dir:
        return flat
    root = run_dir.rstrip(os.sep)

    def rel(value: Any) -> Any:
        if isinstance(value, str) and (value == root or value.startswith(root + os.sep)):
            return "<run folder>" + value[len(root) :]
        return value

    return {k: rel(v) for k, v in flat.items()}


def _comparable(config: Mapping[str, Any], stage: str) -> dict[str, Any]:
    flat = _run_relative(flatten(config), config.get("paths", {}).get("output_dir"))
    skipped = (*NOT_COMPARED, *OTHER_STAGE_KEYS.get(stage, ()))
    return {k: v for k, v in flat.items() if not _under_any(k, skipped)}


def check_override_keys(override: Sequence[str], config: Mapping[str, Any]) -> None:
    """``resume_override`` entries must be keys (or sections) of ``config`` that :data:`MAY_CHANGE` allows; a
    :class:`ConfigError` names the first that is not, with the reason."""
    keys = flatten(config)
    for entry in override:
        entry = str(entry).strip()
        if _under_any(entry, NOT_COMPARED):
            raise ConfigError(
                f"resume_override names '{entry}', which a resume never compares (it belongs to this invocation); "
                "remove it from resume_override."
            )
        known = any(_under(k, entry) for k in keys) or _under_any(entry, FREE_SECTIONS)
        if not known:
            raise ConfigError(
                f"resume_override names '{entry}', which is no key or section of the config; give dotted keys, "
                "e.g. resume_override=[model.optim.adapt.lr_app]."
            )
        if not _under_any(entry, MAY_CHANGE):
            inside = sorted(p for p in MAY_CHANGE if _under(p, entry))
            hint = f" Name the keys that may change instead: {', '.join(inside)}." if inside else ""
            raise ConfigError(
                f"resume_override may not name '{entry}': it must match the checkpoint ({reason_to_match(entry)})."
                f"{hint} To change it, start a fresh run (leave ckpt_path unset)."
            )


def compare_configs(
    stored: Mapping[str, Any], current: Mapping[str, Any], stage: str, override: Sequence[str] = ()
) -> list[Difference]:
    """Every key of ``stage`` whose value differs between the ``stored`` and ``current`` plain configs, with its
    verdict (see :class:`Difference`); keys and sections in ``override`` are allowed where :data:`MAY_CHANGE` is."""
    old, new = _comparable(stored, stage), _comparable(current, stage)
    out = []
    for key in sorted(old.keys() | new.keys()):
        a, b = old.get(key, ABSENT), new.get(key, ABSENT)
        if a is not ABSENT and b is not ABSENT and a == b:
            continue
        if not _under_any(key, MAY_CHANGE):
            out.append(Difference(key, a, b, "refused", reason_to_match(key)))
        elif _under_any(key, override):
            out.append(Difference(key, a, b, "allowed"))
        else:
            out.append(Difference(key, a, b, "needs_override"))
    return out


def _show(value: Any, width: int = 40) -> str:
    if isinstance(value, str):
        text = value or "''"
    else:
        text = repr(value)  # floats as Python writes them (1e-05), lists, None, (absent)
    return text if len(text) <= width else text[: width - 3] + "..."


def difference_table(differences: Sequence[Difference]) -> str:
    """The differences as an aligned text table: key, checkpoint value, current value, verdict."""
    verdicts = {
        "allowed": "allowed by resume_override",
        "needs_override": "may change: add it to resume_override",
    }
    rows = [("key", "checkpoint", "current", "")]
    for d in differences:
        verdict = verdicts.get(d.verdict) or f"must match: {d.reason}"
        rows.append((d.key, _show(d.stored), _show(d.current), verdict))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[3] for r in rows)
    return "\n".join(line.rstrip() for line in lines)


def mismatch(differences: Sequence[Difference], source: Path | str, what: str) -> ResumeMismatch:
    """The error for ``differences`` found against ``source`` (a checkpoint or result file); ``what`` says what
    the run was about to do with it."""
    refused = [d for d in differences if d.verdict == "refused"]
    fixable = [d.key for d in differences if d.verdict == "needs_override"]
    steps = ["run with the checkpoint's values (the original command's overrides)"]
    if fixable and not refused:
        steps.insert(0, f"add resume_override=[{','.join(fixable)}] if the change is intended")
    steps.append("or start a fresh run in a new folder (leave ckpt_path unset)")
    return ResumeMismatch(
        f"The config differs from the one {source} was written with, so the run cannot {what}. Nothing was "
        f"written.\n{difference_table(differences)}\nWhat to do: " + "; ".join(steps) + ". Keys marked 'must match' "
        "cannot be changed in a resumed run; resume_override=[...] allows the others (see the README, Reliability).",
        differences,
    )


def check_stored_config(
    stored: Mapping[str, Any] | None, cfg: RootConfig, stage: str, source: Path | str, what: str
) -> list[Difference]:
    """Compare the config ``source`` stored with ``cfg`` for ``stage``; raise :class:`ResumeMismatch` unless every
    difference is allowed. Returns the allowed differences (each reported); a source without a stored config
    (written before configs were stored) is reported and not checked."""
    if stored is None:
        rank_zero_warn(f"{source} holds no stored run config (an older checkpoint): the config is not checked.")
        return []
    differences = compare_configs(stored, plain(cfg), stage, cfg.resume_override)
    if any(d.verdict != "allowed" for d in differences):
        raise mismatch(differences, source, what)
    for d in differences:
        rank_zero_info(f"resume_override: {d.key} = {_show(d.current)} (the checkpoint has {_show(d.stored)}).")
    return differences


def with_run_config(result: Mapping[str, Any], cfg: RootConfig) -> dict[str, Any]:
    """A stage result to write as ``result.json``, with the run's config stored beside the metrics."""
    return {**result, RUN_CONFIG_KEY: plain(cfg)}


def finished_result(done_file: Path, cfg: RootConfig, stage: str) -> dict[str, Any]:
    """A finished stage's stored result (without its stored config), reported only when ``cfg`` agrees with the
    config the stage ran with; else :class:`ResumeMismatch`."""
    result = read_result(done_file)
    stored = result.pop(RUN_CONFIG_KEY, None)
    check_stored_config(stored, cfg, stage, done_file, "report this finished stage's result")
    return result


@dataclass(frozen=True)
class ResumeSource:
    """A checked resume checkpoint: its path and hyper-parameters (for :func:`check_model`)."""

    path: Path
    hyper_parameters: dict[str, Any]


def check_checkpoint(path: str | Path, cfg: RootConfig, stage: str) -> ResumeSource:
    """Check the config stored in the checkpoint ``path`` against ``cfg`` (:func:`check_stored_config`)."""
    path = Path(path)
    ckpt = load_checkpoint(path, mmap=True)
    check_stored_config(ckpt.get(RUN_CONFIG_KEY), cfg, stage, path, "resume from it")
    return ResumeSource(path, dict(ckpt.get("hyper_parameters", {})))


# Hyper-parameters that fix the shapes of a checkpoint's state, and what they come from.
SHAPE_HPARAMS = {
    "num_source_ids": "the number of source identities in the data (rows of the classifier); the source data "
    "on disk is not what the checkpoint was trained on",
    "target_capacity": "the target rows of the classifier (pseudo_label.k, or max_clusters with DBSCAN)",
    "image_size": "the image size (data.height, data.width) the networks were trained at",
    "schedule.stage": "the stage the checkpoint belongs to",
}
SHAPE_SECTIONS = ("model.appearance", "model.structure", "model.decoder", "model.image_dis", "model.domain_dis")


def check_model(hyper_parameters: Mapping[str, Any], model_hparams: Mapping[str, Any], source: Path | str) -> None:
    """Before loading a checkpoint's weights into a model: its shape-setting hyper-parameters (identities,
    classifier rows, image size, stage, network sizes) must equal the model's; else :class:`ResumeMismatch`."""
    old, new = flatten(hyper_parameters), flatten(dict(model_hparams))
    keys = [k for k in SHAPE_HPARAMS if k in old or k in new]
    sized = (k for k in old.keys() | new.keys() if _under_any(k, SHAPE_SECTIONS) and not _under_any(k, MAY_CHANGE))
    keys += sorted(sized)
    differences = []
    for key in keys:
        a, b = old.get(key, ABSENT), new.get(key, ABSENT)
        if a != b:
            differences.append(Difference(key, a, b, "refused", SHAPE_HPARAMS.get(key) or reason_to_match(key)))
    if differences:
        raise mismatch(differences, source, "load its weights")


# ------------------------------------------------------------------------------------------ before Hydra starts
def _readable_config(path: Path) -> Mapping[str, Any] | None:
    try:
        if path.name == "result.json":
            return read_result(path).get(RUN_CONFIG_KEY)
        return load_checkpoint(path, mmap=True).get(RUN_CONFIG_KEY)
    except CheckpointError:
        return None  # the run itself reports a damaged file


def check_before_start(cfg: DictConfig, run_dir: Path) -> None:
    """The command line's check before Hydra writes into the run folder (``.hydra/``, the log): with ``ckpt_path``
    set, each stage of ``run_dir`` that the run would reuse (``result.json``) or resume (the checkpoint
    ``ckpt_path`` names, or ``last.ckpt`` / ``last.prev.ckpt``) must have been written with an agreeing config.
    Raises :class:`ResumeMismatch`; anything else wrong is left to the run, which reports it."""
    ckpt_path = OmegaConf.select(cfg, "ckpt_path", default=None)
    stages = Path(run_dir) / "checkpoints"
    if ckpt_path is None or not OmegaConf.select(cfg, "train", default=True) or not stages.is_dir():
        return  # train=false only reads a checkpoint: its weights are checked when they are loaded
    task = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    task.paths.output_dir = str(Path(run_dir).absolute())
    try:
        typed = validate_config(task)
    except (ConfigError, ValueError):
        return
    explicit = Path(ckpt_path).absolute() if ckpt_path != "last" else None
    order = {name: i for i, name in enumerate(STAGE_ORDER)}  # in the order the run goes through them
    for stage_dir in sorted((p for p in stages.iterdir() if p.is_dir()), key=lambda p: (order.get(p.name, 99), p.name)):
        done = stage_dir / "result.json"
        if done.is_file():
            candidates = [done]
        elif explicit is not None:
            candidates = [explicit] if explicit.parent == stage_dir.absolute() else []
        else:
            candidates = [p for p in (stage_dir / "last.ckpt", stage_dir / "last.prev.ckpt") if p.is_file()]
        for path in candidates:
            stored = _readable_config(path)
            if stored is not None:
                what = "report this finished stage's result" if path == done else "resume from it"
                check_stored_config(stored, typed, stage_dir.name, path, what)
                break


# ------------------------------------------------------------------------------------ rates of a resumed run
class ApplyResumedRates(pl.Callback):
    """After Lightning restored the optimisers and schedulers of a resumed run, set every parameter group whose
    configured base rate changed (allowed by ``resume_override``) to the new base rate times the factor the schedule
    had reached (the appearance-encoder ramp, the scheduler's decay), and the schedulers' ``base_lrs`` to the new
    base rates. Groups whose rate did not change are left untouched."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        fresh = pl_module.configure_optimizers()  # built from the current config: its rates are the new bases
        fresh_opts = fresh[0] if isinstance(fresh, tuple) else fresh
        fresh_opts = fresh_opts if isinstance(fresh_opts, list | tuple) else [fresh_opts]
        # Lightning's dict form {"optimizer": ..., "lr_scheduler": ...} (the teacher stage), alone or in a list.
        fresh_opts = [o["optimizer"] if isinstance(o, Mapping) else o for o in fresh_opts]
        schedulers = [c.scheduler for c in trainer.lr_scheduler_configs]
        if len(fresh_opts) != len(trainer.optimizers) or len(schedulers) != len(trainer.optimizers):
            return
        for index, (opt, sched, new) in enumerate(zip(trainer.optimizers, schedulers, fresh_opts)):
            for g, (group, new_group) in enumerate(zip(opt.param_groups, new.param_groups)):
                old_base, new_base = sched.base_lrs[g], new_group["lr"]
                if old_base == new_base:
                    continue
                factor = group["lr"] / old_base if old_base else _schedule_factor(sched, pl_module, index)
                group["lr"] = new_base * factor
                group["initial_lr"] = new_base
                sched.base_lrs[g] = new_base
                sched._last_lr = [pg["lr"] for pg in opt.param_groups]
                rank_zero_info(
                    f"resume_override: optimiser {index} group {g} base rate {old_base:g} -> {new_base:g}; it trains "
                    f"at {group['lr']:g} (x{factor:g}, the schedule's current factor)."
                )


def _schedule_factor(sched: Any, pl_module: pl.LightningModule, index: int) -> float:
    # A base rate of 0 gives no ratio: the MultiStepLR decay reached, times the ramp for the appearance encoder.
    milestones = dict(getattr(sched, "milestones", {}))
    factor = float(getattr(sched, "gamma", 1.0)) ** sum(n for step, n in milestones.items() if step <= sched.last_epoch)
    names = optimizer_names(getattr(pl_module, "stage", ""))
    if index < len(names) and names[index] == "e_app":
        factor *= float(getattr(pl_module, "app_lr_scale", 1.0))
    return factor
