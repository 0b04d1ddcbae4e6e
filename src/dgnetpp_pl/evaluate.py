"""Evaluate a checkpoint on a target test set: ``python -m dgnetpp_pl.evaluate ckpt_path=... data=market1501``.

Logs R1/R5/R10/mAP/mINP (console and ``evaluate.log``) without and (``rerank=true``) with k-reciprocal
re-ranking, writes ``metrics.json`` in the output folder, and with ``vis=true`` writes a rank-list picture and logs
it to the configured logger. Only the target domain is read (or generated, for the built-in data); the checkpoint
is checked first.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from rich.table import Table

from dgnetpp_pl.atomic_io import write_json
from dgnetpp_pl.cli import run_app
from dgnetpp_pl.config import EvaluateConfig, coerce
from dgnetpp_pl.data.datamodule import eval_loader
from dgnetpp_pl.data.domains import build_domain
from dgnetpp_pl.evaluation import extract_features
from dgnetpp_pl.image_logging import log_image
from dgnetpp_pl.inference import load_model, pick_device
from dgnetpp_pl.instantiate import instantiate_group
from dgnetpp_pl.run_log import rendered
from dgnetpp_pl.visualize import rank_list_image, save_rank_list

log = logging.getLogger(__name__)


def evaluate(cfg: EvaluateConfig | DictConfig) -> dict[str, Any]:
    """Features, metrics (and re-ranked metrics), optional rank-list picture; returns the metrics dict."""
    cfg = coerce(EvaluateConfig, cfg)
    device = pick_device(cfg.device)
    model = load_model(cfg.ckpt_path, device)
    target = build_domain(cfg.data.target, cfg.data.synthetic, cfg.data.data_dir, "target")
    loader = eval_loader(target.query, target.gallery, cfg.data)
    evaluator = extract_features(model.e_app, loader, model.cfg.features, device=device)
    nq = len(target.query)
    results: dict[str, Any] = {"ckpt_path": str(cfg.ckpt_path), "plain": evaluator.evaluate(nq)}
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
