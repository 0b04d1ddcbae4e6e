"""Features for any folder of images from a trained checkpoint.

Python::

    from dgnetpp_pl.extract import FeatureExtractor
    feats = FeatureExtractor("model.ckpt")(["a.jpg", "b.jpg"])      # (2, D) unit-norm features

CLI: ``python -m dgnetpp_pl.extract ckpt_path=... images=DIR out=FILE`` writes the features (.pt or .npy) and a
CSV of the records beside them.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from dgnetpp_pl.data.datasets import load_image
from dgnetpp_pl.data.transforms import build_test_transform
from dgnetpp_pl.features import embed_images, save_features
from dgnetpp_pl.inference import load_model, pick_device

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp"}
_MARKET = re.compile(r"^(-?\d+)_c(\d+)")


class FeatureExtractor:
    """Callable that turns image paths (or PIL images) into re-ID features ``(N, D)`` with a trained model."""

    def __init__(self, ckpt_path: str | Path, device: str = "auto", batch_size: int = 64) -> None:
        self.device = pick_device(device)
        self.model = load_model(ckpt_path, self.device)
        height, width = self.model.hparams.image_size
        self.transform = build_test_transform(height, width)
        self.batch_size = batch_size
        f = self.model.cfg["features"]
        self.alpha, self.flip = f["alpha"], f["flip"]

    @torch.no_grad()
    def __call__(self, images: Sequence[str | Path | Image.Image]) -> torch.Tensor:
        out = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            pil = [im if isinstance(im, Image.Image) else load_image(str(im)) for im in chunk]
            x = torch.stack([self.transform(im.convert("RGB")) for im in pil]).to(self.device)
            out.append(embed_images(self.model.e_app, x, self.alpha, self.flip).cpu())
        return torch.cat(out) if out else torch.empty(0)


def list_images(root: str | Path) -> list[Path]:
    """Every image under ``root`` (recursive, sorted); an error names the folder when none is found."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"images={root} is not a folder; point it at a folder of person crops.")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"No images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {root}.")
    return files


def parse_ids(path: Path) -> tuple[int, int]:
    """(pid, camid) from a Market/Duke-style name, or (-1, -1) when the name carries none."""
    m = _MARKET.match(path.name)
    return (int(m.group(1)), int(m.group(2)) - 1) if m else (-1, -1)


def main(argv: Sequence[str] | None = None) -> Path:
    args = dict(a.split("=", 1) for a in (sys.argv[1:] if argv is None else argv))
    missing = {"ckpt_path", "images", "out"} - set(args)
    if missing:
        raise SystemExit(f"usage: python -m dgnetpp_pl.extract ckpt_path=FILE images=DIR out=FILE; missing {missing}")
    files = list_images(args["images"])
    extractor = FeatureExtractor(args["ckpt_path"], device=args.get("device", "auto"))
    feats = extractor(files)
    ids = [parse_ids(p) for p in files]
    out = Path(args["out"])
    save_features(
        out,
        feats,
        [str(p) for p in files],
        torch.tensor([i[0] for i in ids]),
        torch.tensor([i[1] for i in ids]),
    )
    print(f"wrote {feats.shape[0]} x {feats.shape[1]} features to {out} (records in {out}.csv)")
    return out


if __name__ == "__main__":
    main()
