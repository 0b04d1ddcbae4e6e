"""Features for any folder of images from a trained checkpoint.

Python::

    from dgnetpp_pl.extract import FeatureExtractor
    feats = FeatureExtractor("model.ckpt")(["a.jpg", "b.jpg"])      # (2, D) unit-norm features

CLI: ``python -m dgnetpp_pl.extract ckpt_path=... images=DIR out=FILE`` (or ``dgnetpp-extract``) writes the
features (.pt or .npy) and a CSV of the records beside them (pid and camera from Market-style file names, else -1).
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image

from dgnetpp_pl.cli import run_app
from dgnetpp_pl.config import ExtractConfig, coerce
from dgnetpp_pl.data.datasets import IMAGE_EXTENSIONS, load_image, parse_market_name
from dgnetpp_pl.data.transforms import build_test_transform
from dgnetpp_pl.inference import load_model, pick_device

log = logging.getLogger(__name__)


class FeatureExtractor:
    """Callable that turns image paths (or PIL images) into re-ID features ``(N, D)`` with a trained model."""

    def __init__(self, ckpt_path: str | Path, device: str = "auto", batch_size: int = 64) -> None:
        self.device = pick_device(device)
        self.model = load_model(ckpt_path, self.device)
        height, width = self.model.hparams.image_size
        self.transform = build_test_transform(height, width)
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, images: Sequence[str | Path | Image.Image]) -> torch.Tensor:
        out = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            pil = [im if isinstance(im, Image.Image) else load_image(str(im)) for im in chunk]
            x = torch.stack([self.transform(im.convert("RGB")) for im in pil]).to(self.device)
            out.append(self.model.embed(x).cpu())
        return torch.cat(out) if out else torch.empty(0)


def list_images(root: str | Path) -> list[Path]:
    """Every image under ``root`` (recursive, sorted); an error names the folder when none is found."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"images={root} is not a folder; point it at a folder of person crops.")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise FileNotFoundError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}.")
    return files


def parse_ids(path: Path) -> tuple[int, int]:
    """(pid, camid) from a Market/Duke-style name, or (-1, -1) when the name carries none."""
    return parse_market_name(path.name) or (-1, -1)


def save_features(path: str | Path, feats: torch.Tensor, files: Sequence[Path]) -> Path:
    """Write ``feats`` ``(N, D)`` to ``path`` (.pt with the records, or .npy) and the records to ``<path>.csv``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ids = [parse_ids(f) for f in files]
    if path.suffix == ".npy":
        np.save(path, feats.numpy())
    else:
        pids, camids = torch.tensor([i[0] for i in ids]), torch.tensor([i[1] for i in ids])
        torch.save({"feats": feats, "paths": [str(f) for f in files], "pids": pids, "camids": camids}, path)
    with open(path.with_suffix(path.suffix + ".csv"), "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["row", "path", "pid", "camid"])
        writer.writerows((i, str(f), pid, cam) for i, (f, (pid, cam)) in enumerate(zip(files, ids)))
    return path


def extract(cfg: ExtractConfig | DictConfig) -> Path:
    """Features of every image under ``cfg.images`` into ``cfg.out``; returns the features file."""
    cfg = coerce(ExtractConfig, cfg)
    extractor = FeatureExtractor(cfg.ckpt_path, device=cfg.device, batch_size=cfg.batch_size)
    files = list_images(cfg.images)
    feats = extractor(files)
    out = save_features(cfg.out, feats, files)
    log.info(f"wrote {feats.shape[0]} x {feats.shape[1]} features to {out} (records in {out}.csv)")
    return out


def extract_task(cfg: DictConfig) -> None:
    extract(cfg)


def main() -> None:
    """``python -m dgnetpp_pl.extract`` / ``dgnetpp-extract``."""
    run_app("extract", extract_task)


if __name__ == "__main__":
    main()
