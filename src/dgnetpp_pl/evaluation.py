"""ReIDEvaluator: the features of one evaluation pass, gathered across ranks and ranked under the Market protocol.

Used by validation and test (``DGNetPP`` through :class:`EvaluationHooks`), pseudo-label extraction, the
``evaluate`` CLI and the retrieval notebook: ``reset()``, ``process(feats, batch)`` per batch, then ``gather()``
for the features or ``evaluate()`` for the metrics. Samples are identified by their dataset index: the gather
sorts by it and drops the duplicates a distributed sampler pads with, and the first ``num_query`` indices are
the queries.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor

from dgnetpp_pl.distributed import broadcast_buffers
from dgnetpp_pl.features import check_finite, embed_images
from dgnetpp_pl.metrics import evaluate_ranking
from dgnetpp_pl.models.appearance import AppearanceEncoder
from dgnetpp_pl.reranking import re_rank

if TYPE_CHECKING:
    from dgnetpp_pl.config import FeatureConfig

METRICS = ("mAP", "Rank-1", "Rank-5", "Rank-10", "mINP")
# The key prefix of the per-epoch evaluation when the validation loader is the target test split (no held-out
# split): these are curves to watch, not a validation metric to select epochs or hyper-parameters on.
PER_EPOCH_TEST = "test_per_epoch"


class ReIDEvaluator:
    """Collects ``feats (B, D)`` with the batch's ``pid``, ``camid`` and ``index`` ``(B,)``.

    ``all_gather`` (e.g. ``LightningModule.all_gather``) stacks a dict of tensors from ``world_size`` ranks; without
    it the evaluator is single-process.
    """

    def __init__(self, all_gather: Callable[[dict], dict] | None = None, world_size: int = 1) -> None:
        self.all_gather, self.world_size = all_gather, world_size
        self._parts: list[dict[str, Tensor]] = []
        self.last_distmat: Tensor | np.ndarray | None = None

    def reset(self) -> None:
        self._parts = []

    def process(self, feats: Tensor, batch: Mapping[str, Tensor]) -> None:
        self._parts.append({"feats": feats, "pid": batch["pid"], "camid": batch["camid"], "index": batch["index"]})

    @property
    def num_processed(self) -> int:
        """Samples processed on this rank since the last reset."""
        return sum(len(p["index"]) for p in self._parts)

    def gather(self) -> dict[str, Tensor]:
        """Every processed sample once, from all ranks, sorted by index: ``feats (N, D)``, ``pid``, ``camid``,
        ``index`` ``(N,)``. Collective under DDP: call on all ranks."""
        if not self._parts:
            return {}
        local = {k: torch.cat([p[k].to(self._parts[0]["feats"].device) for p in self._parts]) for k in self._parts[0]}
        if self.world_size > 1 and self.all_gather is not None:
            gathered = self.all_gather(local)
            local = {k: v.reshape(-1, *v.shape[2:]) if v.dim() > 2 else v.reshape(-1) for k, v in gathered.items()}
        order = torch.argsort(local["index"], stable=True)
        local = {k: v[order] for k, v in local.items()}
        keep = torch.ones_like(local["index"], dtype=torch.bool)
        keep[1:] = local["index"][1:] != local["index"][:-1]
        return {k: v[keep] for k, v in local.items()}

    def evaluate(
        self,
        num_query: int,
        num_total: int | None = None,
        what: str = "evaluation",
        rerank: tuple[int, int, float] | None = None,
        epoch: int | None = None,
    ) -> dict[str, float]:
        """Metrics (fractions) of ``METRICS`` with indices ``< num_query`` as queries, ``{}`` when the pass saw no
        query-gallery pair. ``num_total`` (the dataset size) detects a partial pass (``limit_*_batches``) and
        warns, naming ``what``; ``rerank=(k1, k2, lambda_)`` ranks by k-reciprocal re-ranking instead of the cosine
        distance. The ``(Q, G)`` distances are kept in :attr:`last_distmat`."""
        data = self.gather()
        if not data:
            return {}
        feats = data["feats"].float()
        check_finite(feats, what if epoch is None else f"{what} (epoch {epoch})")
        total = feats.shape[0] if num_total is None else num_total
        if num_query <= 0 or num_query >= total:
            raise ValueError(f"num_query={num_query} is invalid for {total} evaluation images")
        # Query/gallery by dataset index, so a partial pass (limit_val_batches, fast_dev_run) splits correctly.
        is_q = data["index"] < num_query
        if feats.shape[0] < total:
            if bool(is_q.all()) or not bool(is_q.any()):
                rank_zero_warn(
                    f"{what}: metrics skipped, only {feats.shape[0]} of {total} evaluation images were seen "
                    "(limit_val_batches / fast_dev_run) and they hold no query-gallery pair"
                )
                return {}
            rank_zero_warn(f"{what}: metrics on {feats.shape[0]} of {total} evaluation images only")
        if rerank is None:
            dist = 1.0 - feats[is_q] @ feats[~is_q].T
        else:
            k1, k2, lambda_ = rerank
            dist = re_rank(feats[is_q].cpu().numpy(), feats[~is_q].cpu().numpy(), k1=k1, k2=k2, lambda_=lambda_)
        self.last_distmat = dist
        return ranking_metrics(dist, data["pid"][is_q], data["pid"][~is_q], data["camid"][is_q], data["camid"][~is_q])


def ranking_metrics(
    dist: Tensor | np.ndarray, q_pids: Tensor, g_pids: Tensor, q_camids: Tensor, g_camids: Tensor
) -> dict[str, float]:
    """mAP, Rank-1/5/10 and mINP (fractions, Market protocol) of a ``(Q, G)`` distance matrix."""
    res = evaluate_ranking(dist, q_pids, g_pids, q_camids, g_camids, ap="market")
    cmc = res["cmc"]
    return {
        "mAP": float(res["mAP"]),
        "Rank-1": float(cmc[0]),
        "Rank-5": float(cmc[min(4, len(cmc) - 1)]),
        "Rank-10": float(cmc[min(9, len(cmc) - 1)]),
        "mINP": float(res["mINP"]),
    }


@torch.no_grad()
def extract_features(
    e_app: AppearanceEncoder,
    loader: Iterable[Mapping[str, Tensor]],
    features: FeatureConfig,
    evaluator: ReIDEvaluator | None = None,
    device: torch.device | str | None = None,
) -> ReIDEvaluator:
    """Embed every batch of an evaluation loader (``{"image", "pid", "camid", "index"}``) into ``evaluator`` (a fresh
    single-process one by default) with the encoder in eval mode; features as ``model.features`` asks."""
    evaluator = evaluator or ReIDEvaluator()
    was_training = e_app.training
    e_app.eval()
    device = device or next(e_app.parameters()).device
    try:
        for batch in loader:
            feats = embed_images(e_app, batch["image"].to(device), features.alpha, features.flip)
            evaluator.process(feats, {k: batch[k].to(device) for k in ("pid", "camid", "index")})
    finally:
        e_app.train(was_training)
    return evaluator


class EvaluationHooks:
    """Validation and test of a LightningModule as one :class:`ReIDEvaluator` pass over the loader's query + gallery.

    The module provides ``embed(images) -> (B, D)``, ``evaluator`` (built with its ``all_gather``), a ``best_map``
    buffer and ``last_eval``. Test metrics are logged as ``test/*``. The per-epoch validation pass is named after
    the split it runs on: ``val/*`` (with ``val/mAP_best``, the best ``val/mAP`` so far) on a held-out split, and
    :data:`PER_EPOCH_TEST` ``/*`` when the datamodule says it has none (``has_validation_split``), i.e. the loader
    is the target test split. Before each pass every rank takes rank 0's buffers.
    """

    def _start_eval(self) -> None:
        self.evaluator.world_size = self.trainer.world_size
        self.evaluator.reset()
        broadcast_buffers(self, self.trainer.world_size)

    def _validation_prefix(self) -> str:
        # Loaders given to trainer.validate() without a datamodule are the caller's validation set.
        held_out = getattr(self.trainer.datamodule, "has_validation_split", True)
        return "val" if held_out else PER_EPOCH_TEST

    def _finish_eval(self, dataset: Any, prefix: str) -> dict[str, float]:  # dataset: the ReIDImageDataset
        out = self.evaluator.evaluate(dataset.num_query, len(dataset), prefix, epoch=self.current_epoch)
        self.evaluator.reset()
        return {f"{prefix}/{k}": v for k, v in out.items()}

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.evaluator.process(self.embed(batch["image"]), batch)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.evaluator.process(self.embed(batch["image"]), batch)

    def on_validation_epoch_start(self) -> None:
        self._start_eval()

    def on_test_epoch_start(self) -> None:
        self._start_eval()

    def on_validation_epoch_end(self) -> None:
        prefix = self._validation_prefix()
        out = self._finish_eval(self.trainer.val_dataloaders.dataset, prefix)
        if not out:
            return
        if prefix == "val" and not self.trainer.sanity_checking:
            self.best_map.fill_(max(float(self.best_map), out["val/mAP"]))
            out["val/mAP_best"] = float(self.best_map)
        self.log_dict(out, sync_dist=False, rank_zero_only=False)
        if prefix == "val":  # what a resumed run reports (see DGNetPP.on_save_checkpoint)
            self.last_eval = out

    def on_test_epoch_end(self) -> None:
        out = self._finish_eval(self.trainer.test_dataloaders.dataset, "test")
        if out:
            self.log_dict(out, sync_dist=False)
            self.last_eval = out
