"""PseudoLabelStore: the target pseudo-labels of the adapt stage, in one place.

The pseudo-label callback writes a round of labels; the train sampler reads them when each epoch's iterator starts;
the callback's checkpoint entry is :meth:`PseudoLabelStore.state_dict` (tensors and plain values only, so a
checkpoint still loads with ``weights_only=True``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


class PseudoLabelStore:
    """Labels ``(N_target_train,)`` int64 (-1: outlier or none yet), the epoch they were computed for, and per
    round the clustering statistics and the CRC32 of the labels on each rank."""

    def __init__(self) -> None:
        self.labels: np.ndarray | None = None
        self.last_refresh_epoch = -1
        self.history: list[dict[str, float]] = []
        self.rank_digests: list[list[int]] = []

    @property
    def num_clusters(self) -> int:
        """The largest label + 1 (0 before labels exist or when every image is an outlier)."""
        if self.labels is None or not (self.labels >= 0).any():
            return 0
        return int(self.labels.max()) + 1

    def update(
        self,
        labels: np.ndarray | torch.Tensor,
        for_epoch: int,
        stats: dict[str, float] | None = None,
        digests: list[int] | None = None,
    ) -> None:
        """Store one round of labels computed before ``for_epoch`` trains, with its statistics and rank digests."""
        self.labels = _check(labels)
        self.last_refresh_epoch = int(for_epoch)
        if stats is not None:
            self.history.append(dict(stats))
        if digests is not None:
            self.rank_digests.append([int(d) for d in digests])

    def labels_for(self, num_images: int) -> np.ndarray:
        """The labels of ``num_images`` target train images (all -1 before the first round)."""
        if self.labels is None:
            return np.full(num_images, -1, dtype=np.int64)
        if self.labels.shape != (num_images,):
            raise ValueError(
                f"the pseudo-labels hold {self.labels.shape[0]} entries but the target train split has {num_images} "
                "images; the checkpoint they come from was written with other data settings (data.val_split, "
                "data.target). Resume with the run's own settings."
            )
        return self.labels

    def state_dict(self) -> dict[str, Any]:
        return {
            "labels": None if self.labels is None else torch.from_numpy(self.labels.copy()),
            "last_refresh_epoch": self.last_refresh_epoch,
            "history": [dict(h) for h in self.history],
            "rank_digests": [list(d) for d in self.rank_digests],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        labels = state.get("labels")
        self.labels = None if labels is None else _check(labels)
        self.last_refresh_epoch = int(state.get("last_refresh_epoch", -1))
        self.history = [dict(h) for h in state.get("history", [])]
        self.rank_digests = [[int(d) for d in r] for r in state.get("rank_digests", [])]


def _check(labels: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    array = np.asarray(labels)
    if array.ndim != 1:
        raise ValueError(f"pseudo-labels must be one label per target train image (1-D), got shape {array.shape}.")
    if array.dtype.kind not in "iu":
        raise ValueError(f"pseudo-labels must be integers, got dtype {array.dtype}.")
    if array.size and array.min() < -1:
        raise ValueError(f"pseudo-labels must be >= -1 (-1 = no label), got {int(array.min())}.")
    return array.astype(np.int64)
