"""SwapGridCallback: appearance/structure swap grids written to disk and sent to every logger (the same 8-bit
pixels to each, see :mod:`dgnetpp_pl.image_logging`)."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import Tensor
from torchvision.utils import make_grid

from dgnetpp_pl.data.transforms import denormalize
from dgnetpp_pl.image_logging import log_image, save_png, to_uint8


def swap_grid(module, structure: Tensor, appearance: Tensor, decoder: str = "a") -> Tensor:
    """A grid image ``(3, H', W')``: the first row shows the appearance donors, the first column the structure
    donors, and cell (i, j) has the structure of row i with the appearance of column j."""
    n, m = structure.shape[0], appearance.shape[0]
    rows = [torch.cat([torch.zeros_like(appearance[:1]), appearance])]
    for i in range(n):
        s = structure[i : i + 1].expand(m, -1, -1, -1)
        rows.append(torch.cat([structure[i : i + 1], module.swap(s, appearance, decoder)]))
    grid = torch.cat(rows)
    return make_grid(denormalize(grid).clamp(0, 1), nrow=m + 1, padding=2)


class SwapGridCallback(pl.Callback):
    """At the end of each validation, swap appearance and structure between fixed source and target images."""

    def __init__(self, num_images: int = 6, every_n_epochs: int = 1) -> None:
        self.num_images = num_images
        self.every_n_epochs = every_n_epochs
        self.last_paths: list[Path] = []

    def _fixed_images(self, trainer: pl.Trainer) -> tuple[Tensor, Tensor]:
        dm = trainer.datamodule
        src = dm.preview_images("source", self.num_images)
        tgt = dm.preview_images("target", self.num_images)
        return src, tgt

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        if (trainer.current_epoch + 1) % self.every_n_epochs and trainer.current_epoch + 1 != trainer.max_epochs:
            return
        src, tgt = (t.to(pl_module.device) for t in self._fixed_images(trainer))
        was_training = pl_module.training
        pl_module.eval()
        try:
            grids = {
                "source_structure": swap_grid(pl_module, src, torch.cat([src, tgt]), "a"),
                "target_structure": swap_grid(pl_module, tgt, torch.cat([src, tgt]), "b"),
            }
        finally:
            pl_module.train(was_training)
        out_dir = Path(trainer.default_root_dir) / "swap_grids"
        out_dir.mkdir(parents=True, exist_ok=True)
        stage = getattr(pl_module, "stage", "model")
        self.last_paths = []
        for name, grid in grids.items():
            path = out_dir / f"{stage}_epoch{trainer.current_epoch:03d}_{name}.png"
            pixels = to_uint8(grid)  # one conversion for the file and every logger
            save_png(pixels, path)
            self.last_paths.append(path)
            for logger in trainer.loggers:
                log_image(logger, f"images/{stage}_{name}", pixels, trainer.global_step)
