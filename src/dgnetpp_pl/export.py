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
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn

from dgnetpp_pl.cli import run_app
from dgnetpp_pl.config import ExportConfig, coerce, require
from dgnetpp_pl.features import embed_images
from dgnetpp_pl.inference import load_model
from dgnetpp_pl.models.appearance import AppearanceEncoder

log = logging.getLogger(__name__)


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
    features = model.cfg.features
    use_flip = bool(features.flip if flip is None else flip)
    graph = FeatureGraph(model.e_app, float(features.alpha), use_flip, tuple(model.hparams.image_size)).eval()
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


def export(cfg: ExportConfig | DictConfig) -> Path:
    """Run one export from an :class:`ExportConfig` (or the CLI's composed config); returns the .onnx path."""
    require(cfg, ("ckpt_path",), "python -m dgnetpp_pl.export ckpt_path=FILE out=encoder.onnx")
    cfg = coerce(ExportConfig, cfg)
    for name in ("onnx_ir", "onnxscript"):  # their INFO lines list every graph pass
        logging.getLogger(name).setLevel(logging.WARNING)
    start = time.perf_counter()
    out, graph = export_onnx(cfg.ckpt_path, cfg.out, cfg.flip, cfg.opset)
    log.info(f"Wrote {out} ({out.stat().st_size / 2**20:.1f} MiB) in {time.perf_counter() - start:.1f} s.")
    if cfg.check:
        log.info(f"onnxruntime vs PyTorch, batches of 1 and 7: max abs difference {check_parity(out, graph):.2e}.")
    return out


def export_task(cfg: DictConfig) -> None:
    export(cfg)


def main() -> None:
    """``python -m dgnetpp_pl.export`` / ``dgnetpp-export``."""
    run_app("export", export_task, lock_folder=False)


if __name__ == "__main__":
    main()
