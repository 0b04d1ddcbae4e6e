"""PseudoLabelCallback: clusters target appearance features into pseudo-labels when the schedule says so.

Labels for epoch ``e`` are computed at the end of epoch ``e - 1`` (or at fit start when self-training begins at
epoch 0), before the checkpoint of that epoch is written, so a resumed run continues with the same labels and
never re-clusters early. Under DDP every rank extracts features for its shard, rank 0 clusters the all-gathered
features and broadcasts the labels.

Data flows one way: the datamodule's target train images and the module's features in, the labels out into the
:class:`PseudoLabelStore` (which the train sampler reads and this callback's checkpoint entry saves) and the
module's classifier rows through its one surgery method, ``set_target_classes``.
"""

from __future__ import annotations

import logging
import time
import warnings
import zlib
from typing import TYPE_CHECKING, Any

import numpy as np
import pytorch_lightning as pl
import torch

from dgnetpp_pl.distributed import broadcast_buffers, shard
from dgnetpp_pl.evaluation import ReIDEvaluator, extract_features
from dgnetpp_pl.features import check_finite
from dgnetpp_pl.label_store import PseudoLabelStore
from dgnetpp_pl.pseudo_labels import METHODS, cluster_centroids, cluster_stats
from dgnetpp_pl.run_log import info_on_rank_zero
from dgnetpp_pl.schedule import AdaptSchedule

if TYPE_CHECKING:
    from dgnetpp_pl.config import PseudoLabelConfig

log = logging.getLogger(__name__)


class PseudoLabelCallback(pl.Callback):
    """Refresh the target pseudo-labels in ``store`` whenever ``schedule.refresh_due(epoch)``."""

    def __init__(
        self, config: PseudoLabelConfig, schedule: AdaptSchedule, store: PseudoLabelStore, seed: int = 0
    ) -> None:
        self.config, self.schedule, self.store, self.seed = config, schedule, store, seed

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A checkpoint written at the end of epoch e - 1 already holds epoch e's labels when they were due; one
        # from a run with a smaller max_epochs does not (the last epoch skips the refresh), so compute them now.
        epoch = trainer.current_epoch
        if self.schedule.refresh_due(epoch) and self.store.last_refresh_epoch < epoch:
            self.refresh(trainer, pl_module, epoch)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        nxt = trainer.current_epoch + 1
        if nxt < trainer.max_epochs and self.schedule.refresh_due(nxt) and self.store.last_refresh_epoch < nxt:
            self.refresh(trainer, pl_module, nxt)

    def state_dict(self) -> dict[str, Any]:
        return self.store.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.store.load_state_dict(state_dict)

    # ------------------------------------------------------------- the work
    def extract(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[torch.Tensor, torch.Tensor]:
        """All target train features ``(N, D)`` and ground-truth pids ``(N,)``, identical on every rank."""
        world = trainer.world_size
        loader = shard(trainer.datamodule.target_train_feature_loader(), world)
        broadcast_buffers(pl_module, world)  # every shard embedded with rank 0's BatchNorm statistics
        evaluator = ReIDEvaluator(all_gather=pl_module.all_gather, world_size=world)
        extract_features(pl_module.e_app, loader, pl_module.cfg.features, evaluator, pl_module.device)
        data = evaluator.gather()
        return data["feats"].float().cpu(), data["pid"].cpu()

    def cluster(self, feats: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Labels ``(N,)`` (-1: outlier) and, where clusters exist, their centroids ``(C, D)``."""
        c = self.config
        if c.method == "kmeans":
            labels, _ = METHODS["kmeans"](feats, c.k, seed=self.seed, niter=c.niter, return_centroids=True)
        else:
            labels = METHODS[c.method](feats, eps=c.eps, min_samples=c.min_samples, k1=c.k1, k2=c.k2, lambda_=c.lambda_)
        num = int(labels.max()) + 1 if (labels >= 0).any() else 0
        centroids = cluster_centroids(feats, labels, num) if num > 0 else None
        return labels.astype(np.int64), centroids

    @staticmethod
    def check_ranks_agree(
        trainer: pl.Trainer, pl_module: pl.LightningModule, labels: np.ndarray, for_epoch: int
    ) -> list[int]:
        """CRC32 of ``labels`` ``(N,)`` on every rank (rank order); raises if any rank holds other labels."""
        digest = zlib.crc32(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
        if trainer.world_size == 1:
            return [digest]
        gathered = pl_module.all_gather(torch.tensor(digest, dtype=torch.long, device=pl_module.device))
        digests = [int(d) for d in gathered.reshape(-1).cpu()]
        if len(set(digests)) > 1:
            raise RuntimeError(
                f"Pseudo-labels for epoch {for_epoch} differ across ranks (CRC32 per rank: {digests}); the "
                "broadcast from rank 0 failed. Check the process group (trainer.strategy) and rerun."
            )
        return digests

    def refresh(self, trainer: pl.Trainer, pl_module: pl.LightningModule, for_epoch: int) -> None:
        start = time.perf_counter()
        feats, truth = self.extract(trainer, pl_module)
        check_finite(feats, f"target train (pseudo-labelling before epoch {for_epoch})")
        n = feats.shape[0]
        labels = torch.full((n,), -1, dtype=torch.long)
        centroids = None
        if trainer.is_global_zero:
            lab, cen = self.cluster(feats.numpy())
            labels = torch.from_numpy(lab)
            centroids = None if cen is None else torch.from_numpy(np.asarray(cen, dtype=np.float32))
        labels = trainer.strategy.broadcast(labels, src=0)
        centroids = trainer.strategy.broadcast(centroids, src=0)
        elapsed = time.perf_counter() - start
        num = int(labels.max()) + 1 if bool((labels >= 0).any()) else 0
        if num == 0:
            warnings.warn(
                f"Pseudo-labelling before epoch {for_epoch} marked every target image as an outlier; "
                "this round trains without target id losses. Consider a larger pseudo_label.eps.",
                stacklevel=2,
            )
        init = centroids if self.config.init_classifier == "centroids" else None
        pl_module.set_target_classes(num, init)
        labels = labels.numpy().astype(np.int64)
        digests = self.check_ranks_agree(trainer, pl_module, labels, for_epoch)
        stats = cluster_stats(labels, previous=self.store.labels, truth=truth.numpy())
        stats = {k: float(v) for k, v in stats.items() if np.isscalar(v) and v is not None}
        stats["time_s"] = elapsed
        stats["epoch"] = float(for_epoch)
        self.store.update(labels, for_epoch, stats, digests)
        # Straight to the loggers: Lightning's self.log is not allowed in on_fit_start.
        for logger in trainer.loggers:
            logger.log_metrics({f"pseudo/{k}": v for k, v in stats.items()}, step=trainer.global_step)
        summary = ", ".join(f"{k}={v:.3g}" for k, v in stats.items())
        info_on_rank_zero(log, f"[pseudo-labels before epoch {for_epoch}] {summary}")
