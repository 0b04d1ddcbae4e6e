"""Shared test fixtures: tiny JPEG writer and a small synthetic source/target pair generated once per session."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from dgnetpp_pl.data.synthetic import SMALL_SIZES, SOURCE_STYLE, TARGET_STYLE, make_synthetic_pair


def _write_jpeg(path: Path, color: tuple[int, int, int] = (120, 60, 30), size: tuple[int, int] = (4, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format="JPEG")
    return path


@pytest.fixture
def write_jpeg() -> Callable[..., Path]:
    """``write_jpeg(path, color=(r, g, b), size=(w, h))`` writes a tiny JPEG (parents created) and returns its path."""
    return _write_jpeg


@pytest.fixture(scope="session")
def synthetic_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data_dir holding the small synthetic pair (seed 0) that ``synthetic=SMALL_SIZES`` asks for."""
    data_dir = tmp_path_factory.mktemp("data")
    make_synthetic_pair(
        data_dir,
        seed=0,
        source=SOURCE_STYLE.with_overrides(SMALL_SIZES),
        target=TARGET_STYLE.with_overrides(SMALL_SIZES),
    )
    return data_dir


def _tiny_overrides(data_dir: Path) -> list[str]:
    return ["experiment=demo", "debug=tiny", f"paths.data_dir={data_dir}", "logger=csv", "callbacks.swap_grid=null"]


@pytest.fixture(scope="session")
def tiny_overrides(synthetic_data_dir: Path) -> list[str]:
    """Overrides for the tiny preset on the session's synthetic data: demo experiment, CSV logs, no image grids."""
    return _tiny_overrides(synthetic_data_dir)


@pytest.fixture(scope="session")
def tiny_source_ckpt(tmp_path_factory: pytest.TempPathFactory, synthetic_data_dir: Path) -> Path:
    """A source-stage checkpoint of the tiny preset after one training batch, for adapt runs to start from."""
    from hydra import compose, initialize_config_dir

    from dgnetpp_pl.config import CONF_DIR
    from dgnetpp_pl.train import train

    out = tmp_path_factory.mktemp("tiny_source")
    overrides = [*_tiny_overrides(synthetic_data_dir), f"paths.output_dir={out}", "stage=source", "test=false"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*overrides, "trainer.limit_train_batches=1"])
    return Path(train(cfg)["source"]["ckpt"])
