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


# A small Market-1501 tree in the official layout (junk pid -1 skipped, pid 0 a gallery-only distractor).
MARKET_FILES = {
    "bounding_box_train": [
        "0002_c1s1_000451_03.jpg",
        "0002_c2s1_000551_01.jpg",
        "0007_c3s3_015000_02.jpg",
        "0012_c6s2_020000_01.jpg",
        "0012_c1s1_000001_01.jpg",
        "-1_c1s1_000401_03.jpg",
    ],
    "query": ["0003_c1s1_000100_00.jpg", "0005_c4s2_000200_00.jpg"],
    "bounding_box_test": [
        "0003_c2s1_000300_01.jpg",
        "0005_c5s3_000400_02.jpg",
        "0000_c1s1_000500_01.jpg",
        "-1_c3s1_000600_01.jpg",
    ],
}


@pytest.fixture
def market_files() -> dict[str, list[str]]:
    """A fresh copy of :data:`MARKET_FILES` (``{folder: [file names]}``) to edit."""
    return {folder: list(names) for folder, names in MARKET_FILES.items()}


@pytest.fixture
def market_tree() -> Callable[..., Path]:
    """``market_tree(root, files=MARKET_FILES)`` writes ``{folder: [names]}`` as tiny JPEGs and returns ``root``."""

    def make(root: Path, files: dict[str, list[str]] | None = None) -> Path:
        for folder, names in (MARKET_FILES if files is None else files).items():
            (root / folder).mkdir(parents=True, exist_ok=True)
            for name in names:
                _write_jpeg(root / folder / name)
        return root

    return make


@pytest.fixture
def msmt_tree() -> Callable[[Path], Path]:
    """``msmt_tree(root)`` writes a tiny MSMT17_V1 tree (train/val/query/gallery lists) and returns ``root``."""

    def make(root: Path) -> Path:
        lists = {
            "list_train.txt": [
                "0000/0000_000_01_0303morning_0015_0.jpg 0",
                "0000/0000_001_15_0303morning_0016_0.jpg 0",
            ],
            "list_val.txt": ["0001/0001_000_07_0303noon_0001_0.jpg 1"],
            "list_query.txt": ["0000/0000_000_15_0303morning_0001_0.jpg 0"],
            "list_gallery.txt": [
                "0000/0000_003_02_0303morning_0002_0.jpg 0",
                "0001/0001_001_10_0303noon_0003_0.jpg 1",
            ],
        }
        for list_name, lines in lists.items():
            folder = "test" if list_name in ("list_query.txt", "list_gallery.txt") else "train"
            for line in lines:
                _write_jpeg(root / folder / line.split()[0])
            (root / list_name).write_text("\n".join(lines) + "\n")
        return root

    return make


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
def tiny_run(tmp_path_factory: pytest.TempPathFactory, synthetic_data_dir: Path) -> tuple[Path, dict]:
    """One tiny two-stage run (source stage, then warm-up, a pseudo-label refresh and self-training, each stage
    validated and tested, swap grids on) shared by the end-to-end tests: ``(output dir, results)``."""
    from configs import compose_train

    from dgnetpp_pl.train import train

    out = tmp_path_factory.mktemp("tiny_run")
    overrides = ["experiment=demo", "debug=tiny", f"paths.data_dir={synthetic_data_dir}", f"paths.output_dir={out}"]
    return out, train(compose_train(*overrides, "logger=csv"))


@pytest.fixture(scope="session")
def tiny_source_ckpt(tiny_run: tuple[Path, dict]) -> Path:
    """The source-stage checkpoint of the shared tiny run, for adapt runs to start from."""
    return Path(tiny_run[1]["source"]["ckpt"])
