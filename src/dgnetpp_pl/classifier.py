"""Weight surgery on the joint source + target classifier: target rows for a new round of pseudo-labels, their
optimiser momentum, and the adapt stage's start from a source-stage state dict."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dgnetpp_pl.models.appearance import AppearanceEncoder

# How the target rows start each round: the normalised cluster centroids, or N(0, 0.001).
INITS = ("centroids", "random")


@torch.no_grad()
def init_target_rows(
    e_app: AppearanceEncoder, num_source: int, capacity: int, num_clusters: int, centroids: Tensor | None
) -> list[Tensor]:
    """Re-initialise rows ``num_source..num_source+capacity`` of both heads' classifiers; returns the touched
    parameters (weights and biases).

    ``centroids`` ``(num_clusters, >= bottleneck)`` (the first ``bottleneck`` columns are the primary head's half
    of the feature) give the first ``num_clusters`` rows, normalised and scaled to the mean norm of the source rows
    so the new logits are on the same scale; the other rows, or all without centroids, are N(0, 0.001).
    """
    if num_clusters > capacity:
        raise ValueError(
            f"{num_clusters} target clusters exceed the classifier capacity {capacity}; "
            "raise pseudo_label.max_clusters (DBSCAN) or lower pseudo_label.k."
        )
    lo, hi = num_source, num_source + capacity
    touched: list[Tensor] = []
    for head in (e_app.head1, e_app.head2):
        w, b = head.classifier.weight, head.classifier.bias
        if centroids is not None and num_clusters > 0:
            c = F.normalize(centroids[:, : e_app.bottleneck_dim].to(w).float(), dim=1)
            scale = w[:lo].norm(dim=1).mean() if lo > 0 else torch.tensor(1.0)
            w[lo : lo + num_clusters] = c.to(w.dtype) * scale
            w[lo + num_clusters : hi].normal_(0, 0.001)
        else:
            w[lo:hi].normal_(0, 0.001)
        if b is not None:
            b[lo:hi] = 0
        touched += [p for p in (w, b) if p is not None]
    return touched


@torch.no_grad()
def clear_row_momentum(optimizer: torch.optim.Optimizer, params: list[Tensor], first_row: int) -> None:
    """Zero the momentum of rows ``first_row..`` of ``params`` in ``optimizer`` (SGD), where it has any."""
    for p in params:
        buf = optimizer.state.get(p, {}).get("momentum_buffer")
        if buf is not None:
            buf[first_row:] = 0


def adapt_state_from_source(
    own: dict[str, Tensor], source: dict[str, Tensor], keep_source_classifier: bool = True
) -> dict[str, Tensor]:
    """The entries of an adapt-stage state dict that come from a source-stage one: both generators from the source
    generator, D_img and E_app as trained, the classifiers' source rows (grown to the joint capacity) when
    ``keep_source_classifier``. Raises ValueError when the source checkpoint is of another model size."""
    new: dict[str, Tensor] = {}
    for key, value in source.items():
        if key.startswith("gen_a."):
            new[key] = value
            new["gen_b." + key[len("gen_a.") :]] = value
        elif key.startswith(("d_img.", "e_app.")):
            if key.endswith("classifier.weight") or key.endswith("classifier.bias"):
                if keep_source_classifier:
                    grown = own[key].clone()
                    grown[: value.shape[0]] = value
                    new[key] = grown
                continue
            new[key] = value
    missing = [k for k in own if k.startswith(("gen_a.", "e_app.", "d_img.")) and k not in new]
    missing = [k for k in missing if "classifier" not in k]
    if missing:
        raise ValueError(
            f"The source-stage checkpoint lacks {len(missing)} parameters (e.g. {missing[0]}); "
            "was it trained with a different model size? Use the same model= for both stages."
        )
    for key, value in new.items():
        if own[key].shape != value.shape:
            raise ValueError(
                f"Parameter {key} has shape {tuple(value.shape)} in the source-stage checkpoint but "
                f"{tuple(own[key].shape)} here; the checkpoint comes from a different model size. "
                "Use the same model= (and data image size) for both stages."
            )
    return new
