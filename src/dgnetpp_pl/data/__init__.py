"""Data layer: dataset readers, the synthetic cross-domain dataset, sampling, transforms and the datamodule.

Names are imported on first use, so that ``import dgnetpp_pl.data.synthetic`` (and the generator's worker
processes) do not load torch; ``from dgnetpp_pl.data import X`` works for every name in ``__all__``.
"""

from __future__ import annotations

import importlib
from typing import Any

_MODULE_OF = {
    "CrossDomainDataModule": "datamodule",
    **dict.fromkeys(["PairSampler", "pick_positives"], "sampling"),
    **dict.fromkeys(["MixBatchKey", "MixSampler"], "batch_mix"),
    "split_validation_ids": "splits",
    **dict.fromkeys(
        [
            "DATASETS",
            "IMAGE_EXTENSIONS",
            "MSMT17",
            "DatasetError",
            "DukeMTMCreID",
            "ImageFolderReID",
            "Market1501",
            "ReIDDataset",
            "build_dataset",
            "load_image",
            "parse_market_name",
            "relabel",
            "verify_images",
        ],
        "datasets",
    ),
    "ImageRecord": "records",
    **dict.fromkeys(
        [
            "SMALL_SIZES",
            "SOURCE_STYLE",
            "TARGET_STYLE",
            "SyntheticDomainSpec",
            "generate_domain",
            "make_synthetic_pair",
            "synthetic_domain_dir",
        ],
        "synthetic",
    ),
    **dict.fromkeys(
        [
            "IMAGENET_MEAN",
            "IMAGENET_STD",
            "build_test_transform",
            "build_train_transform",
            "denormalize",
            "random_erasing",
        ],
        "transforms",
    ),
}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_MODULE_OF})
