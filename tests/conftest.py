"""Shared test fixtures: tiny JPEG writer, benchmark trees side by side, and a small synthetic source/target pair
generated once per session."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
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


# The benchmark trees that ``write_benchmark_trees`` builds: folder name, train ids, test ids and cameras. Every
# train id has 2 images in each of 2 cameras; every test id has a query in one camera and 2 gallery images in
# another; the gallery also holds 2 distractors (pid 0, Market / Duke) and the lists skip nothing (MSMT17).
BENCHMARK_TREES: dict[str, dict[str, object]] = {
    "market1501": {"folder": "Market-1501-v15.09.15", "train_ids": 8, "test_ids": 6, "cams": 6},
    "dukemtmc": {"folder": "DukeMTMC-reID", "train_ids": 10, "test_ids": 5, "cams": 8},
    "msmt17": {"folder": "MSMT17_V1", "train_ids": 9, "test_ids": 4, "cams": 15},
}
BENCHMARK_IMAGE_SIZE = (16, 32)  # (width, height)


def _write_person(path: Path, rng: np.random.Generator, colour: np.ndarray) -> None:
    """A tiny person-like crop: the identity's colour in the middle, noise around it, so that ids are learnable."""
    w, h = BENCHMARK_IMAGE_SIZE
    image = rng.integers(0, 256, (h, w, 3)).astype(np.float32) * 0.4 + 60
    image[h // 8 : h - h // 8, w // 4 : w - w // 4] = colour + rng.normal(0, 12, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(path, format="JPEG", quality=90)


def write_benchmark_trees(
    root: Path, datasets: tuple[str, ...] = tuple(BENCHMARK_TREES), msmt_version: str = "V1"
) -> Path:
    """Write tiny Market-1501, DukeMTMC-reID and MSMT17 trees in their official layouts side by side under ``root``.

    Sizes are in :data:`BENCHMARK_TREES`; file names parse as each dataset's own. ``msmt_version="V2"`` writes
    ``MSMT17_V2`` with ``mask_train_v2/`` and ``mask_test_v2/`` instead of V1. Returns ``root``.
    """
    for index, name in enumerate(datasets):
        tree = BENCHMARK_TREES[name]
        rng = np.random.default_rng(index)
        n_train, n_test, n_cams = int(tree["train_ids"]), int(tree["test_ids"]), int(tree["cams"])
        colours = rng.integers(0, 256, (n_train + n_test + 1, 3)).astype(np.float32)
        cams = [tuple(int(c) for c in rng.choice(n_cams, 2, replace=False) + 1) for _ in range(n_train + n_test)]
        if name == "msmt17":
            _write_msmt(root / f"MSMT17_{msmt_version}", msmt_version, n_train, cams, colours, rng)
        else:
            _write_market_layout(root / str(tree["folder"]), name == "market1501", n_train, cams, colours, rng)
    return root


def _write_market_layout(base: Path, market: bool, n_train: int, cams: list, colours: np.ndarray, rng) -> None:
    """Market names ``0002_c1s1_000451_00.jpg``, Duke names ``0005_c2_f0046985.jpg``; pid p has ``cams[p - 1]``."""
    frame = 0

    def write(folder: str, pid: int, cam: int) -> None:
        nonlocal frame
        label = f"{pid:04d}" if pid >= 0 else "-1"
        name = f"{label}_c{cam}s1_{frame:06d}_00.jpg" if market else f"{label}_c{cam}_f{frame:07d}.jpg"
        _write_person(base / folder / name, rng, colours[max(pid, 0)])
        frame += 1

    for pid, (cam_a, cam_b) in enumerate(cams, start=1):
        if pid <= n_train:
            for cam in (cam_a, cam_a, cam_b, cam_b):
                write("bounding_box_train", pid, cam)
        else:
            write("query", pid, cam_a)
            write("bounding_box_test", pid, cam_b)
            write("bounding_box_test", pid, cam_b)
    for pid in (0, 0, -1):  # distractors stay in the gallery; junk is skipped
        write("bounding_box_test", pid, 1)


def _write_msmt(base: Path, version: str, n_train: int, cams: list, colours: np.ndarray, rng) -> None:
    """MSMT17 lists; the last 2 train ids are in list_val.txt; test ids are numbered from 0 as in the real lists."""
    train_dir, test_dir = ("train", "test") if version == "V1" else ("mask_train_v2", "mask_test_v2")
    lists: dict[str, list[str]] = {name: [] for name in ("train", "val", "query", "gallery")}
    for index, (cam_a, cam_b) in enumerate(cams):
        if index < n_train:
            split = "val" if index >= n_train - 2 else "train"
            entries = [(split, cam, k) for k, cam in enumerate((cam_a, cam_a, cam_b, cam_b))]
        else:
            entries = [("query", cam_a, 0), ("gallery", cam_b, 1), ("gallery", cam_b, 2)]
        label = index if index < n_train else index - n_train
        for split, cam, k in entries:
            rel = f"{label:04d}/{label:04d}_{k:03d}_{cam:02d}_0303morning_{k:04d}_0.jpg"
            folder = test_dir if split in ("query", "gallery") else train_dir
            _write_person(base / folder / rel, rng, colours[index + 1])
            lists[split].append(f"{rel} {label}")
    for split, lines in lists.items():
        (base / f"list_{split}.txt").write_text("\n".join(lines) + "\n")


@pytest.fixture
def benchmark_tree() -> Callable[..., Path]:
    """``benchmark_tree(root, datasets=("market1501", ...), msmt_version="V1")``: :func:`write_benchmark_trees`."""
    return write_benchmark_trees


@pytest.fixture
def benchmark_sizes() -> dict[str, dict[str, object]]:
    """A copy of :data:`BENCHMARK_TREES`: each tree's folder name, train ids, test ids and cameras."""
    return {name: dict(tree) for name, tree in BENCHMARK_TREES.items()}


@pytest.fixture(scope="session")
def benchmark_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data_dir holding Market-1501-v15.09.15/, DukeMTMC-reID/ and MSMT17_V1/ side by side (see BENCHMARK_TREES).

    Every file name parses and every id has enough images per camera for a tiny training run of any real preset.
    """
    return write_benchmark_trees(tmp_path_factory.mktemp("benchmarks"))


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
    from configs import TINY_DEMO

    return [*TINY_DEMO, f"paths.data_dir={data_dir}", "logger=csv", "callbacks.swap_grid=null"]


@pytest.fixture(scope="session")
def tiny_overrides(synthetic_data_dir: Path) -> list[str]:
    """Overrides for the tiny preset on the session's synthetic data: demo experiment, CSV logs, no image grids."""
    return _tiny_overrides(synthetic_data_dir)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, synthetic_data_dir: Path) -> tuple[Path, dict]:
    """One tiny two-stage run (source stage, then warm-up, a pseudo-label refresh and self-training, each stage
    validated and tested, swap grids on) shared by the end-to-end tests: ``(output dir, results)``."""
    from configs import TINY_DEMO, compose_train

    from dgnetpp_pl.train import train

    out = tmp_path_factory.mktemp("tiny_run")
    overrides = [*TINY_DEMO, f"paths.data_dir={synthetic_data_dir}", f"paths.output_dir={out}"]
    return out, train(compose_train(*overrides, "logger=csv"))


@pytest.fixture(scope="session")
def tiny_source_ckpt(tiny_run: tuple[Path, dict]) -> Path:
    """The source-stage checkpoint of the shared tiny run, for adapt runs to start from."""
    return Path(tiny_run[1]["source"]["ckpt"])
