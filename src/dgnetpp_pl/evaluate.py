"""Evaluate a checkpoint on a target test set: ``python -m dgnetpp_pl.evaluate ckpt_path=... data=market1501``.

Prints R1/R5/R10/mAP/mINP with and (``rerank=true``) without k-reciprocal re-ranking, writes ``metrics.json`` in
the output folder, and with ``vis=true`` writes a rank-list picture and logs it to the configured logger.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from dgnetpp_pl.atomic_io import write_json
from dgnetpp_pl.config import CONF_DIR, DataConfig
from dgnetpp_pl.data.datamodule import CrossDomainDataModule
from dgnetpp_pl.features import check_finite, extract_features
from dgnetpp_pl.inference import load_model, pick_device
from dgnetpp_pl.instantiate import instantiate_group
from dgnetpp_pl.metrics import evaluate_ranking
from dgnetpp_pl.reranking import re_rank
from dgnetpp_pl.startup import before_hydra
from dgnetpp_pl.visualize import rank_list_image, save_rank_list


def _metrics(dist: np.ndarray | torch.Tensor, q: dict, g: dict) -> dict[str, float]:
    res = evaluate_ranking(dist, q["pids"], g["pids"], q["camids"], g["camids"], ap="market")
    cmc = res["cmc"]
    return {
        "Rank-1": float(cmc[0]),
        "Rank-5": float(cmc[4]),
        "Rank-10": float(cmc[9]),
        "mAP": float(res["mAP"]),
        "mINP": float(res["mINP"]),
    }


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Features, metrics (and re-ranked metrics), optional rank-list picture; returns the metrics dict."""
    data_cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.to_container(cfg.data, resolve=True))
    d = OmegaConf.to_container(data_cfg, resolve=True)
    synthetic = {k: v for k, v in (d.pop("synthetic") or {}).items() if v is not None}
    dm = CrossDomainDataModule(**d, synthetic=synthetic or None, seed=cfg.seed, stage="adapt")
    dm.prepare_data()
    dm.setup("test")
    device = pick_device(cfg.device)
    model = load_model(cfg.ckpt_path, device)
    f = model.cfg["features"]
    feats = extract_features(model.e_app, dm.test_dataloader(), f["alpha"], f["flip"], device)
    check_finite(feats["feats"], "evaluation")
    nq = dm.num_query
    q = {k: v[:nq] for k, v in feats.items()}
    g = {k: v[nq:] for k, v in feats.items()}
    dist = 1.0 - q["feats"] @ g["feats"].T
    results: dict[str, Any] = {"ckpt_path": str(cfg.ckpt_path), "plain": _metrics(dist, q, g)}
    if cfg.rerank:
        rr = re_rank(q["feats"].numpy(), g["feats"].numpy(), k1=cfg.k1, k2=cfg.k2, lambda_=cfg.lambda_)
        results["rerank"] = _metrics(rr, q, g)
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = Table(title=f"Target test set ({dm.num_query} queries, {len(dm.gallery_records)} gallery)")
    for col in ("", "Rank-1", "Rank-5", "Rank-10", "mAP", "mINP"):
        table.add_column(col)
    for name in ("plain", "rerank"):
        if name in results:
            m = results[name]
            label = "re-ranked" if name == "rerank" else "plain"
            table.add_row(label, *(f"{100 * m[k]:.1f}" for k in ("Rank-1", "Rank-5", "Rank-10", "mAP", "mINP")))
    Console().print(table)
    if cfg.vis:
        n = min(cfg.vis_queries, nq)
        idx = np.linspace(0, nq - 1, n).astype(int).tolist()
        image = rank_list_image(dist.numpy(), dm.query_records, dm.gallery_records, idx, topk=cfg.vis_topk)
        path = save_rank_list(image, out_dir / "rank_list.png")
        results["rank_list"] = str(path)
        for logger in instantiate_group(cfg.logger, cfg.allowed_targets, "logger"):
            from dgnetpp_pl.callbacks.image_grid import log_image

            log_image(logger, "eval/rank_list", torch.from_numpy(np.asarray(image)).permute(2, 0, 1) / 255.0, 0)
            logger.log_metrics({f"eval/{k}": v for k, v in results["plain"].items()}, step=0)
            logger.finalize("success")
        print(f"rank list: {path}")
    write_json(out_dir / "metrics.json", results)
    print(f"metrics: {out_dir / 'metrics.json'}")
    return results


@before_hydra(CONF_DIR, "evaluate")  # _target_ check and run-folder lock, before Hydra starts
@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="evaluate")
def main(cfg: DictConfig) -> float:
    return evaluate(cfg)["plain"]["mAP"]


if __name__ == "__main__":
    main()
