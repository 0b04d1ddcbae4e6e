"""Dataset readers on tiny fake trees in each official layout (bad input: ``test_bad_input.py``)."""

from __future__ import annotations

from pathlib import Path

from dgnetpp_pl.data.datasets import MSMT17, DukeMTMCreID, ImageFolderReID, Market1501, build_dataset, parse_market_name


def test_parse_market_name_accepts_both_official_forms_and_rejects_camera_zero() -> None:
    assert parse_market_name("0002_c1s1_000451_03.jpg") == (2, 0)
    assert parse_market_name("0005_c2_f0046985.jpg") == (5, 1)
    assert parse_market_name("-1_c3s1_000401_03.jpg") == (-1, 2)
    assert parse_market_name("0005_c0_f0046985.jpg") is None
    assert parse_market_name("person5.jpg") is None


def test_market_counts_relabelling_and_camids(tmp_path: Path, market_tree) -> None:
    market_tree(tmp_path)
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


def test_market_pid_zero_is_skipped_outside_the_gallery(tmp_path: Path, market_tree, market_files) -> None:
    market_files["query"].append("0000_c2s1_000700_00.jpg")
    market_files["bounding_box_train"].append("0000_c2s1_000800_00.jpg")
    ds = Market1501(market_tree(tmp_path, market_files))
    assert 0 not in {r.pid for r in ds.query} and ds.num_train_pids == 3


def test_dataset_found_one_level_down(tmp_path: Path, market_tree) -> None:
    market_tree(tmp_path / "Market-1501-v15.09.15")
    (tmp_path / "unrelated").mkdir()
    ds = Market1501(tmp_path)
    assert ds.root == (tmp_path / "Market-1501-v15.09.15").resolve() and len(ds.train) == 5


def test_duke_names_without_sequence(tmp_path: Path, market_tree) -> None:
    files = {
        "bounding_box_train": ["0005_c2_f0046985.jpg", "0005_c8_f0046999.jpg", "0009_c1_f0000001.jpg"],
        "query": ["0011_c3_f0000002.jpg"],
        "bounding_box_test": ["0011_c4_f0000003.jpg"],
    }
    ds = DukeMTMCreID(market_tree(tmp_path, files))  # Duke ships in the Market layout
    assert [(r.pid, r.camid) for r in ds.train] == [(0, 1), (0, 7), (1, 0)]
    assert ds.num_train_cams == 8


def test_msmt17_lists_cameras_and_train_val_switch(tmp_path: Path, msmt_tree) -> None:
    root = msmt_tree(tmp_path / "MSMT17_V1")
    combined = MSMT17(tmp_path)  # one level down
    assert len(combined.train) == 3 and combined.num_train_pids == 2
    assert [r.camid for r in combined.train] == [0, 14, 6]
    assert combined.query[0].camid == 14 and combined.query[0].path == str(
        root.resolve() / "test/0000/0000_000_15_0303morning_0001_0.jpg"
    )
    assert [(r.pid, r.camid) for r in combined.gallery] == [(0, 1), (1, 9)]
    train_only = MSMT17(root, combine_train_val=False)
    assert len(train_only.train) == 2 and train_only.num_train_pids == 1


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


def test_build_dataset_registry(tmp_path: Path, market_tree) -> None:
    market_tree(tmp_path)
    assert isinstance(build_dataset("market1501", tmp_path), Market1501)
