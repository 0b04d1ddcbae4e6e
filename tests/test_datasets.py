"""Dataset readers on tiny fake trees in each official layout, and every bad-input error."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dgnetpp_pl.data.datasets import (
    MSMT17,
    DatasetError,
    DukeMTMCreID,
    ImageFolderReID,
    Market1501,
    build_dataset,
    load_image,
    parse_market_name,
    verify_images,
)

MARKET_FILES = {
    "bounding_box_train": [
        "0002_c1s1_000451_03.jpg",
        "0002_c2s1_000551_01.jpg",
        "0007_c3s3_015000_02.jpg",
        "0012_c6s2_020000_01.jpg",
        "0012_c1s1_000001_01.jpg",
        "-1_c1s1_000401_03.jpg",  # junk: skipped
    ],
    "query": ["0003_c1s1_000100_00.jpg", "0005_c4s2_000200_00.jpg"],
    "bounding_box_test": [
        "0003_c2s1_000300_01.jpg",
        "0005_c5s3_000400_02.jpg",
        "0000_c1s1_000500_01.jpg",  # distractor: kept in the gallery only
        "-1_c3s1_000600_01.jpg",  # junk: skipped
    ],
}


def make_tree(root: Path, files: dict[str, list[str]], write_jpeg) -> Path:
    for folder, names in files.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for name in names:
            write_jpeg(root / folder / name)
    return root


def test_parse_market_name_accepts_both_official_forms_and_rejects_camera_zero() -> None:
    assert parse_market_name("0002_c1s1_000451_03.jpg") == (2, 0)
    assert parse_market_name("0005_c2_f0046985.jpg") == (5, 1)
    assert parse_market_name("-1_c3s1_000401_03.jpg") == (-1, 2)
    assert parse_market_name("0005_c0_f0046985.jpg") is None
    assert parse_market_name("person5.jpg") is None


def test_market_counts_relabelling_and_camids(tmp_path: Path, write_jpeg) -> None:
    make_tree(tmp_path, MARKET_FILES, write_jpeg)
    (tmp_path / "bounding_box_test" / "Thumbs.db").write_bytes(b"junk")  # ships with the archive
    ds = Market1501(tmp_path)
    assert ds.root == tmp_path.resolve()
    assert len(ds.train) == 5 and len(ds.query) == 2 and len(ds.gallery) == 3
    assert ds.num_train_pids == 3 and ds.num_train_cams == 6
    by_name = {Path(r.path).name: r for r in ds.train}
    assert by_name["0002_c1s1_000451_03.jpg"].pid == 0
    assert by_name["0007_c3s3_015000_02.jpg"].pid == 1
    assert by_name["0012_c6s2_020000_01.jpg"].pid == 2 and by_name["0012_c6s2_020000_01.jpg"].camid == 5
    assert sorted(r.pid for r in ds.query) == [3, 5]  # original pids
    assert sorted(r.pid for r in ds.gallery) == [0, 3, 5]
    assert {r.camid for r in ds.gallery if r.pid == 5} == {4}


def test_market_pid_zero_is_skipped_outside_the_gallery(tmp_path: Path, write_jpeg) -> None:
    files = {k: list(v) for k, v in MARKET_FILES.items()}
    files["query"].append("0000_c2s1_000700_00.jpg")
    files["bounding_box_train"].append("0000_c2s1_000800_00.jpg")
    ds = Market1501(make_tree(tmp_path, files, write_jpeg))
    assert 0 not in {r.pid for r in ds.query} and ds.num_train_pids == 3


def test_dataset_found_one_level_down(tmp_path: Path, write_jpeg) -> None:
    make_tree(tmp_path / "Market-1501-v15.09.15", MARKET_FILES, write_jpeg)
    (tmp_path / "unrelated").mkdir()
    ds = Market1501(tmp_path)
    assert ds.root == (tmp_path / "Market-1501-v15.09.15").resolve() and len(ds.train) == 5


def test_duke_names_without_sequence(tmp_path: Path, write_jpeg) -> None:
    files = {
        "bounding_box_train": ["0005_c2_f0046985.jpg", "0005_c8_f0046999.jpg", "0009_c1_f0000001.jpg"],
        "query": ["0011_c3_f0000002.jpg"],
        "bounding_box_test": ["0011_c4_f0000003.jpg"],
    }
    ds = DukeMTMCreID(make_tree(tmp_path, files, write_jpeg))
    assert [(r.pid, r.camid) for r in ds.train] == [(0, 1), (0, 7), (1, 0)]
    assert ds.num_train_cams == 8


def make_msmt(root: Path, write_jpeg) -> Path:
    lists = {
        "list_train.txt": ["0000/0000_000_01_0303morning_0015_0.jpg 0", "0000/0000_001_15_0303morning_0016_0.jpg 0"],
        "list_val.txt": ["0001/0001_000_07_0303noon_0001_0.jpg 1"],
        "list_query.txt": ["0000/0000_000_15_0303morning_0001_0.jpg 0"],
        "list_gallery.txt": ["0000/0000_003_02_0303morning_0002_0.jpg 0", "0001/0001_001_10_0303noon_0003_0.jpg 1"],
    }
    for list_name, lines in lists.items():
        folder = "test" if list_name in ("list_query.txt", "list_gallery.txt") else "train"
        for line in lines:
            write_jpeg(root / folder / line.split()[0])
        (root / list_name).write_text("\n".join(lines) + "\n")
    return root


def test_msmt17_lists_cameras_and_train_val_switch(tmp_path: Path, write_jpeg) -> None:
    root = make_msmt(tmp_path / "MSMT17_V1", write_jpeg)
    combined = MSMT17(tmp_path)  # one level down
    assert len(combined.train) == 3 and combined.num_train_pids == 2
    assert [r.camid for r in combined.train] == [0, 14, 6]
    assert combined.query[0].camid == 14 and combined.query[0].path == str(
        root.resolve() / "test/0000/0000_000_15_0303morning_0001_0.jpg"
    )
    assert [(r.pid, r.camid) for r in combined.gallery] == [(0, 1), (1, 9)]
    train_only = MSMT17(root, combine_train_val=False)
    assert len(train_only.train) == 2 and train_only.num_train_pids == 1


def test_msmt17_bad_list_line_names_the_line(tmp_path: Path, write_jpeg) -> None:
    root = make_msmt(tmp_path, write_jpeg)
    with open(root / "list_train.txt", "a") as handle:
        handle.write("0002/badname.jpg 2\n")
    with pytest.raises(DatasetError, match=r"list_train.txt:3: 0002/badname.jpg 2"):
        MSMT17(root)


@pytest.mark.parametrize(
    ("cls", "hint"),
    [
        (Market1501, "Zheng et al"),
        (DukeMTMCreID, "withdrawn by its authors in 2019"),
        (MSMT17, "on request from its authors at Peking University"),
    ],
)
def test_missing_root_names_path_subfolders_and_source(tmp_path: Path, cls, hint: str) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError) as info:
        cls(missing)
    message = str(info.value)
    assert str(missing) in message and hint in message
    expected = "list_query.txt" if cls is MSMT17 else "bounding_box_train"
    assert expected in message and "does not exist" in message


def test_root_without_the_layout_lists_expected_and_found(tmp_path: Path, write_jpeg) -> None:
    write_jpeg(tmp_path / "images" / "a.jpg")
    with pytest.raises(DatasetError, match=r"expected bounding_box_train, query, bounding_box_test .*found images"):
        Market1501(tmp_path)


def test_unparsable_name_strict_raises_with_file_name(tmp_path: Path, write_jpeg) -> None:
    make_tree(tmp_path, MARKET_FILES, write_jpeg)
    write_jpeg(tmp_path / "query" / "holiday_photo.jpg")
    with pytest.raises(DatasetError, match=r"1 entries .*'query/holiday_photo.jpg'.*strict=False"):
        Market1501(tmp_path)


def test_unparsable_names_not_strict_warn_once_with_count_and_skip(tmp_path: Path, write_jpeg) -> None:
    make_tree(tmp_path, MARKET_FILES, write_jpeg)
    for i in range(7):
        write_jpeg(tmp_path / "bounding_box_test" / f"bad_{i}.jpg")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = Market1501(tmp_path, strict=False)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "7 entries" in message and "bad_0.jpg" in message and "and 2 more" in message
    assert len(ds.gallery) == 3


def test_empty_split_names_the_folder(tmp_path: Path, write_jpeg) -> None:
    files = dict(MARKET_FILES, query=[])
    make_tree(tmp_path, files, write_jpeg)
    (tmp_path / "query").mkdir(exist_ok=True)
    with pytest.raises(DatasetError, match=r"query split '.*query' holds no usable images"):
        Market1501(tmp_path)


def test_load_image_corrupt_file_names_it(tmp_path: Path, write_jpeg) -> None:
    good = write_jpeg(tmp_path / "good.jpg", size=(16, 16))
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[:200])
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"not an image at all")
    for path in (truncated, garbage, tmp_path / "missing.jpg"):
        with pytest.raises(DatasetError, match=str(path.name)):
            load_image(path)


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "RGBA"])
def test_load_image_converts_other_modes_to_rgb(tmp_path: Path, mode: str) -> None:
    rgb = Image.new("RGB", (6, 4), (200, 40, 40))
    path = tmp_path / f"image_{mode}.{'jpg' if mode in ('L', 'CMYK') else 'png'}"
    (rgb.convert("RGBA") if mode == "RGBA" else rgb.convert(mode)).save(path)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (6, 4)
    expected = np.asarray(rgb.convert(mode).convert("RGB"), dtype=np.int16)
    assert np.abs(np.asarray(image, dtype=np.int16) - expected).max() <= 12  # JPEG round trip


def test_verify_images_reports_every_bad_file(tmp_path: Path, write_jpeg) -> None:
    make_tree(tmp_path, MARKET_FILES, write_jpeg)
    ds = Market1501(tmp_path)
    bad = [ds.train[1].path, ds.gallery[2].path]
    Path(bad[0]).write_bytes(b"\xff\xd8\xff broken")
    Path(bad[1]).write_bytes(Path(ds.train[0].path).read_bytes()[:100])
    problems = verify_images([*ds.train, *ds.query, *ds.gallery], workers=2)
    assert [path for path, _ in problems] == bad
    assert all(reason for _, reason in problems)


def test_image_folder_identity_subfolders(tmp_path: Path, write_jpeg) -> None:
    write_jpeg(tmp_path / "bob" / "x1.jpg")
    write_jpeg(tmp_path / "bob" / "0001_c3s1_000001_00.jpg")  # Market-style name gives the camera
    write_jpeg(tmp_path / "alice" / "y.png")
    ds = ImageFolderReID(tmp_path)
    assert [(Path(r.path).name, r.pid, r.camid) for r in ds.train] == [
        ("y.png", 0, 0),
        ("0001_c3s1_000001_00.jpg", 1, 2),
        ("x1.jpg", 1, 0),
    ]
    assert ds.query == [] and ds.gallery == []


def test_image_folder_csv_with_splits(tmp_path: Path, write_jpeg) -> None:
    for name in ("a.jpg", "b.jpg", "c.jpg", "d.jpg"):
        write_jpeg(tmp_path / "img" / name)
    (tmp_path / "records.csv").write_text(
        "path,pid,camid,split\nimg/a.jpg,40,1,train\nimg/b.jpg,30,0,train\nimg/c.jpg,40,2,query\nimg/d.jpg,40,,gallery\n"
    )
    ds = ImageFolderReID(tmp_path)
    assert [(r.pid, r.camid) for r in ds.train] == [(1, 1), (0, 0)]
    assert [(r.pid, r.camid) for r in ds.query] == [(40, 2)]
    assert [(r.pid, r.camid) for r in ds.gallery] == [(40, 0)]


def test_image_folder_csv_errors(tmp_path: Path, write_jpeg) -> None:
    write_jpeg(tmp_path / "a.jpg")
    (tmp_path / "records.csv").write_text("file,label\na.jpg,1\n")
    with pytest.raises(DatasetError, match=r"must name the columns path and pid"):
        ImageFolderReID(tmp_path)
    (tmp_path / "records.csv").write_text("path,pid\na.jpg,1\ngone.jpg,2\na.jpg,x\n")
    with pytest.raises(DatasetError, match=r"records.csv:3: missing file 'gone.jpg'.*records.csv:4: pid / camid"):
        ImageFolderReID(tmp_path)
    with pytest.warns(UserWarning, match="2 entries"):
        assert len(ImageFolderReID(tmp_path, strict=False).train) == 1


def test_build_dataset_registry(tmp_path: Path, write_jpeg) -> None:
    make_tree(tmp_path, MARKET_FILES, write_jpeg)
    assert isinstance(build_dataset("market1501", tmp_path), Market1501)
    with pytest.raises(DatasetError, match=r"unknown dataset name 'market'.*dukemtmc, folder, market1501, msmt17"):
        build_dataset("market", tmp_path)
