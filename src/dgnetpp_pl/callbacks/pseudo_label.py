"""PseudoLabelCallback: clusters target appearance features into pseudo-labels on the self-training schedule.

Labels for epoch ``e`` are computed at the end of epoch ``e - 1`` (or at fit start when self-training begins at
epoch 0), before the checkpoint of that epoch is written, so a resumed run continues with the same labels and
never re-clusters early. Under DDP every rank extracts features for its shard, rank 0 clusters the all-gathered
features and broadcasts the labels.
"""

from __future__ import annotations

import time
import warnings
import zlib
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, DistributedSampler

from dgnetpp_pl.features import check_finite, embed_images
from dgnetpp_pl.pseudo_labels import (
    cluster_centroids,
    cluster_stats,
    dbscan_pseudo_labels,
    kmeans_pseudo_labels,
)


class PseudoLabelCallback(pl.Callback):
    """Refresh target pseudo-labels at the first self-training epoch, then every ``every_n_epochs``."""

    def __init__(
        self,
        method: str = "kmeans",
        k: int = 700,
        niter: int = 20,
        every_n_epochs: int = 2,
        init_classifier: str = "centroids",
        eps: float = 0.45,
        min_samples: int = 7,
        k1: int = 20,
        k2: int = 6,
        lambda_: float = 0.3,
        max_clusters: int = 0,
        warmup_epochs: int = 0,
        seed: int = 0,
        alpha: float = 0.5,
    ) -> None:
        if method not in ("kmeans", "dbscan"):
            raise ValueError(f"pseudo_label.method must be 'kmeans' or 'dbscan', got {method!r}")
        self.method = method
        self.k, self.niter, self.every_n_epochs = k, niter, every_n_epochs
        self.init_classifier = init_classifier
        self.eps, self.min_samples, self.k1, self.k2, self.lambda_ = eps, min_samples, k1, k2, lambda_
        self.max_clusters = max_clusters
        self.warmup_epochs = warmup_epochs
        self.seed = seed
        self.alpha = alpha
        self.last_refresh_epoch = -1
        self.history: list[dict[str, float]] = []
        # Per refresh, the CRC32 of the labels each rank trains on (all equal; audited, and checked under DDP).
        self.rank_digests: list[list[int]] = []

    def is_due(self, epoch: int) -> bool:
        """Whether labels must be (re)computed before ``epoch`` trains."""
        return epoch >= self.warmup_epochs and (epoch - self.warmup_epochs) % self.every_n_epochs == 0

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if getattr(pl_module, "stage", "adapt") != "adapt":
            return
        # A checkpoint written at the end of epoch e - 1 already holds epoch e's labels when they were due; one
        # from a run with a smaller max_epochs does not (the last epoch skips the refresh), so compute them now.
        epoch = trainer.current_epoch
        if self.is_due(epoch) and self.last_refresh_epoch < epoch:
            self.refresh(trainer, pl_module, epoch)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if getattr(pl_module, "stage", "adapt") != "adapt":
            return
        nxt = trainer.current_epoch + 1
        if nxt < trainer.max_epochs and self.is_due(nxt) and self.last_refresh_epoch < nxt:
            self.refresh(trainer, pl_module, nxt)

    def state_dict(self) -> dict[str, Any]:
        return {
            "last_refresh_epoch": self.last_refresh_epoch,
            "history": list(self.history),
            "rank_digests": [list(d) for d in self.rank_digests],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_refresh_epoch = int(state_dict.get("last_refresh_epoch", -1))
        self.history = list(state_dict.get("history", []))
        self.rank_digests = [list(d) for d in state_dict.get("rank_digests", [])]

    # ------------------------------------------------------------- the work
    @torch.no_grad()
    def extract(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[torch.Tensor, torch.Tensor]:
        """All target train features ``(N, D)`` and ground-truth pids ``(N,)``, identical on every rank."""
        dm = trainer.datamodule
        loader = dm.target_train_feature_loader()
        world = trainer.world_size
        if world > 1:
            loader = DataLoader(
                loader.dataset,
                batch_size=loader.batch_size,
                sampler=DistributedSampler(loader.dataset, shuffle=False),
                num_workers=loader.num_workers,
                collate_fn=loader.collate_fn,
            )
        if world > 1:
            pl_module.sync_buffers_from_rank_zero()  # every shard embedded with rank 0's BatchNorm statistics
        e_app = pl_module.e_app
        was_training = e_app.training
        e_app.eval()
        feats, pids, index = [], [], []
        try:
            for batch in loader:
                feats.append(embed_images(e_app, batch["image"].to(pl_module.device), self.alpha))
                pids.append(batch["pid"].to(pl_module.device))
                index.append(batch["index"].to(pl_module.device))
        finally:
            e_app.train(was_training)
        f, p, i = torch.cat(feats), torch.cat(pids), torch.cat(index)
        if world > 1:
            f, p, i = (pl_module.all_gather(t) for t in (f, p, i))
            f, p, i = f.reshape(-1, f.shape[-1]), p.reshape(-1), i.reshape(-1)
        order = torch.argsort(i, stable=True)
        f, p, i = f[order], p[order], i[order]
        keep = torch.ones_like(i, dtype=torch.bool)
        keep[1:] = i[1:] != i[:-1]
        return f[keep].float().cpu(), p[keep].cpu()

    def cluster(self, feats: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Labels ``(N,)`` (-1: outlier) and, where it applies, centroids ``(C, D)``."""
        if self.method == "kmeans":
            labels, _ = kmeans_pseudo_labels(feats, self.k, seed=self.seed, niter=self.niter, return_centroids=True)
        else:
            labels = dbscan_pseudo_labels(feats, eps=self.eps, min_samples=self.min_samples, k1=self.k1, k2=self.k2)
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
        dm = trainer.datamodule
        start = time.perf_counter()
        feats, truth = self.extract(trainer, pl_module)
        check_finite(feats, f"target train (pseudo-labelling before epoch {for_epoch})")
        n = feats.shape[0]
        if self.method == "kmeans" and self.k > n:
            raise ValueError(
                f"pseudo_label.k={self.k} is larger than the number of target train images ({n}); "
                f"set pseudo_label.k <= {n}."
            )
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
        previous = dm.target_labels
        dm.set_target_labels(labels.numpy())
        emb_dim = pl_module.e_app.bottleneck_dim
        init = None
        if self.init_classifier == "centroids" and centroids is not None:
            init = centroids[:, :emb_dim]  # the primary head's half of [g1 | sqrt(a) g2]
        pl_module.set_target_classes(num, init)
        self.last_refresh_epoch = for_epoch
        self.rank_digests.append(self.check_ranks_agree(trainer, pl_module, dm.target_labels, for_epoch))
        stats = cluster_stats(labels.numpy(), previous=previous, truth=truth.numpy())
        stats = {k: float(v) for k, v in stats.items() if np.isscalar(v) and v is not None}
        stats["time_s"] = elapsed
        stats["epoch"] = float(for_epoch)
        self.history.append(stats)
        # Straight to the loggers: Lightning's self.log is not allowed in on_fit_start.
        for logger in trainer.loggers:
            logger.log_metrics({f"pseudo/{k}": v for k, v in stats.items()}, step=trainer.global_step)
        if trainer.is_global_zero:
            summary = ", ".join(f"{k}={v:.3g}" for k, v in stats.items())
            pl_module.print(f"[pseudo-labels before epoch {for_epoch}] {summary}")
