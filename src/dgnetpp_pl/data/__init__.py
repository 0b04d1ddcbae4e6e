"""Data layer: dataset readers, the synthetic cross-domain dataset, sampling, transforms and the datamodule."""

from dgnetpp_pl.data.datamodule import CrossDomainDataModule
from dgnetpp_pl.data.datasets import (
    DATASETS,
    MSMT17,
    DatasetError,
    DukeMTMCreID,
    ImageFolderReID,
    Market1501,
    build_dataset,
    load_image,
    verify_images,
)
from dgnetpp_pl.data.records import ImageRecord
from dgnetpp_pl.data.sampling import PairSampler, pick_positives
from dgnetpp_pl.data.splits import split_validation_ids
from dgnetpp_pl.data.synthetic import (
    SMALL_SIZES,
    SOURCE_STYLE,
    TARGET_STYLE,
    SyntheticDomainSpec,
    generate_domain,
    make_synthetic_pair,
)
from dgnetpp_pl.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_test_transform,
    build_train_transform,
    denormalize,
    random_erasing,
)

__all__ = [
    "DATASETS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MSMT17",
    "SMALL_SIZES",
    "SOURCE_STYLE",
    "TARGET_STYLE",
    "CrossDomainDataModule",
    "DatasetError",
    "DukeMTMCreID",
    "ImageFolderReID",
    "ImageRecord",
    "Market1501",
    "PairSampler",
    "SyntheticDomainSpec",
    "build_dataset",
    "build_test_transform",
    "build_train_transform",
    "denormalize",
    "generate_domain",
    "load_image",
    "make_synthetic_pair",
    "pick_positives",
    "random_erasing",
    "split_validation_ids",
    "verify_images",
]
