"""Evaluate a checkpoint on a target test set: ``python -m dgnetpp_pl.evaluate ckpt_path=... data=market1501``.

Logs R1/R5/R10/mAP/mINP (console and ``evaluate.log``) without and (``rerank=true``) with k-reciprocal
re-ranking, writes ``metrics.json`` in the output folder, and with ``vis=true`` writes a rank-list picture and logs
it to the configured logger. Only the target domain is read (or generated, for the built-in data); the checkpoint
is checked first.

Images are resized to the checkpoint's image size (``hyper_parameters.image_size``). A ``data.height`` or
``data.width`` given on the command line that differs from it is an error naming both sizes, unless
``force_image_size=true``, which evaluates at the config's size with a warning.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from rich.table import Table

from dgnetpp_pl.atomic_io import write_json
from dgnetpp_pl.cli import run_app
from dgnetpp_pl.config import ConfigError, EvaluateConfig, coerce
from dgnetpp_pl.data.datamodule import eval_loader
from dgnetpp_pl.data.domains import build_domain
from dgnetpp_pl.evaluation import extract_features
from dgnetpp_pl.image_logging import log_image
from dgnetpp_pl.inference import load_model, pick_device
from dgnetpp_pl.instantiate import instantiate_group
from dgnetpp_pl.run_log import rendered
from dgnetpp_pl.visualize import rank_list_image, save_rank_list

log = logging.getLogger(__name__)


def command_line_keys() -> set[str]:
    """The keys that the command line's overrides set (``data.height=64`` -> ``data.height``); empty outside Hydra."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return set()
    return {text.split("=", 1)[0].lstrip("+~") for text in HydraConfig.get().overrides.task}


def evaluation_image_size(cfg: EvaluateConfig, trained: Sequence[int], given: Collection[str]) -> tuple[int, int]:
    """``(height, width)`` to evaluate at: the checkpoint's ``trained`` size, unless ``force_image_size`` (the
    config's, with a warning). A ``data.height``/``data.width`` among the ``given`` keys that differs from it is a
    :class:`ConfigError` naming both sizes."""
    trained = (int(trained[0]), int(trained[1]))
    asked = (cfg.data.height, cfg.data.width)
    if asked == trained:
        return trained
    size = f"{asked[0]}x{asked[1]}"
    own = f"the checkpoint {cfg.ckpt_path} was trained at {trained[0]}x{trained[1]} (height x width)"
    if cfg.force_image_size:
        warnings.warn(
            f"force_image_size=true: evaluating at {size} (data.height x data.width), but {own}; the metrics are "
            "not those of the model at its own size.",
            stacklevel=2,
        )
        return asked
    named = [key for key, a, t in zip(("data.height", "data.width"), asked, trained) if key in given and a != t]
    if named:
        raise ConfigError(
            f"{' and '.join(named)} ask for {size} images, but {own}. Leave data.height / data.width unset to "
            f"evaluate at the checkpoint's size, or add force_image_size=true to evaluate at {size} anyway."
        )
    log.info(f"Evaluating at the checkpoint's image size {trained[0]}x{trained[1]} (not the data config's {size}).")
    return trained


def evaluate(cfg: EvaluateConfig | DictConfig, given: Collection[str] | None = None) -> dict[str, Any]:
    """Features, metrics (and re-ranked metrics), optional rank-list picture; returns the metrics dict.

    ``given``: the keys the user set explicitly (default: the command line's overrides), for the image-size check.
    """
    cfg = coerce(EvaluateConfig, cfg)
    device = pick_device(cfg.device)
    model = load_model(cfg.ckpt_path, device)
    given = command_line_keys() if given is None else given
    height, width = evaluation_image_size(cfg, model.hparams.image_size, given)
    data = dataclasses.replace(cfg.data, height=height, width=width)
    target = build_domain(data.target, data.synthetic, data.data_dir, "target")
    loader = eval_loader(target.query, target.gallery, data)
    evaluator = extract_features(model.e_app, loader, model.cfg.features, device=device)
    nq = len(target.query)
    results: dict[str, Any] = {"ckpt_path": str(cfg.ckpt_path), "image_size": [height, width]}
    results["plain"] = evaluator.evaluate(nq)
    dist = evaluator.last_distmat
    if cfg.rerank:
        results["rerank"] = evaluator.evaluate(nq, rerank=(cfg.k1, cfg.k2, cfg.lambda_))
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = Table(title=f"Target test set ({nq} queries, {len(target.gallery)} gallery)")
    columns = ("Rank-1", "Rank-5", "Rank-10", "mAP", "mINP")
    for col in ("", *columns):
        table.add_column(col)
    for name, label in (("plain", "plain"), ("rerank", "re-ranked")):
        if name in results:
            table.add_row(label, *(f"{100 * results[name][k]:.1f}" for k in columns))
    log.info(rendered(table))
    if cfg.vis:
        n = min(cfg.vis_queries, nq)
        idx = np.linspace(0, nq - 1, n).astype(int).tolist()
        distances = dist.cpu().numpy() if isinstance(dist, torch.Tensor) else dist
        image = rank_list_image(distances, target.query, target.gallery, idx, topk=cfg.vis_topk)
        path = save_rank_list(image, out_dir / "rank_list.png")
        results["rank_list"] = str(path)
        for logger in instantiate_group(cfg.logger, cfg.allowed_targets, "logger"):
            log_image(logger, "eval/rank_list", image, 0)
            logger.log_metrics({f"eval/{k}": v for k, v in results["plain"].items()}, step=0)
            logger.finalize("success")
        log.info(f"rank list: {path}")
    write_json(out_dir / "metrics.json", results)
    log.info(f"metrics: {out_dir / 'metrics.json'}")
    return results


def evaluate_task(cfg: DictConfig) -> float:
    return evaluate(cfg)["plain"]["mAP"]


def main() -> float:
    """``python -m dgnetpp_pl.evaluate`` / ``dgnetpp-evaluate``."""
    return run_app("evaluate", evaluate_task)


if __name__ == "__main__":
    main()
