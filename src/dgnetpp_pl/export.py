"""The appearance encoder as an ONNX re-ID feature extractor: ``python -m dgnetpp_pl.export ckpt_path=... out=...``.

The graph takes a normalised image batch ``images`` ``(B, 3, H, W)`` (any B; H, W the checkpoint's image size,
ImageNet mean/std normalisation) and returns ``features`` ``(B, 2 * bottleneck)``: the unit-norm features of
:func:`dgnetpp_pl.features.embed_images`, flip averaging included unless ``flip=false`` (then a caller that wants
it adds the flipped images' features itself, as ``embed_images`` does). Needs the ``export`` extra
(``pip install -e .[export]``: onnx, onnxscript, and onnxruntime for ``check=true``).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import torch
import torch.nn.functional as F
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from torch import Tensor, nn

from dgnetpp_pl.config import ConfigError
from dgnetpp_pl.features import embed_images
from dgnetpp_pl.inference import load_model
from dgnetpp_pl.models.appearance import AppearanceEncoder

log = logging.getLogger(__name__)


@dataclass
class ExportConfig:
    """``python -m dgnetpp_pl.export``: every option; unknown keys are rejected."""

    defaults: list[Any] = field(
        default_factory=lambda: [
            "_self_",
            {"override hydra/job_logging": "stdout"},
            {"override hydra/hydra_logging": "disabled"},
        ]
    )
    # No run folder: the command writes only `out`.
    hydra: Any = field(default_factory=lambda: {"run": {"dir": "."}, "output_subdir": None})
    ckpt_path: str = MISSING
    out: str = "encoder.onnx"
    # Flip averaging inside the graph; null: the checkpoint's model.features.flip.
    flip: bool | None = None
    # ONNX opset; null: the exporter's default.
    opset: int | None = None
    # Run the exported graph with onnxruntime on a random batch and compare it with PyTorch.
    check: bool = True


ConfigStore.instance().store(name="export", node=ExportConfig)


class FeatureGraph(nn.Module):
    """`embed_images` as one exportable module: `(B, 3, H, W) -> (B, 2 * bottleneck)` unit-norm features.

    Only the trunk, the global max pool and the two heads' bottlenecks run (no appearance code, no logits).
    """

    def __init__(self, e_app: AppearanceEncoder, alpha: float, flip: bool, image_size: tuple[int, int]) -> None:
        super().__init__()
        self.e_app = e_app
        self.alpha = alpha
        self.flip = flip
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.w1 = 1.0 / math.sqrt(1.0 + alpha)
        self.w2 = math.sqrt(alpha) / math.sqrt(1.0 + alpha)

    def _embed(self, x: Tensor) -> tuple[Tensor, Tensor]:
        feat = torch.amax(self.e_app.backbone(x), dim=(2, 3))
        e1 = self.e_app.head1.bottleneck(feat)
        e2 = self.e_app.head2.bottleneck(feat)
        return F.normalize(e1, dim=1), F.normalize(e2, dim=1)

    def forward(self, images: Tensor) -> Tensor:
        g1, g2 = self._embed(images)
        if self.flip:
            f1, f2 = self._embed(torch.flip(images, dims=[3]))
            g1, g2 = g1 + f1, g2 + f2
        return torch.cat([F.normalize(g1, dim=1) * self.w1, F.normalize(g2, dim=1) * self.w2], dim=1)


def export_onnx(
    ckpt_path: str | Path, out: str | Path, flip: bool | None = None, opset: int | None = None
) -> tuple[Path, FeatureGraph]:
    """Export the checkpoint's appearance encoder to `out` (one self-contained .onnx file, dynamic batch).

    Returns the path and the PyTorch graph it was exported from (eval mode, CPU).
    """
    model = load_model(ckpt_path, "cpu")
    f = model.cfg["features"]
    use_flip = bool(f["flip"] if flip is None else flip)
    graph = FeatureGraph(model.e_app, float(f["alpha"]), use_flip, tuple(model.hparams.image_size)).eval()
    height, width = graph.image_size
    example = torch.randn(2, 3, height, width)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        torch.onnx.export(
            graph,
            (example,),
            str(out),
            input_names=["images"],
            output_names=["features"],
            dynamic_shapes={"images": {0: batch}},
            opset_version=opset,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    return out, graph


def onnx_features(path: str | Path, images: Tensor) -> Tensor:
    """Run an exported graph with onnxruntime on the CPU: `(B, 3, H, W) -> (B, D)`."""
    try:
        import onnxruntime
    except ImportError as err:
        raise ImportError("onnxruntime is not installed; pip install -e .[export] (or set check=false).") from err
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (result,) = session.run(["features"], {"images": images.detach().cpu().numpy()})
    return torch.from_numpy(result)


def check_parity(path: str | Path, graph: FeatureGraph, batch_sizes: tuple[int, ...] = (1, 7)) -> float:
    """Largest absolute difference between onnxruntime and `embed_images` on random batches of `batch_sizes`."""
    height, width = graph.image_size
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for b in batch_sizes:
        x = torch.randn(b, 3, height, width, generator=gen)
        ref = embed_images(graph.e_app, x, alpha=graph.alpha, flip=graph.flip)
        worst = max(worst, float((onnx_features(path, x) - ref).abs().max()))
    return worst


def export(cfg: DictConfig | ExportConfig) -> Path:
    """Run one export from an :class:`ExportConfig`; returns the .onnx path."""
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.structured(cfg)
    if OmegaConf.is_missing(cfg, "ckpt_path"):
        raise ConfigError("ckpt_path= is required: python -m dgnetpp_pl.export ckpt_path=FILE out=encoder.onnx.")
    for name in ("onnx_ir", "onnxscript"):  # their INFO lines list every graph pass
        logging.getLogger(name).setLevel(logging.WARNING)
    start = time.perf_counter()
    out, graph = export_onnx(cfg.ckpt_path, cfg.out, cfg.flip, cfg.opset)
    log.info(f"Wrote {out} ({out.stat().st_size / 2**20:.1f} MiB) in {time.perf_counter() - start:.1f} s.")
    if cfg.check:
        log.info(f"onnxruntime vs PyTorch, batches of 1 and 7: max abs difference {check_parity(out, graph):.2e}.")
    return out


@hydra.main(version_base="1.3", config_path=None, config_name="export")
def main(cfg: DictConfig) -> None:
    export(cfg)


if __name__ == "__main__":
    main()
