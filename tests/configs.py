"""Config composition for the tests: the package's YAML tree through Hydra's compose API."""

from __future__ import annotations

import dataclasses

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from dgnetpp_pl.config import CONF_DIR, DataConfig, DomainConfig, RootConfig, SyntheticConfig, validate_config
from dgnetpp_pl.data.synthetic import SMALL_SIZES

# The tiny demo the end-to-end tests train. Its two batches per epoch pin cross pairing: with the demo's official
# mix their types would be drawn at random (1 ab and 1 ba batch in 22 on the small data), so a step's terms would
# depend on the seed. The mix's own tests override it.
TINY_DEMO = ("experiment=demo", "debug=tiny", "data.pairing=cross")


def compose_train(*overrides: str, config_name: str = "config") -> DictConfig:
    """A primary config (default: training) composed with ``overrides``, not validated."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))


def typed_train(*overrides: str) -> RootConfig:
    """The validated training config; ``paths.output_dir`` defaults to an unused folder outside a Hydra run."""
    if not any(o.startswith("paths.output_dir=") for o in overrides):
        overrides = (*overrides, "paths.output_dir=unused")
    return validate_config(compose_train(*overrides))


def small_data_config(data_dir: object, **overrides: object) -> DataConfig:
    """The data config of the small synthetic pair (``SMALL_SIZES``, seed 0) at 32x16, batch 4, no workers."""
    config = DataConfig(
        source=DomainConfig(style="source"),
        target=DomainConfig(style="target"),
        data_dir=str(data_dir),
        height=32,
        width=16,
        batch_size=4,
        test_batch_size=16,
        num_workers=0,
        synthetic=SyntheticConfig(**SMALL_SIZES, seed=0),
    )
    return dataclasses.replace(config, **overrides)
